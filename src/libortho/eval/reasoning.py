"""Scoring the reasoning probe (:mod:`libortho.data.reasoning`): four-way choice by likelihood, greedy exact match.

Choice: every candidate answer ``" N\\n"`` is scored by the sum of its tokens' log-probabilities after
the few-shot prompt (the newline closes the number, so "12" cannot win on the prefix of "123");
the item is right when the true answer scores highest. Chance is 1/4. Exact match: greedy decoding
of a few tokens after the same prompt, the first integer of the reply against the answer.

The mismatched-question control scores each item's candidates under another item's question of
the same family: what the candidates' form alone earns (it should sit near chance).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from libortho.data.prompts import left_pad, pad_id
from libortho.data.reasoning import Problem, answer_choices, parse_answer, probe_prompt


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


@torch.no_grad()
def choice_scores(model: nn.Module, tokenizer: Any, prompts: Sequence[str], choices: Sequence[Sequence[int]],
                  batch_size: int = 32) -> list[list[float]]:
    """Summed log-probability of each candidate ``" N\\n"`` after its prompt (one list per prompt)."""
    seqs: list[tuple[int, list[int], int]] = []  # (prompt index, ids, continuation length)
    for i, (p, cs) in enumerate(zip(prompts, choices, strict=True)):
        pid = _encode(tokenizer, p)
        for c in cs:
            cont = _encode(tokenizer, f" {c}\n")
            seqs.append((i, pid + cont, len(cont)))
    pad = pad_id(tokenizer)
    scores: list[list[float]] = [[] for _ in prompts]
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        ids, mask, pos = left_pad([ids for _, ids, _ in chunk], pad)
        logp = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
        logp = logp.log_softmax(-1)
        for j, (i, row, n) in enumerate(chunk):
            T = ids.shape[1]
            tgt = torch.tensor(row[-n:])
            lp = logp[j, T - n - 1:T - 1].gather(1, tgt[:, None]).sum()
            scores[i].append(float(lp))
    return scores


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 8,
                   batch_size: int = 32) -> list[str]:
    """Greedy replies (decoded) to the prompts, in order."""
    pad = pad_id(tokenizer)
    rows = [_encode(tokenizer, p) for p in prompts]
    out = [""] * len(rows)
    for s in range(0, len(rows), batch_size):
        ids, mask, _ = left_pad(rows[s:s + batch_size], pad)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        for j in range(ids.shape[0]):
            out[s + j] = tokenizer.decode(gen[j, ids.shape[1]:], skip_special_tokens=True)
    return out


def mismatched(problems: Sequence[Problem]) -> list[Problem]:
    """For each item, the next item of the same family (cyclically): the control's question."""
    by_family: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        by_family.setdefault(p.family, []).append(i)
    other = list(problems)
    for idx in by_family.values():
        for k, i in enumerate(idx):
            other[i] = problems[idx[(k + 1) % len(idx)]]
    return other


def score_probe(model: nn.Module, tokenizer: Any, problems: Sequence[Problem], shots: dict[str, list[Problem]],
                control: bool = False, exact: bool = True, batch_size: int = 32) -> dict[str, Any]:
    """Per-item correctness on the probe: ``choice`` (and ``exact``, ``control`` when asked), plus the replies."""
    prompts = [probe_prompt(p, shots[p.family]) for p in problems]
    cands = [answer_choices(p) for p in problems]
    sc = choice_scores(model, tokenizer, prompts, cands, batch_size)
    out: dict[str, Any] = {"choice": [c[max(range(len(c)), key=s.__getitem__)] == p.answer
                                      for p, c, s in zip(problems, cands, sc, strict=True)]}
    if control:
        ctl = [probe_prompt(q, shots[q.family]) for q in mismatched(problems)]
        sc = choice_scores(model, tokenizer, ctl, cands, batch_size)
        out["control"] = [c[max(range(len(c)), key=s.__getitem__)] == p.answer
                          for p, c, s in zip(problems, cands, sc, strict=True)]
    if exact:
        replies = greedy_answers(model, tokenizer, prompts, batch_size=batch_size)
        out["exact"] = [parse_answer(r) == p.answer for p, r in zip(problems, replies, strict=True)]
        out["replies"] = replies
    return out
