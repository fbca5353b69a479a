"""The genius experiment end to end on the tiny model: conditions, cache, verdicts recomputed, CLI refusals."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from libortho.cli import app
from libortho.experiments.genius import GeniusConfig, conditions, run_genius
from libortho.report.genius import claims, render_genius_report, retention, summary

TINY = {"n_items": 14, "n_calib": 4, "seq_len": 64, "pure_bits": [4, 3], "ortho_bits": [3], "rhos": [0.01, 0.05],
        "group_size": 16, "batch_size": 8}


@pytest.fixture(scope="module")
def genius_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("genius")
    return out, run_genius(GeniusConfig(model="tiny", **TINY), out, progress=False)


def test_every_condition_is_scored_on_the_same_items(genius_run) -> None:
    out, r = genius_run
    assert list(r["evals"]) == ["fp32", "int4", "int3", "int3+ortho0.01", "int3+ortho0.05"]
    for name, e in r["evals"].items():
        assert len(e["choice"]) == len(e["exact"]) == len(r["problems"]) == 14
        if name != "fp32":
            assert e["quantized_params"] > 0
    assert "control" in r["evals"]["fp32"]
    bits = {n: r["evals"][n]["total_bits_per_param"] for n in ("int3", "int3+ortho0.01", "int3+ortho0.05")}
    assert bits["int3"] < bits["int3+ortho0.01"] < bits["int3+ortho0.05"]  # the stream costs what it holds
    assert r["evals"]["int3"]["ortho_density"] == 0 and r["evals"]["int3+ortho0.05"]["ortho_density"] > 0.04


def test_a_second_run_decomposes_nothing(genius_run, capsys) -> None:
    out, r = genius_run
    again = run_genius(GeniusConfig(model="tiny", **TINY), out, progress=True)
    log = capsys.readouterr().out
    assert "decompose" not in log and log.count("cached") == 5
    assert again["evals"] == r["evals"]


def test_retention_and_verdicts_follow_the_items(genius_run) -> None:
    _, r = genius_run
    fp = [True] * 8 + [False] * 2
    half = [True] * 4 + [False] * 6
    est, lo, hi = retention(fp, half)
    assert est == pytest.approx(0.5) and lo <= 0.5 <= hi
    assert retention(fp, half, chance=0.25)[0] == pytest.approx((0.4 - 0.25) / (0.8 - 0.25))
    broken = json.loads(json.dumps(r))
    broken["evals"]["int3+ortho0.01"]["choice"] = [False] * 14
    broken["evals"]["fp32"]["choice"] = [True] * 14
    goal = [c for c in claims(broken) if "keeps" in c["claim"]]
    assert len(goal) == 1 and goal[0]["holds"] is False
    assert summary(broken)["fp32"]["choice"]["acc"] == 1.0


def test_report_renders(genius_run, tmp_path: Path) -> None:
    out, _ = genius_run
    paths = render_genius_report(out / "result.json", tmp_path)
    md = paths["markdown"].read_text()
    assert "Claims, goal and measurements" in md and "int3+ortho0.05" in md
    assert (tmp_path / "figures" / "accuracy.png").stat().st_size > 0


def test_conditions_and_refusals(tmp_path: Path) -> None:
    assert [c[0] for c in conditions(GeniusConfig(pure_bits=(3,), ortho_bits=(2,), rhos=(0.02,)))] == \
        ["fp32", "int3", "int2+ortho0.02"]
    for fields, msg in (({"rhos": [0.0]}, "rhos must lie in"), ({"pure_bits": [5]}, "bits must be one of"),
                        ({"families": ["calculus"]}, "unknown problem families"),
                        ({"selector": "obz"}, "selector")):
        with pytest.raises(ValueError, match=msg):
            GeniusConfig(**fields)
    (tmp_path / "c.json").write_text(json.dumps({"n_items": 3, "colour": 1}))
    res = CliRunner().invoke(app, ["experiment", "genius", "--model", "tiny", "--out", str(tmp_path / "o"),
                                   "--config", str(tmp_path / "c.json")])
    assert res.exit_code != 0 and "unknown GeniusConfig field(s) ['colour']" in res.output
    assert not (tmp_path / "o").exists()
