"""Selectors and support choice against slow, obviously-correct references."""

import pytest
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
from libortho.select.scores import damped_hessian


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=g) @ torch.randn(n, n, generator=g)
    return 2 * X.T @ X / X.shape[0]


def test_registry_has_the_three_named_selectors() -> None:
    assert {"magnitude", "obs", "diag"} <= set(SELECTORS)
    with pytest.raises(ValueError, match="unknown selector"):
        impact_scores("nope", torch.zeros(2, 2), None)


def test_scores_match_hand_formulas() -> None:
    H = _spd(6, 0)
    R = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    Hinv = torch.linalg.inv(damped_hessian(H)).float()
    torch.testing.assert_close(impact_scores("magnitude", R, None), R**2)
    torch.testing.assert_close(impact_scores("diag", R, H), R**2 * torch.diagonal(H)[None])
    torch.testing.assert_close(impact_scores("obs", R, H), R**2 / torch.diagonal(Hinv)[None], rtol=1e-4, atol=0)
    torch.testing.assert_close(inverse_hessian_diag(H), torch.diagonal(Hinv), rtol=1e-4, atol=0)


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


def test_optimal_values_minimise_the_h_weighted_error_on_the_support() -> None:
    n = 12
    H = _spd(n, 5).double()
    g = torch.Generator().manual_seed(6)
    E = torch.randn(4, n, generator=g, dtype=torch.float64)
    mask = torch.rand(4, n, generator=g) < 0.3
    mask[2] = False  # an empty row stays zero
    D = optimal_values(E, H, mask, damp=0.01)
    Hd = damped_hessian(H, 0.01)
    assert torch.all(D[~mask] == 0)
    for i in range(4):
        S = torch.nonzero(mask[i]).flatten()
        if S.numel() == 0:
            continue
        ref = torch.linalg.lstsq(Hd[S][:, S], (Hd @ E[i])[S]).solution  # normal equations
        torch.testing.assert_close(D[i, S], ref, rtol=1e-8, atol=1e-10)
        # and it beats storing the raw residual on the same support
        def loss(d: torch.Tensor, row: int = i) -> float:
            e = E[row] - d
            return float(e @ Hd @ e)
        raw = torch.where(mask[i], E[i], torch.zeros_like(E[i]))
        assert loss(D[i]) <= loss(raw) + 1e-12
