"""Model loading (local files only), tiny test models, and layer discovery."""

from libortho.models.layers import (
    UnsupportedModelError,
    block_linears,
    decoder_blocks,
    find_linears,
)
from libortho.models.load import load_model
from libortho.models.tiny import ByteTokenizer, build_tiny_llama, tiny_llama_config

__all__ = ["ByteTokenizer", "UnsupportedModelError", "block_linears", "build_tiny_llama", "decoder_blocks",
           "find_linears", "load_model", "tiny_llama_config"]
