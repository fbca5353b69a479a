"""The general subspace of a layer's inputs and the entanglement of an update with it (seed 000 §3.2).

A layer ``y = W x`` reads inputs ``x`` in ``R^d``. Public activations span (mostly) a subspace
``S_gen``: the top eigenvectors of their second-moment matrix ``C = E[x x^T]`` that hold a given
fraction of its energy (GPM, Saha et al. 2021). An update ``dW`` acts on ``S_gen`` through
``dW P`` with ``P = U U^T``; its entanglement is ``eta = ||dW P||_F / ||dW||_F``. An update whose
rows are orthogonal to ``S_gen`` (``dW P = 0``) leaves every public input's output unchanged.
A random ``dW`` has ``eta ~ sqrt(k / d)``: the baseline to read any measured eta against.
"""

from __future__ import annotations

import math

import torch


def energy_basis(C: torch.Tensor, energy: float = 0.97, max_rank: int | None = None) -> torch.Tensor:
    """Orthonormal columns ``U (d, k)``: the fewest top eigenvectors of symmetric PSD ``C`` holding ``energy``.

    ``energy`` in (0, 1]; ``k`` is capped by ``max_rank``. Computed in float64.
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be a square matrix, got {tuple(C.shape)}")
    vals, vecs = torch.linalg.eigh(C.double())
    vals = vals.flip(0).clamp(min=0)
    vecs = vecs.flip(1)
    total = float(vals.sum())
    if total == 0:
        return vecs[:, :0].to(C.dtype)
    cum = torch.cumsum(vals, 0) / total
    k = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12)) + 1
    k = min(k, C.shape[0] if max_rank is None else max_rank)
    return vecs[:, :k].to(C.dtype).contiguous()


def project_out(M: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``M (I - U U^T)``: the rows of ``M (.., d)`` with their component in span(U) removed."""
    if U.numel() == 0:
        return M
    return M - (M @ U) @ U.T


def eta(dW: torch.Tensor, U: torch.Tensor) -> float:
    """``||dW U U^T||_F / ||dW||_F`` for orthonormal ``U (d, k)`` (0 for a zero update)."""
    norm = float(dW.double().norm())
    if norm == 0.0:
        return 0.0
    return float((dW.double() @ U.double()).norm()) / norm


def random_eta_baseline(k: int, d: int) -> float:
    """Expected-order eta of a random update against a k-dimensional subspace of R^d: ``sqrt(k/d)``."""
    if not 0 <= k <= d or d < 1:
        raise ValueError(f"need 0 <= k <= d and d >= 1, got k={k}, d={d}")
    return math.sqrt(k / d)


def eta_report(updates: dict[str, torch.Tensor], bases: dict[str, torch.Tensor]) -> dict[str, object]:
    """eta of each layer's update against its subspace, beside the random baseline, and both pooled.

    ``updates[n]`` is ``dW (d_out, d)`` of layer ``n``, ``bases[n]`` orthonormal ``U (d, k)``. Pooled:
    ``sqrt(sum ||dW U||^2 / sum ||dW||^2)``, the baseline pooled alike (``sqrt(k/d)`` weighted by
    ``||dW||^2``), so a few large updates dominate as they do in the model. Layers with a zero update
    carry no weight. Every layer of ``updates`` must have a basis.
    """
    missing = sorted(set(updates) - set(bases))
    if missing:
        raise KeyError(f"no subspace for {len(missing)} layers (e.g. {missing[0]})")
    per: dict[str, dict[str, float]] = {}
    num = den = base = 0.0
    for n, dW in updates.items():
        U = bases[n]
        d2 = float(dW.double().norm()) ** 2
        p2 = float((dW.double() @ U.double()).norm()) ** 2
        r = random_eta_baseline(U.shape[1], U.shape[0])
        per[n] = {"eta": math.sqrt(p2 / d2) if d2 else 0.0, "random_baseline": r, "k": int(U.shape[1]),
                  "d": int(U.shape[0])}
        num, den, base = num + p2, den + d2, base + r * r * d2
    return {"eta": math.sqrt(num / den) if den else 0.0, "random_baseline": math.sqrt(base / den) if den else 0.0,
            "per_layer": per}
