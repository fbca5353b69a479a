"""The kill-switch report: result JSON -> figures -> Markdown + self-contained HTML, beside the JSON.

Every number comes from the result's ``summary`` (computed from measurements by
:mod:`libortho.experiments.summary`); nothing is typed in by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from libortho.atomic import atomic_write_text
from libortho.experiments.summary import summarise
from libortho.report.document import Block, Code, Figure, Heading, Para, Table, to_html, to_markdown
from libortho.report.plots import alpha_figure, perplexity_figure, plane_figure

ORDER = ("pre", "ft", "rtn_int4", "gptq_int4", "gradient_ascent", "gradient_difference", "npo", "retrain")
ATTACK_LABELS = {"loss": "loss", "zlib": "zlib", "min_k": "min-k%", "min_k_plus_plus": "min-k%++",
                 "reference": "ref"}


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ordered(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = result["summary"]["rows"]
    names = [n for n in ORDER if n in rows] + [n for n in result["alpha_sweep"] if n in rows]
    return [rows[n] for n in names] + [r for n, r in rows.items() if n not in names]


def main_table(result: dict[str, Any]) -> Table:
    """Leakage next to utility for every method."""
    out = []
    for r in _ordered(result):
        wall = "" if r["wall_s"] is None else f"{r['wall_s']:.0f} s" + (" (cached)" if r["reused"] else "")
        out.append([r["label"], _f(r["extraction"]), _f(r["exposure"], ".2f"), _f(r["exposure_all"], ".2f"),
                    _f(r["mia_auc"].get("loss")),
                    f"{_f(r['mia_best_auc'])} ({ATTACK_LABELS.get(r['mia_best_attack'], r['mia_best_attack'])})",
                    _f(r["private_nll"]), _f(r["ppl_domain"]), _f(r["ppl_general"]), _f(r["skill_retained"]),
                    wall, _f(r["bits_per_param"], ".2f") if r["bits_per_param"] else "32 (fp32)"])
    return Table(["method", "extraction", "exposure exact (bits)", "incl. estimated", "MIA AUC loss",
                  "MIA AUC best", "secret NLL",
                  "PPL domain", "PPL general", "skill retained", "wall time", "bits/param"], out,
                 "Leakage (left) and utility (right) of every method; skill retained = (PPL_pre - PPL_x) / "
                 "(PPL_pre - PPL_ft) on the held-out public domain. " + _exposure_note(result))


def _exposure_note(result: dict[str, Any]) -> str:
    ft = result["summary"]["rows"]["ft"]
    n = len(ft["per_canary_extracted"])
    return (f"Exposure exact is the mean over the {ft['exposure_exact_n']} of {n} member canaries whose secret space "
            f"was enumerated ({', '.join(ft['exposure_exact_kinds']) or 'none'}); 'incl. estimated' also averages "
            "the skew-normal estimates of the larger spaces, whose 64-sample 90% error band is wider than +-1 bit "
            "(docs/results/exposure_check), so it is secondary.")


def compact_table(result: dict[str, Any]) -> Table:
    """The main table's key columns, for a terminal (derived figures recomputed from the measurements)."""
    result = {**result, "summary": summarise(result)}
    body = [[r["label"], _f(r["extraction"], ".2f"), _f(r["exposure"], ".1f"), _f(r["mia_best_auc"], ".2f"),
             _f(r["private_nll"], ".2f"), _f(r["ppl_domain"], ".2f"), _f(r["ppl_general"], ".2f"),
             _f(r["skill_retained"], ".2f")] for r in _ordered(result)]
    return Table(["method", "extract", "exposure", "MIA AUC", "secret NLL", "PPL dom", "PPL gen", "skill"], body,
                 "kill switch: leakage (extraction, exposure bits, best MIA AUC, secret NLL) and utility")


def repeats_table(result: dict[str, Any]) -> Table:
    """Extraction and exposure split by how often a canary was seen in fine-tuning."""
    rows = _ordered(result)
    reps = sorted(rows[0]["extraction_by_repeats"], key=int)
    body = [[r["label"], *[f"{_f(r['extraction_by_repeats'][k], '.2f')} / {_f(r['exposure_by_repeats'].get(k), '.1f')}"
                           for k in reps]] for r in rows]
    return Table(["method", *[f"seen {k}x: extraction / exact exposure" for k in reps]], body,
                 "Memorisation grows with repetition; the kill switch should act where it is strongest.")


def exposure_table(result: dict[str, Any]) -> Table:
    """Mean member exposure per secret kind (exact or estimated, with its maximum), for the key methods."""
    rows = result["summary"]["rows"]
    keys = [k for k in ("pre", "ft", "rtn_int4", *result["alpha_sweep"], "retrain") if k in rows]
    canaries = result["methods"]["ft"]["metrics"]["per_canary"]
    kinds = list(rows["ft"]["exposure_by_kind"])
    meta = {k: next(c for c in canaries if c["kind"] == k) for k in kinds}
    head = [f"{k} ({meta[k]['exposure_method']}, max {meta[k]['exposure_max']:.0f})" for k in kinds]
    body = [[rows[k]["label"], *[_f(rows[k]["exposure_by_kind"][kind], ".2f") for kind in kinds],
             _f(rows[k]["exposure_nonmember"], ".2f")] for k in keys]
    return Table(["method", *head, "non-members (exact kinds)"], body,
                 "Exposure in bits by secret kind. Estimated exposures extrapolate a skew-normal fit into its tail "
                 "and are clipped at log2|R|, so one well-memorised secret can dominate a mean; non-members give "
                 "the never-seen baseline.")


def mia_table(result: dict[str, Any]) -> Table:
    """Every attack's ROC AUC and TPR at 1% FPR."""
    rows = _ordered(result)
    attacks = list(rows[0]["mia_auc"])
    body = [[r["label"], *[f"{r['mia_auc'][a]:.3f} / {r['mia_tpr_1pct'][a]:.2f}" for a in attacks]] for r in rows]
    n = result["methods"]["pre"]["metrics"]["mia"][attacks[0]]
    return Table(["method", *[f"{ATTACK_LABELS.get(a, a)}: AUC / TPR@1%" for a in attacks]], body,
                 f"Membership inference on {n['n_members']} member vs {n['n_nonmembers']} non-member records "
                 f"(with {n['n_nonmembers']} non-members the smallest non-zero FPR is {1 / n['n_nonmembers']:.3f}, "
                 "so TPR at 1% FPR means members ranked above every non-member).")


def claims_table(result: dict[str, Any]) -> Table:
    """The seed's claims beside what we measured."""
    body = []
    for c in result["summary"]["claims"]:
        holds = "n/a" if c["holds"] is None else ("yes" if c["holds"] else "**no**")
        if c["key"] == "leak_reduction" and "counts" in c:
            measured = f"{c['counts']['extracted_alpha1']}/{c['counts']['n']} -> {c['counts']['extracted_alpha0']}/" \
                       f"{c['counts']['n']} extracted"
        elif c["key"].startswith("general_loss"):
            measured = _pct(c["measured"])
        else:
            measured = _f(c["measured"])
        body.append([c["claim"], c["seed_value"], measured, holds, c["detail"]])
    return Table(["seed claim", "seed", "measured", "holds here", "detail"], body)


def reading(result: dict[str, Any]) -> str:
    """A factual paragraph answering the experiment's question from the measured figures."""
    a = result["summary"]["answer"]
    parts = []
    if "libortho_a0" in a and "ft" in a:
        off, on, ft = a["libortho_a0"], a.get("libortho_a1"), a["ft"]
        parts.append(f"The FP fine-tuned model leaks {_pct(ft['extraction'])} of its canaries (exact exposure "
                     f"{_f(ft['exposure'], '.2f')} bits). With the ortho stream on (alpha = 1) extraction is "
                     f"{_pct(on['extraction']) if on else 'n/a'}; switched off (alpha = 0, the base stream alone) "
                     "it is "
                     f"{_pct(off['extraction'])} (exposure {_f(off['exposure'], '.2f')} bits), while keeping "
                     f"{_f(off['skill_retained'], '.2f')} of the fine-tuning gain on the public domain.")
    if "retrain" in a:
        rt = a["retrain"]
        parts.append(f"Retraining without the private records, the gold standard, gives extraction "
                     f"{_pct(rt['extraction'])}, exposure {_f(rt['exposure'], '.2f')} bits and skill retained "
                     f"{_f(rt['skill_retained'], '.2f')}.")
    if "rtn_int4" in a:
        rtn = a["rtn_int4"]
        parts.append(f"Plain INT4 RTN (no calibration, no ortho) gives extraction {_pct(rtn['extraction'])} "
                     f"with skill retained {_f(rtn['skill_retained'], '.2f')}: compare it with alpha = 0 to see "
                     "whether rounding alone erases the private records, and whether it erases the public gain "
                     "with them.")
    return " ".join(parts)


def setup_text(result: dict[str, Any]) -> str:
    """The experimental setup in a few lines (the full config is in the JSON)."""
    c, d, st = result["config"], result["data"], result.get("stages", {})
    ft = st.get("finetune", {})
    q, s = c["quant"], c["select"]
    lines = [
        f"model: {c['model']}; public domain: {c['domain']}; general corpus: {d['general_corpus']}; seed {c['seed']}",
        f"canaries: {d['members']} members (kinds {', '.join(c['kinds'])}; seen {', '.join(map(str, c['repeats']))}x"
        f"), {d['nonmembers']} non-members from the same generator",
        f"fine-tuning: {d['public_tokens']} public + {d['private_tokens']} private tokens, {ft.get('steps')} steps, "
        f"lr {c['finetune']['lr']:g}, batch {c['finetune']['batch_size']}x{c['block_len']}, "
        f"{_f(ft.get('wall_s'), '.0f')} s" + (" (cached)" if ft.get("reused") else ""),
        f"decomposition: INT{q['bits']} {q['method'].upper()} g{q['group_size']} base on {d['calibration_tokens']} "
        f"public calibration tokens; ortho: {s['selector']} rho={s['rho']:g} ({s['values']} values, selector "
        f"calibration: {c['select_calibration']})",
        f"unlearning: {c['unlearn']['steps']} steps, lr {c['unlearn']['lr']:g}, {c['unlearn']['batch_size']} "
        f"forget records/step; NPO beta {c['unlearn']['beta']:g}",
        f"evaluation: {d['domain_eval_tokens']} held-out domain tokens, {d['general_eval_tokens']} general tokens; "
        f"exposure exact up to {c['harness']['max_enumerate']} candidates, else {c['harness']['exposure_samples']} "
        "samples + skew-normal fit",
        f"total wall time {result['wall_s'] / 60:.1f} min on {result['environment']['threads']} threads "
        f"(torch {result['environment']['torch']}); " + source_line(result['environment']),
    ]
    return "\n".join(lines)


def source_line(env: dict[str, Any]) -> str:
    """Which code measured a result: its commit, or that none was recorded."""
    src = env.get("source")
    if not src:
        return f"libortho {env.get('libortho', '?')}, measured {env.get('date', '?')}, commit not recorded"
    dirty = " with uncommitted changes in src/" if src["src_dirty"] else ""
    return f"measured at commit {src['commit'][:10]}{dirty}"


def build_blocks(result: dict[str, Any], fig_dir: Path) -> list[Block]:
    """The report as blocks (figures drawn into ``fig_dir``)."""
    figs = [Figure(alpha_figure(result, fig_dir / "extraction_exposure_vs_alpha.png"),
                   "Seed figure 1: canary extraction and exposure vs alpha, with the FP fine-tuned, "
                   "retrained and pre-fine-tune models as references."),
            Figure(perplexity_figure(result, fig_dir / "perplexity_vs_alpha.png"),
                   "Perplexity vs alpha on the held-out public domain and the general corpus."),
            Figure(plane_figure(result, fig_dir / "leakage_utility_plane.png"),
                   "Every method on the leakage/utility plane.")]
    return [
        Heading(f"Privacy kill switch: {result['config']['model']}", 1),
        Para(reading(result)),
        Heading("Seed claims vs measured"), claims_table(result),
        Heading("All methods"), main_table(result),
        figs[2], figs[0], figs[1],
        Heading("By repetition count"), repeats_table(result),
        Heading("Exposure by secret kind"), exposure_table(result),
        Heading("Membership inference"), mia_table(result),
        Heading("Setup"), Code(setup_text(result)),
        Para("Notes: no separate INT4 GPTQ model is listed: alpha = 0 runs the base stream alone, which is "
             "calibrated with the ortho stream off (bench/ppl_table.py checks that an independently decomposed "
             "base-only model gives bit-identical logits). The leak-reduction claim is judged on extraction counts "
             "with exact (Clopper-Pearson) intervals and an exact McNemar test on the paired canaries: it holds only "
             "if the reduction reaches 99.8% and the test rejects 'no change' at p < 0.05. Exposure is "
             "log2|R| - log2 rank over the secret's own candidate space R; a never-seen secret scores about 1-2 "
             "bits. Secret NLL is the mean "
             "per-token loss of the member secrets given their prefixes (the seed's 'private error')."),
    ]


def render_report(result_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Render figures, ``report.md`` and ``report.html`` for a kill-switch result JSON."""
    result_path = Path(result_path)
    if not result_path.is_file():
        raise FileNotFoundError(f"result file {result_path} not found")
    try:
        result = json.loads(result_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{result_path} is not valid JSON: {err}") from err
    if result.get("experiment") != "kill_switch" or "summary" not in result:
        raise ValueError(f"{result_path} is not a kill-switch result (no 'experiment': 'kill_switch' / summary)")
    out = Path(out_dir) if out_dir is not None else result_path.parent
    result["summary"] = summarise(result)  # derived figures are recomputed from the measurements every time
    blocks = build_blocks(result, out / "figures")
    title = f"libortho kill switch: {result['config']['model']}"
    md = atomic_write_text(out / "report.md", to_markdown(blocks, out))
    page = atomic_write_text(out / "report.html", to_html(blocks, title))
    return {"markdown": md, "html": page, "figures": out / "figures"}
