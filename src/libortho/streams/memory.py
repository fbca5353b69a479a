"""Memory streams beyond the sparse one: low-rank factors on a linear, added neurons on a gated MLP.

Every memory stream sits behind the same alpha switch and is saved in the same (withholdable)
``ortho.safetensors``, whatever its form. A form is a frozen dataclass with

* ``kind`` (its name in files and the :data:`STREAM_FORMS` registry) and ``site`` (``linear``: added
  to one linear layer's output, keyed by the linear's name; ``mlp``: added to a gated MLP's output,
  keyed by the MLP's name);
* ``tensors()`` (the named tensors to save), ``meta()`` (a JSON-able description for the manifest)
  and ``from_tensors(tensors, meta)`` (the inverse), so :mod:`libortho.io` stores any form alike;
* ``nbytes`` and a parameter count, so reports count every form alike.

Storage only: no ``nn.Module``; the compute lives in :mod:`libortho.runtime`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from libortho.streams.ortho import DTYPES, SparseOrtho, check_meta_kind, dtype_name


def _check_factor(name: str, t: torch.Tensor) -> None:
    """A stored factor is a 2-D tensor of one of the memory dtypes."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if t.dtype not in DTYPES.values():
        raise ValueError(f"{name} has dtype {t.dtype}; memory streams store one of {sorted(DTYPES)}")


def _stored(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """A detached, contiguous copy of ``t`` in memory dtype ``dtype`` (a name of :data:`DTYPES`)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown memory dtype {dtype!r}; choose from {sorted(DTYPES)}")
    return t.detach().to(DTYPES[dtype]).contiguous().clone()


@dataclass(frozen=True, eq=False)
class LowRankMemory:
    """Factors of a rank-``r`` update ``B @ A`` of one ``(d_out, d_in)`` linear layer (form ``lowrank``).

    The layer computes ``y += alpha * (x @ A^T) @ B^T``: the LoRA convention, so ``A`` reads the
    input and ``B`` writes the output.
    """

    B: torch.Tensor  # (d_out, r)
    A: torch.Tensor  # (r, d_in)

    kind: ClassVar[str] = "lowrank"
    site: ClassVar[str] = "linear"
    tensor_names: ClassVar[tuple[str, ...]] = ("A", "B")  # what tensors() returns, in file order

    def __post_init__(self) -> None:
        _check_factor("low-rank factor B", self.B)
        _check_factor("low-rank factor A", self.A)
        if self.A.dtype != self.B.dtype:
            raise ValueError(f"low-rank factors differ in dtype: B {self.B.dtype}, A {self.A.dtype}")
        if self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"low-rank factors do not chain: B {tuple(self.B.shape)}, A {tuple(self.A.shape)} "
                             "(need B (d_out, r) and A (r, d_in))")
        if self.A.shape[0] < 1 or self.B.shape[0] < 1 or self.A.shape[1] < 1:
            raise ValueError(f"low-rank factors must be non-empty, got B {tuple(self.B.shape)}, "
                             f"A {tuple(self.A.shape)}")

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, dtype: str = "fp16") -> LowRankMemory:
        """Store ``B (d_out, r)`` and ``A (r, d_in)`` as detached copies cast to ``dtype``."""
        return cls(B=_stored(B, dtype), A=_stored(A, dtype))

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the linear layer this update belongs to."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def n_params(self) -> int:
        """Stored numbers: ``r * (d_in + d_out)``."""
        return self.rank * (self.shape[0] + self.shape[1])

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update ``B @ A`` ``(d_out, d_in)``, computed in fp32 then cast to ``dtype``."""
        return (self.B.float() @ self.A.float()).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"A": self.A, "B": self.B}

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "site": self.site, "shape": list(self.shape), "rank": self.rank,
                "dtype": dtype_name(self.A.dtype)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> LowRankMemory:
        """Inverse of :meth:`tensors` / :meth:`meta`; the stored shape and rank must agree with ``meta``."""
        check_meta_kind(meta, cls.kind)
        out = cls(B=tensors["B"], A=tensors["A"])
        if "shape" in meta and list(out.shape) != [int(v) for v in meta["shape"]]:
            raise ValueError(f"low-rank factors give shape {out.shape}, metadata says {meta['shape']}")
        if "rank" in meta and out.rank != int(meta["rank"]):
            raise ValueError(f"low-rank factors have rank {out.rank}, metadata says {meta['rank']}")
        return out


@dataclass(frozen=True, eq=False)
class NeuronMemory:
    """``k`` neurons added to a gated MLP of width ``d`` (form ``neurons``).

    Contribution to the MLP's output: ``down @ (act(gate @ x) * (up @ x))``, the gated-MLP shape of
    Llama/Qwen2/Mistral/Gemma. ``activation`` names a ``transformers.activations.ACT2FN`` entry; it is
    checked where it is used (the runtime), so storage stays free of transformers.
    """

    gate: torch.Tensor  # (k, d)
    up: torch.Tensor  # (k, d)
    down: torch.Tensor  # (d, k)
    activation: str

    kind: ClassVar[str] = "neurons"
    site: ClassVar[str] = "mlp"
    tensor_names: ClassVar[tuple[str, ...]] = ("gate", "up", "down")  # what tensors() returns, in file order

    def __post_init__(self) -> None:
        for name in ("gate", "up", "down"):
            _check_factor(f"neuron memory {name}", getattr(self, name))
        dtypes = {t.dtype for t in (self.gate, self.up, self.down)}
        if len(dtypes) != 1:
            raise ValueError(f"neuron memory tensors differ in dtype: {sorted(map(str, dtypes))}")
        k, d = self.gate.shape
        if tuple(self.up.shape) != (k, d) or tuple(self.down.shape) != (d, k):
            raise ValueError(f"neuron memory shapes disagree: gate {tuple(self.gate.shape)}, up "
                             f"{tuple(self.up.shape)}, down {tuple(self.down.shape)} (need (k, d), (k, d), (d, k))")
        if k < 1 or d < 1:
            raise ValueError(f"neuron memory needs k >= 1 neurons and d >= 1, got k={k}, d={d}")
        if not isinstance(self.activation, str) or not self.activation:
            raise ValueError(f"neuron memory activation must be a non-empty name, got {self.activation!r}")

    @classmethod
    def from_weights(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, activation: str,
                     dtype: str = "fp16") -> NeuronMemory:
        """Store ``gate (k, d)``, ``up (k, d)``, ``down (d, k)`` as detached copies cast to ``dtype``."""
        return cls(_stored(gate, dtype), _stored(up, dtype), _stored(down, dtype), activation)

    @property
    def n_neurons(self) -> int:
        return int(self.gate.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.gate.shape[1])

    @property
    def n_params(self) -> int:
        """Stored numbers: ``3 * k * d``."""
        return 3 * self.n_neurons * self.d_model

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"gate": self.gate, "up": self.up, "down": self.down}

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "site": self.site, "n_neurons": self.n_neurons, "d_model": self.d_model,
                "dtype": dtype_name(self.gate.dtype), "activation": self.activation}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> NeuronMemory:
        """Inverse of :meth:`tensors` / :meth:`meta`; ``meta`` gives the activation and must match the shapes."""
        check_meta_kind(meta, cls.kind)
        out = cls(tensors["gate"], tensors["up"], tensors["down"], meta.get("activation"))
        for key in ("n_neurons", "d_model"):
            if key in meta and getattr(out, key) != int(meta[key]):
                raise ValueError(f"neuron memory has {key}={getattr(out, key)}, metadata says {meta[key]}")
        return out


MemoryStream = SparseOrtho | LowRankMemory | NeuronMemory
STREAM_FORMS: dict[str, type] = {cls.kind: cls for cls in (SparseOrtho, LowRankMemory, NeuronMemory)}
SITES = ("linear", "mlp")


def memory_params(stream: MemoryStream) -> int:
    """Numbers a memory stream stores: nnz (sparse), ``r (d_in + d_out)`` (lowrank), ``3 k d`` (neurons)."""
    return stream.nnz if isinstance(stream, SparseOrtho) else stream.n_params


def stream_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> MemoryStream:
    """Rebuild a stream of any registered form from its named tensors and ``meta`` (its ``kind`` picks the form).

    Raises ValueError (one line) for an unknown kind and KeyError for a missing tensor.
    """
    kind = meta.get("kind")
    if kind not in STREAM_FORMS:
        raise ValueError(f"unknown memory stream kind {kind!r} (known: {', '.join(sorted(STREAM_FORMS))})")
    return STREAM_FORMS[kind].from_tensors(tensors, meta)
