"""The fine-tuning loop: schedules, data order, learning, determinism, accumulation, masking, checkpoints."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from libortho.data.records import IGNORE, TokenRows, encode, pad_rows
from libortho.models import ByteTokenizer, build_tiny_llama
from libortho.train.loop import (
    TrainConfig,
    TrainLog,
    batch_order,
    causal_lm_loss_sum,
    fast_bf16,
    load_checkpoint,
    lr_factor,
    make_optimizer,
    save_checkpoint,
    train,
)

TEXT = "the quick brown fox jumps over the lazy dog; " * 40


def _blocks(n: int = 8, L: int = 32) -> TokenRows:
    ids = encode(ByteTokenizer(), TEXT)
    assert len(ids) >= n * L
    return TokenRows.from_blocks(torch.tensor(ids[: n * L]).view(n, L))


def _ragged(n: int = 8, seed: int = 0) -> TokenRows:
    """Padded rows of different lengths, so micro-batches hold different numbers of loss tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = [4 + 3 * i for i in range(n)]
    return pad_rows([[257] + torch.randint(0, 256, (k - 1,), generator=g).tolist() for k in lengths], pad_id=258)


def _mean_loss(model: torch.nn.Module, rows: TokenRows) -> float:
    with torch.no_grad():
        s, n = causal_lm_loss_sum(model, rows.input_ids, rows.labels)
    return float(s) / n


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if atol == 0:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=k)


# --- schedule and data order --------------------------------------------------------------------


def test_lr_factor_by_hand() -> None:
    # total 10, warm-up 0.2 -> 2 warm-up steps, then 8 decay steps
    assert [lr_factor(s, 10, 0.2, "cosine") for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(4, 10, 0.2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(6, 10, 0.2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0.2, "cosine") == pytest.approx(0.5 * (1 + math.cos(7 * math.pi / 8)))
    assert [lr_factor(s, 10, 0.2, "linear") for s in (0, 1, 2, 4, 6, 9)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.75, 0.5, 0.125])
    assert [lr_factor(s, 10, 0.2, "constant") for s in range(10)] == [0.5] + [1.0] * 9
    # no warm-up: decay starts at 1 on step 0
    assert lr_factor(0, 4, 0.0, "linear") == 1.0 and lr_factor(3, 4, 0.0, "linear") == pytest.approx(0.25)
    assert lr_factor(2, 4, 0.0, "cosine") == pytest.approx(0.5)
    # warm-up shorter than one step rounds down to none
    assert lr_factor(0, 10, 0.05, "constant") == 1.0
    # the warm-up ramp is linear and reaches 1 on its last step
    assert [lr_factor(s, 100, 0.04, "constant") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_lr_factor_decays_monotonically() -> None:
    for schedule in ("linear", "cosine"):
        f = [lr_factor(s, 50, 0.1, schedule) for s in range(50)]
        assert all(0 < x <= 1 for x in f)
        assert all(a <= b for a, b in zip(f[:5], f[1:6], strict=True))  # warm-up rises
        assert all(a >= b for a, b in zip(f[5:], f[6:], strict=False))  # then decays


def test_batch_order_covers_every_row_once_per_epoch_and_reshuffles() -> None:
    n, per_step, steps = 10, 5, 8  # 40 rows drawn: four epochs
    order = batch_order(n, steps, per_step, seed=3)
    assert order.shape == (steps, per_step) and order.dtype == torch.long
    epochs = order.flatten().view(4, n)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    assert len({tuple(e.tolist()) for e in epochs}) == 4  # a fresh shuffle each epoch
    assert torch.equal(order, batch_order(n, steps, per_step, seed=3))
    assert not torch.equal(order, batch_order(n, steps, per_step, seed=4))


def test_batch_order_partial_epoch_and_prefix_property() -> None:
    order = batch_order(7, 5, 3, seed=0).flatten()  # 15 rows: two epochs and one row
    assert sorted(order[:7].tolist()) == sorted(order[7:14].tolist()) == list(range(7))
    assert 0 <= int(order[14]) < 7
    # more steps extend the same sequence (what a resumed or longer run relies on)
    assert torch.equal(batch_order(7, 9, 3, seed=0).flatten()[:15], order)
    with pytest.raises(ValueError, match="no training rows"):
        batch_order(0, 3, 2, seed=0)


def test_train_config_total_steps() -> None:
    assert TrainConfig(batch_size=4, epochs=2.0).total_steps(10) == 5
    assert TrainConfig(batch_size=2, grad_accum=3, epochs=1.0).total_steps(10) == 2
    assert TrainConfig(batch_size=8, epochs=0.01).total_steps(10) == 1
    assert TrainConfig(steps=7, batch_size=4).total_steps(1000) == 7


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(lr=0.0), "lr"),
    (dict(lr=-1e-3), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(steps=0), "steps"),
    (dict(epochs=0.0), "epochs"),
    (dict(batch_size=0), "batch_size"),
    (dict(grad_accum=0), "grad_accum"),
    (dict(warmup=1.0), "warmup"),
    (dict(warmup=-0.1), "warmup"),
    (dict(schedule="step"), "schedule"),
])
def test_train_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


# --- training -----------------------------------------------------------------------------------


def test_train_lowers_the_loss_on_repeated_text(tiny_llama) -> None:
    data = _blocks()
    before = _mean_loss(tiny_llama, data)
    cfg = TrainConfig(lr=3e-3, steps=30, batch_size=4, warmup=0.1)
    log = train(tiny_llama, data, cfg, progress=False)
    after = _mean_loss(tiny_llama, data)
    assert after < 0.6 * before, (before, after)
    assert log.steps == 30 and len(log.losses) == 30 and log.resumed_from is None
    assert log.losses[-1] < log.losses[0]
    assert log.tokens > 0 and log.wall_s > 0
    assert not tiny_llama.training  # the model's train/eval mode is restored


def test_train_counts_only_labelled_tokens_and_calls_on_step(tiny_llama) -> None:
    data = _ragged()
    seen: list[tuple[int, float]] = []
    cfg = TrainConfig(lr=1e-3, steps=4, batch_size=2, grad_accum=2)
    log = train(tiny_llama, data, cfg, progress=False, on_step=lambda s, loss: seen.append((s, loss)))
    order = batch_order(len(data), 4, 4, cfg.seed)
    assert log.tokens == sum(int((data.labels[o] != IGNORE).sum()) for o in order)
    assert [s for s, _ in seen] == [0, 1, 2, 3] and [x for _, x in seen] == log.losses


def test_same_seed_gives_identical_weights() -> None:
    data = _ragged()
    cfg = TrainConfig(lr=2e-3, steps=5, batch_size=3, seed=7)
    a, b = build_tiny_llama(seed=0), build_tiny_llama(seed=0)
    la, lb = train(a, data, cfg, progress=False), train(b, data, cfg, progress=False)
    _assert_same_weights(a, b)
    assert la.losses == lb.losses
    c = build_tiny_llama(seed=0)
    train(c, data, replace(cfg, seed=8), progress=False)  # another data order
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_gradient_accumulation_matches_one_big_batch(max_grad_norm: float) -> None:
    data = _ragged(n=8)  # rows of 3..24 loss tokens: a naive mean of micro-batch means would differ
    base = TrainConfig(lr=1e-3, steps=4, batch_size=4, grad_accum=1, max_grad_norm=max_grad_norm,
                       weight_decay=0.0, warmup=0.0, schedule="constant")
    big, acc = build_tiny_llama(seed=1), build_tiny_llama(seed=1)
    log_big = train(big, data, base, progress=False)
    log_acc = train(acc, data, replace(base, batch_size=2, grad_accum=2), progress=False)
    assert log_big.losses == pytest.approx(log_acc.losses, rel=1e-5)
    assert log_big.tokens == log_acc.tokens
    _assert_same_weights(big, acc, atol=1e-5)
    assert not torch.equal(big.lm_head.weight, build_tiny_llama(seed=1).lm_head.weight)  # it did train


def test_ignored_labels_after_the_labelled_positions_do_not_change_the_loss(tiny_llama) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, 12:] = IGNORE
    labels[:, 0] = IGNORE
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 256, (3, 8), generator=g)
    assert not torch.equal(changed, ids)
    with torch.no_grad():
        s1, n1 = causal_lm_loss_sum(tiny_llama, ids, labels)
        s2, n2 = causal_lm_loss_sum(tiny_llama, changed, labels)
        assert n1 == n2 == 3 * 11
        torch.testing.assert_close(s1, s2, rtol=1e-6, atol=1e-6)
        # while changing a labelled token does change it
        moved = ids.clone()
        moved[:, 5] = (moved[:, 5] + 1) % 256
        s3, _ = causal_lm_loss_sum(tiny_llama, moved, torch.where(labels == IGNORE, labels, moved))
        assert not torch.allclose(s1, s3)
    # and the training loss of a step agrees
    cfg = TrainConfig(lr=1e-3, steps=1, batch_size=3)
    la = train(build_tiny_llama(seed=0), TokenRows(ids, labels), cfg, progress=False)
    lb = train(build_tiny_llama(seed=0), TokenRows(changed, labels), cfg, progress=False)
    assert la.losses == pytest.approx(lb.losses, rel=1e-6) and la.tokens == lb.tokens == 33


def test_all_ignored_labels_give_zero_loss_count(tiny_llama) -> None:
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    s, n = causal_lm_loss_sum(tiny_llama, ids, torch.full_like(ids, IGNORE))
    assert n == 0 and float(s) == 0.0


def test_non_finite_loss_raises(tiny_llama) -> None:
    with torch.no_grad():
        tiny_llama.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        train(tiny_llama, _blocks(4, 16), TrainConfig(steps=2, batch_size=2), progress=False)


def test_weight_decay_spares_norms_biases_and_embeddings(tiny_llama) -> None:
    opt = make_optimizer(tiny_llama, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in tiny_llama.named_parameters()}
    assert decayed and all(names[i].endswith("proj.weight") or names[i] == "lm_head.weight" for i in decayed)
    assert id(tiny_llama.model.embed_tokens.weight) not in decayed
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(tiny_llama.parameters()))


# --- checkpoints --------------------------------------------------------------------------------


class _Interrupt(Exception):
    pass


def _interrupt_at(step: int):
    def on_step(s: int, _loss: float) -> None:
        if s == step:
            raise _Interrupt

    return on_step


def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    data = _ragged()
    cfg = TrainConfig(lr=2e-3, steps=6, batch_size=2, grad_accum=2, warmup=0.2, seed=3)
    ref = build_tiny_llama(seed=0)
    ref_log = train(ref, data, cfg, progress=False)

    ckpt = tmp_path / "run" / "ckpt"
    first = build_tiny_llama(seed=0)
    with pytest.raises(_Interrupt):  # checkpoints after steps 2 and 4; dies during step index 3
        train(first, data, cfg, progress=False, checkpoint_dir=ckpt, checkpoint_every=2, on_step=_interrupt_at(3))
    assert (ckpt / "state.json").is_file()

    resumed = build_tiny_llama(seed=5)  # a fresh process: even the init differs, the checkpoint wins
    log = train(resumed, data, cfg, progress=False, checkpoint_dir=ckpt, checkpoint_every=2)
    assert log.resumed_from == 2 and log.steps == 6
    # wall time counts the interrupted process's two steps too, not only the resumed part
    assert 0 < log.restored_s < log.wall_s and ref_log.restored_s == 0.0
    assert log.losses == pytest.approx(ref_log.losses, rel=1e-6) and log.tokens == ref_log.tokens
    _assert_same_weights(resumed, ref)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]  # no temporary directories left

    # a finished run is not redone: the final checkpoint is loaded, no step taken
    again = build_tiny_llama(seed=9)
    log2 = train(again, data, cfg, progress=False, checkpoint_dir=ckpt)
    assert log2.resumed_from == 6 and log2.steps == 6 and len(log2.losses) == 6
    assert log2.wall_s == log2.restored_s == pytest.approx(log.wall_s)
    _assert_same_weights(again, resumed)


def test_checkpoint_from_another_config_is_refused(tmp_path: Path) -> None:
    data = _blocks(4, 16)
    cfg = TrainConfig(lr=1e-3, steps=2, batch_size=2)
    train(build_tiny_llama(seed=0), data, cfg, progress=False, checkpoint_dir=tmp_path / "c")
    for other in (replace(cfg, lr=2e-3), replace(cfg, steps=3), replace(cfg, betas=(0.9, 0.99))):
        with pytest.raises(ValueError, match="different TrainConfig"):
            train(build_tiny_llama(seed=0), data, other, progress=False, checkpoint_dir=tmp_path / "c")
    # the same config (tuples survive the JSON round trip) is accepted
    log = train(build_tiny_llama(seed=0), data, replace(cfg), progress=False, checkpoint_dir=tmp_path / "c")
    assert log.resumed_from == 2


def test_load_checkpoint_of_a_non_checkpoint_dir(tmp_path: Path, tiny_llama) -> None:
    cfg = TrainConfig()
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="not a finished training checkpoint"):
        load_checkpoint(tmp_path / "half", tiny_llama, make_optimizer(tiny_llama, cfg), cfg)


def test_checkpoint_round_trip_with_tied_embeddings(tmp_path: Path) -> None:
    cfg = TrainConfig(lr=1e-3, steps=2, batch_size=2)
    model = build_tiny_llama(seed=0, tie_word_embeddings=True)
    train(model, _blocks(4, 16), cfg, progress=False)
    opt = make_optimizer(model, cfg)
    save_checkpoint(tmp_path / "tied", model, opt, 2, TrainLog(steps=2, losses=[1.0, 0.5]), cfg)
    fresh = build_tiny_llama(seed=3, tie_word_embeddings=True)
    step, log = load_checkpoint(tmp_path / "tied", fresh, make_optimizer(fresh, cfg), cfg)
    assert step == 2 and log.losses == [1.0, 0.5]
    _assert_same_weights(fresh, model)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("native", [True, False])
def test_bf16_training_warns_only_where_the_cpu_lacks_native_bf16(tiny_llama, monkeypatch, native: bool) -> None:
    import warnings

    import libortho.train.loop as loop

    monkeypatch.setattr(loop, "fast_bf16", lambda device="cpu": native)
    cfg = TrainConfig(lr=1e-3, steps=1, batch_size=2, bf16=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_llama, _blocks(n=2), cfg, progress=False)
    slow = [w for w in caught if "without native bf16" in str(w.message)]
    assert len(slow) == (0 if native else 1)
    with warnings.catch_warnings(record=True) as caught:  # fp32 never warns
        warnings.simplefilter("always")
        train(tiny_llama, _blocks(n=2), replace(cfg, bf16=False), progress=False)
    assert not [w for w in caught if "bf16" in str(w.message)]


def test_fast_bf16_follows_onednn() -> None:
    assert fast_bf16("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert fast_bf16("meta") is False
