"""Selectors and support choice against slow references written independently of the implementation."""

import numpy as np
import pytest
import scipy.linalg
import torch

from libortho.select import (
    SELECTORS,
    global_threshold,
    impact_scores,
    inverse_hessian_diag,
    optimal_values,
    threshold_mask,
    topk_mask,
)


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=g) @ torch.randn(n, n, generator=g)
    return 2 * X.T @ X / X.shape[0]


def _damped(H: torch.Tensor, damp: float) -> np.ndarray:
    """The documented damping, in numpy: dead inputs get H_jj = 1, then damp * mean(diag H) on the diagonal."""
    Hd = H.double().numpy().copy()
    d = np.diag(Hd).copy()
    d[d == 0] = 1.0
    np.fill_diagonal(Hd, d + damp * d.mean())
    return Hd


def test_registry_has_the_three_named_selectors() -> None:
    assert {"magnitude", "obs", "diag"} <= set(SELECTORS)
    with pytest.raises(ValueError, match="unknown selector"):
        impact_scores("nope", torch.zeros(2, 2), None)


def test_scores_match_hand_formulas() -> None:
    H = _spd(6, 0)
    R = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    hinv_diag = torch.from_numpy(np.diag(np.linalg.inv(_damped(H, 0.01)))).float()
    torch.testing.assert_close(impact_scores("magnitude", R, None), R**2)
    torch.testing.assert_close(impact_scores("diag", R, H), R**2 * torch.diagonal(H)[None])
    torch.testing.assert_close(impact_scores("obs", R, H), R**2 / hinv_diag[None], rtol=1e-4, atol=0)
    torch.testing.assert_close(inverse_hessian_diag(H), hinv_diag, rtol=1e-4, atol=0)


def test_curvature_selectors_need_h_of_right_shape() -> None:
    with pytest.raises(ValueError, match="needs the layer Hessian"):
        impact_scores("obs", torch.ones(2, 3), None)
    with pytest.raises(ValueError, match="expected"):
        impact_scores("diag", torch.ones(2, 3), torch.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        impact_scores("magnitude", torch.tensor([[float("nan")]]), None)


def test_obs_prefers_entries_the_output_is_sensitive_to() -> None:
    # two inputs: feature 0 large variance, feature 1 tiny; equal residuals
    H = torch.diag(torch.tensor([100.0, 0.01]))
    R = torch.ones(1, 2)
    mask = topk_mask(impact_scores("obs", R, H), 0.5)
    assert mask.tolist() == [[True, False]]


def test_topk_and_threshold_counts() -> None:
    s = torch.arange(100.0).view(10, 10)
    m = topk_mask(s, 0.05)
    assert int(m.sum()) == 5 and bool(m.flatten()[95:].all())
    assert int(topk_mask(s, 0.0).sum()) == 0
    assert int(threshold_mask(s, 89.5).sum()) == 10


def test_global_threshold_keeps_global_top_fraction() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(8, 8, generator=g), 10 * torch.rand(4, 16, generator=g)
    t = global_threshold([a, b], 0.1)
    kept = int((a >= t).sum() + (b >= t).sum())
    assert kept == round(0.1 * 128)
    ref = torch.cat([a.flatten(), b.flatten()]).sort(descending=True).values[kept - 1]
    assert t == pytest.approx(float(ref))


def _row_optimum(Hd: np.ndarray, e: np.ndarray, S: np.ndarray) -> np.ndarray:
    """argmin over d (zero off S) of (e - d)^T Hd (e - d), as the least-squares problem ||U(e - d)||^2, Hd = U^T U."""
    U = scipy.linalg.cholesky(Hd, lower=False)
    return np.linalg.lstsq(U[:, S], U @ e, rcond=None)[0]


def _row_loss(Hd: np.ndarray, e: np.ndarray, d: np.ndarray) -> float:
    r = e - d
    return float(r @ Hd @ r)


def _check_against_rows(E: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, damp: float,
                        rtol: float = 1e-7) -> torch.Tensor:
    D = optimal_values(E, H, mask, damp=damp)
    assert D.dtype == E.dtype and torch.all(D[~mask] == 0)
    Hd, En, Dn = _damped(H, damp), E.double().numpy(), D.double().numpy()
    for i in range(E.shape[0]):
        S = np.flatnonzero(mask[i].numpy())
        if S.size == 0:
            continue
        ref = _row_optimum(Hd, En[i], S)
        np.testing.assert_allclose(Dn[i, S], ref, rtol=rtol, atol=rtol * np.abs(ref).max())
        raw = np.where(mask[i].numpy(), En[i], 0.0)
        assert _row_loss(Hd, En[i], Dn[i]) <= _row_loss(Hd, En[i], raw) + 1e-12  # beats the raw residual
    return D


def test_optimal_values_minimise_the_h_weighted_error_on_the_support() -> None:
    n = 12
    H = _spd(n, 5).double()
    g = torch.Generator().manual_seed(6)
    E = torch.randn(4, n, generator=g, dtype=torch.float64)
    mask = torch.rand(4, n, generator=g) < 0.3
    mask[2] = False  # an empty row stays zero
    _check_against_rows(E, H, mask, 0.01)


def test_optimal_values_on_a_skewed_support_with_two_threads() -> None:
    """One row holds 600 entries, the others 0-2 (the SmolLM2 crash: batched LU on 2 threads, ~150+ unknowns)."""
    d_out, d_in = 120, 640
    g = torch.Generator().manual_seed(11)
    X = torch.randn(2 * d_in, d_in, generator=g, dtype=torch.float64) @ (
        torch.eye(d_in, dtype=torch.float64) + 0.1 * torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    H = 2 * X.T @ X / X.shape[0]
    E = 0.01 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    mask = torch.zeros(d_out, d_in, dtype=torch.bool)
    mask[0, torch.randperm(d_in, generator=g)[:600]] = True
    mask[3, torch.randperm(d_in, generator=g)[:300]] = True  # a second large row of another size
    for i in range(5, d_out):
        mask[i, torch.randperm(d_in, generator=g)[: i % 3]] = True
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        D = _check_against_rows(E.float(), H.float(), mask, 0.01, rtol=1e-4)
    finally:
        torch.set_num_threads(threads)
    assert int((D != 0).sum()) == int(mask.sum())


def test_optimal_values_use_the_documented_damping() -> None:
    """damp * mean(diag H) on the diagonal, dead inputs set to 1 first: an ill-conditioned H makes damping visible."""
    n = 10
    g = torch.Generator().manual_seed(8)
    X = torch.randn(6, n, generator=g, dtype=torch.float64)  # rank 6 < n: H singular without damping
    H = 2 * X.T @ X / X.shape[0]
    H[:, 9] = H[9, :] = 0.0  # a dead input
    E = torch.randn(3, n, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, n, dtype=torch.bool)
    mask[0, :8], mask[1, [1, 9]], mask[2, 4] = True, True, True
    for damp in (0.01, 0.1):
        _check_against_rows(E, H, mask, damp)
    strong, weak = optimal_values(E, H, mask, damp=0.1), optimal_values(E, H, mask, damp=0.01)
    assert float((strong - weak).abs().max()) > 1e-3  # the damping really reaches the solve
    # the damping is relative to mean(diag H) taken after dead inputs are set to 1
    wrong = _damped(H, 0.0) + 0.01 * float(torch.diagonal(H).mean()) * np.eye(n)
    S = np.flatnonzero(mask[0].numpy())
    assert not np.allclose(_row_optimum(wrong, E[0].numpy(), S), weak[0, S].numpy(), rtol=1e-9, atol=0)


def test_optimal_values_refuse_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        optimal_values(torch.zeros(2, 3), torch.eye(3), torch.zeros(3, 2, dtype=torch.bool))
