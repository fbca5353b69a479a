"""The seeds' table 1 report: rendered from the geometry-table result JSON (and the separation benchmark's
recorded rows), never typed. Markdown + HTML + PNG figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from libortho.atomic import atomic_write_text
from libortho.eval.stats import bootstrap_mean
from libortho.experiments.geometry_table import half_stats
from libortho.experiments.summary import skill_retained
from libortho.report.document import Block, Code, Figure, Heading, Para, Table, to_html, to_markdown
from libortho.report.geometry_figures import (
    eta_figure,
    hessian_figure,
    lmc_figure,
    rank_figure,
    row_skill,
    spectra_figure,
)

# what the seeds claim for their table 1 (seeds 000/001 §5), quoted beside our figures
SEED_CLAIMS = [
    ("task-vector split keeps the skill in a low-rank part", "rank-k tau_low keeps the task, tau_high holds the "
     "memory: b = 0 forgets the records at little skill cost"),
    ("plain fine-tuning is entangled with the general subspace", "eta ~ 0.3"),
    ("training-time separation (OGD) is not", "eta < 0.05"),
    ("the switched-off model sits in the retrained model's basin", "LMC barrier ~ 0 between alpha = 0 and retrain"),
]


def _f(x: Any, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def best_auc(metrics: dict[str, Any]) -> float:
    """The strongest membership attack's AUC (over every attack the harness ran)."""
    return max(v["auc"] for v in metrics["mia"].values() if isinstance(v, dict) and "auc" in v)


def _extracted(metrics: dict[str, Any]) -> str:
    per = metrics["per_canary"]
    return f"{sum(p['extracted'] for p in per)}/{len(per)}"


def paired_half(rows: dict[str, Any], name: str, idx: list[int], n_boot: int) -> dict[str, Any]:
    """Half ``idx``: mean exposure of row ``name`` minus the retrained model's, paired by canary, with a CI."""
    a = rows[name]["metrics"]["per_canary"]
    r = rows["retrain"]["metrics"]["per_canary"]
    diff = [a[i]["exposure"] - r[i]["exposure"] for i in idx]
    ci = bootstrap_mean(diff, n_boot=n_boot)
    return {**half_stats(rows[name]["metrics"], idx), "minus_retrain": ci.estimate, "ci": [ci.low, ci.high]}


def split_table(result: dict[str, Any]) -> Table:
    """Every split rank: skill, and each half's extraction and exposure (B paired against retrain)."""
    rows, ch, cfg = result["rows"], result["choice"], result["config"]
    ha, hb = ch["halves"]["a"], ch["halves"]["b"]
    margin = cfg["exposure_margin_bits"]
    body = []
    names = [n for n in rows if rows[n]["group"] == "taskvec"] + [n for n in rows if rows[n]["group"] == "kfac"]
    for n in names:
        r = rows[n]
        A = half_stats(r["metrics"], ha)
        B = paired_half(rows, n, hb, cfg["n_boot"])
        ok_a = A["exposure"] <= ch["retrain_half_a"]["exposure"] + margin
        sk = row_skill(rows, n)
        mark = " **(chosen on A)**" if n == ch.get("chosen") else ""
        body.append([r["label"] + mark, _f(sk), f"{A['extracted']}/{A['n']}", f"{A['exposure']:.2f}",
                     "yes" if ok_a else "no", f"{B['extracted']}/{B['n']}", f"{B['exposure']:.2f}",
                     f"{B['minus_retrain']:+.2f} [{B['ci'][0]:+.2f}, {B['ci'][1]:+.2f}]"])
    ra, rb = ch["retrain_half_a"], ch["retrain_half_b"]
    body.append(["Retrain w/o private (reference)", _f(row_skill(rows, "retrain")), f"{ra['extracted']}/{ra['n']}",
                 f"{ra['exposure']:.2f}", "—", f"{rb['extracted']}/{rb['n']}", f"{rb['exposure']:.2f}", "0"])
    return Table(["model (switch off)", "skill", "A extracted", "A exposure", f"A <= retrain + {margin:g}",
                  "B extracted", "B exposure", "B minus retrain [95% CI]"], body,
                 "Half A (chooses) and half B (reports) of the member canaries, balanced per kind and repeat count. "
                 "Skill = (PPL_pre - PPL) / (PPL_pre - PPL_ft) on the held-out domain; it is read on the same "
                 "blocks when choosing and when reporting (only the canaries are held out). INT4 rows: GPTQ base "
                 f"of the same weights. {exposure_note(result)}")


def exposure_note(result: dict[str, Any]) -> str:
    """How the exposures were measured: how many canaries by exact enumeration, how many estimated."""
    per = result["rows"]["ft"]["metrics"]["per_canary"]
    exact = sum(1 for p in per if p.get("exposure_method") == "exact")
    return (f"Exposure: {exact} of {len(per)} member canaries by exact enumeration of their secret space, the "
            f"other {len(per) - exact} by a skew-normal fit (error band wider than +-1 bit, "
            "docs/results/exposure_check); the paired differences against retrain compare like with like.")


def _eta_of_row(result: dict[str, Any], name: str) -> float | None:
    eta = result.get("eta", {}).get("updates", {})
    group = result["rows"][name]["group"]
    rank = result["eta"].get("rank") if "eta" in result else None
    if name == "ft":
        return eta.get("ft", {}).get("eta")
    if name == "retrain":
        return eta.get("retrain", {}).get("eta")
    if group == "taskvec" and result["rows"][name].get("rank") == rank and "restpre" not in name:
        return eta.get("tv_high", {}).get("eta")
    if group == "kfac":
        return eta.get(f"kfac_r{result['rows'][name]['rank']}", {}).get("eta")
    return None


def _barrier(result: dict[str, Any], pair: str, text: str = "public") -> float | None:
    p = result.get("lmc", {}).get("pairs", {}).get(pair)
    return None if p is None else p[text]["barrier"]


def table_one(result: dict[str, Any]) -> Table:
    """The seeds' table 1 on the kill-switch benchmark: every switch off beside the references."""
    rows, ch = result["rows"], result["choice"]
    k = ch["control_rank"]
    kf = max(result["config"]["kfac_ranks"]) if result["config"]["kfac_ranks"] else None
    order = [("ft", "ft~retrain"), ("v1_a0", "v1_a0~retrain"), ("v1_obs_a1", None), ("v1_diag_a1", None),
             ("v2_kfac_a1", None),
             (f"kfac_r{kf}", None), (f"kfac_r{kf}_int4", None), (f"tv_r{k}", "tv_a0~retrain"),
             (f"tv_r{k}_int4", None), (f"tv_r{k}_restpre", None), ("retrain", None), ("retrain_int4", None)]
    body = []
    for name, pair in order:
        if name not in rows:
            continue
        m = rows[name]["metrics"]
        cost = rows[name].get("cost", {}) or {}
        wall = cost.get("wall_s", rows[name].get("build_s"))
        hb = half_stats(m, ch["halves"]["b"])
        body.append([rows[name]["label"], _f(row_skill(rows, name)), f"{m['ppl_general']:.2f}", _extracted(m),
                     f"{m['exposure']['mean']:.2f}", f"{hb['extracted']}/{hb['n']}, {hb['exposure']:.2f}",
                     f"{best_auc(m):.3f}", _f(_eta_of_row(result, name)),
                     _f(None if pair is None else _barrier(result, pair), ".4f"), _f(wall, ".0f")])
    return Table(["row", "skill", "general PPL", "extracted (all)", "exposure (all, bits)",
                  "half B: extracted, exposure", "best MIA AUC (max over attacks)", "eta",
                  "LMC barrier to retrain (public, nats)", "wall s"], body,
                 f"Kill-switch benchmark, every row at switch-off unless it says alpha=1. {exposure_note(result)} "
                 "Half B is the half of the canaries that played no part in choosing the split's rank. The best "
                 "MIA AUC is the maximum over the harness's attacks, so it sits above 0.5 even for the retrained "
                 "model. eta: of the fine-tuning "
                 "update (ft, retrain) or of the part the switch removes (split: tau_high; K-FAC: its memory), on "
                 "the pre-trained model's held-out public input subspace. Wall: training (ft, retrain) or making "
                 "the row's model from the fine-tuned one (decomposition, split); 0 where the row switches off a model "
                 "built for another row (v1 alpha 0 is the obs decomposition at alpha 0).")


def separation_seed_dir(sep_dir: Path) -> Path | None:
    """The first seed folder (``seed<N>``, lowest N) of a separation run's results that holds recorded rows."""
    seeds = sorted((p for p in sep_dir.glob("seed*") if p.name[4:].isdigit() and (p / "evals").is_dir()),
                   key=lambda p: int(p.name[4:]))
    return seeds[0] if seeds else None


def separation_eta(sep_dir: Path) -> list[Block]:
    """eta of each training method's update on the held-out public subspace, every seed of the run, beside
    the random baseline: the seeds' OGD claim (plain fine-tuning ~0.3, OGD < 0.05)."""
    seeds = sorted((p for p in sep_dir.glob("seed*") if p.name[4:].isdigit() and (p / "stages" / "eta").is_dir()),
                   key=lambda p: int(p.name[4:]))
    methods = sorted({f.stem for sd in seeds for f in (sd / "stages" / "eta").glob("*.json")})
    if not seeds or not methods:
        return []
    body = []
    for m in methods:
        cells = []
        for sd in seeds:
            f = sd / "stages" / "eta" / f"{m}.json"
            info = json.loads(f.read_text())["info"] if f.is_file() else None
            cells.append("—" if info is None else f"{info['eta']:.3f} ({info['random_baseline']:.3f})")
        body.append([m, *cells])
    return [Table(["update", *[sd.name for sd in seeds]], body,
                  f"eta = ||P_gen(dW)|| / ||dW|| pooled over layers, on a held-out public input subspace, each seed "
                  f"of {sep_dir}; in brackets the random baseline sqrt(k/d) pooled alike. Seed claim: plain "
                  "fine-tuning ~0.3, OGD < 0.05.")]


def separation_panel(sep_dir: Path | None) -> list[Block]:
    """The best training-time method's rows on the separation benchmark (recorded), with its own references."""
    seed_dir = None if sep_dir is None else separation_seed_dir(sep_dir)
    if seed_dir is None:
        return [Para("The separation benchmark's recorded rows were not found: its panel is left out.")]
    ev = seed_dir / "evals"
    st = seed_dir / "stages" / "eta"

    def load(name: str) -> dict[str, Any] | None:
        p = ev / f"{name}.json"
        return json.loads(p.read_text())["entry"]["metrics"] if p.is_file() else None

    def eta(name: str) -> float | None:
        p = st / f"{name}.json"
        return json.loads(p.read_text())["info"]["eta"] if p.is_file() else None

    pre, ft = load("pre"), load("ft_fp")
    if pre is None or ft is None:
        return [Para("The separation benchmark's reference rows are missing: its panel is left out.")]
    spec = [("ft_fp", "FP fine-tuned", eta("ft")), ("ft_int4", "v1 alpha=0 (= GPTQ INT4 of ft)", None),
            ("two-phase_int4_a0", "two-phase INT4, alpha=0 (best training-time method)", eta("two-phase")),
            ("two-phase_int4_a1", "two-phase INT4, alpha=1", None),
            ("ogd_int4_a0", "OGD INT4, alpha=0", eta("ogd")),
            ("retrain_masked_fp", "Retrain, secrets masked", eta("retrain_masked")),
            ("retrain_masked_int4", "Retrain, secrets masked + INT4", None)]
    gain = pre["ppl_domain"] - ft["ppl_domain"]
    body = []
    for name, label, e in spec:
        m = load(name)
        if m is None:
            continue
        sk = skill_retained(pre["ppl_domain"], m["ppl_domain"], ft["ppl_domain"]) if gain > 1.0 else None
        body.append([label, _f(sk), f"{m['ppl_domain']:.2f}", f"{m['ppl_general']:.2f}", _extracted(m),
                     f"{m['exposure']['mean']:.2f}", f"{best_auc(m):.3f}", _f(e)])
    skill_note = ("" if gain > 1.0 else f" Its fine-tuning moves the domain perplexity by {-gain:+.2f} (it gains "
                  "nothing there to retain), so skill retained is not defined and left blank.")
    return [*separation_eta(sep_dir),
            Table(["row", "skill", "domain PPL", "general PPL", "extracted", "exposure (bits)", "best MIA AUC", "eta"],
                  body, f"Separation benchmark ({sep_dir.name}, {seed_dir.name}): recorded rows of {sep_dir}."
                  f"{skill_note} Two-phase needs private-token labels the kill-switch data do not carry, so it is "
                  "not in the table above.")]


def hessian_blocks(result: dict[str, Any], fig_dir: Path) -> list[Block]:
    """Seed 001's spectral-density check: where the split's memory (tau_high) and skill (tau_low) sit in the
    loss Hessian's spectrum, per model and text (tiny models only)."""
    h = result.get("hessian")
    if not h:
        return [Para("The Hessian stage did not run (a result of an earlier version): left out.")]
    if "skipped" in h:
        return [Para(f"Hessian spectral density: skipped here, {h['skipped']}.")]
    body = []
    for model, per in h["models"].items():
        for text, x in per.items():
            dirs = x["directions"]
            body.append([model, text, f"{x['lambda_max']:.3g}", f"{x['mean_eigenvalue']:.3g}"]
                        + [f"{dirs[d]['q']:.3g} ({dirs[d]['mass_above']:.3f})" for d in ("tau", "tau_low", "tau_high")])
    path = hessian_figure(h, fig_dir / "hessian_density.png")
    return [Table(["model", "text", "largest Ritz value", "tr(H)/n", "q(tau) (mass above)", "q(tau_low)",
                   "q(tau_high)"], body,
                  f"Loss Hessian in the decoder-linear weights; stochastic Lanczos quadrature, {h['probes']} "
                  f"Rademacher probes x {h['steps']} steps. q(v) = vᵀHv/vᵀv, the curvature along v; in brackets "
                  "the share of the estimated spectral mass above q (small = v points into the outliers). "
                  "tr(H)/n is what a random direction gives on average. Seed 001: the memory stream should hold "
                  "the outliers and the general stream only the bulk."),
            Figure(path, "Spectral density of the loss Hessian, public and private text; dotted/dashed: the "
                         "curvature along tau_low/tau_high at the fine-tuned model.")]



def lmc_reading(result: dict[str, Any], tol: float = 1e-3) -> str:
    """Which pairs have a loss barrier at all, and whether the test can tell the pairs apart."""
    pairs = result["lmc"]["pairs"]
    raised = [f"{p} ({t})" for p, v in pairs.items() for t in ("public", "private") if v[t]["barrier"] > tol]
    if raised:
        return f"Barriers above {tol:g} nats: {', '.join(raised)}; every other pair and text is barrier-free."
    return (f"No pair has a barrier above {tol:g} nats on either text, the fine-tuned model and the pre-trained one "
            "included: at this fine-tuning scale every model here sits in one basin with every other, so a zero "
            "barrier between a switched-off model and the retrained one does not single it out.")


def reading(result: dict[str, Any]) -> str:
    """What the measurements say, computed from them."""
    rows, ch, cfg = result["rows"], result["choice"], result["config"]
    hb = ch["halves"]["b"]
    if ch["chosen"] is None:
        ok_e, ok_s = ch["exposure_ok"], ch["skill_ok"]
        return (f"No rank of the split meets both goals on half A (exposure <= retrain + "
                f"{cfg['exposure_margin_bits']:g} bit and skill >= {cfg['skill_goal']:g}): ranks meeting the "
                f"exposure bound: {', '.join(ok_e) or 'none'}; the skill bound: {', '.join(ok_s) or 'none'}. "
                f"Control row at rank {ch['control_rank']} (best trade-off on half A).")
    B = paired_half(rows, ch["chosen"], hb, cfg["n_boot"])
    margin = cfg["exposure_margin_bits"]
    if B["ci"][1] <= margin:
        verdict = "holds on the held-out half, with the whole 95% interval inside the margin"
    elif B["minus_retrain"] <= margin:
        verdict = ("holds on the held-out half's point estimate only: the 95% interval reaches past the margin, "
                   "so it is not established")
    else:
        verdict = "is missed on the held-out half"
    return (f"Chosen on half A: {rows[ch['chosen']]['label']} (skill {_f(row_skill(rows, ch['chosen']))}). On half B "
            f"it extracts {B['extracted']}/{B['n']} and its exposure is {B['exposure']:.2f} bits against the retrained "
            f"model's {ch['retrain_half_b']['exposure']:.2f} (paired difference {B['minus_retrain']:+.2f}, 95% CI "
            f"[{B['ci'][0]:+.2f}, {B['ci'][1]:+.2f}]): the goal (<= retrain + {margin:g} bit) {verdict}.")


def build_blocks(result: dict[str, Any], fig_dir: Path, sep_dir: Path | None) -> list[Block]:
    figs = [Figure(rank_figure(result, fig_dir / "split_rank.png"),
                   "Task-vector split at b = 0: exposure on the reporting half and skill vs rank."),
            Figure(lmc_figure(result, fig_dir / "lmc.png"),
                   "Linear mode connectivity: loss along straight lines between models, public and private text."),
            Figure(eta_figure(result, fig_dir / "eta_per_layer.png"),
                   "eta per decoder linear on the held-out public input subspace, beside the random baseline."),
            Figure(spectra_figure(result, fig_dir / "tau_spectra.png"),
                   "Singular values of the fine-tuning update of a few layers.")]
    lmc_rows = [[p, _f(v["public"]["barrier"], ".4f"), _f(v["private"]["barrier"], ".4f"),
                 f"{v['public']['losses'][0]:.3f} → {v['public']['losses'][-1]:.3f}",
                 f"{v['private']['losses'][0]:.3f} → {v['private']['losses'][-1]:.3f}"]
                for p, v in result["lmc"]["pairs"].items()]
    eta_rows = [[u, f"{r['eta']:.3f}", f"{r['random_baseline']:.3f}"] for u, r in result["eta"]["updates"].items()]
    cfg = result["config"]
    env = result["environment"]
    return [
        Heading(f"Seeds' table 1 on our benchmark: {cfg['bench']['model']}", 1),
        Para(reading(result)),
        Heading("Table 1 (kill-switch benchmark)"), table_one(result),
        Heading("Task-vector split and K-FAC memory: choose on half A, report on half B"), split_table(result),
        figs[0],
        Heading("Best training-time method (separation benchmark)"), *separation_panel(sep_dir),
        Heading("Seeds' claims"),
        Table(["claim", "seed"], [[c, s] for c, s in SEED_CLAIMS],
              "Our figures for each are in the tables above and below."),
        Heading("eta (pooled over layers)"),
        Table(["update", "eta", "random baseline"], eta_rows,
              f"Held-out public subspace: the pre-trained model's inputs on the held-out domain blocks at energy "
              f"{result['eta']['energy']:g}. Rank of the split: {result['eta']['rank']}."),
        figs[2],
        Heading("Linear mode connectivity"), Para(lmc_reading(result)),
        Table(["pair a → b", "barrier public", "barrier private", "public NLL a → b", "private NLL a → b"],
              lmc_rows, f"{cfg['lmc_points']} points; public: {cfg['lmc_blocks']} held-out domain blocks; "
                        "private: the member records. v1_a0 is the dequantized INT4 base."),
        figs[1], figs[3],
        Heading("Hessian spectral density (seed 001 table 1)"), *hessian_blocks(result, fig_dir),
        Heading("Setup"),
        Code(json.dumps({"config": cfg, "data": {k: v for k, v in result["data"].items() if k != "canaries"},
                         "stages": result["stages"]}, indent=1, default=str)[:6000]),
        Para(f"Measured at source {env.get('source')} on {env.get('machine')} ({env.get('threads')} threads), "
             f"{env.get('date')}; wall time of the last piece {result['wall_s'] / 60:.1f} min."),
    ]


def render_geometry_report(result_path: str | Path, out_dir: str | Path | None = None,
                           separation_dir: str | Path | None = None) -> dict[str, Path]:
    """Figures, ``report.md`` and ``report.html`` for a geometry-table result JSON."""
    result_path = Path(result_path)
    if not result_path.is_file():
        raise FileNotFoundError(f"result file {result_path} not found")
    result = json.loads(result_path.read_text())
    if result.get("experiment") != "geometry_table":
        raise ValueError(f"{result_path} is not a geometry-table result ('experiment': 'geometry_table')")
    out = Path(out_dir) if out_dir is not None else result_path.parent
    blocks = build_blocks(result, out / "figures", None if separation_dir is None else Path(separation_dir))
    md = atomic_write_text(out / "report.md", to_markdown(blocks, out))
    page = atomic_write_text(out / "report.html", to_html(blocks, "libortho: seeds' table 1"))
    return {"markdown": md, "html": page, "figures": out / "figures"}
