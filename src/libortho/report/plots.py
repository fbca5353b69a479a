"""Figures of a kill-switch result (matplotlib, Agg backend, PNG), drawn from the summary rows only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

from libortho.atomic import atomic_write_file

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REFERENCES = (("ft", "FP fine-tuned", "tab:red", "--"), ("retrain", "retrain w/o private", "tab:green", ":"),
              ("pre", "pre-fine-tune", "tab:gray", "-."))
GROUP_STYLE = {"reference": ("tab:gray", "s"), "quantized": ("tab:purple", "D"), "libortho": ("tab:blue", "o"),
               "unlearning": ("tab:orange", "^")}


def _save(fig: Any, path: Path) -> Path:
    """Write a PNG atomically (temp file beside it, then rename)."""
    try:
        return atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"), suffix=".png")
    finally:
        plt.close(fig)


def _sweep(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = result["summary"]["rows"]
    return sorted((rows[n] for n in result["alpha_sweep"] if n in rows), key=lambda r: r["alpha"])


def _refs(ax: Any, rows: dict[str, Any], key: str) -> None:
    for name, label, color, style in REFERENCES:
        if name in rows and rows[name].get(key) is not None:
            ax.axhline(rows[name][key], color=color, linestyle=style, linewidth=1.2, label=label)


def alpha_figure(result: dict[str, Any], path: Path) -> Path:
    """Seed figure 1: canary extraction and exposure vs alpha, per repetition count, with references."""
    rows, sweep = result["summary"]["rows"], _sweep(result)
    alphas = [r["alpha"] for r in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, by, ylabel in ((axes[0], "extraction", "extraction_by_repeats", "canary extraction rate"),
                                (axes[1], "exposure", "exposure_by_repeats", "mean exposure (bits)")):
        ax.plot(alphas, [r[key] for r in sweep], "o-", color="tab:blue", linewidth=2.2, label="LibOrtho (all)")
        for rep in sorted(sweep[0][by], key=int) if sweep else []:
            ax.plot(alphas, [r[by][rep] for r in sweep], ".-", alpha=0.6, linewidth=1, label=f"LibOrtho, {rep}x seen")
        _refs(ax, rows, key)
        ax.set_xlabel("alpha (ortho stream coefficient)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.03, 1.03)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle("Privacy kill switch: leakage vs alpha")
    return _save(fig, path)


def perplexity_figure(result: dict[str, Any], path: Path) -> Path:
    """Perplexity on the public domain and on the general corpus vs alpha, with references."""
    rows, sweep = result["summary"]["rows"], _sweep(result)
    alphas = [r["alpha"] for r in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "ppl_domain", "public domain (held out)"),
                           (axes[1], "ppl_general", "general corpus (held out)")):
        ax.plot(alphas, [r[key] for r in sweep], "o-", color="tab:blue", linewidth=2.2, label="LibOrtho")
        _refs(ax, rows, key)
        if "rtn_int4" in rows:
            ax.axhline(rows["rtn_int4"][key], color="tab:purple", linestyle="--", linewidth=1, label="INT4 RTN")
        ax.set_title(title)
        ax.set_xlabel("alpha")
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    return _save(fig, path)


def plane_figure(result: dict[str, Any], path: Path, x_min: float = -1.0) -> Path:
    """The leakage/utility plane: skill retained (x) against extraction and exposure (y), one point per method.

    Methods that lose more than ``-x_min`` times the fine-tuning gain are drawn at the left edge,
    labelled with their true value; the alpha sweep is one connected line, labelled at its ends.
    """
    rows = result["summary"]["rows"]
    pts = [r for r in rows.values() if r["skill_retained"] is not None and r["name"] != "gptq_int4"]
    sweep = _sweep(result)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, ylabel in ((axes[0], "extraction", "canary extraction rate"),
                            (axes[1], "exposure", "mean exposure (bits)")):
        ax.plot([max(x_min, r["skill_retained"]) for r in sweep], [r[key] for r in sweep], "-", color="tab:blue",
                alpha=0.5, zorder=2)
        for i, r in enumerate(pts):
            x = max(x_min, r["skill_retained"])
            color, marker = GROUP_STYLE.get(r["group"], ("black", "x"))
            ax.scatter(x, r[key], color=color, marker="<" if x > r["skill_retained"] else marker, s=50, zorder=3)
            if r["group"] == "libortho" and r["alpha"] not in (sweep[0]["alpha"], sweep[-1]["alpha"]):
                continue
            label = r["label"] + (f" (skill {r['skill_retained']:.1f})" if x > r["skill_retained"] else "")
            ax.annotate(label, (x, r[key]), fontsize=7, xytext=(5, 4 + 7 * (i % 3)), textcoords="offset points")
        ax.set_xlim(x_min - 0.08, max(1.15, max(r["skill_retained"] for r in pts) + 0.1))
        ax.set_xlabel("skill retained on the public domain (1 = full fine-tuning gain)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker=m, linestyle="", label=g) for g, (c, m) in GROUP_STYLE.items()]
    axes[1].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle("Leakage vs utility: lower-right is better")
    return _save(fig, path)
