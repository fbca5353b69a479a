"""GPTQ against the slow reference, against RTN on the proxy loss, and on awkward inputs."""

import pytest
import torch

from libortho.config import QuantConfig
from libortho.curvature import HessianAccumulator
from libortho.quant import gptq_quantize, quantize, rtn_quantize
from reference_gptq import reference_gptq


def _layer(d_out: int, d_in: int, n: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=dtype) / d_in**0.5 + torch.eye(d_in, dtype=dtype)
    X = torch.randn(n, d_in, generator=g, dtype=dtype) @ mix  # correlated inputs
    W = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    acc = HessianAccumulator(d_in, dtype=dtype)
    acc.add_batch(X)
    return W, X, acc.H


@pytest.mark.parametrize("d_out,d_in,gs,block,act_order,bits,sym", [
    (6, 24, 8, 8, False, 4, False), (5, 30, 7, 12, False, 3, False), (4, 16, 16, 5, True, 4, False),
    (3, 20, 6, 8, True, 2, False), (4, 18, 32, 4, False, 8, False), (5, 24, 8, 6, False, 4, True),
    (4, 20, 5, 7, True, 3, True),
])
def test_gptq_equals_slow_reference(d_out, d_in, gs, block, act_order, bits, sym) -> None:
    W, X, H = _layer(d_out, d_in, 64, seed=d_in + gs)
    if act_order:  # a dead input too: zero weight, H_jj = 1
        X[:, 3] = 0.0
        acc = HessianAccumulator(d_in, dtype=X.dtype)
        acc.add_batch(X)
        H = acc.H
    cfg = QuantConfig(bits=bits, group_size=gs, block_size=block, act_order=act_order, symmetric=sym)
    res = gptq_quantize(W, cfg, H)
    ref = reference_gptq(W, H, cfg, res.info["damp"])
    torch.testing.assert_close(res.dequantize().double(), ref, rtol=0, atol=1e-5)


def test_gptq_beats_rtn_on_proxy_loss_every_trial() -> None:
    for trial in range(10):
        W, X, H = _layer(32, 64, 256, seed=100 + trial, dtype=torch.float32)
        cfg = QuantConfig(bits=4, group_size=16, block_size=32)
        def proxy(Q: torch.Tensor, X: torch.Tensor = X, W: torch.Tensor = W) -> float:
            return float((X @ (W - Q).T).square().sum())
        assert proxy(gptq_quantize(W, cfg, H).dequantize()) < proxy(rtn_quantize(W, cfg).dequantize())


def test_per_column_losses_and_act_order_static_groups() -> None:
    W, _, H = _layer(8, 32, 128, seed=7, dtype=torch.float32)
    res = gptq_quantize(W, QuantConfig(group_size=8, act_order=True), H)
    assert res.info["losses"].shape == (32,) and res.info["loss"] == pytest.approx(float(res.info["losses"].sum()))
    assert res.scales.shape == (8, 4)
    # static groups are fit on the original columns: same params as RTN's grid
    torch.testing.assert_close(res.scales, rtn_quantize(W, QuantConfig(group_size=8)).scales)
    torch.testing.assert_close(res.dequantize(), res.to_stream().dequantize(), rtol=0, atol=0)


def test_dead_columns_are_zeroed_without_nan() -> None:
    W, X, _ = _layer(6, 16, 64, seed=3, dtype=torch.float32)
    X[:, 5] = 0.0
    acc = HessianAccumulator(16)
    acc.add_batch(X)
    res = gptq_quantize(W, QuantConfig(group_size=8), acc.H)
    Q = res.dequantize()
    assert torch.isfinite(Q).all() and res.info["dead_columns"] == 1
    assert Q[:, 5].abs().max() <= res.scales[:, 0].max()  # quantized to (nearly) zero


def test_cholesky_failure_raises_damping_and_recovers() -> None:
    W, _, H = _layer(4, 12, 64, seed=5, dtype=torch.float32)
    bad = H.clone()
    bad[0, 0] = -5 * float(torch.diagonal(H).mean())  # indefinite until damping is large
    res = gptq_quantize(W, QuantConfig(group_size=4, damp=0.01), bad)
    assert res.info["damp"] > 0.01 and torch.isfinite(res.dequantize()).all()


def test_bad_inputs_name_the_problem() -> None:
    W, _, H = _layer(4, 8, 32, seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="expected"):
        gptq_quantize(W, QuantConfig(group_size=4), H[:4, :4])
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(W.masked_fill(W > 1, float("nan")), QuantConfig(group_size=4), H)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(W, QuantConfig(group_size=4), H.masked_fill(H > 0.5, float("inf")))
    with pytest.raises(ValueError, match="Hessian"):
        quantize(W, QuantConfig(group_size=4, method="gptq"), None)
