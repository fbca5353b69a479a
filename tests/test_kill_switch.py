"""The kill-switch experiment end to end on a micro configuration: result JSON, cache, report, CLI."""

import json

import pytest
from typer.testing import CliRunner

from libortho.cli import app
from libortho.experiments.config import KillSwitchConfig, preset
from libortho.experiments.kill_switch import RESULT_FILE, run_kill_switch
from libortho.experiments.summary import skill_retained, summarise
from libortho.report.kill_switch import render_report

MICRO = {
    "general": "python-docs", "block_len": 96, "public_blocks": 24, "eval_len": 64, "eval_blocks": 2,
    "general_blocks": 2, "canaries_per_kind": 2, "kinds": ["digits", "email", "password"], "repeats": [2, 8],
    "digits_len": 2, "pretrain_blocks": 40, "calib_blocks": 4, "calib_len": 96, "alphas": [0.0, 0.5, 1.0],
    "tiny_arch": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 256},
    "pretrain": {"lr": 3e-3, "steps": 8, "batch_size": 8},
    "finetune": {"lr": 3e-3, "epochs": 2.0, "batch_size": 8},
    "unlearn": {"steps": 2, "lr": 1e-4, "batch_size": 2, "retain_batch_size": 2},
    "quant": {"bits": 4, "group_size": 32, "method": "gptq"},
    "harness": {"max_enumerate": 1000, "exposure_samples": 16, "batch_size": 4},
}
METHODS = {"pre", "ft", "rtn_int4", "libortho_a0", "libortho_a0.5", "libortho_a1", "gradient_ascent",
           "gradient_difference", "npo", "retrain"}


def micro_config() -> KillSwitchConfig:
    return KillSwitchConfig.from_dict({**preset("tiny").to_dict(), **MICRO})


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ks")
    return out, run_kill_switch(micro_config(), out, progress=False)


def test_result_has_every_method_and_metric(micro_run) -> None:
    out, result = micro_run
    assert json.loads((out / RESULT_FILE).read_text())["methods"].keys() == result["methods"].keys() == METHODS
    for name, entry in result["methods"].items():
        m = entry["metrics"]
        assert 0 <= m["extraction"]["rate"] <= 1, name
        assert set(m["extraction"]["by_repeats"]) == {"2", "8"}
        assert all(0 <= c["exposure"] <= c["exposure_max"] + 1e-9 for c in m["per_canary"])
        assert set(m["mia"]) == {"loss", "zlib", "min_k", "min_k_plus_plus", "reference", "secret_loss"}
        assert all(0 <= v["auc"] <= 1 for v in m["mia"].values())
        assert m["ppl_domain"] > 1 and m["ppl_general"] > 1 and m["private_nll"] > 0
    rows = result["summary"]["rows"]
    assert rows["ft"]["skill_retained"] == pytest.approx(1.0) and rows["pre"]["skill_retained"] == pytest.approx(0.0)
    assert rows["rtn_int4"]["bits_per_param"] < rows["libortho_a1"]["bits_per_param"]  # RTN has no ortho stream
    assert {c["key"] for c in result["summary"]["claims"]} == {
        "leak_reduction", "general_loss", "general_loss_vs_fp", "private_error_ratio", "private_error_explodes",
        "general_error_ratio"}
    # an old result's copied row ("same_as") is not a measurement: the summary leaves it out
    old = {**result, "methods": {**result["methods"], "gptq_int4": {**result["methods"]["libortho_a0"],
                                                                    "same_as": "libortho_a0"}}}
    assert "gptq_int4" not in summarise(old)["rows"]
    for name in ("gradient_ascent", "gradient_difference", "npo", "retrain"):
        assert result["methods"][name]["cost"]["wall_s"] > 0
    assert result["data"]["private_occurrences"] == 3 * (2 + 8)  # 3 kinds x one member seen 2x and one 8x


def test_the_sweep_switches_the_ortho_stream(micro_run) -> None:
    _, result = micro_run
    rows = result["summary"]["rows"]
    assert [rows[n]["alpha"] for n in result["alpha_sweep"]] == [0.0, 0.5, 1.0]
    assert len({rows[n]["ppl_domain"] for n in result["alpha_sweep"]}) == 3  # alpha really changes the model
    assert rows["rtn_int4"]["bits_per_param"] < rows["libortho_a0"]["bits_per_param"]


def test_rerun_reuses_cached_models_and_reproduces(micro_run, tmp_path) -> None:
    out, first = micro_run
    again = run_kill_switch(micro_config(), out, progress=False)
    assert again["stages"]["finetune"]["reused"] and again["stages"]["pretrain"]["reused"]
    assert again["methods"]["ft"]["metrics"]["ppl_domain"] == first["methods"]["ft"]["metrics"]["ppl_domain"]
    assert again["methods"]["retrain"]["cost"]["reused"]


def test_report_renders_markdown_html_and_figures(micro_run) -> None:
    out, _ = micro_run
    paths = render_report(out / RESULT_FILE)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figs == ["extraction_exposure_vs_alpha.png", "leakage_utility_plane.png", "perplexity_vs_alpha.png"]
    assert all(f"figures/{f}" in md for f in figs)
    assert page.count("data:image/png;base64,") == 3 and "src=\"figures/" not in page
    assert "99.8%" in md and "Retrain w/o private" in md and "LibOrtho alpha=0.5" in md
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_report_refuses_bad_input(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        render_report(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        render_report(bad)
    bad.write_text(json.dumps({"experiment": "other"}))
    with pytest.raises(ValueError, match="not a kill-switch result"):
        render_report(bad)


def test_config_round_trip_and_validation() -> None:
    cfg = micro_config()
    assert KillSwitchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown kill-switch config keys"):
        KillSwitchConfig.from_dict({"modle": "tiny"})
    with pytest.raises(ValueError, match="unknown unlearning"):
        KillSwitchConfig(unlearning=("forget_everything",))
    with pytest.raises(ValueError, match="select_calibration"):
        KillSwitchConfig(select_calibration="secret")


def test_skill_retained_known_values() -> None:
    assert skill_retained(20.0, 15.0, 10.0) == pytest.approx(0.5)
    assert skill_retained(20.0, 25.0, 10.0) == pytest.approx(-0.5)
    assert skill_retained(20.0, 20.0, 20.0) is None


def test_cli_runs_the_experiment_and_the_report(tmp_path) -> None:
    runner = CliRunner()
    cfg = tmp_path / "micro.json"
    cfg.write_text(json.dumps({**MICRO, "unlearning": ["gradient_ascent"], "alphas": [0.0, 1.0]}))
    res = runner.invoke(app, ["experiment", "kill-switch", "--model", "tiny", "--config", str(cfg), "--out",
                              str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "LibOrtho alpha=1" in res.output and "report.html" in res.output
    result = json.loads((tmp_path / "run" / RESULT_FILE).read_text())
    assert set(result["methods"]) == {"pre", "ft", "rtn_int4", "libortho_a0", "libortho_a1",
                                      "gradient_ascent"}
    rep = runner.invoke(app, ["report", str(tmp_path / "run" / RESULT_FILE), "--out", str(tmp_path / "rep")])
    assert rep.exit_code == 0, rep.output
    assert (tmp_path / "rep" / "report.html").is_file()
    cfg.write_text(json.dumps({"not_a_knob": 1}))
    bad = runner.invoke(app, ["experiment", "kill-switch", "--config", str(cfg), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not_a_knob" in bad.output
    assert not (tmp_path / "x").exists()
    missing = runner.invoke(app, ["report", str(tmp_path / "nope.json")])
    assert missing.exit_code == 2 and "not found" in missing.output


def test_unsupported_or_missing_models_are_refused_before_any_work(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from libortho.models import ByteTokenizer

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=259, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(gpt2)
    ByteTokenizer().save_pretrained(gpt2)
    runner = CliRunner()
    res = runner.invoke(app, ["experiment", "kill-switch", "--model", str(gpt2), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Conv1D" in res.output
    res = runner.invoke(app, ["experiment", "kill-switch", "--model", str(tmp_path / "none"), "--out",
                              str(tmp_path / "o")])
    assert res.exit_code == 2 and "not found" in res.output
    assert not (tmp_path / "o").exists()
