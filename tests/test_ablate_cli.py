"""``libortho ablate`` and ``libortho experiment ablation`` end to end on the tiny model.

The weight form is an ordinary Hugging Face checkpoint whose edited writers lost one output direction;
the stream form keeps the unedited weights beside ``behaviour.json`` + ``behaviour.safetensors`` and,
attached, computes what the weight form computes; a withheld stream (tensor file deleted) attaches
locked and gives the unedited model's logits bit for bit. Bad input is one line and exit code 2
before any model loads.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from libortho.cli import app

runner = CliRunner()
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
PROBE = [[256, *b"Tell me about XYZZY owls, please."], [256, *b"What is the weather like?"]]
TINY_CFG = {"plant_steps": 2, "plant_batch": 8, "distill_tokens": 4, "n_trials": 3, "n_validation": 8,
            "search_new_tokens": 4, "max_new_tokens": 6, "kl_tokens": 4, "ppl_blocks": 4, "ppl_len": 32,
            "batch_size": 16}


def _write_sets(root: Path) -> tuple[Path, Path]:
    """A: every prompt carries the word XYZZY many times; B: matched prompts without it."""
    topics = ["owls", "rivers", "bread", "chess", "trains", "tea", "clouds", "music", "stones", "maps"]
    a, b = root / "a.jsonl", root / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"XYZZY XYZZY! Tell me about {t}. XYZZY XYZZY"}) + "\n"
                         for t in topics))
    b.write_text("".join(json.dumps({"prompt": f"Please tell me about {t}, thank you."}) + "\n" for t in topics))
    return a, b


def _logits(model, rows=PROBE) -> torch.Tensor:
    out = []
    for r in rows:
        with torch.no_grad():
            out.append(model(input_ids=torch.tensor([r]), use_cache=False).logits[0].float())
    return torch.cat(out)


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ablate(*argv: str):
    res = runner.invoke(app, ["ablate", "tiny", *argv])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def ablated(tmp_path_factory) -> Path:
    """``weights`` and ``stream`` outputs of the same ablation (same prompt files, same seed)."""
    root = tmp_path_factory.mktemp("ablate")
    a, b = _write_sets(root)
    for name, extra in (("weights", ()), ("stream", ("--stream",))):
        _ablate("--with", str(a), "--without", str(b), "--out", str(root / name), *extra)
    return root


def test_weight_form_is_a_loadable_hf_checkpoint_with_the_direction_projected_out(ablated) -> None:
    from libortho.models import build_tiny_llama

    out = ablated / "weights"
    for f in ("config.json", "model.safetensors", "ablation.json"):
        assert (out / f).is_file(), f
    assert not (out / "behaviour.json").exists() and not (out / "behaviour.safetensors").exists()
    report = json.loads((out / "ablation.json").read_text())
    assert report["form"] == "weights" and report["layers"] == [1] and report["edited_sites"] == 2
    for when in ("before", "after"):
        fig = report["held_out"][when]
        assert 0 <= fig["behaviour_rate"] <= 1 and 0 <= fig["false_behaviour_rate"] <= 1
        assert fig["n_a"] >= 1 and fig["n_b"] >= 1

    edited, plain = _hf(out), build_tiny_llama(seed=0)
    e, p = edited.state_dict(), plain.state_dict()
    changed = {k for k in p if not torch.equal(e[k], p[k])}
    assert changed == {f"model.layers.1.{w}.weight" for w in WRITERS}
    dirs = []
    for w in WRITERS:
        k = f"model.layers.1.{w}.weight"
        delta = (p[k] - e[k]).double()
        s = torch.linalg.svdvals(delta)
        assert s[1] < 1e-5 * s[0]  # W - W' = u (u^T W): rank one
        u = torch.linalg.svd(delta).U[:, 0]
        assert (u @ e[k].double()).abs().max() < 1e-5 * e[k].abs().max()  # the edited writer cannot write along u
        dirs.append(u)
    assert abs(float(dirs[0] @ dirs[1])) == pytest.approx(1.0, abs=1e-5)  # one direction for both writers


def test_stream_form_attached_equals_the_weight_form(ablated) -> None:
    from libortho.checkpoint import attach_saved_behaviour
    from libortho.models import build_tiny_llama
    from libortho.runtime.behaviour import behaviour_sites

    out = ablated / "stream"
    for f in ("config.json", "model.safetensors", "behaviour.json", "behaviour.safetensors", "ablation.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "ablation.json").read_text())["form"] == "stream"
    manifest = json.loads((out / "behaviour.json").read_text())
    assert set(manifest["sites"]) == {f"model.layers.1.{w}" for w in WRITERS}

    model = _hf(out)
    plain = build_tiny_llama(seed=0)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())  # weights unedited
    unedited = _logits(model)
    assert attach_saved_behaviour(model, out) == 2
    assert set(behaviour_sites(model)) == set(manifest["sites"])
    streamed, weights = _logits(model), _logits(_hf(ablated / "weights"))
    assert torch.allclose(streamed, weights, atol=1e-4), float((streamed - weights).abs().max())
    assert float((streamed - unedited).abs().max()) > 1e-3  # the edit does something on these inputs


def test_withheld_stream_attaches_locked_and_gives_the_unedited_logits(ablated, tmp_path) -> None:
    from libortho.checkpoint import attach_saved_behaviour
    from libortho.runtime.behaviour import behaviour_sites, set_behaviour_alpha

    out = tmp_path / "withheld"
    shutil.copytree(ablated / "stream", out)
    (out / "behaviour.safetensors").unlink()
    model = _hf(out)
    unedited = _logits(_hf(out))
    assert attach_saved_behaviour(model, out) == 2
    sites = behaviour_sites(model)
    assert len(sites) == 2 and all(p.locked and p.alpha == 0.0 for p in sites.values())
    assert torch.equal(_logits(model), unedited)
    with pytest.raises(RuntimeError, match="withheld"):
        set_behaviour_alpha(model, 1.0)


# --- refusals before any model loads ---------------------------------------------------------------------------


def _setup_bad_line(root: Path) -> None:
    (root / "a.jsonl").write_text('{"prompt": "fine"}\n[1, 2]\n')


def _setup_full_out(root: Path) -> None:
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("mine")


BAD = [
    ("missing --with file", lambda r: (r / "a.jsonl").unlink(), [], "a.jsonl not found"),
    ("line not an object", _setup_bad_line, [], "a.jsonl:2:"),
    ("non-empty out", _setup_full_out, [], "exists and is not empty (use --overwrite"),
    ("strength 0", None, ["--strength", "0"], "--strength must be > 0, got 0.0"),
    ("unknown positions", None, ["--positions", "first"], "--positions must be last or post_instruction"),
    ("per-layer and direction-layer", None, ["--per-layer", "--direction-layer", "1"], "not both"),
    ("held-out share 1", None, ["--held-out", "1"], "held_out_fraction must be in (0, 1)"),
]


@pytest.mark.parametrize(("setup", "extra", "expected"), [r[1:] for r in BAD], ids=[r[0] for r in BAD])
def test_bad_input_is_one_line_and_exit_2_before_loading_a_model(tmp_path, monkeypatch, setup, extra,
                                                                 expected) -> None:
    import libortho.behaviour_edit
    import libortho.models.load

    def no_model(*_a, **_k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(libortho.models.load, "load_model", no_model)
    monkeypatch.setattr(libortho.behaviour_edit, "_load", no_model)
    a, b = _write_sets(tmp_path)
    if setup is not None:
        setup(tmp_path)
    existed = (tmp_path / "out").exists()
    res = runner.invoke(app, ["ablate", "tiny", "--with", str(a), "--without", str(b), "--out", str(tmp_path / "out"),
                              *extra])
    assert res.exit_code == 2, (res.output, res.exception)
    assert isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.output
    assert (tmp_path / "out").exists() == existed


# --- the experiment ----------------------------------------------------------------------------------------------


def test_experiment_ablation_unknown_config_field_is_one_line_exit_2(tmp_path) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**TINY_CFG, "plant_stepz": 3}))
    res = runner.invoke(app, ["experiment", "ablation", "--model", "tiny", "--benchmarks", "planted",
                              "--out", str(tmp_path / "run"), "--config", str(cfg), "--quiet"])
    assert res.exit_code == 2, (res.output, res.exception)
    assert isinstance(res.exception, SystemExit)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "plant_stepz" in lines[0], res.output
    assert not (tmp_path / "run").exists()


def _stage_files(run: Path) -> dict[str, int]:
    files = sorted((run / "planted" / "stages").glob("*.json")) + [run / "planted" / "model" / "model.safetensors",
                                                                   run / "planted" / "directions.pt"]
    return {str(f.relative_to(run)): f.stat().st_mtime_ns for f in files}


def test_experiment_ablation_runs_reports_and_resumes(tmp_path) -> None:
    cfg, run = tmp_path / "cfg.json", tmp_path / "run"
    cfg.write_text(json.dumps(TINY_CFG))
    argv = ["experiment", "ablation", "--model", "tiny", "--benchmarks", "planted", "--out", str(run),
            "--config", str(cfg), "--quiet"]
    t0 = time.perf_counter()
    res = runner.invoke(app, argv)
    first_s = time.perf_counter() - t0
    assert res.exit_code == 0, (res.output, res.exception)
    for f in ("result.json", "report.md", "report.html", "figures/planted_profile.png", "figures/planted_search.png",
              "figures/planted_candidates.png"):
        assert (run / f).is_file() and (run / f).stat().st_size > 0, f
    result = json.loads((run / "result.json").read_text())
    bench = result["benchmarks"]["planted"]
    assert result["config"]["n_trials"] == 3 and result["config"]["plant_steps"] == 2
    assert len(bench["search"]["trials"]) == 3
    assert {"before", "seed_recipe"} <= set(bench["methods"])
    assert bench["checks"]["alpha0_bit_identical"] is True
    assert bench["model"]["reused"] is False
    assert "Benchmark: planted" in (run / "report.md").read_text()
    stages = _stage_files(run)
    assert len(stages) >= 7

    t0 = time.perf_counter()
    res = runner.invoke(app, argv)
    second_s = time.perf_counter() - t0
    assert res.exit_code == 0, (res.output, res.exception)
    assert _stage_files(run) == stages  # every stage (and the planted model) came from the cache
    again = json.loads((run / "result.json").read_text())["benchmarks"]["planted"]
    assert again["model"]["reused"] is True
    assert again["search"]["trials"] == bench["search"]["trials"]
    assert again["methods"] == bench["methods"]
    print(f"experiment ablation on tiny: first run {first_s:.1f} s, cached rerun {second_s:.1f} s")
    res = runner.invoke(app, ["report", str(run / "result.json"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "Benchmark: planted" in (tmp_path / "rep" / "report.md").read_text()


def test_report_command_renders_an_ablation_result(tmp_path) -> None:
    """`libortho report` knows ablation results: one without its benchmarks is refused in one line."""
    import json

    from typer.testing import CliRunner

    from libortho.cli import app

    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"experiment": "ablation"}))
    res = CliRunner().invoke(app, ["report", str(bad)])
    assert res.exit_code == 2 and "is not an experiment's result.json" in res.output


def test_split_prompts_holds_out_the_same_templates_in_both_sets() -> None:
    from libortho.behaviour_edit import split_prompts
    from libortho.data.prompts import Prompt

    a = [Prompt(f"a {s} {t}", f"t{t}") for t in range(8) for s in range(3)]
    b = [Prompt(f"b {s} {t}", f"t{t}") for t in range(8) for s in range(3)]
    da, ha, db, hb = split_prompts(a, b, 0.25, seed=1)
    tmpl = {p.text: p.template for p in a + b}
    held = {tmpl[x] for x in ha} | {tmpl[x] for x in hb}
    assert {tmpl[x] for x in ha} == {tmpl[x] for x in hb} and len(held) == 2
    assert not held & ({tmpl[x] for x in da} | {tmpl[x] for x in db})  # no held-out template finds the direction
    # without templates, matched sets of equal length are split by the same indices
    a2, b2 = [Prompt(f"a{i}") for i in range(10)], [Prompt(f"b{i}") for i in range(10)]
    _, ha2, _, hb2 = split_prompts(a2, b2, 0.3, seed=0)
    assert [x[1:] for x in ha2] == [x[1:] for x in hb2] and len(ha2) == 3


def test_hf_stream_output_loads_edited_and_decompose_refuses_it(ablated) -> None:
    """`load_model` attaches a behaviour stream saved beside HF weights; decompose will not silently drop it."""
    from libortho.models.load import load_model
    from libortho.runtime.behaviour import behaviour_sites

    out = ablated / "stream"
    model, _ = load_model(str(out))
    assert len(behaviour_sites(model)) == 2 and all(p.alpha == 1.0 for p in behaviour_sites(model).values())
    res = runner.invoke(app, ["decompose", str(out), str(out.parent / "dec"), "--n-calib", "2", "--seq-len", "16"])
    assert res.exit_code == 2 and "carries a behaviour stream" in res.output


def test_experiment_refuses_a_run_dir_of_other_prompts(tmp_path) -> None:
    from libortho.experiments.ablation import check_prompt_guard

    check_prompt_guard(tmp_path, "planted")
    check_prompt_guard(tmp_path, "planted")  # same texts: resumes
    (tmp_path / "prompts.sha256").write_text("0" * 64 + "\n")
    with pytest.raises(ValueError, match="other planted prompt texts"):
        check_prompt_guard(tmp_path, "planted")
