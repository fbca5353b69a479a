"""The separation report: result JSON -> figures -> Markdown + self-contained HTML, beside the JSON.

Every number comes from the result (its ``summary``, computed by
:mod:`libortho.experiments.separation_summary`, and the raw evaluations); whether a goal or a
seed claim holds is computed here or there, never typed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from libortho.atomic import atomic_write_text, read_json_object
from libortho.report.document import Block, Figure, Heading, Para, Table, to_html, to_markdown
from libortho.report.kill_switch import source_line
from libortho.report.separation_checks import fmt_interval, missing_rows, recommendation_blocks, review_blocks
from libortho.report.separation_plots import (
    alpha_figure,
    deletion_figure,
    deletion_split,
    eta_figure,
    label_noise_figure,
    plane_figure,
)

GOAL_NAMES = {"extraction_zero": "extraction = 0", "exposure_within_1bit": "exposure <= reference + 1 bit",
              "privleak_secret": "PrivLeak (secret)", "privleak_record": "PrivLeak (record, min-k%++)",
              "ppl_domain_in_reference_ci": "domain ppl in reference CI",
              "ppl_general_in_reference_ci": "general ppl in reference CI"}
BASE_NAMES = {"alpha0_int4": "INT4 a=0 vs quantized retrain", "alpha0_fp": "FP a=0 vs FP retrain"}
REFERENCES = ("pre", "ft_fp", "ft_int4", "retrain_masked_fp", "retrain_masked_int4", "retrain_dropped_fp",
              "retrain_dropped_int4")
PLAIN_ETA, OGD_ETA_BOUND = 0.3, 0.05  # seed 000's figures
STAGE_BUDGET_H = 3.0  # issue 8: each of the screening and confirmation runs within 3 hours of compute
PLAIN_ETA_BAND = (0.2, 0.4)  # ours, not the seed's: how far from its "~0.3" we still call it a match


def _f(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


_ci = fmt_interval


def _frac(ex: dict[str, Any] | None) -> str:
    return "n/a" if not ex else f"{ex['k']}/{ex['n']} [{ex['low']:.2f}, {ex['high']:.2f}]"


def _holds(h: bool | None) -> str:
    return "n/a" if h is None else ("yes" if h else "**no**")


# ---- goals ---------------------------------------------------------------------------------------------
def goal_rows(goals: dict[str, Any], evals: dict[str, Any], method: str, timing: dict[str, Any] | None = None
              ) -> list[tuple[str, str, str, bool | None]]:
    """(goal, measured, target, holds) for every goal of one method on one seed, in the issue's order; the
    training-time goal is judged by the interleaved benchmark ``timing`` (the run's own wall clocks mix
    machine states and are shown as indicative only)."""
    rows = []
    for base in ("alpha0_int4", "alpha0_fp"):
        for key, g in goals.get(base, {}).items():
            rows.append((f"{BASE_NAMES[base]}: {GOAL_NAMES.get(key, key)}", _measured(key, g), _target(key, g),
                         g["holds"]))
    if "alpha1_exposure" in goals:
        g = goals["alpha1_exposure"]
        rows.append(("INT4 a=1 exposure >= 90% of FP fine-tuned", _measured("alpha1_exposure", g),
                     f">= {g['goal']:.3f}", g["holds"]))
    for data, g in (goals.get("relearn") or {}).items():
        rows.append((f"relearning on {data}: recovered <= retrain's", f"{g['recovered']}/{g['n']}",
                     f"<= {g['reference_recovered']}/{g['n']}", g["holds"]))
    bench = (timing or {}).get("methods", {}).get(method)
    if bench is not None:
        goal = timing.get("goal_ratio", 1.3)
        rows.append(("training time / plain fine-tuning (bench/separation_time.py; see Training cost)",
                     f"{bench['ratio_to_plain']:.3f}", f"<= {goal:g}", bench["ratio_to_plain"] <= goal))
    if "training_time" in goals:
        g = goals["training_time"]
        rows.append(("training time / plain fine-tuning (this run's wall clock: indicative only, machine states "
                     "differ between pieces)", f"{g['measured']:.3f} ({g['seconds']:.1f} s vs "
                     f"{g['plain_seconds']:.1f} s)", f"<= {g['goal']:g}", g["holds"]))
    me = evals.get(f"{method}_int4_a0", {}).get("metrics", {})
    for name, ok in (goals.get("dominates_unlearning") or {}).items():
        other = evals.get(name, {}).get("metrics", {})
        measured = (f"exposure {_f(me.get('exposure', {}).get('mean'))} vs "
                    f"{_f(other.get('exposure', {}).get('mean'))}; general ppl {_f(me.get('ppl_general'), '.2f')}"
                    f" vs {_f(other.get('ppl_general'), '.2f')}")
        rows.append((f"INT4 a=0 dominates tuned {name}", measured, "<= on both", ok))
    return rows


def _measured(key: str, g: dict[str, Any]) -> str:
    if key == "extraction_zero":
        ci = g.get("ci")
        return f"{g['measured']}/{g['n']}" + (f" [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else "")
    if "paired_ratio" in g:
        pr = g["paired_ratio"]
        return (f"{_f(g['measured'])}; paired ratio to it {_ci(pr)}, n={pr['n_blocks']} blocks (judged: the "
                "ratio's interval reaches 1)")
    ci = g.get("ci")
    if ci and "low" in ci:
        n = f", n={ci['n']}" if "n" in ci else ""
        return f"{_ci(ci)}{n}"
    return _f(g["measured"])


def _target(key: str, g: dict[str, Any]) -> str:
    goal = g["goal"]
    if isinstance(goal, dict):
        return f"in {_ci(goal)}"
    if key == "exposure_within_1bit":
        return f"<= {goal:.3f}"
    return str(goal) if isinstance(goal, str) else f"{goal:g}"


def goals_table(result: dict[str, Any], method: str, timing: dict[str, Any] | None = None) -> Table:
    """One method's goals; with several seeds one row per seed and goal, plus an 'all seeds' row."""
    seeds = result["summary"]["seeds"]
    per_seed = {s: goal_rows(sd["goals"].get(method, {}), result["seeds"][s]["evals"], method, timing)
                for s, sd in seeds.items() if method in sd["goals"]}
    if len(per_seed) <= 1:
        body = [[g, m, t, _holds(h)] for rows in per_seed.values() for g, m, t, h in rows]
        return Table(["goal", "measured [95% CI]", "goal", "holds"], body)
    pooled = result["summary"].get("pooled", {}).get(method)
    # the training-time rows are per run, not per member: the pooled table has no figure of its own for them
    pooled_rows = [r for r in goal_rows(pooled, {}, method) if not r[0].startswith("training time")] if pooled else []
    pooled_seeds = "seeds " + ", ".join(pooled["seeds"]) if pooled else ""
    body = []
    order = list(dict.fromkeys(g for rows in per_seed.values() for g, *_ in rows))
    for goal in order:
        outcomes = []
        for s, rows in per_seed.items():
            for g, m, t, h in rows:
                if g == goal:
                    body.append([goal, s, m, t, _holds(h)])
                    outcomes.append(h)
        known = [h for h in outcomes if h is not None]
        body.append([goal, "all seeds", f"holds on {sum(known)}/{len(known)} seeds", "every seed",
                     _holds(all(known) if known else None)])
        for g, m, t, h in pooled_rows:
            if g == goal:
                body.append([goal, f"pooled ({pooled_seeds})", m, t, _holds(h)])
    lacking = "; ".join(f"{group} (seeds {', '.join(ss)} lack its rows)"
                        for group, ss in (pooled or {}).get("not_pooled", {}).items())
    caption = ("Per seed, whether it holds on every seed, and pooled: every seed's members together (extraction "
               "summed with an exact interval, exposures and perplexities resampled within each seed, PrivLeak "
               "the seeds' mean and held only if each seed's own estimate is inside the bound, perplexity ratios "
               "paired block by block within each seed). The pooled intervals hold each seed's trained model "
               "fixed: the run-to-run variation is in the per-seed rows and the 'all seeds' verdict."
               if pooled_rows else "")
    if lacking:
        caption += f" Not pooled: {lacking}."
    return Table(["goal", "seed", "measured [95% CI]", "goal", "holds"], body, caption.strip())


def top_method(result: dict[str, Any]) -> tuple[str, str, int] | None:
    """(method, seed, checks met) of the first seed with a ranking (the ranking rule is fixed in the summary)."""
    for s, sd in result["summary"]["seeds"].items():
        if sd.get("ranking"):
            return sd["ranking"][0]["method"], s, sd["ranking"][0]["met"]
    return None


# ---- main table ----------------------------------------------------------------------------------------
def _row_names(evals: dict[str, Any], methods: list[str]) -> list[str]:
    names = [n for n in REFERENCES if n in evals]
    names += [f"{m}_{b}_a{a}" for m in methods for b in ("fp", "int4") for a in (0, 1) if f"{m}_{b}_a{a}" in evals]
    names += [n for n, e in evals.items() if e.get("group") in ("unlearning", "label_noise", "deletion")]
    return names


def control_table(result: dict[str, Any], seed: str) -> list[Table]:
    """Exposure of the non-members' secrets (never trained on) under each reference row: what an
    un-memorised secret reads as on this harness (measured on reference rows only)."""
    figs = result["summary"]["seeds"][seed]["figures"]
    body = [[f["label"], _ci(f.get("exposure"), ".2f"), _ci(f["nonmember_exposure"], ".2f"),
             str(f["nonmember_exposure"]["n"])] for n, f in figs.items() if "nonmember_exposure" in f]
    if not body:
        return []
    return [Table(["reference row", "member exposure bits [CI]", "non-member exposure bits [CI]", "n non-members"],
                  body, "The exposure control: secrets of the same kinds and passages that were never trained on.")]


def main_table(result: dict[str, Any], seed: str) -> Table:
    """Leakage and utility of every evaluated row of one seed, each with its 95% interval."""
    sd, evals = result["summary"]["seeds"][seed], result["seeds"][seed]["evals"]
    body = []
    for n in _row_names(evals, list(result["config"]["methods"])):
        f, pl = sd["figures"].get(n, {}), sd["privleak"].get(n, {})
        ref = "retrain_masked_int4" if "int4" in n else "retrain_masked_fp"
        body.append([f.get("label", evals[n]["label"]), _frac(f.get("extraction")), _ci(f.get("exposure"), ".2f"),
                     _ci(f.get("secret_auc")), _ci(f.get("record_auc")), _ci(pl.get("secret")),
                     _ci(pl.get("record")), ref if pl else "-", _ci(f.get("ppl_domain"), ".2f"),
                     _ci(f.get("ppl_general"), ".2f")])
    return Table(["row", "extraction k/n [CI]", "exposure bits [CI]", "secret AUC [CI]", "record AUC min-k%++ [CI]",
                  "PrivLeak secret [CI]", "PrivLeak record [CI]", "vs", "PPL domain [CI]", "PPL general [CI]"], body,
                 "Every evaluated row: extraction with exact (Clopper-Pearson) intervals, bootstrap intervals "
                 "elsewhere; PrivLeak = (AUC - AUC_ref) / AUC_ref against the retrain reference of the same "
                 "precision.")


def label_noise_table(result: dict[str, Any], seed: str) -> list[Block]:
    """The label-noise arm: each noisy row's unlabelled and labelled members apart, beside the same members
    under the retrain reference (whose secrets were never trained on)."""
    rows = result["summary"]["seeds"][seed].get("label_noise") or {}
    body = []
    for n in sorted(rows, key=lambda n: (rows[n]["method"], rows[n]["noise"], rows[n].get("alpha") or 0.0)):
        r = rows[n]
        for part in ("unlabelled", "labelled"):
            f, ref = r[part], r.get(f"{part}_reference") or {}
            body.append([r["label"], part, _frac(f.get("extraction")), _ci(f.get("exposure"), ".2f"),
                         _frac(ref.get("extraction")), _ci(ref.get("exposure"), ".2f"), r.get("reference") or "-"])
    if not body:
        return []
    return [Heading(f"Seed {seed}: the label-noise arm"),
            Table(["row", "members", "extraction k/n [CI]", "exposure bits [CI]", "reference extraction [CI]",
                   "reference exposure bits [CI]", "reference"], body,
                  "Unlabelled members are trained as public text (their secrets in the shared weights' loss); "
                  "the reference is the masked retrain with every label right, on the same members.")]


# ---- seed claims ---------------------------------------------------------------------------------------
def eta_claims(stages: dict[str, Any]) -> list[dict[str, Any]]:
    """Seed 000's eta claims beside ours: plain fine-tuning ~0.3, OGD < 0.05 (held-out public subspace)."""
    pooled = stages.get("eta") if isinstance(stages.get("eta"), dict) else {}
    ogd = stages.get("ogd") if isinstance(stages.get("ogd"), dict) else {}
    log = ogd.get("eta") or []
    out = []
    plain = pooled.get("ft", {}).get("eta")
    base = pooled.get("ft", {}).get("random_baseline")
    out.append({"claim": "plain fine-tuning's update lies in the public subspace", "seed": f"eta ~ {PLAIN_ETA}",
                "measured": _f(plain) + (f" (random baseline {base:.3f})" if base is not None else ""),
                "criterion": f"eta in [{PLAIN_ETA_BAND[0]}, {PLAIN_ETA_BAND[1]}] (our band around the seed's ~0.3)",
                "holds": None if plain is None else PLAIN_ETA_BAND[0] <= plain <= PLAIN_ETA_BAND[1]})
    held = log[-1].get("eta_heldout") if log else pooled.get("ogd", {}).get("eta")
    rb = ogd.get("eta_random_baseline", pooled.get("ogd", {}).get("random_baseline"))
    src = f"final step {log[-1]['step']} of OGD's log" if log else "OGD memory, pooled"
    out.append({"claim": "OGD keeps its update out of the held-out public subspace",
                "seed": f"eta < {OGD_ETA_BOUND}",
                "measured": "not measured" if held is None else f"{held:.3f} ({src}; random baseline {_f(rb)})",
                "criterion": f"eta < {OGD_ETA_BOUND}", "holds": None if held is None else held < OGD_ETA_BOUND})
    return out


def kill_switch_claims(sd: dict[str, Any], method: str) -> list[dict[str, Any]]:
    """The kill switch on ``method`` (INT4): alpha 0 removes what alpha 1 memorised, and keeps the skill."""
    figs, goals = sd["figures"], sd["goals"].get(method, {}).get("alpha0_int4", {})
    a0, a1 = figs.get(f"{method}_int4_a0"), figs.get(f"{method}_int4_a1")
    if not a0 or not a1:
        return []
    k0, k1, n = a0["extraction"]["k"], a1["extraction"]["k"], a0["extraction"]["n"]
    e0, e1 = (a.get("exposure", {}).get("estimate") for a in (a0, a1))
    expo_ok = goals.get("exposure_within_1bit", {}).get("holds")
    removes = k1 > 0 and k0 == 0 and expo_ok is not False
    ppl = goals.get("ppl_domain_in_reference_ci")
    pre = figs.get("pre", {}).get("ppl_domain", {}).get("estimate")
    # judged against the quantized retrain alone: the pre-fine-tune model is full precision, and the INT4
    # retrain itself sits above it, so "below pre" would fail the reference by its own standard
    keeps = None if ppl is None else bool(ppl["holds"])
    return [{"claim": f"{method}: alpha = 0 removes the memorised secrets",
             "seed": "extraction and exposure fall to the retrain level",
             "measured": f"extraction {k1}/{n} -> {k0}/{n}; exposure {_f(e1, '.2f')} -> {_f(e0, '.2f')} bits",
             "criterion": "a=1 extracts > 0, a=0 extracts 0, exposure <= retrain + 1 bit", "holds": removes,
             "why": "nothing extracted at alpha = 1" if k1 == 0 else None},
            {"claim": f"{method}: alpha = 0 keeps the public skill", "seed": "domain skill kept",
             "measured": "n/a" if ppl is None else f"domain ppl {ppl['measured']:.2f} (retrain "
                                                   f"{_ci(ppl['goal'], '.2f')}, pre {_f(pre, '.2f')})",
             "criterion": "not measurably worse than the quantized retrain (paired ratio's interval reaches 1)",
             "holds": keeps}]


def claims(result: dict[str, Any], seed: str) -> list[dict[str, Any]]:
    sd = result["summary"]["seeds"][seed]
    methods = [r["method"] for r in sd.get("ranking", [])] or list(sd["goals"])
    out = eta_claims(result["seeds"][seed]["stages"])
    for m in methods:
        out += kill_switch_claims(sd, m)
    return out


def claims_blocks(result: dict[str, Any], seed: str) -> list[Block]:
    cs = claims(result, seed)
    table = Table(["seed claim", "seed", "ours", "criterion", "holds here"],
                  [[c["claim"], c["seed"], c["measured"], c["criterion"], _holds(c["holds"])] for c in cs])
    failing = [c["claim"] for c in cs if c["holds"] is False]
    unknown = [c["claim"] for c in cs if c["holds"] is None]
    text = ("Every seed claim holds here." if not failing else
            "Does **not** hold here: " + "; ".join(failing) + ".")
    why = sorted({c["why"] for c in cs if c.get("why") and c["holds"] is False})
    if why:
        text += " (" + "; ".join(why) + ": there was nothing for the switch to remove.)"
    if unknown:
        text += " Not measured in this run: " + "; ".join(unknown) + "."
    return [table, Para(text)]


# ---- setup, figures, document --------------------------------------------------------------------------
def setup_text(result: dict[str, Any]) -> str:
    c, seeds = result["config"], result["seeds"]
    d = next(iter(seeds.values()))["data"] if seeds else {}
    wall = result.get("wall_s")
    return (f"Model {c['model']}, {result.get('stage', c.get('stage'))} stage, seeds {', '.join(seeds) or 'none'}. "
            f"{d.get('members', c['members'])} member canaries (each seen {d.get('repeats', c['repeats'])}x) and "
            f"{d.get('nonmembers', c['nonmembers'])} non-members; secret spaces "
            f"{', '.join(str(s) for s in d.get('secret_spaces', [])) or 'n/a'}; {d.get('train_tokens', 'n/a')} "
            f"training tokens ({d.get('public_tokens', 'n/a')} public-domain, {d.get('private_tokens', 'n/a')} "
            f"private) on {c['domain']} + {d.get('general_corpus', c['general'])} (general). Methods: "
            f"{', '.join(c['methods'])}; INT{c['quant']['bits']} {c['quant']['method'].upper()} "
            f"g{c['quant']['group_size']} base; {c['bootstrap']} bootstrap resamples. "
            f"{source_line(result.get('environment', {}))}; wall time of the last piece "
            f"{'n/a' if wall is None else f'{wall / 60:.1f} min'}. {compute_text(result)}")


def compute_text(result: dict[str, Any]) -> str:
    """The compute the run's results account for, per seed, over every piece of the run."""
    parts = []
    for s, sd in result["summary"]["seeds"].items():
        c = sd.get("compute")
        if c:
            note = (f"; {c['rows_without_build_s']} rows recorded without their model-making time"
                    if c["rows_without_build_s"] else "")
            parts.append(f"seed {s}: {c['total_s'] / 3600:.2f} h ({c['training_s'] / 3600:.2f} h training, "
                         f"{c['evaluation_s'] / 3600:.2f} h evaluating {c['rows']} rows{note})")
    if not parts:
        return ""
    budget = (f" The issue's budget is {STAGE_BUDGET_H:g} h of compute per run (screening or confirmation)."
              if result.get("stage", result["config"].get("stage")) in ("screening", "confirmation") else "")
    return "Compute recorded over all pieces: " + "; ".join(parts) + "." + budget


def figure_blocks(result: dict[str, Any], seed: str, fig_dir: Path) -> list[Block]:
    sd, raw = result["summary"]["seeds"][seed], result["seeds"][seed]
    methods, baselines = list(result["config"]["methods"]), list(result["config"].get("unlearning", []))
    tag = f"seed{seed}_"
    groups = {e.get("group") for e in raw["evals"].values()}
    has_fp = any(f"{m}_fp_a0" in raw["evals"] for m in methods)
    made = [(plane_figure(sd, methods, baselines, fig_dir / f"{tag}leakage_utility.png"),
             "Leakage-utility plane: general perplexity against exposure at alpha = 0 (left) and secret-level "
             "AUC" + (" with the unlearning sweep" if "unlearning_sweep" in groups else "") + " (right), 95% CIs."),
            (alpha_figure(sd, methods, fig_dir / f"{tag}alpha.png"),
             "Extraction and exposure at alpha 0 and 1 (INT4 solid" + (", FP dashed" if has_fp else "")
             + "), with the FP fine-tuned and retrain levels."),
            (eta_figure(raw["stages"], fig_dir / f"{tag}ogd_eta.png"),
             "OGD: eta during training on the held-out and its own public subspace, random baseline dashed."),
            (label_noise_figure(sd, fig_dir / f"{tag}label_noise.png"),
             "Label noise at alpha = 0: extraction and exposure of the unlabelled vs the labelled members (95% "
             "intervals); black ticks: the same members under the quantized retrain."),
            (deletion_figure(raw["evals"], fig_dir / f"{tag}memsink_deletion.png"),
             "memsink deletion: deleted vs kept members, before and after dropping the sinks.")]
    return [Figure(p, cap) for p, cap in made if p is not None]


def deletion_para(evals: dict[str, Any], stages: dict[str, Any] | None = None) -> list[Block]:
    split = deletion_split(evals)
    info = (stages or {}).get("deletion")
    if not split:
        if isinstance(info, dict) and info.get("evaluated") is False:
            return [Para(f"memsink deletion: not measurable in this configuration: {info['why']}.")]
        return []
    parts = [f"{k.replace('_', ' ')}: {v['k']}/{v['n']} extracted, exposure {_f(v['exposure'], '.2f')} bits"
             for k, v in split.items()]
    return [Para("memsink deletion (INT4, alpha = 1): " + "; ".join(parts) + ".")]


def find_training_time(result_path: Path) -> Path | None:
    """``training_time.json`` (written by ``bench/separation_time.py``) beside the result or one folder up."""
    for folder in (result_path.parent, result_path.parent.parent):
        if (folder / "training_time.json").is_file():
            return folder / "training_time.json"
    return None


def timing_blocks(timing: dict[str, Any] | None, source: str) -> list[Block]:
    """The training-cost goal from the interleaved benchmark (the run's own wall times mix machine states)."""
    if not timing:
        return [Para("Training cost: not measured by `bench/separation_time.py` for this model yet; the goal "
                     "rows' ratios read this run's own wall clock, which mixes machine states (resumed stages, "
                     "other jobs on the cores), and are indicative only.")]
    goal = timing.get("goal_ratio", 1.3)
    plain = timing["plain"]
    body = [["plain fine-tuning", _f(plain["seconds_per_step"]), str(plain["steps"]), f"{plain['projected_s']:.0f}",
             "1.000", "", ""]]
    for m, v in timing["methods"].items():
        steps = " + ".join(f"{k} {n}" for k, n in v["steps"].items())
        body.append([m, _f(v["seconds_per_step"]), steps, f"{v['projected_s']:.0f}", f"{v['ratio_to_plain']:.3f}",
                     f"<= {goal:g}", _holds(v["ratio_to_plain"] <= goal)])
    return [Heading("Training cost"),
            Para(f"From `{source}` (`bench/separation_time.py`: {timing['steps_timed']} timed steps per method in "
                 f"{timing['rounds']} interleaved rounds on {timing['threads']} threads, median seconds per step, "
                 "projected over the preset's whole schedule; two-phase counts its public phase as plain steps)."),
            Table(["method", "s / step", "steps", "projected s", "ratio to plain", "goal", "holds"], body)]


def find_label_noise(result: dict[str, Any], result_path: Path) -> tuple[dict[str, Any], str] | None:
    """The label-noise rows to judge the methods against two-phase by: this run's own (first seed that has
    them), else those of the screening run beside this one (``../screening/result.json``), which holds the
    label-noise arm the confirmation run does not repeat."""
    for s, sd in result["summary"]["seeds"].items():
        if sd.get("label_noise"):
            return sd["label_noise"], f"this run, seed {s}"
    other = result_path.resolve().parent.parent / "screening" / "result.json"
    if not other.is_file() or other == result_path.resolve():
        return None
    from libortho.experiments.separation_results import hydrate
    from libortho.experiments.separation_summary import label_noise_rows

    screening = hydrate(read_json_object(other, "screening result"), other.parent)
    for s, sd in screening.get("seeds", {}).items():
        rows = label_noise_rows(sd, screening["config"].get("bootstrap", 2000))
        if rows:
            return rows, f"screening run, seed {s}: the run that chose the methods, one seed"
    return None


def build_blocks(result: dict[str, Any], fig_dir: Path, timing: dict[str, Any] | None = None,
                 timing_source: str = "", noise: tuple[dict[str, Any], str] | None = None) -> list[Block]:
    ranked = top_method(result)
    top = ranked[0] if ranked else None
    blocks: list[Block] = [Heading(f"Training-time separation: {result['config']['model']}", 1),
                           Heading("Setup"), Para(setup_text(result)), Heading("Goals")]
    if ranked:
        _, first, met = ranked
        partial = any(missing_rows(result, s) for s in result["summary"]["seeds"])
        blocks.append(Para(f"Top-ranked method{' so far' if partial else ''}: **{top}** ({met}/5 ranking checks "
                           f"met on seed {first}; the ranking reads point estimates and was fixed before any "
                           "confirmation run; the goal tables below read the bootstrap intervals)."
                           + (" Provisional: rows this run asks for are not recorded yet (listed below)."
                              if partial else "")))
    methods = [m for m in result["config"]["methods"] if any(m in sd["goals"] for sd in
                                                             result["summary"]["seeds"].values())]
    if not methods:
        blocks.append(Para("No method row is recorded yet, so no goal is judged: the goal tables appear once the "
                           "methods' rows land."))
    for m in sorted(methods, key=lambda m: m != top):
        blocks += [Heading(f"{m} (top-ranked)" if m == top else m, 3), goals_table(result, m, timing)]
    blocks += timing_blocks(timing, timing_source)
    blocks += recommendation_blocks(result, *(noise if noise else (None, "")))
    for seed in result["summary"]["seeds"]:
        sd = result["seeds"][seed]
        review = review_blocks(result, seed)
        blocks += [Heading(f"Seed {seed}: all rows"), main_table(result, seed), *control_table(result, seed),
                   *([Heading(f"Seed {seed}: what a reviewer asks first"), *review] if review else []),
                   Heading(f"Seed {seed}: the seeds' claims beside ours"), *claims_blocks(result, seed),
                   *label_noise_table(result, seed), *figure_blocks(result, seed, fig_dir),
                   *deletion_para(sd["evals"], sd.get("stages"))]
    return blocks


def compact_table(result: dict[str, Any]) -> Table:
    """The first seed's references and every method's INT4 model at alpha 0 and 1, for a terminal."""
    seed = next(iter(result["summary"]["seeds"]))
    sd = result["summary"]["seeds"][seed]
    methods = [f"{m}_int4_a{a}" for m in result["config"]["methods"] for a in (0, 1)]
    names = [n for n in (*REFERENCES, *methods) if n in sd["figures"]]
    body = [[sd["figures"][n]["label"], _frac(sd["figures"][n]["extraction"]), _ci(sd["figures"][n].get("exposure"),
             ".2f"), _ci(sd["figures"][n].get("secret_auc"), ".2f"), _ci(sd["figures"][n].get("ppl_domain"), ".1f"),
             _ci(sd["figures"][n].get("ppl_general"), ".1f")]
            for n in names]
    return Table(["row", "extraction", "exposure (bits)", "secret AUC", "PPL domain", "PPL general"], body,
                 f"separation, seed {seed}: references, and every method at INT4 with the switch off (alpha = 0) "
                 "and on (alpha = 1)")


def load_separation(result_path: str | Path) -> dict[str, Any]:
    """A separation result.json, with its summary recomputed from the evaluations (seeded, deterministic)."""
    result_path = Path(result_path)
    if not result_path.is_file():
        raise FileNotFoundError(f"result file {result_path} not found")
    result = read_json_object(result_path, "result file")
    if result.get("experiment") != "separation" or "seeds" not in result:
        raise ValueError(f"{result_path} is not a separation result (no 'experiment': 'separation' / seeds)")
    from libortho.experiments.separation_results import hydrate
    from libortho.experiments.separation_summary import summarise_separation

    hydrate(result, result_path.parent)
    result["summary"] = summarise_separation(result)  # recomputed from the rows: the stored one may predate a figure
    return result


def render_separation_report(result_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Render figures, ``report.md`` and ``report.html`` for a separation result JSON."""
    result = load_separation(result_path)
    out = Path(out_dir) if out_dir is not None else Path(result_path).parent
    found = find_training_time(Path(result_path))
    timing = json.loads(found.read_text(encoding="utf-8")) if found else None
    blocks = build_blocks(result, out / "figures", timing, found.name if found else "",
                          find_label_noise(result, Path(result_path)))
    md = atomic_write_text(out / "report.md", to_markdown(blocks, out))
    page = atomic_write_text(out / "report.html", to_html(blocks, f"libortho separation: {result['config']['model']}"))
    return {"markdown": md, "html": page, "figures": out / "figures"}
