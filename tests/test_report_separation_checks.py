"""The reviewer's questions in the separation report, answered from known inputs."""

from __future__ import annotations

from pathlib import Path

from libortho.report.document import Para, Table, to_markdown
from libortho.report.separation_checks import (
    construction_blocks,
    label_noise_verdict,
    missing_blocks,
    ranking_blocks,
    setup_asymmetry_blocks,
)


def _md(blocks: list) -> str:
    return to_markdown(blocks, Path("."))


def _iv(est: float, low: float, high: float) -> dict:
    return {"estimate": est, "low": low, "high": high, "n": 10}


def _rank(method: str, met: int, expo: float) -> dict:
    checks = {k: i < met for i, k in enumerate(("extraction_zero", "exposure_within_1bit", "general_ppl_not_worse",
                                                "domain_ppl_not_worse", "alpha1_keeps_exposure"))}
    return {"method": method, "checks": checks, "met": met, "exposure_a0": expo, "ppl_general_a0": 100.0}


def _result(ranking: list, figs: dict, evals: dict | None = None, cfg: dict | None = None,
            label_noise: dict | None = None, stages: dict | None = None) -> dict:
    return {"config": {"methods": [r["method"] for r in ranking], **(cfg or {})},
            "summary": {"seeds": {"0": {"ranking": ranking, "figures": figs, "label_noise": label_noise or {},
                                        "privleak": {}}}},
            "seeds": {"0": {"evals": evals or {}, "stages": stages or {}}}}


def test_a_tie_broken_inside_the_intervals_is_flagged_and_a_resolved_one_is_not() -> None:
    figs = {"a_int4_a0": {"exposure": _iv(1.5, 1.2, 1.8)}, "b_int4_a0": {"exposure": _iv(1.6, 1.3, 1.9)}}
    md = _md(ranking_blocks(_result([_rank("a", 4, 1.5), _rank("b", 4, 1.6)], figs), "0"))
    assert "**tie** at 4/5 checks between a and b" in md and "intervals overlap" in md
    figs["b_int4_a0"]["exposure"] = _iv(3.0, 2.5, 3.5)
    md = _md(ranking_blocks(_result([_rank("a", 4, 1.5), _rank("b", 4, 3.0)], figs), "0"))
    assert "do not overlap" in md
    md = _md(ranking_blocks(_result([_rank("a", 5, 1.5), _rank("b", 4, 1.6)], figs), "0"))
    assert "**tie**" not in md and "| a | yes | yes | yes | yes | yes | 5/5 |" in md


def _eval(blocks: list[float], expos: list[float], group: str = "reference", **extra: object) -> dict:
    return {"group": group, **extra, "metrics": {"block_nll_general": blocks, "block_nll_domain": blocks,
                                                 "per_canary": [{"exposure": e} for e in expos]}}


def test_a_method_row_equal_to_its_reference_is_called_by_construction() -> None:
    ref = _eval([1.0, 2.0], [1.0, 1.5])
    evals = {"retrain_masked_int4": ref,
             "tp_int4_a0": _eval([1.0, 2.0], [1.0, 1.5], "method", alpha=0.0, base="int4"),
             "ogd_int4_a0": _eval([1.0, 2.0], [1.0, 1.6], "method", alpha=0.0, base="int4")}  # one canary differs
    md = _md(construction_blocks(_result([], {}, evals), "0"))
    assert "`tp_int4_a0` is bit-identical to `retrain_masked_int4`" in md and "ogd_int4_a0" not in md


def _noisy(method: str, k: int, expo: dict, ref: dict) -> dict:
    return {"noise": 0.25, "method": method, "alpha": 0.0,
            "unlabelled": {"extraction": {"k": k, "n": 25}, "exposure": expo},
            "unlabelled_reference": {"exposure": ref}}


def test_label_noise_verdict_reads_the_direction_from_the_intervals() -> None:
    ref = _iv(1.4, 0.9, 1.9)
    rows = {"tp": _noisy("two-phase", 18, _iv(9.6, 9.2, 9.9), ref), "o": _noisy("ogd", 0, _iv(4.3, 3.4, 5.3), ref)}
    md = _md(label_noise_verdict(_result([_rank("ogd", 4, 1.5)], {}, label_noise=rows), "0"))
    assert "ogd's unlabelled members leak less than two-phase's (0/25 vs 18/25 extracted" in md
    assert "it is above its interval" in md
    rows["o"] = _noisy("ogd", 20, _iv(9.5, 9.0, 9.8), ref)
    md = _md(label_noise_verdict(_result([_rank("ogd", 4, 1.5)], {}, label_noise=rows), "0"))
    assert "not separable from two-phase's" in md


def test_missing_rows_are_listed_from_the_config_and_vanish_once_recorded() -> None:
    cfg = {"label_noise": [0.5], "unlearning": ["npo"], "relearn_steps": 20, "full_precision_rows": True}
    ranking = [_rank("ogd", 4, 1.5), _rank("mask", 2, 1.7)]
    md = _md(missing_blocks(_result(ranking, {}, {}, cfg), "0"))
    for part in ("ogd at 50% unlabelled", "mask at 50% unlabelled", "npo (swept, then INT4)",
                 "relearning attack on ogd (public+half)", "relearning attack on retrain_masked (public)",
                 "full-precision-base rows of ogd, mask"):
        assert part in md
    relearn = [f"relearn_{t}_{d}" for t in ("ogd", "retrain_masked") for d in ("public", "public+half")]
    switch = [f"{m}_int4_a{a}" for m in ("ogd", "mask") for a in (0, 1)]
    done = {n: {} for n in ("ogd@0.5_int4_a0", "mask@0.5_int4_a0", "npo_int4", "ogd_fp_a0", "mask_fp_a0", *relearn,
                            *switch)}
    assert missing_blocks(_result(ranking, {}, done, cfg), "0") == []
    # a method's own INT4 switch rows are asked for too
    md = _md(missing_blocks(_result(ranking, {}, {k: v for k, v in done.items() if k != "mask_int4_a1"}, cfg), "0"))
    assert "mask INT4 at alpha = 1" in md and "ogd INT4" not in md
    # the confirmation attacks every method of the run (fixed beforehand), not this seed's top-ranked one
    conf = _result(ranking, {}, done, {**cfg, "stage": "confirmation"})
    assert "relearning attack on mask (public)" in _md(missing_blocks(conf, "0"))
    # a stage that leaves the FP-base rows to another run says so, without calling itself partial
    md = _md(missing_blocks(_result(ranking, {}, done, {**cfg, "full_precision_rows": False}), "0"))
    assert "Not measured yet" not in md and "Not in this run's config: every method with a full-precision" in md


def test_setup_asymmetries_name_the_short_retrain_and_unequal_memory_rates() -> None:
    cfg = {"method_overrides": {"ogd": {"memory_lr_scale": 10.0}}}
    stages = {"ft": {"steps": 161}, "retrain_dropped": {"steps": 16}}
    blocks = setup_asymmetry_blocks(_result([_rank("ogd", 4, 1.5), _rank("mask", 2, 1.7)], {}, cfg=cfg,
                                            stages=stages), "0")
    assert len(blocks) == 1 and isinstance(blocks[0], Para) and not isinstance(blocks[0], Table)
    md = _md(blocks)
    assert "trains 16 steps" in md and "against 161" in md and "ogd 10x, mask 1x" in md
    assert setup_asymmetry_blocks(_result([_rank("ogd", 4, 1.5)], {}, stages={"ft": {"steps": 5}}), "0") == []
