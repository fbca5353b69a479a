"""The lattice experiment end to end on the tiny model: stages, cache, claims recomputed, CLI, refusals."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from libortho.cli import app
from libortho.experiments.lattice import LatticeConfig, run_lattice
from libortho.report.lattice import claims, render_lattice_report

TINY = {"bits": [4], "n_calib": 8, "n_eval": 4, "seq_len": 64, "group_size": 16, "lll_dims": [16, 32],
        "layers": ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]}


@pytest.fixture(scope="module")
def lattice_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lattice")
    return out, run_lattice(LatticeConfig(model="tiny", **TINY), out, progress=False)


def test_every_stage_is_there_and_babai_matches_gptq_on_real_layers(lattice_run) -> None:
    out, r = lattice_run
    assert set(r["runs"]) == {"b4-natural", "b4-act", "b4-min_pivot"}
    for run in r["runs"].values():
        names = [n for s in run["stages"] for n in s["layers"]]
        assert len(names) == len(set(names)) == 2 * 7  # every linear of both blocks, once
        assert all(s["error"] > 0 and s["bound"] > 0 for s in run["stages"])
        assert len(run["alpha0"]["block_nll"]) == 4
    for v in r["babai"].values():
        assert v["relative_difference"] <= 1e-6 and v["gptq_clipped"] == v["babai_clipped"]
        assert v["unclipped_rows_within_bound"] == 1.0
    for per in r["lll"].values():
        assert set(per) == {"16", "32"}
        for b in per.values():
            assert len(b["gs_before"]) == b["dim"] and b["error_before"] <= b["bound_before"]
    assert len(r["ppl_comparisons"]) == 3
    (rep,) = r["calib_replicates"].values()  # the default: act and min-pivot again on calibration draw 1
    assert set(rep["runs"]) == {"b4-act", "b4-min_pivot"} and len(rep["ppl_comparisons"]) == 1
    # another calibration set gives another quantized model: the replicate is not the main run read twice
    assert rep["runs"]["b4-act"]["alpha0"]["block_nll"] != r["runs"]["b4-act"]["alpha0"]["block_nll"]
    assert (out / "quant-b4-min_pivot-calib1.json").is_file()
    assert json.loads((out / "result.json").read_text())["experiment"] == "lattice"


def test_a_second_run_reuses_every_stage(lattice_run, capsys) -> None:
    out, r = lattice_run
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json") if p.name != "result.json"}
    again = run_lattice(LatticeConfig(model="tiny", **TINY), out, progress=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json") if p.name != "result.json"} == stamps
    assert "cached" in capsys.readouterr().out
    assert again["runs"]["b4-act"]["alpha0"]["ppl"] == r["runs"]["b4-act"]["alpha0"]["ppl"]


def test_claims_are_recomputed_from_the_figures(lattice_run) -> None:
    _, r = lattice_run
    assert claims(r)[0]["holds"] is True
    broken = json.loads(json.dumps(r))
    next(iter(broken["babai"].values()))["relative_difference"] = 1e-3
    assert claims(broken)[0]["holds"] is False
    order = [c for c in claims(broken) if "min-pivot order beats act" in c["claim"]][0]
    comp = [c for c in broken["ppl_comparisons"] if c["a"] == "act" and c["b"] == "min_pivot"][0]
    assert order["holds"] == (comp["low"] > 0)
    rep = [c for c in claims(broken) if "calibration draw 1" in c["claim"]]
    assert len(rep) == 1 and "min-pivot order beats act" in rep[0]["claim"]
    broken["calib_replicates"]["1"]["ppl_comparisons"][0].update(diff=2.0, low=1.0, high=3.0)
    assert [c for c in claims(broken) if "calibration draw 1" in c["claim"]][0]["holds"] is True
    from libortho.report.lattice import replicate_verdict

    comp.update(diff=2.0, low=1.0, high=3.0)  # draw 0 agrees with draw 1
    assert "the same significant ranking on every draw" in replicate_verdict(broken)
    comp.update(diff=-2.0, low=-3.0, high=-1.0)
    assert "significant rankings in opposite directions" in replicate_verdict(broken)
    comp.update(diff=0.5, low=-1.0, high=2.0)
    assert "no ranking that holds on every draw" in replicate_verdict(broken)


def test_report_renders_markdown_html_and_figures(lattice_run, tmp_path: Path) -> None:
    out, _ = lattice_run
    paths = render_lattice_report(out / "result.json", tmp_path)
    md = paths["markdown"].read_text()
    assert "Claims and measurements" in md and "min-pivot" in md and "LLL on Hessian blocks" in md
    assert "The order comparison on another calibration draw" in md
    assert (tmp_path / "figures" / "bound.png").stat().st_size > 0
    assert (tmp_path / "figures" / "profiles.png").stat().st_size > 0
    assert paths["html"].read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("fields,message", [
    ({"orders": ["natural", "random"]}, "unknown column order"),
    ({"lll_dims": [512]}, "lll_dims must lie in"),
    ({"bits": [5]}, "bits must be one of"),
    ({"lll_delta": 0.1}, "lll_delta must be in"),
    ({"replicate_calib_seeds": [0]}, "not 0"),
    ({"replicate_orders": ["act"]}, "at least two orders"),
    ({"replicate_orders": ["act", "best"]}, "unknown column order"),
])
def test_config_refuses_bad_values(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        LatticeConfig(model="tiny", **fields)


def test_cli_refuses_unknown_fields_and_foreign_layers_before_any_work(tmp_path: Path) -> None:
    runner = CliRunner()
    (tmp_path / "c.json").write_text(json.dumps({"n_calib": 2, "colour": 1}))
    res = runner.invoke(app, ["experiment", "lattice", "--model", "tiny", "--out", str(tmp_path / "o"),
                              "--config", str(tmp_path / "c.json")])
    assert res.exit_code != 0 and "unknown LatticeConfig field(s) ['colour']" in res.output
    (tmp_path / "c.json").write_text(json.dumps({"layers": ["model.layers.0.mlp", "model.layers.9.q"]}))
    res = runner.invoke(app, ["experiment", "lattice", "--model", "tiny", "--out", str(tmp_path / "o"),
                              "--config", str(tmp_path / "c.json")])
    assert res.exit_code != 0 and "are not linear layers" in res.output
    assert not list((tmp_path / "o").glob("*.json"))  # nothing computed, nothing written


def test_stage_error_is_the_whole_stacked_matrix_error_under_the_damped_hessian() -> None:
    import torch

    from libortho.config import DecomposeConfig, QuantConfig
    from libortho.curvature.damping import damped
    from libortho.experiments.lattice import stage_rows
    from libortho.models import load_model
    from libortho.pipeline import decompose

    model, _ = load_model("tiny")
    calib = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    res = decompose(model, calib, DecomposeConfig(quant=QuantConfig(group_size=16, grid="minmax", act_order=False),
                                                  ortho=False), keep_records=True, progress=False, max_blocks=1)
    rows = stage_rows(res.records)
    assert sorted(len(r["layers"]) for r in rows) == [1, 1, 2, 3]  # o, down; gate+up; q+k+v
    for r in rows:
        H = damped(res.records[r["layers"][0]].hessian.double(), res.records[r["layers"][0]].quant_info["damp"])
        direct = 0.0
        for n in r["layers"]:
            E = res.records[n].base.dequantize(torch.float64) - res.records[n].weight.double()
            direct += float(((E @ H) * E).sum())
        assert r["error"] == pytest.approx(direct, rel=1e-3)


def test_saved_layer_inputs_follow_the_calibration(tmp_path: Path) -> None:
    """W and H saved for the Babai and LLL stages are made again when what they depend on changes."""
    small = {**TINY, "orders": ["natural"], "lll_dims": [8]}
    run_lattice(LatticeConfig(model="tiny", **small), tmp_path, progress=False)
    first = (tmp_path / "lattice_inputs.pt").stat().st_mtime_ns
    run_lattice(LatticeConfig(model="tiny", **small), tmp_path, progress=False)
    assert (tmp_path / "lattice_inputs.pt").stat().st_mtime_ns == first  # same configuration: reused
    r = run_lattice(LatticeConfig(model="tiny", **{**small, "n_calib": 6}), tmp_path, progress=False)
    assert (tmp_path / "lattice_inputs.pt").stat().st_mtime_ns != first  # another calibration: made again
    assert json.loads((tmp_path / "lattice_inputs.json").read_text())["n_calib"] == 6
    assert all(v["relative_difference"] <= 1e-6 for v in r["babai"].values())
