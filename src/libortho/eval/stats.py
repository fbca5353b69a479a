"""Small-sample statistics for the figures we publish: exact binomial intervals, McNemar's exact
test for paired yes/no outcomes, and a paired bootstrap for perplexity differences.

Why these: a kill-switch table compares a handful of extracted canaries (1/24 vs 3/24), where a
percentage change is meaningless without the counts and an interval; two quantized models scored
on the same held-out blocks are paired, so their perplexity difference gets a paired interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _sps


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval at ``level``."""

    estimate: float
    low: float
    high: float
    level: float
    p_value: float | None = None  # two-sided, where the method provides one

    def excludes(self, value: float = 0.0) -> bool:
        """Whether ``value`` lies outside the interval."""
        return value < self.low or value > self.high


def clopper_pearson(k: int, n: int, level: float = 0.95) -> Interval:
    """Exact (Clopper–Pearson) interval for a binomial proportion ``k / n``."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a = 1 - level
    low = 0.0 if k == 0 else float(_sps.beta.ppf(a / 2, k, n - k + 1))
    high = 1.0 if k == n else float(_sps.beta.ppf(1 - a / 2, k + 1, n - k))
    return Interval(k / n, low, high, level)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test on paired outcomes: ``b`` pairs yes→no, ``c`` pairs no→yes."""

    b: int
    c: int
    p_value: float


def mcnemar_exact(first: Sequence[bool], second: Sequence[bool]) -> McNemar:
    """Two-sided exact McNemar test of ``first`` vs ``second`` (same items, paired).

    Under the null the discordant pairs split 50/50, so the p-value is a two-sided binomial tail
    over ``b + c`` trials; with no discordant pairs it is 1.
    """
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need equal lengths, got {len(first)} and {len(second)}")
    b = sum(1 for x, y in zip(first, second, strict=True) if x and not y)
    c = sum(1 for x, y in zip(first, second, strict=True) if y and not x)
    n = b + c
    if n == 0:
        return McNemar(b, c, 1.0)
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return McNemar(b, c, min(1.0, 2 * tail))


def paired_bootstrap_ppl_diff(nll_a: Sequence[float], nll_b: Sequence[float], n_boot: int = 10_000,
                              level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile-bootstrap interval of ``PPL_a - PPL_b`` over paired evaluation blocks.

    ``nll_a[i]`` and ``nll_b[i]`` are the mean token NLLs of the *same* block under two models (all
    blocks the same length); each resample draws blocks with replacement and recomputes both
    perplexities on that draw, so block-to-block difficulty cancels in the difference.
    """
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"need two equal 1-D sequences of >= 2 block NLLs, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    diff = np.exp(a[idx].mean(1)) - np.exp(b[idx].mean(1))
    q = (1 - level) / 2
    # two-sided bootstrap p-value of "no difference": twice the smaller tail mass on either side of 0
    p = min(1.0, 2 * min(float((diff <= 0).mean()), float((diff >= 0).mean())) + 1 / n_boot)
    return Interval(float(np.exp(a.mean()) - np.exp(b.mean())), float(np.quantile(diff, q)),
                    float(np.quantile(diff, 1 - q)), level, p)


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm–Bonferroni: which hypotheses are rejected at family-wise error ``alpha``.

    Sorted ascending, the i-th smallest p-value (0-based) is compared with ``alpha / (m - i)``; the
    first one that fails stops the procedure, and it and all larger ones are kept.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    rejected = [False] * m
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (m - rank):
            break
        rejected[i] = True
    return rejected


def _percentile_interval(estimate: float, draws: np.ndarray, level: float) -> Interval:
    a = (1 - level) / 2
    return Interval(float(estimate), float(np.quantile(draws, a)), float(np.quantile(draws, 1 - a)), level)


def bootstrap_mean(values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    draws = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return _percentile_interval(float(x.mean()), draws, level)


def bootstrap_ppl(block_nll: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Perplexity ``exp(mean block NLL)`` with a percentile interval from resampling blocks (equal-length blocks)."""
    ci = bootstrap_mean(block_nll, n_boot, level, seed)
    return Interval(float(np.exp(ci.estimate)), float(np.exp(ci.low)), float(np.exp(ci.high)), level)


def pair_matrix(member: Sequence[float], nonmember: Sequence[float]) -> np.ndarray:
    """``P[i, j] = 1[m_i > n_j] + 0.5 * 1[m_i = n_j]``: the ROC AUC is its mean (Mann-Whitney)."""
    m, n = np.asarray(member, np.float64), np.asarray(nonmember, np.float64)
    return (m[:, None] > n[None, :]) + 0.5 * (m[:, None] == n[None, :])


def resample_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of ``n`` items is drawn in each of ``n_boot`` bootstrap resamples ``(n_boot, n)``."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def auc_draws(P: np.ndarray, cm: np.ndarray, cn: np.ndarray) -> np.ndarray:
    """Bootstrap AUCs from a pair matrix and resample counts of members ``cm`` and non-members ``cn``."""
    return np.einsum("bi,bi->b", cm @ P, cn) / (P.shape[0] * P.shape[1])


def bootstrap_auc(member: Sequence[float], nonmember: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                  seed: int = 0) -> Interval:
    """ROC AUC (members should score higher) with a percentile interval, resampling both groups."""
    P = pair_matrix(member, nonmember)
    rng = np.random.default_rng(seed)
    cm, cn = resample_counts(P.shape[0], n_boot, rng), resample_counts(P.shape[1], n_boot, rng)
    return _percentile_interval(float(P.mean()), auc_draws(P, cm, cn), level)


def bootstrap_privleak(member: Sequence[float], nonmember: Sequence[float], ref_member: Sequence[float],
                       ref_nonmember: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0) -> Interval:
    """MUSE's PrivLeak ``(AUC - AUC_ref) / AUC_ref`` on the same records, with a paired bootstrap interval
    (each resample draws the same members and non-members for both models)."""
    P, R = pair_matrix(member, nonmember), pair_matrix(ref_member, ref_nonmember)
    if P.shape != R.shape:
        raise ValueError("PrivLeak compares two models on the same records: score counts differ")
    rng = np.random.default_rng(seed)
    cm, cn = resample_counts(P.shape[0], n_boot, rng), resample_counts(P.shape[1], n_boot, rng)
    a, r = auc_draws(P, cm, cn), auc_draws(R, cm, cn)
    return _percentile_interval((P.mean() - R.mean()) / R.mean(), (a - r) / r, level)


def stratified_bootstrap_mean(groups: Sequence[Sequence[float]], n_boot: int = 2000, level: float = 0.95,
                              seed: int = 0) -> Interval:
    """The pooled mean of several groups (e.g. the canaries of independent seeds) with a percentile interval
    from resampling *within* each group: every resample keeps each group's size, so the interval reflects
    the sampling of items inside a seed, not a random reshuffling of how many items each seed contributes."""
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("stratified bootstrap needs at least one group and no empty group")
    rng = np.random.default_rng(seed)
    total = sum(a.size for a in arrays)
    sums = np.zeros(n_boot)
    for a in arrays:
        sums += a[rng.integers(0, a.size, size=(n_boot, a.size))].sum(axis=1)
    return _percentile_interval(float(np.concatenate(arrays).mean()), sums / total, level)


def pooled_privleak(pairs: Sequence[tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[float]]],
                    n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """The mean over independent seeds of MUSE's PrivLeak, each ``(member, nonmember, ref_member,
    ref_nonmember)`` on its seed's records: every resample draws each seed's members and non-members anew
    (the same draw for the model and its reference, as in :func:`bootstrap_privleak`) and averages the
    seeds' PrivLeaks. AUCs are not pooled across seeds: each seed is another model on other records."""
    if not pairs:
        raise ValueError("pooled PrivLeak needs at least one seed")
    rng = np.random.default_rng(seed)
    est, draws = [], np.zeros(n_boot)
    for member, nonmember, ref_member, ref_nonmember in pairs:
        P, R = pair_matrix(member, nonmember), pair_matrix(ref_member, ref_nonmember)
        if P.shape != R.shape:
            raise ValueError("PrivLeak compares two models on the same records: score counts differ")
        cm, cn = resample_counts(P.shape[0], n_boot, rng), resample_counts(P.shape[1], n_boot, rng)
        a, r = auc_draws(P, cm, cn), auc_draws(R, cm, cn)
        est.append((P.mean() - R.mean()) / R.mean())
        draws += (a - r) / r
    return _percentile_interval(float(np.mean(est)), draws / len(pairs), level)
