"""Trained models of an experiment, cached on disk under a key so a re-run can reuse them.

A model is saved with ``save_pretrained`` into a temporary sibling directory, its metadata
(``libortho-run.json``: the key, wall time and log of how it was made) is written last, and the
directory is renamed into place. A later run with the same key loads it instead of training
again and says so (``reused: true``, with the original wall time).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from libortho.atomic import atomic_directory, atomic_write_json

META = "libortho-run.json"


def _canonical(obj: Any) -> Any:
    """JSON round trip, so tuples and lists (and other equivalent spellings) compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def load_saved_model(path: Path) -> nn.Module:
    """A causal LM saved by :func:`cached_model` (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def is_cached_model(path: str | Path, key: dict[str, Any]) -> bool:
    """Whether :func:`cached_model` would load the model at ``path`` under ``key`` instead of building it."""
    meta_path = Path(path) / META
    if not meta_path.is_file():
        return False
    try:
        return json.loads(meta_path.read_text()).get("key") == _canonical(key)
    except (OSError, ValueError):
        return False


def cached_model(path: str | Path, key: dict[str, Any], build: Callable[[], tuple[nn.Module, dict[str, Any]]],
                 fresh: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The model stored at ``path`` under ``key``, or ``build()``'s (then stored); returns (model, info).

    ``info`` holds what ``build`` reported plus ``wall_s`` and ``reused``.
    """
    path = Path(path)
    meta_path = path / META
    if not fresh and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == _canonical(key):
            return load_saved_model(path), {**meta["info"], "reused": True}
    t0 = time.perf_counter()
    model, info = build()
    info = {**info, "wall_s": info.get("wall_s", time.perf_counter() - t0), "reused": False}
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        atomic_write_json(tmp / META, {"key": _canonical(key), "info": info})
    return model.eval(), info


def cached_json(path: Path, key: dict[str, Any], build: Callable[[], dict[str, Any]],
                log: Callable[[str], None] = lambda _: None,
                describe: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any]:
    """A stage's JSON value stored at ``path`` under ``key``, or ``build()``'s (``wall_s`` added), stored atomically
    with its key. ``log`` hears "cached" or the build's time (and ``describe(value)`` when given)."""
    key = _canonical(key)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            log(f"{path.stem}: cached")
            return stored["value"]
    t0 = time.perf_counter()
    value = build()
    value["wall_s"] = time.perf_counter() - t0
    atomic_write_json(path, {"key": key, "value": value})
    log(f"{path.stem}: {describe(value) + '  ' if describe else ''}({value['wall_s']:.0f} s)")
    return value
