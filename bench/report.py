"""Render the dual-stream benchmark JSON (perplexity table, latency) into one Markdown report.

    .venv/bin/python bench/report.py --results docs/results/dual_stream_smollm2

Every number in the report is read from ``ppl_table.json`` / ``latency.json`` in that folder;
nothing is typed in. The functions return lists of lines so tests can check them on known input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparisons import gap_closed, gptq_reference, ppl_of  # noqa: E402
from libortho.atomic import atomic_write_text  # noqa: E402


def change(ppl: float, ref: float) -> str:
    """Relative change of ``ppl`` against ``ref`` as a signed percentage (+31.0% means 1.31x)."""
    return f"{ppl / ref - 1:+.1%}"


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _provenance(obj: dict[str, Any]) -> list[str]:
    runs = obj.get("git", [])
    out = []
    for g in runs:  # the run's own output folder under docs/results is not code: it does not make a run dirty
        dirty = [d for d in g.get("dirty_files") or [] if not d.split()[-1].startswith("docs/results/")]
        out.append(f"- run started {g.get('started', '?')} at commit `{g.get('commit', '?')[:10]}`"
                   + (f" with {len(dirty)} uncommitted file(s): {', '.join(d.split()[-1] for d in dirty[:6])}"
                      + (" ..." if len(dirty) > 6 else "") if dirty else " (clean tree)"))
    return out


def table_rows(tab: dict[str, Any]) -> list[dict[str, Any]]:
    """One display row per table entry, in a stable order: FP32, then per group size."""
    rows = tab["rows"]
    fp = ppl_of(rows["fp32"])["ppl"]
    out = [{"method": "FP32", "group": "-", "a1": fp, "a0": None, "bits": 32.0, "gap": None}]
    for gs in tab["args"]["group_sizes"]:
        ref = gptq_reference(rows, gs)
        for key, r in rows.items():
            if r.get("group_size") != gs:
                continue
            if "error" in r:
                out.append({"method": r["method"], "group": gs, "error": r["error"], "key": key})
                continue
            bits = r.get("total_bits_per_param", r.get("bits_per_param"))
            if key.endswith("default-alpha0"):
                out.append({"method": "LibOrtho default, saved + reloaded", "group": gs, "selector": r["selector"],
                            "rho": r["rho"], "values": r["values"], "a1": r["alpha1_reloaded"]["ppl"],
                            "a0": r["alpha0"]["ppl"], "bits": bits,
                            "gap": None if ref is None else gap_closed(r["alpha1_reloaded"]["ppl"], ref["ppl"], fp)})
            elif r["method"] == "LibOrtho":
                a1 = r["alpha1"]["ppl"]
                out.append({"method": "LibOrtho", "group": gs, "selector": r["selector"], "rho": r["rho"],
                            "values": r["values"], "a1": a1, "a0": None, "bits": bits,
                            "gap": None if ref is None else gap_closed(a1, ref["ppl"], fp)})
            else:
                out.append({"method": r["method"], "group": gs, "a1": ppl_of(r)["ppl"], "a0": None, "bits": bits,
                            "gap": None})
    return out


def ppl_section(tab: dict[str, Any]) -> list[str]:
    rows = table_rows(tab)
    fp = rows[0]["a1"]
    a = tab["args"]
    out = [f"Calibration: {tab['calib_tokens']} tokens ({a['n_calib']} x {a['seq_len']}) of "
           f"{', '.join(a['calib'])}; perplexity on {tab['eval_tokens']} held-out tokens "
           f"({a['n_eval']} blocks of {a['seq_len']}) of `{a['eval_corpus']}`, a different corpus. "
           f"Model: {tab['model']}. Machine: {tab['machine']['cpu']}, {tab['machine']['threads']} threads.", "",
           "`PPL` is measured at alpha = 1 for LibOrtho rows (plain perplexity for the others); `PPL alpha=0` "
           "only where that model was saved, reloaded and measured at alpha = 0. `vs FP32` is the relative change "
           "of perplexity. `gap closed` is the fraction of the GPTQ -> FP32 gap that alpha = 1 closes.", "",
           "| method | group | selector | rho | values | PPL | PPL alpha=0 | vs FP32 | gap closed | bits/param |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['method']} | {r['group']} | failed: {r['error'][:90]} | | | | | | | |")
            continue
        out.append(f"| {r['method']} | {r['group']} | {r.get('selector', '-')} | {r.get('rho', '-')} | "
                   f"{r.get('values', '-')} | {r['a1']:.3f} | {_fmt(r['a0'])} | {change(r['a1'], fp)} | "
                   f"{_fmt(r['gap'], '.1%')} | {_fmt(r['bits'])} |")
    return out


def null_section(tab: dict[str, Any]) -> list[str]:
    out = []
    for gs in tab["args"]["group_sizes"]:
        r = tab["rows"].get(f"libortho-g{gs}-default-alpha0", {})
        nt = r.get("null_test")
        if nt is None:
            continue
        ref = ppl_of(tab["rows"][f"gptq-g{gs}"])
        out.append(f"- g{gs}: {nt['what']}: bit-identical = **{nt['bit_identical']}** on {nt['probe_tokens']} "
                   f"tokens (max |logit difference| {nt['max_abs_logit_diff']:.3g}); perplexity {ref['ppl']:.4f} "
                   f"without the ortho stream, {r['alpha0']['ppl']:.4f} with it at alpha = 0 (both measured).")
    return out


def _short(key: str) -> str:
    """``libortho-g64-diag-0.01-residual`` -> ``diag-0.01-residual``."""
    return "-".join(key.split("-")[2:])


def comparison_section(tab: dict[str, Any]) -> list[str]:
    cs = tab.get("comparisons", [])
    if not cs:
        return []
    out = ["Paired bootstrap over the evaluation blocks (10,000 resamples) of PPL(a) - PPL(b): 95% percentile "
           "interval and two-sided bootstrap p-value; negative means a is better. `better` is decided after "
           "Holm-Bonferroni over all configurations of the same question (family-wise error 5%).", "",
           "| question | group | rho | a | b | PPL a | PPL b | a - b | 95% CI | p | better |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cs:
        out.append(f"| {c['what']} | {c['group_size']} | {c['rho']} | {_short(c['a'])} | {_short(c['b'])} | "
                   f"{c['ppl_a']:.3f} | {c['ppl_b']:.3f} | {c['diff']:+.3f} | "
                   f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {c['p_value']:.4f} | {c['better']} |")
    out.append("")
    for q, v in tab.get("verdicts", {}).items():
        counts = ", ".join(f"{k.replace('_', ' ')}: {n}" for k, n in v.items() if k not in ("decision", "configs"))
        out.append(f"- **{q}** over {v['configs']} configurations: {counts} -> decision: "
                   f"**{v['decision'] or 'not separated by the data'}**")
    return out


def cost_section(tab: dict[str, Any]) -> list[str]:
    out = []
    for key, d in tab.get("decomposition", {}).items():
        for kind, st in d.items():
            out.append(f"- GPTQ {key} decomposition ({kind.replace('_', ' ')}), in a process of its own: "
                       f"{st['wall_s']:.0f} s wall; peak RSS sampled after every stage of the decomposition "
                       f"{st['peak_rss_mb']:.0f} MiB (model, calibration activations"
                       f"{', Hessians kept for the sweep' if kind == 'with_ortho' else ''}); the process's "
                       f"high-water mark {st['child_peak_rss_mb']:.0f} MiB (may include the launching process's "
                       f"memory at spawn); {st['calib_tokens']} calibration tokens, true-sequential = "
                       f"{st['true_sequential']}.")
    if out:
        out.append("- Wall times were measured while other jobs shared the 2 cores: they are upper bounds, not the "
                   "idle-machine figures the performance issue asks for.")
    return out


def latency_section(lat: dict[str, Any]) -> list[str]:
    d, p, r = lat["decode_s_per_token"], lat["prefill_16x128_s"], lat["ratios"]
    out = [f"CPU, {lat['threads']} threads, medians of {lat['runs']} interleaved decode runs "
           f"({lat.get('decode_steps', '?')} tokens each) and {lat['prefill_runs']} prefill runs, on `{lat['dir']}`.",
           *_provenance(lat), "", "| model | decode ms/token | prefill 16x128 s |", "|---|---|---|"]
    for k in d:
        out.append(f"| {k} | {1e3 * d[k]:.2f} | {_fmt(p.get(k))} |")
    out += ["", "| ratio | value | target |", "|---|---|---|"]
    targets = {"null_decode_alpha0_over_base": "<= 1.01", "null_prefill_alpha0_over_base": "<= 1.01",
               "overhead_decode_alpha1_over_alpha0": "<= 1.10", "overhead_prefill_alpha1_over_alpha0": "<= 1.10"}
    out += [f"| {k} | {v:.4f} | {targets.get(k, '-')} |" for k, v in r.items()]
    return out


def render(results: Path) -> str:
    """The whole report as Markdown, from the JSON files in ``results``."""
    lines = ["# Dual-stream decomposition of SmolLM2-135M", "",
             f"Generated by `bench/report.py` from `{results}/ppl_table.json` and `latency.json`; "
             "re-run the measurements with `bench/ppl_table.py` and `bench/latency.py`.", "",
             "SmolLM2-135M's released weights come from a Q4_1 GGUF (4-bit codes in groups of 32 along "
             "`in_features`, each with an fp16 scale and minimum), so group size 32 would flatter any 4-bit "
             "quantizer; we benchmark group sizes 64 and 128.", ""]
    tab_path = results / "ppl_table.json"
    if tab_path.exists():
        tab = json.loads(tab_path.read_text())
        lines += ["## Perplexity", "", *_provenance(tab)]
        if tab.get("partial"):
            lines.append("- **partial run**: not every stage finished (see failed rows)")
        lines += ["", *ppl_section(tab), "", "## Null test: two independent decompositions", "", *null_section(tab),
                  "", "## Which selector, which values", "", *comparison_section(tab), "",
                  "## Decomposition cost", "", *cost_section(tab), ""]
    lat_path = results / "latency.json"
    if lat_path.exists():
        lines += ["## Latency: null test and ortho overhead", "", *latency_section(json.loads(lat_path.read_text())),
                  ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("docs/results/dual_stream_smollm2"))
    args = ap.parse_args()
    out = atomic_write_text(args.results / "README.md", render(args.results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
