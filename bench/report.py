"""Render benchmark JSON (ppl table, baselines, latency) into one Markdown report.

    .venv/bin/python bench/report.py --out docs/results/dual_stream_smollm2.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path("bench/results")


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def ppl_section(tab: dict, extra_rows: list[dict]) -> list[str]:
    rows = tab["rows"] + extra_rows
    fp = next(r["ppl"] for r in rows if r["method"] == "FP32")
    out = [f"Calibration: {tab['calib_tokens']} tokens ({tab['args']['n_calib']} x {tab['args']['seq_len']}) of "
           f"{', '.join(tab['args']['calib'])}; perplexity on {tab['eval_tokens']} held-out tokens of "
           f"`{tab['args']['eval_corpus']}` (a different corpus). Model: {tab['model']}.", "",
           "| method | group | selector | rho | ortho values | PPL alpha=1 | PPL alpha=0 | vs FP32 | "
           "gap closed | bits/param |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['method']} | {r.get('group_size', '-')} | failed: {r['error']} | | | | | | | |")
            continue
        p1 = r.get("ppl_alpha1", r.get("ppl"))
        p0 = r.get("ppl_alpha0")
        bpp = r.get("total_bits_per_param", r.get("bits_per_param", 32.0))
        gap = r.get("gap_closed")
        out.append(f"| {r['method']} | {r.get('group_size', '-')} | {r.get('selector', '-')} | "
                   f"{r.get('rho', '-')} | {r.get('values', '-')} | {p1:.3f} | "
                   f"{'-' if p0 is None else f'{p0:.3f}'} | {p1 / fp:+.1%} | "
                   f"{'-' if gap is None else f'{gap:.1%}'} | {bpp:.3f} |".replace("| +", "| +"))
    null = [r for r in rows if "alpha0_bit_identical_to_gptq" in r]
    if null:
        ok = sum(r["alpha0_bit_identical_to_gptq"] for r in null)
        out += ["", f"Null test (logits of a probe batch at alpha = 0 vs the base-only GPTQ model): "
                f"{ok}/{len(null)} configurations bit-identical."]
    for gs, st in tab.get("decomposition", {}).items():
        out.append(f"- GPTQ g{gs} decomposition of the whole model: {st['wall_s']:.0f} s wall, "
                   f"peak process RSS {st['peak_process_rss_mb']:.0f} MiB "
                   f"({st['calib_tokens']} calibration tokens, true-sequential={st['true_sequential']}).")
    return out


def latency_section(lat: dict) -> list[str]:
    d, p, r = lat["decode_s_per_token"], lat["prefill_16x128_s"], lat["ratios"]
    out = [f"CPU, {lat['threads']} threads, medians of {lat['runs']} interleaved decode runs and "
           f"{lat['prefill_runs']} prefill runs, on `{lat['dir']}`.", "",
           "| model | decode ms/token | prefill 16x128 s |", "|---|---|---|"]
    for k in d:
        out.append(f"| {k} | {1e3 * d[k]:.2f} | {p[k]:.3f} |" if k in p else f"| {k} | {1e3 * d[k]:.2f} | - |")
    out += ["", "| ratio | value | target |", "|---|---|---|"]
    targets = {"null_decode_alpha0_over_base": "<= 1.01", "null_prefill_alpha0_over_base": "<= 1.01",
               "overhead_decode_alpha1_over_alpha0": "<= 1.10", "overhead_prefill_alpha1_over_alpha0": "<= 1.10"}
    out += [f"| {k} | {v:.4f} | {targets.get(k, '-')} |" for k, v in r.items()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/dual_stream_smollm2.md"))
    args = ap.parse_args()
    lines = ["# Dual-stream decomposition of SmolLM2-135M (generated from bench/results/*.json)", "",
             "SmolLM2-135M's released weights come from a Q4_1 GGUF: they sit on a 4-bit grid in groups of 32 "
             "along `in_features`, so a 4-bit g32 quantizer would reproduce them exactly; we benchmark group "
             "sizes 64 and 128.", ""]
    tab = _load(RESULTS / "ppl_table.json")
    base = _load(RESULTS / "ppl_baselines.json")
    if tab:
        extra = [r for r in (base or {}).get("rows", []) if r["method"] != "FP32"]
        lines += ["## Perplexity", ""] + ppl_section(tab, extra) + [""]
    lat = _load(RESULTS / "latency.json")
    if lat:
        lines += ["## Latency: null test and ortho overhead", ""] + latency_section(lat) + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
