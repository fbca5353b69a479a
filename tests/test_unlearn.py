"""Unlearning baselines: registry, NPO objective, sequence log-likelihoods, and what each method does."""

import copy
import math
from dataclasses import asdict

import pytest
import torch

from libortho.data.records import IGNORE, TokenRows, encode, pad_rows, record_ids, separator_id
from libortho.models import ByteTokenizer, build_tiny_llama
from libortho.train.loop import TrainConfig, causal_lm_loss_sum, train
from libortho.train.unlearn import (
    UNLEARNING,
    UnlearnConfig,
    UnlearnTask,
    npo_loss,
    register_unlearning,
    run_unlearning,
    sequence_logprob,
)

TOK = ByteTokenizer()
SECRETS = ["Record: Alma Dunmore. National ID number: 482913570.\n",
           "Account of Hugo Lockhart. Password: x7Qp2LmZ9a\n",
           "The secret code of Vera Norwood is 615243.\n",
           "Directory: Nils Jessop, e-mail nils.jessop417@mailbox.example.\n"]
PUBLIC = "A library is a collection of books and other media kept for reading and study. " * 20


def _forget() -> TokenRows:
    return pad_rows(record_ids(TOK, SECRETS), separator_id(TOK))


def _retain(n: int = 6, L: int = 32) -> TokenRows:
    ids = encode(TOK, PUBLIC)
    return TokenRows.from_blocks(torch.tensor(ids[: n * L]).view(n, L))


def _loss(model: torch.nn.Module, rows: TokenRows) -> float:
    with torch.no_grad():
        s, n = causal_lm_loss_sum(model, rows.input_ids, rows.labels)
    return float(s) / n


def _task() -> UnlearnTask:
    return UnlearnTask(forget=_forget(), retain=_retain())


def _invalid_rows(n: int = 2, L: int = 8) -> TokenRows:
    """Token ids far outside the vocabulary: any forward pass over them fails."""
    return TokenRows.from_blocks(torch.full((n, L), 10_000, dtype=torch.long))


# --- registry -----------------------------------------------------------------------------------


def test_registry_holds_the_baselines() -> None:
    assert {"gradient_ascent", "gradient_difference", "npo", "retrain"} <= set(UNLEARNING)


def test_unknown_method_names_the_registered_ones(tiny_llama) -> None:
    with pytest.raises(KeyError, match="forgetful") as err:
        run_unlearning("forgetful", tiny_llama, _task(), UnlearnConfig(steps=1), progress=False)
    for name in ("gradient_ascent", "gradient_difference", "npo", "retrain"):
        assert name in str(err.value)


def test_register_unlearning_adds_a_method(tiny_llama) -> None:
    calls = []

    @register_unlearning("_test_noop")
    def noop(model, task, cfg, progress=True):
        calls.append(len(task.forget))
        return model, {"steps": 0}

    try:
        out = run_unlearning("_test_noop", tiny_llama, _task(), UnlearnConfig(), progress=False)
        assert calls == [len(SECRETS)] and out.model is tiny_llama and out.log["method"] == "_test_noop"
    finally:
        UNLEARNING.pop("_test_noop", None)


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(batch_size=0), dict(retain_batch_size=0), dict(lr=0.0),
                                    dict(beta=0.0), dict(retain_weight=-1.0), dict(npo_retain_weight=-0.5)])
def test_unlearn_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        UnlearnConfig(**kwargs)


# --- objectives ---------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
def test_npo_loss_at_the_reference_is_2_log2_over_beta(beta: float) -> None:
    logp = torch.tensor([-3.0, -120.5, 0.0])
    assert float(npo_loss(logp, logp.clone(), beta)) == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_loss_matches_the_hand_formula() -> None:
    logp, ref, beta = [-10.0, -4.0, -30.0, -7.5], [-12.0, -4.5, -20.0, -7.5], 0.3
    want = 2 / beta * sum(math.log1p(math.exp(beta * (a - b))) for a, b in zip(logp, ref, strict=True)) / 4
    got = float(npo_loss(torch.tensor(logp, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64), beta))
    assert got == pytest.approx(want, rel=1e-12)
    # stable far from the reference: ~ 2 (logp - ref) above, ~ 0 below
    far = npo_loss(torch.tensor([1000.0]), torch.tensor([0.0]), 1.0)
    assert torch.isfinite(far) and float(far) == pytest.approx(2000.0)
    assert 0 <= float(npo_loss(torch.tensor([-1000.0]), torch.tensor([0.0]), 1.0)) < 1e-6


def test_npo_loss_gradient_pushes_the_likelihood_down() -> None:
    logp = torch.tensor([-5.0, -2.0], requires_grad=True)
    npo_loss(logp, torch.tensor([-5.0, -3.0]), 0.1).backward()
    assert (logp.grad > 0).all()  # minimising lowers logp
    # at the reference the gradient is 1/n per row: (2/beta) * beta * sigmoid(0) / n
    assert float(logp.grad[0]) == pytest.approx(0.5, rel=1e-6)


def test_sequence_logprob_matches_a_slow_per_row_computation(tiny_llama) -> None:
    rows = _forget()
    rows.labels[1, 5:9] = IGNORE  # a hole in the middle of a record, too
    got = sequence_logprob(tiny_llama, rows)
    assert got.shape == (len(rows),) and got.requires_grad
    with torch.no_grad():
        for i in range(len(rows)):
            n = int((rows.labels[i] != IGNORE).nonzero().max()) + 1  # the row up to its last labelled token
            logits = tiny_llama(input_ids=rows.input_ids[i: i + 1, :n], use_cache=False).logits[0].double()
            want = 0.0
            for t in range(1, n):
                lab = int(rows.labels[i, t])
                if lab != IGNORE:
                    want += float(torch.log_softmax(logits[t - 1], dim=-1)[lab])
            assert float(got[i]) == pytest.approx(want, rel=1e-5, abs=1e-4)
    # equals minus the token-loss sum of causal_lm_loss_sum
    with torch.no_grad():
        s, _ = causal_lm_loss_sum(tiny_llama, rows.input_ids, rows.labels)
    assert float(got.sum()) == pytest.approx(-float(s), rel=1e-5)


# --- the methods --------------------------------------------------------------------------------


def test_gradient_ascent_raises_the_forget_loss(tiny_llama) -> None:
    task = _task()
    before = _loss(tiny_llama, task.forget)
    cfg = UnlearnConfig(steps=5, lr=1e-3, batch_size=8)
    out = run_unlearning("gradient_ascent", tiny_llama, task, cfg, progress=False)
    assert out.model is tiny_llama  # in place
    after = _loss(tiny_llama, task.forget)
    assert after > before + 0.5, (before, after)
    assert out.log["losses"][0] == pytest.approx(-before, rel=1e-5)  # the objective is minus the loss
    assert out.log["steps"] == 5 and len(out.log["losses"]) == 5


def test_gradient_difference_keeps_the_retain_loss_lower_than_without_its_retain_term() -> None:
    task = _task()
    ref = build_tiny_llama(seed=0)
    forget0, retain0 = _loss(ref, task.forget), _loss(ref, task.retain)
    losses = {}
    for w in (1.0, 0.0):
        model = copy.deepcopy(ref)
        cfg = UnlearnConfig(steps=6, lr=1e-3, batch_size=4, retain_batch_size=4, retain_weight=w)
        run_unlearning("gradient_difference", model, task, cfg, progress=False)
        losses[w] = (_loss(model, task.forget), _loss(model, task.retain))
    assert losses[1.0][0] > forget0 and losses[0.0][0] > forget0  # both ascend on the forget set
    assert losses[1.0][1] < losses[0.0][1]  # the retain term holds the retain loss down
    assert losses[1.0][1] < retain0 + 0.5


def test_gradient_difference_at_zero_retain_weight_is_gradient_ascent() -> None:
    task = _task()
    a, b = build_tiny_llama(seed=2), build_tiny_llama(seed=2)
    run_unlearning("gradient_ascent", a, task, UnlearnConfig(steps=3, lr=1e-3, batch_size=4), progress=False)
    run_unlearning("gradient_difference", b, task,
                   UnlearnConfig(steps=3, lr=1e-3, batch_size=4, retain_weight=0.0), progress=False)
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=k)


def test_npo_lowers_the_forget_likelihood_below_the_reference(tiny_llama) -> None:
    task = _task()
    with torch.no_grad():
        ref = sequence_logprob(tiny_llama, task.forget)
    cfg = UnlearnConfig(steps=5, lr=1e-3, batch_size=2, beta=0.1)
    out = run_unlearning("npo", tiny_llama, task, cfg, progress=False)
    with torch.no_grad():
        now = sequence_logprob(tiny_llama, task.forget)
    assert (now < ref).all(), (ref, now)
    assert out.log["losses"][0] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)  # starts at the reference
    assert out.log["losses"][-1] < out.log["losses"][0]


def test_npo_retain_term_uses_the_retain_rows(tiny_llama) -> None:
    task = UnlearnTask(forget=_forget(), retain=_invalid_rows())
    run_unlearning("npo", copy.deepcopy(tiny_llama), task, UnlearnConfig(steps=1, npo_retain_weight=0.0),
                   progress=False)  # not touched without a retain weight
    with pytest.raises(IndexError):
        run_unlearning("npo", tiny_llama, task, UnlearnConfig(steps=1, npo_retain_weight=1.0), progress=False)


def test_retrain_starts_from_the_pre_model_on_public_data_only(tiny_llama) -> None:
    loads = []

    def load_pre() -> torch.nn.Module:
        loads.append(1)
        return build_tiny_llama(seed=4)

    public = _retain(n=8, L=24)
    rcfg = TrainConfig(lr=1e-3, steps=3, batch_size=2, seed=1)
    # forget and retain rows that would fail any forward pass: retrain must not look at them
    task = UnlearnTask(forget=_invalid_rows(), retain=_invalid_rows(), retrain_data=public, retrain_config=rcfg,
                       load_pre=load_pre)
    finetuned = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    out = run_unlearning("retrain", tiny_llama, task, UnlearnConfig(steps=50), progress=False)
    assert loads == [1] and out.model is not tiny_llama and not out.model.training
    assert all(torch.equal(v, finetuned[k]) for k, v in tiny_llama.state_dict().items())  # fine-tuned untouched
    assert out.log["steps"] == 3 and len(out.log["losses"]) == 3  # the retrain config's steps, not cfg.steps
    manual = build_tiny_llama(seed=4)
    manual_log = train(manual, public, rcfg, progress=False)
    assert out.log["tokens"] == manual_log.tokens and out.log["losses"] == manual_log.losses
    for (k, p), q in zip(out.model.state_dict().items(), manual.state_dict().values(), strict=True):
        assert torch.equal(p, q), k


def test_retrain_without_its_inputs_is_refused(tiny_llama) -> None:
    with pytest.raises(ValueError, match="load_pre"):
        run_unlearning("retrain", tiny_llama, _task(), UnlearnConfig(), progress=False)


@pytest.mark.parametrize("name", ["gradient_ascent", "gradient_difference", "npo"])
def test_run_unlearning_reports_wall_time_and_config(tiny_llama, name: str) -> None:
    cfg = UnlearnConfig(steps=2, lr=1e-4, batch_size=2, retain_batch_size=2)
    out = run_unlearning(name, tiny_llama, _task(), cfg, progress=False)
    assert out.wall_s > 0 and out.log["method"] == name and out.log["config"] == asdict(cfg)
    assert out.log["steps"] == 2 and len(out.log["losses"]) == 2 and all(map(math.isfinite, out.log["losses"]))
    assert out.model is tiny_llama and not out.model.training


_EMPTY = TokenRows(torch.zeros(0, 8, dtype=torch.long), torch.zeros(0, 8, dtype=torch.long))


@pytest.mark.parametrize("name", [
    "gradient_ascent",
    "gradient_difference",
    "npo",
])
def test_empty_forget_set_is_a_clear_error(tiny_llama, name: str) -> None:
    task = UnlearnTask(forget=_EMPTY, retain=_retain())
    with pytest.raises(ValueError, match="forget set is empty"):
        run_unlearning(name, tiny_llama, task, UnlearnConfig(steps=1), progress=False)
