"""MemoryNeurons: ``k`` neurons added to a gated MLP behind the alpha switch (the ``mlp`` memory site).

A :class:`~libortho.streams.NeuronMemory` cannot live inside one linear layer: its neurons read the
MLP's input and write its output. :func:`attach_neurons` therefore adds a child named ``memory`` to
the MLP (its own children keep their names, e.g. ``model.layers.0.mlp.up_proj``) and a forward hook
on the MLP that returns ``mlp(x) + alpha * memory(x)``. At ``alpha == 0`` the hook returns before
touching the memory, so the output is the MLP's own tensor (the null test). The hook is a module
level function that finds the memory through the MLP, so ``copy.deepcopy`` and ``.to()`` keep it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from libortho.runtime.kernels import cpu
from libortho.runtime.switch import LOCKED_MESSAGE, AlphaSwitch
from libortho.streams import NeuronMemory

MEMORY_CHILD = "memory"  # the MLP's child that holds the neurons
_HOOK_ATTR = "_libortho_memory_hook"  # the MLP's attribute holding its hook's id


def activation_fn(name: str) -> nn.Module:
    """The ``transformers`` activation module called ``name`` (``silu``, ``gelu_pytorch_tanh``...).

    Looked up at use, so storage needs no transformers; an unknown name is a one-line ValueError.
    """
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r} for memory neurons (not in transformers' ACT2FN)")
    act = ACT2FN[name]
    if not isinstance(act, nn.Module):
        raise ValueError(f"activation {name!r} is not a module in this transformers version")
    return act


class MemoryNeurons(AlphaSwitch, nn.Module):
    """The neurons of a :class:`NeuronMemory` as a module, with the same alpha semantics as OrthoLinear.

    ``alpha`` is a plain float; without a stream the module is ``locked`` at alpha = 0. Kernel tensors
    are fp32 non-persistent buffers, so ``state_dict`` holds nothing of it; saving goes through
    ``stream``. ``forward(x)`` is the contribution ``down @ (act(gate @ x) * (up @ x))`` (no alpha).
    """

    def __init__(self, stream: NeuronMemory | None = None, alpha: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("_gate", None, persistent=False)
        self.register_buffer("_up", None, persistent=False)
        self.register_buffer("_down", None, persistent=False)
        self.stream: NeuronMemory | None = None
        self.act_fn: nn.Module | None = None  # a child, like the MLP's own act_fn: deepcopy and .to() carry it
        self._alpha = 0.0
        self.set_stream(stream)
        self.alpha = alpha if stream is not None else 0.0

    @property
    def locked(self) -> bool:
        """True when no neuron stream is attached (alpha is pinned to 0)."""
        return self.stream is None

    def set_stream(self, stream: NeuronMemory | None) -> None:
        """Attach (or detach, with None) the neurons; detaching locks the module at alpha = 0."""
        if stream is not None and not isinstance(stream, NeuronMemory):
            raise TypeError(f"MemoryNeurons takes a NeuronMemory, not {type(stream).__name__}")
        act = None if stream is None else activation_fn(stream.activation)
        self.stream, self.act_fn = stream, act
        self._build()
        if stream is None:
            self._alpha = 0.0

    def _build(self) -> None:
        """(Re)build the fp32 kernel tensors from the stream, on the device the buffers live on."""
        device = self._gate.device if self._gate is not None else None
        tensors = (None,) * 3 if self.stream is None else cpu.neuron_tensors(self.stream)
        self._gate, self._up, self._down = (t if t is None or device is None else t.to(device) for t in tensors)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MemoryNeurons:
        """``.to(device)`` moves the kernel tensors; a dtype change rebuilds them in fp32 (the kernel's dtype)."""
        super()._apply(fn, recurse)
        if self._gate is not None and self._gate.dtype != cpu.MEMORY_DTYPE:
            self._build()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The neurons' contribution for ``x (..., d)`` (without alpha), in ``x.dtype``."""
        if self.stream is None:
            raise RuntimeError(LOCKED_MESSAGE)
        return cpu.gated_neurons(x, self._gate, self._up, self._down, self.act_fn).to(x.dtype)

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + alpha * forward(x)``, added in fp32 and rounded once to ``out.dtype``; ``out`` if alpha is 0."""
        if self._alpha == 0.0 or self.stream is None:
            return out
        return cpu.neurons_add(out, x, self._gate, self._up, self._down, self.act_fn, self._alpha)

    def extra_repr(self) -> str:
        s = self.stream
        what = "stream=None (locked)" if s is None else \
            f"memory=neurons, k={s.n_neurons}, d_model={s.d_model}, activation={s.activation}"
        return f"{what}, alpha={self._alpha:g}"


def _memory_hook(mlp: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
    """Forward hook of a gated MLP: ``out + alpha * mlp.memory(x)``; returns ``out`` itself at alpha = 0."""
    mem = mlp._modules.get(MEMORY_CHILD)
    if not isinstance(mem, MemoryNeurons) or mem.alpha == 0.0:
        return out
    if not args or not isinstance(args[0], torch.Tensor):
        raise RuntimeError(f"{type(mlp).__name__} was called without a positional input: memory neurons need x")
    return mem.add_to(out, args[0])


def _check_width(mlp: nn.Module, name: str, stream: NeuronMemory) -> None:
    """The neurons' width must be the MLP's model width (read from its ``up_proj`` when it has one)."""
    up = getattr(mlp, "up_proj", None)
    d = getattr(up, "in_features", None)
    if d is not None and d != stream.d_model:
        raise ValueError(f"neuron memory of width {stream.d_model} does not fit {name!r} (d_model {d})")


def attach_neurons(model: nn.Module, mlp_name: str, stream: NeuronMemory | None,
                   alpha: float = 1.0) -> MemoryNeurons:
    """Give the MLP at ``mlp_name`` the neurons of ``stream`` (a child ``memory`` plus one forward hook).

    Attaching again replaces the stream (one hook, one child, whatever the number of calls); ``stream=None``
    keeps the module but locks it at alpha = 0 (the withheld state). Returns the :class:`MemoryNeurons`.
    """
    mlp = model.get_submodule(mlp_name) if mlp_name else model
    if isinstance(mlp, MemoryNeurons):
        raise ValueError(f"{mlp_name!r} is a MemoryNeurons itself: give the name of the MLP that holds it")
    if stream is not None:
        _check_width(mlp, mlp_name, stream)
    mem = mlp._modules.get(MEMORY_CHILD)
    if mem is not None and not isinstance(mem, MemoryNeurons):
        raise ValueError(f"{mlp_name!r} already has a child {MEMORY_CHILD!r} of type {type(mem).__name__}")
    if mem is None:
        mem = MemoryNeurons(stream, alpha=0.0)
        mlp.add_module(MEMORY_CHILD, mem)
        setattr(mlp, _HOOK_ATTR, mlp.register_forward_hook(_memory_hook).id)
    else:
        mem.set_stream(stream)
    mem.alpha = alpha if stream is not None else 0.0
    return mem


def remove_neurons(model: nn.Module, mlp_name: str) -> MemoryNeurons:
    """Take the neurons off the MLP at ``mlp_name``: its hook and its ``memory`` child go; returns the module."""
    mlp = model.get_submodule(mlp_name) if mlp_name else model
    mem = mlp._modules.get(MEMORY_CHILD)
    if not isinstance(mem, MemoryNeurons):
        raise KeyError(f"{mlp_name!r} has no memory neurons attached")
    hook_id = getattr(mlp, _HOOK_ATTR)
    for table in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(mlp, table, {}).pop(hook_id, None)
    delattr(mlp, _HOOK_ATTR)
    del mlp._modules[MEMORY_CHILD]
    return mem


def neuron_sites(model: nn.Module) -> dict[str, MemoryNeurons]:
    """Every attached MemoryNeurons keyed by its MLP's qualified name (the key its stream is saved under)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MemoryNeurons):
            out[name.rpartition(".")[0]] = m
    return out
