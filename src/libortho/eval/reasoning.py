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


@torch.no_grad()
def shared_prompt_scores(model: nn.Module, tokenizer: Any, prompts: Sequence[str], choices: Sequence[Sequence[int]],
                         max_new_tokens: int = 0, batch_size: int = 32) -> tuple[list[list[float]], list[str]]:
    """:func:`choice_scores` (and, with ``max_new_tokens``, :func:`greedy_answers`) from one pass over each prompt.

    The prompt batch runs once with a KV cache; the greedy reply continues from it; the cache is then cut
    back to the prompt, repeated once per candidate, and every candidate's tokens run in one more pass.
    Candidates are right-padded after the prompt, so padding never precedes a scored token.
    """
    pad = pad_id(tokenizer)
    n_c = len(choices[0]) if choices else 0
    if any(len(c) != n_c for c in choices):
        raise ValueError("every prompt needs the same number of candidates")
    rows = [_encode(tokenizer, p) for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # batches of similar length: little padding
    scores: list[list[float]] = [[] for _ in rows]
    replies: list[str] = [""] * len(rows) if max_new_tokens else []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask, pos = left_pad([rows[i] for i in idx], pad)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache, first = out.past_key_values, out.logits[:, -1].float().log_softmax(-1)
        last = pos[:, -1]
        if max_new_tokens:
            for i, r in zip(idx, _greedy_from(model, tokenizer, cache, first, mask, last, max_new_tokens),
                            strict=True):
                replies[i] = r
            if max_new_tokens > 1:  # back to the prompt: the greedy steps appended n - 1 tokens
                cache.crop(-(max_new_tokens - 1))
        conts = [[_encode(tokenizer, f" {c}\n") for c in choices[i]] for i in idx]
        flat = [c for cs in conts for c in cs]
        L = max(len(c) for c in flat)
        cont = torch.full((len(flat), L), pad, dtype=torch.long)
        cmask = torch.zeros((len(flat), L), dtype=torch.long)
        for i, c in enumerate(flat):
            cont[i, :len(c)], cmask[i, :len(c)] = torch.tensor(c), 1
        cache.batch_repeat_interleave(n_c)
        rep = torch.repeat_interleave
        logp = model(input_ids=cont, attention_mask=torch.cat([rep(mask, n_c, 0), cmask], 1),
                     position_ids=rep(last, n_c)[:, None] + 1 + torch.arange(L)[None, :], past_key_values=cache,
                     use_cache=True).logits.float().log_softmax(-1)
        first = rep(first, n_c, 0)
        for j in range(len(conts)):
            row = []
            for k, c in enumerate(conts[j]):
                i = j * n_c + k
                lp = first[i, c[0]] + sum(logp[i, t - 1, c[t]] for t in range(1, len(c)))
                row.append(float(lp))
            scores[idx[j]] = row
    return scores, replies


def _greedy_from(model: nn.Module, tokenizer: Any, cache: Any, logp: torch.Tensor, mask: torch.Tensor,
                 last: torch.Tensor, n: int) -> list[str]:
    """Greedy continuation of a prompt batch whose cache and last log-probs are given (the cache grows)."""
    toks = []
    nxt = logp.argmax(-1)
    for step in range(n):
        toks.append(nxt)
        if step == n - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=(last + 1 + step)[:, None],
                    past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
    gen = torch.stack(toks, 1)
    return [tokenizer.decode(g, skip_special_tokens=True) for g in gen]


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
    sc, replies = shared_prompt_scores(model, tokenizer, prompts, cands, 8 if exact else 0, batch_size)
    out: dict[str, Any] = {"choice": [c[max(range(len(c)), key=s.__getitem__)] == p.answer
                                      for p, c, s in zip(problems, cands, sc, strict=True)]}
    if control:
        ctl = [probe_prompt(q, shots[q.family]) for q in mismatched(problems)]
        sc, _ = shared_prompt_scores(model, tokenizer, ctl, cands, 0, batch_size)
        out["control"] = [c[max(range(len(c)), key=s.__getitem__)] == p.answer
                          for p, c, s in zip(problems, cands, sc, strict=True)]
    if exact:
        out["exact"] = [parse_answer(r) == p.answer for p, r in zip(problems, replies, strict=True)]
        out["replies"] = replies
    return out
