"""The geometric measurements of the seeds' table 1 (seed 001 §5): eta, update spectra, linear mode
connectivity and the Hessian's spectral density, each computed for the geometry table's models.

Every function takes the table (``t``: its data, config and reference models, see
:mod:`libortho.experiments.geometry_table`) and returns a JSON-ready dict; the table caches each
under its configuration. The mathematics lives in :mod:`libortho.geometry`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def eta_table(t: Any, tau: dict[str, torch.Tensor], retrain: nn.Module, split: Any,
              kfac_streams: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """eta per layer and pooled for each update, on the pre-trained model's held-out public input subspace."""
    from libortho.geometry import energy_basis
    from libortho.geometry.subspace import eta_report
    from libortho.models.layers import find_linears
    from libortho.train.methods.ogd import input_moments

    names = list(tau)
    bases = {n: energy_basis(C, t.cfg.eta_energy).float()
             for n, C in input_moments(t.pre, t.data.domain_eval, names).items()}
    lr, lp = find_linears(retrain), find_linears(t.pre)
    k = max(t.cfg.kfac_ranks)
    updates = {
        "ft": tau,
        "retrain": {n: lr[n].weight.double() - lp[n].weight.double() for n in names},
        "tv_low": {n: split.layers[n].low().double() for n in names},
        "tv_high": {n: split.layers[n].high().double() for n in names},
        f"kfac_r{k}": {n: s.to_dense(torch.float64) for n, s in kfac_streams(k).items()},
    }
    return {"energy": t.cfg.eta_energy, "rank": split.rule.get("rank"),
            "updates": {u: eta_report(dw, bases) for u, dw in updates.items()}}


@torch.no_grad()
def update_spectra(tau: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Singular values of the fine-tuning update per layer (and its energy at the split's ranks)."""
    from libortho.geometry.spectra import singular_values

    out = {}
    for n, dW in tau.items():
        s = singular_values(dW)
        e = torch.cumsum(s.double() ** 2, 0) / float((s.double() ** 2).sum())
        out[n] = {"s": [float(v) for v in s[:64]], "energy_at": {str(r): float(e[min(r, len(e)) - 1])
                                                                 for r in (1, 2, 4, 8, 16, 32, 64)}}
    return out


def _nll_sum(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the positions whose label is not -100, and their count."""
    logits = model(input_ids=ids, use_cache=False).logits.float()[:, :-1]
    tgt = labels[:, 1:]
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum")
    return nll, int((tgt != -100).sum())


def mean_loss(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[nn.Module], float]:
    """``model -> mean next-token NLL`` over the loss positions of ``batches`` (no gradients)."""

    @torch.no_grad()
    def f(m: nn.Module) -> float:
        m.eval()
        tot, n = 0.0, 0
        for ids, labels in batches:
            s, c = _nll_sum(m, ids, labels)
            tot, n = tot + float(s), n + c
        return tot / n
    return f


def mean_loss_with_grad(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The same mean as a differentiable tensor, attention in the math kernel (twice differentiable)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    parts, n = [], 0
    with sdpa_kernel(SDPBackend.MATH):
        for ids, labels in batches:
            s, c = _nll_sum(model, ids, labels)
            parts.append(s)
            n += c
    return torch.stack(parts).sum() / n


def texts(t: Any, public_blocks: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Public: the first held-out domain blocks; private: the member records, loss on record tokens only."""
    from libortho.experiments.geometry_rows import private_batches, public_batches

    return {"public": public_batches(t.data.domain_eval[:public_blocks]), "private": private_batches(t)}


def lmc_pairs(t: Any, retrain: nn.Module, split: Any) -> dict[str, Any]:
    """Loss along straight lines between the switched-off models and the references, public and private."""
    from libortho.assemble import quantized
    from libortho.edit.task_vector import apply_split
    from libortho.geometry.compare import dense_model
    from libortho.geometry.lmc import lmc_curve

    tv = apply_split(t.pre, split, 1.0, 0.0)
    v1_a0 = dense_model(quantized(t.ft, t.data.calibration, t.cfg.bench.quant)[0], alpha=0.0)
    models = {"pre": t.pre, "ft": t.ft, "retrain": retrain, "tv_a0": tv, "v1_a0": v1_a0}
    pairs = [("pre", "tv_a0"), ("tv_a0", "retrain"), ("ft", "tv_a0"), ("ft", "retrain"), ("ft", "pre"),
             ("pre", "v1_a0"), ("v1_a0", "retrain"), ("ft", "v1_a0")]
    out: dict[str, Any] = {"pairs": {}}
    for a, b in pairs:
        curves = {}
        for text, batches in texts(t, t.cfg.lmc_blocks).items():
            c = lmc_curve(models[a], models[b], mean_loss(batches), points=t.cfg.lmc_points)
            curves[text] = {"ts": c.ts, "losses": c.losses, "barrier": c.barrier}
        out["pairs"][f"{a}~{b}"] = curves
        t.say(f"LMC {a} ~ {b}: barrier public {curves['public']['barrier']:.4f}, "
              f"private {curves['private']['barrier']:.4f}")
    return out


def linear_parameter_count(model: nn.Module) -> int:
    """Weights of the decoder linears (the space the updates and the Hessian stage live in)."""
    from libortho.models.layers import find_linears

    return sum(m.weight.numel() for m in find_linears(model).values())


def hessian_spectra(t: Any, models: dict[str, nn.Module], directions: dict[str, dict[str, torch.Tensor]]
                    ) -> dict[str, Any]:
    """Spectral density (stochastic Lanczos quadrature) of the loss Hessian in the decoder-linear weights of
    each model, on public and on private text, and the curvature along each named update direction.

    Seed 001 table 1: "the memory stream should hold the Hessian's outliers, the general stream only its
    bulk". Measured as: the Rayleigh quotient ``q = vᵀHv / vᵀv`` of each direction (``tau``, ``tau_low``,
    ``tau_high``, ...) and the share of the spectral mass above ``q`` (how far into the outliers ``v``
    points), beside ``tr(H)/n`` (a random direction's expected ``q``) and the largest Ritz value.
    Small models only: every Lanczos step is one Hessian-vector product (double backward).
    """
    from libortho.geometry.spectra import hvp, rayleigh_quotient, slq_density
    from libortho.models.layers import find_linears

    cfg = t.cfg
    out: dict[str, Any] = {"probes": cfg.slq_probes, "steps": cfg.slq_steps, "models": {}}
    for name, model in models.items():
        lin = find_linears(model)
        params = [m.weight for m in lin.values()]
        flat_dirs = {d: torch.cat([v[n].reshape(-1).double() for n in lin]) for d, v in directions.items()}
        was = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()
        try:
            per_text = {}
            for text, batches in texts(t, cfg.slq_blocks).items():
                mv = hvp(lambda m=model, b=batches: mean_loss_with_grad(m, b), params)
                dens = slq_density(mv, sum(p.numel() for p in params), probes=cfg.slq_probes,
                                   steps=cfg.slq_steps, seed=cfg.bench.seed)
                per_text[text] = {
                    "nodes": dens.nodes.tolist(), "weights": dens.weights.tolist(), "dim": dens.dim,
                    "lambda_max": float(dens.nodes.max()), "mean_eigenvalue": dens.trace() / dens.dim,
                    "directions": {d: _direction_summary(rayleigh_quotient(mv, v), dens)
                                   for d, v in flat_dirs.items()}}
                t.say(f"Hessian {name} on {text}: lambda_max {per_text[text]['lambda_max']:.3g}, mean "
                      f"{per_text[text]['mean_eigenvalue']:.3g}, q(tau_high) "
                      f"{per_text[text]['directions'].get('tau_high', {}).get('q', float('nan')):.3g}")
            out["models"][name] = per_text
        finally:
            for p, w in zip(model.parameters(), was, strict=True):
                p.requires_grad_(w)
    return out


def _direction_summary(q: float, dens: Any) -> dict[str, float]:
    """The direction's curvature and the share of the estimated spectral mass above it."""
    return {"q": q, "mass_above": float((dens.weights * (dens.nodes > q)).sum(1).mean())}
