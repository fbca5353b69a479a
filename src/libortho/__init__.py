"""libortho: separate what an LLM knows in general from what it memorised, under a switch.

Every linear layer becomes ``Y = W_base X + alpha * W_ortho X``: a dense INT-b base stream plus
a sparse, high-precision ortho stream chosen by curvature. ``alpha = 0`` switches it off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from libortho.version import __version__  # noqa: F401  (re-exported)

__all__ = [
    "DecomposeConfig", "QuantConfig", "SelectConfig", "decompose", "get_alpha", "load", "save",
    "select_ortho", "set_alpha",
]

_LAZY = {
    "DecomposeConfig": "libortho.config", "QuantConfig": "libortho.config",
    "SelectConfig": "libortho.config", "decompose": "libortho.pipeline",
    "select_ortho": "libortho.pipeline", "load": "libortho.checkpoint", "save": "libortho.checkpoint",
    "set_alpha": "libortho.runtime", "get_alpha": "libortho.runtime",
}

if TYPE_CHECKING:  # pragma: no cover
    from libortho.checkpoint import load, save
    from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
    from libortho.pipeline import decompose, select_ortho
    from libortho.runtime import get_alpha, set_alpha


def __getattr__(name: str) -> Any:
    """Import the public API lazily so ``import libortho`` stays cheap."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'libortho' has no attribute {name!r}")
