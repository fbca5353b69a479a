"""Runtime: OrthoLinear (base + alpha * ortho) inside ordinary Hugging Face models."""

from libortho.runtime.linear import LOCKED_MESSAGE, OrthoLinear
from libortho.runtime.patch import alpha_scope, get_alpha, ortho_layers, replace_module, set_alpha

__all__ = ["LOCKED_MESSAGE", "OrthoLinear", "alpha_scope", "get_alpha", "ortho_layers", "replace_module",
           "set_alpha"]
