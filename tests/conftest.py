"""Shared fixtures: a tiny random Llama, its byte tokenizer, the SmolLM2 cache and Debian fortunes.

Missing assets skip their tests, except under ``make test`` (``LIBORTHO_REQUIRE_ASSETS=1``), where every
asset ``make assets`` guarantees must be present and its absence fails the test.
"""

import os
from pathlib import Path
from typing import NoReturn

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


REQUIRE_ASSETS_ENV = "LIBORTHO_REQUIRE_ASSETS"


def missing_asset(message: str, promised: bool = True) -> NoReturn:
    """Fail when ``$LIBORTHO_REQUIRE_ASSETS=1`` (``make test``, after ``make assets``) and the asset was promised;
    skip otherwise, so a plain ``pytest`` without the assets still runs everything else."""
    if promised and os.environ.get(REQUIRE_ASSETS_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ASSETS_ENV}=1: `make assets` should have installed it)", pytrace=False)
    pytest.skip(message)


def require_smollm2() -> Path:
    """The SmolLM2 cache directory, or fail/skip (see :func:`missing_asset`)."""
    from libortho.models.assets import is_complete, smollm2_dir

    path = smollm2_dir()
    if not is_complete(path):
        missing_asset(f"SmolLM2 cache absent at {path}: run `make assets` (python -m libortho.models.assets)")
    return path


def require_fortunes() -> Path:
    """Debian ``fortunes``, or fail/skip. ``make assets`` installs it only as root with apt and records the
    outcome in ``$LIBORTHO_CACHE/.fortunes``: it is required only where that record says "installed"."""
    from libortho.data import corpora
    from libortho.models.assets import cache_root

    if corpora.FORTUNES_DIR.is_dir():
        return corpora.FORTUNES_DIR
    stamp = cache_root() / ".fortunes"
    record = stamp.read_text().strip() if stamp.is_file() else "absent"
    missing_asset(f"Debian `fortunes` not found at {corpora.FORTUNES_DIR} (`make assets` record {stamp}: "
                  f"{record!r})", promised=record == "installed")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint; fails under ``make test`` when absent, skips otherwise."""
    return require_smollm2()


@pytest.fixture(scope="session")
def fortunes_dir() -> Path:
    """Debian fortunes; required under ``make test`` only where ``make assets`` recorded it as installed."""
    return require_fortunes()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    """SmolLM2-135M's tokenizer (the asset must be present under ``make test``)."""
    from libortho.models.load import load_tokenizer

    return load_tokenizer(smollm2_dir)
