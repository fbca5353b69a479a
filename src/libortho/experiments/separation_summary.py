"""Figures, goals and rankings of the separation experiment, computed from its result JSON.

Every figure carries its n and a 95% interval: exact (Clopper-Pearson) for extraction counts,
percentile bootstrap over canaries for mean exposure, over members and non-members for AUCs and
(paired, the same resamples for both models) for PrivLeak, over evaluation blocks for perplexity.
The goals are the issue's, judged against the *quantized* retrain reference for INT4 rows and the
full-precision one for FP rows, so quantization loss is not mistaken for separation.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from libortho.eval.stats import (
    bootstrap_auc,
    bootstrap_mean,
    bootstrap_ppl,
    bootstrap_privleak,
    clopper_pearson,
    pooled_privleak,
    stratified_bootstrap_mean,
)

RECORD_ATTACK = "min_k_plus_plus"  # MUSE's attack for PrivLeak
PRIVLEAK_BOUND = 0.10
EXPOSURE_SLACK_BITS = 1.0
ALPHA1_EXPOSURE_SHARE = 0.9
TIME_BUDGET = 1.3
UTILITY_BUDGET = 1.10  # tuned unlearning: general perplexity at most 10% above the FP fine-tuned model's


def relearn_targets(stage: str, methods: tuple[str, ...] | list[str], ranked: list[str]) -> list[str]:
    """The methods the relearning attack is run on: in the confirmation every method of the run (its headline
    rows, fixed before it starts, so each seed attacks the same models and the goal can be pooled); in the
    screening only this seed's top-ranked one (the attack costs two trainings and evaluations a method)."""
    if stage == "confirmation":
        return list(methods)
    return ranked[:1]


def _ci(iv: Any) -> dict[str, float]:
    return {k: v for k, v in asdict(iv).items() if v is not None}


def extracted(entry: dict[str, Any], idx: list[int] | None = None) -> tuple[int, int]:
    """(extracted, evaluated) members of an evaluation, optionally among the members ``idx``."""
    per = entry["metrics"]["per_canary"]
    rows = per if idx is None else [per[i] for i in idx]
    return sum(bool(p["extracted"]) for p in rows), len(rows)


def figures(entry: dict[str, Any], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Every headline figure of one evaluation with its n and interval."""
    m = entry["metrics"]
    out: dict[str, Any] = {"label": entry["label"], "group": entry["group"],
                           **subset_figures(entry, list(range(len(m["per_canary"]))), n_boot, seed)}
    control = [x for x in m.get("nonmember_exposures") or [] if x is not None]
    if control:  # secrets never trained on (reference rows): what "no memorisation" reads as
        out["nonmember_exposure"] = {"n": len(control), **_ci(bootstrap_mean(control, n_boot, seed=seed))}
    scores = m.get("mia_scores") or {}
    for key, attack in (("secret_auc", "secret_loss"), ("record_auc", RECORD_ATTACK)):
        if attack in scores:
            s = scores[attack]
            out[key] = {"n_members": len(s["members"]), "n_nonmembers": len(s["nonmembers"]),
                        **_ci(bootstrap_auc(s["members"], s["nonmembers"], n_boot, seed=seed))}
    for key in ("domain", "general"):
        blocks = m.get(f"block_nll_{key}")
        if blocks:
            out[f"ppl_{key}"] = {"n_blocks": len(blocks), **_ci(bootstrap_ppl(blocks, n_boot, seed=seed))}
        elif m.get(f"ppl_{key}") is not None:
            out[f"ppl_{key}"] = {"estimate": m[f"ppl_{key}"]}
    return out


def privleak(entry: dict[str, Any], ref: dict[str, Any], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """PrivLeak of ``entry`` against ``ref`` (same records), secret-level and record-level."""
    out = {}
    for key, attack in (("secret", "secret_loss"), ("record", RECORD_ATTACK)):
        a, r = entry["metrics"].get("mia_scores", {}).get(attack), ref["metrics"].get("mia_scores", {}).get(attack)
        if a and r:
            out[key] = _ci(bootstrap_privleak(a["members"], a["nonmembers"], r["members"], r["nonmembers"],
                                              n_boot, seed=seed))
    return out


def pick_tuned(entries: dict[str, dict[str, Any]], ft: dict[str, Any]) -> str:
    """The tuned setting of one unlearning baseline, by a rule fixed before looking at the results.

    Among the settings whose general perplexity stays within ``UTILITY_BUDGET`` of the FP fine-tuned
    model's, the one that forgets most (highest mean NLL of the member secrets); when none does,
    the one with the lowest general perplexity.
    """
    budget = UTILITY_BUDGET * ft["metrics"]["ppl_general"]
    ok = {k: e for k, e in entries.items() if e["metrics"]["ppl_general"] <= budget}
    if ok:
        return max(ok, key=lambda k: ok[k]["metrics"]["private_nll"])
    return min(entries, key=lambda k: entries[k]["metrics"]["ppl_general"])


def paired_ppl_ratio(entry: dict[str, Any], ref: dict[str, Any], key: str, n_boot: int = 2000,
                     seed: int = 0) -> dict[str, float] | None:
    """Perplexity of ``entry`` over ``ref``'s on the same evaluation blocks (``key``: domain or general), with a
    paired bootstrap interval over blocks: far tighter than comparing two unpaired intervals, so a real
    skill loss that hides inside the reference's wide interval still shows here."""
    a, r = entry["metrics"].get(f"block_nll_{key}"), ref["metrics"].get(f"block_nll_{key}")
    if not a or not r or len(a) != len(r):
        return None
    diff = np.asarray(a, np.float64) - np.asarray(r, np.float64)
    return {"n_blocks": len(diff), **_ci(bootstrap_ppl(diff, n_boot, seed=seed))}


def _point(entry: dict[str, Any], key: str) -> float | None:
    m = entry["metrics"]
    if key == "exposure":
        return m["exposure"]["mean"]
    return m[key]


def rank_methods(evals: dict[str, dict[str, Any]], methods: tuple[str, ...]) -> list[dict[str, Any]]:
    """Methods ordered by how many alpha = 0 / alpha = 1 goals their INT4 model meets (point estimates),
    then by alpha = 0 exposure, then general perplexity. Fixed here, before any confirmation run."""
    ref, ft = evals.get("retrain_masked_int4"), evals.get("ft_fp")
    rows = []
    for m in methods:
        a0, a1 = evals.get(f"{m}_int4_a0"), evals.get(f"{m}_int4_a1")
        if a0 is None or a1 is None or ref is None or ft is None:
            continue
        checks = {
            "extraction_zero": extracted(a0)[0] == 0,
            "exposure_within_1bit": _point(a0, "exposure") <= _point(ref, "exposure") + EXPOSURE_SLACK_BITS,
            "general_ppl_not_worse": a0["metrics"]["ppl_general"] <= ref["metrics"]["ppl_general"] * 1.02,
            "domain_ppl_not_worse": a0["metrics"]["ppl_domain"] <= ref["metrics"]["ppl_domain"] * 1.02,
            "alpha1_keeps_exposure": _point(a1, "exposure") >= ALPHA1_EXPOSURE_SHARE * _point(ft, "exposure"),
        }
        rows.append({"method": m, "checks": checks, "met": sum(checks.values()),
                     "exposure_a0": _point(a0, "exposure"), "ppl_general_a0": a0["metrics"]["ppl_general"]})
    return sorted(rows, key=lambda r: (-r["met"], r["exposure_a0"], r["ppl_general_a0"]))


def _inside(x: float, iv: dict[str, float]) -> bool:
    return iv["low"] <= x <= iv["high"]


def _within_reference(fig: dict, ref: dict, pl: dict) -> dict[str, Any]:
    """The alpha = 0 goals of one row against its retrain reference (figures already computed)."""
    goals: dict[str, Any] = {}
    goals["extraction_zero"] = {"measured": fig["extraction"]["k"], "n": fig["extraction"]["n"], "goal": 0,
                                "holds": fig["extraction"]["k"] == 0}
    if "exposure" in fig and "exposure" in ref:
        bound = ref["exposure"]["estimate"] + EXPOSURE_SLACK_BITS
        goals["exposure_within_1bit"] = {"measured": fig["exposure"]["estimate"], "ci": fig["exposure"],
                                         "goal": bound, "holds": fig["exposure"]["estimate"] <= bound}
    for kind in ("secret", "record"):
        if kind in pl:
            iv = pl[kind]
            goals[f"privleak_{kind}"] = {"measured": iv["estimate"], "ci": iv, "goal": f"95% CI in ±{PRIVLEAK_BOUND}",
                                         "holds": iv["low"] >= -PRIVLEAK_BOUND and iv["high"] <= PRIVLEAK_BOUND}
    for key in ("ppl_domain", "ppl_general"):
        if "low" in fig.get(key, {}) and "low" in ref.get(key, {}):
            # "within the reference's CI": a perplexity below the interval (better skill) also holds
            goals[f"{key}_in_reference_ci"] = {"measured": fig[key]["estimate"], "goal": ref[key],
                                               "holds": fig[key]["estimate"] <= ref[key]["high"],
                                               "inside": _inside(fig[key]["estimate"], ref[key])}
    return goals


def method_goals(m: str, figs: dict[str, dict], evals: dict[str, dict], stages: dict[str, Any],
                 pls: dict[str, dict]) -> dict[str, Any]:
    """Every goal of the issue for method ``m`` on one seed (INT4 and FP base)."""
    out: dict[str, Any] = {}
    for base, ref in (("int4", "retrain_masked_int4"), ("fp", "retrain_masked_fp")):
        row = f"{m}_{base}_a0"
        if row in figs and ref in figs:
            out[f"alpha0_{base}"] = goals = _within_reference(figs[row], figs[ref], pls.get(row, {}))
            for key in ("domain", "general"):
                ratio = paired_ppl_ratio(evals[row], evals[ref], key)
                g = goals.get(f"ppl_{key}_in_reference_ci")
                if ratio and g is not None and "low" in ratio:
                    # judged on the same blocks: not measurably worse than the reference (the paired ratio's
                    # interval reaches 1). The unpaired reading (estimate under the reference's upper bound)
                    # passed a 1.33x ratio whose interval excludes 1, so it is kept only beside it
                    g["paired_ratio"] = ratio
                    g["unpaired_holds"] = g["holds"]
                    g["holds"] = ratio["low"] <= 1.0
    a1, ft = figs.get(f"{m}_int4_a1"), figs.get("ft_fp")
    if a1 and ft and "exposure" in a1 and "exposure" in ft:
        goal = ALPHA1_EXPOSURE_SHARE * ft["exposure"]["estimate"]
        out["alpha1_exposure"] = {"measured": a1["exposure"]["estimate"], "ci": a1["exposure"], "goal": goal,
                                  "holds": a1["exposure"]["estimate"] >= goal}
    out["relearn"] = _relearn_goal(m, evals)
    cost = evals.get(f"{m}_int4_a0", {}).get("cost", {})
    ft_s = stages.get("ft", {}).get("wall_s")
    if cost.get("wall_s") and ft_s:
        total = cost["wall_s"] + (stages.get("retrain_masked", {}).get("wall_s", 0.0) if m == "two-phase" else 0.0)
        # indicative only: the run's wall clocks mix machine states (pieces on other machines, other jobs on the
        # cores; plain fine-tuning took 3077 s once and 1167 s when retrained), so the goal is judged by the
        # interleaved benchmark (bench/separation_time.py), which the report reads
        out["training_time"] = {"measured": total / ft_s, "goal": TIME_BUDGET, "holds": None, "indicative": True,
                                "seconds": total, "plain_seconds": ft_s}
    out["dominates_unlearning"] = _dominance(f"{m}_int4_a0", evals)
    return out


def _relearn_goal(m: str, evals: dict[str, dict]) -> dict[str, Any] | None:
    res = {}
    for data in ("public", "public+half"):
        a, r = evals.get(f"relearn_{m}_{data}"), evals.get(f"relearn_retrain_masked_{data}")
        if a and r:
            ka, n = extracted(a)
            kr, _ = extracted(r)
            res[data] = {"recovered": ka, "reference_recovered": kr, "n": n, "holds": ka <= kr}
    return res or None


def _dominance(row: str, evals: dict[str, dict]) -> dict[str, Any]:
    """Whether ``row`` has at most the exposure and at most the general perplexity of each tuned baseline."""
    me = evals.get(row)
    out = {}
    if me is None or me["metrics"]["exposure"]["mean"] is None:
        return out
    for name, e in evals.items():
        if e.get("group") != "unlearning" or e["metrics"]["exposure"]["mean"] is None:
            continue
        out[name] = (me["metrics"]["exposure"]["mean"] <= e["metrics"]["exposure"]["mean"]
                     and me["metrics"]["ppl_general"] <= e["metrics"]["ppl_general"])
    return out


def _reference_of(name: str, entry: dict[str, Any]) -> str | None:
    if entry["group"] in ("relearn", "unlearning_sweep") or name.startswith("retrain_masked") or name == "pre":
        return None
    return "retrain_masked_int4" if "int4" in name else "retrain_masked_fp"


def summarise_seed(seed_result: dict[str, Any], methods: tuple[str, ...], n_boot: int) -> dict[str, Any]:
    """Figures of every evaluation, PrivLeak against its reference, and every method's goals."""
    evals, stages = seed_result["evals"], seed_result["stages"]
    figs = {n: figures(e, n_boot) for n, e in evals.items()}
    pls = {}
    for n, e in evals.items():
        ref = _reference_of(n, e)
        if ref and ref in evals and e["group"] != "unlearning_sweep":
            pls[n] = privleak(e, evals[ref], n_boot)
    goals = {m: method_goals(m, figs, evals, stages, pls) for m in methods if f"{m}_int4_a0" in evals}
    return {"figures": figs, "privleak": pls, "goals": goals, "ranking": rank_methods(evals, methods),
            "label_noise": label_noise_rows(seed_result, n_boot), "compute": recorded_compute(seed_result)}


def recorded_compute(seed_result: dict[str, Any]) -> dict[str, Any]:
    """The compute the run's results account for, summed over every piece of a resumed run (the result's own
    ``wall_s`` is only the last piece's): each trained stage once, each evaluation with the making of its
    model (quantization, unlearning, relearning; ``rows_without_build_s`` were recorded before that was kept),
    and a recorded stage trained again in a later piece once more for each time (``retrained``)."""
    train = sum(v["wall_s"] + sum(r.get("wall_s", 0.0) for r in v.get("retrained", []))
                for v in seed_result["stages"].values()
                if isinstance(v, dict) and isinstance(v.get("wall_s"), int | float))
    evals = seed_result["evals"].values()
    ev = sum(e["metrics"].get("eval_s", 0.0) + e.get("build_s", 0.0) for e in evals)
    return {"training_s": train, "evaluation_s": ev, "total_s": train + ev, "rows": len(seed_result["evals"]),
            "rows_without_build_s": sum("build_s" not in e for e in evals)}


def subset_figures(entry: dict[str, Any], idx: list[int], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Extraction (exact interval) and mean exposure (bootstrap over canaries) among the members ``idx``."""
    k, n = extracted(entry, idx)
    out: dict[str, Any] = {"extraction": {"k": k, "n": n, **_ci(clopper_pearson(k, n))}}
    per = entry["metrics"]["per_canary"]
    expo = [per[i]["exposure"] for i in idx if per[i].get("exposure") is not None]
    if expo:
        out["exposure"] = {"n": len(expo), **_ci(bootstrap_mean(expo, n_boot, seed=seed))}
    return out


def label_noise_rows(seed_result: dict[str, Any], n_boot: int = 2000) -> dict[str, Any]:
    """Per noisy row, the unlabelled and the labelled members apart: extraction and exposure, each beside the
    same members under the reference of the same base (the masked retrain with every label right, where the
    unlabelled members' secrets were never trained on), so a leak of the unlabelled is read against what an
    untrained secret of those very members scores."""
    evals, out = seed_result["evals"], {}
    for name, e in evals.items():
        if e.get("group") != "label_noise":
            continue
        off = list(seed_result["unlabelled"].get(str(e["noise"]), []))
        on = [i for i in range(len(e["metrics"]["per_canary"])) if i not in set(off)]
        ref_name = "retrain_masked_int4" if e.get("base", "int4") == "int4" else "retrain_masked_fp"
        ref = evals.get(ref_name)
        row: dict[str, Any] = {"noise": e["noise"], "method": e["method"], "alpha": e.get("alpha"),
                               "label": e["label"], "reference": ref_name if ref else None,
                               "base": e.get("base", "int4")}
        for part, idx in (("unlabelled", off), ("labelled", on)):
            row[part] = subset_figures(e, idx, n_boot)
            if ref is not None:
                row[f"{part}_reference"] = subset_figures(ref, idx, n_boot)
        out[name] = row
    return out


ALPHA0_GOALS = ("extraction_zero", "exposure_within_1bit", "privleak_secret", "privleak_record",
                "ppl_domain_in_reference_ci", "ppl_general_in_reference_ci")


def _all_hold(goals: dict[str, Any] | None) -> bool:
    """Every alpha = 0 goal was judged and holds; a goal that could not be judged (missing data) does not hold."""
    goals = goals or {}
    return all(k in goals for k in ALPHA0_GOALS) and all(g.get("holds") is True for g in goals.values())


def _exposures(entry: dict[str, Any]) -> list[float]:
    return [p["exposure"] for p in entry["metrics"]["per_canary"] if p.get("exposure") is not None]


def _pooled_exposure(entries: list[dict[str, Any]], n_boot: int) -> dict[str, Any] | None:
    groups = [_exposures(e) for e in entries]
    if not groups or any(not g for g in groups):
        return None
    return {"n": sum(len(g) for g in groups), **_ci(stratified_bootstrap_mean(groups, n_boot))}


def _pooled_ppl(entries: list[dict[str, Any]], key: str, n_boot: int) -> dict[str, Any] | None:
    groups = [e["metrics"].get(f"block_nll_{key}") for e in entries]
    if not groups or any(not g for g in groups):
        return None
    iv = stratified_bootstrap_mean(groups, n_boot)
    return {"n_blocks": sum(len(g) for g in groups),
            "estimate": float(np.exp(iv.estimate)), "low": float(np.exp(iv.low)), "high": float(np.exp(iv.high)),
            "level": iv.level}


def _pooled_ratio(rows: list[dict[str, Any]], refs: list[dict[str, Any]], key: str, n_boot: int
                  ) -> dict[str, Any] | None:
    """Paired perplexity ratio over every seed's blocks: each seed's block differences, resampled within it."""
    diffs = []
    for e, r in zip(rows, refs, strict=True):
        a, b = e["metrics"].get(f"block_nll_{key}"), r["metrics"].get(f"block_nll_{key}")
        if not a or not b or len(a) != len(b):
            return None
        diffs.append(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    iv = stratified_bootstrap_mean(diffs, n_boot)
    return {"n_blocks": sum(len(d) for d in diffs), "estimate": float(np.exp(iv.estimate)),
            "low": float(np.exp(iv.low)), "high": float(np.exp(iv.high)), "level": iv.level}


def method_seeds(m: str, seed_results: dict[str, dict[str, Any]]) -> list[str]:
    """The seeds on which any row of method ``m`` is recorded (its switch rows or its relearning attack)."""
    return [s for s, r in seed_results.items()
            if any(n.startswith((f"{m}_", f"relearn_{m}_")) for n in r["evals"])]


def _per_seed_privleak(pairs: list[tuple], n_boot: int) -> list[dict[str, float]]:
    return [_ci(bootstrap_privleak(*p, n_boot)) for p in pairs]


def pooled_goals(m: str, seed_results: dict[str, dict[str, Any]], n_boot: int = 2000) -> dict[str, Any] | None:
    """The issue's goals for method ``m`` judged once on every seed's members together (same keys and shapes
    as :func:`method_goals`, so one renderer reads both): extraction counted over all seeds (exact interval),
    mean exposures pooled with a bootstrap within each seed, PrivLeak the seeds' mean (each seed's AUCs on
    its own records), perplexity ratios paired block by block inside each seed.

    A group of goals is pooled only when *every* seed with a row of ``m`` has that group's rows: a goal is
    never judged on fewer seeds than its neighbours without saying so (``not_pooled`` names the seeds each
    missing group lacks). The intervals resample members and blocks within each seed, holding each seed's
    trained model fixed, so a seed-level effect could cancel in a mean: a pooled PrivLeak holds only when
    each seed's own estimate is inside the bound too. ``None`` below two seeds."""
    seeds = method_seeds(m, seed_results)
    if len(seeds) < 2:
        return None
    out: dict[str, Any] = {"seeds": seeds, "not_pooled": {}}

    def complete(group: str, names: tuple[str, ...]) -> bool:
        lacking = [s for s in seeds if any(n not in seed_results[s]["evals"] for n in names)]
        if lacking and len(lacking) < len(seeds):  # on no seed at all: not part of this run, nothing to flag
            out["not_pooled"][group] = lacking
        return not lacking

    for base, ref_name in (("int4", "retrain_masked_int4"), ("fp", "retrain_masked_fp")):
        row_name = f"{m}_{base}_a0"
        if not complete(f"alpha0_{base}", (row_name, ref_name)):
            continue
        rows = [seed_results[s]["evals"][row_name] for s in seeds]
        refs = [seed_results[s]["evals"][ref_name] for s in seeds]
        k = sum(extracted(e)[0] for e in rows)
        n = sum(extracted(e)[1] for e in rows)
        goals: dict[str, Any] = {"extraction_zero": {"measured": k, "n": n, "goal": 0, "holds": k == 0,
                                                     "ci": {"n": n, **_ci(clopper_pearson(k, n))}}}
        expo, ref_expo = _pooled_exposure(rows, n_boot), _pooled_exposure(refs, n_boot)
        if expo and ref_expo:
            bound = ref_expo["estimate"] + EXPOSURE_SLACK_BITS
            goals["exposure_within_1bit"] = {"measured": expo["estimate"], "ci": expo, "goal": bound,
                                             "holds": expo["estimate"] <= bound}
        for kind, attack in (("secret", "secret_loss"), ("record", RECORD_ATTACK)):
            pairs = []
            for e, r in zip(rows, refs, strict=True):
                a, b = e["metrics"].get("mia_scores", {}).get(attack), r["metrics"].get("mia_scores", {}).get(attack)
                if not a or not b:
                    break
                pairs.append((a["members"], a["nonmembers"], b["members"], b["nonmembers"]))
            else:
                iv = _ci(pooled_privleak(pairs, n_boot))
                per = [p["estimate"] for p in _per_seed_privleak(pairs, n_boot)]
                goals[f"privleak_{kind}"] = {
                    "measured": iv["estimate"], "ci": iv, "goal": f"95% CI in ±{PRIVLEAK_BOUND}", "per_seed": per,
                    "holds": (iv["low"] >= -PRIVLEAK_BOUND and iv["high"] <= PRIVLEAK_BOUND
                              and max(abs(x) for x in per) <= PRIVLEAK_BOUND)}
        for key in ("domain", "general"):
            mine, theirs = _pooled_ppl(rows, key, n_boot), _pooled_ppl(refs, key, n_boot)
            ratio = _pooled_ratio(rows, refs, key, n_boot)
            if mine and theirs and ratio:
                goals[f"ppl_{key}_in_reference_ci"] = {
                    "measured": mine["estimate"], "goal": theirs, "paired_ratio": ratio,
                    "unpaired_holds": mine["estimate"] <= theirs["high"], "inside": _inside(mine["estimate"], theirs),
                    "holds": ratio["low"] <= 1.0}
        out[f"alpha0_{base}"] = goals
    if complete("alpha1_exposure", (f"{m}_int4_a1", "ft_fp")):
        a1 = _pooled_exposure([seed_results[s]["evals"][f"{m}_int4_a1"] for s in seeds], n_boot)
        ft = _pooled_exposure([seed_results[s]["evals"]["ft_fp"] for s in seeds], n_boot)
        if a1 and ft:
            goal = ALPHA1_EXPOSURE_SHARE * ft["estimate"]
            out["alpha1_exposure"] = {"measured": a1["estimate"], "ci": a1, "goal": goal,
                                      "holds": a1["estimate"] >= goal}
    relearn: dict[str, Any] = {}
    for data in ("public", "public+half"):
        names = (f"relearn_{m}_{data}", f"relearn_retrain_masked_{data}")
        if complete(f"relearn_{data}", names):
            ka = sum(extracted(seed_results[s]["evals"][names[0]])[0] for s in seeds)
            kr = sum(extracted(seed_results[s]["evals"][names[1]])[0] for s in seeds)
            n = sum(extracted(seed_results[s]["evals"][names[0]])[1] for s in seeds)
            relearn[data] = {"recovered": ka, "reference_recovered": kr, "n": n, "holds": ka <= kr}
    out["relearn"] = relearn or None
    return out


CONTROL = "two-phase"


def skill_vs_control(m: str, seed_results: dict[str, dict[str, Any]], base: str = "int4",
                     n_boot: int = 2000) -> dict[str, Any]:
    """Method ``m``'s alpha = 0 perplexity over the two-phase control's (domain and general), paired block by
    block within each seed that has both rows and pooled over those seeds: > 1 means ``m`` costs skill.

    "better" / "worse" needs the pooled interval to exclude 1 *and* every seed's own ratio on that side (the
    interval holds each seed's model fixed; the seeds' agreement is the run-to-run check); else "not
    separable". ``missing``: seeds with a row of ``m`` but not both rows compared here."""
    mine, theirs = f"{m}_{base}_a0", f"{CONTROL}_{base}_a0"
    have = [s for s, r in seed_results.items() if mine in r["evals"] and theirs in r["evals"]]
    out: dict[str, Any] = {"seeds": have, "missing": [s for s in method_seeds(m, seed_results) if s not in have]}
    if not have:
        return out
    rows = [seed_results[s]["evals"][mine] for s in have]
    ctrl = [seed_results[s]["evals"][theirs] for s in have]
    for key in ("domain", "general"):
        ratio = _pooled_ratio(rows, ctrl, key, n_boot)
        if ratio:
            per = [_pooled_ratio([e], [c], key, n_boot)["estimate"] for e, c in zip(rows, ctrl, strict=True)]
            better = ratio["high"] < 1 and all(x < 1 for x in per)
            worse = ratio["low"] > 1 and all(x > 1 for x in per)
            out[key] = {**ratio, "per_seed": per,
                        "verdict": "better" if better else "worse" if worse else "not separable"}
    return out


def summarise_separation(result: dict[str, Any]) -> dict[str, Any]:
    """The summary of every seed, and (several seeds) each method's goal outcomes across seeds."""
    cfg = result["config"]
    methods = tuple(cfg["methods"])
    seeds = {s: summarise_seed(r, methods, cfg.get("bootstrap", 2000)) for s, r in result["seeds"].items()}
    across: dict[str, Any] = {}
    for m in methods:
        rows = [s["goals"].get(m) for s in seeds.values() if m in s["goals"]]
        if rows:
            across[m] = {"seeds": len(rows), "alpha0_int4_all_hold": [_all_hold(r.get("alpha0_int4")) for r in rows]}
    pooled = {m: g for m in methods if (g := pooled_goals(m, result["seeds"], cfg.get("bootstrap", 2000)))}
    skill = {m: skill_vs_control(m, result["seeds"], n_boot=cfg.get("bootstrap", 2000))
             for m in methods if m != CONTROL and CONTROL in methods}
    return {"seeds": seeds, "across_seeds": across, "pooled": pooled, "skill_vs_control": skill,
            "exposure_a0_int4": {m: [float(np.round(s["figures"][f"{m}_int4_a0"]["exposure"]["estimate"], 4))
                                     for s in seeds.values() if f"{m}_int4_a0" in s["figures"]
                                     and "exposure" in s["figures"][f"{m}_int4_a0"]] for m in methods}}
