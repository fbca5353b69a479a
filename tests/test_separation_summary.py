"""Goals and rankings of the separation experiment on known inputs (edges included)."""

from __future__ import annotations

import numpy as np

from libortho.experiments.separation_summary import (
    extracted,
    figures,
    method_goals,
    pick_tuned,
    privleak,
    rank_methods,
    recorded_compute,
)


def _entry(label: str, group: str, hits: list[bool], expo: list[float] | None, ppl_g: float, ppl_d: float = 10.0,
           secret_nll: float = 2.0, member_scores: list[float] | None = None, **extra) -> dict:
    rng = np.random.default_rng(len(label))
    nonmember = rng.normal(0, 1, 40).tolist()
    members = member_scores if member_scores is not None else rng.normal(0, 1, len(hits)).tolist()
    per = [{"extracted": h, "exposure": None if expo is None else expo[i]} for i, h in enumerate(hits)]
    blocks = (np.log(ppl_g) + rng.normal(0, 0.01, 8)).tolist()
    return {"label": label, "group": group, **extra, "metrics": {
        "per_canary": per, "exposure": {"mean": None if expo is None else float(np.mean(expo))},
        "ppl_general": ppl_g, "ppl_domain": ppl_d, "private_nll": secret_nll,
        "block_nll_general": blocks, "block_nll_domain": (np.log(ppl_d) + rng.normal(0, 0.01, 8)).tolist(),
        "mia_scores": {"secret_loss": {"members": members, "nonmembers": nonmember},
                       "min_k_plus_plus": {"members": members, "nonmembers": nonmember}}}}


def test_pick_tuned_prefers_most_forgetting_within_the_utility_budget() -> None:
    ft = _entry("ft", "reference", [True] * 4, None, ppl_g=20.0)
    entries = {"a": _entry("a", "s", [False] * 4, None, ppl_g=21.9, secret_nll=5.0),  # within 10%: 21.9 < 22
               "b": _entry("b", "s", [False] * 4, None, ppl_g=22.1, secret_nll=9.0),  # best forgetting, over budget
               "c": _entry("c", "s", [False] * 4, None, ppl_g=20.5, secret_nll=3.0)}
    assert pick_tuned(entries, ft) == "a"
    over = {k: v for k, v in entries.items() if k == "b"}
    over["d"] = _entry("d", "s", [False] * 4, None, ppl_g=30.0, secret_nll=12.0)
    assert pick_tuned(over, ft) == "b"  # none within budget: the lowest perplexity


def _evals(method_hits: list[bool], method_expo: float, a1_expo: float, ppl: float = 10.0) -> dict:
    n = len(method_hits)
    return {"ft_fp": _entry("ft", "reference", [True] * n, [8.0] * n, 9.0),
            "retrain_masked_int4": _entry("r", "reference", [False] * n, [1.5] * n, 10.0),
            "m_int4_a0": _entry("m0", "method", method_hits, [method_expo] * n, ppl),
            "m_int4_a1": _entry("m1", "method", [True] * n, [a1_expo] * n, ppl)}


def test_rank_methods_counts_goals_at_their_edges() -> None:
    good = _evals([False] * 6, method_expo=2.5, a1_expo=7.2)  # exposure exactly ref + 1; alpha1 exactly 90%
    assert rank_methods(good, ("m",))[0]["met"] == 5
    leaky = _evals([True] + [False] * 5, method_expo=2.51, a1_expo=7.19)
    r = rank_methods(leaky, ("m",))[0]
    assert r["checks"] == {"extraction_zero": False, "exposure_within_1bit": False, "general_ppl_not_worse": True,
                           "domain_ppl_not_worse": True, "alpha1_keeps_exposure": False}
    both = {**good, **{k.replace("m_", "n_"): v for k, v in leaky.items() if k.startswith("m_")}}
    assert [x["method"] for x in rank_methods(both, ("n", "m"))] == ["m", "n"]


def test_goals_judge_against_the_quantized_retrain_and_report_cis() -> None:
    evals = _evals([False] * 6, method_expo=2.0, a1_expo=7.5)
    evals["ft_fp"]["cost"] = {"wall_s": 100.0}
    evals["m_int4_a0"]["cost"] = {"wall_s": 131.0}
    figs = {k: figures(v, n_boot=200) for k, v in evals.items()}
    pls = {"m_int4_a0": privleak(evals["m_int4_a0"], evals["retrain_masked_int4"], n_boot=200)}
    g = method_goals("m", figs, evals, {"ft": {"wall_s": 100.0}}, pls)
    a0 = g["alpha0_int4"]
    assert a0["extraction_zero"]["holds"] and a0["extraction_zero"]["n"] == 6
    assert a0["exposure_within_1bit"]["holds"] and a0["exposure_within_1bit"]["goal"] == 2.5
    assert g["alpha1_exposure"]["holds"] and g["alpha1_exposure"]["goal"] == 0.9 * 8.0
    # the run's wall clocks are indicative only: the goal is the benchmark's (the report reads it)
    assert g["training_time"]["measured"] == 1.31 and g["training_time"]["holds"] is None
    assert "privleak_secret" in a0 and "low" in a0["privleak_secret"]["ci"]
    assert extracted(evals["m_int4_a0"]) == (0, 6)


def test_all_hold_across_seeds_needs_every_alpha0_goal_judged() -> None:
    from libortho.experiments.separation_summary import ALPHA0_GOALS, _all_hold

    assert not _all_hold(None) and not _all_hold({})
    judged = {k: {"holds": True} for k in ALPHA0_GOALS}
    assert _all_hold(judged)
    missing = {k: v for k, v in judged.items() if k != "exposure_within_1bit"}  # no exposure: not shown to hold
    assert not _all_hold(missing)
    assert not _all_hold({**judged, "privleak_secret": {"holds": False}})


def test_paired_ppl_ratio_reads_block_differences_not_two_wide_intervals() -> None:
    """Blocks of very different difficulty make each model's own interval wide; a model uniformly 10% worse
    in perplexity on every block has a paired ratio of exactly 1.1 with a zero-width interval, which the
    unpaired 'inside the reference's interval' check cannot see."""
    from libortho.experiments.separation_summary import paired_ppl_ratio

    ref_blocks = [2.0, 3.5, 5.0, 2.5, 4.5, 3.0]
    worse = [b + float(np.log(1.1)) for b in ref_blocks]
    ref = {"metrics": {"block_nll_general": ref_blocks}}
    row = {"metrics": {"block_nll_general": worse}}
    r = paired_ppl_ratio(row, ref, "general", n_boot=200)
    assert r["n_blocks"] == 6
    assert abs(r["estimate"] - 1.1) < 1e-12 and abs(r["low"] - 1.1) < 1e-12 and abs(r["high"] - 1.1) < 1e-12
    noisy = {"metrics": {"block_nll_general": [b + d for b, d in zip(ref_blocks, (0.1, 0.0, 0.2, 0.1, 0.0, 0.2),
                                                                      strict=True)]}}
    r = paired_ppl_ratio(noisy, ref, "general", n_boot=500)
    assert abs(r["estimate"] - float(np.exp(0.1))) < 1e-12 and r["low"] < r["estimate"] < r["high"]
    assert r["low"] >= float(np.exp(0.0)) - 1e-12 and r["high"] <= float(np.exp(0.2)) + 1e-12
    assert paired_ppl_ratio(row, {"metrics": {"block_nll_general": ref_blocks[:3]}}, "general") is None


def test_recorded_compute_counts_each_stage_once_and_each_row_with_its_model_making() -> None:
    """Stages are the training records (eta and the ranking are not); rows add eval_s and build_s."""
    stages = {"ft": {"wall_s": 100.0}, "retrain_masked": {"wall_s": 50.5}, "mask": {"wall_s": 20, "steps": 3},
              "eta": {"ft": {"eta": 0.3, "random_baseline": 0.2}}, "ranking": [{"method": "mask"}]}
    evals = {"a": {"metrics": {"eval_s": 10.0}, "build_s": 5.0}, "b": {"metrics": {"eval_s": 7.0}}}
    c = recorded_compute({"stages": stages, "evals": evals})
    assert c["training_s"] == 170.5 and c["evaluation_s"] == 22.0 and c["total_s"] == 192.5
    assert c["rows"] == 2 and c["rows_without_build_s"] == 1
    stages["ft"]["retrained"] = [{"wall_s": 90.0, "reused": False}]  # trained again in a later piece
    assert recorded_compute({"stages": stages, "evals": evals})["training_s"] == 260.5


def test_label_noise_splits_members_by_label_and_reads_the_same_members_under_the_reference() -> None:
    from libortho.experiments.separation_summary import label_noise_rows

    # members 1 and 3 unlabelled: they leak (extracted, 9-10 bits); the labelled ones do not
    noisy = _entry("ogd noisy a=0", "label_noise", [False, True, False, True], [1.0, 9.0, 2.0, 10.0], 20.0,
                   alpha=0.0, base="int4", method="ogd", noise=0.5)
    ref = _entry("retrain INT4", "reference", [False] * 4, [0.5, 1.5, 2.5, 3.5], 20.0)
    seed_result = {"evals": {"ogd@0.5_int4_a0": noisy, "retrain_masked_int4": ref},
                   "unlabelled": {"0.5": [1, 3]}}
    row = label_noise_rows(seed_result, n_boot=200)["ogd@0.5_int4_a0"]
    assert row["unlabelled"]["extraction"]["k"] == 2 and row["unlabelled"]["extraction"]["n"] == 2
    assert row["labelled"]["extraction"]["k"] == 0 and row["labelled"]["extraction"]["n"] == 2
    assert np.isclose(row["unlabelled"]["exposure"]["estimate"], 9.5)
    assert np.isclose(row["labelled"]["exposure"]["estimate"], 1.5)
    # the reference on the very same members, not its overall mean (2.0)
    assert np.isclose(row["unlabelled_reference"]["exposure"]["estimate"], 2.5)
    assert np.isclose(row["labelled_reference"]["exposure"]["estimate"], 1.5)
    assert row["reference"] == "retrain_masked_int4" and row["alpha"] == 0.0


def test_perplexity_goal_is_judged_on_the_paired_ratio_not_the_wide_unpaired_interval() -> None:
    """A model 10% worse on every block sits inside the reference's wide (block-difficulty) interval, which the
    unpaired reading passed; the paired ratio's interval excludes 1, so the goal fails. Equal blocks hold."""
    evals = _evals([False] * 6, method_expo=2.0, a1_expo=7.5)
    ref_blocks = [2.0, 5.5, 3.0, 6.0, 2.5, 4.5, 3.5, 5.0]
    evals["retrain_masked_int4"]["metrics"]["block_nll_general"] = ref_blocks
    evals["m_int4_a0"]["metrics"]["block_nll_general"] = [b + float(np.log(1.1)) for b in ref_blocks]
    figs = {k: figures(v, n_boot=300) for k, v in evals.items()}
    g = method_goals("m", figs, evals, {}, {})["alpha0_int4"]["ppl_general_in_reference_ci"]
    assert g["unpaired_holds"] is True and g["holds"] is False
    assert abs(g["paired_ratio"]["low"] - 1.1) < 1e-9
    evals["m_int4_a0"]["metrics"]["block_nll_general"] = list(ref_blocks)
    figs = {k: figures(v, n_boot=300) for k, v in evals.items()}
    assert method_goals("m", figs, evals, {}, {})["alpha0_int4"]["ppl_general_in_reference_ci"]["holds"] is True
