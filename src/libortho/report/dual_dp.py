"""Report of the dual-DP noise sweep: utility against leakage for noise on the memory stream vs on all weights.

The comparison is recomputed from ``result.json`` (:func:`frontier`): for each arm, the best general
perplexity among its points whose leakage is at or below a level, at every level the points reach.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from libortho.eval.stats import Interval, bootstrap_mean
from libortho.report.document import Block, Figure, Heading, Para, Table, render_result
from libortho.report.plots import _save, plt

COMMAND = "make dual-dp"
ARM_NAMES = {"none": "no noise (Q + O)", "ortho": "noise on the ortho stream only", "all": "noise on every weight"}


def _leak(m: dict[str, Any]) -> float:
    """The leakage figure the comparison uses: mean exposure of the member canaries (bits)."""
    return float(m["exposure"]["mean"])


def exposure_interval(m: dict[str, Any]) -> Interval:
    """Mean member exposure with a 95% bootstrap interval over the canaries."""
    return bootstrap_mean([c["exposure"] for c in m["per_canary"]])


def frontier(points: list[dict[str, Any]], arms: tuple[str, ...], shared: tuple[str, ...] = (),
             utility: str = "ppl_general") -> list[dict[str, Any]]:
    """At each exposure level a point reaches: per arm, the lowest ``utility`` (a perplexity) among its points and
    the ``shared`` ones (e.g. the noiseless start) with exposure at or below that level."""
    levels = sorted({_leak(p["metrics"]) for p in points})
    rows = []
    for lev in levels:
        row: dict[str, Any] = {"exposure_at_most": lev}
        for arm in arms:
            ok = [p["metrics"][utility] for p in points if p["arm"] in (arm, *shared) and _leak(p["metrics"]) <= lev]
            row[arm] = min(ok) if ok else None
        rows.append(row)
    return rows


def curve_figure(result: dict[str, Any], path: Path) -> Path:
    """General perplexity against member exposure, one curve per arm (sigma annotated)."""
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    pts = list(result["points"].values())
    base = next(p for p in pts if p["arm"] == "none")
    for arm, marker in (("ortho", "o-"), ("all", "s-")):
        arm_pts = [base, *sorted((p for p in pts if p["arm"] == arm), key=lambda p: p["sigma"])]
        ax.plot([_leak(p["metrics"]) for p in arm_pts], [p["metrics"]["ppl_general"] for p in arm_pts], marker,
                label=ARM_NAMES[arm])
        for p in arm_pts[1:]:
            ax.annotate(f"{p['sigma']:g}", (_leak(p["metrics"]), p["metrics"]["ppl_general"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set(xlabel="member exposure (bits, mean)", ylabel="general perplexity", yscale="log")
    ax.legend(fontsize=7)
    return _save(fig, path)


def build_blocks(result: dict[str, Any], fig_dir: Path) -> list[Block]:
    """The report's blocks (figures written to ``fig_dir``)."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in result["points"].values():
        m = p["metrics"]
        best_mia = max(v["auc"] for k, v in m["mia"].items())
        ci = exposure_interval(m)
        rows.append([ARM_NAMES[p["arm"]], f"{p['sigma']:g}", f"{m['extraction']['rate']:.3f}",
                     f"{m['exposure']['mean']:.2f} [{ci.low:.2f}, {ci.high:.2f}]", f"{best_mia:.3f}",
                     f"{m['ppl_domain']:.2f}", f"{m['ppl_general']:.2f}"])
    fr = frontier(list(result["points"].values()), ("ortho", "all"), ("none",))
    n_canaries = len(next(iter(result["points"].values()))["metrics"]["per_canary"])
    return [
        Heading(f"Dual DP, noise arm: memory-only vs all-weight Gaussian noise ({result['config']['model']})", 1),
        Para("Seed 002 (section 5.5) proposes noise where memory lives and none where skill lives. The kill-switch "
             "benchmark's fine-tuned model is decomposed (GPTQ base + ortho stream) and turned back into dense "
             "weights Q + O; Gaussian noise goes on the ortho stream's entries only (sigma in units of each layer's "
             "ortho RMS) or on every weight (sigma in units of each layer's weight RMS). No (eps, delta) is claimed "
             f"for this noise: it is uncalibrated. Reproduce with `{COMMAND}`."),
        Table(["arm", "sigma", "extraction", "exposure (bits) [95% CI]", "best MIA AUC", "domain PPL", "general PPL"],
              rows, caption=f"Exposure intervals resample the {n_canaries} member canaries (bootstrap of the mean); "
                            "two points whose intervals overlap are not told apart by this benchmark's leakage "
                            "measure, and the equal-leakage table below ranks them anyway."),
        Table(["exposure at most", "best general PPL, ortho-only noise", "best general PPL, all-weight noise"],
              [[f"{r['exposure_at_most']:.3f}", "-" if r["ortho"] is None else f"{r['ortho']:.2f}",
                "-" if r["all"] is None else f"{r['all']:.2f}"] for r in fr],
              caption="At equal measured leakage (member exposure), the utility each arm keeps"),
        Table(["seed's claim", "measured", "baseline", "command"], [claim_row(result)],
              caption="Claimed, measured, baseline"),
        Figure(curve_figure(result, fig_dir / "curves.png"), "General perplexity against member exposure"),
    ]


def contest(result: dict[str, Any]) -> tuple[int, int, int]:
    """At the exposure levels both arms reach: (levels, ortho-only noise has the lower general PPL, ties)."""
    rows = [r for r in frontier(list(result["points"].values()), ("ortho", "all"), ("none",))
            if r["ortho"] is not None and r["all"] is not None]
    return len(rows), sum(r["ortho"] < r["all"] for r in rows), sum(r["ortho"] == r["all"] for r in rows)


def claim_row(result: dict[str, Any]) -> list[str]:
    """Seed 002's dual-DP claim beside what the sweep measured."""
    levels, wins, _ = contest(result)
    return ["noise on the memory stream only protects privacy at less utility cost than noise on every weight",
            f"ortho-only noise has the lower general PPL at {wins} of {levels} exposure levels both arms reach",
            "noise on every weight of Q + O, same harness", f"`{COMMAND}`"]


def render_dual_dp_report(result_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Figures, ``report.md`` and ``report.html`` for a noise-sweep ``result.json``."""
    return render_result(result_path, out_dir, "dual_dp_noise", "points", "a dual-DP noise", build_blocks)


def readme_lines(result: dict[str, Any], link: str) -> list[str]:
    """The README results block's line."""
    levels, wins, ties = contest(result)
    none = result["points"]["none:0"]["metrics"]
    return [f"- **Dual DP, Gaussian noise** ([report]({link}), {result['config']['model']}): from Q + O (exposure "
            f"{_leak(none):.2f} bits, general PPL {none['ppl_general']:.2f}), at the {levels} exposure levels "
            f"both arms reach, noise on the ortho stream only keeps the lower general PPL at {wins}, ties at "
            f"{ties} (the noiseless start), and all-weight noise wins at {levels - wins - ties}; uncalibrated "
            "noise, no (eps, delta) claimed."]
