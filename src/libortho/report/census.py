"""Report of ``libortho experiment census``: are functional and sensitive outliers geometrically distinct?

Labels, thresholds and separation scores come from ``result.json``; the claims' verdicts are
recomputed here (:func:`claims`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from libortho.geometry.census import FEATURES, SEED_AUC_THRESHOLD, SEED_PPL_THRESHOLD
from libortho.report.document import Block, Figure, Heading, Para, Table, render_result
from libortho.report.plots import _save, plt

COMMAND = "make census"
COLORS = {"functional": "tab:blue", "sensitive": "tab:red", "both": "tab:purple", "neither": "tab:gray"}
MARKERS = {"magnitude": "o", "saliency": "s", "channel": "^", "random": "x"}


def _count(labels: list[str], name: str) -> int:
    return sum(lab in (name, "both") for lab in labels)


def _exists(count: int, n: int, name: str) -> tuple[str, bool]:
    """Whether ``count`` of ``n`` groups past a threshold is evidence: any, for the seed's fixed threshold; for
    the null's 95th percentile (which 5% of groups pass by chance), more than 5% (one-sided binomial, 0.05)."""
    if name != "null":
        return "", count > 0
    from scipy.stats import binomtest

    p = binomtest(count, n, 0.05, alternative="greater").pvalue if n else 1.0
    return f" (about {0.05 * n:.1f} expected by chance; binomial p {p:.3f})", p < 0.05


def claims(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Existence of each kind under each threshold, and the seed's geometric-distinctness claim."""
    out = []
    n = len(result["labels"]["seed"])
    for name, labels in result["labels"].items():
        t = result["thresholds"][name]
        f, s = _count(labels, "functional"), _count(labels, "sensitive")
        sep = result["separation"][name]
        sil = sep.get("silhouette")
        op = ">" if name == "null" else ">="
        for kind, count, what, thr in (("functional", f, "dPPL", t["ppl"]), ("sensitive", s, "dAUC", t["auc"])):
            extra, holds = _exists(count, n, name)
            out.append({"claim": f"{kind} outliers exist ({name} threshold: {what} {op} {thr:.3g})",
                        "measured": f"{count}/{n} outlier groups{extra}", "holds": holds})
        out.append({"claim": f"functional and sensitive outliers are geometrically distinct ({name} labels)",
                    "measured": ("not measurable: " + sep["why"]) if sil is None else
                    f"silhouette {sil:.3f}, Davies-Bouldin {sep['davies_bouldin']:.3f} on {sep['labels']}",
                    "holds": None if sil is None else sil > 0.25})
    return out


def scatter_figure(result: dict[str, Any], path: Path) -> Path:
    """dPPL against dAUC per group, marker by kind, with both thresholds."""
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for kind, marker in MARKERS.items():
        rs = [r for r in result["records"] if r["kind"] == kind]
        if rs:
            ax.scatter([r["delta_ppl"] for r in rs], [r["delta_auc"] for r in rs], marker=marker, s=18, label=kind)
    for name, style in (("seed", "--"), ("null", ":")):
        if name in result["thresholds"]:
            t = result["thresholds"][name]
            ax.axvline(t["ppl"], color="k", linestyle=style, linewidth=0.8, label=f"{name} thresholds")
            ax.axhline(t["auc"], color="k", linestyle=style, linewidth=0.8)
    ax.set(xscale="symlog", xlabel="dPPL when removed (points)", ylabel="dAUC when kept in precision")
    ax.legend(fontsize=7)
    return _save(fig, path)


def map_figure(result: dict[str, Any], path: Path) -> Path:
    """The 2-D map of the outlier groups' features, coloured by label (null thresholds when present)."""
    which = "null" if "null" in result["labels"] else "seed"
    outliers = [r for r in result["records"] if r["kind"] != "random"]
    xy = np.asarray(result["map"]["xy"])
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for lab, color in COLORS.items():
        for kind, marker in MARKERS.items():
            idx = [i for i, (r, la) in enumerate(zip(outliers, result["labels"][which], strict=True))
                   if la == lab and r["kind"] == kind]
            if idx:
                ax.scatter(xy[idx, 0], xy[idx, 1], c=color, marker=marker, s=20, label=f"{lab} ({kind})")
    ax.set(title=f"{result['map']['method'].upper()} of {', '.join(FEATURES)}; labels: {which} thresholds")
    ax.legend(fontsize=6)
    return _save(fig, path)


def _top(records: list[dict[str, Any]], key: str, n: int = 10) -> Table:
    rows = sorted((r for r in records if r["kind"] != "random"), key=lambda r: -r[key])[:n]
    return Table(["layer", "kind", "entries", "dPPL", "dAUC", *FEATURES],
                 [[r["layer"], r["kind"], str(r["size"]), f"{r['delta_ppl']:+.3f}", f"{r['delta_auc']:+.4f}",
                   *[f"{r[f]:.3g}" for f in FEATURES]] for r in rows], caption=f"Top groups by {key}")


def build_blocks(result: dict[str, Any], fig_dir: Path) -> list[Block]:
    """The report's blocks (figures written to ``fig_dir``)."""
    cfg, base = result["config"], result["baselines"]
    att = cfg["attack"]
    fig_dir.mkdir(parents=True, exist_ok=True)
    kinds = sorted({r["kind"] for r in result["records"]}, key=list(MARKERS).index)
    label_rows = []
    for name, labels in result["labels"].items():
        outl = [r for r in result["records"] if r["kind"] != "random"]
        for kind in kinds:
            if kind == "random":
                continue
            ls = [la for r, la in zip(outl, labels, strict=True) if r["kind"] == kind]
            label_rows.append([name, kind, *[str(ls.count(k)) for k in COLORS]])
    return [
        Heading(f"Outlier census on the separation benchmark's fine-tuned {cfg['model']}", 1),
        Para("Seed 004 claims that a model's outlier weights come in two kinds, functional (quantizing or "
             "removing them costs general ability) and sensitive (keeping them in precision is what lets private "
             "records be recognised), and that the two are geometrically distinct. Groups of outliers are chosen "
             "by magnitude, saliency and channel; random groups of the same size are the null. Functional: "
             f"removing the group raises general perplexity by >= {SEED_PPL_THRESHOLD} points; sensitive: keeping "
             f"it in precision inside the INT4 model raises the `{att}` attack's AUC by >= {SEED_AUC_THRESHOLD} "
             f"(the seed's thresholds), or by more than 95% of random groups (the null's). Reproduce with "
             f"`{COMMAND}`."),
        Para(f"Baselines: FP fine-tuned general PPL {base['ppl_ft']:.3f}; `{att}` AUC FP fine-tuned "
             f"{base['mia_ft'][att]['auc']:.3f}, whole model at INT4 {base['mia_int4'][att]['auc']:.3f} (quantizing "
             f"everything moves it by {base['mia_int4'][att]['auc'] - base['mia_ft'][att]['auc']:+.3f})."),
        Para(_resolution(result, att)),
        Heading("Claims and measurements"),
        Table(["claim", "measured", "holds"],
              [[c["claim"], c["measured"], "n/a" if c["holds"] is None else ("yes" if c["holds"] else "**no**")]
               for c in claims(result)]),
        Table(["thresholds", "dPPL", "dAUC"], [[n, f"{t['ppl']:.4g}", f"{t['auc']:.4g}"]
                                              for n, t in result["thresholds"].items()]),
        Table(["thresholds", "kind", *COLORS], label_rows, caption="Labels per kind"),
        Figure(scatter_figure(result, fig_dir / "deltas.png"), "Each group's two effects and the thresholds"),
        Figure(map_figure(result, fig_dir / "map.png"),
               f"2-D map ({result['map']['method'].upper()}) of the outlier groups' geometric features"),
        feature_table(result),
        _top(result["records"], "delta_ppl"), _top(result["records"], "delta_auc"),
    ]


def render_census_report(result_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Figures, ``report.md`` and ``report.html`` for a census ``result.json``."""
    return render_result(result_path, out_dir, "census", "records", "a census", build_blocks)


def feature_correlations(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Spearman correlation (and p-value) of each geometric feature with dPPL and with dAUC over every group."""
    from scipy.stats import spearmanr

    recs = result["records"]
    out = []
    for f in FEATURES:
        x = [r[f] for r in recs]
        row: dict[str, Any] = {"feature": f}
        for key in ("delta_ppl", "delta_auc"):
            rho, p = spearmanr(x, [r[key] for r in recs])
            row[key] = (float(rho), float(p))
        out.append(row)
    return out


def feature_table(result: dict[str, Any]) -> Table:
    """Which geometric features track each effect, whatever the labels (all groups, random ones included)."""
    return Table(["feature", "Spearman rho with dPPL (p)", "Spearman rho with dAUC (p)"],
                 [[r["feature"], *[f"{r[k][0]:+.2f} ({r[k][1]:.2g})" for k in ("delta_ppl", "delta_auc")]]
                  for r in feature_correlations(result)],
                 caption=f"Rank correlation of the features with the two effects over all {len(result['records'])} "
                         "groups: a feature that marks sensitive weights apart from functional ones would track dAUC "
                         "but not dPPL")


def _resolution(result: dict[str, Any], att: str) -> str:
    """How fine a dAUC can be (one member/non-member pair of the AUC's n_m x n_n) beside the largest measured."""
    roc = result["baselines"]["mia_int4"][att]
    pairs = roc["n_members"] * roc["n_nonmembers"]
    top = max(r["delta_auc"] for r in result["records"])
    return (f"Resolution: the AUC compares {roc['n_members']} member with {roc['n_nonmembers']} non-member "
            f"records, so one pair changing order moves it by {1 / pairs:.1e}. The largest dAUC of any group, "
            f"{top:+.4f}, is {top * pairs:.0f} such pairs; the seed's threshold would be "
            f"{SEED_AUC_THRESHOLD * pairs:,.0f}.")


def readme_lines(result: dict[str, Any], link: str) -> list[str]:
    """The README results block's line."""
    verdict = {True: "holds", False: "does not hold", None: "not measurable"}
    return [f"- **Outlier census** ([report]({link}), {result['config']['model']}, "
            f"{len(result['labels']['seed'])} outlier groups + "
            f"{sum(r['kind'] == 'random' for r in result['records'])} random): "
            + "; ".join(f"{c['claim']}: {c['measured']} ({verdict[c['holds']]})" for c in claims(result))
            + f". {_resolution(result, result['config']['attack'])}"]
