"""Perplexity of a causal LM on fixed token blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    """Mean next-token negative log-likelihood over all scored tokens, and its exponential."""

    ppl: float
    nll: float
    tokens: int
    block_nll: tuple[float, ...] = ()  # mean NLL of each block, in order (for paired comparisons)


@torch.no_grad()
def token_nll(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``(batch, seq_len - 1)`` of each next token given its prefix."""
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(input_ids.shape[0], -1)


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4,
               progress: bool = False, desc: str = "ppl") -> PerplexityResult:
    """Perplexity over ``blocks`` (n, seq_len); every block is scored independently."""
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be (n, seq_len >= 2), got {tuple(blocks.shape)}")
    total, count, per_block = 0.0, 0, []
    for i in tqdm(range(0, blocks.shape[0], batch_size), desc=desc, disable=not progress):
        nll = token_nll(model, blocks[i:i + batch_size])
        if not torch.isfinite(nll).all():
            raise FloatingPointError("non-finite token loss: the model produced NaN/inf logits")
        total += float(nll.double().sum())
        count += nll.numel()
        per_block += nll.double().mean(1).tolist()
    mean = total / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=count, block_nll=tuple(per_block))
