"""Dual DP, noise arm: where the noise goes and how large it is; the sweep end to end on the tiny model."""

from pathlib import Path

import pytest
import torch

from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
from libortho.experiments.dual_dp import NoiseSweepConfig, effective_parts, noisy_model, run_noise_sweep
from libortho.models import load_model
from libortho.pipeline import decompose
from libortho.report.dual_dp import readme_lines
from libortho.train.loop import TrainConfig


@pytest.fixture(scope="module")
def parts():
    ft, _ = load_model("tiny")
    dec, _ = load_model("tiny")
    calib = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    decompose(dec, calib, DecomposeConfig(quant=QuantConfig(group_size=16), select=SelectConfig(rho=0.05)),
              progress=False)
    return ft, effective_parts(dec)


def test_no_noise_gives_the_effective_weights(parts) -> None:
    ft, p = parts
    m = noisy_model(ft, p, "none", 0.0, 0)
    for name, (Q, O) in p.items():
        torch.testing.assert_close(m.get_submodule(name).weight, Q + O, rtol=0, atol=0)
    assert not torch.equal(m.get_submodule(name).weight, ft.get_submodule(name).weight)  # ft itself untouched


def test_ortho_noise_stays_on_the_support_at_its_scale(parts) -> None:
    ft, p = parts
    m = noisy_model(ft, p, "ortho", 2.0, 0)
    for name, (Q, O) in p.items():
        d = m.get_submodule(name).weight - (Q + O)
        support = O != 0
        assert bool((d[~support] == 0).all()) and int((d[support] != 0).sum()) == int(support.sum())
        rms_o = float(O[support].pow(2).mean().sqrt())
        assert float(d[support].pow(2).mean().sqrt()) == pytest.approx(2.0 * rms_o, rel=0.25)


def test_all_noise_touches_every_entry_at_its_scale(parts) -> None:
    ft, p = parts
    m = noisy_model(ft, p, "all", 0.1, 0)
    for name, (Q, O) in p.items():
        W = Q + O
        d = m.get_submodule(name).weight - W
        assert bool((d != 0).all())
        assert float(d.pow(2).mean().sqrt()) == pytest.approx(0.1 * float(W.pow(2).mean().sqrt()), rel=0.1)
    with pytest.raises(ValueError, match="unknown noise arm"):
        noisy_model(ft, p, "half", 1.0, 0)


def test_sweep_end_to_end_and_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive noise scales"):
        NoiseSweepConfig(ortho_sigmas=(0.0,))
    cfg = NoiseSweepConfig(model="tiny", ortho_sigmas=(1.0,), all_sigmas=(0.1,), kill_switch={
        "public_blocks": 16, "canaries_per_kind": 1, "pretrain_blocks": 32, "calib_blocks": 4,
        "pretrain": TrainConfig(lr=2e-3, steps=2, batch_size=8), "finetune": TrainConfig(lr=3e-3, steps=2)})
    r = run_noise_sweep(cfg, tmp_path, progress=False)
    assert list(r["points"]) == ["none:0", "ortho:1", "all:0.1"]
    for pt in r["points"].values():
        assert {"extraction", "exposure", "mia", "ppl_general"} <= set(pt["metrics"])
    again = run_noise_sweep(cfg, tmp_path, progress=False)  # every point cached
    assert again["points"] == r["points"]
    (line,) = readme_lines(r, "docs/x.md")
    assert "docs/x.md" in line and "no (eps, delta) claimed" in line


def test_exposure_interval_resamples_the_canaries() -> None:
    from libortho.report.dual_dp import exposure_interval

    m = {"per_canary": [{"exposure": e} for e in (1.0, 2.0, 3.0, 10.0)]}
    ci = exposure_interval(m)
    assert ci.estimate == pytest.approx(4.0)
    assert 1.0 <= ci.low < 4.0 < ci.high <= 10.0
    same = exposure_interval({"per_canary": [{"exposure": 5.0}] * 4})
    assert same.low == same.high == pytest.approx(5.0)
