"""Figures of a separation result (matplotlib, Agg, PNG), drawn from one seed's summary and evaluations.

Each function returns the PNG's path, or ``None`` when the seed holds no data for that figure
(no OGD run, no label-noise arm, no deletion), so the report simply leaves the figure out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from libortho.report.plots import _save, plt

REFERENCE_ROWS = (("pre", "pre-fine-tune", "tab:gray"), ("ft_fp", "FP fine-tuned", "tab:red"),
                  ("ft_int4", "FP fine-tuned + INT4", "tab:red"), ("retrain_masked_fp", "retrain masked", "tab:green"),
                  ("retrain_masked_int4", "retrain masked + INT4", "tab:green"),
                  ("retrain_dropped_fp", "retrain dropped", "olive"),
                  ("retrain_dropped_int4", "retrain dropped + INT4", "olive"))
METHOD_COLORS = ("tab:blue", "tab:purple", "tab:cyan", "tab:brown", "tab:pink", "navy", "teal")


def _est(fig: dict[str, Any] | None, key: str) -> float | None:
    iv = (fig or {}).get(key)
    return None if not iv or iv.get("estimate") is None else float(iv["estimate"])


def _err(fig: dict[str, Any], key: str) -> list[list[float]] | None:
    iv = fig.get(key, {})
    if "low" not in iv:
        return None
    return [[iv["estimate"] - iv["low"]], [iv["high"] - iv["estimate"]]]


def _point(ax: Any, fig: dict[str, Any], ykey: str, color: str, marker: str, label: str | None) -> tuple | None:
    """One CI-barred point at (general perplexity, ``ykey``); ``None`` when either is missing."""
    x, y = _est(fig, "ppl_general"), _est(fig, ykey)
    if x is None or y is None:
        return None
    ax.errorbar(x, y, xerr=_err(fig, "ppl_general"), yerr=_err(fig, ykey), color=color, marker=marker,
                markersize=6, linestyle="", capsize=2, elinewidth=0.8, label=label)
    return x, y


def _arrow(ax: Any, a: tuple | None, b: tuple | None, color: str) -> None:
    if a and b:
        ax.annotate("", xy=b, xytext=a, arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.6})


def _plane_panel(ax: Any, figs: dict[str, Any], methods: list[str], baselines: list[str], ykey: str) -> None:
    for name, label, color in REFERENCE_ROWS:
        if name in figs:
            _point(ax, figs[name], ykey, color, "s" if name.endswith("int4") else "P", label)
    for i, m in enumerate(methods):
        c = METHOD_COLORS[i % len(METHOD_COLORS)]
        fp = _point(ax, figs.get(f"{m}_fp_a0", {}), ykey, c, "o", f"{m} FP a=0")
        q = _point(ax, figs.get(f"{m}_int4_a0", {}), ykey, c, "D", f"{m} INT4 a=0")
        _arrow(ax, fp, q, c)
    for b in baselines:
        fp = _point(ax, figs.get(f"{b}_fp", {}), ykey, "tab:orange", "^", f"{b} (tuned) FP")
        q = _point(ax, figs.get(f"{b}_int4", {}), ykey, "tab:orange", "v", f"{b} (tuned) INT4")
        _arrow(ax, fp, q, "tab:orange")
    if ykey == "secret_auc":
        pts = [f for f in figs.values() if f.get("group") == "unlearning_sweep"]
        for j, f in enumerate(pts):
            _point(ax, f, ykey, "gold", "x", "unlearning sweep" if j == 0 else None)
    ax.set_xlabel("general perplexity (held out)")
    ax.grid(alpha=0.3)


def plane_figure(summary: dict[str, Any], methods: list[str], baselines: list[str], path: Path) -> Path | None:
    """(a) Leakage-utility plane: exposure at alpha = 0 and secret-level AUC against general perplexity."""
    figs = summary["figures"]
    if not any(f"{m}_int4_a0" in figs for m in methods):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    _plane_panel(axes[0], figs, methods, baselines, "exposure")
    axes[0].set_ylabel("mean member exposure at alpha = 0 (bits)")
    _plane_panel(axes[1], figs, methods, baselines, "secret_auc")
    axes[1].set_ylabel("secret-level MIA AUC")
    axes[1].axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Leakage vs utility (95% CIs; arrows FP -> INT4): lower-left is better")
    return _save(fig, path)


def alpha_figure(summary: dict[str, Any], methods: list[str], path: Path) -> Path | None:
    """(b) Extraction rate and mean exposure at alpha 0 and 1 per method, INT4 and FP, with references."""
    figs = summary["figures"]
    if not any(f"{m}_int4_a0" in figs for m in methods):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, ylabel in ((axes[0], "extraction", "canary extraction rate"),
                            (axes[1], "exposure", "mean member exposure (bits)")):
        for i, m in enumerate(methods):
            c = METHOD_COLORS[i % len(METHOD_COLORS)]
            for base, style in (("int4", "-"), ("fp", "--")):
                ys = [_est(figs.get(f"{m}_{base}_a{a}"), key) for a in (0, 1)]
                if None not in ys:
                    ax.plot([0, 1], ys, style, marker="o", color=c, label=f"{m} {base.upper()}")
        for name, label, color, style in (("ft_fp", "FP fine-tuned", "tab:red", "--"),
                                          ("retrain_masked_fp", "retrain masked (FP)", "tab:green", ":"),
                                          ("retrain_masked_int4", "retrain masked + INT4", "tab:green", "-.")):
            y = _est(figs.get(name), key)
            if y is not None:
                ax.axhline(y, color=color, linestyle=style, linewidth=1.1, label=label)
        ax.set_xticks([0, 1])
        ax.set_xlabel("alpha (memory stream coefficient)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("The kill switch: leakage at alpha = 0 and alpha = 1")
    return _save(fig, path)


def eta_figure(stages: dict[str, Any], path: Path) -> Path | None:
    """(c) OGD's entanglement eta during training (held-out and own subspace) with the random baseline."""
    ogd = stages.get("ogd") if isinstance(stages.get("ogd"), dict) else None
    log = (ogd or {}).get("eta") or []
    if not log:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = [r["step"] for r in log]
    for key, label, color in (("eta_heldout", "held-out public subspace", "tab:blue"),
                              ("eta_own", "own (training) subspace", "tab:orange")):
        ys = [r.get(key) for r in log]
        if any(y is not None for y in ys):
            ax.plot(steps, ys, "o-", color=color, label=label)
    if ogd.get("eta_random_baseline") is not None:
        ax.axhline(ogd["eta_random_baseline"], color="gray", linestyle="--", label="random baseline sqrt(k/d)")
    ax.axhline(0.05, color="tab:red", linestyle=":", label="seed 000 claim (OGD < 0.05)")
    ax.set_xlabel("training step")
    ax.set_ylabel("eta (share of the update in the public subspace)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def label_noise_figure(summary: dict[str, Any], path: Path) -> Path | None:
    """(d) At alpha = 0, extraction (left) and mean exposure (right) of the unlabelled vs the labelled members,
    per method and noise fraction, 95% intervals; black ticks: the same members under the quantized retrain."""
    rows = {n: r for n, r in (summary.get("label_noise") or {}).items() if r.get("alpha") == 0.0}
    if not rows:
        return None
    names = sorted(rows, key=lambda n: (rows[n]["method"], rows[n]["noise"]))
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 2.6 * len(names)), 4.4))
    width = 0.38
    for ax, metric, ylabel in ((axes[0], "extraction", "extraction rate at alpha = 0 (INT4)"),
                               (axes[1], "exposure", "mean exposure at alpha = 0 (bits)")):
        for j, (part, color) in enumerate((("unlabelled", "tab:red"), ("labelled", "tab:blue"))):
            xs = [i + (j - 0.5) * width for i in range(len(names))]
            ys, lo, hi, refs = [], [], [], []
            for n in names:
                f = rows[n][part].get(metric)
                scale = 1.0 / f["n"] if metric == "extraction" and f and f["n"] else 1.0
                est = (f["k"] * scale if metric == "extraction" else f["estimate"]) if f else 0.0
                ys.append(est)
                lo.append(est - f["low"] if f and "low" in f else 0.0)
                hi.append(f["high"] - est if f and "high" in f else 0.0)
                r = (rows[n].get(f"{part}_reference") or {}).get(metric)
                refs.append(None if not r else (r["k"] / r["n"] if metric == "extraction" else r["estimate"]))
            ax.bar(xs, ys, width=width, color=color, yerr=[lo, hi], capsize=3, label=f"{part} members")
            for x, r in zip(xs, refs, strict=True):
                if r is not None:
                    ax.hlines(r, x - width / 2, x + width / 2, color="black", linewidth=2)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([f"{rows[n]['method']}\n{rows[n]['noise']:.0%} unlabelled" for n in names], fontsize=8)
        ax.set_ylabel(ylabel)
        if metric == "extraction":
            ax.set_ylim(0, 1.03)
        ax.grid(alpha=0.3, axis="y")
    axes[0].plot([], [], color="black", linewidth=2, label="same members, quantized retrain")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def deletion_split(evals: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Extraction counts and mean exposure of the deleted and the kept members, before and after deletion."""
    e = evals.get("memsink_delete_int4_a1")
    if e is None:
        return None
    deleted = set(e.get("deleted", []))
    out = {}
    for tag, name in (("before", "memsink_int4_a1"), ("after", "memsink_delete_int4_a1")):
        per = evals.get(name, {}).get("metrics", {}).get("per_canary")
        if not per:
            continue
        for part, keep in (("deleted", True), ("kept", False)):
            rows = [p for i, p in enumerate(per) if (i in deleted) == keep]
            expo = [p["exposure"] for p in rows if p.get("exposure") is not None]
            out[f"{tag}_{part}"] = {"k": sum(bool(p["extracted"]) for p in rows), "n": len(rows),
                                    "exposure": sum(expo) / len(expo) if expo else None}
    return out


def deletion_figure(evals: dict[str, Any], path: Path) -> Path | None:
    """(e) memsink deletion: extraction and exposure of the deleted vs the kept members, before and after."""
    split = deletion_split(evals)
    if not split:
        return None
    keys = [k for k in ("before_deleted", "after_deleted", "before_kept", "after_kept") if k in split]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = ["tab:red" if "deleted" in k else "tab:blue" for k in keys]
    axes[0].bar(range(len(keys)), [split[k]["k"] / split[k]["n"] if split[k]["n"] else 0 for k in keys],
                color=colors)
    axes[0].set_ylabel("extraction rate (INT4, alpha = 1)")
    axes[1].bar(range(len(keys)), [split[k]["exposure"] or 0.0 for k in keys], color=colors)
    axes[1].set_ylabel("mean exposure (bits)")
    for ax in axes:
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([k.replace("_", "\n") for k in keys], fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("memsink: per-record deletion of sink neurons")
    return _save(fig, path)
