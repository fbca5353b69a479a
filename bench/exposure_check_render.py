"""Render an exposure-check ``result.json`` into ``report.md`` and ``estimate_vs_exact.png``.

Every number in the report and the figure is read from the result dict; nothing is recomputed
except per-canary percentiles over seeds for display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FIGURE = "estimate_vs_exact.png"
KIND_COLORS = {"id": "tab:blue", "phone": "tab:orange", "email": "tab:green", "password": "tab:red",
               "card": "tab:purple", "digits": "tab:brown"}


def _f(x: float | None, fmt: str = "+.2f") -> str:
    return "-" if x is None else format(x, fmt)


def _ci(ci: list[float]) -> str:
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def summary_row(name: str, group: str, s: dict[str, Any] | None, bits: float) -> str:
    """One Markdown table row of an error summary (or a dash row when the group is empty)."""
    if s is None:
        return f"| {name} | {group} | 0 | 0 | - | - | - | - | - | - | - |"
    lo, hi = s["band"]
    return (f"| {name} | {group} | {s['canaries']} | {s['pairs']} | {s['bias']:+.2f} | {s['median']:+.2f} | "
            f"[{lo:+.2f}, {hi:+.2f}] | {_ci(s['band_ci']['lo'])} | {_ci(s['band_ci']['hi'])} | "
            f"{s['share_within']:.0%} | {'yes' if s['within'] else 'no'} |")


HEADER = ["| estimator | canaries (group) | canaries | pairs | bias | median | 90% band | CI of low edge | "
          "CI of high edge | share within ±{b:g} | band within ±{b:g} |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]


def _header(bits: float) -> list[str]:
    return [HEADER[0].format(b=bits), HEADER[1]]


def _setup(r: dict[str, Any]) -> list[str]:
    cfg, ft, env = r["config"], r["stages"]["finetune"], r["environment"]
    sizes = sorted({(c["kind"], c["space_size"]) for c in r["canaries"]})
    spaces = ", ".join(f"{k} {n:,}" for k, n in sizes)
    n_m = sum(c["member"] for c in r["canaries"])
    rev = env.get("source") or {}

    def cost(key: str) -> float:
        return sum(c.get(key, 0.0) for c in r["canaries"]) / 60

    return [
        f"- Model: `{cfg['model']}`, fine-tuned ({'reused from cache' if ft['reused'] else 'trained'}) for "
        f"{ft['steps']} steps ({ft['wall_s'] / 60:.1f} min, loss {ft['first_loss']:.3f} -> {ft['final_loss']:.3f}) on "
        f"{cfg['public_blocks']} blocks of {cfg['block_len']} tokens of `{cfg['domain']}` plus every member record "
        f"repeated {', '.join(map(str, cfg['repeats']))} times (lr {cfg['finetune']['lr']:g}, "
        f"{cfg['finetune']['epochs']:g} epochs, batch {cfg['finetune']['batch_size']}).",
        f"- Canaries: {n_m} members and {len(r['canaries']) - n_m} non-members (never trained on), "
        f"{cfg['n_per_kind']} + {cfg['n_per_kind']} per kind, each the project's generator's record with only the "
        f"secret's last characters free. Secret spaces |R|: {spaces}.",
        f"- Estimates: `skewnorm_n` is the production estimator (a skew-normal fitted to n uniformly sampled "
        f"candidates, read at the secret) without the cap at this small space's log2|R| (capped at "
        f"{cfg['tail_cap_bits']:g} bits, above every production space), for n in "
        f"{[cfg['n_samples'], *cfg['extra_sample_sizes']]} and {cfg['n_seeds']} independent sample seeds per canary; "
        f"`as_called_{cfg['n_samples']}` is the very call the harness makes, capped at log2|R|; `empirical_n` is "
        f"the secret's rank among the n samples (it cannot read past log2(n + 1) bits).",
        f"- Censored canaries (the secret ranks first: exact exposure is only a lower bound) are left out of the "
        f"bands. Bands are the {cfg['coverage']:.0%} central interval of the pooled errors (estimate - exact, bits); "
        f"their edges' 95% CIs come from {cfg['n_boot']} bootstrap resamples of canaries.",
        f"- Compute, summed over the stages however often they were resumed: fine-tune {ft['wall_s'] / 60:.1f} min, "
        f"exact enumeration {cost('enumerate_s'):.1f} min, the direct `estimated_exposure` calls "
        f"{cost('direct_s'):.1f} min, the estimates' fits {cost('estimate_s'):.1f} min. This rendering's run: "
        f"{r['wall_s'] / 60:.1f} min, {r['stages']['canaries']['reused']} of {r['stages']['canaries']['total']} "
        f"canaries from cache.",
        f"- Environment: libortho {env['libortho']} (commit {rev.get('commit', '?')[:10]}"
        f"{', uncommitted changes under src/' if rev.get('src_dirty') else ''}), torch {env['torch']}, transformers "
        f"{env['transformers']}, {env['threads']} thread(s), {env['date']}.",
    ]


def _checks(r: dict[str, Any]) -> list[str]:
    d, lu = r["checks"]["lookup_vs_direct"], r["checks"]["luhn_vs_library"]
    out = [f"- Estimates read from the enumerated scores vs `estimated_exposure` run on the model (same seeds, "
           f"{d['pairs']} pairs): max |difference| {_f(d['max_abs_exposure_diff'], '.2e')} bits of exposure, "
           f"{_f(d['max_abs_secret_logprob_diff'], '.2e')} nats of the secret's log-probability."]
    if lu and lu.get("used"):
        out.append(f"- Char-wise Luhn enumeration vs the library's one-by-one scoring on a {lu['candidates']:,}-"
                   f"candidate card space: max |log-prob difference| {lu['max_abs_logprob_diff']:.2e}, secret rank "
                   f"{lu['rank_charwise']:g} vs {lu['rank_library']:g} ({lu['charwise_s']:.0f} s vs "
                   f"{lu['library_s']:.0f} s).")
    return out


def _tables(r: dict[str, Any]) -> list[str]:
    cfg, err = r["config"], r["errors"]
    bits, n0 = cfg["band_bits"], cfg["n_samples"]
    sizes = [n0, *cfg["extra_sample_sizes"]]
    out = ["## Every estimator (uncensored canaries unless said)", "", *_header(bits)]
    out += [summary_row(f"skewnorm_{n}", "all", err[f"skewnorm_{n}"]["all"], bits) for n in sizes]
    out.append(summary_row(f"as_called_{n0}", "all, censored included", err[f"as_called_{n0}"]["all"], bits))
    out += [summary_row(f"empirical_{n}", f"exact <= log2({n}+1)", err[f"empirical_{n}"]["in_range"], bits)
            for n in sizes]
    out += [summary_row(f"empirical_{n}", "all", err[f"empirical_{n}"]["all"], bits) for n in sizes]
    bins = [g for g in err[f"skewnorm_{n0}"] if g.startswith("bin:")]
    out += ["", "## Skew-normal bands by exact exposure, every sample size", "",
            "| sample size | " + " | ".join(f"exact {g[4:]} bits" for g in bins) + " |", "|---" * (len(bins) + 1) + "|"]
    for n in sizes:
        cells = [("-" if s is None else f"[{s['band'][0]:+.2f}, {s['band'][1]:+.2f}] ({s['canaries']})")
                 for s in (err[f"skewnorm_{n}"][g] for g in bins)]
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    out += ["", "(band of estimate - exact in bits; number of canaries in brackets)"]
    prim = err[f"skewnorm_{n0}"]
    out += ["", f"## The production estimator (`skewnorm_{n0}`) by group", "", *_header(bits)]
    out += [summary_row(f"skewnorm_{n0}", g.replace("kind:", "kind ").replace("bin:", "exact "), s, bits)
            for g, s in prim.items()]
    c = r["censored"][f"skewnorm_{n0}"]
    if c["canaries"]:
        out += ["", f"Censored canaries: {c['canaries']} ({', '.join(c['kinds'])}); in "
                f"{c['share_below_bound']:.0%} of their {c['pairs']} estimates the production estimator reads more "
                f"than {bits:g} bit below the exact lower bound (median estimate - bound "
                f"{c['median_estimate_minus_bound']:+.2f} bits)."]
    return out


def _per_canary(r: dict[str, Any]) -> list[str]:
    n0 = r["config"]["n_samples"]
    out = ["## Every canary", "", f"| kind | record | log2 R | rank | exact | skewnorm_{n0} median [p5, p95] over "
           f"seeds | empirical_{n0} median |", "|---|---|---|---|---|---|---|"]
    for c in sorted(r["canaries"], key=lambda c: (c["kind"], not c["member"], c["repeats"])):
        e = np.asarray(c["estimates"][f"skewnorm_{n0}"])
        who = f"member x{c['repeats']}" if c["member"] else "non-member"
        rank = f"{c['rank']:g}{' (censored)' if c['censored'] else ''}"
        est = f"{np.median(e):.2f} [{np.percentile(e, 5):.2f}, {np.percentile(e, 95):.2f}]"
        out.append(f"| {c['kind']} | {who} | {c['size_log2']:.2f} | {rank} | {c['exact']:.2f} | {est} | "
                   f"{np.median(c['estimates'][f'empirical_{n0}']):.2f} |")
    return out


def figure(r: dict[str, Any], path: Path) -> Path:
    """Left: the production estimate (median and 5-95% over seeds) vs exact exposure per canary, with the
    ±band; right: the error's band per exact-exposure bin for every skew-normal sample size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from libortho.atomic import atomic_write_file

    cfg = r["config"]
    n0, bits = cfg["n_samples"], cfg["band_bits"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.2))
    top = max(c["size_log2"] for c in r["canaries"])
    ax.fill_between([0, top + 1], [-bits, top + 1 - bits], [bits, top + 1 + bits], color="tab:green", alpha=0.15,
                    label=f"exact ±{bits:g} bit")
    ax.plot([0, top + 1], [0, top + 1], color="tab:green", linewidth=1)
    for c in r["canaries"]:
        e = np.asarray(c["estimates"][f"skewnorm_{n0}"])
        med, lo, hi = np.median(e), np.percentile(e, 5), np.percentile(e, 95)
        color = KIND_COLORS.get(c["kind"], "black")
        marker = ">" if c["censored"] else "o"
        ax.errorbar(c["exact"], med, yerr=[[med - lo], [hi - med]], fmt=marker, color=color, markersize=6,
                    markerfacecolor=color if c["member"] else "white", elinewidth=1, capsize=2, alpha=0.85)
    for kind, color in KIND_COLORS.items():
        ax.plot([], [], "o", color=color, label=kind)
    ax.plot([], [], "o", color="gray", markerfacecolor="white", label="non-member (hollow)")
    ax.plot([], [], ">", color="gray", label="censored: ranks first")
    ax.set_xlabel("exact exposure (bits, enumeration)")
    ax.set_ylabel(f"estimate, {n0} samples + skew-normal (bits)")
    ax.set_title(f"median and 5-95% over {cfg['n_seeds']} sample seeds per canary")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    sizes = [n0, *cfg["extra_sample_sizes"]]
    labels = [g for g, s in r["errors"][f"skewnorm_{n0}"].items()
              if s is not None and (g.startswith("bin:") or g == "all")]
    width = 0.8 / len(sizes)
    for j, n in enumerate(sizes):
        groups = r["errors"][f"skewnorm_{n}"]
        for i, g in enumerate(labels):
            s = groups[g]
            if s is None:
                continue
            x = i + (j - (len(sizes) - 1) / 2) * width
            bx.plot([x, x], s["band"], color=f"C{j}", linewidth=6, solid_capstyle="butt",
                    label=f"{n} samples" if i == 0 else None)
            bx.plot(x, s["median"], "_", color="black", markersize=10)
    bx.axhspan(-bits, bits, color="tab:green", alpha=0.15)
    bx.axhline(0, color="tab:green", linewidth=1)
    bx.set_yscale("symlog", linthresh=2.0)
    ticks = [-40, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 40]
    bx.set_yticks(ticks, [f"{t:+d}" if t else "0" for t in ticks])
    bx.set_xticks(range(len(labels)), [g.replace("bin:", "exact ") for g in labels])
    bx.set_ylabel(f"{cfg['coverage']:.0%} band of estimate - exact (bits, symlog); tick: median")
    bx.set_title("error band by exact exposure (uncensored canaries)")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3, axis="y")
    con = r["conclusion"]
    fig.suptitle(f"{n0}-sample skew-normal exposure estimate vs exact enumeration ({r['config']['model']}): "
                 f"{'within' if con['within_band'] else 'not within'} ±{bits:g} bit -> "
                 f"{con['primary_metric_recommendation']}", y=1.02)
    try:
        return atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"), suffix=".png")
    finally:
        plt.close(fig)


def _limits(r: dict[str, Any]) -> list[str]:
    live = [c for c in r["canaries"] if not c["censored"]]
    top = max((c["exact"] for c in live), default=0.0)
    high = [c for c in live if c["exact"] >= r["config"]["bin_edges"][-2]] if len(r["config"]["bin_edges"]) > 1 else []
    return ["## Limits", "",
            f"- The largest exposure checked against an exact value is {top:.2f} bits (the spaces hold at most "
            f"{max(c['size_log2'] for c in r['canaries']):.1f} bits); the harness reads estimates of 10-60 bits, "
            f"beyond anything enumeration can confirm. {len(high)} uncensored canaries lie at or above "
            f"{r['config']['bin_edges'][-2]:g} bits, so the highest bins rest on few canaries (their bootstrap CIs "
            f"say how few).",
            "- One fine-tuned model, one seed of canaries; sample seeds vary only which candidates are drawn."]


def report_markdown(r: dict[str, Any]) -> str:
    """The whole report, from the result dict."""
    con = r["conclusion"]
    lines = [f"# Is the {r['config']['n_samples']}-sample exposure estimate trustworthy? (exact enumeration on a "
             "fine-tuned model)", "",
             f"**{con['statement']}** Recommendation (computed from the ±{con['band_bits']:g}-bit threshold): "
             f"`primary_metric_recommendation = {con['primary_metric_recommendation']}`.", ""]
    verdicts = ", ".join(f"{g.replace('bin:', 'exact ')} {'pass' if ok else 'FAIL'}"
                         for g, ok in con["verdicts"].items())
    lines += [f"Judged on (each band within ±{con['band_bits']:g} bit; exposure bins with at least "
              f"{con['min_canaries']} canaries; canaries that rank first: at most {(1 - con['coverage']) / 2:.0%} of "
              f"estimates more than {con['band_bits']:g} bit below their bound): {verdicts}.", ""]
    if con["skewnorm_sample_sizes_within_band"]:
        lines += [f"Skew-normal sample sizes whose band is within the threshold: "
                  f"{con['skewnorm_sample_sizes_within_band']}.", ""]
    else:
        lines += ["No skew-normal sample size tried has its band within the threshold.", ""]
    emp = con.get("empirical_sample_sizes_within_band_in_range") or []
    lines += [f"Empirical-rank sample sizes whose band is within the threshold where they can read (exact exposure "
              f"<= log2(n + 1); above it they return that lower bound): {emp or 'none'}.", ""]
    lines += ["## Set-up", "", *_setup(r), "", "## Checks of the measurement itself", "", *_checks(r), "",
              *_tables(r), "", f"![estimate vs exact]({FIGURE})", "", *_limits(r), "", *_per_canary(r), ""]
    return "\n".join(lines)


def render(result: dict[str, Any], out: str | Path) -> list[Path]:
    """Write ``report.md`` and the figure under ``out``; returns their paths."""
    from libortho.atomic import atomic_write_text

    out = Path(out)
    fig = figure(result, out / FIGURE)
    md = atomic_write_text(out / "report.md", report_markdown(result))
    return [md, fig]
