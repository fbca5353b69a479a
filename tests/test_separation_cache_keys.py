"""Cache keys of the separation experiment change whenever the model they stand for changes."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

from libortho.config import QuantConfig
from libortho.experiments.separation_config import base_key, quant_key, separation_preset
from libortho.experiments.separation_controls import relearn_key
from libortho.train.loop import TrainConfig


def _run(cfg):
    return SimpleNamespace(cfg=cfg, seed=0, base_key={"model": cfg.model, "seed": 0})


def test_relearn_key_changes_with_the_target_method_config_and_quantization() -> None:
    cfg = separation_preset("tiny")
    attack = TrainConfig(lr=1e-3, steps=20, warmup=0.0, schedule="constant")
    base = relearn_key(_run(cfg), "mask", "public", attack)
    more = replace(cfg, method_overrides={"mask": {"support_neurons": 128}})
    assert relearn_key(_run(more), "mask", "public", attack) != base
    q3 = replace(cfg, quant=QuantConfig(bits=3, group_size=64, method="gptq"))
    assert relearn_key(_run(q3), "mask", "public", attack) != base
    assert relearn_key(_run(q3), "retrain_masked", "public", attack) != \
        relearn_key(_run(cfg), "retrain_masked", "public", attack)
    assert relearn_key(_run(cfg), "mask", "public", attack) == base
    assert relearn_key(_run(replace(cfg, calib_blocks=cfg.calib_blocks * 2)), "mask", "public", attack) != base


def test_a_method_revision_invalidates_its_relearning_rows(monkeypatch) -> None:
    """A changed implementation (revision bump) must never reuse a row measured on the old one."""
    from libortho.train.separation import SEPARATION

    cfg = separation_preset("tiny")
    attack = TrainConfig(lr=1e-3, steps=20, warmup=0.0, schedule="constant")
    base = relearn_key(_run(cfg), "mask", "public", attack)
    monkeypatch.setattr(SEPARATION["mask"], "revision", SEPARATION["mask"].revision + 1)
    assert relearn_key(_run(cfg), "mask", "public", attack) != base


def test_base_and_quant_keys_cover_pretraining_and_calibration() -> None:
    tiny = separation_preset("tiny")
    key = base_key(tiny, 0, "fortunes")
    assert base_key(replace(tiny, pretrain=replace(tiny.pretrain, steps=301)), 0, "fortunes") != key
    assert base_key(replace(tiny, pretrain_blocks=tiny.pretrain_blocks + 1), 0, "fortunes") != key
    assert base_key(replace(tiny, repeats=tiny.repeats + 1), 0, "fortunes") != key
    assert base_key(tiny, 1, "fortunes") != key and base_key(tiny, 0, "jargon") != key
    assert base_key(replace(tiny), 0, "fortunes") == key
    assert "pretrain" not in base_key(separation_preset("smollm2-135m"), 0, "fortunes")  # a released model
    q = quant_key(tiny)
    assert quant_key(replace(tiny, calib_blocks=tiny.calib_blocks + 1)) != q
    assert quant_key(replace(tiny, calib_len=tiny.calib_len * 2)) != q
    assert quant_key(replace(tiny, quant=replace(tiny.quant, group_size=128))) != q


def test_checkpoints_are_kept_per_cache_key_and_fresh_starts_over(tmp_path) -> None:
    """A changed config must not resume the old config's training checkpoint (e.g. a finished one)."""
    from libortho.experiments.separation import SeedRun

    run = SimpleNamespace(heavy=tmp_path, fresh=False, _cleared=set())
    a = SeedRun.checkpoint_dir(run, "mask", {"method": {"support_neurons": 64}})
    b = SeedRun.checkpoint_dir(run, "mask", {"method": {"support_neurons": 128}})
    assert a != b and a == SeedRun.checkpoint_dir(run, "mask", {"method": {"support_neurons": 64}})
    a.mkdir(parents=True)
    (a / "state.json").write_text("{}")
    fresh = SimpleNamespace(heavy=tmp_path, fresh=True, _cleared=set())
    assert SeedRun.checkpoint_dir(fresh, "mask", {"method": {"support_neurons": 64}}) == a
    assert not (a / "state.json").exists()  # --fresh retrains instead of resuming a finished run
    a.mkdir(parents=True)
    (a / "state.json").write_text("{}")
    SeedRun.checkpoint_dir(fresh, "mask", {"method": {"support_neurons": 64}})
    assert (a / "state.json").exists()  # cleared once per run: a second use in the same run resumes


def test_reference_rows_get_the_nonmember_exposure_control_and_other_rows_do_not(tmp_path) -> None:
    """SeedRun.evaluate: the full harness for reference rows, the one without non-member exposure otherwise,
    and the harness's description is part of the cache key (so the two never share an evaluation)."""
    from libortho.experiments.separation import SeedRun

    class FakeHarness:
        def __init__(self, nonmembers: bool) -> None:
            self.nonmembers, self.calls = nonmembers, []

        def describe(self) -> dict:
            return {"exposure_nonmembers": self.nonmembers}

        def evaluate(self, model, progress, exposure) -> dict:
            self.calls.append(model)
            return {"exposure": {"mean": 1.0}, "per_canary": [], "mia": {"secret_loss": {"auc": 0.5}},
                    "ppl_domain": 1.0, "ppl_general": 1.0, "eval_s": 0.0}

    full, rows = FakeHarness(True), FakeHarness(False)
    run = SimpleNamespace(harness=full, rows_harness=rows, fresh=False, work=tmp_path / "seed0", seed=0, evals={},
                          progress=False, say=lambda _m: None, record=lambda: None, made_s=0.0, reuse=())
    run.recorded = lambda path, key, what: SeedRun.recorded(run, path, key, what)
    SeedRun.evaluate(run, "ft_fp", "FP", "reference", lambda: "ref-model", {"k": 1})
    SeedRun.evaluate(run, "mask_int4_a0", "mask", "method", lambda: "method-model", {"k": 1})
    assert full.calls == ["ref-model"] and rows.calls == ["method-model"]
    keys = [json.loads((tmp_path / "seed0" / "evals" / f"{n}.json").read_text())["key"]["harness"]
            for n in ("ft_fp", "mask_int4_a0")]
    assert keys == [{"exposure_nonmembers": True}, {"exposure_nonmembers": False}]


def test_confirmation_preset_keeps_the_screening_schedule_and_drops_its_controls() -> None:
    """The confirmation must train exactly what the screening trained (same data recipe and schedule,
    fresh seeds), with only the headline rows."""
    screen, conf = separation_preset("smollm2-135m"), separation_preset("smollm2-135m", "confirmation")
    assert set(conf.seeds).isdisjoint(screen.seeds)
    for k in ("finetune", "separation", "method_overrides", "quant", "harness", "members", "nonmembers", "repeats"):
        assert getattr(conf, k) == getattr(screen, k), k
    k0, k1 = base_key(screen, 1, "fortunes"), base_key(conf, 1, "fortunes")
    assert k0 == k1
    assert (conf.unlearning, conf.label_noise, conf.delete_records, conf.retrain_dropped) == ((), (), 0, False)
    assert conf.relearn_steps == screen.relearn_steps > 0


def test_confirmation_refuses_to_start_without_a_fixed_method(tmp_path) -> None:
    from typer.testing import CliRunner

    from libortho.cli import app

    res = CliRunner().invoke(app, ["experiment", "separation", "--stage", "confirmation", "--out", str(tmp_path / "c")])
    assert res.exit_code != 0 and "needs --methods" in res.output
    assert not (tmp_path / "c").exists()
