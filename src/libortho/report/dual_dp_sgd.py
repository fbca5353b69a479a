"""Report of the DP-SGD arms of dual DP: public skill against leakage, at equal epsilon and at equal exposure.

Everything is recomputed from ``result.json``. Public skill is the domain perplexity (the public
fine-tuning text, held out); leakage is the member canaries' mean exposure. The goal (issue 12) holds
when, at every exposure level that all arms reach, the memory-only arm's best domain perplexity is
lower than both baselines' (:func:`goal_check`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from libortho.eval.stats import Interval, paired_bootstrap_ppl_diff
from libortho.report.document import Block, Figure, Heading, Para, Table, render_result
from libortho.report.dual_dp import _leak, exposure_interval, frontier
from libortho.report.plots import _save, plt

COMMAND = "make dual-dp-sgd"  # the tiny epsilon sweep; SmolLM2 runs through make dual-dp-sgd-smollm2

ARM_NAMES = {"memory": "DP-SGD on memory neurons only", "public_then_private": "public FT, then DP-SGD on all linears",
             "full": "DP-SGD on all linears, all rows", "ft": "FP fine-tuned (no DP)", "public": "public rows only"}
UTILITY = "ppl_domain"


def command(result: dict[str, Any]) -> str:
    """The make target that reproduces ``result`` (the tiny sweep or the SmolLM2 run)."""
    return COMMAND if result["config"]["model"] == "tiny" else f"{COMMAND}-smollm2"


def _dp_points(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in result["points"].values() if p["arm"] in result["config"]["arms"]]


def goal_check(result: dict[str, Any]) -> dict[str, Any]:
    """Exposure levels every arm reaches, and at how many of them memory-only keeps the lowest domain PPL."""
    arms = tuple(result["config"]["arms"])
    rows = [r for r in frontier(_dp_points(result), arms, utility=UTILITY) if all(r[a] is not None for a in arms)]
    wins = [r for r in rows if "memory" in arms and all(r["memory"] < r[a] for a in arms if a != "memory")]
    return {"levels": len(rows), "memory_wins": len(wins), "holds": bool(rows) and len(wins) == len(rows)}


def _domain_gap(a: dict[str, Any], memory: dict[str, Any] | None) -> Interval | None:
    """Domain PPL of ``a`` minus the memory arm's, paired over the same evaluation blocks (None where the run kept
    no per-block NLLs, or ``a`` is the memory arm)."""
    if memory is None or a is memory or "block_nll_domain" not in a["metrics"] \
            or "block_nll_domain" not in memory["metrics"]:
        return None
    return paired_bootstrap_ppl_diff(a["metrics"]["block_nll_domain"], memory["metrics"]["block_nll_domain"])


def equal_eps(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per target epsilon (the finite ones; the budget every arm was given): each arm's domain PPL, exposure
    with its 95% bootstrap interval over the canaries, and which arm keeps the lowest domain PPL."""
    arms = tuple(result["config"]["arms"])
    rows = []
    for e in result["config"]["eps"]:
        pts = {p["arm"]: p for p in _dp_points(result) if p["eps"] == e}
        if not all(a in pts for a in arms):
            continue
        cells = {a: {"ppl_domain": pts[a]["metrics"][UTILITY], "exposure": exposure_interval(pts[a]["metrics"]),
                     "vs_memory": _domain_gap(pts[a], pts.get("memory"))} for a in arms}
        rows.append({"eps": e, "arms": cells, "best": min(arms, key=lambda a: cells[a]["ppl_domain"])})
    return rows


def _eq_cell(c: dict[str, Any]) -> str:
    e, gap = c["exposure"], c["vs_memory"]
    text = f"{c['ppl_domain']:.2f} / {e.estimate:.2f} [{e.low:.2f}, {e.high:.2f}]"
    return text if gap is None else text + f" {{{gap.estimate:+.2f} [{gap.low:+.2f}, {gap.high:+.2f}]}}"


def gap_line(eq: list[dict[str, Any]]) -> str:
    """At equal epsilon, each baseline's domain PPL minus memory-only's with its paired interval ('' when the run
    kept no per-block NLLs): positive means memory-only keeps more public skill."""
    named = [(r["eps"], a, c["vs_memory"]) for r in eq for a, c in r["arms"].items() if c["vs_memory"] is not None]
    if not named:
        return ""
    cells = [f"eps {e:g} {a} {g.estimate:+.2f} [{g.low:+.2f}, {g.high:+.2f}]" for e, a, g in named]
    gaps = [g for _, _, g in named]
    better = sum(g.low > 0 for g in gaps)
    worse = sum(g.high < 0 for g in gaps)
    return (f"Domain PPL of each baseline minus memory-only's at equal epsilon (paired over evaluation blocks): "
            f"{'; '.join(cells)}; memory-only is significantly better in {better} and significantly worse in "
            f"{worse} of {len(gaps)} comparisons.")


def _reference_line(result: dict[str, Any]) -> str:
    """The public-only model's figures (what 'learned nothing private' looks like) and whether the domain-PPL
    gaps between arms carry an interval."""
    pub = result["points"].get("public")
    text = ""
    if pub is not None:
        m = pub["metrics"]
        text = (f"Reference, the public fine-tune alone: domain PPL {m[UTILITY]:.2f}, exposure "
                f"{_leak(m):.2f} bits.")
    if not all("block_nll_domain" in p["metrics"] for p in _dp_points(result)):
        text += (" The domain-PPL gaps between arms are point estimates: this run kept no per-block NLLs, so "
                 "they carry no interval.")
    return text.strip()


def learned_line(result: dict[str, Any]) -> str:
    """What each arm learned of the private task: held-out (non-member) record NLL per epsilon, beside the public-only
    model's; an arm that keeps public skill by learning nothing would show the public-only value."""
    pub = result["points"].get("public", {}).get("metrics", {}).get("nonmember_private_nll")
    parts = []
    for e in result["config"]["eps"]:
        cells = [f"{p['arm']} {p['metrics']['nonmember_private_nll']:.2f}" for p in _dp_points(result) if p["eps"] == e]
        parts.append(f"eps {e:g}: " + ", ".join(cells))
    head = "Held-out record NLL (what was learned of the private rows' distribution; lower is more)"
    return head + (f", public-only model {pub:.2f}" if pub is not None else "") + ": " + "; ".join(parts) + "."


def _eps(x: float | None) -> str:
    return "inf" if x is None else f"{x:.2f}"


def point_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per measured model."""
    kmax = str(max(c["repeats"] for c in result["data"]["canaries"] if c["member"]))
    rows = []
    for p in result["points"].values():
        m, dp = p["metrics"], p.get("dp", {})
        group = p.get("group_privacy", {}).get(kmax)
        hits = sum(bool(c["extracted"]) for c in m["per_canary"])
        rows.append([ARM_NAMES.get(p["arm"], p["arm"]), "-" if p["arm"] in ("ft", "public") else _eps(p["eps"]),
                     _eps(dp.get("eps")) if dp else "-", f"{dp['sigma']:.3f}" if dp else "-",
                     "-" if group is None else f"{group['eps']:.1f} / {group['delta']:.1e}",
                     f"{hits}/{len(m['per_canary'])}", f"{m['exposure']['mean']:.2f}",
                     f"{max(v['auc'] for v in m['mia'].values()):.3f}", f"{m['ppl_domain']:.2f}",
                     f"{m['ppl_general']:.2f}", f"{m['nonmember_private_nll']:.3f}"])
    return rows


def curve_figure(result: dict[str, Any], path: Path) -> Path:
    """Domain perplexity against member exposure, one curve per arm (target epsilon annotated)."""
    fig, ax = plt.subplots(figsize=(5.8, 4.2))
    for arm, marker in (("memory", "o-"), ("public_then_private", "s-"), ("full", "^-")):
        pts = sorted((p for p in _dp_points(result) if p["arm"] == arm),
                     key=lambda p: float("inf") if p["eps"] is None else p["eps"])
        if not pts:
            continue
        ax.plot([_leak(p["metrics"]) for p in pts], [p["metrics"][UTILITY] for p in pts], marker,
                label=ARM_NAMES[arm])
        for p in pts:
            ax.annotate(_eps(p["eps"]).replace(".00", ""), (_leak(p["metrics"]), p["metrics"][UTILITY]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    for ref, c in (("ft", "black"), ("public", "tab:green")):
        if ref in result["points"]:
            m = result["points"][ref]["metrics"]
            ax.scatter([_leak(m)], [m[UTILITY]], color=c, marker="*", s=80, label=ARM_NAMES[ref], zorder=3)
    ax.set(xlabel="member exposure (bits, mean)", ylabel="domain (public) perplexity")
    ax.legend(fontsize=7)
    return _save(fig, path)


def build_blocks(result: dict[str, Any], fig_dir: Path) -> list[Block]:
    """The report's blocks (figures written to ``fig_dir``)."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    cfg = result["config"]
    arms = tuple(cfg["arms"])
    fr = frontier(_dp_points(result), arms, utility=UTILITY)
    goal = goal_check(result)
    kmax = max(c["repeats"] for c in result["data"]["canaries"] if c["member"])
    eq = equal_eps(result)
    verdict = (f"**Goal (memory-only DP keeps more public skill than both baselines at equal leakage): "
               f"{'met' if goal['holds'] else 'missed'}** - memory-only has the lowest domain perplexity at "
               f"{goal['memory_wins']} of the {goal['levels']} exposure levels all arms reach; at equal epsilon, "
               f"at {sum(r['best'] == 'memory' for r in eq)} of {len(eq)}.")
    return [
        Heading(f"Dual DP, DP-SGD arms ({cfg['model']})", 1),
        Para("Seed 002 (section 5.5) proposes noise only where memory lives. Three ways to learn the private rows "
             "of the kill-switch benchmark under DP-SGD (Poisson sampling, per-row clipping at "
             f"{cfg['clip']:g}, {cfg['steps']} steps of expected batch {cfg['expected_batch']:g}, Adam lr "
             f"{cfg['lr']:g}, {cfg.get('memory_lr') or cfg['lr']:g} for the memory neurons; opacus' RDP accountant): "
             f"memory neurons only ({cfg['memory_neurons']} per MLP) on top "
             "of a public fine-tune; every decoder linear on top of the same public fine-tune; every decoder linear "
             "from the model before fine-tuning on public and private rows together. Norms and embeddings are "
             f"frozen. Reproduce with `{command(result)}`."),
        Para(f"Accounting: a row is the privacy unit, delta = 1/(10 N) for the N rows an arm trains on. A canary "
             f"repeated k times sits in up to k rows, so it is protected only at the group level (k eps, "
             f"min(1, k e^((k-1) eps) delta)); the table gives it for the most repeated canaries (k = {kmax}), "
             "where the guarantee is weak or void at every epsilon here."),
        Table(["model", "target eps", "eps spent", "sigma", f"group eps / delta (k={kmax})", "extracted",
               "exposure (bits)", "best MIA AUC", "domain PPL", "general PPL", "held-out record NLL"],
              point_rows(result)),
        Table(["target eps", *[f"{ARM_NAMES[a]}: domain PPL / exposure [95% CI]" for a in arms],
               "lowest domain PPL"],
              [[f"{r['eps']:g}", *[_eq_cell(r["arms"][a]) for a in arms], ARM_NAMES[r["best"]]] for r in eq],
              caption="At equal epsilon (each arm's own rows are its privacy unit); exposure intervals resample "
                      "the member canaries; where the run kept per-block NLLs, each baseline's domain PPL minus "
                      "memory-only's follows in braces (paired bootstrap over the evaluation blocks)"),
        Table(["exposure at most", *[f"best domain PPL, {ARM_NAMES[a]}" for a in arms]],
              [[f"{r['exposure_at_most']:.3f}", *["-" if r[a] is None else f"{r[a]:.2f}" for a in arms]] for r in fr],
              caption="At equal measured leakage (member exposure), the public skill each arm keeps; the levels are "
                      "point estimates, and levels closer than the exposure intervals above are not told apart"),
        Para(" ".join(t for t in (verdict, gap_line(eq), _reference_line(result), learned_line(result)) if t)),
        Figure(curve_figure(result, fig_dir / "curves.png"), "Domain perplexity against member exposure"),
    ]


def render_dpsgd_report(result_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Figures, ``report.md`` and ``report.html`` for a DP-SGD sweep ``result.json``."""
    return render_result(result_path, out_dir, "dual_dp_sgd", "points", "a DP-SGD sweep", build_blocks)


def readme_lines(result: dict[str, Any], link: str) -> list[str]:
    """The README results block's line."""
    goal, eq = goal_check(result), equal_eps(result)
    parts = []
    for e in result["config"]["eps"]:
        cells = [f"{a} {p['metrics']['ppl_domain']:.1f}/{_leak(p['metrics']):.1f}" for a in result["config"]["arms"]
                 for p in _dp_points(result) if p["arm"] == a and p["eps"] == e]
        parts.append(f"eps {e:g}: " + ", ".join(cells))
    return [f"- **Dual DP, DP-SGD** ([report]({link}), {result['config']['model']}; domain PPL / exposure bits): "
            + "; ".join(parts) + f". Goal (memory-only keeps the most public skill at equal exposure): "
            f"{'met' if goal['holds'] else 'missed'} ({goal['memory_wins']} of {goal['levels']} levels); at equal "
            f"epsilon memory-only has the lowest domain PPL at {sum(r['best'] == 'memory' for r in eq)} of {len(eq)}. "
            + " ".join(t for t in (gap_line(eq), _reference_line(result), learned_line(result)) if t)]
