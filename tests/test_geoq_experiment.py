"""Geometry-aware randomised quantization end to end on the tiny model: arms, accounting, cache, report."""

import math
from pathlib import Path

import pytest

from libortho.experiments.geoq import GeoQuantConfig, run_geoq
from libortho.report.geoq import comparisons, readme_lines, render_geoq_report
from libortho.train.loop import TrainConfig

TINY = {"public_blocks": 16, "canaries_per_kind": 1, "pretrain_blocks": 32, "calib_blocks": 4,
        "pretrain": TrainConfig(lr=2e-3, steps=2, batch_size=8), "finetune": TrainConfig(lr=3e-3, steps=2)}


def test_config_refuses_bad_knobs() -> None:
    with pytest.raises(ValueError, match="widths"):
        GeoQuantConfig(widths=(4, 4, 5))
    with pytest.raises(ValueError, match="frac"):
        GeoQuantConfig(frac=0.7)
    with pytest.raises(KeyError, match="registered"):
        GeoQuantConfig(sensitivities=("saliency",))
    arms = GeoQuantConfig(noises=(0.0, 2.0), sensitivities=("update", "random"), dither_seeds=(0, 1)).arms()
    names = [a.name for a in arms]
    assert names == ["uniform-int4", "uniform-int3", "geo-update-n0", "geo-update-n2", "geo-update-n2-s1",
                     "geo-random-n0", "geo-random-n0-s1", "geo-random-n2", "geo-random-n2-s1"]


def test_geoq_end_to_end(tmp_path: Path) -> None:
    cfg = GeoQuantConfig(model="tiny", noises=(1.0,), sensitivities=("update", "random"), dither_seeds=(0,),
                         kill_switch=TINY)
    r = run_geoq(cfg, tmp_path, progress=False)
    arms = r["arms"]
    assert list(arms) == ["ft", "pre", "uniform-int4", "uniform-int3", "geo-update-n1", "geo-random-n1"]
    g = r["kill_switch_config"]["quant"]["group_size"]
    base = arms["uniform-int4"]
    assert base["accounting"]["mean_code_bits"] == 4.0 and base["accounting"]["width_bits_per_param"] == 0.0
    assert arms["uniform-int3"]["bits_per_param"] == pytest.approx(base["bits_per_param"] - 1)
    for name in ("geo-update-n1", "geo-random-n1"):
        acct = arms[name]["accounting"]
        assert acct["mean_code_bits"] == pytest.approx(4.0)  # as many INT3 as INT5 regions: equal code bits
        assert arms[name]["bits_per_param"] == pytest.approx(base["bits_per_param"] + math.log2(3) / g)
        assert arms[name]["metrics"]["ppl_general"] != base["metrics"]["ppl_general"]
    assert arms["geo-update-n1"]["metrics"]["ppl_general"] != arms["geo-random-n1"]["metrics"]["ppl_general"]
    again = run_geoq(cfg, tmp_path, progress=False)  # every arm cached
    assert again["arms"] == arms
    comps = comparisons(r)
    assert [c["arm"] for c in comps] == ["geo-update-n1", "geo-random-n1"]
    assert comps[0]["vs_random"] is not None and comps[1]["vs_random"] is None
    paths = render_geoq_report(tmp_path / "result.json")
    text = paths["markdown"].read_text()
    assert "uniform INT4 GPTQ" in text and "regions by update, noise 1" in text and "leak_vs_ppl.png" in text
    (line,) = readme_lines(r, "docs/x.md")
    assert "docs/x.md" in line and f"{base['bits_per_param']:.2f} bits/param" in line and "of 2 arms" in line
    assert "beaten on both leakage and PPL" in line and all(isinstance(c["dominated_by"], list) for c in comps)


def _fake_arm(sens, exposure: float, ppl_nll: float, bits: float, noise: float = 0.0) -> dict:
    return {"sensitivity": sens, "noise": noise, "seed": 0, "bits": 4, "bits_per_param": bits,
            "metrics": {"exposure": {"mean": exposure}, "ppl_general": 2.718281828 ** ppl_nll,
                        "per_canary": [{"exposure": exposure + d, "extracted": False} for d in (-0.5, 0.0, 0.5)],
                        "mia_scores": {"reference": {"members": [1.0, 2.0], "nonmembers": [0.0, 1.5]}},
                        "block_nll_general": [ppl_nll - 0.1, ppl_nll + 0.1],
                        "block_nll_domain": [ppl_nll - 0.1, ppl_nll + 0.1]}}


def test_comparisons_flag_arms_a_uniform_width_beats_on_both_axes() -> None:
    result = {"config": {"widths": [3, 4, 5]}, "arms": {
        "uniform-int4": _fake_arm(None, 9.0, 4.0, 4.5), "uniform-int3": _fake_arm(None, 5.0, 5.0, 3.5),
        "geo-a": _fake_arm("update", 7.0, 5.5, 4.52, 1.0),   # more exposure and PPL than INT3: dominated
        "geo-b": _fake_arm("update", 4.0, 5.5, 4.52, 2.0),   # less exposure than INT3: not dominated
        "geo-c": _fake_arm("random", 7.0, 4.5, 4.52, 1.0)}}  # lower PPL than INT3, less exposure than INT4
    comps = {c["arm"]: c for c in comparisons(result)}
    assert comps["geo-a"]["dominated_by"] == ["uniform-int3"]
    assert comps["geo-b"]["dominated_by"] == [] and comps["geo-c"]["dominated_by"] == []
    assert comps["geo-a"]["vs_random"].estimate == pytest.approx(0.0)  # against geo-c: same noise and seed
    assert comps["geo-b"]["vs_random"] is None  # no random-region arm at noise 2
    assert comps["geo-b"]["d_exposure"].estimate == pytest.approx(-5.0)


def test_seed_spread_pairs_the_seeds_of_one_plan() -> None:
    from libortho.report.geoq import seed_spread

    a, b = _fake_arm("update", 7.0, 5.0, 4.52, 1.0), _fake_arm("update", 5.0, 5.2, 4.52, 1.0)
    b["seed"] = 1
    result = {"config": {"widths": [3, 4, 5], "dither_seeds": [0, 1]}, "arms": {
        "uniform-int4": _fake_arm(None, 9.0, 4.0, 4.5), "geo-update-n1": a, "geo-update-n1-s1": b,
        "geo-update-n2": _fake_arm("update", 3.0, 6.0, 4.52, 2.0)}}  # one seed only: no spread row
    (row,) = seed_spread(result)
    assert (row["sensitivity"], row["noise"], row["seeds"]) == ("update", 1.0, [0, 1])
    assert row["exposure"] == [7.0, 5.0]
    gap = row["max_exposure_gap"]  # seed 0 minus seed 1 on the same canaries: exactly 2 on each
    assert gap.estimate == pytest.approx(2.0) and gap.low == pytest.approx(2.0) and gap.high == pytest.approx(2.0)
    from libortho.report.geoq import spread_sentence

    assert "up to 2.00 bits (regions by update, noise 1)" in spread_sentence([row])
    assert "excludes zero for 1 of 1 plans" in spread_sentence([row])
