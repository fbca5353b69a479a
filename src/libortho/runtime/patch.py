"""Putting OrthoLinear layers and memory streams into a model, and switching alpha at run time.

The switch treats every memory site alike: :func:`switchable_layers` lists the OrthoLinear layers
(linear sites: sparse or low-rank memory) and the MemoryNeurons of gated MLPs (mlp sites), and
:func:`set_alpha` / :func:`get_alpha` / :func:`alpha_scope` act on both.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from libortho.runtime.linear import LOCKED_MESSAGE, OrthoLinear
from libortho.runtime.memory_mlp import MemoryNeurons, attach_neurons
from libortho.streams import LowRankMemory, MemoryStream, NeuronMemory, SparseOrtho

Switchable = OrthoLinear | MemoryNeurons
log = logging.getLogger("libortho")


def replace_module(model: nn.Module, qualified_name: str, new_module: nn.Module) -> nn.Module:
    """Swap the submodule at ``qualified_name`` (e.g. ``model.layers.0.mlp.up_proj``); returns the old one."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child not in parent._modules:
        raise AttributeError(f"{type(parent).__name__} at {parent_name or '<root>'!r} has no submodule {child!r}")
    old = parent._modules[child]
    setattr(parent, child, new_module)
    return old


def ortho_layers(model: nn.Module) -> dict[str, OrthoLinear]:
    """All OrthoLinear layers of ``model`` by qualified name (the base streams; memory of any linear form)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, OrthoLinear)}


SHARED_INPUT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def group_shared_inputs(model: nn.Module) -> int:
    """Let sibling OrthoLinear layers that read one input (q/k/v, gate/up) share their sparse memory
    product at decode (:class:`~libortho.runtime.linear.SharedInputMemory`); returns the number of groups."""
    from libortho.runtime.linear import SharedInputMemory

    groups = 0
    for parent in model.modules():
        for names in SHARED_INPUT_SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, OrthoLinear) for m in members):
                shared = SharedInputMemory(members)
                for m in members:
                    m._shared = shared
                groups += 1
    return groups


def kernel_report(model: nn.Module) -> dict[str, Any]:
    """Which base kernel serves each OrthoLinear: counts by kernel, and every fallback with its reason.

    The CPU INT4 kernel serves 4-bit layers whose group size divides ``in_features`` (and whose
    scales stay within the fidelity bound); the rest run on a dense dequantized weight. ``info``,
    :func:`libortho.checkpoint.load`'s log and the benchmark JSON all report this.
    """
    from libortho.runtime.kernels import native

    counts: dict[str, int] = {}
    memory: dict[str, int] = {}
    fallbacks: dict[str, str] = {}
    for name, lin in ortho_layers(model).items():
        counts[lin.kernel] = counts.get(lin.kernel, 0) + 1
        memory[lin.memory_kernel] = memory.get(lin.memory_kernel, 0) + 1
        if lin.kernel != "int4pack":
            fallbacks[name] = lin.kernel_note
    return {"kernels": dict(sorted(counts.items())), "fallbacks": fallbacks, "layers": sum(counts.values()),
            "memory_kernels": dict(sorted(memory.items())), "native_sparse_kernel": native.status()}


def log_kernel_fallbacks(model: nn.Module, where: str) -> dict[str, Any]:
    """Log a warning naming how many layers left the INT4 kernel and why; returns :func:`kernel_report`."""
    rep = kernel_report(model)
    if rep["fallbacks"]:
        reasons = sorted(set(rep["fallbacks"].values()))
        log.warning("%s: %d of %d quantized layers run on the dense fallback, not the INT4 kernel (%s)",
                    where, len(rep["fallbacks"]), rep["layers"], "; ".join(reasons))
    return rep


def switchable_layers(model: nn.Module) -> dict[str, Switchable]:
    """Every module behind the alpha switch by qualified name: OrthoLinear layers and MemoryNeurons
    (the latter under their own name, e.g. ``model.layers.0.mlp.memory``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (OrthoLinear, MemoryNeurons))}


def _select(model: nn.Module, pattern: str | None) -> dict[str, Switchable]:
    """Switchable layers whose qualified name matches regex ``pattern`` (``re.search``); all if None."""
    layers = switchable_layers(model)
    if pattern is not None:
        rx = re.compile(pattern)
        layers = {n: m for n, m in layers.items() if rx.search(n)}
    if not layers:
        raise ValueError("no OrthoLinear or MemoryNeurons layer"
                         + (f" matches pattern {pattern!r}" if pattern else " in model"))
    return layers


def set_alpha(model: nn.Module, alpha: float, pattern: str | None = None) -> int:
    """Set alpha on every switchable layer (or those matching ``pattern``); returns how many were set.

    All-or-nothing: if alpha != 0 and any selected layer is locked (ortho not loaded), nothing changes
    and a RuntimeError is raised. Raises ValueError when no layer is selected (a typo is not silent).
    """
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    layers = _select(model, pattern)
    if alpha != 0.0:
        locked = [n for n, m in layers.items() if m.locked]
        if locked:
            raise RuntimeError(f"{LOCKED_MESSAGE}; {len(locked)} layer(s), e.g. {locked[0]!r}")
    for layer in layers.values():
        layer.alpha = alpha
    return len(layers)


def get_alpha(model: nn.Module) -> dict[str, float]:
    """Current alpha of every switchable layer (OrthoLinear and MemoryNeurons) by qualified name."""
    return {n: m.alpha for n, m in switchable_layers(model).items()}


@contextmanager
def alpha_scope(model: nn.Module, alpha: float, pattern: str | None = None) -> Iterator[nn.Module]:
    """Temporarily set alpha (as :func:`set_alpha`); every layer's previous alpha comes back on exit."""
    before = get_alpha(model)
    set_alpha(model, alpha, pattern)
    try:
        yield model
    finally:
        layers = switchable_layers(model)
        for name, a in before.items():
            layer = layers.get(name)
            if layer is not None:
                layer.alpha = 0.0 if layer.locked else a  # a layer detached inside the scope stays at 0


def attach_memory(model: nn.Module, streams: dict[str, MemoryStream], alpha: float = 1.0,
                  fill_empty: bool = True) -> int:
    """Attach memory streams of any form: linear-site ones to the OrthoLinear of that name, neurons to that MLP.

    With ``fill_empty`` every OrthoLinear that has no memory afterwards gets an empty sparse stream
    (nnz = 0, a no-op at any alpha), so a model whose memory lives in a few sites switches as a whole;
    only a withheld memory stays locked. Returns the number of streams attached.
    """
    mods = dict(model.named_modules())
    for name, stream in streams.items():
        if isinstance(stream, (SparseOrtho, LowRankMemory)):
            if not isinstance(mods.get(name), OrthoLinear):
                raise KeyError(f"{name!r} is not an OrthoLinear layer of this model")
            mods[name].set_ortho(stream)
            mods[name].alpha = alpha
        elif isinstance(stream, NeuronMemory):
            if name not in mods:
                raise KeyError(f"{name!r} is not a module of this model")
            attach_neurons(model, name, stream, alpha)
        else:
            raise TypeError(f"{name!r}: {type(stream).__name__} is not a memory stream")
    if fill_empty:
        for layer in ortho_layers(model).values():
            if layer.ortho_stream is None:
                layer.set_ortho(SparseOrtho.empty((layer.out_features, layer.in_features)))
                layer.alpha = alpha
    return len(streams)
