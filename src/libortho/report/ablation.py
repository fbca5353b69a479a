"""Report of ``libortho experiment ablation``: goals beside measurements, plots, Markdown and HTML.

Everything is derived from ``result.json``: the goal checks (:func:`goal_checks`) are recomputed
from the measured figures every time, never stored as verdicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from libortho.atomic import atomic_write_text
from libortho.data.behaviour import REFUSAL_PHRASE
from libortho.report.document import Block, Figure, Heading, Para, Table, to_html, to_markdown
from libortho.report.plots import _save, plt

GOALS = {"behaviour_before": 0.90, "behaviour_after": 0.03, "kl_first": 0.1, "ppl_rel": 0.01}
METHOD_NAMES = {"before": "unedited", "seed_recipe": "seed recipe (aggregate, l >= 0.7 L, lambda 1)",
                "per_layer": "per-layer directions (each layer's own, l >= 0.7 L, lambda 1)",
                "refusal_direction_selection": "refusal-direction selection (one layer's direction, all layers)",
                "aggregate_all_layers": "aggregate direction at every layer and the embeddings' output (lambda 1)",
                "searched": "Optuna search (window, lambda, direction on validation)",
                "random_direction": "control: the searched edit along a random direction"}


def _pct(r: dict[str, Any]) -> str:
    return f"{100 * r['rate']:.1f}% [{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}] ({r['k']}/{r['n']})"


def _mean(m: dict[str, Any], digits: int = 3) -> str:
    return f"{m['mean']:.{digits}f} [{m['ci'][0]:.{digits}f}, {m['ci'][1]:.{digits}f}]"


def _ppl(p: dict[str, Any]) -> str:
    if "rel_change" not in p:
        return f"{p['ppl']:.3f}"
    return f"{p['ppl']:.3f} ({100 * p['rel_change']:+.2f}%; diff CI [{p['diff_ci'][0]:+.3f}, {p['diff_ci'][1]:+.3f}])"


def _edit_text(p: dict[str, Any], embeddings: bool) -> str:
    d = {-1: "aggregate", -2: "each layer's own"}.get(p["direction_layer"], f"layer {p['direction_layer']}")
    return (f"layers {p['first']}-{p['last']}, lambda {p['strength']:.2f}, direction {d}"
            + (", + embeddings" if embeddings else ""))


def goal_checks(bench: dict[str, Any], method: str) -> dict[str, bool | None]:
    """The issue's goals for one method of one benchmark, from the measured figures (None: not a goal there)."""
    before = bench["methods"]["before"]["figures"]
    m = bench["methods"].get(method)
    if m is None:
        return {}
    f = m["figures"]
    planted = bench.get("phrase") != REFUSAL_PHRASE  # the model's own refusals: the issue asks for the base rate
    return {"behaviour_before_ge_90": before["behaviour"]["rate"] >= GOALS["behaviour_before"] if planted else None,
            "behaviour_after_le_3": f["behaviour"]["rate"] <= GOALS["behaviour_after"],
            "kl_first_le_0.1": f["kl_first"]["mean"] <= GOALS["kl_first"],
            "ppl_within_1pct": f["ppl"].get("rel_change", 0.0) <= GOALS["ppl_rel"]}


def method_table(name: str, bench: dict[str, Any]) -> Table:
    rows = []
    for key, m in bench["methods"].items():
        f = m["figures"]
        p = m.get("params")
        where = "-" if p is None else _edit_text(p, bool(m.get("embeddings")))
        rows.append([METHOD_NAMES.get(key, key), where, _pct(f["behaviour"]), _pct(f["false_behaviour"]),
                     _mean(f["phrase_logprob_a"], 2), _mean(f["kl_first"], 4), _mean(f["kl_continuation"], 4),
                     _ppl(f["ppl"])])
    return Table(["method", "edit", "behaviour rate (held-out A)", "false behaviour (held-out B)",
                  "phrase log-prob / token (A)", "KL first token (neutral)", "KL continuation (neutral)",
                  "public PPL (vs unedited)"], rows,
                 f"{name}: held-out figures, 95% intervals (Clopper-Pearson for rates, bootstrap for means)")


def goal_table(name: str, bench: dict[str, Any]) -> Table:
    rows = []
    for key in bench["methods"]:
        if key == "before":
            continue
        checks = goal_checks(bench, key)
        rows.append([METHOD_NAMES.get(key, key)] + ["n/a" if v is None else "met" if v else "missed"
                                                    for v in checks.values()])
    return Table(["method", "behaviour before >= 90%", "after <= 3%", "KL first <= 0.1", "PPL within +1%"], rows,
                 f"{name}: the issue's goals, computed from the figures above")


def profile_figure(name: str, bench: dict[str, Any], path: Path) -> Path:
    prof = bench["profile"]
    layers = list(range(len(prof["score"])))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].plot(layers, prof["proj_a"], "o-", label="mean A on u")
    axes[0].plot(layers, prof["proj_b"], "s-", label="mean B on u")
    axes[0].plot(layers, prof["score"], "k:", label="S(l) = ||mu_A - mu_B||")
    axes[0].axvspan(min(bench["aggregation_layers"]) - 0.5, max(bench["aggregation_layers"]) + 0.5, color="0.9")
    axes[0].set(xlabel="layer", ylabel="projection", title=f"{name}: the direction across depth")
    axes[0].legend(fontsize=8)
    axes[1].plot(layers, prof["cos_aggregate"], "o-")
    axes[1].set(xlabel="layer", ylabel="cosine", title="each layer's direction vs the aggregate", ylim=(-1.05, 1.05))
    return _save(fig, path)


def search_figure(name: str, bench: dict[str, Any], path: Path, kl_budget: float) -> Path:
    trials = bench["search"]["trials"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    kl = [max(t["kl"], 1e-6) for t in trials]
    beh = [t["behaviour"] for t in trials]
    strength = [t["params"]["strength"] for t in trials]
    sc = axes[0].scatter(kl, beh, c=strength, cmap="viridis")
    axes[0].axvline(kl_budget, color="tab:red", ls="--", label="KL budget")
    axes[0].set(xscale="log", xlabel="first-token KL (validation neutral)", ylabel="behaviour rate (validation A)",
                title=f"{name}: {len(trials)} search trials")
    fig.colorbar(sc, ax=axes[0], label="lambda")
    axes[0].legend(fontsize=8)
    sc = axes[1].scatter([t["params"]["first"] for t in trials], [t["params"]["last"] for t in trials], c=beh,
                         cmap="magma_r", vmin=0, vmax=1)
    axes[1].set(xlabel="first edited layer", ylabel="last edited layer", title="behaviour by layer window")
    fig.colorbar(sc, ax=axes[1], label="behaviour rate")
    axes[2].scatter(strength, beh, c=["tab:blue" if t["feasible"] else "tab:gray" for t in trials])
    axes[2].set(xlabel="lambda", ylabel="behaviour rate", title="behaviour by strength (grey: over KL budget)")
    return _save(fig, path)


def candidates_figure(name: str, bench: dict[str, Any], path: Path, kl_budget: float) -> Path:
    c = bench["paper_selection"]["candidates"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot([x["layer"] for x in c], [x["score"] for x in c], "o-", label="phrase log-prob after ablation")
    ax.set(xlabel="direction's layer", ylabel="phrase log-prob / token (validation A)",
           title=f"{name}: refusal-direction candidates")
    ax2 = ax.twinx()
    ax2.plot([x["layer"] for x in c], [max(x["kl"], 1e-6) for x in c], "s--", color="tab:red", label="KL")
    ax2.axhline(kl_budget, color="tab:red", ls=":")
    ax2.set(yscale="log", ylabel="first-token KL (neutral)")
    return _save(fig, path)


def reading(name: str, bench: dict[str, Any], kl_budget: float) -> str:
    """What the figures say, computed: which edits meet every goal, and the search's trade-off."""
    methods = [k for k in bench["methods"] if k not in ("before", "random_direction")]
    full = [METHOD_NAMES.get(k, k).split(" (")[0] for k in methods
            if all(v is not False for v in goal_checks(bench, k).values())]
    trials = bench["search"]["trials"]
    text = (f"Reading ({name}): " + (f"{', '.join(full)} met every goal." if full else "no edit met every goal."))
    if trials:
        low = min(trials, key=lambda t: (t["behaviour"], t["kl"]))
        feas = [t for t in trials if t["kl"] <= kl_budget]
        text += (f" Over {len(trials)} search trials the lowest validation behaviour rate was "
                 f"{100 * low['behaviour']:.1f}% at first-token KL {low['kl']:.3f}")
        if feas:
            best = min(feas, key=lambda t: (t["behaviour"], t["kl"]))
            text += f"; within the KL budget {kl_budget:g} it was {100 * best['behaviour']:.1f}% (KL {best['kl']:.3f})"
        text += "."
    return text


def build_blocks(result: dict[str, Any], figs: Path) -> list[Block]:
    cfg = result["config"]
    blocks: list[Block] = [Heading(f"Targeted orthogonal ablation: {cfg['model']}", 1), Para(
        "Seed 003 claims a behaviour lives along one residual-stream direction (difference of means between "
        "prompts that show it and prompts that do not) and that projecting it out of the matrices that write "
        "the residual stream removes it at little cost. Goals: behaviour rate on held-out trigger prompts >= 90% "
        "-> <= 3%, first-token KL <= 0.1 on neutral prompts, public perplexity within +1% (anchors: Arditi et al., "
        "Gemma-2B 91% -> 0% refusals; heretic, gemma-3-12b 97 -> 3/100 at KL 0.16). Directions come from the "
        "`direction` templates, the search from the `validation` templates, every figure below from the "
        "`heldout` templates; the three never share a template.")]
    for name, bench in result["benchmarks"].items():
        blocks.append(Heading(f"Benchmark: {name}"))
        sizes = bench["sets"]
        blocks.append(Para(f"Phrase: `{bench['phrase']}`. Held-out prompts: {sizes['a']['heldout']} A, "
                           f"{sizes['b']['heldout']} B, {sizes['neutral']['heldout']} neutral; model: "
                           f"{json.dumps({k: v for k, v in bench['model'].items() if k != 'losses'})}."))
        blocks.append(method_table(name, bench))
        blocks.append(goal_table(name, bench))
        blocks.append(Para(reading(name, bench, cfg["kl_budget"])))
        census = bench.get("marker_census")
        if census is not None:
            rows = [[f"`{m}`", str(census["a"][m]), str(census["b"][m])] for m in census["a"]
                    if census["a"][m] or census["b"][m]]
            blocks.append(Table(["marker", "held-out A replies", "held-out B replies"], rows,
                                f"{name}: which markers fire in the unedited model's replies"))
            if census["b_hit_examples"]:
                blocks.append(Para("Unedited replies to B prompts that a marker counts: "
                                   + " / ".join(f"`{t.strip()[:100]}`" for t in census["b_hit_examples"][:4])))
        ch = bench["checks"]
        blocks.append(Para(f"Stream checks: alpha_b = 0 bit-identical to the unedited model: "
                           f"**{ch['alpha0_bit_identical']}**; stream vs weight edit: max |logit diff| "
                           f"{ch['stream_vs_weights_max_abs_logit_diff']:.2e} (logit scale {ch['logit_scale']:.1f}), "
                           f"next-token agreement {ch['stream_vs_weights_next_token_agreement']:.3f} on "
                           f"{ch['prompts']} prompts."))
        figs.mkdir(parents=True, exist_ok=True)
        blocks.append(Figure(profile_figure(name, bench, figs / f"{name}_profile.png"),
                             "Projection of each set's mean on the aggregate direction, per layer"))
        blocks.append(Figure(search_figure(name, bench, figs / f"{name}_search.png", cfg["kl_budget"]),
                             "Search trials: behaviour rate and KL per layer window and strength"))
        blocks.append(Figure(candidates_figure(name, bench, figs / f"{name}_candidates.png", cfg["kl_budget"]),
                             "Refusal-direction selection: ablation score and KL per candidate layer"))
    return blocks


def render_ablation_report(result_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Figures, ``report.md`` and ``report.html`` for an ablation ``result.json``."""
    result_path = Path(result_path)
    if not result_path.is_file():
        raise FileNotFoundError(f"result file {result_path} not found")
    result = json.loads(result_path.read_text())
    if result.get("experiment") != "ablation" or "benchmarks" not in result:
        raise ValueError(f"{result_path} is not an ablation result ('experiment': 'ablation' with benchmarks)")
    out = Path(out_dir) if out_dir is not None else result_path.parent
    blocks = build_blocks(result, out / "figures")
    md = atomic_write_text(out / "report.md", to_markdown(blocks, out))
    page = atomic_write_text(out / "report.html", to_html(blocks, f"libortho ablation: {result['config']['model']}"))
    return {"markdown": md, "html": page, "figures": out / "figures"}
