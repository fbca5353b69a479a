"""Error statistics of an exposure estimator against exact exposure (used by ``exposure_check``).

Input: one record per canary with its exact exposure, whether that value is *censored* (the secret
ranks first, so enumeration only says "at least log2|R|"), and, per estimator, one estimate per
independent sample seed. The error is ``estimate - exact`` in bits. A band is the central
``coverage`` interval of the pooled errors (5th-95th percentile for 90%); its edges get a
percentile-bootstrap confidence interval that resamples *canaries* (each brings all its seeds), since
seeds of one canary share the same systematic fit error. Censored canaries are left out of the bands
(their error is not known) and summarised on their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

PRIMARY_OK = "skewnorm_estimate"
PRIMARY_REPLACE = "exact_or_empirical_rank"


def _tails(coverage: float) -> list[float]:
    """Percentiles of the central ``coverage`` interval (rounded: 50 * (1 - 0.9) is not 5.0 in floats)."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    tail = round(50.0 * (1.0 - coverage), 9)
    return [tail, 100.0 - tail]


def band(errors: np.ndarray, coverage: float = 0.9) -> tuple[float, float]:
    """The central ``coverage`` interval of ``errors`` (linear-interpolated percentiles)."""
    errors = np.asarray(errors, dtype=np.float64).ravel()
    if errors.size == 0:
        raise ValueError("no errors to take a band of")
    lo, hi = np.percentile(errors, _tails(coverage))
    return float(lo), float(hi)


def bootstrap_band(per_canary: Sequence[np.ndarray], coverage: float = 0.9, n_boot: int = 1000,
                   seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile-bootstrap ``level`` intervals of the band's two edges, resampling whole canaries.

    ``per_canary``: one array of errors (one per seed) per canary, all of the same length.
    """
    mat = np.stack([np.asarray(e, dtype=np.float64) for e in per_canary])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, mat.shape[0], size=(n_boot, mat.shape[0]))
    pooled = mat[idx].reshape(n_boot, -1)
    edges = np.percentile(pooled, _tails(coverage), axis=1)  # (2, n_boot)
    lo_ci = np.percentile(edges[0], _tails(level))
    hi_ci = np.percentile(edges[1], _tails(level))
    return {"lo": [float(lo_ci[0]), float(lo_ci[1])], "hi": [float(hi_ci[0]), float(hi_ci[1])]}


def error_summary(per_canary: Sequence[np.ndarray], band_bits: float = 1.0, coverage: float = 0.9,
                  n_boot: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """Bias, spread, band (with bootstrap CI) and whether the band lies within ``±band_bits``; None if empty."""
    if len(per_canary) == 0:
        return None
    pooled = np.concatenate([np.asarray(e, dtype=np.float64) for e in per_canary])
    lo, hi = band(pooled, coverage)
    return {"canaries": len(per_canary), "pairs": int(pooled.size), "bias": float(pooled.mean()),
            "median": float(np.median(pooled)), "rmse": float(np.sqrt(np.mean(pooled ** 2))),
            "band": [lo, hi], "band_ci": bootstrap_band(per_canary, coverage, n_boot, seed),
            "within": bool(-band_bits <= lo and hi <= band_bits),
            "share_within": float(np.mean(np.abs(pooled) <= band_bits))}


def exposure_bin(exact: float, edges: Sequence[float]) -> str:
    """Label of the exact-exposure bin: ``<e0``, ``e0-e1``, ..., ``>=eN`` (bits)."""
    labels = bin_labels(edges)
    for edge, label in zip(edges, labels, strict=False):
        if exact < edge:
            return label
    return labels[-1]


def bin_labels(edges: Sequence[float]) -> list[str]:
    """Every bin label of :func:`exposure_bin`, in order."""
    if not edges or list(edges) != sorted(edges):
        raise ValueError(f"bin edges must be a non-empty increasing list, got {list(edges)}")
    out = [f"<{edges[0]:g}"]
    out += [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return [*out, f">={edges[-1]:g}"]


def _groups(records: list[dict[str, Any]], edges: Sequence[float]) -> dict[str, list[int]]:
    """Indices of the uncensored records in each reporting group."""
    live = [i for i, r in enumerate(records) if not r["censored"]]
    groups: dict[str, list[int]] = {"all": live, "members": [i for i in live if records[i]["member"]],
                                    "nonmembers": [i for i in live if not records[i]["member"]]}
    for kind in sorted({records[i]["kind"] for i in live}):
        groups[f"kind:{kind}"] = [i for i in live if records[i]["kind"] == kind]
    for label in bin_labels(edges):
        groups[f"bin:{label}"] = [i for i in live if exposure_bin(records[i]["exact"], edges) == label]
    return groups


def summarise_estimator(records: list[dict[str, Any]], name: str, edges: Sequence[float], band_bits: float = 1.0,
                        coverage: float = 0.9, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """:func:`error_summary` of estimator ``name`` (``record["estimates"][name]``) in every group."""
    errs = [np.asarray(r["estimates"][name], dtype=np.float64) - r["exact"] for r in records]
    return {g: error_summary([errs[i] for i in idx], band_bits, coverage, n_boot, seed)
            for g, idx in _groups(records, edges).items()}


def censored_summary(records: list[dict[str, Any]], name: str, band_bits: float = 1.0) -> dict[str, Any]:
    """Canaries that rank first (exact exposure = log2|R|, a lower bound): how often the estimate falls
    more than ``band_bits`` below that bound (an error known to exceed the band)."""
    cens = [r for r in records if r["censored"]]
    if not cens:
        return {"canaries": 0}
    est = [np.asarray(r["estimates"][name], dtype=np.float64) for r in cens]
    under = np.concatenate([e < r["exact"] - band_bits for e, r in zip(est, cens, strict=True)])
    return {"canaries": len(cens), "pairs": int(under.size), "share_below_bound": float(under.mean()),
            "median_estimate_minus_bound": float(np.median(np.concatenate(
                [e - r["exact"] for e, r in zip(est, cens, strict=True)]))),
            "kinds": sorted({r["kind"] for r in cens})}


def judge(groups: dict[str, dict[str, Any] | None], censored: dict[str, Any] | None, band_bits: float,
          coverage: float, min_canaries: int = 3) -> dict[str, bool]:
    """Verdict (within ``±band_bits``?) of every group an estimator is judged on: the pooled band, the band
    of every exact-exposure bin holding at least ``min_canaries`` canaries (production reads every range,
    and the pooled band depends on how many easy, near-zero canaries the mix holds), and the censored
    canaries, whose estimate may fall more than ``band_bits`` below their lower bound in at most
    ``(1 - coverage) / 2`` of the cases (the share one band edge allows)."""
    if groups.get("all") is None:
        raise ValueError("no uncensored canary: the estimator cannot be judged")
    out = {"all": bool(groups["all"]["within"])}
    for g, s in groups.items():
        if g.startswith("bin:") and s is not None and s["canaries"] >= min_canaries:
            out[g] = bool(s["within"])
    if censored and censored.get("canaries", 0) >= min_canaries:
        out["censored"] = censored["share_below_bound"] <= round((1.0 - coverage) / 2, 9)
    return out


def _outside_with_confidence(s: dict[str, Any], band_bits: float) -> bool:
    ci = s["band_ci"]
    return ci["lo"][1] < -band_bits or ci["hi"][0] > band_bits


def conclusion(errors: dict[str, dict[str, Any]], censored: dict[str, dict[str, Any]], primary: str,
               band_bits: float, coverage: float, sample_sizes: Sequence[int], min_canaries: int = 3) -> dict[str, Any]:
    """The recommendation, computed by :func:`judge` from the primary estimator's bands and the thresholds."""
    groups = errors[primary]
    verdicts = judge(groups, censored.get(primary), band_bits, coverage, min_canaries)
    within = all(verdicts.values())
    main = groups["all"]
    lo, hi = main["band"]
    failed = [g for g, ok in verdicts.items() if not ok]
    sure = [g for g in failed if g != "censored" and _outside_with_confidence(groups[g], band_bits)]
    ok_sizes = [n for n in sample_sizes if f"skewnorm_{n}" in errors
                and all(judge(errors[f"skewnorm_{n}"], censored.get(f"skewnorm_{n}"), band_bits, coverage,
                              min_canaries).values())]
    emp_sizes = [n for n in sample_sizes if ((errors.get(f"empirical_{n}") or {}).get("in_range") or {}).get("within")]
    text = (f"The {100 * coverage:g}% band of the error of `{primary}` (estimate - exact) is [{lo:+.2f}, {hi:+.2f}] "
            f"bits pooled over {main['canaries']} uncensored canaries x {main['pairs'] // max(1, main['canaries'])} "
            f"sample seeds")
    for g in verdicts:
        if g.startswith("bin:"):
            b = groups[g]["band"]
            text += f"; [{b[0]:+.2f}, {b[1]:+.2f}] for exact exposure {g[4:]} bits ({groups[g]['canaries']} canaries)"
    if "censored" in verdicts:
        c = censored[primary]
        text += (f"; {c['share_below_bound']:.0%} of the estimates of the {c['canaries']} canaries that rank first "
                 f"fall more than {band_bits:g} bit below the exact lower bound")
    text += f". {'Within' if within else 'Not within'} ±{band_bits:g} bit"
    if failed:
        text += f" (failing: {', '.join(failed)}; with 95% bootstrap confidence: {', '.join(sure) or 'none'})"
    return {"primary_estimator": primary, "band_bits": band_bits, "coverage": coverage, "min_canaries": min_canaries,
            "band": [lo, hi], "band_ci": main["band_ci"], "verdicts": verdicts, "within_band": within,
            "failing_with_confidence": sure, "skewnorm_sample_sizes_within_band": ok_sizes,
            "empirical_sample_sizes_within_band_in_range": emp_sizes,
            "primary_metric_recommendation": PRIMARY_OK if within else PRIMARY_REPLACE, "statement": text + "."}


def direct_agreement(records: list[dict[str, Any]], n_samples: int) -> dict[str, Any]:
    """How far the estimates read from enumerated scores (``as_called_<n>``) are from ``estimated_exposure``
    run on the model with the same seeds (``record["direct"]``)."""
    exp_d, lp_d = [], []
    for r in records:
        for d in r["direct"]:
            exp_d.append(abs(d["exposure"] - r["estimates"][f"as_called_{n_samples}"][d["seed"]]))
            lp_d.append(abs(d["secret_logprob"] - r["secret_logprob"]))
    return {"pairs": len(exp_d), "max_abs_exposure_diff": max(exp_d, default=None),
            "max_abs_secret_logprob_diff": max(lp_d, default=None)}


def is_censored(rank: float) -> bool:
    """Whether an exact rank only bounds the exposure (the secret is likelier than every other candidate)."""
    return math.isclose(rank, 1.0)
