"""The geometry table (seeds' table 1 on the kill-switch benchmark) end to end on a micro configuration."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from libortho.experiments.config import KillSwitchConfig, preset
from libortho.experiments.geometry_rows import kfac_memory_of_update, minus_memory
from libortho.experiments.geometry_table import (
    RESULT_FILE,
    GeometryTableConfig,
    choose_rank,
    halves,
    run_geometry_table,
)
from test_kill_switch import MICRO


def micro() -> GeometryTableConfig:
    bench = KillSwitchConfig.from_dict({**preset("tiny").to_dict(), **MICRO})
    return GeometryTableConfig(bench=bench, ranks=(1, 2), int4_ranks=(1,), kfac_ranks=(1,), lmc_points=3,
                               lmc_blocks=1, n_boot=50, slq_probes=2, slq_steps=6, slq_blocks=1)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("gt")
    return out, run_geometry_table(micro(), out, progress=False)


def test_every_row_and_diagnostic_is_recorded(table) -> None:
    out, res = table
    rows = res["rows"]
    for name in ("pre", "ft", "retrain", "retrain_int4", "v1_obs_a1", "v1_diag_a1", "v1_a0", "v2_kfac_a1", "tv_r1",
                 "tv_r2", "tv_r1_int4", "kfac_r1", "kfac_r1_int4"):
        assert name in rows, name
        assert len(rows[name]["metrics"]["per_canary"]) == len(res["data"]["canaries"]) // 2
    assert rows["v1_a0"]["cost"]["obs_equals_diag_at_alpha0"] is True
    assert rows["v2_kfac_a1"]["cost"]["alpha0_equals_v1_base"] is True  # v2's switch-off row is v1's
    ctl = res["choice"]["control_rank"]
    assert f"tv_r{ctl}_restpre" in rows
    a, b = res["choice"]["halves"]["a"], res["choice"]["halves"]["b"]
    assert sorted(a + b) == list(range(len(rows["ft"]["metrics"]["per_canary"]))) and not set(a) & set(b)
    eta = res["eta"]["updates"]
    assert set(eta) >= {"ft", "retrain", "tv_low", "tv_high", "kfac_r1"}
    for u in eta.values():
        assert 0.0 <= u["eta"] <= 1.0 + 1e-9 and 0.0 < u["random_baseline"] <= 1.0
    pairs = res["lmc"]["pairs"]
    for pair in pairs.values():
        for text in ("public", "private"):
            assert len(pair[text]["losses"]) == 3 and pair[text]["barrier"] >= 0.0
    for text in ("public", "private"):  # pairs that share an end model start from the same loss
        assert pairs["ft~tv_a0"][text]["losses"][0] == pairs["ft~retrain"][text]["losses"][0]
        assert pairs["tv_a0~retrain"][text]["losses"][-1] == pairs["ft~retrain"][text]["losses"][-1]
    # the fine-tuned model fits its records better than the retrained one (loss on record tokens only)
    assert pairs["ft~retrain"]["private"]["losses"][0] < pairs["ft~retrain"]["private"]["losses"][-1]
    hess = res["hessian"]["models"]
    assert set(hess) == {"pre", "ft", "tv_a0", "retrain"}
    for per in hess.values():
        for text in ("public", "private"):
            h = per[text]
            assert len(h["nodes"]) == 2 and len(h["nodes"][0]) == 6
            assert h["lambda_max"] >= h["mean_eigenvalue"]
            for d in ("tau", "tau_low", "tau_high"):
                assert 0.0 <= h["directions"][d]["mass_above"] <= 1.0
    saved = json.loads((out / RESULT_FILE).read_text())
    assert saved["rows"].keys() == rows.keys()


def test_rerun_reads_every_row_from_the_cache(table) -> None:
    out, res = table
    again = run_geometry_table(micro(), out, progress=False)
    assert again["rows"] == res["rows"] and again["lmc"] == res["lmc"] and again["eta"] == res["eta"]
    assert again["stages"]["finetune"]["reused"] and again["hessian"] == res["hessian"]


def test_halves_are_balanced_per_stratum() -> None:
    ms = [SimpleNamespace(kind=k, repeats=r) for k in ("a", "b") for r in (1, 4) for _ in range(3)]
    a, b = halves(ms)
    assert len(a) == len(b) == 6
    for k in ("a", "b"):
        for r in (1, 4):
            na = sum(1 for i in a if (ms[i].kind, ms[i].repeats) == (k, r))
            assert na in (1, 2)


def test_halves_split_every_repeat_count_and_every_kind_on_the_benchmark_design() -> None:
    """6 kinds x 4 canaries seen 1, 4, 16, 1 times: each half gets 3 of the 16x canaries, 3 of the 4x, 6 of
    the 1x, and 2 of every kind (a split that dealt by kind first gave half B every 16x canary)."""
    kinds = ("id", "phone", "email", "password", "card", "digits")
    ms = [SimpleNamespace(kind=k, repeats=r) for k in kinds for r in (1, 4, 16, 1)]
    a, b = halves(ms)
    for half in (a, b):
        assert len(half) == 12
        for r, n in ((1, 6), (4, 3), (16, 3)):
            assert sum(1 for i in half if ms[i].repeats == r) == n, (r, half)
        for k in kinds:
            assert sum(1 for i in half if ms[i].kind == k) == 2, k
            assert sum(1 for i in half if ms[i].kind == k and ms[i].repeats == 1) == 1, k


def test_choose_rank_reads_half_a_and_both_goals() -> None:
    rows = {"tv_r1": {"rank": 1, "skill": 0.5, "half_a": {"exposure": 1.0}},
            "tv_r4": {"rank": 4, "skill": 0.95, "half_a": {"exposure": 2.4}},
            "tv_r8": {"rank": 8, "skill": 0.97, "half_a": {"exposure": 2.6}}}
    assert choose_rank(rows, 1.5, 0.9, 1.0)["chosen"] == "tv_r4"  # r8 misses exposure, r1 misses skill
    ok = choose_rank(rows, 1.5, 0.9, 1.0)
    assert ok["exposure_ok"] == ["tv_r1", "tv_r4"] and ok["skill_ok"] == ["tv_r4", "tv_r8"]  # each goal alone
    rows["tv_r2"] = {"rank": 2, "skill": 0.95, "half_a": {"exposure": 2.0}}
    assert choose_rank(rows, 1.5, 0.9, 1.0)["chosen"] == "tv_r2"  # same skill as r4: the lower rank
    del rows["tv_r2"]
    none = choose_rank(rows, 0.5, 0.9, 1.0)
    assert none["chosen"] is None and none["exposure_ok"] == ["tv_r1"] and none["skill_ok"] == ["tv_r4", "tv_r8"]


def test_kfac_memory_of_update_at_full_rank_removes_the_whole_update() -> None:
    """At full rank the K-FAC best rank-r part of an update is the update itself, so W_ft - M = W_pre."""
    from libortho.curvature.kfac import KFACFactors

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4, bias=False)
    pre_w = lin.weight.detach().clone()
    tau = {"lin": 0.1 * torch.randn(4, 6, dtype=torch.float64)}
    with torch.no_grad():
        lin.weight += tau["lin"].float()
    a, g = torch.randn(50, 6, dtype=torch.float64), torch.randn(50, 4, dtype=torch.float64)
    f = KFACFactors(A=a.T @ a / 50, G=g.T @ g / 50, n_tokens=50, n_examples=50).eigen()
    model = torch.nn.Sequential()
    model.add_module("lin", lin)
    mem = kfac_memory_of_update(tau, {"lin": f}, rank=4, damp=0.1)
    off = minus_memory(model, mem)
    torch.testing.assert_close(off.lin.weight, pre_w, atol=1e-5, rtol=0)
    part = kfac_memory_of_update(tau, {"lin": f}, rank=1, damp=0.1)["lin"].to_dense(torch.float64)
    s = torch.linalg.svdvals(part)
    assert s[1] < 1e-5 * s[0]  # rank 1 (up to the fp32 storage)


def test_config_is_checked_before_any_work() -> None:
    with pytest.raises(ValueError, match="ranks"):
        replace(micro(), ranks=(0,)).check()
    with pytest.raises(ValueError, match="kfac_fisher"):
        replace(micro(), kfac_fisher="fake").check()
    with pytest.raises(ValueError, match="slq_steps"):
        replace(micro(), slq_steps=1).check()
    with pytest.raises(ValueError, match="kfac_ranks is empty"):
        replace(micro(), kfac_ranks=()).check()
    with pytest.raises(ValueError, match="kfac_damp"):
        replace(micro(), kfac_damp=0.0).check()
    with pytest.raises(ValueError, match="eta_energy"):
        replace(micro(), eta_energy=1.5).check()


def test_config_file_overrides_the_benchmark_too(tmp_path) -> None:
    from libortho.experiments.geometry_table import config_from_file

    p = tmp_path / "c.json"
    p.write_text(json.dumps({"ranks": [3], "bench": {"seed": 7}}))
    cfg = config_from_file(p, "tiny")
    assert cfg.ranks == (3,) and cfg.bench.seed == 7 and cfg.bench.model == "tiny"
    p.write_text(json.dumps({"rank": [3]}))
    with pytest.raises(ValueError, match="unknown geometry-table config fields: rank"):
        config_from_file(p, "tiny")


def test_hessian_stage_is_skipped_with_a_reason_above_the_size_limit(tmp_path, table) -> None:
    """A model above slq_max_params gets a recorded reason, not a silent gap (every other row from the cache)."""
    out, res = table
    big = run_geometry_table(replace(micro(), slq_max_params=10), out, progress=False)
    assert "slq_max_params" in big["hessian"]["skipped"]
    assert big["rows"] == res["rows"]
    # a changed setting re-measures the stage it keys (and only that one)
    more = run_geometry_table(replace(micro(), slq_probes=3), out, progress=False)
    assert len(more["hessian"]["models"]["ft"]["private"]["nodes"]) == 3
    assert more["rows"] == res["rows"] and more["lmc"] == res["lmc"]


def test_report_renders_from_the_json_alone(table, tmp_path) -> None:
    from libortho.report.geometry import render_geometry_report

    out, res = table
    paths = render_geometry_report(out / RESULT_FILE, tmp_path / "rep")
    md = paths["markdown"].read_text()
    assert "Table 1" in md and "half B" in md and "Linear mode connectivity" in md
    for png in ("split_rank.png", "lmc.png", "eta_per_layer.png", "tau_spectra.png"):
        assert (tmp_path / "rep" / "figures" / png).stat().st_size > 1000
    assert "left out" in md  # no separation results given: said so, not silently dropped
    sep = tmp_path / "sep" / "seed3" / "evals"
    sep.mkdir(parents=True)
    for name in ("pre", "ft_fp", "two-phase_int4_a0"):  # a separation run's recorded rows, here the table's own
        src = {"pre": "pre", "ft_fp": "ft", "two-phase_int4_a0": "v1_a0"}[name]
        (sep / f"{name}.json").write_text(json.dumps({"entry": {"metrics": res["rows"][src]["metrics"]}}))
    md = render_geometry_report(out / RESULT_FILE, tmp_path / "rep2", separation_dir=tmp_path / "sep")[
        "markdown"].read_text()
    assert "seed3" in md and "two-phase INT4, alpha=0" in md and "left out" not in md
    with pytest.raises(ValueError, match="not a geometry-table result"):
        bad = tmp_path / "bad.json"
        bad.write_text('{"experiment": "kill_switch"}')
        render_geometry_report(bad)
