"""Spectra, principal angles, stochastic Lanczos quadrature and linear mode connectivity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from libortho.geometry.lmc import barrier, interpolate, lmc_curve
from libortho.geometry.spectra import hvp, lanczos, principal_angles, singular_values, slq_density


def sym(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (M + M.T) / 2


def test_principal_angles_of_known_subspaces() -> None:
    e = torch.eye(4, dtype=torch.float64)
    ang = principal_angles(e[:, :2], torch.stack([e[:, 0], (e[:, 1] + e[:, 2]) / math.sqrt(2)], 1))
    assert torch.allclose(ang, torch.tensor([0.0, math.pi / 4], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(principal_angles(e[:, :1], e[:, 3:]), torch.tensor([math.pi / 2], dtype=torch.float64))
    # a basis given with a redundant column spans the same space
    assert principal_angles(e[:, :2], torch.cat([e[:, :2], e[:, :1]], 1)).max() < 1e-6
    with pytest.raises(ValueError, match="different spaces"):
        principal_angles(e[:, :2], torch.eye(3))


def test_lanczos_at_full_steps_recovers_every_eigenvalue() -> None:
    H = sym(12, 0)
    a, b = lanczos(lambda v: H @ v, torch.ones(12, dtype=torch.float64), 12)
    T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
    assert torch.allclose(torch.linalg.eigvalsh(T), torch.linalg.eigvalsh(H), atol=1e-8)


def test_slq_traces_agree_with_the_exact_spectrum() -> None:
    """tr H and tr H^2 from SLQ against the exact eigenvalues (Hutchinson-level accuracy with 200 probes);
    with steps = dim each probe's nodes are eigenvalues of H."""
    H = sym(20, 1)
    lam = torch.linalg.eigvalsh(H)
    sd = slq_density(lambda v: H @ v, 20, probes=200, steps=20, seed=0)
    off = H - torch.diag(torch.diagonal(H))
    sigma = math.sqrt(2 * float((off**2).sum()) / 200)  # Hutchinson's std with Rademacher probes
    assert sd.trace() == pytest.approx(float(lam.sum()), abs=4 * sigma)
    assert sd.trace(lambda x: x**2) == pytest.approx(float((lam**2).sum()), rel=0.1)
    d = torch.cdist(sd.nodes[0][:, None], lam[:, None]).min(1).values
    assert d.max() < 1e-6
    assert torch.allclose(sd.weights.sum(1), torch.ones(200, dtype=torch.float64))
    grid, dens = sd.histogram(bins=20)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=0.02)


def test_hvp_slq_on_a_tiny_layer_matches_its_exact_hessian() -> None:
    """The Hessian of a tiny layer's loss by autograd.functional.hessian; SLQ through hvp finds its extremes."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=False).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(x @ w.T, y)

    Hx = torch.autograd.functional.hessian(loss_of, lin.weight.detach()).reshape(12, 12)
    exact = torch.linalg.eigvalsh(Hx)
    mv = hvp(lambda: loss_of(lin.weight), [lin.weight])
    v = torch.randn(12, dtype=torch.float64)
    assert torch.allclose(mv(v), Hx @ v, atol=1e-10)
    sd = slq_density(mv, 12, probes=4, steps=12, seed=1)
    assert float(sd.nodes.max()) == pytest.approx(float(exact.max()), rel=1e-6)
    assert float(sd.nodes.min()) == pytest.approx(float(exact.min()), abs=1e-6)


def test_singular_values_of_a_rank_two_update() -> None:
    u, v = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    s = singular_values(u @ v)
    assert (s[:2] > 1e-3).all() and (s[2:] < 1e-10).all()


def test_barrier_and_lmc_curve() -> None:
    ts = [0.0, 0.5, 1.0]
    assert barrier(ts, [1.0, 3.0, 2.0]) == pytest.approx(1.5)
    assert barrier(ts, [1.0, 1.0, 2.0]) == 0.0  # below the chord everywhere
    with pytest.raises(ValueError):
        barrier([0.0, 1.0], [1.0])
    torch.manual_seed(0)
    a, b = nn.Linear(3, 1), nn.Linear(3, 1)
    x = torch.randn(8, 3)

    def loss(m: nn.Module) -> float:
        return float(m(x).pow(2).mean())

    c = lmc_curve(a, b, loss, points=11)
    assert c.losses[0] == pytest.approx(loss(a)) and c.losses[-1] == pytest.approx(loss(b)) and len(c.ts) == 11
    # loss is convex in the weights: never above the chord
    assert c.barrier == pytest.approx(0.0, abs=1e-7)
    same = lmc_curve(a, a, loss, points=5)
    assert max(same.losses) - min(same.losses) < 1e-7
    with pytest.raises(ValueError, match="different parameters"):
        interpolate({"w": torch.zeros(1)}, {"v": torch.zeros(1)}, 0.5)


def test_lmc_finds_the_barrier_between_two_minima_of_a_nonconvex_loss() -> None:
    """Loss (w^2 - 1)^2 has minima at +-1 and a bump of 1 between them: the barrier is 1."""
    a, b = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        a.weight.fill_(-1.0)
        b.weight.fill_(1.0)
    c = lmc_curve(a, b, lambda m: float((m.weight.pow(2) - 1).pow(2).sum()), points=11)
    assert c.barrier == pytest.approx(1.0, abs=1e-6)


def test_rayleigh_quotient_is_the_curvature_along_a_direction() -> None:
    """vᵀHv/vᵀv of an explicit symmetric matrix, written out; eigenvectors give their eigenvalues."""
    from libortho.geometry.spectra import rayleigh_quotient

    torch.manual_seed(0)
    M = torch.randn(7, 7, dtype=torch.float64)
    H = M + M.T
    v = torch.randn(7, dtype=torch.float64)
    expected = float(sum(v[i] * H[i, j] * v[j] for i in range(7) for j in range(7)) / sum(v[i] ** 2 for i in range(7)))
    assert abs(rayleigh_quotient(lambda x: H @ x, v) - expected) < 1e-12
    lam, U = torch.linalg.eigh(H)
    assert abs(rayleigh_quotient(lambda x: H @ x, 3.0 * U[:, -1]) - float(lam[-1])) < 1e-10
    assert rayleigh_quotient(lambda x: H @ x, torch.zeros(7)) == 0.0
