"""LLL through fpylll: unimodular, size-reduced, Lovász; what it does to nearest plane, box included."""

import itertools

import numpy as np
import pytest
import torch

from libortho.quant.babai import gram_schmidt_sq, nearest_plane
from libortho.quant.lll import is_unimodular, lll_reduce, reduce_and_compare


def _gso(B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classical Gram-Schmidt: (B*, mu) written out."""
    n = B.shape[0]
    Bs, mu = np.zeros_like(B), np.eye(n)
    for i in range(n):
        Bs[i] = B[i]
        for j in range(i):
            mu[i, j] = (B[i] @ Bs[j]) / (Bs[j] @ Bs[j])
            Bs[i] = Bs[i] - mu[i, j] * Bs[j]
    return Bs, mu


def _skewed_basis(n: int, seed: int) -> torch.Tensor:
    """An integer basis, far from reduced: a random unimodular mix of a modest diagonal lattice."""
    rng = np.random.default_rng(seed)
    B = np.diag(rng.integers(5, 40, size=n)).astype(np.int64)
    for _ in range(3 * n):
        i, j = rng.choice(n, 2, replace=False)
        B[i] += int(rng.integers(-3, 4)) * B[j]
    return torch.from_numpy(B).double()


@pytest.mark.parametrize("n,seed", [(4, 0), (8, 1), (12, 2)])
def test_lll_is_unimodular_size_reduced_and_lovasz(n: int, seed: int) -> None:
    B = _skewed_basis(n, seed)
    red = lll_reduce(B, delta=0.99)
    assert red.transform.dtype == torch.int64 and is_unimodular(red.transform)
    torch.testing.assert_close(red.basis, red.transform.double() @ B)
    Bs, mu = _gso(red.basis.numpy())
    norms = (Bs * Bs).sum(1)
    assert np.all(np.abs(mu[np.tril_indices(n, -1)]) <= 0.51 + 1e-9)  # size reduction (eta = 0.51)
    for k in range(1, n):  # Lovász condition
        assert norms[k] >= (0.99 - mu[k, k - 1] ** 2) * norms[k - 1] * (1 - 1e-9)
    # same lattice volume, reported profiles are the Gram-Schmidt norms of each basis
    assert np.sum(np.log(red.gs_after.numpy())) == pytest.approx(np.sum(np.log(red.gs_before.numpy())), rel=1e-9)
    np.testing.assert_allclose(red.gs_after.numpy(), norms, rtol=1e-9)
    assert float(red.gs_after.sum()) < float(red.gs_before.sum())  # this basis was far from reduced


def test_is_unimodular_tells_them_apart() -> None:
    assert is_unimodular(torch.tensor([[2, 1], [1, 1]]))
    assert is_unimodular(torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, -1]]))  # needs a row swap
    assert not is_unimodular(torch.tensor([[2, 0], [0, 1]]))
    assert not is_unimodular(torch.tensor([[1, 2], [2, 4]]))


def test_lll_refuses_bad_parameters() -> None:
    with pytest.raises(ValueError, match="delta"):
        lll_reduce(torch.eye(3, dtype=torch.float64), delta=0.2)
    with pytest.raises(ValueError, match="square"):
        lll_reduce(torch.zeros(2, 3, dtype=torch.float64))


def _cvp(H: np.ndarray, y: np.ndarray, radius: int = 9) -> float:
    """Exact closest-vector distance by enumeration of every code within ``radius`` of the rounded target."""
    D = np.array(list(itertools.product(range(-radius, radius + 1), repeat=len(y))), dtype=np.float64)
    E = np.round(y) + D - y
    return float(np.einsum("ij,jk,ik->i", E, H, E).min())


def test_reduce_and_compare_errors_against_exact_cvp_and_the_box() -> None:
    rng = np.random.default_rng(4)
    n = 4
    B = _skewed_basis(n, seed=4)  # a badly skewed basis of a near-rectangular lattice
    H = B @ B.T
    y = torch.from_numpy(rng.uniform(0.5, 2.5, size=(6, n)))
    s = torch.ones(6, dtype=torch.float64)
    r = reduce_and_compare(H, y, s, maxq=3)
    exact = sum(_cvp(H.numpy(), row) for row in y.numpy())
    assert r.error_after >= exact * (1 - 1e-9) and r.error_before >= exact * (1 - 1e-9)
    assert r.error_after <= r.error_before  # on this lattice the reduced basis helps
    assert r.bound_after < r.bound_before
    assert r.error_before <= r.bound_before and r.error_after <= r.bound_after  # unclipped: Babai's bound
    # clipping codes into the box can only move them, never below the unconstrained optimum
    assert r.clipped_error_after >= exact * (1 - 1e-9)
    assert 0.0 <= r.outside_box_after <= 1.0 and r.dim == n


def test_scaled_rows_multiply_errors_by_step_squared() -> None:
    rng = np.random.default_rng(7)
    A = rng.normal(size=(5, 5)) + 2 * np.eye(5)
    H = torch.from_numpy(A @ A.T)
    y = torch.from_numpy(rng.uniform(1, 6, size=(3, 5)))
    one = reduce_and_compare(H, y, torch.ones(3, dtype=torch.float64), maxq=7)
    two = reduce_and_compare(H, y, torch.full((3,), 2.0, dtype=torch.float64), maxq=7)
    assert two.error_after == pytest.approx(4 * one.error_after)
    assert two.bound_before == pytest.approx(4 * one.bound_before)
    # and nearest plane is invariant to the integer scaling fpylll works on
    B = torch.linalg.cholesky(H)
    torch.testing.assert_close(nearest_plane(B, y @ B), nearest_plane(1e3 * B, 1e3 * (y @ B)))
    assert torch.allclose(gram_schmidt_sq(2 * B), 4 * gram_schmidt_sq(B))
