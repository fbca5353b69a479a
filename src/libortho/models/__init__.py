"""Model loading (local files only), tiny test models, and layer discovery.

Attributes are imported lazily, so ``python -m libortho.models.assets`` stays fast (no torch import
when the SmolLM2 cache is already complete).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "cache_root": "assets", "ensure_smollm2": "assets", "smollm2_dir": "assets",
    "UnsupportedModelError": "layers", "block_linears": "layers", "block_prefix": "layers",
    "decoder_blocks": "layers", "find_linears": "layers", "refuse_conv1d": "layers",
    "has_tokenizer_files": "load", "load_model": "load", "load_tokenizer": "load",
    "ByteTokenizer": "tiny", "build_tiny_llama": "tiny", "tiny_llama_config": "tiny",
}
__all__ = ["ByteTokenizer", "UnsupportedModelError", "block_linears", "block_prefix", "build_tiny_llama",
           "cache_root", "decoder_blocks", "ensure_smollm2", "find_linears", "has_tokenizer_files", "load_model",
           "load_tokenizer", "refuse_conv1d", "smollm2_dir", "tiny_llama_config"]

if TYPE_CHECKING:  # pragma: no cover
    from libortho.models.assets import cache_root, ensure_smollm2, smollm2_dir
    from libortho.models.layers import (
        UnsupportedModelError,
        block_linears,
        block_prefix,
        decoder_blocks,
        find_linears,
        refuse_conv1d,
    )
    from libortho.models.load import has_tokenizer_files, load_model, load_tokenizer
    from libortho.models.tiny import ByteTokenizer, build_tiny_llama, tiny_llama_config


def __getattr__(name: str) -> Any:
    """Import ``name`` from its submodule on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"libortho.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'libortho.models' has no attribute {name!r}")
