"""Dual DP, DP-SGD arms end to end on the tiny model: arms, accounting, cache, report."""

from pathlib import Path

import pytest

from libortho.experiments.dual_dp_sgd import DPSGDSweepConfig, run_dpsgd_sweep
from libortho.report.dual_dp_sgd import goal_check, readme_lines, render_dpsgd_report
from libortho.train.loop import TrainConfig

TINY = {"public_blocks": 16, "canaries_per_kind": 1, "pretrain_blocks": 32, "calib_blocks": 4,
        "pretrain": TrainConfig(lr=2e-3, steps=2, batch_size=8), "finetune": TrainConfig(lr=3e-3, steps=2)}


def test_config_refusals() -> None:
    with pytest.raises(ValueError, match="unknown DP arms"):
        DPSGDSweepConfig(arms=("noise",))
    with pytest.raises(ValueError, match="eps"):
        DPSGDSweepConfig(eps=(0.0,))
    assert DPSGDSweepConfig(eps=(2.0,), arms=("memory", "full")).points() == [
        ("memory", 2.0), ("memory", None), ("full", 2.0), ("full", None)]


def test_sweep_end_to_end(tmp_path: Path) -> None:
    cfg = DPSGDSweepConfig(eps=(4.0,), steps=3, expected_batch=4, memory_neurons=4, kill_switch=TINY)
    r = run_dpsgd_sweep(cfg, tmp_path, progress=False)
    pts = r["points"]
    assert list(pts) == ["ft", "public", "memory:4", "memory:inf", "public_then_private:4",
                         "public_then_private:inf", "full:4", "full:inf"]
    n_priv, n_pub = r["data"]["private_rows"], r["data"]["public_rows"]
    for key in ("memory:4", "public_then_private:4"):
        assert pts[key]["dp"]["rows"] == n_priv and pts[key]["dp"]["delta"] == pytest.approx(1 / (10 * n_priv))
        assert pts[key]["dp"]["eps"] <= 4.0 + 1e-6
    assert pts["full:4"]["dp"]["rows"] == n_priv + n_pub
    assert pts["memory:4"]["dp"]["trained_params"] < pts["public_then_private:4"]["dp"]["trained_params"]
    assert pts["memory:inf"]["dp"]["sigma"] == 0 and pts["memory:inf"]["group_privacy"] == {}
    k = max(c["repeats"] for c in r["data"]["canaries"] if c["member"])
    g = pts["memory:4"]["group_privacy"][str(k)]
    assert g["eps"] == pytest.approx(k * pts["memory:4"]["dp"]["eps"])
    again = run_dpsgd_sweep(cfg, tmp_path, progress=False)  # every point cached
    assert again["points"] == pts
    assert goal_check(r)["levels"] >= 0
    text = render_dpsgd_report(tmp_path / "result.json")["markdown"].read_text()
    assert "DP-SGD on memory neurons only" in text and "Goal" in text and "curves.png" in text
    (line,) = readme_lines(r, "docs/x.md")
    assert "eps 4: memory" in line and "full" in line and ("met" in line or "missed" in line)
    pub = pts["public"]["metrics"]["ppl_domain"]
    assert f"the public fine-tune alone: domain PPL {pub:.2f}" in line
    # every point keeps per-block NLLs, so the equal-epsilon gaps carry paired intervals
    assert all(len(p["metrics"]["block_nll_domain"]) > 1 for p in pts.values())
    assert "carry no interval" not in line and "eps 4 full" in line and "of 2 comparisons" in line


def _pt(arm: str, eps: float | None, ppl: float, exposures: tuple[float, ...]) -> dict:
    mean = sum(exposures) / len(exposures)
    return {"arm": arm, "eps": eps, "metrics": {"ppl_domain": ppl, "exposure": {"mean": mean},
                                               "per_canary": [{"exposure": e} for e in exposures]}}


def test_equal_eps_names_the_arm_with_the_lowest_domain_ppl_per_budget() -> None:
    from libortho.report.dual_dp_sgd import equal_eps

    pts = [_pt("memory", 1.0, 6.0, (1.0, 2.0)), _pt("full", 1.0, 8.0, (1.0, 1.0)),
           _pt("memory", 4.0, 9.0, (2.0, 4.0)), _pt("full", 4.0, 7.0, (3.0, 3.0)),
           _pt("memory", None, 5.0, (9.0, 9.0)), _pt("full", None, 4.0, (9.0, 9.0))]  # no DP: not a budget
    result = {"config": {"arms": ["memory", "full"], "eps": [1.0, 4.0]},
              "points": {f"{p['arm']}:{p['eps']}": p for p in pts}}
    rows = equal_eps(result)
    assert [(r["eps"], r["best"]) for r in rows] == [(1.0, "memory"), (4.0, "full")]
    assert rows[1]["arms"]["memory"]["exposure"].estimate == pytest.approx(3.0)
    assert rows[0]["arms"]["full"]["exposure"].low == rows[0]["arms"]["full"]["exposure"].high == 1.0


def test_report_names_the_target_that_reproduces_it() -> None:
    from libortho.report.dual_dp_sgd import command

    assert command({"config": {"model": "tiny"}}) == "make dual-dp-sgd"
    assert command({"config": {"model": "smollm2-135m"}}) == "make dual-dp-sgd-smollm2"


def test_gap_line_counts_significant_gaps_in_both_directions() -> None:
    from libortho.report.dual_dp_sgd import equal_eps, gap_line

    def with_blocks(p: dict, nll: list[float]) -> dict:
        p["metrics"]["block_nll_domain"] = nll
        return p

    mem = [1.0, 1.1, 0.9, 1.0]
    pts = [with_blocks(_pt("memory", 1.0, 2.7, (1.0, 2.0)), mem),
           with_blocks(_pt("full", 1.0, 7.4, (1.0, 1.0)), [x + 1.0 for x in mem]),        # worse on every block
           with_blocks(_pt("public_then_private", 1.0, 1.0, (1.0, 1.0)), [x - 1.0 for x in mem])]  # better
    result = {"config": {"arms": ["memory", "full", "public_then_private"], "eps": [1.0]},
              "points": {p["arm"]: p for p in pts}}
    line = gap_line(equal_eps(result))
    assert "significantly better in 1 and significantly worse in 1 of 2 comparisons" in line
    assert "eps 1 full +" in line and "eps 1 public_then_private -" in line
    del pts[1]["metrics"]["block_nll_domain"]
    assert "of 1 comparisons" in gap_line(equal_eps(result))
