"""Per-token scores of whole records under a causal LM, the raw material of MIA and private error.

For every scored token ``x_t`` of a record we keep ``log p(x_t | x_<t)`` and the mean and
standard deviation of ``log p(z)`` for ``z`` drawn from the model's own next-token distribution
(what min-k%++ normalises by). Rows are right-padded, so padding never reaches a scored token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TokenStats:
    """Per record: ``logp``, ``mu`` and ``sigma`` of each scored token (float64 1-D tensors)."""

    logp: list[torch.Tensor]
    mu: list[torch.Tensor]
    sigma: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.logp)

    def mean_nll(self) -> torch.Tensor:
        """Mean negative log-likelihood per record ``(n,)``."""
        return torch.stack([-lp.mean() for lp in self.logp])


def next_token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``log p(target)``, ``E_z[log p(z)]`` and ``std_z[log p(z)]`` for logits ``(..., V)`` and targets ``(...)``.

    ``log p(target)`` is computed in float64; the mean and spread over the vocabulary are reduced in
    the logits' own precision, at least float32 (for a model's float32 logits: absolute error about
    1e-6 nats at a quarter of the float64 cost on a 49k vocabulary), the spread as
    ``E[(log p - mu)^2]`` so it cannot cancel below zero. Results are float64.
    """
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(logits.double(), dim=-1)
    lp = logits.double().gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    logprobs = logits.to(work) - lse.to(work).unsqueeze(-1)
    probs = logprobs.exp()
    mu = (probs * logprobs).sum(-1)
    var = (probs * (logprobs - mu.unsqueeze(-1)).square()).sum(-1)
    return lp, mu.double(), var.sqrt().double()


@torch.no_grad()
def token_stats(model: nn.Module, rows: list[list[int]], pad_id: int, start: int = 1,
                batch_size: int = 16) -> TokenStats:
    """Scores of tokens ``rows[i][start:]`` given everything before them, batched by ``batch_size``."""
    if start < 1:
        raise ValueError(f"start must be >= 1 (the first token has no left context), got {start}")
    if any(len(r) <= start for r in rows):
        raise ValueError(f"every row needs more than start={start} tokens")
    out_lp, out_mu, out_sd = [], [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, : len(r)] = torch.tensor(r)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        if not torch.isfinite(logits).all():
            raise FloatingPointError("the model produced non-finite logits")
        lp, mu, sd = next_token_stats(logits[:, :-1], ids[:, 1:])  # every position of the batch at once
        for j, r in enumerate(chunk):
            out_lp.append(lp[j, start - 1:len(r) - 1])
            out_mu.append(mu[j, start - 1:len(r) - 1])
            out_sd.append(sd[j, start - 1:len(r) - 1])
    return TokenStats(out_lp, out_mu, out_sd)
