"""Report of geometry-aware randomised quantization: leakage and utility of each arm against uniform INT-b.

Every comparison is recomputed from ``result.json``: paired over the same canaries (exposure), the same
member and non-member records (MIA AUC, one resample of both models' scores) and the same evaluation
blocks (perplexity). The seed's claim holds for an arm when its exposure is significantly below uniform
INT-b's *and* its general perplexity is not significantly above it; the geometry earns the credit only
if the arm also leaks less than the random-region control at the same noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from libortho.eval.stats import (
    Interval,
    auc_draws,
    bootstrap_mean,
    pair_matrix,
    paired_bootstrap_ppl_diff,
    resample_counts,
)
from libortho.report.document import Block, Figure, Heading, Para, Table, render_result
from libortho.report.plots import _save, plt

COMMAND = "make geoq"
ATTACK = "reference"
SEED_CLAIM = ("functional regions at high bits with GPTQ and sensitive regions at low bits with randomised rounding "
              "keep general skill and remove memorised records, at the bits of a uniform quantizer")


def _exposures(arm: dict[str, Any]) -> np.ndarray:
    return np.array([c["exposure"] for c in arm["metrics"]["per_canary"]], dtype=np.float64)


def exposure_diff(a: dict[str, Any], b: dict[str, Any]) -> Interval:
    """Mean member exposure of ``a`` minus ``b``, paired over the same canaries (bootstrap)."""
    return bootstrap_mean(_exposures(a) - _exposures(b))


def auc_diff(a: dict[str, Any], b: dict[str, Any], attack: str = ATTACK, n_boot: int = 2000,
             seed: int = 0) -> Interval:
    """MIA AUC of ``a`` minus ``b`` for ``attack``, both resampled on the same records (paired bootstrap)."""
    sa, sb = a["metrics"]["mia_scores"][attack], b["metrics"]["mia_scores"][attack]
    Pa, Pb = pair_matrix(sa["members"], sa["nonmembers"]), pair_matrix(sb["members"], sb["nonmembers"])
    rng = np.random.default_rng(seed)
    cm, cn = resample_counts(Pa.shape[0], n_boot, rng), resample_counts(Pa.shape[1], n_boot, rng)
    draws = auc_draws(Pa, cm, cn) - auc_draws(Pb, cm, cn)
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return Interval(float(Pa.mean() - Pb.mean()), float(lo), float(hi), 0.95)


def ppl_diff(a: dict[str, Any], b: dict[str, Any], which: str = "general") -> Interval:
    """Perplexity of ``a`` minus ``b`` on the same evaluation blocks (paired bootstrap)."""
    return paired_bootstrap_ppl_diff(a["metrics"][f"block_nll_{which}"], b["metrics"][f"block_nll_{which}"])


def comparisons(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each regional arm against uniform INT-b and against the random-region control at its noise and seed."""
    arms, mid = result["arms"], result["config"]["widths"][1]
    base = arms[f"uniform-int{mid}"]
    rows = []
    for name, arm in arms.items():
        if arm.get("sensitivity") is None:
            continue
        ctrl = next((a for n, a in arms.items() if a.get("sensitivity") == "random" and a["noise"] == arm["noise"]
                     and a["seed"] == arm["seed"]), None)
        d_exp, d_ppl = exposure_diff(arm, base), ppl_diff(arm, base)
        m = arm["metrics"]
        dominated = [n for n, a in arms.items() if a.get("sensitivity") is None and n != name and "bits_per_param" in a
                     and a["bits_per_param"] <= arm["bits_per_param"]
                     and a["metrics"]["exposure"]["mean"] <= m["exposure"]["mean"]
                     and a["metrics"]["ppl_general"] <= m["ppl_general"]]
        rows.append({"dominated_by": dominated, "arm": name, "sensitivity": arm["sensitivity"], "noise": arm["noise"],
                     "d_exposure": d_exp, "d_auc": auc_diff(arm, base), "d_ppl_general": d_ppl,
                     "d_ppl_domain": ppl_diff(arm, base, "domain"),
                     "vs_random": None if ctrl is None or arm["sensitivity"] == "random" else exposure_diff(arm, ctrl),
                     "claim_holds": d_exp.high < 0 and d_ppl.low <= 0})
    return rows


def spread_sentence(spread: list[dict[str, Any]]) -> str:
    """One sentence on the dither draw's own effect: the largest seed-to-seed exposure gap and how many plans'
    gaps exclude zero."""
    top = max(spread, key=lambda r: r["max_exposure_gap"].estimate)
    sig = sum(r["max_exposure_gap"].low > 0 for r in spread)
    return (f"The dither seed alone moves a plan's exposure by up to {top['max_exposure_gap'].estimate:.2f} bits "
            f"(regions by {top['sensitivity']}, noise {top['noise']:g}); the gap's paired interval excludes zero "
            f"for {sig} of {len(spread)} plans drawn twice, so a difference between two single-draw arms of that "
            f"size is not evidence.")


def _ci(iv: Interval | None, fmt: str = "+.2f") -> str:
    if iv is None:
        return "-"
    return f"{iv.estimate:{fmt}} [{iv.low:{fmt}}, {iv.high:{fmt}}]"


def _label(name: str, arm: dict[str, Any], seeds: tuple[int, ...] | list[int] = (0,)) -> str:
    if name in ("ft", "pre"):
        return {"ft": "FP fine-tuned", "pre": "before fine-tuning"}[name]
    if arm["sensitivity"] is None:
        return f"uniform INT{arm['bits']} GPTQ"
    random = arm["noise"] > 0 or arm["sensitivity"] == "random"
    seed = f", seed {arm['seed']}" if random and len(seeds) > 1 else ""
    return f"regions by {arm['sensitivity']}, noise {arm['noise']:g}{seed}"


def seed_spread(result: dict[str, Any]) -> list[dict[str, Any]]:
    """For every (sensitivity, noise) plan drawn with more than one dither seed: each seed's exposure and general
    perplexity, and the largest seed-to-seed exposure difference with its paired interval (same canaries).

    This is the variance the per-arm intervals leave out: they resample canaries, records and blocks of one
    quantized model, not the dither draw that made it."""
    plans: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for arm in result["arms"].values():
        if arm.get("sensitivity") is not None:
            plans.setdefault((arm["sensitivity"], arm["noise"]), []).append(arm)
    rows = []
    for (sens, noise), arms in plans.items():
        if len(arms) < 2:
            continue
        exp = [a["metrics"]["exposure"]["mean"] for a in arms]
        hi, lo = arms[int(np.argmax(exp))], arms[int(np.argmin(exp))]
        rows.append({"sensitivity": sens, "noise": noise, "seeds": [a["seed"] for a in arms], "exposure": exp,
                     "ppl_general": [a["metrics"]["ppl_general"] for a in arms],
                     "max_exposure_gap": exposure_diff(hi, lo)})
    return rows


def arm_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per measured model."""
    rows, seeds = [], result["config"]["dither_seeds"]
    for name, arm in result["arms"].items():
        m = arm["metrics"]
        n = len(m["per_canary"])
        hits = sum(bool(c["extracted"]) for c in m["per_canary"])
        bits = f"{arm['bits_per_param']:.3f}" if "bits_per_param" in arm else "32 (FP)"
        rows.append([_label(name, arm, seeds), bits, f"{hits}/{n}", f"{m['exposure']['mean']:.2f}",
                     f"{m['mia'][ATTACK]['auc']:.3f}", f"{m['ppl_domain']:.2f}", f"{m['ppl_general']:.2f}"])
    return rows


def scatter_figure(result: dict[str, Any], path: Path) -> Path:
    """General perplexity against member exposure for every arm."""
    fig, ax = plt.subplots(figsize=(5.8, 4.2))
    colours = {None: "black", "update": "tab:red", "private_curvature": "tab:blue", "random": "tab:gray"}
    for name, arm in result["arms"].items():
        m = arm["metrics"]
        c = colours.get(arm.get("sensitivity"), "tab:green") if name not in ("ft", "pre") else "tab:green"
        ax.scatter(m["exposure"]["mean"], m["ppl_general"], color=c, s=22)
        ax.annotate(name, (m["exposure"]["mean"], m["ppl_general"]), fontsize=6, textcoords="offset points",
                    xytext=(3, 2))
    ax.set(xlabel="member exposure (bits, mean)", ylabel="general perplexity", yscale="log")
    return _save(fig, path)


def claim_rows(comps: list[dict[str, Any]]) -> list[list[str]]:
    """The seed's claim beside the measurement, one row per regional arm."""
    return [[c["arm"], _ci(c["d_exposure"]), _ci(c["d_auc"], "+.3f"), _ci(c["d_ppl_general"]), _ci(c["vs_random"]),
             ", ".join(c["dominated_by"]) or "-", "holds" if c["claim_holds"] else "not shown"] for c in comps]


def build_blocks(result: dict[str, Any], fig_dir: Path) -> list[Block]:
    """The report's blocks (figures written to ``fig_dir``)."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    cfg = result["config"]
    lo, mid, hi = cfg["widths"]
    comps = comparisons(result)
    held = [c["arm"] for c in comps if c["claim_holds"]]
    spread = seed_spread(result)
    spread_blocks: list[Block] = []
    if spread:
        spread_blocks.append(Heading("The dither draw's own variance"))
        spread_blocks.append(Table(
            ["plan", "dither seeds", "exposure per seed", "general PPL per seed",
             "largest exposure gap between seeds (paired)"],
            [[f"regions by {r['sensitivity']}, noise {r['noise']:g}", ", ".join(map(str, r["seeds"])),
              ", ".join(f"{e:.2f}" for e in r["exposure"]), ", ".join(f"{p:.2f}" for p in r["ppl_general"]),
              _ci(r["max_exposure_gap"])] for r in spread],
            caption="The dither draw's own variance: the same plan quantized with different random seeds."))
    return [
        Heading(f"Geometry-aware randomised quantization ({cfg['model']})", 1),
        Para(f"Seed 004's claim: {SEED_CLAIM}. Measured on the kill-switch benchmark (the model fine-tuned on public "
             f"text plus {result['data']['members']} member canaries). Regions are (row, group of "
             f"{result['kill_switch_config']['quant']['group_size']} inputs) of every decoder linear. The "
             f"{cfg['frac']:.1%} most sensitive regions go to INT{lo} with dither (noise in grid steps: 0 nearest, 1 "
             f"stochastic rounding), the {cfg['frac']:.1%} most functional of the rest (W^2 diag H on public "
             f"calibration) to INT{hi}, the others stay INT{mid}: the same mean code width as uniform INT{mid}, plus "
             f"log2(3) bits per group to name the width (counted). The errors of every region, noise included, are "
             f"compensated by GPTQ in the later columns. Reproduce with `{COMMAND}`."),
        Table(["model", "bits / param", "extracted", "exposure (bits)", f"MIA AUC ({ATTACK})", "domain PPL",
               "general PPL"], arm_rows(result)),
        Para(f"Every quantized row is computed here the same way: regional GPTQ (with one width and no noise it is "
             f"GPTQ, a test) on this run's layer Hessians, evaluated as dense fp32 weights. The kill-switch report's "
             f"INT{mid} GPTQ model is not the same computation (its selector's calibration was public, and it runs "
             f"through the INT4 kernel with bf16 activations), so its figures differ from the uniform INT{mid} row; "
             f"compare within this table. The intervals below cover canaries, records and evaluation blocks, not "
             f"the dither draw: " + (f"the {len(spread)} plans drawn with {len(cfg['dither_seeds'])} dither seeds "
                                      f"show that draw's spread in the last table." if spread else
                                      "one dither seed per arm, so that variance is not measured.")),
        Table(["arm", f"exposure - INT{mid}", f"AUC - INT{mid}", f"general PPL - INT{mid}",
               "exposure - random regions", "dominated by (fewer bits, less exposure, lower PPL)", "seed's claim"],
              claim_rows(comps),
              caption=f"Paired differences against uniform INT{mid} (95% bootstrap intervals). The claim holds for an "
                      f"arm when its exposure is significantly lower and its general perplexity not significantly "
                      f"higher; the last interval is against the random-region control at the same noise."),
        Para("**Result:** " + (f"the claim holds for {', '.join(held)}." if held else
                               f"no regional arm leaks significantly less than uniform INT{mid} without a significant "
                               f"loss of general perplexity: the seed's claim is not reproduced here.")
             + f" {sum(bool(c['dominated_by']) for c in comps)} of {len(comps)} regional arms are beaten on both "
               f"exposure and general perplexity by a uniform GPTQ width at no more bits per parameter."
             + (" " + spread_sentence(spread) if spread else "")),
        Figure(scatter_figure(result, fig_dir / "leak_vs_ppl.png"), "General perplexity against member exposure"),
        *spread_blocks,
    ]


def render_geoq_report(result_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Figures, ``report.md`` and ``report.html`` for a geometry-aware quantization ``result.json``."""
    return render_result(result_path, out_dir, "geoq", "arms", "a geometry-aware quantization", build_blocks)


def readme_lines(result: dict[str, Any], link: str) -> list[str]:
    """The README results block's line."""
    mid = result["config"]["widths"][1]
    base = result["arms"][f"uniform-int{mid}"]
    comps = comparisons(result)
    best = min(comps, key=lambda c: c["d_exposure"].estimate) if comps else None
    held = [c["arm"] for c in comps if c["claim_holds"]]
    text = (f"- **Geometry-aware randomised quantization** ([report]({link}), {result['config']['model']}, "
            f"kill-switch benchmark): uniform INT{mid} {base['bits_per_param']:.2f} bits/param, exposure "
            f"{base['metrics']['exposure']['mean']:.2f} bits, general PPL {base['metrics']['ppl_general']:.2f}")
    if best is not None:
        text += (f"; lowest-exposure regional arm {best['arm']}: exposure {_ci(best['d_exposure'])}, general PPL "
                 f"{_ci(best['d_ppl_general'])} (paired, vs INT{mid})")
    dominated = sum(bool(c["dominated_by"]) for c in comps)
    text += (f"; seed's claim (less leakage, no PPL loss, equal bits) holds for {len(held)} of {len(comps)} arms"
             + (f" ({', '.join(held)})" if held else "")
             + f"; {dominated} of {len(comps)} are beaten on both leakage and PPL by a uniform width at no more bits.")
    spread = seed_spread(result)
    if spread:
        text += " " + spread_sentence(spread)
    return [text]
