"""``ogd``: orthogonal gradient descent into a low-rank memory (seed 000 §3.2, GPM-style subspaces).

Per block linear, the general subspace ``S_gen`` is spanned by the top eigenvectors of the public
activations' second moment that hold ``ogd_energy`` of it (from ``probe_rows`` public rows). The
memory is ``B A`` (rank ``rank``); the public tokens' loss trains the shared weights, the private
tokens' loss only ``A`` and ``B`` (:class:`RoutedRule`), and after every optimizer step ``A`` is
projected onto the orthogonal complement of ``S_gen`` (``A <- A (I - U U^T)``), so whatever Adam
did, the memory's rows stay orthogonal to the public inputs and ``B A x = 0`` on them.

On its own subspace eta is 0 by construction; the log reports eta on a *held-out* public subspace
(other probe rows) beside the random baseline ``sqrt(k/d)``, which is what says something.
"""

from __future__ import annotations

import torch
from torch import nn

from libortho.data.records import TokenRows
from libortho.geometry import energy_basis, eta, project_out, random_eta_baseline
from libortho.models.layers import block_linears, block_prefix, decoder_blocks
from libortho.train.memory import (
    LinearMemorySpec,
    MemoryLinear,
    attach_linear_memory,
    memory_parameters,
    shared_parameters,
)
from libortho.train.rules import RoutedRule, StepCounts, StepRule
from libortho.train.separation import SEPARATION, Separation


@torch.no_grad()
def input_moments(model: nn.Module, rows: torch.Tensor, names: list[str], batch_size: int = 4
                  ) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` (float64) of each named linear's inputs over token rows ``(n, L)``."""
    acc: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    handles = []
    for name in names:
        def hook(_m: nn.Module, args: tuple, _out: torch.Tensor, name: str = name) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc[name] = acc.get(name, 0) + x.T @ x
            count[name] = count.get(name, 0) + x.shape[0]
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        for i in range(0, rows.shape[0], batch_size):
            model(input_ids=rows[i:i + batch_size], use_cache=False)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {n: acc[n] / count[n] for n in names}


def block_linear_names(model: nn.Module) -> list[str]:
    prefix = block_prefix(model)
    return [f"{prefix}.{i}.{rel}" for i, b in enumerate(decoder_blocks(model)) for rel in block_linears(b)]


class OGDRule(RoutedRule):
    """Routed losses, then ``A <- A (I - U U^T)`` per layer after every step; eta on held-out subspaces."""

    def __init__(self, layers: dict[str, MemoryLinear], bases: dict[str, torch.Tensor],
                 heldout: dict[str, torch.Tensor], eta_every: int, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.layers, self.bases, self.heldout, self.eta_every = layers, bases, heldout, eta_every
        self.eta_log: list[dict] = []
        self.memory_stepped = False
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        for name, layer in self.layers.items():
            U = self.bases[name].to(layer.mem_A.dtype)
            layer.mem_A.copy_(project_out(layer.mem_A, U))

    def active(self, step: int, counts: StepCounts) -> list[bool]:
        self.memory_stepped = counts.private > 0
        return super().active(step, counts)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.memory_stepped:  # untouched memory stays bit-identical (it is already projected)
            self.project()
        if (step + 1) % self.eta_every == 0:
            self.eta_log.append({"step": step + 1, **memory_eta(self.layers, self.heldout, self.bases)})

    def log(self) -> dict:
        dims = {n: (int(u.shape[1]), int(u.shape[0])) for n, u in self.heldout.items()}
        baseline = sum(random_eta_baseline(k, d) for k, d in dims.values()) / max(1, len(dims))
        own = {n: int(u.shape[1]) for n, u in self.bases.items()}
        return {"eta": self.eta_log, "eta_random_baseline": baseline,
                "subspace_dims": {n: [own[n], *dims[n]] for n in own}}


@torch.no_grad()
def memory_eta(layers: dict[str, MemoryLinear], heldout: dict[str, torch.Tensor],
               own: dict[str, torch.Tensor]) -> dict[str, float]:
    """Norm-weighted eta of the memory ``B A`` on held-out and on its own subspaces (all layers pooled)."""
    num_h = num_o = den = 0.0
    for name, layer in layers.items():
        dW = (layer.mem_B.double() @ layer.mem_A.double())
        n2 = float(dW.norm()) ** 2
        den += n2
        num_h += (eta(dW, heldout[name]) ** 2) * n2
        num_o += (eta(dW, own[name]) ** 2) * n2
    if den == 0:
        return {"eta_heldout": 0.0, "eta_own": 0.0}
    return {"eta_heldout": (num_h / den) ** 0.5, "eta_own": (num_o / den) ** 0.5}


def probe_split(probe: TokenRows | None, data: TokenRows, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint sets of public rows: one defines the subspaces, the other is held out for eta."""
    if probe is None:
        public = data.private_mask().any(dim=1).logical_not().nonzero().flatten()
        probe = data.subset(public)
    if len(probe) < 2:
        raise ValueError("ogd needs at least two public probe rows")
    half = min(n, len(probe) // 2)
    return probe.input_ids[:half], probe.input_ids[half:2 * half]


@SEPARATION.register("ogd", needs_labels=True, memory="lowrank")
class OGD(Separation):
    name = "ogd"

    def attach(self, model: nn.Module, data: TokenRows, probe: TokenRows | None) -> StepRule:
        cfg = self.cfg
        names = block_linear_names(model)
        fit_rows, held_rows = probe_split(probe, data, cfg.probe_rows)
        own = {n: energy_basis(C, cfg.ogd_energy).float() for n, C in input_moments(model, fit_rows, names).items()}
        held = {n: energy_basis(C, cfg.ogd_energy).float() for n, C in input_moments(model, held_rows, names).items()}
        layers = attach_linear_memory(model, LinearMemorySpec("lowrank", rank=cfg.rank), self.ctx, names, cfg.seed)
        return OGDRule(layers, own, held, cfg.eta_every, shared=shared_parameters(model),
                       memory=memory_parameters(model), memory_lr_scale=cfg.memory_lr_scale, name="ogd")
