"""The census experiment end to end on the tiny model (small data, short training): groups, cache, report."""

import json
from pathlib import Path

import pytest

from libortho.experiments.census import CensusConfig, run_census
from libortho.report.census import claims, feature_correlations, render_census_report
from libortho.train.loop import TrainConfig

SMALL = {"public_blocks": 16, "members": 6, "nonmembers": 12, "repeats": 4, "pretrain_blocks": 64,
         "pretrain": TrainConfig(lr=2e-3, steps=4, batch_size=8), "finetune": TrainConfig(lr=3e-3, steps=6)}


def _cfg() -> CensusConfig:
    return CensusConfig(model="tiny", blocks=(0,), n_random=3, group_entries=8, n_ppl_blocks=2, n_nonmembers=8,
                        separation=SMALL)


@pytest.fixture(scope="module")
def census_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("census")
    return out, run_census(_cfg(), out, progress=False)


def test_groups_measured_labelled_and_mapped(census_run) -> None:
    out, r = census_run
    kinds = [x["kind"] for x in r["records"]]
    assert kinds.count("random") == 3 and len(kinds) == 2 * 3 + 3  # 2 sites x 3 kinds + the null
    chans = [x for x in r["records"] if x["kind"] == "channel"]
    assert all(x["size"] == 8 for x in r["records"])  # every kind the null's size: like compared with like
    assert len(chans) == 2
    assert len(r["labels"]["seed"]) == len(r["labels"]["null"]) == 6 and len(r["map"]["xy"]) == 6
    assert set(r["thresholds"]) == {"seed", "null"}
    for x in r["records"]:
        assert set(x["delta_auc_all"]) >= {"loss", "reference"} and x["delta_auc"] == x["delta_auc_all"]["reference"]
    assert json.loads((out / "result.json").read_text())["experiment"] == "census"


def test_a_second_run_measures_nothing_again(census_run) -> None:
    out, r = census_run
    before = (out / "groups.json").stat().st_mtime_ns
    again = run_census(_cfg(), out, progress=False)
    assert (out / "groups.json").stat().st_mtime_ns == before
    assert [x["delta_ppl"] for x in again["records"]] == [x["delta_ppl"] for x in r["records"]]


def test_report_and_claims(census_run, tmp_path: Path) -> None:
    out, r = census_run
    cl = claims(r)
    assert len(cl) == 6 and all(c["holds"] in (True, False, None) for c in cl)
    paths = render_census_report(out / "result.json", tmp_path)
    text = paths["markdown"].read_text()
    assert "Claims and measurements" in text and "Resolution: the AUC compares" in text
    assert (tmp_path / "figures" / "map.png").stat().st_size > 0
    corr = {c["feature"]: c for c in feature_correlations(r)}
    assert set(corr) == {"magnitude", "curvature", "alignment", "kurtosis"}
    planted = {**r, "records": [{**x, "magnitude": x["delta_ppl"]} for x in r["records"]]}  # monotone in dPPL
    assert feature_correlations(planted)[0]["delta_ppl"][0] == pytest.approx(1.0)


def test_config_refusals() -> None:
    for fields, msg in (({"kinds": ["loud"]}, "unknown outlier kinds"), ({"attack": "guess"}, "unknown attack"),
                        ({"n_random": 1}, "n_random must be >= 2"), ({"blocks": ()}, "at least one block")):
        with pytest.raises(ValueError, match=msg):
            CensusConfig(**fields)
