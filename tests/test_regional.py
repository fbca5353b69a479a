"""Geometry-aware randomised GPTQ (quant/regional.py) against our GPTQ and slow references."""

from __future__ import annotations

import pytest
import torch

from libortho.config import QuantConfig
from libortho.quant.gptq import gptq_quantize
from libortho.quant.regional import (
    SENSITIVITY,
    LayerView,
    RegionPlan,
    functional_score,
    plan_regions,
    region_scores,
    regional_gptq,
)

CFG = QuantConfig(bits=4, group_size=8, grid="minmax", act_order=False, block_size=8)


def _layer(d_out: int = 12, d_in: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    X = torch.randn(4 * d_in, d_in, generator=gen, dtype=torch.float64) @ torch.randn(d_in, d_in, generator=gen,
                                                                                      dtype=torch.float64)
    return W, X.T @ X / X.shape[0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_plan_without_noise_is_gptq(bits: int) -> None:
    W, H = _layer()
    cfg = QuantConfig(bits=bits, group_size=8, grid="minmax", act_order=False, block_size=8)
    ref = gptq_quantize(W, cfg, H)
    out, info = regional_gptq(W, H, RegionPlan.uniform(12, 4, bits), cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(out.double(), ref.dequantize().double(), rtol=0, atol=1e-6)
    assert info["loss"] == pytest.approx(ref.info["loss"], rel=1e-6)
    assert info["clipped"] == ref.info["clipped"]
    assert info["width_bits"] == 0.0 and info["mean_code_bits"] == bits


def test_rows_at_different_widths_equal_gptq_at_each_width() -> None:
    """GPTQ treats rows independently (one H): a plan whose rows differ in width equals per-width GPTQ runs."""
    W, H = _layer()
    bits = torch.tensor([3, 8] * 6)[:, None].expand(12, 4).contiguous()
    out, _ = regional_gptq(W, H, RegionPlan(bits, torch.zeros(12, 4)), CFG, torch.Generator())
    for b in (3, 8):
        rows = bits[:, 0] == b
        ref = gptq_quantize(W, QuantConfig(bits=b, group_size=8, grid="minmax", act_order=False, block_size=8), H)
        assert torch.allclose(out[rows].double(), ref.dequantize().double()[rows], atol=1e-6)


def test_each_region_uses_at_most_its_widths_levels() -> None:
    W, H = _layer(d_in=64)
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(2, 6, (12, 8), generator=gen)
    out, _ = regional_gptq(W, H, RegionPlan(bits, torch.full((12, 8), 1.5)), CFG, gen)
    for r in range(12):
        for k in range(8):
            vals = torch.unique(out[r, 8 * k:8 * k + 8])
            assert vals.numel() <= 2 ** int(bits[r, k])


def test_stochastic_rounding_is_unbiased_without_feedback() -> None:
    """With H = I there is no error feedback: noise 1 is stochastic rounding, E[Q] = W inside the grid."""
    W, _ = _layer(d_out=4, d_in=16)
    H = torch.eye(16, dtype=torch.float64)
    cfg = QuantConfig(bits=3, group_size=16, grid="minmax", act_order=False, block_size=16)
    nearest, _ = regional_gptq(W, H, RegionPlan.uniform(4, 1, 3, 0.0), cfg, torch.Generator())
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([regional_gptq(W, H, RegionPlan.uniform(4, 1, 3, 1.0), cfg, gen)[0] for _ in range(1500)])
    step = ((W.amax(1) - W.amin(1).clamp(max=0)) / 7)[:, None]
    inside = ((W - W.amin(1, keepdim=True)) > step) & ((W.amax(1, keepdim=True) - W) > step)  # no clipping there
    assert inside.sum() > 30
    bias = (draws.mean(0).double() - W).abs() / step
    assert bias[inside].max() < 0.06  # 1500 draws: standard error <= 0.013 steps
    assert ((nearest.double() - W).abs() / step)[inside].max() <= 0.5 + 1e-6
    assert (draws.std(0) > 0).float().mean() > 0.9  # the draws differ: rounding is random


def test_noise_is_seeded_and_confined_to_noisy_regions() -> None:
    W, H = _layer()
    noise = torch.zeros(12, 4)
    noise[:, 3] = 2.0  # only the last group: the columns before it are quantized exactly as without noise
    plan = RegionPlan(torch.full((12, 4), 4), noise)
    a, info = regional_gptq(W, H, plan, CFG, torch.Generator().manual_seed(5))
    b, _ = regional_gptq(W, H, plan, CFG, torch.Generator().manual_seed(5))
    c, _ = regional_gptq(W, H, plan, CFG, torch.Generator().manual_seed(6))
    clean, _ = regional_gptq(W, H, RegionPlan.uniform(12, 4, 4), CFG, torch.Generator())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :24], clean[:, :24]) and not torch.equal(a[:, 24:], clean[:, 24:])
    assert info["dithered_regions"] == 12


def test_plan_regions_picks_sensitive_first_then_functional() -> None:
    gen = torch.Generator().manual_seed(0)
    func, sens = torch.rand(16, 10, generator=gen), torch.rand(16, 10, generator=gen)
    plan = plan_regions(func, sens, (3, 4, 5), 0.125, 0.125, 2.0)
    low, high = plan.bits == 3, plan.bits == 5
    assert int(low.sum()) == 20 and int(high.sum()) == 20
    assert plan.mean_code_bits() == pytest.approx(4.0)
    assert sens[low].min() >= sens[~low].max()
    assert func[high].min() >= func[~low & ~high].max()  # the most functional of the regions left
    assert torch.equal(plan.noise > 0, low) and float(plan.noise.max()) == 2.0
    assert plan.width_bits() == pytest.approx(1.5849625, rel=1e-6)


def test_region_scores_match_a_loop() -> None:
    W = torch.randn(5, 20)
    h = torch.rand(20)
    got = region_scores(W, h, 8)
    for r in range(5):
        for k in range(3):
            ref = sum(float(W[r, j]) ** 2 * float(h[j]) for j in range(8 * k, min(8 * k + 8, 20)))
            assert float(got[r, k]) == pytest.approx(ref, rel=1e-6)


def test_sensitivity_scores() -> None:
    W, pre = torch.randn(6, 16), torch.randn(6, 16)
    hp, hq = torch.rand(16), torch.rand(16)
    view = LayerView(W, pre, hp, hq)
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(SENSITIVITY["update"](view, 8, gen), region_scores(W - pre, hq, 8))
    assert torch.allclose(SENSITIVITY["private_curvature"](view, 8, gen), region_scores(W, hq, 8))
    assert torch.allclose(functional_score(view, 8), region_scores(W, hp, 8))
    assert SENSITIVITY["random"](view, 8, gen).shape == (6, 2)
    with pytest.raises(ValueError, match="before fine-tuning"):
        SENSITIVITY["update"](LayerView(W, None, hp, hq), 8, gen)


def test_bad_input_is_refused() -> None:
    W, H = _layer()
    with pytest.raises(ValueError, match="expected"):
        regional_gptq(W, H, RegionPlan.uniform(12, 3, 4), CFG, torch.Generator())
    with pytest.raises(ValueError, match="natural"):
        regional_gptq(W, H, RegionPlan.uniform(12, 4, 4), QuantConfig(group_size=8), torch.Generator())
    with pytest.raises(ValueError, match="widths"):
        RegionPlan.uniform(3, 3, 9)
    with pytest.raises(ValueError, match="noise"):
        RegionPlan.uniform(3, 3, 4, -1.0)
    with pytest.raises(ValueError, match="fractions"):
        plan_regions(torch.rand(2, 2), torch.rand(2, 2), (3, 4, 5), 0.6, 0.6, 1.0)
    with pytest.raises(KeyError, match="registered"):
        SENSITIVITY["curvature"]
