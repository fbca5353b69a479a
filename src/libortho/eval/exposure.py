"""Exposure of an inserted secret (Carlini et al., "The Secret Sharer", 2019).

``exposure = log2 |R| - log2 rank``, where ``rank`` is the secret's position when every candidate
of its space ``R`` is ordered by the model's likelihood given the record's prefix (1 = most likely;
ties share the mid rank). A perfectly memorised secret has exposure ``log2 |R|``; a secret the
model never saw has about 1-2 bits.

- Exact, by enumeration, when ``|R|`` is small. Candidates are scored in batches on top of the
  prefix's key/value cache (computed once). When the tokenizer spells every alphabet character as
  one token whatever its neighbours (bytes; SmolLM2's digits), all ``A^n`` secrets are scored as a
  trie, one character per level on its parent's cache; the last level's distribution gives all
  ``A`` endings at once.
- Estimated otherwise: score a uniform sample of candidates, fit a skew-normal to their negative
  log-likelihoods, and read ``rank/|R|`` as the fitted CDF at the secret's value. With 64 samples
  this read is checked against exact enumeration on SmolLM2 in ``experiments/exposure_check.py``
  (``docs/results/exposure_check``); :func:`empirical_exposure` is the assumption-free alternative
  (the secret's rank among the samples): binomial sampling noise only, but it cannot read past
  ``log2(n + 1)`` bits.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from libortho.data.canaries import Canary, SecretSpace
from libortho.data.records import common_prefix_len, encode_many, separator_id  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class ExposureResult:
    """Exposure of one secret and how it was obtained."""

    exposure: float
    method: str  # "exact" or "estimated"
    size_log2: float
    secret_logprob: float  # log-probability of the secret's tokens after the shared context (head excluded)
    rank: float | None = None  # exact: the secret's rank in R
    n_candidates: int = 0  # exact: |R|; estimated: the sample size
    sample_fraction_above: float | None = None  # estimated: share of sampled candidates at least as likely

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def exposure_from_rank(rank: float, size_log2: float) -> float:
    """``log2 |R| - log2 rank``."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return size_log2 - math.log2(rank)


def mid_rank(secret_score: float, others: torch.Tensor) -> float:
    """Rank of ``secret_score`` among ``others`` (the other candidates; higher is likelier), ties halved."""
    others = others.double()
    return 1.0 + float((others > secret_score).sum()) + 0.5 * float((others == secret_score).sum())


@torch.no_grad()
def prefix_cache(model: nn.Module, context: list[int]) -> tuple[Any, torch.Tensor]:
    """The key/value cache of ``context`` (batch 1) and the log-probabilities of the next token."""
    out = model(input_ids=torch.tensor([context]), use_cache=True)
    return out.past_key_values, torch.log_softmax(out.logits[0, -1].double(), dim=-1)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` without materialising the whole log-softmax in float64."""
    lse = torch.logsumexp(logits.float(), dim=-1).double()
    return logits.float().gather(-1, targets.unsqueeze(-1)).squeeze(-1).double() - lse


@torch.no_grad()
def score_continuations(model: nn.Module, context: list[int], conts: list[list[int]],
                        batch_size: int = 64, cache: tuple[Any, torch.Tensor] | None = None) -> torch.Tensor:
    """Total log-probability of each continuation after ``context`` ``(n,)``, sharing the context's cache."""
    if not conts or any(not c for c in conts):
        raise ValueError("need at least one continuation, none of them empty")
    kv, last = cache if cache is not None else prefix_cache(model, context)
    out = torch.empty(len(conts), dtype=torch.float64)
    for i in range(0, len(conts), batch_size):
        chunk = conts[i:i + batch_size]
        width = max(len(c) for c in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for j, c in enumerate(chunk):
            ids[j, : len(c)] = torch.tensor(c)
            mask[j, : len(c)] = True
        total = last[ids[:, 0]]
        if width > 1:
            batch_kv = copy.deepcopy(kv)
            batch_kv.batch_repeat_interleave(len(chunk))
            logits = model(input_ids=ids[:, :-1], past_key_values=batch_kv, use_cache=True).logits
            lp = _token_logprobs(logits, ids[:, 1:])
            total = total + (lp * mask[:, 1:]).sum(dim=1)
        out[i:i + len(chunk)] = total
    return out


@dataclass(frozen=True)
class CharLayout:
    """How a canary's candidates tokenize when each alphabet character is one context-free token."""

    context: list[int]  # [SEP] + prefix tokens shared by every candidate
    head: list[int]  # tokens of the fixed head of the secret (after the context)
    char_tokens: list[int]  # token id of each alphabet character, in alphabet order


def _full_ids(tokenizer: Any, canary: Canary, frees: list[str]) -> list[list[int]]:
    sep = separator_id(tokenizer)
    texts = [canary.prefix + canary.space.compose(f) for f in frees]
    return [[sep, *ids] for ids in encode_many(tokenizer, texts)]


def char_layout(tokenizer: Any, canary: Canary) -> CharLayout | None:
    """The :class:`CharLayout` of ``canary`` if its tokenizer spells candidates character by character
    (checked on candidates that put every alphabet character at every position), else None."""
    space = canary.space
    if space.luhn:
        return None
    a, n = space.alphabet, space.n_free
    frees = [space.free_part(canary.secret)] + ["".join(a[(j + i) % len(a)] for i in range(n)) for j in range(len(a))]
    fulls = _full_ids(tokenizer, canary, frees)
    ctx_len = min(common_prefix_len(fulls[0], f) for f in fulls)
    head_len = len(fulls[0]) - ctx_len - n
    if head_len < 0:
        return None
    char_tok: dict[str, int] = {}
    head = fulls[0][ctx_len:ctx_len + head_len]
    for free, full in zip(frees, fulls, strict=True):
        if len(full) != ctx_len + head_len + n or full[ctx_len:ctx_len + head_len] != head:
            return None
        for ch, t in zip(free, full[ctx_len + head_len:], strict=True):
            if char_tok.setdefault(ch, t) != t:
                return None
    if len(set(char_tok.values())) != len(a) or ctx_len + head_len == 0:
        return None
    return CharLayout(fulls[0][:ctx_len], fulls[0][ctx_len:ctx_len + head_len], [char_tok[c] for c in a])


@torch.no_grad()
def enumerate_charwise(model: nn.Module, layout: CharLayout, n_free: int, batch_size: int = 256) -> torch.Tensor:
    """Log-probability of every candidate ``(A^n_free,)`` in enumeration order.

    The candidates form a trie: level ``k`` feeds one character to each of the ``A^k`` prefixes on
    top of its parent's key/value cache, and the last level's distribution scores all ``A`` endings
    at once, so ``A + A^2 + ... + A^(n_free-1)`` one-token rows are run in all (not ``n_free - 1``
    tokens for each of ``A^(n_free-1)`` stems). At most ``batch_size`` rows run at a time.
    """
    kv, last = prefix_cache(model, layout.context + layout.head)
    chars = torch.tensor(layout.char_tokens)
    return _expand(model, kv, last.unsqueeze(0), torch.zeros(1, dtype=torch.float64), chars, n_free,
                   max(batch_size, chars.numel()))


def _expand(model: nn.Module, kv: Any, dist: torch.Tensor, base: torch.Tensor, chars: torch.Tensor,
            levels: int, batch_size: int) -> torch.Tensor:
    """Scores of all ``A^levels`` completions of ``r`` prefixes: ``base`` ``(r,)`` is each prefix's
    log-probability, ``dist`` ``(r, V)`` its next-token log-distribution, ``kv`` its cache (r rows)."""
    n_chars, r = chars.numel(), base.numel()
    scores = base.unsqueeze(1) + dist[:, chars]  # (r, A)
    if levels == 1:
        return scores.reshape(-1)
    per_chunk = max(1, batch_size // n_chars)
    parts = []
    for i in range(0, r, per_chunk):
        rows = torch.arange(i, min(r, i + per_chunk))
        child_kv = copy.deepcopy(kv)
        if rows.numel() < r:
            child_kv.batch_select_indices(rows)
        child_kv.batch_repeat_interleave(n_chars)
        ids = chars.repeat(rows.numel()).unsqueeze(1)
        logits = model(input_ids=ids, past_key_values=child_kv, use_cache=True).logits[:, -1]
        child_dist = torch.log_softmax(logits.double(), dim=-1)
        parts.append(_expand(model, child_kv, child_dist, scores[rows].reshape(-1), chars, levels - 1, batch_size))
    return torch.cat(parts)


def _tokenized_candidates(tokenizer: Any, canary: Canary, frees: list[str]) -> tuple[list[int], list[list[int]]]:
    """(shared context, continuation tokens of each candidate) with the context as long as all allow."""
    fulls = _full_ids(tokenizer, canary, frees)
    ctx_len = min(common_prefix_len(fulls[0], f) for f in fulls)
    if ctx_len == len(min(fulls, key=len)):
        ctx_len -= 1  # every continuation keeps at least one token
    if ctx_len < 1:
        raise ValueError("candidates share no context token: cannot score them on a common prefix")
    return fulls[0][:ctx_len], [f[ctx_len:] for f in fulls]


def candidate_scores(model: nn.Module, tokenizer: Any, canary: Canary, batch_size: int = 256) -> torch.Tensor:
    """Log-probability of every candidate of the secret's space after the shared context ``(|R|,)``, in
    :meth:`SecretSpace.enumerate` order (char-wise as a trie when the tokenizer allows, else one by one)."""
    space = canary.space
    layout = char_layout(tokenizer, canary)
    if layout is not None:
        return enumerate_charwise(model, layout, space.n_free, batch_size)
    frees = ["".join(c) for c in itertools.product(space.alphabet, repeat=space.n_free)]
    context, conts = _tokenized_candidates(tokenizer, canary, frees)
    return score_continuations(model, context, conts, batch_size)


def exact_exposure(model: nn.Module, tokenizer: Any, canary: Canary, batch_size: int = 256) -> ExposureResult:
    """Exposure by scoring every candidate of the secret's space."""
    space = canary.space
    scores = candidate_scores(model, tokenizer, canary, batch_size)
    idx = space.index(canary.secret)
    secret = float(scores[idx])
    others = torch.cat([scores[:idx], scores[idx + 1:]])
    rank = mid_rank(secret, others)
    return ExposureResult(exposure_from_rank(rank, space.size_log2), "exact", space.size_log2, secret, rank,
                          int(scores.numel()))


def skewnorm_exposure(secret_nll: float, sample_nlls: np.ndarray, size_log2: float) -> float:
    """``-log2 P[nll <= secret_nll]`` under a skew-normal fitted to sampled candidates' NLLs, in [0, log2|R|]."""
    from scipy import stats

    sample_nlls = np.asarray(sample_nlls, dtype=np.float64)
    if sample_nlls.size < 8 or not np.isfinite(sample_nlls).all():
        raise ValueError("the skew-normal fit needs at least 8 finite sample scores")
    try:
        params = stats.skewnorm.fit(sample_nlls)
        log_cdf = float(stats.skewnorm.logcdf(secret_nll, *params))
    except stats.FitError:  # degenerate sample (all candidates equally likely): the empirical CDF, ties halved
        cdf = (np.sum(sample_nlls < secret_nll) + 0.5 * np.sum(sample_nlls == secret_nll)) / sample_nlls.size
        log_cdf = math.log(cdf) if cdf > 0 else -math.inf
    return float(min(size_log2, max(0.0, -log_cdf / math.log(2))))


def empirical_exposure(secret_score: float, sample_scores: np.ndarray, size_log2: float) -> float:
    """``-log2 (r / (n + 1))`` with ``r`` the secret's mid-rank among itself and ``n`` sampled candidates
    (higher score is likelier), in [0, log2|R|]: no distributional assumption, but it cannot read past
    ``log2(n + 1)`` bits (a secret likelier than every sample gets exactly that: a lower bound)."""
    sample_scores = np.asarray(sample_scores, dtype=np.float64)
    if sample_scores.size < 1 or not np.isfinite(sample_scores).all() or not math.isfinite(secret_score):
        raise ValueError("the empirical rank needs at least one sample and finite scores")
    rank = 1.0 + np.sum(sample_scores > secret_score) + 0.5 * np.sum(sample_scores == secret_score)
    return float(min(size_log2, max(0.0, math.log2(sample_scores.size + 1) - math.log2(rank))))


def sample_candidates(space: SecretSpace, secret: str, n_samples: int, seed: int = 0) -> list[str]:
    """The free parts of ``n_samples`` candidates drawn uniformly (with replacement) from ``space`` minus
    ``secret``, reproducibly from ``seed`` and the secret: the sample :func:`estimated_exposure` scores."""
    if space.size < 2:
        raise ValueError("exposure needs a secret space with more than one candidate")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    rng = random.Random(f"{seed}:{secret}")
    own = space.free_part(secret)
    frees: list[str] = []
    while len(frees) < n_samples:
        cand = space.free_part(space.sample(rng))
        if cand != own:
            frees.append(cand)
    return frees


def estimated_exposure(model: nn.Module, tokenizer: Any, canary: Canary, n_samples: int = 256, seed: int = 0,
                       batch_size: int = 64) -> ExposureResult:
    """Exposure from ``n_samples`` uniformly drawn candidates and a skew-normal fit (Carlini et al. §4.3)."""
    space = canary.space
    frees = [space.free_part(canary.secret), *sample_candidates(space, canary.secret, n_samples, seed)]
    context, conts = _tokenized_candidates(tokenizer, canary, frees)
    scores = score_continuations(model, context, conts, batch_size)
    secret, sample = float(scores[0]), scores[1:].numpy()
    expo = skewnorm_exposure(-secret, -sample, space.size_log2)
    return ExposureResult(expo, "estimated", space.size_log2, secret, None, n_samples,
                          float((sample >= secret).mean()))


def canary_exposure(model: nn.Module, tokenizer: Any, canary: Canary, max_enumerate: int = 100_000,
                    n_samples: int = 256, seed: int = 0, batch_size: int = 64) -> ExposureResult:
    """Exact exposure when ``|R| <= max_enumerate``, the skew-normal estimate otherwise."""
    if canary.space.size <= max_enumerate:
        return exact_exposure(model, tokenizer, canary, batch_size=max(batch_size, 256))
    return estimated_exposure(model, tokenizer, canary, n_samples, seed, batch_size)
