"""Calibration capture plans: the fast pre-norm walk must compute exactly what hooked block forwards do."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import libortho
from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
from libortho.curvature import capture
from libortho.curvature.capture import (
    CalibrationFlow,
    GenericPlan,
    PhaseTimer,
    PreNormGatedPlan,
    block_plan,
    hooked_stages,
    stage_hessian,
)
from libortho.models.layers import block_linears, decoder_blocks

CFG = DecomposeConfig(quant=QuantConfig(method="gptq", bits=4, group_size=32),
                      select=SelectConfig(selector="obs", rho=0.02), batch_size=2)


def _ids(n: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 259, (n, t), generator=torch.Generator().manual_seed(seed))


def _reference_inputs(block: nn.Module, names: list[str], flow: CalibrationFlow) -> list[torch.Tensor]:
    """The textbook way: a full block forward per batch with a hook on the stage's first linear."""
    seen: list[torch.Tensor] = []
    lin = dict(block.named_modules())[names[0]]
    h = lin.register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
    try:
        for hs, kw in zip(flow.hidden, flow.kws, strict=True):
            capture.block_out(block, hs, kw)
    finally:
        h.remove()
    return seen


def _perturb(block: nn.Module, names: list[str]) -> None:
    """Stand-in for quantization: change the stage's weights, so later stages must see the change."""
    mods = dict(block.named_modules())
    for n in names:
        w = mods[n].weight
        w.add_(0.05 * torch.randn_like(w))


@torch.no_grad()
@pytest.mark.parametrize("kind", ["prenorm", "generic"])
def test_plan_stage_inputs_match_hooked_block_forwards(tiny_llama, kind) -> None:
    """Each stage's input, after the earlier stages changed, equals a fresh hooked forward's, to the bit;
    the advanced flow equals the block's output. Fails if a walk reuses a stale intermediate (computed
    before an earlier stage changed), skips a residual, or stops the forward at the wrong linear."""
    model = tiny_llama.eval()
    flow = CalibrationFlow.capture(model, _ids(4, 16, seed=1), batch_size=2)
    block = decoder_blocks(model)[0]
    linears = block_linears(block)
    plan = (PreNormGatedPlan.recognise(block, linears, flow.hidden[0], flow.kws[0]) if kind == "prenorm"
            else GenericPlan(block, linears, hooked_stages(block, linears, flow.hidden[0], flow.kws[0])))
    assert plan is not None and plan.stages == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    reference = CalibrationFlow([h.clone() for h in flow.hidden], flow.kws)
    walk = plan.walk(flow)
    torch.manual_seed(0)
    for i, stage in enumerate(plan.stages):
        got = [x.clone() for x in walk.stage_inputs(i)]
        want = _reference_inputs(block, stage, reference)
        assert len(got) == len(want) == 2
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w), (kind, stage)
        _perturb(block, stage)
    walk.finish()
    for out, hs, kw in zip(flow.hidden, reference.hidden, reference.kws, strict=True):
        assert torch.equal(out, capture.block_out(block, hs, kw))


@torch.no_grad()
def test_skipped_linears_still_flow_through(tiny_llama) -> None:
    """With q/k/v and gate/up skipped, the plan keeps two stages and still advances exactly."""
    model = tiny_llama.eval()
    flow = CalibrationFlow.capture(model, _ids(2, 16, seed=2), batch_size=2)
    block = decoder_blocks(model)[1]
    linears = {n: m for n, m in block_linears(block).items() if n in ("self_attn.o_proj", "mlp.down_proj")}
    plan = block_plan(block, linears, flow)
    assert isinstance(plan, PreNormGatedPlan) and plan.stages == [["self_attn.o_proj"], ["mlp.down_proj"]]
    want = capture.block_out(block, flow.hidden[0], flow.kws[0])
    walk = plan.walk(flow)
    d = [stage_hessian(walk.stage_inputs(i), 64 if i == 0 else 160, PhaseTimer()) for i in range(2)]
    assert d[0].shape == (64, 64) and d[1].shape == (160, 160)
    walk.finish()
    assert torch.equal(flow.hidden[0], want)


@torch.no_grad()
def test_unknown_or_hooked_blocks_fall_back_to_the_generic_plan(tiny_llama) -> None:
    """A forward hook on the MLP (as memory neurons add) changes what the block computes: not recognised."""
    model = tiny_llama.eval()
    flow = CalibrationFlow.capture(model, _ids(2, 8, seed=3), batch_size=2)
    block = decoder_blocks(model)[0]
    handle = block.mlp.register_forward_hook(lambda _m, _a, out: out * 2)
    try:
        assert isinstance(block_plan(block, block_linears(block), flow), GenericPlan)
    finally:
        handle.remove()
    assert isinstance(block_plan(block, block_linears(block), flow), PreNormGatedPlan)


@pytest.mark.parametrize("calib_dtype", ["bf16", "fp32"])
def test_decompose_is_the_same_with_either_plan(tiny_llama, monkeypatch, calib_dtype) -> None:
    """Whole decomposition through the fast plan vs the generic one: identical base and ortho streams
    (in bf16 too, where OrthoLinear must follow autocast as nn.Linear does)."""
    calib = _ids(4, 32, seed=4)
    cfg = dataclasses.replace(CFG, calib_dtype=calib_dtype)
    fast = libortho.decompose(copy.deepcopy(tiny_llama), calib, cfg, progress=False)
    assert fast.stats["block_plans"] == ["prenorm-gated"]
    monkeypatch.setattr(PreNormGatedPlan, "recognise", classmethod(lambda *a, **k: None))
    slow = libortho.decompose(copy.deepcopy(tiny_llama), calib, cfg, progress=False)
    assert slow.stats["block_plans"] == ["generic"]
    assert fast.base.keys() == slow.base.keys()
    for name in fast.base:
        assert torch.equal(fast.base[name].packed, slow.base[name].packed), name
        assert torch.equal(fast.base[name].scales, slow.base[name].scales), name
        assert torch.equal(fast.ortho[name].to_dense(), slow.ortho[name].to_dense()), name


@pytest.mark.parametrize("act_order", [False, True])
def test_stacked_gptq_equals_layer_by_layer(act_order) -> None:
    """Linears reading one input share H: GPTQ of the stacked matrix, split by rows, is the separate
    runs bit for bit (codes, scales, zeros, per-layer loss). Fails if a row's result depended on the
    other rows (a shared scale, a cross-row update) or if split_rows cut at the wrong offsets."""
    from libortho.quant import quantize

    g = torch.Generator().manual_seed(5)
    X = torch.randn(512, 96, generator=g) * torch.rand(96, generator=g)
    H = 2 * X.T @ X / 512
    Ws = [torch.randn(n, 96, generator=g) * 0.1 for n in (64, 32, 48)]
    cfg = QuantConfig(method="gptq", bits=4, group_size=32, act_order=act_order)
    joint = quantize(torch.cat(Ws), cfg, H).split_rows([64, 32, 48])
    for W, part in zip(Ws, joint, strict=True):
        alone = quantize(W, cfg, H)
        assert torch.equal(part.codes, alone.codes)
        assert torch.equal(part.scales, alone.scales) and torch.equal(part.zeros, alone.zeros)
        assert part.info["loss"] == pytest.approx(alone.info["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="partition"):
        quantize(torch.cat(Ws), cfg, H).split_rows([64, 32])
