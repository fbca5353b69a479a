"""GPTQ as Babai's nearest plane: the explicit lattice algorithm against GPTQ, the bound, the orders.

The references here are written out independently: a classical Gram-Schmidt by projections, a
nearest-plane loop over it, and pivots from explicit inverses of Hessian sub-blocks.
"""

import itertools

import numpy as np
import pytest
import torch

from libortho.config import QuantConfig
from libortho.curvature.damping import damped
from libortho.quant.babai import babai_quantize, gram_schmidt_sq, nearest_plane
from libortho.quant.gptq import gptq_quantize
from libortho.quant.order import column_order, min_pivot_order


def _hessian(d: int, seed: int, n: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 + torch.eye(d, dtype=torch.float64)
    spread = 0.2 + torch.rand(d, generator=g, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix * spread
    return 2 * X.T @ X / n


def _reference_nearest_plane(B: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Textbook Babai: classical Gram-Schmidt by projections, then the last vector first."""
    n = B.shape[0]
    Bs = np.zeros_like(B)
    for i in range(n):
        Bs[i] = B[i] - sum((B[i] @ Bs[j]) / (Bs[j] @ Bs[j]) * Bs[j] for j in range(i))
    c, r = np.zeros(n), t.copy()
    for k in reversed(range(n)):
        c[k] = np.round((r @ Bs[k]) / (Bs[k] @ Bs[k]))
        r = r - c[k] * B[k]
    return c


def test_nearest_plane_equals_textbook_babai_on_random_bases() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8):
        B = rng.normal(size=(n, n)) + 2 * np.eye(n)
        T = rng.normal(size=(7, n)) * 5
        got = nearest_plane(torch.from_numpy(B), torch.from_numpy(T)).numpy()
        want = np.stack([_reference_nearest_plane(B, t) for t in T])
        np.testing.assert_array_equal(got, want)
        gs = np.array([np.linalg.norm(B[i] - B[:i].T @ np.linalg.lstsq(B[:i].T, B[i], rcond=None)[0]) ** 2
                       if i else B[0] @ B[0] for i in range(n)])
        np.testing.assert_allclose(gram_schmidt_sq(torch.from_numpy(B)).numpy(), gs, rtol=1e-9)


def test_nearest_plane_on_an_orthogonal_basis_is_rounding() -> None:
    B = torch.diag(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    T = torch.tensor([[0.4, 2.9, -0.3], [1.6, -1.1, 0.8]], dtype=torch.float64)
    torch.testing.assert_close(nearest_plane(B, T), torch.round(T / torch.diagonal(B)))


def _unclippable_layer(d_out: int, d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W whose row ranges are set by two columns with no Hessian coupling (no error ever reaches them),
    the rest well inside the range, so 8-bit GPTQ never clips: the no-clipping regime of the theorem."""
    g = torch.Generator().manual_seed(seed)
    H = torch.zeros(d_in, d_in, dtype=torch.float64)
    H[:2, :2] = torch.eye(2, dtype=torch.float64)
    H[2:, 2:] = _hessian(d_in - 2, seed)
    W = 0.5 * (2 * torch.rand(d_out, d_in, generator=g, dtype=torch.float64) - 1)
    W[:, 0], W[:, 1] = 1.0, -1.0
    return W, H


@pytest.mark.parametrize("act_order,min_pivot", [(False, False), (True, False), (False, True)])
def test_babai_equals_gptq_without_clipping_or_groups(act_order: bool, min_pivot: bool) -> None:
    d_out, d_in = 12, 40
    W, H = _unclippable_layer(d_out, d_in, seed=3)
    cfg = QuantConfig(bits=8, group_size=d_in, grid="minmax", act_order=act_order, min_pivot=min_pivot)
    g = gptq_quantize(W, cfg, H)
    b = babai_quantize(W, H, cfg, clip=False)
    assert g.info["clipped"] == 0 and b.clipped == 0
    rel = float((g.dequantize().double() - b.Q).norm() / b.Q.norm())
    assert rel <= 1e-6, rel
    torch.testing.assert_close(b.row_error.sum(), torch.tensor(2 * g.info["loss"], dtype=torch.float64), rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(b.row_bound.sum(), torch.tensor(g.info["babai_bound"], dtype=torch.float64), rtol=1e-9,
                               atol=0)
    assert bool((b.row_error <= b.row_bound).all())


@pytest.mark.parametrize("order", ["natural", "act", "min_pivot"])
def test_box_constrained_babai_equals_gptq_with_clipping(order: str) -> None:
    g_ = torch.Generator().manual_seed(5)
    H = _hessian(30, seed=5)
    W = torch.randn(10, 30, generator=g_, dtype=torch.float64)
    cfg = QuantConfig(bits=3, group_size=10 if order != "natural" else 30, grid="minmax",
                      act_order=order == "act", min_pivot=order == "min_pivot")
    g = gptq_quantize(W, cfg, H)
    b = babai_quantize(W, H, cfg, clip=True)
    assert g.info["clipped"] > 0 and b.clipped == g.info["clipped"]  # the clipped regime, counted alike
    assert float((g.dequantize().double() - b.Q).norm() / b.Q.norm()) <= 1e-6


def test_unclipped_error_never_exceeds_the_bound_but_clipping_can() -> None:
    H = _hessian(24, seed=9)
    W = torch.randn(40, 24, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    cfg = QuantConfig(bits=2, group_size=24, grid="minmax", act_order=False)
    free = babai_quantize(W, H, cfg, clip=False)
    assert free.clipped > 0 and bool((free.row_error <= free.row_bound * (1 + 1e-12)).all())
    # two strongly coupled inputs: the first column's rounding error, pushed onto the second, sends it past
    # the grid's end; clipped there, that row's error exceeds its bound
    H2 = torch.tensor([[1.0, 0.98], [0.98, 1.0]], dtype=torch.float64)
    W2 = torch.rand(2000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    boxed = babai_quantize(W2, H2, QuantConfig(bits=2, group_size=2, grid="minmax", act_order=False), clip=True)
    assert boxed.clipped > 0 and bool((boxed.row_error > boxed.row_bound).any())  # with the box the guarantee is gone


def test_gptq_reports_the_bound_it_keeps_per_layer() -> None:
    W, H = _unclippable_layer(8, 20, seed=1)
    cfg = QuantConfig(bits=8, group_size=20, grid="minmax", act_order=True)
    info = gptq_quantize(W, cfg, H).info
    assert info["clipped"] == 0 and info["order"] == "act"
    assert 0 < 2 * info["loss"] <= info["babai_bound"]


def _pivot(H: np.ndarray, j: int, rest: list[int]) -> float:
    """Pivot of column j processed before the columns ``rest``: 1 / [(H_S)^-1]_jj, S = {j} + rest."""
    S = [j, *rest]
    return 1.0 / np.linalg.inv(H[np.ix_(S, S)])[0, 0]


def test_min_pivot_order_is_the_greedy_smallest_pivot_from_the_back() -> None:
    H = damped(_hessian(9, seed=2), 0.01).numpy()
    order, pivots = min_pivot_order(torch.from_numpy(H))
    order = order.tolist()
    assert sorted(order) == list(range(9))
    for k in range(9):
        rest = order[k + 1:]
        assert pivots[k].item() == pytest.approx(_pivot(H, order[k], rest), rel=1e-9)
        for j in order[:k]:  # every column still free at that step would have had a pivot at least as large
            assert _pivot(H, j, rest) >= pivots[k].item() * (1 - 1e-12)
    # the product of the pivots is det H whatever the order
    assert float(np.sum(np.log(pivots.numpy()))) == pytest.approx(float(np.linalg.slogdet(H)[1]), rel=1e-9)


def test_min_pivot_bound_is_no_larger_than_other_orders_on_small_layers() -> None:
    """On tiny layers the greedy order is checked against every order: it need not be optimal, but it
    must beat the natural and act orders' pivot sums more often than not (the reason it exists)."""
    wins = 0
    for seed in range(12):
        H = damped(_hessian(6, seed=seed), 0.01).numpy()
        total = {name: sum(_pivot(H, o[k], list(o[k + 1:])) for k in range(6))
                 for name, o in (("natural", list(range(6))), ("act", list(np.argsort(-np.diag(H), kind="stable"))),
                                 ("min", min_pivot_order(torch.from_numpy(H))[0].tolist()))}
        best = min(sum(_pivot(H, p[k], list(p[k + 1:])) for k in range(6)) for p in itertools.permutations(range(6)))
        assert total["min"] >= best * (1 - 1e-12)
        wins += total["min"] <= min(total["natural"], total["act"]) * (1 + 1e-12)
    assert wins >= 8, wins


def test_orders_and_config_refusals() -> None:
    H = _hessian(5, seed=0)
    assert column_order(H, "natural", 0.01).tolist() == [0, 1, 2, 3, 4]
    assert column_order(H, "act", 0.01).tolist() == torch.argsort(torch.diagonal(H), descending=True).tolist()
    with pytest.raises(ValueError, match="unknown column order"):
        column_order(H, "random", 0.01)
    with pytest.raises(ValueError, match="min_pivot=True needs act_order=False"):
        QuantConfig(act_order=True, min_pivot=True)
    assert QuantConfig(act_order=False, min_pivot=True).order == "min_pivot"
    with pytest.raises(ValueError, match="do not match"):
        nearest_plane(torch.eye(3, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64))
