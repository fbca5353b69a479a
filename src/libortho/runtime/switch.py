"""The alpha switch shared by every module that holds a memory stream (OrthoLinear, MemoryNeurons)."""

from __future__ import annotations

import math

LOCKED_MESSAGE = ("the ortho stream of this layer was not loaded (withheld or deleted): "
                  "it is locked at alpha = 0")


class AlphaSwitch:
    """``alpha`` as a plain Python float (one branch per call); pinned to 0 while ``locked``.

    Subclasses define the ``locked`` property (True while no memory stream is attached) and keep ``_alpha``.
    """

    _alpha: float
    locked: bool

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"alpha must be finite, got {value}")
        if value != 0.0 and self.locked:
            raise RuntimeError(LOCKED_MESSAGE)
        self._alpha = value
