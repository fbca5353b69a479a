"""Runtime: OrthoLinear (base + alpha * ortho) inside ordinary Hugging Face models."""

from libortho.runtime.linear import OrthoLinear
from libortho.runtime.patch import alpha_scope, get_alpha, ortho_layers, replace_module, set_alpha

__all__ = ["OrthoLinear", "alpha_scope", "get_alpha", "ortho_layers", "replace_module", "set_alpha"]
