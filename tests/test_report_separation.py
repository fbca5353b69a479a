"""The separation report: rendered from a small synthetic result and from the stored sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from libortho.cli import app
from libortho.experiments.separation_summary import summarise_separation
from libortho.report.separation import claims, goal_rows, render_separation_report

SAMPLE = Path("/work/e2e_sample/result.json")
N = 6


def _entry(label: str, group: str, extracted: int, exposure: float, auc_shift: float, nll: float,
           **extra: object) -> dict:
    per = [{"extracted": i < extracted, "exposure": exposure + 0.1 * i} for i in range(N)]
    members = [auc_shift + 0.1 * i for i in range(N)]
    nonmembers = [0.05 * i for i in range(2 * N)]
    scores = {"members": members, "nonmembers": nonmembers}
    blocks = [nll - 0.02, nll, nll + 0.02]
    mean = sum(p["exposure"] for p in per) / N
    return {"label": label, "group": group, **extra, "metrics": {
        "per_canary": per, "exposure": {"mean": mean}, "mia_scores": {"secret_loss": scores,
                                                                      "min_k_plus_plus": scores},
        "block_nll_domain": blocks, "block_nll_general": blocks, "ppl_domain": 2.718 ** nll,
        "ppl_general": 2.718 ** nll, "private_nll": 1.0 + exposure}}


def synthetic(label_noise: bool = True, ogd: bool = True, seeds: tuple[str, ...] = ("0",)) -> dict:
    """Two methods: mask switches cleanly; ogd still leaks at alpha = 0 (its goals fail)."""
    evals = {"pre": _entry("pre-fine-tune", "reference", 0, 1.0, 0.0, 3.0),
             "ft_fp": _entry("FP fine-tuned", "reference", 5, 6.0, 0.6, 2.0, cost={"wall_s": 10.0}),
             "retrain_masked_fp": _entry("Retrain", "reference", 0, 1.0, 0.0, 2.0),
             "retrain_masked_int4": _entry("Retrain + INT4", "reference", 0, 1.0, 0.0, 2.0)}
    for m, k0 in (("mask", 0), ("ogd", 2)):
        for base in ("fp", "int4"):
            for a in (0, 1):
                evals[f"{m}_{base}_a{a}"] = _entry(f"{m} {base} a={a}", "method", k0 if a == 0 else 5,
                                                   1.0 + 3 * k0 if a == 0 else 6.0, 0.3 * k0 if a == 0 else 0.6,
                                                   2.0, alpha=float(a), base=base, method=m, noise=0.0,
                                                   cost={"wall_s": 11.0 if m == "mask" else 20.0})
    evals["npo_fp"] = _entry("npo tuned", "unlearning", 1, 3.0, 0.2, 2.1, unlearning="npo")
    evals["npo_int4"] = _entry("npo tuned + INT4", "unlearning", 1, 3.0, 0.2, 2.1, unlearning="npo")
    evals["sweep_npo_lr1e-4_s10"] = _entry("npo sweep", "unlearning_sweep", 1, 3.0, 0.2, 2.2, unlearning="npo")
    if label_noise:
        evals["mask@0.5_int4_a0"] = _entry("mask noisy a=0", "label_noise", 3, 4.0, 0.3, 2.0, alpha=0.0,
                                           base="int4", method="mask", noise=0.5)
    stages = {"ft": {"wall_s": 10.0}}
    if ogd:
        stages["ogd"] = {"eta": [{"step": 0, "eta_heldout": 0.2, "eta_own": 0.01},
                                 {"step": 10, "eta_heldout": 0.03, "eta_own": 0.005}], "eta_random_baseline": 0.4}
        stages["eta"] = {"ft": {"eta": 0.5, "random_baseline": 0.35}, "ogd": {"eta": 0.03, "random_baseline": 0.4}}
    seed = {"data": {"members": N, "nonmembers": 2 * N, "repeats": 8, "secret_spaces": [1000], "train_tokens": 999,
                     "public_tokens": 900, "private_tokens": 99, "general_corpus": "fortunes"},
            "stages": stages, "evals": evals, "unlabelled": {"0.5": [0, 1, 2]} if label_noise else {},
            "member_kinds": ["digits"] * N}
    result = {"experiment": "separation", "stage": "screening" if len(seeds) == 1 else "confirmation",
              "config": {"model": "tiny", "stage": "screening", "members": N, "nonmembers": 2 * N, "repeats": 8,
                         "domain": "shakespeare", "general": "auto", "methods": ["mask", "ogd"],
                         "unlearning": ["npo"], "quant": {"bits": 4, "method": "gptq", "group_size": 64},
                         "bootstrap": 50},
              "environment": {"libortho": "0.1.0", "source": {"commit": "abcdef1234567", "src_dirty": False}},
              "seeds": {s: json.loads(json.dumps(seed)) for s in seeds}, "wall_s": 120.0}
    result["summary"] = summarise_separation(result)
    return result


def _write(tmp_path: Path, result: dict) -> Path:
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result))
    return path


def test_synthetic_report_files_and_goal_values(tmp_path: Path) -> None:
    result = synthetic()
    paths = render_separation_report(_write(tmp_path, result))
    md = paths["markdown"].read_text()
    assert paths["html"].is_file()
    figs = {p.name for p in paths["figures"].iterdir()}
    assert {"seed0_leakage_utility.png", "seed0_alpha.png", "seed0_ogd_eta.png", "seed0_label_noise.png"} <= figs
    goals = result["summary"]["seeds"]["0"]["goals"]
    # every goal's measured value (from the JSON) is in the Markdown, in its own row
    g = goals["mask"]["alpha0_int4"]["exposure_within_1bit"]
    assert f"{g['measured']:.3f} [{g['ci']['low']:.3f}, {g['ci']['high']:.3f}]" in md
    t = goals["mask"]["training_time"]
    assert f"{t['measured']:.3f}" in md
    rows = goal_rows(goals["ogd"], result["seeds"]["0"]["evals"], "ogd")
    ext = next(r for r in rows if r[0].startswith("INT4 a=0") and "extraction" in r[0])
    assert ext[1] == f"{goals['ogd']['alpha0_int4']['extraction_zero']['measured']}/{N}" and ext[3] is False
    # a failing goal renders as failing, a passing one as passing
    assert f"| {ext[0]} | {ext[1]} | 0 | **no** |" in md
    assert f"| {ext[0].replace('ogd', 'mask')} | 0/{N} | 0 | yes |" in md
    assert "mask (top-ranked)" in md


def test_claims_are_computed(tmp_path: Path) -> None:
    result = synthetic()
    cs = {c["claim"]: c for c in claims(result, "0")}
    assert cs["OGD keeps its update out of the held-out public subspace"]["holds"] is True  # 0.03 < 0.05
    assert cs["plain fine-tuning's update lies in the public subspace"]["holds"] is False  # 0.5 outside band
    assert cs["mask: alpha = 0 removes the memorised secrets"]["holds"] is True
    assert cs["ogd: alpha = 0 removes the memorised secrets"]["holds"] is False
    md = render_separation_report(_write(tmp_path, result))["markdown"].read_text()
    assert "Does **not** hold here:" in md and "ogd: alpha = 0 removes the memorised secrets" in md


def test_missing_optional_parts_do_not_crash(tmp_path: Path) -> None:
    result = synthetic(label_noise=False, ogd=False)
    paths = render_separation_report(_write(tmp_path, result), tmp_path / "out")
    figs = {p.name for p in paths["figures"].iterdir()}
    assert "seed0_ogd_eta.png" not in figs and "seed0_label_noise.png" not in figs
    assert "Not measured in this run" in paths["markdown"].read_text()


def test_several_seeds_rows_and_all_seeds(tmp_path: Path) -> None:
    md = render_separation_report(_write(tmp_path, synthetic(seeds=("1", "2"))))["markdown"].read_text()
    assert "| all seeds | holds on 0/2 seeds | every seed | **no** |" in md
    assert "| all seeds | holds on 2/2 seeds | every seed | yes |" in md


def test_summary_absent_is_computed(tmp_path: Path) -> None:
    result = synthetic()
    del result["summary"]
    assert render_separation_report(_write(tmp_path, result))["markdown"].is_file()


@pytest.mark.skipif(not SAMPLE.is_file(), reason="sample result not present")
def test_sample_renders(tmp_path: Path) -> None:
    paths = render_separation_report(SAMPLE, tmp_path)
    md = paths["markdown"].read_text()
    data = json.loads(SAMPLE.read_text())
    top = data["summary"]["seeds"]["0"]["ranking"][0]["method"]
    assert f"{top} (top-ranked)" in md
    assert (tmp_path / "figures" / "seed0_leakage_utility.png").is_file()


def test_cli_dispatch(tmp_path: Path) -> None:
    runner = CliRunner()
    path = _write(tmp_path, synthetic())
    res = runner.invoke(app, ["report", str(path), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "report.md").is_file() and "separation, seed 0" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"experiment": "other"}))
    res = runner.invoke(app, ["report", str(bad)])
    assert res.exit_code != 0 and "is not an experiment's result.json" in res.output


def test_training_cost_comes_from_the_benchmark_json_one_folder_up(tmp_path: Path) -> None:
    """A training_time.json from bench/separation_time.py (in the result's folder or its parent) gives the
    training-cost section, with each method's ratio and whether it holds; without one the report says
    the in-run ratios are indicative only."""
    run = tmp_path / "screening"
    run.mkdir()
    md = render_separation_report(_write(run, synthetic()))["markdown"].read_text()
    assert "not measured by `bench/separation_time.py`" in md
    timing = {"steps_timed": 4, "rounds": 2, "threads": 2, "goal_ratio": 1.3,
              "plain": {"seconds_per_step": 2.0, "steps": 100, "projected_s": 200.0},
              "methods": {"mask": {"seconds_per_step": 2.2, "steps": {"train": 100}, "projected_s": 220.0,
                                   "ratio_to_plain": 1.1},
                          "ogd": {"seconds_per_step": 3.0, "steps": {"train": 100}, "projected_s": 300.0,
                                  "ratio_to_plain": 1.5}}}
    (tmp_path / "training_time.json").write_text(json.dumps(timing))
    md = render_separation_report(run / "result.json")["markdown"].read_text()
    assert "## Training cost" in md and "not measured by" not in md
    assert "| mask | 2.200 | train 100 | 220 | 1.100 | <= 1.3 | yes |" in md
    assert "| ogd | 3.000 | train 100 | 300 | 1.500 | <= 1.3 | **no** |" in md
    # the goal row reads the benchmark's ratio, not the run's wall clock
    row = "| training time / plain fine-tuning (bench/separation_time.py; see Training cost) | 1.100 | <= 1.3 | yes |"
    assert row in md


def test_a_run_with_only_reference_rows_says_no_goal_is_judged(tmp_path: Path) -> None:
    """A confirmation's first piece records the references before any method row: the Goals section must say
    why it is empty instead of rendering a heading with nothing under it (or a goal table of missing rows)."""
    result = synthetic(label_noise=False, ogd=False)
    for seed in result["seeds"].values():
        seed["evals"] = {k: v for k, v in seed["evals"].items() if v["group"] == "reference"}
    result["summary"] = summarise_separation(result)
    text = render_separation_report(_write(tmp_path, result), tmp_path / "out")["markdown"].read_text()
    goals = text.split("## Goals", 1)[1].split("\n## ", 1)[0]
    assert "No method row is recorded yet" in goals and "| goal |" not in goals


def test_pooled_goals_count_every_seeds_members(tmp_path: Path) -> None:
    import numpy as np

    result = synthetic(seeds=("1", "2"))
    second = result["seeds"]["2"]["evals"]["mask_int4_a0"]["metrics"]
    second["per_canary"][0]["extracted"] = True  # one leak, on one seed only
    second["block_nll_general"] = [x + 0.1 for x in second["block_nll_general"]]
    result["summary"] = summarise_separation(result)
    pooled = result["summary"]["pooled"]["mask"]
    assert pooled["seeds"] == ["1", "2"]
    ext = pooled["alpha0_int4"]["extraction_zero"]
    assert (ext["measured"], ext["n"], ext["holds"]) == (1, 2 * N, False)
    rows = [result["seeds"][s]["evals"]["mask_int4_a0"] for s in ("1", "2")]
    expo = np.mean([p["exposure"] for r in rows for p in r["metrics"]["per_canary"]])
    assert pooled["alpha0_int4"]["exposure_within_1bit"]["measured"] == pytest.approx(expo)
    # seed 2 is 0.1 nats worse on every general block, seed 1 equal: the paired ratio is exp(0.05)
    ratio = pooled["alpha0_int4"]["ppl_general_in_reference_ci"]["paired_ratio"]
    assert ratio["estimate"] == pytest.approx(np.exp(0.05)) and ratio["n_blocks"] == 6
    a1 = pooled["alpha1_exposure"]
    ft = np.mean([p["exposure"] for s in ("1", "2") for p in result["seeds"][s]["evals"]["ft_fp"]["metrics"]
                  ["per_canary"]])
    assert a1["goal"] == pytest.approx(0.9 * ft)
    md = render_separation_report(_write(tmp_path, result))["markdown"].read_text()
    assert f"| pooled (seeds 1, 2) | 1/{2 * N} [" in md
    assert synthetic()["summary"]["pooled"] == {}  # one seed: nothing to pool


def _with_control(seeds: tuple[str, ...] = ("1", "2"), shift: float = 0.1) -> dict:
    """mask and ogd beside a two-phase control whose INT4 alpha = 0 blocks are ``shift`` nats worse than
    mask's (per block, plus a little noise so the interval is not degenerate); ogd's blocks equal mask's."""
    result = synthetic(seeds=seeds)
    result["config"]["methods"] = ["two-phase", "mask", "ogd"]
    rng = np.random.default_rng(0)
    for sd in result["seeds"].values():
        ev = sd["evals"]
        for a in (0, 1):
            for base in ("int4", "fp"):
                ev[f"two-phase_{base}_a{a}"] = json.loads(json.dumps(ev[f"mask_{base}_a{a}"]))
        for key in ("block_nll_domain", "block_nll_general"):
            ev["two-phase_int4_a0"]["metrics"][key] = [x + shift + rng.normal(0, 0.01)
                                                       for x in ev["mask_int4_a0"]["metrics"][key]]
            ev["ogd_int4_a0"]["metrics"][key] = list(ev["mask_int4_a0"]["metrics"][key])
    result["summary"] = summarise_separation(result)
    return result


def _texts(blocks: list) -> str:
    return "\n".join(b.text for b in blocks if hasattr(b, "text"))


def test_against_two_phase_names_skill_and_refuses_a_leaky_skill_win() -> None:
    from libortho.report.separation_checks import recommendation_blocks

    result = _with_control()
    sk = result["summary"]["skill_vs_control"]
    assert 0.85 < sk["mask"]["general"]["estimate"] < 0.95 and sk["mask"]["general"]["verdict"] == "better"
    assert len(sk["mask"]["general"]["per_seed"]) == 2
    text = _texts(recommendation_blocks(result, None, ""))
    assert "Beats two-phase: mask (on skill)" in text
    # ogd is as good on skill as mask, but extracts 2 of 6 at alpha = 0 on each seed: no win
    assert "misses extraction zero on seed 1" in text and "so its skill is no win" in text
    assert "ogd (on skill)" not in text


def test_against_two_phase_suffices_only_when_every_comparison_is_made() -> None:
    from libortho.report.separation_checks import recommendation_blocks

    result = _with_control(shift=0.0)  # mask no better than the control: nobody beats it
    text = _texts(recommendation_blocks(result, None, ""))
    assert "**Two-phase suffices**" in text and "Provisional" not in text
    # the control's row missing on one seed: that comparison is not made, so nothing is concluded
    del result["seeds"]["2"]["evals"]["two-phase_int4_a0"]
    result["summary"] = summarise_separation(result)
    text = _texts(recommendation_blocks(result, None, ""))
    assert "Two-phase suffices" not in text and "Not judged yet" in text and "seeds 2 not compared yet" in text
    assert "Provisional" in text


def test_against_two_phase_reads_the_label_noise_rows_on_the_int4_base() -> None:
    from libortho.report.separation_checks import recommendation_blocks

    result = _with_control(shift=0.0)

    def row(method: str, lo: float, base: str = "int4") -> dict:
        ex = {"estimate": lo + 0.5, "low": lo, "high": lo + 1.0}
        return {"noise": 0.5, "method": method, "alpha": 0.0, "base": base,
                "unlabelled": {"exposure": ex, "extraction": {"k": 0, "n": 3}},
                "unlabelled_reference": {"exposure": {"estimate": 1.5, "low": 1.0, "high": 2.0}}}

    noise = {"a": row("ogd", 4.0), "b": row("two-phase", 9.0)}
    text = _texts(recommendation_blocks(result, noise, "screening"))
    assert "ogd (under label noise)" in text and "(still above the retrain)" in text
    # an FP-base noisy row is not compared with the control's INT4 one
    noise = {"a": row("ogd", 4.0, base="fp"), "b": row("two-phase", 9.0)}
    assert "ogd (under label noise)" not in _texts(recommendation_blocks(result, noise, "screening"))
