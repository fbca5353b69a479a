"""Shared fixtures: a tiny random Llama, and the SmolLM2 cache (skipped when absent)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_llama():
    from libortho.models import build_tiny_llama

    return build_tiny_llama(seed=0)


@pytest.fixture(scope="session")
def smollm2_dir():
    from libortho.models.assets import MARKER, smollm2_dir

    path = smollm2_dir()
    if not (path / MARKER).exists():
        pytest.skip("SmolLM2 cache absent: run `make assets` (python -m libortho.models.assets)")
    return path
