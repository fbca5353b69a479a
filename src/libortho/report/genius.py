"""Report of ``libortho experiment genius``: the seed's "saving the genius" claim beside our measurements.

Accuracies, intervals, retention and verdicts are recomputed from the per-item results in
``result.json`` each time (:func:`summary`), never stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from libortho.data.reasoning import N_CHOICES
from libortho.eval.stats import clopper_pearson, mcnemar_exact
from libortho.report.document import Block, Figure, Heading, Para, Table, render_result
from libortho.report.plots import _save, plt

COMMAND = "make genius"
CHANCE = 1 / N_CHOICES
GOAL_RETENTION, GOAL_RHO, PROBE_FLOOR = 0.8, 0.02, 0.40


def retention(fp: list[bool], cond: list[bool], chance: float = 0.0, n_boot: int = 4000, seed: int = 0
              ) -> tuple[float, float, float]:
    """``(acc - chance) / (acc_fp32 - chance)`` with a paired percentile-bootstrap interval over items."""
    a, b = np.asarray(fp, dtype=float), np.asarray(cond, dtype=float)
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    den = a[idx].mean(1) - chance
    draws = np.where(den > 0, (b[idx].mean(1) - chance) / np.where(den > 0, den, 1), np.nan)
    est = (b.mean() - chance) / (a.mean() - chance) if a.mean() > chance else float("nan")
    lo, hi = np.nanquantile(draws, [0.025, 0.975])
    return float(est), float(lo), float(hi)


def summary(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per condition: accuracies with Clopper-Pearson intervals, retention vs FP32, McNemar vs pure."""
    ev = result["evals"]
    fp = ev["fp32"]
    out: dict[str, dict[str, Any]] = {}
    for name, e in ev.items():
        row: dict[str, Any] = {"bits": e.get("total_bits_per_param", 32.0)}
        for metric in ("choice", "exact"):
            ci = clopper_pearson(sum(e[metric]), len(e[metric]))
            row[metric] = {"acc": ci.estimate, "ci": [ci.low, ci.high], "k": sum(e[metric]), "n": len(e[metric])}
        row["retention"] = retention(fp["choice"], e["choice"])
        row["retention_above_chance"] = retention(fp["choice"], e["choice"], CHANCE)
        pure = name.split("+")[0]
        if "+" in name and pure in ev:
            row["vs_pure"] = mcnemar_exact(ev[pure]["choice"], e["choice"]).p_value
        out[name] = row
    return out


def claims(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The probe's validity, the seed's claim and the issue's goal, each with a computed verdict."""
    s = summary(result)
    fp = s["fp32"]["choice"]
    ctl = clopper_pearson(sum(result["evals"]["fp32"]["control"]), len(result["evals"]["fp32"]["control"]))
    out = [{"claim": f"the probe is hard but solvable: FP32 scores >= {PROBE_FLOOR:.0%} (four-way choice)",
            "measured": f"{fp['acc']:.1%} [{fp['ci'][0]:.1%}, {fp['ci'][1]:.1%}] of {fp['n']}; the same candidates "
                        f"under another item's question: {ctl.estimate:.1%} [{ctl.low:.1%}, {ctl.high:.1%}]",
            "goal": f">= {PROBE_FLOOR:.0%}", "holds": fp["acc"] >= PROBE_FLOOR}]
    for bits in result["config"]["ortho_bits"]:
        pure = s.get(f"int{bits}")
        for rho in result["config"]["rhos"]:
            row = s.get(f"int{bits}+ortho{rho:g}")
            if row is None or pure is None:
                continue
            r, lo, hi = row["retention"]
            rc = row["retention_above_chance"]
            goal = bits == 3 and rho <= GOAL_RHO
            out.append({
                "claim": (f"INT{bits} + ortho (rho {rho:.0%}) keeps >= {GOAL_RETENTION:.0%} of FP32 accuracy"
                          if goal else f"INT{bits} + ortho (rho {rho:.0%}) against pure INT{bits}"),
                "measured": f"{row['choice']['acc']:.1%} vs pure {pure['choice']['acc']:.1%} (McNemar p "
                            f"{row['vs_pure']:.3f}); retention {r:.2f} [{lo:.2f}, {hi:.2f}], above chance "
                            f"{rc[0]:.2f} [{rc[1]:.2f}, {rc[2]:.2f}]; {row['bits']:.2f} bits/param",
                "goal": f"retention >= {GOAL_RETENTION}" if goal else "seed: pure INT3 < 10%, + ortho > 60% (GSM8K)",
                "holds": (r >= GOAL_RETENTION) if goal else None})
    return out


def accuracy_figure(result: dict[str, Any], path: Path) -> Path:
    """Choice accuracy against bits per parameter, pure widths and widths with the ortho stream."""
    s = summary(result)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, row in s.items():
        lo, hi = row["choice"]["ci"]
        acc = row["choice"]["acc"]
        marker = "s" if name == "fp32" else ("o" if "+" not in name else "^")
        ax.errorbar(row["bits"], acc, yerr=[[acc - lo], [hi - acc]], fmt=marker, capsize=3)
        ax.annotate(name, (row["bits"], acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(CHANCE, color="gray", linestyle=":", label="chance (1/4)")
    ax.set(xscale="log", xlabel="bits per quantized parameter (log)", ylabel="four-way choice accuracy")
    ax.legend(fontsize=7)
    return _save(fig, path)


def copied_distractor(problem: dict[str, Any]) -> bool:
    """Whether one of the item's wrong candidates is also a number written in its question."""
    import re

    from libortho.data.reasoning import Problem, answer_choices

    p = Problem(problem["question"], problem["answer"], problem["family"])
    numbers = {int(x) for x in re.findall(r"\d+", p.question)}
    return any(c in numbers for c in answer_choices(p) if c != p.answer)


def _copy_table(result: dict[str, Any]) -> Table:
    """Choice accuracy on items with and without a distractor copied from the question, per model."""
    flags = [copied_distractor(p) for p in result["problems"]]
    rows = []
    for name, e in result["evals"].items():
        with_c = [c for c, f in zip(e["choice"], flags, strict=True) if f]
        without = [c for c, f in zip(e["choice"], flags, strict=True) if not f]
        rows.append([name, f"{np.mean(with_c):.1%} ({len(with_c)})" if with_c else "-",
                     f"{np.mean(without):.1%} ({len(without)})"])
    return Table(["model", "a distractor appears in the question (n)", "none does (n)"], rows,
                 caption="Choice accuracy where the wrong candidates include a number from the question")


def _fmt(m: dict[str, Any]) -> str:
    return f"{m['acc']:.1%} [{m['ci'][0]:.1%}, {m['ci'][1]:.1%}]"


def build_blocks(result: dict[str, Any], fig_dir: Path) -> list[Block]:
    """The report's blocks (figures written to ``fig_dir``)."""
    cfg = result["config"]
    fig_dir.mkdir(parents=True, exist_ok=True)
    s = summary(result)
    families = sorted({p["family"] for p in result["problems"]}, key=cfg["families"].index)
    fam_rows = []
    for name, e in result["evals"].items():
        accs = [np.mean([c for c, p in zip(e["choice"], result["problems"], strict=True) if p["family"] == f])
                for f in families]
        fam_rows.append([name, *[f"{a:.0%}" for a in accs]])
    return [
        Heading(f"Saving the genius: reasoning at INT3/INT2 with the ortho stream ({cfg['model']})", 1),
        Para("Seed 002 (section 5.4) claims a pure INT3 model falls below 10% on GSM8K while INT3 plus the "
             "high-precision ortho stream stays above 60%. GSM8K is offline-unavailable and beyond a 135M model, "
             f"so the probe is the project's own: {len(result['problems'])} held-out items (two-digit sums and "
             "differences, three-digit sums, two-by-one-digit products, word problems of one to three steps), "
             f"{cfg['n_shots']} worked examples per family from a disjoint split, scored by four-way choice "
             "(candidates in an arithmetic run, the answer's position uniform; chance 25%) and by greedy exact "
             "match. Calibration is public text only. Retention is accuracy over FP32's; 'above chance' subtracts "
             "a uniform guess's 25% first. That floor is not every model's: where a distractor also appears in "
             "the question, a model that copies numbers from the question scores below it (table below). "
             f"Reproduce with `{COMMAND}`."),
        Heading("Claims, goal and measurements"),
        Table(["claim", "measured", "goal / seed", "holds"],
              [[c["claim"], c["measured"], c["goal"], "n/a" if c["holds"] is None else ("yes" if c["holds"] else
                                                                                         "**no**")]
               for c in claims(result)]),
        Heading("Every condition"),
        Table(["model", "bits/param", "choice accuracy", "exact match", "retention [95% CI]",
               "above chance [95% CI]", "vs pure (McNemar p)"],
              [[n, f"{r['bits']:.2f}", _fmt(r["choice"]), _fmt(r["exact"]),
                "{:.2f} [{:.2f}, {:.2f}]".format(*r["retention"]),
                "{:.2f} [{:.2f}, {:.2f}]".format(*r["retention_above_chance"]),
                f"{r['vs_pure']:.3f}" if "vs_pure" in r else "-"] for n, r in s.items()]),
        Table(["model", *families], fam_rows, caption="Choice accuracy by family"),
        _copy_table(result),
        Figure(accuracy_figure(result, fig_dir / "accuracy.png"),
               "Four-way choice accuracy (95% Clopper-Pearson) against bits per quantized parameter"),
    ]


def render_genius_report(result_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Figures, ``report.md`` and ``report.html`` for a genius ``result.json``."""
    return render_result(result_path, out_dir, "genius", "evals", "a genius", build_blocks)


def readme_lines(result: dict[str, Any], link: str) -> list[str]:
    """The README results block's line: every condition's accuracy, the goal's verdicts, the paired tests."""
    s = summary(result)
    conds = ", ".join(f"{n} {r['choice']['acc']:.1%}" for n, r in s.items())
    goals = [c for c in claims(result) if c["holds"] is not None]
    ps = [r["vs_pure"] for r in s.values() if "vs_pure" in r]
    fp = s["fp32"]["choice"]
    return [f"- **Saving the genius** ([report]({link}), {result['config']['model']}, {len(result['problems'])} "
            f"held-out reasoning items, four-way choice, chance 25%; exact match in the report): {conds}. "
            f"FP32 {fp['acc']:.1%} [{fp['ci'][0]:.1%}, {fp['ci'][1]:.1%}]. With the ortho stream against the same "
            f"width without it: McNemar p {min(ps):.2f}-{max(ps):.2f}. "
            + "; ".join(_verdict_text(c) for c in goals) + "."]


def _verdict_text(c: dict[str, Any]) -> str:
    """A claim's verdict, with the retention figures where the claim is the retention goal."""
    text = f"{c['claim'][0].upper()}{c['claim'][1:]}: {'holds' if c['holds'] else 'does not hold'}"
    return f"{text} ({c['measured'].split(';')[1].strip()})" if "keeps" in c["claim"] else text
