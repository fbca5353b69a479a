"""Spectra and angles: what the seeds measure to argue that a separation happened (seed 001 §5).

* :func:`singular_values` of an update ``dW`` (is it low-rank?), :func:`kfac_spectrum` (the
  curvature K-FAC sees along each eigen-direction);
* :func:`principal_angles` between two subspaces (do the general and the memorised directions
  overlap?);
* :func:`slq_density`: the Hessian's spectral density by stochastic Lanczos quadrature (Ghorbani et
  al. 2019) from Hessian-vector products only, with :func:`hvp` for a loss over some parameters, and
  :func:`rayleigh_quotient`, the curvature along one direction (where an update sits in that density).
  Each probe gives an ``m``-point Gauss quadrature of the spectral measure ``v^T δ(λ - H) v``; their
  average estimates ``(1/n) tr δ(λ - H)``. Lanczos runs with full re-orthogonalisation (``m`` is small),
  so with ``m = dim`` every probe's nodes are exactly the eigenvalues it sees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from libortho.curvature.kfac import KFACFactors


def singular_values(dW: torch.Tensor) -> torch.Tensor:
    """Singular values of a (d_out, d_in) update, descending (fp64)."""
    return torch.linalg.svdvals(dW.double())


def kfac_spectrum(f: KFACFactors) -> torch.Tensor:
    """Every Kronecker eigenvalue ``λ_G,i λ_A,j`` (or EK-FAC's), descending."""
    return f.eigenvalues().flatten().sort(descending=True).values


def _orthonormal(U: torch.Tensor) -> torch.Tensor:
    Q, R = torch.linalg.qr(U.double())
    keep = torch.diagonal(R).abs() > 1e-10 * max(float(torch.diagonal(R).abs().max()), 1e-300)
    return Q[:, keep]


def principal_angles(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between span(U) and span(V), columns in R^d."""
    if U.shape[0] != V.shape[0]:
        raise ValueError(f"subspaces live in different spaces: {U.shape[0]} vs {V.shape[0]} rows")
    cos = torch.linalg.svdvals(_orthonormal(U).T @ _orthonormal(V)).clamp(-1.0, 1.0)
    return torch.arccos(cos).sort().values


@dataclass(frozen=True)
class SpectralDensity:
    """Quadrature nodes and weights of each probe (``nodes[p]``, ``weights[p]`` sum to 1)."""

    nodes: torch.Tensor  # (probes, m)
    weights: torch.Tensor  # (probes, m)
    dim: int

    def trace(self, fn: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> float:
        """Estimate of ``tr fn(H)``: ``dim`` times the probes' mean quadrature of ``fn``."""
        return float(self.dim * (self.weights * fn(self.nodes)).sum(1).mean())

    def histogram(self, bins: int = 50, sigma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid, density) with each node smoothed by a Gaussian of width ``sigma`` (default: range/bins)."""
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        span = max(hi - lo, 1e-12)
        s = sigma or span / bins
        grid = torch.linspace(lo - 3 * s, hi + 3 * s, 4 * bins, dtype=torch.float64)
        k = torch.exp(-0.5 * ((grid[:, None, None] - self.nodes[None]) / s) ** 2) / (s * (2 * torch.pi) ** 0.5)
        return grid, (k * self.weights[None]).sum(-1).mean(-1)


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, steps: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta) of the Lanczos tridiagonal after ``steps`` (fewer on breakdown), full re-orthogonalisation."""
    Q = [v0.double() / v0.double().norm()]
    alphas, betas = [], []
    for k in range(steps):
        w = matvec(Q[k]).double()
        a = float(w @ Q[k])
        alphas.append(a)
        B = torch.stack(Q, 1)
        w = w - B @ (B.T @ w)
        w = w - B @ (B.T @ w)  # twice is enough (Kahan)
        b = float(w.norm())
        if k == steps - 1 or b < 1e-10 * max(abs(a), 1.0):
            break
        betas.append(b)
        Q.append(w / b)
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64)


def slq_density(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, probes: int = 8, steps: int = 30,
                seed: int = 0) -> SpectralDensity:
    """Stochastic Lanczos quadrature of a symmetric operator given by ``matvec`` on R^dim."""
    if probes < 1 or steps < 1:
        raise ValueError(f"need probes >= 1 and steps >= 1, got {probes}, {steps}")
    g = torch.Generator().manual_seed(seed)
    m = min(steps, dim)
    nodes = torch.zeros(probes, m, dtype=torch.float64)
    weights = torch.zeros(probes, m, dtype=torch.float64)
    for p in range(probes):
        v = torch.randint(0, 2, (dim,), generator=g).double() * 2 - 1  # Rademacher
        a, b = lanczos(matvec, v, m)
        T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
        theta, Y = torch.linalg.eigh(T)
        k = theta.numel()
        nodes[p, :k], weights[p, :k] = theta, Y[0] ** 2
        if k < m:  # breakdown: pad with zero-weight copies of the last node
            nodes[p, k:] = theta[-1]
    return SpectralDensity(nodes, weights, dim)


def rayleigh_quotient(matvec: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor) -> float:
    """``vᵀ H v / vᵀ v``: the curvature of the operator along ``v`` (0 for a zero vector)."""
    v = v.double().flatten()
    vv = float(v @ v)
    return float(v @ matvec(v).double()) / vv if vv else 0.0


def hvp(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> H v`` for the Hessian of ``loss_fn()`` in the flattened ``params`` (double backward)."""
    params = list(params)
    sizes = [p.numel() for p in params]

    def mv(v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            parts = torch.split(v.to(flat.dtype), sizes)
            dot = sum((g * u.view_as(g)).sum() for g, u in zip(grads, parts, strict=True))
            hv = torch.autograd.grad(dot, params)
        del flat
        return torch.cat([h.reshape(-1) for h in hv]).double()

    return mv
