"""What a skeptical reader of the separation report asks first, answered from the result JSON.

The ranking with its checks and whether its winner only won a tie-break inside the noise; which rows are
the reference itself by construction; what the harness can resolve (PrivLeak of a model that never saw a
secret); who leaks less under label noise; which rows the config asks for that are not recorded yet; and the
asymmetries of the setup (training steps, memory learning rates). Each is computed, never typed.
"""

from __future__ import annotations

from typing import Any

from libortho.experiments.separation_summary import relearn_targets
from libortho.report.document import Block, Heading, Para, Table

CHECK_NAMES = {"extraction_zero": "a=0 extracts 0", "exposure_within_1bit": "a=0 exposure <= ref + 1 bit",
               "general_ppl_not_worse": "a=0 general ppl <= 1.02 ref", "domain_ppl_not_worse":
               "a=0 domain ppl <= 1.02 ref", "alpha1_keeps_exposure": "a=1 exposure >= 90% FP ft"}


def _overlap(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool | None:
    if not a or not b or "low" not in a or "low" not in b:
        return None
    return a["low"] <= b["high"] and b["low"] <= a["high"]


def fmt_interval(iv: dict[str, Any] | None, fmt: str = ".3f") -> str:
    """``estimate [low, high]`` of an interval dict (just the estimate when it has no interval)."""
    if not iv or iv.get("estimate") is None:
        return "n/a"
    if "low" not in iv:
        return format(iv["estimate"], fmt)
    return f"{iv['estimate']:{fmt}} [{iv['low']:{fmt}}, {iv['high']:{fmt}}]"


def _iv(iv: dict[str, Any] | None, fmt: str = ".2f") -> str:
    return fmt_interval(iv, fmt)


def ranking_blocks(result: dict[str, Any], seed: str) -> list[Block]:
    """The ranking rule's checks per method, and whether first place is a tie broken by a point estimate
    that the intervals cannot separate."""
    sd = result["summary"]["seeds"][seed]
    ranking = sd.get("ranking") or []
    if not ranking:
        return []
    keys = list(CHECK_NAMES)
    body = [[r["method"], *("yes" if r["checks"].get(k) else "**no**" for k in keys), f"{r['met']}/{len(keys)}",
             f"{r['exposure_a0']:.3f}", f"{r['ppl_general_a0']:.1f}"] for r in ranking]
    blocks: list[Block] = [Table(["method", *(CHECK_NAMES[k] for k in keys), "met", "a=0 exposure (tie-break)",
                                  "a=0 general ppl"], body,
                                 "The ranking rule (fixed in code before any confirmation run): checks met on point "
                                 "estimates, ties broken by alpha = 0 exposure, then general perplexity.")]
    if len(ranking) > 1 and ranking[0]["met"] == ranking[1]["met"]:
        a, b = ranking[0]["method"], ranking[1]["method"]
        fa, fb = (sd["figures"].get(f"{m}_int4_a0", {}).get("exposure") for m in (a, b))
        sep = _overlap(fa, fb)
        verdict = ("their 95% intervals overlap, so the order is not resolved by this seed" if sep else
                   "their 95% intervals do not overlap" if sep is False else "no intervals to compare")
        blocks.append(Para(f"First place is a **tie** at {ranking[0]['met']}/{len(keys)} checks between {a} and {b}, "
                           f"broken by alpha = 0 exposure {_iv(fa)} vs {_iv(fb)} bits: {verdict}."))
    return blocks


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two evaluations of the same model: every block loss and every canary's exposure equal."""
    ma, mb = a["metrics"], b["metrics"]
    keys = ("block_nll_general", "block_nll_domain")
    if any(ma.get(k) is None or ma.get(k) != mb.get(k) for k in keys):
        return False
    return [c.get("exposure") for c in ma["per_canary"]] == [c.get("exposure") for c in mb["per_canary"]]


def construction_blocks(result: dict[str, Any], seed: str) -> list[Block]:
    """Method rows that *are* their retrain reference (two-phase's alpha = 0 is its phase 1 quantized): their
    alpha = 0 goals hold by construction, so they say nothing about separation with perfect labels."""
    evals = result["seeds"][seed]["evals"]
    same = []
    for name, e in evals.items():
        if e.get("group") != "method" or e.get("alpha") != 0.0:
            continue
        ref = "retrain_masked_int4" if e.get("base") == "int4" else "retrain_masked_fp"
        if ref in evals and _same_model(e, evals[ref]):
            same.append((name, ref))
    if not same:
        return []
    text = "; ".join(f"`{n}` is bit-identical to `{r}`" for n, r in same)
    return [Para(f"By construction: {text} (every block loss and canary exposure equal). Its alpha = 0 goals hold "
                 "trivially when every label is right; the label-noise arm is where it can be beaten.")]


def privleak_floor_blocks(result: dict[str, Any], seed: str) -> list[Block]:
    """PrivLeak of the records-dropped retrain, which never saw a secret, against the masked one: the width
    a leak-free model gets on this harness, beside the ±10% goal."""
    pl = result["summary"]["seeds"][seed]["privleak"]
    rows = [n for n in ("retrain_dropped_int4", "retrain_dropped_fp") if n in pl]
    if not rows:
        return []
    parts = []
    for n in rows:
        p = pl[n]
        parts.append(f"`{n}` PrivLeak secret {_iv(p.get('secret'), '.3f')}, record {_iv(p.get('record'), '.3f')}")
    return [Para("Resolution of the PrivLeak goal (95% CI inside ±0.10): a model that never saw a secret gets "
                 + "; ".join(parts) + " against the masked retrain of the same precision, so an interval wider "
                 "than ±0.10 is what this many members and non-members give even without any leak.")]


def label_noise_verdict(result: dict[str, Any], seed: str) -> list[Block]:
    """Per noise fraction, whether each method's unlabelled members leak less or more than two-phase's at
    alpha = 0 (non-overlapping exposure intervals), and than the retrain's on the same members."""
    from libortho.train.separation import SEPARATION

    rows = {n: r for n, r in (result["summary"]["seeds"][seed].get("label_noise") or {}).items()
            if r.get("alpha") == 0.0}
    blocks: list[Block] = []
    label_free = [m for m in result["config"]["methods"]
                  if m in SEPARATION and not SEPARATION.entry(m).meta.get("needs_labels", True)]
    if label_free:
        one = len(label_free) == 1
        blocks.append(Para(f"{', '.join(label_free)} {'reads' if one else 'read'} no labels, so "
                           f"{'its' if one else 'their'} ordinary rows are already the unlabelled arm (label noise "
                           "does not change what is trained)."))
    by_f: dict[float, dict[str, dict[str, Any]]] = {}
    for r in rows.values():
        by_f.setdefault(r["noise"], {})[r["method"]] = r
    parts = []
    for f in sorted(by_f):
        got = by_f[f]
        tp = got.get("two-phase")
        for m, r in sorted(got.items()):
            if m == "two-phase" or tp is None:
                continue
            e, t = r["unlabelled"].get("exposure"), tp["unlabelled"].get("exposure")
            ref = (r.get("unlabelled_reference") or {}).get("exposure")
            ov = _overlap(e, t)
            cmp = ("not separable from" if ov else ("less than" if e["estimate"] < t["estimate"] else "more than")
                   ) if ov is not None else "not comparable with"
            vs_ref = "" if ref is None else (
                f"; against the retrain on the same members ({_iv(ref)}) it is "
                f"{'within' if _overlap(e, ref) else 'above' if e['estimate'] > ref['estimate'] else 'below'} "
                "its interval")
            parts.append(f"at {f:.0%} unlabelled, {m}'s unlabelled members leak {cmp} two-phase's "
                         f"({r['unlabelled']['extraction']['k']}/{r['unlabelled']['extraction']['n']} vs "
                         f"{tp['unlabelled']['extraction']['k']}/{tp['unlabelled']['extraction']['n']} extracted, "
                         f"{_iv(e)} vs {_iv(t)} bits){vs_ref}")
    if parts:
        blocks.append(Para("Label noise against the two-phase control (alpha = 0, INT4): " + "; ".join(parts) + "."))
    return blocks


def missing_rows(result: dict[str, Any], seed: str) -> list[str]:
    """The rows this run's config asks for that are not recorded yet (a run recorded in pieces)."""
    cfg, sd = result["config"], result["summary"]["seeds"][seed]
    evals = result["seeds"][seed]["evals"]
    missing = []
    for m in cfg.get("methods", []):
        gaps = [f"alpha = {a}" for a in (0, 1) if f"{m}_int4_a{a}" not in evals]
        if gaps:
            missing.append(f"{m} INT4 at {' and '.join(gaps)}")
    ranking = sd.get("ranking") or []
    noisy = cfg.get("label_noise_methods") or [r["method"] for r in ranking[:2]]
    for f in cfg.get("label_noise", []):
        for m in noisy:
            if f"{m}@{f:g}_int4_a0" not in evals:
                missing.append(f"{m} at {f:.0%} unlabelled")
    for u in cfg.get("unlearning", []):
        if f"{u}_int4" not in evals:
            missing.append(f"{u} (swept, then INT4)")
    targets = relearn_targets(result.get("stage", cfg.get("stage", "screening")), cfg.get("methods", []),
                              [r["method"] for r in ranking])
    if cfg.get("relearn_steps") and targets:
        for target in (*targets, "retrain_masked"):
            for data in ("public", "public+half"):
                if f"relearn_{target}_{data}" not in evals:
                    missing.append(f"relearning attack on {target} ({data})")
    if cfg.get("full_precision_rows") is not False and any(f"{m}_fp_a0" not in evals for m in cfg.get("methods", [])):
        missing.append("full-precision-base rows of " + ", ".join(m for m in cfg["methods"]
                                                                 if f"{m}_fp_a0" not in evals))
    return missing


def missing_blocks(result: dict[str, Any], seed: str) -> list[Block]:
    """What the run has not measured: rows its config asks for, and rows its config leaves to another stage."""
    missing = missing_rows(result, seed)
    elsewhere = (["every method with a full-precision base (the FP-base goals)"]
                 if result["config"].get("full_precision_rows") is False else [])
    out: list[Block] = []
    if missing:
        out.append(Para("Not measured yet (this run's config asks for them): " + "; ".join(missing)
                        + ". Goals that need them are absent from the tables above, not met."))
    if elsewhere:
        out.append(Para("Not in this run's config: " + "; ".join(elsewhere) + "; their goals are judged only where "
                        "a run (the confirmation) records them."))
    return out


def setup_asymmetry_blocks(result: dict[str, Any], seed: str) -> list[Block]:
    """Differences between rows' training that a reader should know before comparing them."""
    cfg, stages = result["config"], result["seeds"][seed]["stages"]
    parts = []
    steps = {n: v["steps"] for n, v in stages.items() if isinstance(v, dict) and v.get("steps")}
    if "retrain_dropped" in steps and "ft" in steps and steps["retrain_dropped"] != steps["ft"]:
        parts.append(f"the records-dropped retrain trains {steps['retrain_dropped']} steps (the same epochs over the "
                     f"public blocks alone) against {steps['ft']} for plain fine-tuning and the masked retrain, so "
                     "its perplexities reflect far fewer updates, not only the missing records")
    scales = {m: o["memory_lr_scale"] for m, o in (cfg.get("method_overrides") or {}).items()
              if isinstance(o, dict) and "memory_lr_scale" in o and m in cfg.get("methods", [])}
    rest = [m for m in cfg.get("methods", []) if m not in scales]
    if len(set(scales.values()) | ({1.0} if rest else set())) > 1:
        parts.append("memory learning rate " + ", ".join(f"{m} {v:g}x" for m, v in sorted(scales.items()))
                     + (f", {', '.join(rest)} 1x" if rest else "") + " the fine-tuning rate (the preset's, from the "
                     "tiny model's pilots): the methods' alpha = 1 memorisation is not compared at equal rates")
    if "memsink" in cfg.get("methods", []):
        parts.append("memsink at alpha = 1 switches every sink on, while in training each sequence used only its "
                     "own share of them")
    if not parts:
        return []
    return [Para("Setup asymmetries: " + "; ".join(parts) + ".")]


def _noise_comparison(m: str, noise: dict[str, Any]) -> list[tuple[float, str, bool | None, str]]:
    """(fraction, less/more/not separable, above the retrain?, text) of ``m``'s unlabelled members against the
    two-phase control's at alpha = 0 on the INT4 base."""
    from libortho.experiments.separation_summary import CONTROL

    rows = [r for r in noise.values() if r.get("alpha") == 0.0 and r.get("base", "int4") == "int4"]
    out = []
    for f in sorted({r["noise"] for r in rows}):
        mine = next((r for r in rows if r["noise"] == f and r["method"] == m), None)
        ctrl = next((r for r in rows if r["noise"] == f and r["method"] == CONTROL), None)
        if mine is None or ctrl is None:
            continue
        e, t = mine["unlabelled"].get("exposure"), ctrl["unlabelled"].get("exposure")
        ov = _overlap(e, t)
        if ov is None:
            continue
        cmp = "not separable" if ov else ("less" if e["estimate"] < t["estimate"] else "more")
        ref = (mine.get("unlabelled_reference") or {}).get("exposure")
        above = None if ref is None else (not _overlap(e, ref) and e["estimate"] > ref["estimate"])
        out.append((f, cmp, above, f"{f:.0%} unlabelled: {_iv(e)} vs {_iv(t)} bits"
                    + (f", the retrain on the same members {_iv(ref)}" if ref else "")))
    return out


def _privacy_holds(result: dict[str, Any], m: str, seeds: list[str]) -> tuple[bool, list[str]]:
    """Whether ``m``'s INT4 alpha = 0 model meets the extraction and exposure goals on every seed in ``seeds``."""
    failed = []
    for s in seeds:
        goals = result["summary"]["seeds"][s]["goals"].get(m, {}).get("alpha0_int4", {})
        for key in ("extraction_zero", "exposure_within_1bit"):
            g = goals.get(key)
            if g is None or g.get("holds") is not True:
                failed.append(f"{key.replace('_', ' ')} on seed {s}")
    return not failed, failed


def recommendation_blocks(result: dict[str, Any], noise: dict[str, Any] | None, noise_source: str) -> list[Block]:
    """Does any method beat the two-phase control under label noise or on skill? (issue 8: otherwise the
    report must say plainly that two-phase suffices). Skill: alpha = 0 INT4 perplexity over two-phase's,
    paired within each seed and pooled, counted only for a method that meets the alpha = 0 extraction and
    exposure goals on those seeds; label noise: the unlabelled members' exposure at alpha = 0, from ``noise``
    (the label-noise rows of the run that has them), non-overlapping intervals only. Three outcomes: a method
    beats it, none does (two-phase suffices), or a comparison is missing (not judged)."""
    skill = result["summary"].get("skill_vs_control") or {}
    if not skill:
        return []
    parts, beats, unjudged = [], [], []
    for m, sk in skill.items():
        g, d = sk.get("general"), sk.get("domain")
        if not sk.get("seeds") or not g or not d:
            unjudged.append(m)
            parts.append(f"{m}: skill not comparable (no seed has both its and two-phase's INT4 alpha = 0 rows)")
            continue
        text = (f"{m}: general perplexity {_iv(g, '.3f')}x two-phase's ({g['verdict']}), domain {_iv(d, '.3f')}x "
                f"({d['verdict']}), seeds {', '.join(sk['seeds'])}")
        if sk.get("missing"):
            unjudged.append(m)
            text += f" (seeds {', '.join(sk['missing'])} not compared yet)"
        private, failed = _privacy_holds(result, m, sk["seeds"])
        if not private:  # a model that still leaks at alpha = 0 has no skill win to claim
            text += f" (but it misses {', '.join(failed)}, so its skill is no win)"
        cmp = _noise_comparison(m, noise or {})
        if cmp:
            text += f"; unlabelled members' exposure vs two-phase's ({noise_source}): " + "; ".join(
                f"{c} at {t}" + (" (still above the retrain)" if above else "") for _, c, above, t in cmp)
        verdicts = (g["verdict"], d["verdict"])
        on_skill = private and "better" in verdicts and "worse" not in verdicts
        on_noise = bool(cmp) and all(c == "less" for _, c, _, _ in cmp)
        if on_skill or on_noise:
            how = " and ".join(w for w, ok in (("on skill", on_skill), ("under label noise", on_noise)) if ok)
            cost = ", at a measured skill cost" if on_noise and "worse" in verdicts else ""
            beats.append(f"{m} ({how}{cost})")
        parts.append(text)
    provisional = unjudged or any(missing_rows(result, s) for s in result["summary"]["seeds"])
    if beats:
        verdict = ("Beats two-phase: " + "; ".join(beats) + ". With every label right, two-phase meets the alpha "
                   "= 0 goals by construction; the case for another method rests on the comparisons above.")
    elif unjudged:
        verdict = f"Not judged yet: {', '.join(unjudged)} not compared with two-phase on every seed."
    else:
        verdict = "**Two-phase suffices**: no method beats it on skill or under label noise here."
    if provisional:
        verdict += " Provisional: rows this run asks for are not all recorded."
    return [Heading("Against the two-phase control"), Para("; ".join(parts) + "."), Para(verdict)]


def review_blocks(result: dict[str, Any], seed: str) -> list[Block]:
    """Every block of this module for one seed, in reading order."""
    return [*ranking_blocks(result, seed), *construction_blocks(result, seed), *label_noise_verdict(result, seed),
            *privleak_floor_blocks(result, seed), *setup_asymmetry_blocks(result, seed),
            *missing_blocks(result, seed)]
