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
    """``log p(target)``, ``E_z[log p(z)]`` and ``std_z[log p(z)]`` for logits ``(..., V)`` and targets ``(...)``."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    probs = logprobs.exp()
    mu = (probs * logprobs).sum(-1)
    var = (probs * logprobs.square()).sum(-1) - mu.square()
    lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return lp, mu, var.clamp(min=0).sqrt()


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
        for j, r in enumerate(chunk):
            pos = torch.arange(start - 1, len(r) - 1)
            lp, mu, sd = next_token_stats(logits[j, pos], ids[j, pos + 1])
            out_lp.append(lp)
            out_mu.append(mu)
            out_sd.append(sd)
    return TokenStats(out_lp, out_mu, out_sd)
