"""Membership inference attacks on whole records, in one registry, and their ROC summaries.

Every attack maps a record's token scores to one number, oriented so that *higher means "more
likely a member"*:

- ``loss``: mean token log-likelihood (Yeom et al.);
- ``zlib``: negative mean NLL divided by the zlib-compressed length of the text in bytes
  (Carlini et al. 2021, as in Shi et al.'s min-k% paper);
- ``min_k``: mean of the lowest k% token log-likelihoods (Shi et al. 2024), k = 20%;
- ``min_k_plus_plus``: the same over ``(log p(x_t) - mu_t) / sigma_t`` (Zhang et al. 2024), with
  mu and sigma the mean and std of log p under the model's own next-token distribution;
- ``reference``: target log-likelihood minus a reference model's (the model before fine-tuning).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from libortho.eval.scoring import TokenStats


@dataclass(frozen=True)
class RecordScores:
    """One record's token scores under the target (and optionally a reference) model."""

    text: str
    logp: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    ref_logp: torch.Tensor | None = None


Attack = Callable[[RecordScores, float], float]
ATTACKS: dict[str, Attack] = {}


def register_attack(name: str) -> Callable[[Attack], Attack]:
    """Decorator adding an attack to :data:`ATTACKS`."""

    def wrap(fn: Attack) -> Attack:
        ATTACKS[name] = fn
        return fn

    return wrap


def lowest_k_mean(values: torch.Tensor, k: float) -> float:
    """Mean of the ``ceil(k * n)`` smallest values (at least one)."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    n = max(1, math.ceil(k * values.numel()))
    return float(torch.sort(values.double()).values[:n].mean())


@register_attack("loss")
def loss_attack(r: RecordScores, _k: float) -> float:
    """Mean token log-likelihood (the negative loss)."""
    return float(r.logp.double().mean())


@register_attack("zlib")
def zlib_attack(r: RecordScores, _k: float) -> float:
    """Negative mean NLL over the zlib-compressed size (bytes) of the record's text."""
    return float(r.logp.double().mean()) / len(zlib.compress(r.text.encode("utf-8")))


@register_attack("min_k")
def min_k_attack(r: RecordScores, k: float) -> float:
    """Mean of the lowest k% token log-likelihoods."""
    return lowest_k_mean(r.logp, k)


@register_attack("min_k_plus_plus")
def min_k_plus_plus_attack(r: RecordScores, k: float) -> float:
    """Mean of the lowest k% of the standardised log-likelihoods ``(log p - mu) / sigma``."""
    z = (r.logp.double() - r.mu.double()) / r.sigma.double().clamp(min=1e-12)
    return lowest_k_mean(z, k)


@register_attack("reference")
def reference_attack(r: RecordScores, _k: float) -> float:
    """Mean log-likelihood under the target minus under the reference model (calibrated loss)."""
    if r.ref_logp is None:
        raise ValueError("the reference attack needs the reference model's token scores")
    return float(r.logp.double().mean() - r.ref_logp.double().mean())


def records(texts: list[str], stats: TokenStats, ref: TokenStats | None = None) -> list[RecordScores]:
    """Bundle texts with target (and reference) token scores."""
    if len(texts) != len(stats) or (ref is not None and len(ref) != len(stats)):
        raise ValueError("texts, target scores and reference scores must have one entry per record")
    return [RecordScores(t, stats.logp[i], stats.mu[i], stats.sigma[i], None if ref is None else ref.logp[i])
            for i, t in enumerate(texts)]


def attack_scores(recs: list[RecordScores], k: float = 0.2, attacks: list[str] | None = None,
                  ) -> dict[str, np.ndarray]:
    """Every requested attack's score per record (``reference`` only when reference scores exist)."""
    has_ref = all(r.ref_logp is not None for r in recs)
    names = attacks if attacks is not None else [a for a in ATTACKS if a != "reference" or has_ref]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        raise KeyError(f"unknown attack(s) {unknown}; registered: {sorted(ATTACKS)}")
    return {a: np.array([ATTACKS[a](r, k) for r in recs], dtype=np.float64) for a in names}


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Highest true-positive rate over thresholds whose false-positive rate is <= ``fpr``."""
    from sklearn.metrics import roc_curve

    f, t, _ = roc_curve(labels, scores)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def roc_summary(member: np.ndarray, nonmember: np.ndarray) -> dict[str, float]:
    """ROC AUC and TPR at 1% and 0.1% FPR of scores where members should score higher.

    With ``n`` non-members the smallest non-zero FPR is ``1/n``: below it, TPR at that FPR means
    "members scored above every non-member". The counts are reported so a reader can judge.
    """
    from sklearn.metrics import roc_auc_score

    member, nonmember = np.asarray(member, float), np.asarray(nonmember, float)
    if member.size == 0 or nonmember.size == 0:
        raise ValueError("need at least one member and one non-member score")
    if not (np.isfinite(member).all() and np.isfinite(nonmember).all()):
        raise ValueError("MIA scores must be finite")
    labels = np.r_[np.ones(member.size), np.zeros(nonmember.size)]
    scores = np.r_[member, nonmember]
    return {"auc": float(roc_auc_score(labels, scores)), "tpr_at_1pct_fpr": tpr_at_fpr(labels, scores, 0.01),
            "tpr_at_0.1pct_fpr": tpr_at_fpr(labels, scores, 0.001), "n_members": int(member.size),
            "n_nonmembers": int(nonmember.size)}


def mia_report(member_recs: list[RecordScores], nonmember_recs: list[RecordScores], k: float = 0.2,
               ) -> dict[str, dict[str, float]]:
    """ROC summary of every attack on member vs non-member records."""
    m = attack_scores(member_recs, k)
    n = attack_scores(nonmember_recs, k, attacks=list(m))
    return {a: roc_summary(m[a], n[a]) for a in m}
