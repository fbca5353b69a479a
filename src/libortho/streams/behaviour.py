"""The behaviour stream: directions projected out of module outputs, behind a switch of its own.

Seed 003's edit ``W <- W - lambda * u (u^T W)`` of a matrix that writes into the residual stream is,
applied to that matrix's output instead, ``y <- y - alpha_b * lambda * u (u^T y)``. Kept in that form
the edit stays a projection whatever the other streams do (a rank-1 weight delta computed on
base + ortho stops being one when ortho is switched off), switches on and off without touching a
weight, and ships (or is withheld) as one small file.

A :class:`BehaviourEdit` is one site's unit direction ``u`` (the module's output width) and strength
``lambda``; a :class:`BehaviourStream` maps site names (``model.layers.20.self_attn.o_proj``,
``model.embed_tokens``...) to edits plus a JSON-able description of how the direction was found.
Storage only: the hook that applies it lives in :mod:`libortho.runtime.behaviour`, the file format
in :mod:`libortho.behaviour_io`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class BehaviourEdit:
    """``y <- y - alpha * strength * direction (direction^T y)`` on one module's output (last axis).

    ``direction`` is a unit fp32 vector; ``strength`` 1 is the orthogonal projection (idempotent),
    values above 1 reflect past the complement, below 1 only damp the direction.
    """

    direction: torch.Tensor  # (d,), fp32, unit norm
    strength: float = 1.0

    def __post_init__(self) -> None:
        u = self.direction
        if not isinstance(u, torch.Tensor) or u.dim() != 1 or u.numel() < 1:
            raise ValueError(f"a behaviour direction is a non-empty 1-D tensor, got {getattr(u, 'shape', type(u))}")
        if u.dtype != torch.float32:
            raise ValueError(f"a behaviour direction is stored in float32, got {u.dtype}")
        norm = float(u.norm())
        if not math.isfinite(norm) or abs(norm - 1.0) > 1e-4:
            raise ValueError(f"a behaviour direction must have unit norm, got {norm:.6g}")
        if not math.isfinite(self.strength):
            raise ValueError(f"behaviour strength must be finite, got {self.strength}")

    @classmethod
    def from_vector(cls, v: torch.Tensor, strength: float = 1.0) -> BehaviourEdit:
        """The edit along ``v / ||v||`` (any float dtype; a zero vector is refused)."""
        v = v.detach().to(torch.float32).reshape(-1)
        n = float(v.norm())
        if not n > 0 or not math.isfinite(n):
            raise ValueError("cannot make a behaviour direction from a zero (or non-finite) vector")
        return cls((v / n).contiguous().clone(), float(strength))

    @property
    def dim(self) -> int:
        return int(self.direction.numel())


@dataclass(frozen=True, eq=False)
class BehaviourStream:
    """Site name -> :class:`BehaviourEdit`, with ``info`` (how the direction was found, JSON-able)."""

    edits: dict[str, BehaviourEdit]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.edits:
            raise ValueError("a behaviour stream needs at least one site")
        for name, e in self.edits.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"behaviour site names are non-empty strings, got {name!r}")
            if not isinstance(e, BehaviourEdit):
                raise TypeError(f"site {name!r}: {type(e).__name__} is not a BehaviourEdit")

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the file stores: ``{site}.direction`` for every site."""
        return {f"{n}.direction": e.direction for n, e in self.edits.items()}

    def meta(self) -> dict[str, Any]:
        """The JSON side: per-site strength and width, and ``info``."""
        return {"sites": {n: {"strength": e.strength, "dim": e.dim} for n, e in self.edits.items()},
                "info": self.info}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> BehaviourStream:
        """Inverse of :meth:`tensors` / :meth:`meta`; a site the meta names but the tensors lack is a KeyError."""
        sites = meta["sites"]
        edits = {n: BehaviourEdit(tensors[f"{n}.direction"], float(s["strength"])) for n, s in sites.items()}
        for n, s in sites.items():
            if edits[n].dim != int(s["dim"]):
                raise ValueError(f"site {n!r}: direction has {edits[n].dim} entries, the meta says {s['dim']}")
        return cls(edits, dict(meta.get("info", {})))

    def with_strength(self, strength: float) -> BehaviourStream:
        """The same directions with every site at ``strength``."""
        return BehaviourStream({n: BehaviourEdit(e.direction, float(strength)) for n, e in self.edits.items()},
                               dict(self.info))
