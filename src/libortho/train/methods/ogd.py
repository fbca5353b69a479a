"""``ogd``: orthogonal gradient descent into a low-rank memory (seed 000 §3.2, GPM-style subspaces).

Per block linear, the general subspace ``S_gen`` is spanned by the top eigenvectors of the public
activations' second moment that hold ``ogd_energy`` of it (from ``probe_rows`` public rows). The
memory is ``B A`` (rank ``rank``); the public tokens' loss trains the shared weights, the private
tokens' loss only ``A`` and ``B`` (:class:`RoutedRule`), and after every optimizer step ``A`` is
projected onto the orthogonal complement of ``S_gen`` (``A <- A (I - U U^T)``), so whatever Adam
did, the memory's rows stay orthogonal to the public inputs and ``B A x = 0`` on them.

With ``ogd_gradient_energy`` the memory is also kept off the public *output-gradient* subspace: the
top eigenvectors ``V`` of the public loss's gradients w.r.t. each linear's outputs (``E[g g^T]`` over
the same probe rows), and ``B <- (I - V V^T) B`` after every step, so ``B A`` moves neither the
outputs that public inputs produce nor in the output directions the public loss is sensitive to
(the two sides of a K-FAC-style block, GPM's input side alone being the default).

On its own subspace eta is 0 by construction; the log reports eta on a *held-out* public subspace
(other probe rows) beside the random baseline ``sqrt(k/d)``, which is what says something.
"""

from __future__ import annotations

import torch
from torch import nn

from libortho.data.records import TokenRows
from libortho.geometry import energy_basis, eta, project_out, random_eta_baseline
from libortho.models.layers import block_linear_names
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


def output_gradient_moments(model: nn.Module, rows: torch.Tensor, names: list[str], batch_size: int = 4
                            ) -> dict[str, torch.Tensor]:
    """``E[g g^T]`` (float64) of the next-token loss's gradient w.r.t. each named linear's outputs, over
    public token rows ``(n, L)`` (summed token loss; the scale does not move an energy basis). Leaves
    no gradient on the model's parameters."""
    acc: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    def keep(name: str, g: torch.Tensor) -> None:
        g = g.detach().reshape(-1, g.shape[-1]).double()
        acc[name] = acc.get(name, 0) + g.T @ g
        count[name] = count.get(name, 0) + g.shape[0]

    def hook(_m: nn.Module, _args: tuple, out: torch.Tensor, name: str) -> None:
        if out.requires_grad:
            out.register_hook(lambda g: keep(name, g))

    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for i in range(0, rows.shape[0], batch_size):
                ids = rows[i:i + batch_size]
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                   reduction="sum")
                loss.backward()
    finally:
        model.train(was)
        model.zero_grad(set_to_none=True)
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in acc]
    if missing:
        raise ValueError(f"no output gradient reached {missing[0]} (are its weights frozen?)")
    return {n: acc[n] / count[n] for n in names}


class OGDRule(RoutedRule):
    """Routed losses, then ``A <- A (I - U U^T)`` per layer after every step; eta on held-out subspaces."""

    def __init__(self, layers: dict[str, MemoryLinear], bases: dict[str, torch.Tensor],
                 heldout: dict[str, torch.Tensor], eta_every: int,
                 out_bases: dict[str, torch.Tensor] | None = None, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.layers, self.bases, self.heldout, self.eta_every = layers, bases, heldout, eta_every
        self.out_bases = out_bases or {}
        self.eta_log: list[dict] = []
        self.memory_stepped = False
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        for name, layer in self.layers.items():
            U = self.bases[name].to(layer.mem_A.dtype)
            layer.mem_A.copy_(project_out(layer.mem_A, U))
            if name in self.out_bases:  # (I - V V^T) B: the columns of B off the public gradients' subspace
                V = self.out_bases[name].to(layer.mem_B.dtype)
                layer.mem_B.copy_(project_out(layer.mem_B.T, V).T)

    def active(self, step: int, counts: StepCounts) -> list[bool]:
        self.memory_stepped = counts.private > 0
        return super().active(step, counts)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.memory_stepped:  # untouched memory stays bit-identical (it is already projected)
            self.project()
        if (step + 1) % self.eta_every == 0:
            self.eta_log.append({"step": step + 1, **memory_eta(self.layers, self.heldout, self.bases)})

    def state(self) -> dict:
        own = {n: int(u.shape[1]) for n, u in self.bases.items()}
        out = {n: int(v.shape[1]) for n, v in self.out_bases.items()}
        return {**super().state(), "input_subspace_dims": own, "gradient_subspace_dims": out}

    def log(self) -> dict:
        dims = {n: (int(u.shape[1]), int(u.shape[0])) for n, u in self.heldout.items()}
        baseline = sum(random_eta_baseline(k, d) for k, d in dims.values()) / max(1, len(dims))
        own = {n: int(u.shape[1]) for n, u in self.bases.items()}
        out = {"eta": self.eta_log, "eta_random_baseline": baseline,
               "subspace_dims": {n: [own[n], *dims[n]] for n in own}}
        if self.out_bases:
            out["gradient_subspace_dims"] = {n: list(v.shape[::-1]) for n, v in self.out_bases.items()}
        return out


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
        out = None if cfg.ogd_gradient_energy is None else {
            n: energy_basis(C, cfg.ogd_gradient_energy).float()
            for n, C in output_gradient_moments(model, fit_rows, names).items()}
        layers = attach_linear_memory(model, LinearMemorySpec("lowrank", rank=cfg.rank), self.ctx, names, cfg.seed)
        return OGDRule(layers, own, held, cfg.eta_every, out_bases=out, shared=shared_parameters(model),
                       memory=memory_parameters(model), memory_lr_scale=cfg.memory_lr_scale, name="ogd")
