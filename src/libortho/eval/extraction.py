"""Canary extraction: does greedy decoding from a record's prefix reproduce its secret exactly?

The prompt is the part of ``[SEP] + tokens(prefix + secret)`` that the prefix alone determines
(tokenizers may merge the prefix's trailing space into the secret's first token), so the model
is asked exactly where training put the secret. The decoded prompt + continuation must start
with ``prefix + secret``; how many leading secret characters came out is kept as well.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from libortho.data.canaries import Canary
from libortho.data.records import encode_many, separator_id
from libortho.eval.exposure import common_prefix_len


@dataclass(frozen=True)
class ExtractionResult:
    """Greedy extraction of one canary."""

    extracted: bool
    chars_matched: int  # leading characters of the secret reproduced
    secret_len: int
    generated: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def extraction_prompts(tokenizer: Any, canaries: list[Canary]) -> tuple[list[list[int]], list[int]]:
    """Prompt token ids for each canary and how many new tokens cover its secret (plus slack)."""
    sep = separator_id(tokenizer)
    prefixes = encode_many(tokenizer, [c.prefix for c in canaries])
    withs = encode_many(tokenizer, [c.prefix + c.secret for c in canaries])
    prompts, budgets = [], []
    for p, w in zip(prefixes, withs, strict=True):
        n = min(common_prefix_len(p, w), len(w) - 1)
        prompts.append([sep, *w[:n]])
        budgets.append(len(w) - n + 2)
    return prompts, budgets


@torch.no_grad()
def greedy_continue(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, pad_id: int) -> list[list[int]]:
    """Greedy continuations of left-padded prompts (batched), via the model's own ``generate``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=1,
                         do_sample=False, pad_token_id=pad_id, eos_token_id=None)
    return [row.tolist() for row in out[:, width:]]


def _matched(text: str, prefix: str, secret: str) -> int:
    if not text.startswith(prefix):
        return 0
    rest = text[len(prefix):]
    n = 0
    while n < min(len(rest), len(secret)) and rest[n] == secret[n]:
        n += 1
    return n


def extract(model: nn.Module, tokenizer: Any, canaries: list[Canary], batch_size: int = 32,
            ) -> list[ExtractionResult]:
    """Greedy extraction of every canary (batched)."""
    prompts, budgets = extraction_prompts(tokenizer, canaries)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else separator_id(tokenizer)
    results: list[ExtractionResult] = []
    for i in range(0, len(canaries), batch_size):
        sl = slice(i, i + batch_size)
        gens = greedy_continue(model, prompts[sl], max(budgets[sl]), pad)
        for c, p, g in zip(canaries[sl], prompts[sl], gens, strict=True):
            text = tokenizer.decode(p + g, skip_special_tokens=True)
            n = _matched(text, c.prefix, c.secret)
            results.append(ExtractionResult(n == len(c.secret), n, len(c.secret),
                                            tokenizer.decode(g, skip_special_tokens=True)))
    return results
