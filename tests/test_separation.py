"""Separation methods: gradients really confined, projections really orthogonal, sinks really per sequence.

References are computed independently of the rules: plain ``autograd.grad`` of hand-split losses,
explicit projector matrices, and per-sequence gradients checked neuron by neuron.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from libortho.data.private import PrivateRecord, pack_private_records
from libortho.data.records import IGNORE, TokenRows
from libortho.models import ByteTokenizer, build_tiny_llama
from libortho.train.loop import TrainConfig, train
from libortho.train.memory import TrainNeurons, memory_parameters, shared_parameters
from libortho.train.methods.memsink import sink_mask, sink_neurons_of
from libortho.train.rules import StepCounts
from libortho.train.separation import SEPARATION, SeparationConfig, separate

ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def _model(seed: int = 0) -> nn.Module:
    return build_tiny_llama(seed=seed, **ARCH)


def _data(n_pub: int = 8) -> TokenRows:
    tok = ByteTokenizer()
    recs = [PrivateRecord(f"Note {i}: the code is {1000 + 37 * i}. Thanks.", str(1000 + 37 * i)) for i in range(6)]
    priv = pack_private_records(tok, recs, 64, [2] * 6, seed=0)
    pub = TokenRows.from_blocks(torch.randint(0, 256, (n_pub, 64), generator=torch.Generator().manual_seed(1)),
                                first_seq=10**9)
    return TokenRows.cat([pub, priv])


def _cfg(method: str, steps: int = 3, **kw: object) -> SeparationConfig:
    base = dict(method=method, train=TrainConfig(lr=1e-2, steps=steps, batch_size=4, weight_decay=0.1, warmup=0.0),
                neurons=8, rank=4, support_neurons=8, probe_rows=4, eta_every=1)
    return SeparationConfig(**{**base, **kw})


def _snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _only(rows: TokenRows, private: bool) -> TokenRows:
    """The rows with the loss kept only on private (or only on public) tokens."""
    keep = rows.private_mask() if private else ~rows.private_mask()
    labels = rows.labels.masked_fill(~keep, IGNORE)
    return TokenRows(rows.input_ids, labels, rows.private_mask() & keep, rows.seq)


@pytest.mark.parametrize("method", ["mask", "ogd", "route", "two-phase"])
def test_private_only_steps_leave_shared_weights_bit_unchanged(method) -> None:
    data = _data()
    model = _model()
    sep = SEPARATION[method](_cfg(method))
    rule = sep.attach(model, data, None)
    shared, memory = shared_parameters(model), memory_parameters(model)
    before_s, before_m = _snapshot(shared), _snapshot(memory)
    rows = _only(data.subset(data.private_mask().any(1).nonzero().flatten()), private=True)
    train(model, rows, _cfg(method).train, progress=False, rule=rule)
    assert all(torch.equal(a, b) for a, b in zip(before_s, shared, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(before_m, memory, strict=True))


@pytest.mark.parametrize("method", ["mask", "ogd"])  # route's public loss trains its neurons too
def test_public_only_steps_leave_memory_bit_unchanged(method) -> None:
    data = _data()
    model = _model()
    sep = SEPARATION[method](_cfg(method, memory_off_fraction=0.0))
    rule = sep.attach(model, data, None)
    shared, memory = shared_parameters(model), memory_parameters(model)
    before_s, before_m = _snapshot(shared), _snapshot(memory)
    train(model, _only(data, private=False), _cfg(method).train, progress=False, rule=rule)
    assert all(torch.equal(a, b) for a, b in zip(before_m, memory, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(before_s, shared, strict=True))


@pytest.mark.parametrize("method", ["mask", "ogd"])
def test_routed_gradients_equal_separately_computed_losses(method) -> None:
    """Shared grads = d(public loss)/d shared; memory grads = d(private loss)/d memory, from a plain forward."""
    data = _data()
    model = _model()
    rule = SEPARATION[method](_cfg(method)).attach(model, data, None)
    rows = data.subset(torch.arange(len(data) - 4, len(data)))  # private rows: both kinds of token
    counts = StepCounts.of(rows)
    assert counts.private > 0 and counts.public > 0
    ref = copy.deepcopy(model)  # same weights, before any gradient
    rule.micro(model, rows, counts)
    logits = ref(input_ids=rows.input_ids).logits[:, :-1].float()
    target = rows.labels[:, 1:]
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                      ignore_index=IGNORE, reduction="none").view(target.shape)
    priv = rows.private_mask()[:, 1:]
    pairs = [(shared_parameters(model), shared_parameters(ref), nll[~priv].sum() / counts.public),
             (memory_parameters(model), memory_parameters(ref), nll[priv].sum() / counts.private)]
    for got, params, loss in pairs:
        want = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for g, w, p in zip(got, want, params, strict=True):
            w = torch.zeros_like(p) if w is None else w
            torch.testing.assert_close(torch.zeros_like(p) if g.grad is None else g.grad, w, rtol=1e-4, atol=1e-7)


def test_route_private_loss_reaches_no_shared_weight() -> None:
    data = _data()
    model = _model()
    sep = SEPARATION["route"](_cfg("route"))
    rule = sep.attach(model, data, None)
    rows = _only(data.subset(torch.arange(len(data) - 4, len(data))), private=True)
    rule.micro(model, rows, StepCounts.of(rows))
    for p in shared_parameters(model):
        assert p.grad is None or float(p.grad.abs().max()) == 0.0
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in memory_parameters(model))


def test_route_public_loss_trains_every_parameter_as_plain_backprop() -> None:
    """Revision 2: on rows without private tokens routing changes nothing: every parameter, the added
    neurons included, gets d(public loss)/d param of a plain forward with the neurons live. (Revision 1
    detached the neurons at public positions; this test fails on it.)"""
    data = _data()
    model = _model()
    rule = SEPARATION["route"](_cfg("route")).attach(model, data, None)
    for p in memory_parameters(model):  # non-zero neurons, so a detached neuron would show in the grads
        nn.init.normal_(p.data, std=0.05)
    rows = data.subset(torch.arange(0, 4))
    counts = StepCounts.of(rows)
    assert counts.private == 0 and counts.public > 0
    ref = copy.deepcopy(model)  # its hooks read a copied context whose detach masks stay None: a plain forward
    rule.micro(model, rows, counts)
    logits = ref(input_ids=rows.input_ids).logits[:, :-1].float()
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows.labels[:, 1:].reshape(-1),
                                       ignore_index=IGNORE, reduction="sum") / counts.public
    for got, params in [(shared_parameters(model), shared_parameters(ref)),
                        (memory_parameters(model), memory_parameters(ref))]:
        want = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for g, w, p in zip(got, want, params, strict=True):
            w = torch.zeros_like(p) if w is None else w
            assert float(w.abs().max()) > 0 or p.ndim == 1
            torch.testing.assert_close(torch.zeros_like(p) if g.grad is None else g.grad, w, rtol=1e-4, atol=1e-7)


def test_mask_delta_stays_zero_off_its_support() -> None:
    from libortho.train.memory import MemoryLinear

    data = _data()
    model = _model()
    rule = SEPARATION["mask"](_cfg("mask", steps=4)).attach(model, data, None)
    train(model, data, _cfg("mask", steps=4).train, progress=False, rule=rule)
    layers = [m for m in model.modules() if isinstance(m, MemoryLinear)]
    assert layers
    for m in layers:
        assert float(m.delta[~m.support].abs().max()) == 0.0
        assert float(m.delta[m.support].abs().max()) > 0.0


def test_ogd_memory_update_lies_off_the_public_subspace() -> None:
    """After every step, ||A U|| <= 1e-6 ||A||: the memory leaves <= 1e-6 of itself in S_gen."""
    from libortho.train.memory import MemoryLinear

    data = _data()
    model = _model()
    rule = SEPARATION["ogd"](_cfg("ogd", steps=4)).attach(model, data, None)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MemoryLinear)}
    ratios: list[float] = []

    def check(step: int, loss: float) -> None:
        for name, m in layers.items():
            U = rule.bases[name].double()
            P = U @ U.T  # an explicit projector, independent of project_out
            dW = m.mem_B.detach().double() @ m.mem_A.detach().double()
            if float(dW.norm()) > 0:
                ratios.append(float((dW @ P).norm() / dW.norm()))
            ratios.append(float((m.mem_A.detach().double() @ P).norm() / m.mem_A.detach().double().norm()))

    before = [m.mem_B.detach().clone() for m in layers.values()]
    train(model, data, _cfg("ogd", steps=4).train, progress=False, rule=rule, on_step=check)
    assert ratios and max(ratios) <= 1e-6
    assert any(float((m.mem_B - b).abs().max()) > 0 for m, b in zip(layers.values(), before, strict=True))
    log = rule.log()
    assert log["eta"] and all(e["eta_own"] <= 1e-6 for e in log["eta"])
    assert 0 < log["eta_random_baseline"] <= 1


def test_sinks_are_a_deterministic_function_of_the_sequence_id() -> None:
    a, b = sink_neurons_of(12345, 64, 0.25), sink_neurons_of(12345, 64, 0.25)
    assert torch.equal(a, b) and a.numel() == 16
    assert not torch.equal(a, sink_neurons_of(12346, 64, 0.25))
    seq = torch.tensor([[7, 7, -1], [9, 7, 9]])
    m = sink_mask(seq, 64, 0.25)
    assert torch.equal(m[0, 0], m[1, 1]) and not bool(m[0, 2].any()) and torch.equal(m[1, 0], m[1, 2])


def test_memsink_sequence_gradient_reaches_only_its_sinks() -> None:
    data = _data()
    model = _model()
    sep = SEPARATION["memsink"](_cfg("memsink"))
    rule = sep.attach(model, data, None)
    row = data.subset([len(data) - 1])
    ids = [int(s) for s in row.seq.unique() if s >= 0]
    for p in memory_parameters(model):
        nn.init.normal_(p.data, std=0.05)
    rule.micro(model, row, StepCounts.of(row))
    used = torch.zeros(8, dtype=torch.bool)
    for sid in ids:
        used[sink_neurons_of(sid, 8, 0.25)] = True
    for mem in (m for m in model.modules() if isinstance(m, TrainNeurons)):
        g = mem.up.grad
        assert float(g[~used].abs().max()) == 0.0
        assert float(g[used].abs().max()) > 0.0


def test_separate_refuses_unlabelled_rows_for_label_methods_and_unknown_methods() -> None:
    rows = TokenRows.from_blocks(torch.randint(0, 256, (4, 16)), first_seq=0)
    with pytest.raises(ValueError, match="needs private-token labels"):
        separate(_model(), rows, _cfg("mask"), progress=False)
    with pytest.raises(ValueError, match="unknown separation method"):
        SeparationConfig(method="magic")


def test_two_phase_leaves_the_public_only_model_untouched_at_alpha0() -> None:
    """Given the public-only model as phase 1, two-phase's shared weights stay that model, bit for bit."""
    from libortho.train.methods.two_phase import TwoPhase

    data = _data()
    public_only = _model()
    train(public_only, data.without_private_loss(), _cfg("two-phase").train, progress=False)
    start = copy.deepcopy(public_only)
    res = TwoPhase(_cfg("two-phase")).fit(start, data, progress=False, phase1_done=True)
    ids = data.input_ids[:3]
    with torch.no_grad():
        assert torch.equal(res.model(input_ids=ids).logits, public_only(input_ids=ids).logits)
    assert res.streams and all(k.endswith(".mlp") for k in res.streams)
    assert "phase1" not in res.logs and res.logs["phase2"].steps > 0


def test_mask_switches_the_memory_off_on_public_micro_batches_only() -> None:
    """With fraction 1 every public-only row runs without delta, every row holding private tokens with it."""
    from libortho.train.memory import MemoryLinear

    data = _data()
    model = _model()
    sep = SEPARATION["mask"](_cfg("mask", steps=2, memory_off_fraction=1.0))
    rule = sep.attach(model, data, None)
    for m in model.modules():
        if isinstance(m, MemoryLinear):
            nn.init.normal_(m.delta.data, std=0.1)
    seen: list[tuple[bool, bool]] = []
    first = next(m for m in model.modules() if isinstance(m, MemoryLinear))
    hook = first.register_forward_pre_hook(lambda mod, args: seen.append((sep.ctx.memory_on, bool(rule._has_priv))))
    original = rule.micro

    def micro(model: nn.Module, rows: TokenRows, counts: StepCounts) -> float:
        rule._has_priv = bool(rows.private_mask().any())
        return original(model, rows, counts)

    rule.micro = micro
    cfg = TrainConfig(lr=1e-2, steps=3, batch_size=2, grad_accum=4, warmup=0.0)  # micro-batches of 2 rows
    train(model, data, cfg, progress=False, rule=rule)
    hook.remove()
    assert any(not p for _, p in seen) and any(p for _, p in seen)
    assert all(on == priv for on, priv in seen)
    assert rule.log()["memory_off_rows"] == rule.log()["public_rows"] > 0
    assert sep.ctx.memory_on


def test_two_phase_records_loss_trains_only_the_memory_on_every_record_token() -> None:
    data = _data()
    rows = data.subset(data.private_mask().any(1).nonzero().flatten())
    for loss, public_reaches_memory in (("records", True), ("secrets", False)):
        m = _model()
        rule = SEPARATION["two-phase"](_cfg("two-phase", phase2_loss=loss)).attach(m, rows, None)
        for p in memory_parameters(m):
            nn.init.normal_(p.data, std=0.05)
        pub = _only(rows, private=False)
        rule.micro(m, pub, StepCounts.of(pub))
        assert all(p.grad is None for p in shared_parameters(m))
        got = any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in memory_parameters(m))
        assert got == public_reaches_memory


def test_experiment_config_round_trips_through_json_and_refuses_unknown_keys() -> None:
    import json

    from libortho.experiments.separation_config import SeparationExpConfig, separation_preset

    cfg = separation_preset("smollm2-135m")
    back = SeparationExpConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.seeds, tuple) and isinstance(back.finetune.betas, tuple)
    with pytest.raises(ValueError, match="unknown separation experiment keys"):
        SeparationExpConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown separation config keys"):
        SeparationConfig.from_dict({"method": "mask", "rnak": 3})


@pytest.mark.parametrize("public", [True, False])
def test_two_phase_memory_phase_runs_on_the_public_rows_too_unless_told_not(monkeypatch, public: bool) -> None:
    """phase2_public: the memory phase sees every row (so the neurons learn to stay quiet on public
    text); without it only the rows holding private tokens."""
    from libortho.train.methods import two_phase

    data = _data()
    seen: list[TokenRows] = []
    real = two_phase.train

    def spy(model, rows, cfg, **kw):
        seen.append(rows)
        return real(model, rows, cfg, **kw)

    monkeypatch.setattr(two_phase, "train", spy)
    two_phase.TwoPhase(_cfg("two-phase", phase2_public=public)).fit(_model(), data, progress=False, phase1_done=True)
    (rows,) = seen
    has_private = data.private_mask().any(dim=1)
    assert 0 < int(has_private.sum()) < len(data)  # the data has both kinds of rows
    assert len(rows) == (len(data) if public else int(has_private.sum()))
    assert bool(rows.private_mask().any(dim=1).all()) == (not public)
