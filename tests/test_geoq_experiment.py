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
    assert names == ["uniform-int4", "uniform-int3", "geo-update-n0", "geo-update-n2-s0", "geo-update-n2-s1",
                     "geo-random-n0-s0", "geo-random-n0-s1", "geo-random-n2-s0", "geo-random-n2-s1"]


def test_geoq_end_to_end(tmp_path: Path) -> None:
    cfg = GeoQuantConfig(model="tiny", noises=(1.0,), sensitivities=("update", "random"), kill_switch=TINY)
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
