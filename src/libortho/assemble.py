"""Assembling models from a fine-tuned shared model and its memory streams.

:func:`dual_stream` is what ``libortho finetune`` ships: the shared weights quantized to the INT-b
base stream by the ordinary decomposition (GPTQ on public calibration, no ortho selection) and the
memory streams attached at their sites behind the alpha switch. Because the base never sees the
memory, alpha = 0 is *exactly* the base-only quantized shared model (the null test). The other
helpers build the references an evaluation needs: the base-only quantized copy of any model, the
full-precision model with its memory (:func:`full_precision_with_memory`), the dequantized base as
a plain trainable model (what an attacker holding the alpha = 0 weights can fine-tune), and the
stream files an experiment caches.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from libortho.atomic import atomic_directory
from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
from libortho.pipeline import decompose
from libortho.runtime import ortho_layers, replace_module
from libortho.runtime.memory_mlp import neuron_sites, remove_neurons
from libortho.runtime.patch import attach_memory
from libortho.streams.memory import stream_from_tensors


def quantized(model: nn.Module, calibration: torch.Tensor | None, quant: QuantConfig,
              progress: bool = False) -> tuple[nn.Module, dict]:
    """A base-only INT-b copy of ``model`` (GPTQ needs ``calibration``; RTN does not); returns (model, stats)."""
    out = copy.deepcopy(model)
    cfg = DecomposeConfig(quant=quant, select=SelectConfig(), ortho=False)
    res = decompose(out, calibration if quant.method != "rtn" else None, cfg, progress=progress)
    return out.eval(), dict(res.stats)


def dual_stream(shared: nn.Module, streams: dict[str, Any], calibration: torch.Tensor | None, quant: QuantConfig,
                alpha: float = 1.0, progress: bool = False) -> tuple[nn.Module, dict]:
    """The quantized shared model with the memory streams attached (see the module docstring)."""
    model, stats = quantized(shared, calibration, quant, progress)
    attach_memory(model, streams, alpha=alpha)
    return model, stats


def full_precision_with_memory(shared: nn.Module, streams: dict[str, Any]) -> tuple[nn.Module, Any]:
    """A copy of the fp32 shared model with its memory as live modules; returns (model, context).

    ``context.memory_on`` is the switch (True: alpha = 1, False: alpha = 0).
    """
    from libortho.train.memory import attach_streams

    model = copy.deepcopy(shared)
    ctx = attach_streams(model, streams)
    return model.eval(), ctx


def dequantized(model: nn.Module) -> nn.Module:
    """A copy with every OrthoLinear replaced by a plain fp32 ``nn.Linear`` holding its base weights ``Q``.

    The memory is dropped: this is the alpha = 0 model as trainable weights.
    """
    out = copy.deepcopy(model)
    for name, layer in ortho_layers(out).items():
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        lin.weight.data.copy_(layer.base_stream.dequantize(torch.float32))
        if layer.bias is not None:
            lin.bias.data.copy_(layer.bias.detach().float())
        replace_module(out, name, lin)
    for name in list(neuron_sites(out)):
        remove_neurons(out, name)
    for p in out.parameters():
        p.requires_grad_(True)
    return out.train()


def save_streams(path: str | Path, streams: dict[str, Any]) -> Path:
    """Write memory streams (any forms) to ``path/memory.safetensors`` + ``path/memory.json``, atomically."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_file({f"{n}.{k}": t.detach().contiguous() for n, s in streams.items() for k, t in s.tensors().items()},
                  tmp / "memory.safetensors")
        (tmp / "memory.json").write_text(json.dumps({n: s.meta() for n, s in streams.items()}, indent=1))
    return path


def load_streams(path: str | Path) -> dict[str, Any]:
    """Inverse of :func:`save_streams`."""
    path = Path(path)
    meta = json.loads((path / "memory.json").read_text())
    raw = load_file(path / "memory.safetensors")
    out = {}
    for name, m in meta.items():
        head = name + "."
        tensors = {k[len(head):]: v for k, v in raw.items() if k.startswith(head) and "." not in k[len(head):]}
        out[name] = stream_from_tensors(tensors, m)
    return out
