"""Render the README's "What the measurements show" block from the committed result JSON files.

    .venv/bin/python bench/readme_results.py          # rewrite the block between the markers
    .venv/bin/python bench/readme_results.py --check  # exit 1 if the README is stale

The README never carries a typed number: the block between ``<!-- results:begin -->`` and
``<!-- results:end -->`` is this module's output, and ``tests/test_bench.py`` fails when it differs
from what the committed JSON renders to, so a changed result cannot leave the front page behind.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparisons import gap_closed, gptq_reference, ppl_of  # noqa: E402
from libortho.atomic import atomic_write_text  # noqa: E402
from libortho.experiments.summary import summarise  # noqa: E402
from libortho.report.kill_switch import source_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def kill_switch_lines(result: dict[str, Any], link: str) -> list[str]:
    """The kill-switch finding: extraction counts with intervals, exposure, skill, the baselines."""
    s = summarise(result)
    rows, claims = s["rows"], {c["key"]: c for c in s["claims"]}
    n = len(rows["ft"]["per_canary_extracted"])

    def k(name: str) -> str:
        r = rows[name]
        return (f"{sum(r['per_canary_extracted'])}/{n} canaries extracted, exact exposure {r['exposure']:.1f} bits, "
                f"skill retained {r['skill_retained']:.2f}")

    c = claims["leak_reduction"]["counts"]
    holds = claims["leak_reduction"]["holds"]
    verdict = {True: "removes", False: "does **not** remove", None: "is not shown to remove"}[holds]
    out = [f"- **Privacy kill switch** ([report]({link}), SmolLM2-135M fine-tuned on Shakespeare + "
           f"{n} canary records; {source_line(result['environment'])}): switching the ortho stream off {verdict} "
           f"the memorised records. FP fine-tuned: {k('ft')}; "
           f"alpha = 1: {k('libortho_a1')}; alpha = 0: {k('libortho_a0')} (exact 95% CIs "
           f"{c['ci_alpha1'][0]:.2f}-{c['ci_alpha1'][1]:.2f} and {c['ci_alpha0'][0]:.2f}-{c['ci_alpha0'][1]:.2f}, "
           f"McNemar p = {c['mcnemar_p']:.2g}). Plain INT4 RTN: {k('rtn_int4')}."]
    base = [f"{rows[m]['label']}: {k(m)}" for m in ("retrain", "npo") if m in rows]
    if base:
        out.append("  Baselines on the same forget set: " + "; ".join(base) + ".")
    ft = rows["ft"]
    out.append(f"  Exact exposure is the mean over the {ft['exposure_exact_n']} member canaries whose secret space "
               f"was enumerated ({', '.join(ft['exposure_exact_kinds'])}); the sampled skew-normal estimate used "
               "for the larger spaces is not trusted to +-1 bit (see the exposure check below).")
    pe = claims["private_error_ratio"]["measured"]
    out.append(f"  Seed claims: private-error ratio off/on {pe:.3f} (seed > 1.5); general perplexity at alpha = 0 "
               f"{claims['general_loss']['measured']:+.1%} vs alpha = 1 and "
               f"{claims['general_loss_vs_fp']['measured']:+.1%} vs the FP fine-tuned model (seed < 2%).")
    return out


def dual_stream_lines(tab: dict[str, Any], lat: dict[str, Any] | None, link: str) -> list[str]:
    """Quality of the base and the ortho stream at g64, the null test, the selector verdict, latency."""
    rows = tab["rows"]
    fp = ppl_of(rows["fp32"])["ppl"]
    out = []
    for gs in tab["args"]["group_sizes"]:
        ref = gptq_reference(rows, gs)
        d = rows.get(f"libortho-g{gs}-default-alpha0")
        if ref is None or d is None:
            continue
        a1 = d["alpha1_reloaded"]["ppl"]
        hqq = rows.get(f"hqq-g{gs}")
        peer = "" if hqq is None or "error" in hqq else \
            f"; HQQ g{gs} (no calibration) {ppl_of(hqq)['ppl'] / fp - 1:+.1%}"
        out.append(f"- **INT4 g{gs} on SmolLM2-135M** ([benchmark]({link})): held-out perplexity "
                   f"{ref['ppl'] / fp - 1:+.1%} vs FP32 for GPTQ (= alpha 0){peer}; alpha = 1 with the "
                   f"{d['selector']} ortho stream at rho = {d['rho']:g} ({d['total_bits_per_param']:.2f} bits/param) "
                   f"{a1 / fp - 1:+.1%}, closing {gap_closed(a1, ref['ppl'], fp):.0%} of the GPTQ -> FP32 gap.")
        nt = d.get("null_test")
        if nt is not None:
            out.append(f"  Null test: two independent g{gs} decompositions, without and with the ortho stream at "
                       f"alpha = 0, give bit-identical logits: **{nt['bit_identical']}**.")
    v = tab.get("verdicts", {}).get("diag_vs_obs")
    if v:
        decision = f"the data favour {v['decision']}" if v["decision"] else "the data do not separate them"
        out.append(f"- **Selector** (paired bootstrap over {tab['args']['n_eval']} blocks, Holm-adjusted): diag "
                   f"significantly better than obs in {v['diag_significantly_better']} of {v['configs']} "
                   f"configurations, obs better in {v['obs_significantly_better']}: {decision}.")
    if lat is not None:
        r = lat["ratios"]
        out.append(f"- **Latency** (CPU, {lat['threads']} threads): alpha = 1 / alpha = 0 = "
                   f"{r['overhead_decode_alpha1_over_alpha0']:.2f} for decode and "
                   f"{r['overhead_prefill_alpha1_over_alpha0']:.2f} for 16 x 128 prefill (goal <= 1.10); "
                   f"alpha = 0 / base-only = {r['null_decode_alpha0_over_base']:.3f} (decode).")
    return out


def exposure_lines(res: dict[str, Any], link: str) -> list[str]:
    """The 64-sample exposure estimator against exact enumeration, and what the harness reports as primary."""
    c = res["conclusion"]
    failing = [k for k, ok in c["verdicts"].items() if not ok]
    return [f"- **Exposure estimator** ([check]({link}), SmolLM2 fine-tuned on canaries with enumerable secret "
            f"spaces): the {c['primary_estimator']} estimate minus the exact exposure has a pooled 90% band of "
            f"[{c['band'][0]:+.2f}, {c['band'][1]:+.2f}] bits (goal within +-{c['band_bits']:g}); failing groups: "
            f"{', '.join(failing) or 'none'}. Recommendation computed from the threshold: "
            f"`{c['primary_metric_recommendation']}`"
            + (", so the kill-switch tables lead with exact exposure." if c["primary_metric_recommendation"]
               == "exact_or_empirical_rank" else ".")]


def _row(fig: dict[str, Any]) -> str:
    e, x, d = fig["extraction"], fig["exposure"], fig["ppl_domain"]
    return (f"{e['k']}/{e['n']} extracted, exposure {x['estimate']:.2f} bits [{x['low']:.2f}, {x['high']:.2f}], "
            f"domain perplexity {d['estimate']:.1f}")


def separation_demo_lines(res: dict[str, Any], link: str) -> list[str]:
    """``make demo``: the tiny model's switch against plain fine-tuning and the masked retrain."""
    figs = res["summary"]["seeds"]["0"]["figures"]
    m = res["config"]["methods"][0]
    pre = figs["pre"]["exposure"]["estimate"]
    n = figs["ft_fp"]["extraction"]["n"]
    return [f"- **`make demo`** ([report]({link}), the tiny model trained in the run, {n} member canaries; "
            f"{source_line(res['environment'])}; {res['wall_s'] / 60:.1f} min on "
            f"{res['environment']['threads']} threads with the environment installed): FP fine-tuned: "
            f"{_row(figs['ft_fp'])}; retrain with the secrets masked, INT4: {_row(figs['retrain_masked_int4'])}; "
            f"{m} INT4 at alpha = 0: {_row(figs[f'{m}_int4_a0'])}; at alpha = 1: {_row(figs[f'{m}_int4_a1'])} "
            f"(before fine-tuning: {pre:.2f} bits).{_switch_verdict(figs, m)}"]


def _switch_verdict(figs: dict[str, Any], m: str) -> str:
    """What the demo's numbers say, decided from them (the goal thresholds of issue 8)."""
    a0, a1, ref, ft = (figs[k] for k in (f"{m}_int4_a0", f"{m}_int4_a1", "retrain_masked_int4", "ft_fp"))
    off = a0["extraction"]["k"] == 0 and a0["exposure"]["estimate"] <= ref["exposure"]["estimate"] + 1
    share = a1["exposure"]["estimate"] / ft["exposure"]["estimate"]
    text = (" At alpha = 0 nothing is extracted and exposure is within 1 bit of the retrain's." if off else
            " At alpha = 0 the secrets are **not** removed to the retrain's level.")
    text += f" At alpha = 1 exposure is {share:.0%} of the FP fine-tuned model's (goal: 90%)"
    rate = a1["extraction"]["k"] / a1["extraction"]["n"]
    return text + (", and greedy decoding reproduces few secrets." if rate < 0.25 else ".")


def separation_screening_lines(res: dict[str, Any], link: str) -> list[str]:
    """The SmolLM2 screening run (one seed): each method's INT4 switch beside plain fine-tuning and the
    quantized masked retrain, and how far the run has got (it is recorded in pieces)."""
    summ = res["summary"]["seeds"]["0"]
    figs, ranking = summ["figures"], summ["ranking"]
    methods = res["config"]["methods"]
    done = [m for m in methods if f"{m}_int4_a0" in figs and f"{m}_int4_a1" in figs]
    n = figs["ft_fp"]["extraction"]["n"]
    ft, ref = figs["ft_fp"]["exposure"]["estimate"], figs["retrain_masked_int4"]["exposure"]["estimate"]
    parts = []
    for m in done:
        a0, a1 = figs[f"{m}_int4_a0"], figs[f"{m}_int4_a1"]
        parts.append(f"{m}: alpha = 0 {a0['extraction']['k']}/{n} extracted, {a0['exposure']['estimate']:.2f} bits, "
                     f"general perplexity {a0['ppl_general']['estimate']:.1f}; alpha = 1 {a1['extraction']['k']}/{n}, "
                     f"{a1['exposure']['estimate']:.2f} bits ({a1['exposure']['estimate'] / ft:.0%} of FP fine-tuned)")
    top = ranking[0]["method"] if ranking else "none"
    state = ("all method rows recorded" if len(done) == len(methods) else
             f"{len(done)} of {len(methods)} methods recorded so far")
    return [f"- **Training-time separation, screening** ([report]({link}), SmolLM2-135M, seed 0, {n} member canaries "
            f"seen {res['config']['repeats']}x, INT4 GPTQ base; {state}; the goals are judged on the "
            "confirmation run below): "
            f"FP fine-tuned {figs['ft_fp']['extraction']['k']}/{n} extracted, {ft:.2f} bits; "
            f"FP fine-tuned + INT4 {figs['ft_int4']['extraction']['k']}/{n}, "
            f"{figs['ft_int4']['exposure']['estimate']:.2f} bits; retrain with the secrets masked + INT4 "
            f"{figs['retrain_masked_int4']['extraction']['k']}/{n}, {ref:.2f} bits, general perplexity "
            f"{figs['retrain_masked_int4']['ppl_general']['estimate']:.1f}. " + "; ".join(parts)
            + f". Ranked first so far: {top} (goal at alpha = 1: 90% of FP fine-tuned)." + _label_noise_text(summ)]


def separation_confirmation_lines(res: dict[str, Any], link: str) -> list[str]:
    """The confirmation run (fresh seeds, the methods fixed beforehand): each method's goals, judged pooled over
    the seeds where two or more have the rows, else on the one seed recorded, with every miss named."""
    from libortho.report.separation import goal_rows
    from libortho.report.separation_checks import missing_rows

    summ, methods = res["summary"], res["config"]["methods"]
    seeds_done = {m: [s for s, sd in summ["seeds"].items() if m in sd["goals"]] for m in methods}
    complete = [s for s in summ["seeds"] if not missing_rows(res, s)]

    def judged(goals: dict[str, Any], m: str, where: str) -> str:
        rows = [r for r in goal_rows(goals, {}, m) if not r[0].startswith(("training time", "INT4 a=0 dominates"))]
        met = sum(r[3] is True for r in rows)
        missed = [f"{g} ({meas} vs {t})" for g, meas, t, h in rows if h is False]
        return f"{m} ({where}): {met}/{len(rows)} goals met" + (f"; missed: {'; '.join(missed)}" if missed else "")

    parts = []
    for m in methods:
        pooled = summ.get("pooled", {}).get(m)
        if pooled and not pooled["not_pooled"]:  # every seed with a row of m has every goal's rows
            parts.append(judged(pooled, m, f"pooled over seeds {', '.join(pooled['seeds'])}"))
        else:  # some seed is part-way: each complete seed on its own, never a pool over a subset
            parts += [judged(summ["seeds"][s]["goals"][m], m, f"seed {s}" + ("" if s in complete else ", part-way"))
                      for s in seeds_done[m]]
    want = len(res["config"].get("seeds", [])) or len(res["seeds"])
    state = (f"{len(complete)} of {want} seeds complete" +
             ("" if len(complete) >= want else ", the run is resumed in pieces, so this is provisional"))
    return [f"- **Training-time separation, confirmation** ([report]({link}), SmolLM2-135M, fresh seeds, methods "
            f"{', '.join(methods)} fixed from the screening; {state}): " + ". ".join(parts) + "."]


def _label_noise_text(summ: dict[str, Any]) -> str:
    """The label-noise arm at alpha = 0: the unlabelled members, beside the same members under the retrain."""
    rows = {n: r for n, r in (summ.get("label_noise") or {}).items() if r.get("alpha") == 0.0}
    if not rows:
        return ""
    parts = []
    for n in sorted(rows, key=lambda n: (rows[n]["noise"], rows[n]["method"])):
        r = rows[n]
        u, ref = r["unlabelled"], r.get("unlabelled_reference") or {}
        parts.append(f"{r['method']} with {r['noise']:.0%} unlabelled {u['extraction']['k']}/{u['extraction']['n']} "
                     f"extracted, {u['exposure']['estimate']:.2f} bits "
                     f"(the same members under the quantized retrain: {ref['exposure']['estimate']:.2f} bits)")
    return " Label noise, alpha = 0, the unlabelled members only: " + "; ".join(parts) + "."


def training_time_lines(t: dict[str, Any], link: str) -> list[str]:
    """Each separation method's training cost against plain fine-tuning (bench/separation_time.py)."""
    parts = [f"{m} {v['ratio_to_plain']:.2f}x" for m, v in t["methods"].items()]
    ok = [m for m, v in t["methods"].items() if v["ratio_to_plain"] <= t["goal_ratio"]]
    return [f"- **Separation training cost** ([JSON]({link}), {t['model']}, {t['threads']} threads, "
            f"{t['steps_timed']} steps x {t['rounds']} interleaved rounds, projected over the preset's schedule): "
            + ", ".join(parts) + f" of plain fine-tuning (goal <= {t['goal_ratio']:g}x: met by "
            f"{', '.join(ok) or 'none'})."]


def performance_lines(perf: dict[str, Any], link: str) -> list[str]:
    """One bullet for the issue-9 performance goals: how many hold, the headline figures, what missed."""
    goals = [g for g in perf["goals"] if g["holds"] is not None]
    held = [g for g in goals if g["holds"]]
    by = {g["goal"]: g["value"] for g in perf["goals"]}

    def fig(name: str, fmt: str) -> str:
        v = by.get(name)
        return "not measured" if v is None else format(v, fmt)

    missed = "; ".join(f"{g['goal'].split(' ', 1)[1]} {g['value']:.3g} (goal {g['threshold']})"
                       for g in goals if not g["holds"])
    return [f"- **Dual-stream performance on SmolLM2-135M** ([report]({link})): {len(held)} of {len(goals)} "
            f"measured goals hold. Decomposition {fig('1 decomposition wall time (s)', '.0f')} s = "
            f"{fig('1 decomposition / one FP32 forward (same run)', '.2f')}x one FP32 forward; alpha = 1 / alpha = 0 "
            f"decode {fig('2 decode alpha1 / alpha0', '.3f')}; "
            f"{fig('5 bits per parameter at rho = 1%', '.2f')} bits/param at rho = 1%."
            + (f" Missed: {missed}." if missed else "")]


def geometry_lines(res: dict[str, Any], kfac_sel: dict[str, Any] | None, link: str) -> list[str]:
    """The seeds' table 1 (geometry table): the split's held-out verdict, the other switches off, eta, LMC."""
    from libortho.report.geometry import best_auc, reading

    rows = res["rows"]

    def row(name: str) -> str:
        m = rows[name]["metrics"]
        per = m["per_canary"]
        return (f"{rows[name]['label']}: {sum(p['extracted'] for p in per)}/{len(per)} extracted, exposure "
                f"{m['exposure']['mean']:.2f} bits, best MIA AUC {best_auc(m):.3f}")

    kf = max(res["config"]["kfac_ranks"])
    shown = [n for n in ("ft", "v1_a0", f"kfac_r{kf}", "retrain") if n in rows]
    eta = res["eta"]["updates"]
    lmc = res["lmc"]["pairs"]
    out = [f"- **Seeds' table 1 on {res['config']['bench']['model']}** ([report]({link}), the kill-switch benchmark, "
           f"every switch off): {reading(res)} " + "; ".join(row(n) for n in shown) + ". "
           f"eta on a held-out public subspace: fine-tuning update {eta['ft']['eta']:.3f}, tau_high "
           f"{eta['tv_high']['eta']:.3f}, tau_low {eta['tv_low']['eta']:.3f} (random baseline "
           f"{eta['ft']['random_baseline']:.3f}). LMC barrier (public text): split at b = 0 to retrain "
           f"{lmc['tv_a0~retrain']['public']['barrier']:.4f}, INT4 alpha = 0 to retrain "
           f"{lmc['v1_a0~retrain']['public']['barrier']:.4f} nats."]
    if kfac_sel is not None:
        g = kfac_sel["gap_closed"]
        out.append(f"- **K-FAC selector at equal bits** ([report](docs/results/geometry_smollm2/kfac_selector.md), "
                   f"SmolLM2 INT4 g64, obs 1% budget): best rank-r under K-FAC closes {g['kfac']:.3f} of the GPTQ -> "
                   f"FP32 perplexity gap; sparse obs {g['sparse obs-residual']:.3f}, diag "
                   f"{g['sparse diag-residual']:.3f} (residual values), diag with optimal values "
                   f"{g['sparse diag-optimal']:.3f}; plain SVD at the same rank {g['svd']:.3f}.")
    return out


def _ablation_method(bench: dict[str, Any], key: str) -> str:
    from libortho.report.ablation import METHOD_NAMES, goal_checks

    f = bench["methods"][key]["figures"]
    checks = [v for v in goal_checks(bench, key).values() if v is not None]
    met = "a control, not judged" if key == "random_direction" else f"{sum(checks)}/{len(checks)} goals met"
    return (f"{METHOD_NAMES[key].split(' (')[0]}: {100 * f['behaviour']['rate']:.1f}% "
            f"[{100 * f['behaviour']['ci'][0]:.1f}, {100 * f['behaviour']['ci'][1]:.1f}], false behaviour "
            f"{100 * f['false_behaviour']['rate']:.1f}%, first-token KL {f['kl_first']['mean']:.3f}, PPL "
            f"{100 * f['ppl']['rel_change']:+.2f}% ({met})")


def ablation_lines(res: dict[str, Any], link: str) -> list[str]:
    """Targeted orthogonal ablation: per benchmark, the unedited rate and each edit's held-out figures."""
    out = []
    for name, bench in res["benchmarks"].items():
        before = bench["methods"]["before"]["figures"]["behaviour"]
        ch = bench["checks"]
        out.append(f"- **Ablation, {name}** ([report]({link}), {res['config']['model']}, "
                   f"{before['n']} held-out prompts a set): behaviour rate unedited {100 * before['rate']:.1f}% "
                   f"[{100 * before['ci'][0]:.1f}, {100 * before['ci'][1]:.1f}] on A, "
                   f"{100 * bench['methods']['before']['figures']['false_behaviour']['rate']:.1f}% on the matched "
                   "B prompts (the markers' false-positive floor); "
                   + "; ".join(_ablation_method(bench, k) for k in bench["methods"] if k != "before")
                   + f". Behaviour stream at alpha_b = 0 bit-identical: {ch['alpha0_bit_identical']}; stream vs "
                   f"weight edit max |logit diff| {ch['stream_vs_weights_max_abs_logit_diff']:.1e}.")
    return out


def render_block(results: Path) -> str:
    """The Markdown between the README's markers, from the JSON files under ``results``."""
    lines = []
    ks = _load(results / "kill_switch_smollm2" / "result.json")
    if ks is not None:
        lines += kill_switch_lines(ks, "docs/results/kill_switch_smollm2/report.md")
    tab = _load(results / "dual_stream_smollm2" / "ppl_table.json")
    if tab is not None:
        lines += dual_stream_lines(tab, _load(results / "dual_stream_smollm2" / "latency.json"),
                                   "docs/results/dual_stream_smollm2/README.md")
    perf = _load(results / "performance_smollm2" / "performance.json")
    if perf is not None:
        lines += performance_lines(perf, "docs/results/performance_smollm2.md")
    demo = _load(results / "separation_tiny" / "demo" / "result.json")
    if demo is not None:
        lines += separation_demo_lines(demo, "docs/results/separation_tiny/demo/report.md")
    scr_path = results / "separation_smollm2" / "screening" / "result.json"
    if scr_path.is_file():
        # summary recomputed from the rows, as the report does: the stored one is as old as the run's last piece
        from libortho.report.separation import load_separation

        lines += separation_screening_lines(load_separation(scr_path),
                                            "docs/results/separation_smollm2/screening/report.md")
    conf_path = results / "separation_smollm2" / "confirmation" / "result.json"
    if conf_path.is_file():
        from libortho.report.separation import load_separation

        lines += separation_confirmation_lines(load_separation(conf_path),
                                               "docs/results/separation_smollm2/confirmation/report.md")
    tt = _load(results / "separation_smollm2" / "training_time.json")
    if tt is not None:
        lines += training_time_lines(tt, "docs/results/separation_smollm2/training_time.json")
    geo = _load(results / "geometry_smollm2" / "table1" / "result.json")
    if geo is not None:
        lines += geometry_lines(geo, _load(results / "geometry_smollm2" / "kfac_selector.json"),
                                "docs/results/geometry_smollm2/table1/report.md")
    abl = _load(results / "ablation_smollm2" / "result.json")
    if abl is not None:
        lines += ablation_lines(abl, "docs/results/ablation_smollm2/report.md")
    for kind, folder in (("lattice", "geoq_smollm2/lattice"), ("census", "geoq_smollm2/census"),
                         ("geoq", "geoq_smollm2/geoq"), ("genius", "genius_smollm2"),
                         ("dual_dp", "dual_dp_smollm2/noise"), ("dual_dp_sgd", "dual_dp_tiny/dpsgd"),
                         ("dual_dp_sgd", "dual_dp_smollm2/dpsgd")):  # seeds 002/004: each report renders its line
        res = _load(results / folder / "result.json")
        if res is not None:
            module = importlib.import_module(f"libortho.report.{kind}")
            lines += module.readme_lines(res, f"docs/results/{folder}/report.md")
    ex = _load(results / "exposure_check" / "result.json")
    if ex is not None and "conclusion" in ex:
        lines += exposure_lines(ex, "docs/results/exposure_check/report.md")
    return "\n".join([BEGIN, *lines, END])


def replace_block(readme: str, block: str) -> str:
    """``readme`` with its marked block replaced by ``block``; refuses a README without the markers."""
    i, j = readme.find(BEGIN), readme.find(END)
    if i < 0 or j < i:
        raise ValueError(f"README has no {BEGIN} ... {END} block")
    return readme[:i] + block + readme[j + len(END):]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the README block is stale")
    args = ap.parse_args()
    path = ROOT / "README.md"
    text = path.read_text()
    new = replace_block(text, render_block(ROOT / "docs" / "results"))
    if args.check:
        print("README results block is " + ("up to date" if new == text else "STALE"))
        return 0 if new == text else 1
    atomic_write_text(path, new)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
