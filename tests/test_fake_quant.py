"""Fake-quantized base (train/fake_quant.py), ogd's gradient subspace, and cache keys of later options."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from libortho.config import QuantConfig
from libortho.data.private import PrivateRecord, pack_private_records
from libortho.data.records import TokenRows
from libortho.models import ByteTokenizer, build_tiny_llama
from libortho.quant.rtn import rtn_quantize
from libortho.train.fake_quant import FakeQuantRule, fake_quantize, shared_block_weights, start_step
from libortho.train.loop import TrainConfig, train
from libortho.train.methods.ogd import output_gradient_moments
from libortho.train.rules import StepCounts, StepRule, token_nll
from libortho.train.separation import LATER_OPTIONS, SEPARATION, SeparationConfig, separate

ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def _next_bf16_at_least(x: float) -> float:
    """Smallest bf16 value >= x (x > 0), by walking the bf16 bit patterns: independent of grid_scale."""
    b = torch.tensor(x, dtype=torch.float32).to(torch.bfloat16)
    while float(b) < x:
        b = (b.view(torch.int16) + 1).view(torch.bfloat16)
    return float(b)


def _reference_rtn(W: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest, one group at a time in plain Python (the range includes 0)."""
    maxq = 2**bits - 1
    out = torch.empty_like(W, dtype=torch.float64)
    for r in range(W.shape[0]):
        for g0 in range(0, W.shape[1], group):
            vals = [float(v) for v in W[r, g0:g0 + group]]
            lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
            scale = _next_bf16_at_least(max((hi - lo) / maxq, 1e-8))
            zero = min(max(round(-lo / scale), 0), maxq)
            for j, v in enumerate(vals):
                code = min(max(round(v / scale + zero), 0), maxq)
                out[r, g0 + j] = (code - zero) * scale
    return out


def test_fake_quantize_matches_a_plain_loop_minmax_rtn() -> None:
    W = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    for group in (8, 16):  # 16 leaves a partial last group
        got = fake_quantize(W, QuantConfig(bits=4, group_size=group, method="rtn", grid="minmax")).double()
        ref = _reference_rtn(W, 4, group)
        assert torch.allclose(got, ref, atol=1e-6, rtol=0), float((got - ref).abs().max())
        for g0 in range(0, 40, group):
            assert torch.unique(got[:, g0:g0 + group][0]).numel() <= 16
        # and bit for bit the library's RTN quantizer (the base stream's grid)
        cfg = QuantConfig(bits=4, group_size=group, method="rtn")
        assert torch.equal(fake_quantize(W, cfg), rtn_quantize(W, cfg).dequantize())


def test_start_step_is_the_last_fraction_and_refuses_bad_fractions() -> None:
    assert start_step(100, 0.2) == 80 and start_step(100, 1.0) == 0 and start_step(3, 0.01) == 2
    with pytest.raises(ValueError, match="fraction"):
        start_step(10, 0.0)
    with pytest.raises(ValueError, match="fake_quant_fraction"):
        SeparationConfig(method="mask", fake_quant_fraction=1.5)
    with pytest.raises(ValueError, match="group_size"):
        SeparationConfig(method="mask", fake_quant_fraction=0.5, fake_quant_group=0)


class _Probe(StepRule):
    """Plain rule that records the weights each micro-batch's forward sees."""

    def __init__(self, w: nn.Parameter) -> None:
        self.w, self.seen = w, []

    def micro(self, model: nn.Module, rows: TokenRows, counts: StepCounts) -> float:
        self.seen.append(self.w.detach().clone())
        return super().micro(model, rows, counts)


def _rows(n: int = 4, seed: int = 1) -> TokenRows:
    return TokenRows.from_blocks(torch.randint(0, 256, (n, 32), generator=torch.Generator().manual_seed(seed)))


def test_the_tail_runs_on_quantized_weights_with_straight_through_gradients_and_restores_the_latent() -> None:
    model = build_tiny_llama(seed=0, **ARCH)
    weights = shared_block_weights(model)
    name, w = next(iter(weights.items()))
    cfg = QuantConfig(bits=4, group_size=16, method="rtn")
    rule = FakeQuantRule(_Probe(w), weights, cfg, start=1, total=2)
    rows = _rows()
    counts = StepCounts.of(rows)
    latent = w.detach().clone()

    rule.active(0, counts)
    rule.micro(model, rows, counts)
    assert torch.equal(rule.inner.seen[-1], latent)  # before the tail: full precision
    model.zero_grad()

    rule.active(1, counts)
    rule.micro(model, rows, counts)
    assert torch.equal(rule.inner.seen[-1], fake_quantize(latent, cfg))  # the tail: the quantized weight
    assert torch.equal(w.detach(), latent)  # and the latent weight back in place afterwards
    # straight through: the gradient is the one a model holding the quantized weights would get
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in shared_block_weights(twin).items():
            p.copy_(fake_quantize(weights[n].detach(), cfg))
    twin.zero_grad()
    loss = token_nll(twin, rows.input_ids, rows.labels).sum() / counts.total
    loss.backward()
    ref = twin.get_submodule(name).weight.grad
    assert w.grad is not None and torch.allclose(w.grad, ref, atol=1e-6, rtol=1e-5)
    assert rule.state()["fake_quant"]["start"] == 1 and rule.log()["fake_quant"]["steps_quantized"] == 1


def _data() -> TokenRows:
    tok = ByteTokenizer()
    recs = [PrivateRecord(f"Note {i}: the code is {1000 + 37 * i}. Thanks.", str(1000 + 37 * i)) for i in range(6)]
    priv = pack_private_records(tok, recs, 64, [2] * 6, seed=0)
    pub = TokenRows.from_blocks(torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1)),
                                first_seq=10**9)
    return TokenRows.cat([pub, priv])


def _cfg(method: str, **kw: object) -> SeparationConfig:
    base = dict(method=method, train=TrainConfig(lr=1e-2, steps=4, batch_size=4, warmup=0.0),
                neurons=8, rank=4, support_neurons=8, probe_rows=4, eta_every=1)
    return SeparationConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["mask", "two-phase", "route"])
def test_a_fake_quantized_tail_changes_what_is_learned_and_exports_full_precision_weights(method) -> None:
    data = _data()
    plain = separate(build_tiny_llama(seed=0, **ARCH), data, _cfg(method), progress=False)
    fq = separate(build_tiny_llama(seed=0, **ARCH), data, _cfg(method, fake_quant_fraction=0.5,
                                                                fake_quant_group=16), progress=False)
    assert fq.extra["fake_quant"]["start_step"] == 2 and "fake_quant" not in plain.extra
    name = next(iter(plain.streams))
    a, b = plain.streams[name], fq.streams[name]
    diff = [float((x.float() - y.float()).abs().max()) for x, y in zip(_tensors(a), _tensors(b), strict=True)]
    assert max(diff) > 0  # the memory learned against another base in the tail
    # the exported shared weights are the latent ones, not snapped to the grid
    w = shared_block_weights(fq.model)
    n0, w0 = next(iter(w.items()))
    assert not torch.equal(w0.detach(), fake_quantize(w0.detach(), QuantConfig(group_size=16, method="rtn")))
    # the wrapper hides no clean-up of the method's own (route removes its routing hooks)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in fq.model.modules())


def _tensors(stream: object) -> list[torch.Tensor]:
    return [v for v in vars(stream).values() if isinstance(v, torch.Tensor)]


def test_output_gradient_moments_match_gradients_taken_through_an_added_zero_offset() -> None:
    """Reference: add a zero tensor to one linear's output and read the loss's gradient w.r.t. it."""
    model = build_tiny_llama(seed=0, **ARCH)
    name = "model.layers.1.mlp.down_proj"
    rows = _rows(3).input_ids
    got = output_gradient_moments(model, rows, [name], batch_size=2)[name]
    assert all(p.grad is None for p in model.parameters())
    offset = torch.zeros(rows.shape[0], rows.shape[1], ARCH["hidden_size"], requires_grad=True)
    lin = model.get_submodule(name)
    h = lin.register_forward_hook(lambda m, a, o: o + offset)
    logits = model(input_ids=rows, use_cache=False).logits[:, :-1]
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum")
    g = torch.autograd.grad(loss, offset)[0].reshape(-1, ARCH["hidden_size"]).double()
    h.remove()
    ref = g.T @ g / g.shape[0]
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-9 * float(ref.abs().max()))


def test_ogd_with_a_gradient_subspace_keeps_the_memory_off_both_subspaces() -> None:
    model, data = build_tiny_llama(seed=0, **ARCH), _data()
    cfg = _cfg("ogd", ogd_gradient_energy=0.9)
    rule = SEPARATION["ogd"](cfg).attach(model, data, None)
    assert rule.out_bases and all(v.shape[1] >= 1 for v in rule.out_bases.values())
    ratios: list[float] = []

    def check(step: int, loss: float) -> None:
        for name, m in rule.layers.items():
            V = rule.out_bases[name].double()
            B = m.mem_B.detach().double()
            if float(B.norm()) > 0:
                ratios.append(float((V @ V.T @ B).norm() / B.norm()))  # an explicit projector
            U = rule.bases[name].double()
            A = m.mem_A.detach().double()
            ratios.append(float((A @ U @ U.T).norm() / A.norm()))

    before = [m.mem_B.detach().clone() for m in rule.layers.values()]
    train(model, data, cfg.train, progress=False, rule=rule, on_step=check)
    assert ratios and max(ratios) <= 1e-6
    assert any(float((m.mem_B - b).abs().max()) > 0 for m, b in zip(rule.layers.values(), before, strict=True))
    assert "gradient_subspace_dims" in rule.log()


def test_a_frozen_weight_is_quantized_once_and_a_trained_one_every_step() -> None:
    from libortho.train.rules import ParamGroup

    model = build_tiny_llama(seed=0, **ARCH)
    weights = shared_block_weights(model)
    (n_tr, w_tr), (n_fr, w_fr) = list(weights.items())[:2]

    class OneGroup(StepRule):
        def groups(self, model: nn.Module) -> list[ParamGroup]:
            return [ParamGroup("memory", [w_tr])]

    rule = FakeQuantRule(OneGroup(), {n_tr: w_tr, n_fr: w_fr}, QuantConfig(group_size=16, method="rtn"), 0, 3)
    rule.groups(model)
    counts = StepCounts.of(_rows())
    rule.active(0, counts)
    frozen, trained = rule._quantized[n_fr], rule._quantized[n_tr]
    with torch.no_grad():
        w_tr.add_(0.5)
    rule.active(1, counts)
    assert rule._quantized[n_fr] is frozen and rule._quantized[n_tr] is not trained
    assert torch.equal(rule._quantized[n_tr], fake_quantize(w_tr.detach(), rule.cfg))
    rule.after_step(model, 2)
    assert rule._quantized == {}


def test_the_experiment_fake_quantizes_on_its_own_base_grid() -> None:
    from libortho.experiments.separation_config import separation_preset

    cfg = separation_preset("tiny")
    over = {"method_overrides": {"two-phase": {"fake_quant_fraction": 0.5}}}
    from dataclasses import replace
    c = replace(cfg, quant=replace(cfg.quant, group_size=32), **over).method_config("two-phase", 0)
    assert (c.fake_quant_bits, c.fake_quant_group) == (cfg.quant.bits, 32)
    assert replace(cfg, **over).method_config("mask", 0).fake_quant_fraction == 0.0


def test_later_options_stay_out_of_cache_keys_at_their_defaults() -> None:
    """A run recorded before an option existed keeps its keys; setting the option changes them."""
    cfg = SeparationConfig(method="ogd")
    assert not set(LATER_OPTIONS) & set(cfg.key_dict())
    assert {k: v for k, v in cfg.to_dict().items() if k not in LATER_OPTIONS} == cfg.key_dict()
    assert SeparationConfig(method="ogd", ogd_gradient_energy=0.9).key_dict() != cfg.key_dict()
    assert SeparationConfig(method="ogd", fake_quant_fraction=0.2).key_dict()["fake_quant_fraction"] == 0.2


def test_the_recorded_screening_keys_still_match_todays_config() -> None:
    """The committed screening rows were keyed before these options existed: today's keys must equal them."""
    from libortho.experiments.separation_config import recorded_config

    run = Path(__file__).resolve().parents[1] / "docs/results/separation_smollm2/screening"
    rows = sorted((run / "seed0" / "evals").glob("*_int4_a0.json"))
    if not rows:
        pytest.skip("the screening results are not in this checkout")
    cfg = recorded_config(run)
    assert cfg is not None
    for f in rows:
        key = json.loads(f.read_text())["key"]
        method = key["m"].split("@")[0]  # a label-noise row's tag is method@fraction
        today = json.loads(json.dumps(cfg.method_config(method, 0).key_dict(), sort_keys=True, default=str))
        assert key["method"] == today, f.name
