"""The separation experiment end to end on a micro configuration: every stage's rows, the cache, the CLI.

The micro model is far too small to memorise anything; these tests check the pipeline (which rows
exist, what is cached and reused, what two-phase's construction guarantees), not the science.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from libortho.cli import app
from libortho.eval.harness import PrivacyHarness
from libortho.experiments.separation import RESULT_FILE, run_separation
from libortho.experiments.separation_config import SeparationExpConfig, separation_preset
from libortho.report.separation import load_separation

MICRO = {
    "general": "python-docs", "block_len": 192, "public_blocks": 12, "members": 6, "nonmembers": 12,
    "kinds": ["digits", "id"], "free_len": 2, "repeats": 3, "context_chars": 40, "eval_len": 64, "eval_blocks": 2,
    "general_blocks": 2, "pretrain_blocks": 24, "calib_blocks": 2, "calib_len": 64, "bootstrap": 50,
    "tiny_arch": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 256},
    "pretrain": {"lr": 3e-3, "steps": 4, "batch_size": 8},
    "finetune": {"lr": 3e-3, "epochs": 1.0, "batch_size": 8},
    "separation": {"neurons": 4, "rank": 2, "support_neurons": 4, "probe_rows": 4, "eta_every": 1},
    "method_overrides": {},
    "methods": ["two-phase", "mask"], "label_noise": [0.5], "unlearning": ["npo"],
    "unlearn_sweep": {"lrs": [1e-4], "steps": [2], "batch_size": 2, "retain_batch_size": 2},
    "relearn_steps": 2, "delete_records": 0,
    "quant": {"bits": 4, "group_size": 32, "method": "gptq"},
    "harness": {"max_enumerate": 1000, "exposure_samples": 16, "batch_size": 4, "keep_scores": True,
                "exposure_nonmember_limit": 4},
}


def micro_config(**over: object) -> SeparationExpConfig:
    return SeparationExpConfig.from_dict({**separation_preset("tiny").to_dict(), **MICRO, **over})


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sep")
    return out, run_separation(micro_config(), out, progress=False)


def test_every_stage_writes_its_rows(micro_run) -> None:
    out, result = micro_run
    evals = result["seeds"]["0"]["evals"]
    refs = {f"{r}_{q}" for r in ("ft", "retrain_masked", "retrain_dropped") for q in ("fp", "int4")}
    methods = {f"{m}_{b}_a{a}" for m in ("two-phase", "mask") for b in ("fp", "int4") for a in (0, 1)}
    ranked = [r["method"] for r in result["summary"]["seeds"]["0"]["ranking"]]
    noisy = {f"{m}@0.5_int4_a{a}" for m in ranked[:2] for a in (0, 1)}
    unlearn = {"npo_fp", "npo_int4", "sweep_npo_lr0.0001_s2"}
    relearn = {f"relearn_{t}_{d}" for t in (ranked[0], "retrain_masked") for d in ("public", "public+half")}
    assert {"pre"} | refs | methods | noisy | unlearn | relearn <= set(evals)
    on_disk = json.loads((out / RESULT_FILE).read_text())["seeds"]["0"]
    assert on_disk["evals"] == sorted(evals)  # listed by name, recorded once under seed0/evals
    assert load_separation(out / RESULT_FILE)["seeds"]["0"]["evals"] == evals
    # making a row's model never counts a stage trained inside it (two-phase@0.5's phase 1) twice
    assert all(e["build_s"] >= 0 for e in evals.values())
    for name in methods:
        m = evals[name]["metrics"]
        assert len(m["per_canary"]) == MICRO["members"] and m["exposure"]["mean"] is not None
        assert m["ppl_domain"] > 1 and m["ppl_general"] > 1


def test_two_phase_alpha0_is_the_masked_retrain(micro_run) -> None:
    """By construction (phase 1 is the masked retrain, reused): the same model, so the same figures."""
    evals = micro_run[1]["seeds"]["0"]["evals"]
    for q, row in (("fp", "two-phase_fp_a0"), ("int4", "two-phase_int4_a0")):
        a, b = evals[row]["metrics"], evals[f"retrain_masked_{q}"]["metrics"]
        assert a["nll_domain"] == b["nll_domain"] and a["private_nll"] == b["private_nll"]
    assert evals["two-phase_int4_a1"]["metrics"]["private_nll"] != evals["two-phase_int4_a0"]["metrics"]["private_nll"]


def test_rerun_reuses_every_model_and_evaluation(micro_run, monkeypatch) -> None:
    """A rerun trains nothing (no backward pass anywhere) and evaluates nothing: every figure is read back.
    (Checked by refusing both, not by wall time, which a loaded CI machine makes flaky.)"""
    out, first = micro_run

    def refused(*_a, **_k):
        raise AssertionError("a rerun of a finished run must not train or evaluate again")

    monkeypatch.setattr(torch.Tensor, "backward", refused)
    monkeypatch.setattr(PrivacyHarness, "evaluate", refused)
    again = run_separation(micro_config(), out, progress=False)
    e1, e2 = first["seeds"]["0"]["evals"], again["seeds"]["0"]["evals"]
    assert e1.keys() == e2.keys()
    assert all(e1[k]["metrics"] == e2[k]["metrics"] for k in e1)  # read back from the cache, not recomputed


def test_a_committed_record_resumes_on_a_fresh_machine_without_training(micro_run, tmp_path) -> None:
    """Only the results (JSON) travel, as a commit does; the models cache is empty. Nothing recorded may be
    trained again: the new cache holds only the tiny model's pretraining (the harness's reference)."""
    out, first = micro_run
    record = tmp_path / "results"
    for f in out.rglob("*.json"):
        rel = f.relative_to(out)
        if rel.parts[0] == RESULT_FILE or (len(rel.parts) > 1 and rel.parts[1] in ("evals", "stages")):
            (record / rel).parent.mkdir(parents=True, exist_ok=True)
            (record / rel).write_bytes(f.read_bytes())
    stages = record / "seed0" / "stages"
    assert (stages / "ft.json").is_file() and (stages / "eta" / "ft.json").is_file()
    again = run_separation(micro_config(), record, progress=False, cache_dir=tmp_path / "cache")
    made = sorted(p.name for p in (tmp_path / "cache" / "seed0" / "models").iterdir())
    assert made == ["pre"] and not (tmp_path / "cache" / "seed0" / "memory").exists()
    s1, s2 = first["seeds"]["0"], again["seeds"]["0"]
    assert s1["evals"] == s2["evals"]
    assert s1["stages"]["eta"] == s2["stages"]["eta"] and s1["stages"]["ranking"] == s2["stages"]["ranking"]
    def trained(stages: dict) -> dict:
        return {k: v["wall_s"] for k, v in stages.items() if isinstance(v, dict) and "wall_s" in v and k != "pretrain"}
    assert trained(s2["stages"]) == trained(s1["stages"]) and "ft" in trained(s1["stages"])

    # a missing eta whose model the new cache lacks: the model is trained again (with gradients: the eta
    # itself is measured without) and gives the same eta
    (stages / "eta" / "ft.json").unlink()
    (stages / "eta" / "mask.json").unlink()
    redo = run_separation(micro_config(), record, progress=False, cache_dir=tmp_path / "cache-eta")
    for tag in ("ft", "mask"):
        assert redo["seeds"]["0"]["stages"]["eta"][tag] == pytest.approx(s1["stages"]["eta"][tag], rel=1e-6)

    # a missing row whose model the new cache lacks: that stage is trained again (deterministically, the same
    # row comes back) and the retraining is recorded beside the first training, not in its place
    (record / "seed0" / "evals" / "ft_int4.json").unlink()
    third = run_separation(micro_config(), record, progress=False, cache_dir=tmp_path / "cache2")
    ft = json.loads((record / "seed0" / "stages" / "ft.json").read_text())["info"]
    assert ft["wall_s"] == s1["stages"]["ft"]["wall_s"] and len(ft["retrained"]) == 2  # the eta redo, this one
    assert third["seeds"]["0"]["evals"]["ft_int4"]["metrics"]["private_nll"] == \
        s1["evals"]["ft_int4"]["metrics"]["private_nll"]
    assert third["seeds"]["0"]["stages"]["ft"]["retrained"] == ft["retrained"]


def test_a_pilot_reusing_a_run_measures_only_its_changed_method(micro_run, tmp_path) -> None:
    """--reuse: rows recorded under the same keys are copied (with their source), nothing else is measured
    again; the varied method (another config, so another key) is trained and measured."""
    out, first = micro_run
    pilot = micro_config(methods=["two-phase"], label_noise=[], unlearning=[], relearn_steps=0,
                         method_overrides={"two-phase": {"fake_quant_fraction": 1.0}})
    res = run_separation(pilot, tmp_path / "pilot", progress=False, cache_dir=tmp_path / "cache",
                         reuse=(out,))
    evals, s1 = res["seeds"]["0"]["evals"], first["seeds"]["0"]["evals"]
    for name in ("pre", "ft_fp", "ft_int4", "retrain_masked_int4"):
        assert evals[name] == s1[name]
        saved = json.loads((tmp_path / "pilot" / "seed0" / "evals" / f"{name}.json").read_text())
        assert saved["copied_from"].startswith(str(out))
    assert evals["two-phase_int4_a1"]["metrics"] != s1["two-phase_int4_a1"]["metrics"]
    assert evals["two-phase_int4_a0"]["metrics"]["private_nll"] == s1["two-phase_int4_a0"]["metrics"]["private_nll"]
    made = sorted(p.name for p in (tmp_path / "cache" / "seed0" / "models").iterdir())
    assert "ft" not in made and "two-phase" in made  # the references were not trained again
    with pytest.raises(FileNotFoundError, match="--reuse"):
        run_separation(pilot, tmp_path / "p2", progress=False, reuse=(tmp_path / "nothing",))


def test_memsink_deletion_is_measured_or_said_to_be_impossible(tmp_path) -> None:
    """Deleting one record's sinks (one of four) is evaluated, with the collateral on the kept members'
    sinks recorded; when the deleted records' sinks cover the whole pool, deletion is the alpha = 0 model:
    the stage says so instead of building a memory of zero neurons."""
    lean = dict(methods=["memsink"], label_noise=[], unlearning=[], relearn_steps=0, retrain_dropped=False,
                full_precision_rows=False, delete_records=1)
    one = run_separation(micro_config(**lean), tmp_path / "one", progress=False, cache_dir=tmp_path / "c")
    st = one["seeds"]["0"]["stages"]["deletion"]
    assert st["evaluated"] and st["sinks_dropped"] == 1 and st["sinks"] == 4
    assert 0 <= st["kept_members_sinks_lost_mean"] <= 1
    assert "memsink_delete_int4_a1" in one["seeds"]["0"]["evals"]
    everything = micro_config(**{**lean, "method_overrides": {"memsink": {"sink_fraction": 1.0}}})
    res = run_separation(everything, tmp_path / "all", progress=False, cache_dir=tmp_path / "c")
    st = res["seeds"]["0"]["stages"]["deletion"]
    assert st["evaluated"] is False and st["sinks_dropped"] == 4 and "alpha = 0" in st["why"]
    assert st["kept_members_sinks_lost_mean"] == 1.0
    assert "memsink_delete_int4_a1" not in res["seeds"]["0"]["evals"]


def test_the_cache_folder_takes_the_models_and_the_out_folder_only_json(tmp_path) -> None:
    run_separation(micro_config(methods=["two-phase"], label_noise=[], unlearning=[], relearn_steps=0,
                                retrain_dropped=False, full_precision_rows=False),
                   tmp_path / "out", progress=False, cache_dir=tmp_path / "cache")
    assert {p.suffix for p in (tmp_path / "out").rglob("*") if p.is_file()} == {".json"}
    assert (tmp_path / "cache" / "seed0" / "models" / "ft").is_dir()
    assert (tmp_path / "cache" / "seed0" / "memory" / "two-phase" / "memory.json").is_file()


def test_demo_stage_through_the_cli_prints_the_switch_table(tmp_path) -> None:
    cfg = tmp_path / "micro.json"
    keep = {k: v for k, v in MICRO.items() if k not in ("methods", "label_noise", "unlearning", "relearn_steps")}
    cfg.write_text(json.dumps(keep))
    res = CliRunner().invoke(app, ["experiment", "separation", "--stage", "demo", "--methods", "two-phase",
                                   "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "two-phase INT4, alpha=0" in res.output and "two-phase INT4, alpha=1" in res.output
    assert "report.md" in res.output and (tmp_path / "run" / "report.html").is_file()
    evals = json.loads((tmp_path / "run" / RESULT_FILE).read_text())["seeds"]["0"]["evals"]
    assert set(evals) == {"pre", "ft_fp", "ft_int4", "retrain_masked_fp", "retrain_masked_int4",
                          "two-phase_int4_a0", "two-phase_int4_a1"}


def test_a_missing_recorded_evaluation_is_named_not_skipped(micro_run, tmp_path) -> None:
    out, _ = micro_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.safetensors", "ckpt"))
    (copy / "seed0" / "evals" / "ft_int4.json").unlink()
    with pytest.raises(FileNotFoundError, match="'ft_int4' of seed 0 .*ft_int4.json is missing"):
        load_separation(copy / RESULT_FILE)


def test_a_result_with_inline_evaluations_still_loads(micro_run, tmp_path) -> None:
    """Result files written before this layout (docs/results/separation_tiny/*) hold their rows inline."""
    out, first = micro_run
    old = {**json.loads((out / RESULT_FILE).read_text()), "seeds": {"0": {**first["seeds"]["0"]}}}
    old["seeds"]["0"].pop("evals_recorded_in", None)
    (tmp_path / RESULT_FILE).write_text(json.dumps(old))
    assert load_separation(tmp_path / RESULT_FILE)["seeds"]["0"]["evals"] == first["seeds"]["0"]["evals"]


def test_a_resumed_run_keeps_its_recorded_config(tmp_path) -> None:
    """The pieces of one run never mix configs: a result.json in OUT decides, and the CLI names what changed."""
    cfg = tmp_path / "micro.json"
    keep = {k: v for k, v in MICRO.items() if k not in ("methods", "label_noise", "unlearning", "relearn_steps")}
    cfg.write_text(json.dumps(keep))
    args = ["experiment", "separation", "--stage", "demo", "--methods", "two-phase", "--config", str(cfg),
            "--out", str(tmp_path / "run"), "--quiet"]
    assert CliRunner().invoke(app, args).exit_code == 0
    path = tmp_path / "run" / RESULT_FILE
    saved = json.loads(path.read_text())
    # as if today's preset had changed since the run started (a field this command's --config leaves alone)
    saved["config"]["label_noise_methods"] = ["two-phase"]
    path.write_text(json.dumps(saved))
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "today's preset differs in: label_noise_methods" in res.output
    assert json.loads(path.read_text())["config"]["label_noise_methods"] == ["two-phase"]
    saved = json.loads(path.read_text())
    saved["config"]["stage"] = "confirmation"
    path.write_text(json.dumps(saved))
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and "holds a confirmation run of tiny, not this one" in res.output


def test_recorded_config_reads_back_what_a_run_wrote(tmp_path) -> None:
    from libortho.experiments.separation_config import changed_fields, recorded_config

    assert recorded_config(tmp_path) is None
    cfg = micro_config()
    (tmp_path / RESULT_FILE).write_text(json.dumps({"experiment": "separation", "config": cfg.to_dict()}))
    assert recorded_config(tmp_path) == cfg and changed_fields(cfg, cfg) == []
    assert changed_fields(cfg, micro_config(members=7, repeats=4)) == ["members", "repeats"]
    (tmp_path / RESULT_FILE).write_text(json.dumps({"experiment": "kill_switch", "config": {}}))
    with pytest.raises(ValueError, match="is not a separation result"):
        recorded_config(tmp_path)
    (tmp_path / RESULT_FILE).write_text("{")
    with pytest.raises(ValueError, match="is not a valid result file"):
        recorded_config(tmp_path)


def test_a_record_longer_than_a_block_is_refused_before_any_training(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not fit in block_len=64"):
        run_separation(micro_config(block_len=64), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "seed0" / "models").exists()
