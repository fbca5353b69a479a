"""Save a decomposed Hugging Face model to the two-stream format and rebuild it from disk.

The file format itself (hashes, atomic writes, manifest last) lives in :mod:`libortho.io`;
this module only maps between a live model full of :class:`OrthoLinear` layers (and
:class:`MemoryNeurons` on gated MLPs) and the ``base`` / ``ortho`` / ``rest`` dictionaries. ``ortho``
holds the memory streams of every form: linear-site ones by linear name, neurons by MLP name.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from libortho.behaviour_io import attach_saved_behaviour  # noqa: F401  (re-exported)
from libortho.io import REST, CorruptDecompositionError, Decomposition, read_decomposition, write_decomposition
from libortho.models.load import load_tokenizer
from libortho.runtime import (
    OrthoLinear,
    attach_neurons,
    group_shared_inputs,
    log_kernel_fallbacks,
    neuron_sites,
    ortho_layers,
    replace_module,
    set_alpha,
    switchable_layers,
)
from libortho.streams import SparseOrtho
from libortho.version import __version__


def split_state(model: nn.Module) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """Base streams, memory streams (linear and mlp sites) and the remaining (full-precision) tensors."""
    layers = ortho_layers(model)
    base = {n: m.base_stream for n, m in layers.items()}
    ortho = {n: m.ortho_stream for n, m in layers.items() if m.ortho_stream is not None}
    ortho.update({n: m.stream for n, m in neuron_sites(model).items() if m.stream is not None})
    rest: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for name, t in model.state_dict(keep_vars=False).items():
        owner = name.rsplit(".", 1)[0]
        if owner in layers and not name.endswith(".bias"):
            continue
        if tied and name == "lm_head.weight":
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        rest[name] = t.detach().contiguous().clone()
    return base, ortho, rest


def save(model: nn.Module, out_dir: str | Path, config: dict[str, Any] | None = None,
         tokenizer: Any = None, provenance: dict[str, Any] | None = None,
         include_ortho: bool = True, overwrite: bool = False) -> Path:
    """Write ``model`` (already decomposed) as base/ortho/rest safetensors + manifest, atomically; an attached
    behaviour stream is written beside them (``behaviour.safetensors`` + ``behaviour.json``)."""
    base, ortho, rest = split_state(model)
    if not base:
        raise ValueError("model has no OrthoLinear layers: run libortho.decompose first")
    prov = {"libortho": __version__, "torch": torch.__version__, **(provenance or {})}
    with tempfile.TemporaryDirectory(prefix="libortho-tok-") as tmp:
        extra: dict[str, Path] = {}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            extra = {p.name: p for p in Path(tmp).iterdir() if p.is_file()}
        hf_config = model.config.to_dict() if hasattr(model, "config") else None
        out = write_decomposition(out_dir, base, ortho if include_ortho else None, rest,
                                  config=config or {}, provenance=prov, extra_files=extra,
                                  hf_config=hf_config, overwrite=overwrite)
    from libortho.behaviour_io import write_behaviour
    from libortho.runtime.behaviour import behaviour_stream

    edits = behaviour_stream(model)
    if edits is not None:  # the behaviour stream travels with the decomposition, as its own (withholdable) pair
        write_behaviour(out, edits, {"saved_with": "libortho.save"})
    return out


def _hf_config(path: Path) -> Any:
    """The transformers config of a decomposition, from its ``config.json``; errors name the file."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: cannot rebuild the model architecture")
    try:
        d = json.loads(cfg_path.read_text(encoding="utf-8"))
        return AutoConfig.for_model(**d)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, KeyError) as err:
        raise CorruptDecompositionError(f"{cfg_path} does not describe a transformers model: {err}") from err


def _attach_streams(model: nn.Module, dec: Decomposition, base_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace each manifest layer by an OrthoLinear; returns the rest tensors not consumed as biases.

    A layer the architecture lacks, or whose shape differs, is a corrupt (or mismatched) decomposition.
    When the memory is loaded, a layer the memory table does not name gets an empty sparse stream, so
    the model switches as a whole; only a withheld memory locks.
    """
    rest = dict(dec.rest)
    for name, stream in dec.base.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            old = None
        if not isinstance(old, nn.Linear):
            what = "has no such layer" if old is None else f"has a {type(old).__name__} there, not a Linear"
            raise CorruptDecompositionError(f"{dec.path}: the manifest names layer {name!r} but the "
                                            f"{model.config.model_type} architecture in config.json {what}")
        if (old.out_features, old.in_features) != tuple(stream.shape):
            raise CorruptDecompositionError(f"{dec.path}: layer {name!r} is {tuple(stream.shape)} in the manifest, "
                                            f"{(old.out_features, old.in_features)} in config.json's architecture")
        ortho = dec.ortho.get(name) if dec.ortho is not None else None
        if dec.ortho is not None and ortho is None:  # no memory here, nothing withheld: a no-op memory, not a lock
            ortho = SparseOrtho.empty(stream.shape)
        bias = rest.pop(f"{name}.bias", None)
        replace_module(model, name, OrthoLinear(stream, ortho, bias, alpha=0.0, base_dtype=base_dtype))
    return rest


def _attach_neurons(model: nn.Module, dec: Decomposition) -> None:
    """Give every MLP the memory table names its neurons (locked at alpha = 0 when the memory is not loaded)."""
    for name, meta in dec.memory.items():
        if meta.get("site") != "mlp":
            continue
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CorruptDecompositionError(f"{dec.path}: the manifest names memory neurons at {name!r} but the "
                                            f"{model.config.model_type} architecture has no such module") from None
        stream = dec.ortho.get(name) if dec.ortho is not None else None
        try:
            attach_neurons(model, name, stream, alpha=0.0)
        except ValueError as err:
            raise CorruptDecompositionError(f"{dec.path}: memory neurons at {name!r} do not fit: {err}") from err


def load(path: str | Path, alpha: float = 1.0, load_ortho: bool = True, verify: bool = True,
         base_dtype: torch.dtype = torch.bfloat16, behaviour_alpha: float = 1.0,
         load_behaviour: bool = True) -> tuple[nn.Module, Any]:
    """Rebuild a decomposed model (and its tokenizer, or None) from a directory written by :func:`save`.

    Memory streams of every form come back: sparse and low-rank ones in their OrthoLinear, neurons as
    :class:`~libortho.runtime.MemoryNeurons` on their MLP. Without ``ortho.safetensors`` (deleted or
    withheld), or with ``load_ortho=False``, every one of them is locked at alpha = 0 whatever ``alpha``
    says; :func:`libortho.io.read_decomposition` warns when the file is missing. Callers that must not
    run at another alpha than asked check ``switchable_layers(model)`` or the directory first (the CLI
    refuses).
    """
    path = Path(path)
    dec = read_decomposition(path, load_ortho=load_ortho, verify=verify)
    hf_config = _hf_config(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config)
    rest = _attach_streams(model, dec, base_dtype)
    _missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if unexpected:
        raise CorruptDecompositionError(f"{path / REST} holds tensors this architecture lacks: {unexpected[:5]}")
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CorruptDecompositionError(f"{path}: the decomposition is missing tensors: {still_meta[:5]}")
    _attach_neurons(model, dec)
    model.eval()
    log_kernel_fallbacks(model, str(path))
    group_shared_inputs(model)
    if dec.ortho is not None and switchable_layers(model):
        set_alpha(model, alpha)
    attach_saved_behaviour(model, path, behaviour_alpha, load=load_behaviour, verify=verify)
    return model, load_tokenizer(path)
