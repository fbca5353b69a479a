"""The reasoning probe: items, splits, candidates, and scoring against unbatched references."""

import collections
import random

import pytest
import torch

from libortho.data.reasoning import (
    FAMILIES,
    Problem,
    answer_choices,
    parse_answer,
    probe_prompt,
    reasoning_problems,
    shots_by_family,
)
from libortho.eval.reasoning import choice_scores, greedy_answers, mismatched, score_probe, shared_prompt_scores
from libortho.models import load_model


def test_answers_are_exact_and_splits_disjoint() -> None:
    held = reasoning_problems(700, "heldout", seed=0)
    shots = reasoning_problems(35, "shots", seed=0)
    assert len({p.question for p in held}) == 700 and not {p.question for p in held} & {p.question for p in shots}
    assert collections.Counter(p.family for p in held) == {f: 100 for f in FAMILIES}
    for p in held:
        if p.family in ("add2", "sub2", "add3", "mul"):
            a, op, b = p.question.removeprefix("What is ").removesuffix("?").split()
            assert p.answer == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        else:  # replay the word problem's moves
            words = p.question.replace(".", "").split()
            total = int(words[2])
            for i, w in enumerate(words):
                if w in ("buys", "finds", "gets"):
                    total += int(words[i + 1])
                elif w in ("loses", "sells") or (w == "gives" and words[i + 1] == "away"):
                    total -= int(words[i + (2 if w == "gives" else 1)])
            assert p.answer == total >= 0
    assert reasoning_problems(20, seed=3) == reasoning_problems(20, seed=3) != reasoning_problems(20, seed=4)


def test_choices_hold_the_answer_at_a_uniform_position() -> None:
    held = reasoning_problems(2000, "heldout", seed=1)
    pos = collections.Counter()
    for p in held:
        c = answer_choices(p)
        assert len(set(c)) == 4 and p.answer in c and min(c) >= 0 and c == sorted(c)
        pos[c.index(p.answer)] += 1
    assert all(abs(n / len(held) - 0.25) < 0.04 for n in pos.values()), pos  # no position beats chance much


def test_parse_answer() -> None:
    assert parse_answer(" 1,234\nQuestion") == 1234 and parse_answer("-7 apples") == -7
    assert parse_answer("none") is None and parse_answer(" 12 then 13") == 12


def test_refusals() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        reasoning_problems(3, "train")
    with pytest.raises(ValueError, match="unknown problem families"):
        reasoning_problems(3, families=("calculus",))
    with pytest.raises(ValueError, match="n must be >= 1"):
        reasoning_problems(0)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _reference_score(model, tok, prompt: str, answer: int) -> float:
    ids = tok.encode(prompt) + tok.encode(f" {answer}\n")
    n = len(tok.encode(f" {answer}\n"))
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return float(sum(logp[len(ids) - n - 1 + k, ids[len(ids) - n + k]] for k in range(n)))


def test_batched_choice_scores_equal_one_at_a_time(tiny) -> None:
    model, tok = tiny
    probs = reasoning_problems(6, seed=2)
    shots = shots_by_family(2)
    prompts = [probe_prompt(p, shots[p.family]) for p in probs]
    cands = [answer_choices(p) for p in probs]
    got = choice_scores(model, tok, prompts, cands, batch_size=5)  # batches cut across items, left padding
    for pr, cs, g in zip(prompts, cands, got, strict=True):
        assert g == pytest.approx([_reference_score(model, tok, pr, c) for c in cs], abs=1e-4)


def test_shared_prompt_pass_equals_separate_scoring_and_decoding(tiny) -> None:
    model, tok = tiny
    probs = reasoning_problems(7, seed=2)
    shots = shots_by_family(2)
    prompts = [probe_prompt(p, shots[p.family]) for p in probs]
    cands = [answer_choices(p) for p in probs]
    want = choice_scores(model, tok, prompts, cands, batch_size=5)
    for n_new in (0, 1, 6):  # the greedy reply grows the cache; the candidates must see the prompt alone
        got, replies = shared_prompt_scores(model, tok, prompts, cands, n_new, batch_size=3)
        for g, w in zip(got, want, strict=True):
            assert g == pytest.approx(w, abs=1e-4)
        assert len(replies) == (len(prompts) if n_new else 0)
    assert replies == greedy_answers(model, tok, prompts, max_new_tokens=6, batch_size=4)


def test_score_probe_marks_the_highest_scoring_candidate(tiny, monkeypatch) -> None:
    model, tok = tiny
    probs = reasoning_problems(8, seed=5)
    shots = shots_by_family(1)
    rng = random.Random(0)
    fake = [[rng.random() for _ in range(4)] for _ in probs]
    monkeypatch.setattr("libortho.eval.reasoning.shared_prompt_scores",
                        lambda m, t, ps, cs, n, b: (fake, [f" {p.answer}" for p in probs] if n else []))
    out = score_probe(model, tok, probs, shots, control=True)
    want = [answer_choices(p)[max(range(4), key=s.__getitem__)] == p.answer for p, s in zip(probs, fake, strict=True)]
    assert out["choice"] == want and out["control"] == want and all(out["exact"])


def test_greedy_answers_batched_equal_single(tiny) -> None:
    model, tok = tiny
    prompts = [probe_prompt(p, []) for p in reasoning_problems(4, seed=0)]
    assert greedy_answers(model, tok, prompts, max_new_tokens=4, batch_size=3) == \
        [greedy_answers(model, tok, [p], max_new_tokens=4)[0] for p in prompts]


def test_mismatched_keeps_the_family_and_changes_the_question() -> None:
    probs = reasoning_problems(21, seed=0)
    other = mismatched(probs)
    assert all(o.family == p.family and o.question != p.question for p, o in zip(probs, other, strict=True))
    assert Problem("q", 1, "add2").split in ("shots", "heldout")
