"""Model loading (local files only), tiny test models, and layer discovery."""

from libortho.models.assets import cache_root, ensure_smollm2, smollm2_dir
from libortho.models.layers import (
    UnsupportedModelError,
    block_linears,
    block_prefix,
    decoder_blocks,
    find_linears,
    refuse_conv1d,
)
from libortho.models.load import load_model
from libortho.models.tiny import ByteTokenizer, build_tiny_llama, tiny_llama_config

__all__ = ["ByteTokenizer", "UnsupportedModelError", "block_linears", "block_prefix", "build_tiny_llama",
           "cache_root", "decoder_blocks", "ensure_smollm2", "find_linears", "load_model", "refuse_conv1d",
           "smollm2_dir", "tiny_llama_config"]
