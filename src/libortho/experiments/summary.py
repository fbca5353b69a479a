"""Derived figures of a kill-switch result: one table row per method, and the seed's claims checked.

Everything here is computed from the measured metrics in the result dict, never typed in; the
report renders this summary and nothing else.
"""

from __future__ import annotations

from typing import Any

from libortho.eval.stats import clopper_pearson, mcnemar_exact

SEED_CLAIMS = {
    "leak_reduction": "alpha = 0 removes 99.8% of canary leakage (extraction)",
    "general_loss": "general capability drops by < 2% at alpha = 0 (general perplexity rises < 2%), "
                    "against alpha = 1",
    "general_loss_vs_fp": "general capability drops by < 2% at alpha = 0 (general perplexity rises < 2%), "
                          "against the FP fine-tuned model",
    "private_error_ratio": "private error ratio err_p(off) / err_p(on) > 1.5",
    "general_error_ratio": "general error ratio err_g(off) / err_g(on) < 2.0",
    "private_error_explodes": "private error explodes (> 10x) at alpha = 0",
}


def skill_retained(ppl_pre: float, ppl_x: float, ppl_ft: float) -> float | None:
    """``(PPL_pre - PPL_x) / (PPL_pre - PPL_ft)``: 1 keeps the whole fine-tuning gain on the domain, 0 none."""
    gain = ppl_pre - ppl_ft
    if abs(gain) < 1e-12:
        return None
    return (ppl_pre - ppl_x) / gain


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def exact_exposure(per_canary: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean member exposure over the canaries whose exposure was computed exactly (by enumeration),
    overall and by repetition count.

    This is the primary exposure figure: ``docs/results/exposure_check`` measured the 64-sample
    skew-normal estimate against exact enumeration on SmolLM2 and found its 90% error band wider
    than +-1 bit, so estimated exposures are reported beside it, never mixed into it.
    """
    exact = [c for c in per_canary if c.get("exposure_method") == "exact"]
    by: dict[str, list[float]] = {}
    for c in exact:
        by.setdefault(str(c["repeats"]), []).append(c["exposure"])
    return {"mean": sum(c["exposure"] for c in exact) / len(exact) if exact else None, "n": len(exact),
            "kinds": sorted({c["kind"] for c in exact}),
            "by_repeats": {k: sum(v) / len(v) for k, v in sorted(by.items(), key=lambda kv: int(kv[0]))}}


def method_row(name: str, entry: dict[str, Any], pre: dict[str, Any], ft: dict[str, Any]) -> dict[str, Any]:
    """The table row of one method."""
    m = entry["metrics"]
    aucs = {a: v["auc"] for a, v in m["mia"].items()}
    best = max(aucs, key=lambda a: aucs[a])
    cost = entry.get("cost", {})
    exact = exact_exposure(m["per_canary"])
    return {
        "name": name, "label": entry["label"], "group": entry["group"], "alpha": entry.get("alpha"),
        "extraction": m["extraction"]["rate"], "extraction_by_repeats": m["extraction"]["by_repeats"],
        "per_canary_extracted": [bool(c["extracted"]) for c in m["per_canary"]],
        "per_canary_secret": [c["secret"] for c in m["per_canary"]],
        "exposure": exact["mean"], "exposure_by_repeats": exact["by_repeats"], "exposure_exact_n": exact["n"],
        "exposure_exact_kinds": exact["kinds"],
        "exposure_all": m["exposure"]["mean"], "exposure_all_by_repeats": m["exposure"]["by_repeats"],
        "exposure_by_kind": m["exposure"]["by_kind"], "exposure_nonmember": m["exposure"]["nonmember_mean"],
        "mia_auc": aucs, "mia_best_attack": best, "mia_best_auc": aucs[best],
        "mia_tpr_1pct": {a: v["tpr_at_1pct_fpr"] for a, v in m["mia"].items()},
        "private_nll": m["private_nll"], "ppl_domain": m["ppl_domain"], "ppl_general": m["ppl_general"],
        "nll_general": m["nll_general"],
        "skill_retained": skill_retained(pre["ppl_domain"], m["ppl_domain"], ft["ppl_domain"]),
        "general_ppl_change_vs_ft": _ratio(m["ppl_general"], ft["ppl_general"]) - 1 if ft["ppl_general"] else None,
        "wall_s": cost.get("wall_s"), "reused": cost.get("reused", False),
        "bits_per_param": cost.get("total_bits_per_param"),
    }


def _claim(key: str, measured: float | None, holds: bool | None, detail: str, seed_value: str) -> dict[str, Any]:
    return {"key": key, "claim": SEED_CLAIMS[key], "seed_value": seed_value, "measured": measured,
            "holds": holds, "detail": detail}


def leak_counts(on: list[bool], off: list[bool], level: float = 0.95) -> dict[str, Any]:
    """Extraction counts at alpha = 1 and alpha = 0 with exact intervals and McNemar's exact test.

    The seed states a percentage reduction; with a few dozen canaries that percentage is noise
    unless the counts and their intervals are shown, so the claim is judged on them.
    """
    n = len(on)
    k_on, k_off = sum(on), sum(off)
    ci_on, ci_off = clopper_pearson(k_on, n, level), clopper_pearson(k_off, n, level)
    test = mcnemar_exact(on, off)
    return {"n": n, "extracted_alpha1": k_on, "extracted_alpha0": k_off, "ci_alpha1": [ci_on.low, ci_on.high],
            "ci_alpha0": [ci_off.low, ci_off.high], "level": level, "mcnemar_only_alpha1": test.b,
            "mcnemar_only_alpha0": test.c, "mcnemar_p": test.p_value,
            "reduction": None if k_on == 0 else 1 - k_off / k_on}


def leak_reduction_holds(counts: dict[str, Any], target: float = 0.998, alpha: float = 0.05) -> bool | None:
    """True only if the point reduction reaches ``target`` *and* McNemar's test rejects "no change" at
    ``alpha``; False if the point reduction misses the target; None when nothing leaks at alpha = 1
    (undefined) or the reduction is reached but not significant on this many canaries."""
    red = counts["reduction"]
    if red is None:
        return None
    if red < target:
        return False
    return True if counts["mcnemar_p"] < alpha else None


def _leak_detail(c: dict[str, Any]) -> str:
    lv = f"{c['level']:.0%}"
    return (f"extracted {c['extracted_alpha1']}/{c['n']} at alpha=1 ({lv} CI {c['ci_alpha1'][0]:.2f}-"
            f"{c['ci_alpha1'][1]:.2f}) -> {c['extracted_alpha0']}/{c['n']} at alpha=0 ({lv} CI "
            f"{c['ci_alpha0'][0]:.2f}-{c['ci_alpha0'][1]:.2f}); canaries extracted only at alpha=1: "
            f"{c['mcnemar_only_alpha1']}, only at alpha=0: {c['mcnemar_only_alpha0']}, exact McNemar "
            f"p = {c['mcnemar_p']:.3g}" + (" (nothing extracted at alpha=1: the reduction is undefined)"
                                           if c["reduction"] is None else ""))


def _general_loss(key: str, off: dict[str, Any], ref: dict[str, Any], ref_name: str) -> dict[str, Any]:
    gl = off["ppl_general"] / ref["ppl_general"] - 1
    return _claim(key, gl, gl < 0.02, f"general perplexity {ref['ppl_general']:.3f} ({ref_name}) -> "
                  f"{off['ppl_general']:.3f} at alpha=0" + (" (lower at alpha=0)" if gl < 0 else ""), "< 2%")


def check_claims(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The seed's kill-switch claims, each with the value we measured (alpha = 0 vs alpha = 1, and the
    general-capability claim also against the FP fine-tuned model)."""
    off, on, ft = rows.get("libortho_a0"), rows.get("libortho_a1"), rows.get("ft")
    if off is None or on is None:
        return []
    if on.get("per_canary_secret") != off.get("per_canary_secret"):  # McNemar pairs canaries by position
        raise ValueError("alpha = 0 and alpha = 1 were measured on different canaries (or in another order)")
    counts = leak_counts(on["per_canary_extracted"], off["per_canary_extracted"])
    claims = [{**_claim("leak_reduction", counts["reduction"], leak_reduction_holds(counts), _leak_detail(counts),
                        ">= 99.8%"), "counts": counts},
              _general_loss("general_loss", off, on, "alpha=1")]
    if ft is not None:
        claims.append(_general_loss("general_loss_vs_fp", off, ft, "FP fine-tuned"))
    pr = _ratio(off["private_nll"], on["private_nll"])
    claims.append(_claim("private_error_ratio", pr, None if pr is None else pr > 1.5,
                         f"secret-token NLL {on['private_nll']:.3f} -> {off['private_nll']:.3f}", "> 1.5"))
    claims.append(_claim("private_error_explodes", pr, None if pr is None else pr > 10,
                         "same ratio as above", "> 10x"))
    gr = _ratio(off["nll_general"], on["nll_general"])
    claims.append(_claim("general_error_ratio", gr, None if gr is None else gr < 2.0,
                         f"general NLL {on['nll_general']:.4f} -> {off['nll_general']:.4f}", "< 2.0"))
    return claims


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Table rows for every method, the claims, and the figures that answer the experiment's question."""
    methods = {n: e for n, e in result["methods"].items() if "same_as" not in e}  # copies are not measurements
    pre, ft = methods["pre"]["metrics"], methods["ft"]["metrics"]
    rows = {n: method_row(n, e, pre, ft) for n, e in methods.items()}
    answer = {k: {"extraction": rows[k]["extraction"], "exposure": rows[k]["exposure"],
                  "skill_retained": rows[k]["skill_retained"], "ppl_general": rows[k]["ppl_general"]}
              for k in ("ft", "libortho_a0", "libortho_a1", "rtn_int4", "retrain") if k in rows}
    return {"rows": rows, "claims": check_claims(rows), "answer": answer,
            "fine_tuning_gain_ppl": pre["ppl_domain"] - ft["ppl_domain"]}
