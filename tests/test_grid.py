"""Group-wise grids and RTN: error bounds, partial groups, symmetric grids, fp16-exact params."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from libortho.config import QuantConfig
from libortho.curvature import HessianAccumulator, accumulate_hessian
from libortho.quant import fit_group_params, rtn_quantize
from libortho.streams import expand_groups


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), d_out=st.integers(1, 5), d_in=st.integers(1, 40),
       gs=st.integers(1, 48), seed=st.integers(0, 2**16), sym=st.booleans())
def test_rtn_error_bound_and_code_range(bits, d_out, d_in, gs, seed, sym) -> None:
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))
    res = rtn_quantize(W, QuantConfig(bits=bits, group_size=gs, symmetric=sym))
    assert int(res.codes.max()) <= 2**bits - 1
    assert res.scales.shape == (d_out, -(-d_in // gs))
    s = expand_groups(res.scales, d_in, gs)
    err = (res.dequantize() - W).abs()
    if not sym:  # min-max asymmetric: every entry is in range, so half a step at most
        assert bool((err <= s / 2 + 1e-6 + 1e-3 * W.abs()).all())
    else:  # symmetric clips only the positive extreme by at most one step
        assert bool((err <= s + 1e-6 + 1e-3 * W.abs()).all())
    assert torch.equal(res.scales, res.scales.half().float()) and torch.equal(res.zeros, res.zeros.half().float())
    assert torch.equal(res.dequantize(), res.to_stream().dequantize())


def test_constant_and_zero_groups_give_no_nan() -> None:
    W = torch.zeros(3, 10)
    W[1] = 0.7
    res = rtn_quantize(W, QuantConfig(bits=4, group_size=4))
    assert torch.isfinite(res.dequantize()).all()
    torch.testing.assert_close(res.dequantize(), W, atol=1e-3, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_and_hqq_grids_never_worse_than_minmax(bits) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 64, generator=g) * torch.rand(64, 1, generator=g)
    w[:, 0] *= 8  # outliers make clipping worthwhile
    def sq(method: str) -> torch.Tensor:
        s, z = fit_group_params(w, bits, method=method)
        q = torch.clamp(torch.round(w / s[:, None] + z[:, None]), 0, 2**bits - 1)
        return ((q - z[:, None]) * s[:, None] - w).square().sum(1)
    base = sq("minmax")
    for m in ("mse", "hqq"):
        e = sq(m)
        assert bool((e <= base + 1e-7).all())
    assert float(sq("mse").sum()) < float(base.sum())


def test_unknown_grid_and_symmetric_hqq_are_refused() -> None:
    with pytest.raises(ValueError, match="grid"):
        fit_group_params(torch.ones(2, 2), 4, method="magic")
    with pytest.raises(ValueError, match="symmetric"):
        fit_group_params(torch.ones(2, 2), 4, symmetric=True, method="hqq")


def test_hessian_accumulation_is_batching_invariant_and_mergeable() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 50, 7, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(7, dtype=torch.float64)
    for b in X:
        acc.add_batch(b)
    flat = X.reshape(-1, 7)
    torch.testing.assert_close(acc.H, 2 * flat.T @ flat / flat.shape[0])
    a, b = HessianAccumulator(7, torch.float64), HessianAccumulator(7, torch.float64)
    a.add_batch(flat[:30])
    b.add_batch(flat[30:])
    torch.testing.assert_close(a.merge(b).H, acc.H)
    assert a.n == 150
    H, n = accumulate_hessian(torch.zeros(7, 7, dtype=torch.float64), 0, flat[:0])
    assert n == 0 and not H.any()
    with pytest.raises(ValueError, match="features"):
        acc.add_batch(torch.ones(2, 5))
