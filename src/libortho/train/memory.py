"""Trainable memory attached to a Hugging Face model during fine-tuning, and its export to streams.

Three forms, matching the storage forms of :mod:`libortho.streams`:

- :class:`MemoryLinear` (``sparse``): an ``nn.Linear`` whose weight is ``W_shared + M * delta``
  with a fixed support ``M`` (a few MLP neurons' rows/columns, or a fraction of entries);
- :class:`MemoryLinear` (``lowrank``): ``W_shared x + B (A x)``, LoRA-style (``B`` starts at 0);
- :class:`TrainNeurons` (``neurons``): ``k`` neurons added to a gated MLP, a child module named
  ``memory`` of the MLP plus a forward hook that adds their output. Each token can switch
  neurons on or off (:attr:`MemoryContext.neuron_mask`, the MemSinks sinks) and the shared and
  memory outputs can be detached per position (:attr:`MemoryContext.detach`, gradient routing).

``MemoryLinear`` subclasses ``nn.Linear`` and shares the original ``weight``/``bias`` Parameters,
so the shared weights keep their names (``...mlp.up_proj.weight``) and the optimizer state of a
resumed run matches. :func:`export_memory` strips every memory module and returns the plain
shared model with the memory as storage streams, ready for GPTQ of the base and the runtime.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from libortho.models.layers import UnsupportedModelError, block_prefix, decoder_blocks
from libortho.runtime.patch import replace_module


@dataclass
class MemoryContext:
    """Per-forward switches shared by every memory module of a model (set by the step rule).

    memory_on: include the memory in the forward pass; neuron_mask: ``(n, L, k)`` bool, which added
    neurons each token may use (None: all); detach: ``(n, L)`` bool, positions whose *shared*
    module outputs are detached (their gradient reaches only the memory), None for none;
    detach_memory: positions whose memory outputs are detached (e.g. public tokens under routing).
    """

    memory_on: bool = True
    neuron_mask: torch.Tensor | None = None
    detach: torch.Tensor | None = None
    detach_memory: torch.Tensor | None = None

    def clear(self) -> None:
        self.neuron_mask = self.detach = self.detach_memory = None
        self.memory_on = True


class MemoryLinear(nn.Linear):
    """``nn.Linear`` with a trainable memory (``sparse`` masked delta or ``lowrank`` factors).

    Shares the wrapped layer's ``weight`` and ``bias`` Parameters. The sparse delta is a dense
    Parameter used as ``delta * support``, so its gradient is exactly zero off the support, Adam's
    state stays zero there and so does the delta.
    """

    def __init__(self, linear: nn.Linear, form: str, ctx: MemoryContext, support: torch.Tensor | None = None,
                 rank: int = 0, init_std: float = 0.0, generator: torch.Generator | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.form, self.ctx = form, ctx
        if form == "sparse":
            if support is None or support.shape != linear.weight.shape:
                raise ValueError(f"a sparse memory needs a support mask of shape {tuple(linear.weight.shape)}")
            self.register_buffer("support", support.to(torch.bool).clone())
            self.delta = nn.Parameter(torch.zeros_like(linear.weight))  # its gradient is masked by the product
        elif form == "lowrank":
            if rank < 1:
                raise ValueError(f"a low-rank memory needs rank >= 1, got {rank}")
            std = init_std or 1.0 / math.sqrt(self.in_features)
            a = torch.randn(rank, self.in_features, generator=generator) * std
            self.mem_A = nn.Parameter(a.to(linear.weight.dtype))
            self.mem_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=linear.weight.dtype))
        else:
            raise ValueError(f"unknown linear memory form {form!r} (sparse, lowrank)")

    def memory_parameters(self) -> list[nn.Parameter]:
        return [self.delta] if self.form == "sparse" else [self.mem_A, self.mem_B]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ctx.memory_on:
            return nn.functional.linear(x, self.weight, self.bias)
        if self.form == "sparse":
            return nn.functional.linear(x, self.weight + self.delta * self.support, self.bias)
        return nn.functional.linear(x, self.weight, self.bias) + nn.functional.linear(
            nn.functional.linear(x, self.mem_A), self.mem_B)

    def plain(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the shared weights only (the same Parameters)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def stream(self, dtype: str = "fp32") -> object:
        """The memory as a storage stream (:class:`SparseOrtho` or :class:`LowRankMemory`)."""
        from libortho import streams

        if self.form == "sparse":
            return streams.SparseOrtho.from_mask(self.delta.detach().float(), self.support, dtype)
        return streams.LowRankMemory.from_factors(self.mem_B.detach().float(), self.mem_A.detach().float(), dtype)


class TrainNeurons(nn.Module):
    """``k`` trainable neurons added to a gated MLP: ``down (act(gate x) * up x)``; ``down`` starts at 0."""

    def __init__(self, d_model: int, k: int, activation: str, ctx: MemoryContext, init_std: float,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        if k < 1:
            raise ValueError(f"need at least one memory neuron, got {k}")
        self.activation, self.act, self.ctx = activation, ACT2FN[activation], ctx
        self.gate = nn.Parameter((torch.randn(k, d_model, generator=generator) * init_std).to(dtype))
        self.up = nn.Parameter((torch.randn(k, d_model, generator=generator) * init_std).to(dtype))
        self.down = nn.Parameter(torch.zeros(d_model, k, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(nn.functional.linear(x, self.gate)) * nn.functional.linear(x, self.up)
        if self.ctx.neuron_mask is not None:
            h = h * self.ctx.neuron_mask.to(h.dtype)
        return nn.functional.linear(h, self.down)

    def stream(self, dtype: str = "fp32") -> object:
        from libortho.streams import NeuronMemory

        return NeuronMemory.from_weights(self.gate.detach().float(), self.up.detach().float(),
                                         self.down.detach().float(), self.activation, dtype)


def _where_detached(out: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """``out`` with the rows at ``positions`` ((n, L) bool) detached from the graph."""
    if positions is None:
        return out
    return torch.where(positions.unsqueeze(-1), out.detach(), out)


def _mlp_hook(mlp: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    mem: TrainNeurons = mlp.memory
    ctx = mem.ctx
    out = _where_detached(out, ctx.detach)
    if not ctx.memory_on:
        return out
    return out + _where_detached(mem(args[0]), ctx.detach_memory)


def gated_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """Every block's gated MLP (a module with ``gate_proj``, ``up_proj``, ``down_proj``) by qualified name."""
    prefix = block_prefix(model)
    out = {}
    for i, block in enumerate(decoder_blocks(model)):
        mlp = getattr(block, "mlp", None)
        if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise UnsupportedModelError(f"block {i} has no gated MLP (mlp.gate_proj/up_proj/down_proj): memory "
                                        "neurons need a Llama/Qwen2/Mistral/Gemma-style MLP")
        out[f"{prefix}.{i}.mlp"] = mlp
    return out


def attach_neurons(model: nn.Module, k: int, ctx: MemoryContext, seed: int = 0,
                   layers: Callable[[str], bool] | None = None) -> dict[str, TrainNeurons]:
    """Add ``k`` trainable neurons to every (selected) gated MLP; their init scale follows ``up_proj``'s."""
    act = getattr(getattr(model, "config", None), "hidden_act", None) or "silu"
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, mlp in gated_mlps(model).items():
        if layers is not None and not layers(name):
            continue
        if hasattr(mlp, "memory"):
            raise ValueError(f"{name} already has a memory attached")
        w = mlp.up_proj.weight
        mem = TrainNeurons(w.shape[1], k, act, ctx, float(w.detach().float().std()), gen, w.dtype)
        mlp.memory = mem
        mlp._libortho_train_hook = mlp.register_forward_hook(_mlp_hook).id
        out[name] = mem
    return out


@dataclass
class LinearMemorySpec:
    """Which linears get a linear-site memory, and its form."""

    form: str
    supports: dict[str, torch.Tensor] = field(default_factory=dict)  # sparse: name -> bool mask
    rank: int = 0


def attach_linear_memory(model: nn.Module, spec: LinearMemorySpec, ctx: MemoryContext, names: list[str],
                         seed: int = 0) -> dict[str, MemoryLinear]:
    """Replace each named ``nn.Linear`` by a :class:`MemoryLinear` sharing its weights."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear) or isinstance(lin, MemoryLinear):
            raise ValueError(f"{name} is not a plain nn.Linear")
        mem = MemoryLinear(lin, spec.form, ctx, spec.supports.get(name), spec.rank, generator=gen)
        replace_module(model, name, mem)
        out[name] = mem
    return out


def memory_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every memory Parameter of the model, in module order."""
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, MemoryLinear):
            params += m.memory_parameters()
        elif isinstance(m, TrainNeurons):
            params += [m.gate, m.up, m.down]
    return params


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable Parameters that are not memory (the shared weights), without duplicates."""
    mem = {id(p) for p in memory_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in mem]


def export_memory(model: nn.Module, dtype: str = "fp32") -> dict[str, object]:
    """Strip every memory module (in place) and return the memory as streams by layer / MLP name.

    Afterwards ``model`` is the plain shared model: ``nn.Linear`` layers, no hooks, no extra children.
    """
    streams: dict[str, object] = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, MemoryLinear):
            streams[name] = m.stream(dtype)
            replace_module(model, name, m.plain())
    for name, m in list(model.named_modules()):
        if isinstance(getattr(m, "memory", None), TrainNeurons):
            streams[name] = m.memory.stream(dtype)
            m._forward_hooks.pop(m._libortho_train_hook, None)
            del m._libortho_train_hook
            del m.memory
    return streams


def attach_streams(model: nn.Module, streams: dict[str, object], ctx: MemoryContext | None = None) -> MemoryContext:
    """The inverse of :func:`export_memory`: put stored memory streams back as trainable modules (fp32).

    Gives the full-precision model with its memory (alpha = 1 at full precision: ``ctx.memory_on``),
    and what a relearning attack or further training starts from. Returns the context that
    switches the memory (``memory_on = False`` is alpha = 0).
    """
    from libortho.streams import LowRankMemory, NeuronMemory, SparseOrtho

    ctx = ctx or MemoryContext()
    act = getattr(getattr(model, "config", None), "hidden_act", None) or "silu"
    for name, s in streams.items():
        if isinstance(s, SparseOrtho):
            lin = model.get_submodule(name)
            support = torch.zeros(s.shape, dtype=torch.bool)
            support.view(-1)[s.indices.long()] = True
            mem = MemoryLinear(lin, "sparse", ctx, support)
            mem.delta.data.copy_(s.to_dense(torch.float32))
            replace_module(model, name, mem)
        elif isinstance(s, LowRankMemory):
            lin = model.get_submodule(name)
            mem = MemoryLinear(lin, "lowrank", ctx, rank=s.rank)
            mem.mem_A.data.copy_(s.A.float())
            mem.mem_B.data.copy_(s.B.float())
            replace_module(model, name, mem)
        elif isinstance(s, NeuronMemory):
            mlp = model.get_submodule(name)
            if s.activation != act:
                raise ValueError(f"{name}: stream activation {s.activation!r} differs from the model's {act!r}")
            neurons = TrainNeurons(s.d_model, s.n_neurons, s.activation, ctx, 0.0)
            for part in ("gate", "up", "down"):
                getattr(neurons, part).data.copy_(getattr(s, part).float())
            mlp.memory = neurons
            mlp._libortho_train_hook = mlp.register_forward_hook(_mlp_hook).id
        else:
            raise TypeError(f"{name}: {type(s).__name__} is not a memory stream")
    return ctx
