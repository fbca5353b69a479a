"""The alpha switch shared by every module that holds a memory stream (OrthoLinear, MemoryNeurons)."""

from __future__ import annotations

import math
from typing import ClassVar

LOCKED_MESSAGE = ("the ortho stream of this layer was not loaded (withheld or deleted): "
                  "it is locked at alpha = 0")


class AlphaSwitch:
    """``alpha`` as a plain Python float (one branch per call); pinned to 0 while ``locked``.

    Subclasses define the ``locked`` property (True while no memory stream is attached) and keep ``_alpha``;
    ``locked_message`` is what setting a locked switch says.
    """

    _alpha: float
    locked: bool
    locked_message: ClassVar[str] = LOCKED_MESSAGE
    switch_name: ClassVar[str] = "alpha"

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{self.switch_name} must be finite, got {value}")
        if value != 0.0 and self.locked:
            raise RuntimeError(self.locked_message)
        self._alpha = value
