"""Shared fixtures: a tiny random Llama, its byte tokenizer, and the SmolLM2 cache (skipped when absent)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_llama():
    """A seeded random-init LlamaForCausalLM: vocab 259, hidden 64, intermediate 160, 2 layers, 4/2 heads."""
    from libortho.models import build_tiny_llama

    return build_tiny_llama(seed=0)


@pytest.fixture
def byte_tokenizer():
    """The byte-level tokenizer that matches ``tiny_llama`` (256 bytes + BOS/EOS/PAD)."""
    from libortho.models import ByteTokenizer

    return ByteTokenizer()


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct checkpoint; skips when the cache has not been built."""
    from libortho.models.assets import is_complete, smollm2_dir

    path = smollm2_dir()
    if not is_complete(path):
        pytest.skip(f"SmolLM2 cache absent at {path}: run `make assets` (python -m libortho.models.assets)")
    return path
