"""Figures of the geometry-table report (:mod:`libortho.report.geometry`), each from the result JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import torch

from libortho.experiments.geometry_table import half_stats
from libortho.geometry.spectra import SpectralDensity
from libortho.report.plots import _save

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def row_skill(rows: dict[str, Any], name: str) -> float | None:
    """Skill retained of row ``name``: (PPL_pre - PPL) / (PPL_pre - PPL_ft) on the held-out domain."""
    from libortho.experiments.summary import skill_retained

    pre, ft = rows["pre"]["metrics"]["ppl_domain"], rows["ft"]["metrics"]["ppl_domain"]
    return skill_retained(pre, rows[name]["metrics"]["ppl_domain"], ft)


def rank_figure(result: dict[str, Any], path: Path) -> Path:
    rows, ch = result["rows"], result["choice"]
    hb = ch["halves"]["b"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for base, style in (("fp", "o-"), ("int4", "s--")):
        pts = sorted((r["rank"], n) for n, r in rows.items() if r["group"] == "taskvec" and r.get("base") == base
                     and "restpre" not in n)
        if not pts:
            continue
        ks = [p[0] for p in pts]
        ax[0].plot(ks, [half_stats(rows[n]["metrics"], hb)["exposure"] for _, n in pts], style,
                   label=f"split b=0 ({base}), half B")
        ax[1].plot(ks, [row_skill(rows, n) for _, n in pts], style, label=f"split b=0 ({base})")
    ax[0].axhline(ch["retrain_half_b"]["exposure"] + result["config"]["exposure_margin_bits"], color="tab:green",
                  linestyle=":", label="retrain + 1 bit (half B)")
    ax[0].axhline(half_stats(rows["ft"]["metrics"], hb)["exposure"], color="tab:red", linestyle="--",
                  label="FP fine-tuned")
    ax[1].axhline(result["config"]["skill_goal"], color="tab:gray", linestyle=":", label="skill goal")
    for a, t in zip(ax, ("exposure (bits), half B", "skill retained"), strict=True):
        a.set_xscale("log", base=2)
        a.set_xlabel("rank k of tau_low per matrix")
        a.set_ylabel(t)
        a.legend(fontsize=7)
    return _save(fig, path)


def lmc_figure(result: dict[str, Any], path: Path) -> Path:
    pairs = result["lmc"]["pairs"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, p in pairs.items():
        for a, text in zip(ax, ("public", "private"), strict=True):
            a.plot(p[text]["ts"], p[text]["losses"], marker=".", label=name.replace("~", " → "))
    for a, text in zip(ax, ("public", "private"), strict=True):
        a.set_xlabel("t")
        a.set_ylabel(f"mean NLL on {text} text")
        a.set_title(f"loss along (1-t) a + t b, {text}")
    ax[0].legend(fontsize=7)
    return _save(fig, path)


def eta_figure(result: dict[str, Any], path: Path) -> Path:
    ups = result["eta"]["updates"]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for u, rep in ups.items():
        per = list(rep["per_layer"].values())
        ax.plot(range(len(per)), [p["eta"] for p in per], ".", markersize=3, label=f"{u} (pooled {rep['eta']:.3f})")
    first = next(iter(ups.values()))["per_layer"]
    ax.plot(range(len(first)), [p["random_baseline"] for p in first.values()], "k-", linewidth=0.8,
            label="random baseline sqrt(k/d)")
    ax.set_xlabel("decoder linear (block order)")
    ax.set_ylabel("eta on held-out public subspace")
    ax.legend(fontsize=7)
    return _save(fig, path)


def spectra_figure(result: dict[str, Any], path: Path, layers: int = 6) -> Path:
    sp = result["spectra"]
    names = list(sp)
    pick = [names[i] for i in sorted({round(j * (len(names) - 1) / max(layers - 1, 1)) for j in range(layers)})]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for n in pick:
        s = sp[n]["s"]
        ax.semilogy(range(1, len(s) + 1), s, label=n.replace("model.layers.", "L"))
    ax.set_xlabel("index")
    ax.set_ylabel("singular value of tau = W_ft - W_pre")
    ax.legend(fontsize=7)
    return _save(fig, path)


def hessian_figure(h: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for a, text in zip(ax, ("public", "private"), strict=True):
        for model, per in h["models"].items():
            x = per[text]
            d = SpectralDensity(torch.tensor(x["nodes"]), torch.tensor(x["weights"]), x["dim"])
            grid, dens = d.histogram(bins=60)
            a.semilogy(grid, dens.clamp_min(1e-12), label=model)
        ft = h["models"].get("ft", {}).get(text)
        for dname, style in (("tau_low", ":"), ("tau_high", "--")):
            if ft is not None:
                a.axvline(ft["directions"][dname]["q"], color="k", linestyle=style, linewidth=0.8,
                          label=f"q({dname}) at ft")
        a.set_xlabel("eigenvalue")
        a.set_ylabel("smoothed spectral density")
        a.set_title(f"loss Hessian on {text} text (SLQ)")
    ax[0].legend(fontsize=7)
    return _save(fig, path)
