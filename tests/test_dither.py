"""Randomised rounding: RTN at zero noise, unbiased at one step, variance growing with the knob."""

import pytest
import torch

from libortho.config import QuantConfig
from libortho.quant.dither import dithered_quantize
from libortho.quant.rtn import rtn_quantize

CFG = QuantConfig(bits=3, group_size=8, grid="minmax", method="rtn")


def _w() -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(0))


def test_zero_noise_is_round_to_nearest() -> None:
    W = _w()
    a = dithered_quantize(W, CFG, 0.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.codes, rtn_quantize(W, CFG).codes, rtol=0, atol=0)


def test_stochastic_rounding_is_unbiased_inside_the_grid() -> None:
    W = _w()
    Q = torch.stack([dithered_quantize(W, CFG, 1.0, torch.Generator().manual_seed(k)).dequantize()
                     for k in range(4000)])
    ref = rtn_quantize(W, CFG)
    step = ref.scales.repeat_interleave(8, 1)
    x = W / step + ref.zeros.repeat_interleave(8, 1)
    inside = (x >= 0.5) & (x <= 7 - 0.5)  # at the ends the clamp cuts the dither: biased there, by design
    assert int(inside.sum()) > 60
    # the mean is within five standard errors (at most half a step / sqrt(n)) of W, entry by entry
    bias = (Q.mean(0) - W).abs()
    assert bool((bias[inside] <= 5 * 0.5 * step[inside] / 4000**0.5).all())
    rtn_err = (ref.dequantize() - W).abs()
    assert float(bias[inside].mean()) < 0.2 * float(rtn_err[inside].mean())  # RTN's bias is gone


def test_error_grows_with_the_noise_knob_and_codes_stay_in_range() -> None:
    W = _w()
    errs = []
    for noise in (0.0, 1.0, 3.0):
        r = dithered_quantize(W, CFG, noise, torch.Generator().manual_seed(2))
        assert int(r.codes.max()) <= 7
        errs.append(float(((r.dequantize() - W) ** 2).mean()))
    assert errs[0] < errs[1] < errs[2]
    a = dithered_quantize(W, CFG, 1.0, torch.Generator().manual_seed(3)).codes
    b = dithered_quantize(W, CFG, 1.0, torch.Generator().manual_seed(3)).codes
    assert torch.equal(a, b)  # the generator is the only source of randomness
    with pytest.raises(ValueError, match="noise must be >= 0"):
        dithered_quantize(W, CFG, float("nan"), torch.Generator())
