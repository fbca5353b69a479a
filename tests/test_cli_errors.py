"""Malformed input through the CLI, typed as a new user would: each row must give one clear line,
exit code != 0, no traceback, and leave every file under the test's directory exactly as it was.

One tiny decomposition is built once per module and copied into each row's own directory, where the
row may damage it before running the command.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from libortho.cli import app

runner = CliRunner()
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 40
SMALL = ["--group-size", "32", "--n-calib", "4", "--seq-len", "32"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A saved tiny decomposition (``dec``), its corpus, and a HF model directory without tokenizer."""
    from libortho.models import build_tiny_llama

    root = tmp_path_factory.mktemp("built")
    (root / "corpus.txt").write_text(TEXT)
    res = runner.invoke(app, ["decompose", "tiny", str(root / "dec"), *SMALL, "--rho", "0.02",
                              "--calib", str(root / "corpus.txt")])
    assert res.exit_code == 0, res.output
    build_tiny_llama(seed=0).save_pretrained(root / "notok")
    return root


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (directories too) with the SHA-256 of each file's bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _edit_manifest(dec: Path, edit: Callable[[dict], None]) -> None:
    m = json.loads((dec / "libortho.json").read_text())
    edit(m)
    (dec / "libortho.json").write_text(json.dumps(m))


def _add_phantom_layer(dec: Path) -> None:
    """A layer the architecture lacks, with its tensors present and every hash rewritten to match
    (what a careless tool editing the manifest would produce): only the architecture check can catch it."""
    src, ghost = "model.layers.0.mlp.up_proj", "model.layers.9.mlp.up_proj"
    base = load_file(dec / "base.safetensors")
    base.update({k.replace(src, ghost): v.clone() for k, v in base.items() if k.startswith(src + ".")})
    save_file(base, dec / "base.safetensors")

    def edit(m: dict) -> None:
        m["layers"][ghost] = dict(m["layers"][src])
        m["files"]["base.safetensors"] = {"size": (dec / "base.safetensors").stat().st_size,
                                          "sha256": hashlib.sha256((dec / "base.safetensors").read_bytes()).hexdigest()}
    _edit_manifest(dec, edit)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _nonempty_dir(path: Path) -> None:
    path.mkdir()
    (path / "keep.txt").write_text("mine")


# (id, setup(tmp), argv with {dec} {tmp} {corpus} {notok}, expected fragment)
ROWS: list[tuple[str, Callable[[Path], None] | None, list[str], str]] = [
    ("ppl alpha 1 without ortho", lambda t: (t / "dec/ortho.safetensors").unlink(),
     ["ppl", "{dec}", "--alpha", "1", "--text", "{corpus}", "--seq-len", "32"], "runs only at alpha 0, not 1"),
    ("generate alpha 1 without ortho", lambda t: (t / "dec/ortho.safetensors").unlink(),
     ["generate", "{dec}", "Hello", "--alpha", "1"], "ortho.safetensors is missing (deleted or withheld)"),
    ("ppl alpha nan", None, ["ppl", "{dec}", "--alpha", "nan"], "alpha must be a number in [0, 1]"),
    ("ppl alpha inf", None, ["ppl", "{dec}", "--alpha", "inf"], "got inf"),
    ("generate alpha negative", None, ["generate", "{dec}", "Hi", "--alpha", "-0.5"], "got -0.5"),
    ("generate alpha above 1", None, ["generate", "{dec}", "Hi", "--alpha", "1.5"], "got 1.5"),
    ("ppl alpha not a number", None, ["ppl", "{dec}", "--alpha", "one"], "Input should be a valid number"),
    ("demo into a non-empty directory", lambda t: _nonempty_dir(t / "mine"),
     ["demo", "--out", "{tmp}/mine", "--model", "tiny"], "exists and is not empty (use --overwrite"),
    ("demo OUT is a file", None, ["demo", "--out", "{corpus}", "--model", "tiny"], "is a file, not a directory"),
    ("decompose model without tokenizer", None, ["decompose", "{notok}", "{tmp}/new", *SMALL, "--calib", "{corpus}"],
     "has no tokenizer files"),
    ("decompose OUT is a file", None, ["decompose", "tiny", "{corpus}"], "is a file, not a directory"),
    ("decompose OUT not empty", lambda t: _nonempty_dir(t / "mine"), ["decompose", "tiny", "{tmp}/mine"],
     "not empty"),
    ("decompose missing OUT", None, ["decompose", "tiny"], "Missing argument 'OUT'"),
    ("decompose unknown model", None, ["decompose", "{tmp}/nomodel", "{tmp}/new"], "nomodel' not found"),
    ("misspelled selector", None, ["decompose", "tiny", "{tmp}/new", "--selector", "obz"], "unknown selector 'obz'"),
    ("misspelled method", None, ["decompose", "tiny", "{tmp}/new", "--method", "gptqq"],
     "unknown quantization method 'gptqq'"),
    ("misspelled grid", None, ["decompose", "tiny", "{tmp}/new", "--grid", "mse2"], "unknown grid method 'mse2'"),
    ("misspelled scope", None, ["decompose", "tiny", "{tmp}/new", "--scope", "glob"], "scope must be 'layer'"),
    ("misspelled values", None, ["decompose", "tiny", "{tmp}/new", "--values", "opt"], "values must be 'residual'"),
    ("misspelled ortho dtype", None, ["decompose", "tiny", "{tmp}/new", "--ortho-dtype", "fp8"], "ortho dtype must be"),
    ("bits 5", None, ["decompose", "tiny", "{tmp}/new", "--bits", "5"], "bits must be one of (2, 3, 4, 8), got 5"),
    ("group size 0", None, ["decompose", "tiny", "{tmp}/new", "--group-size", "0"], "group_size must be >= 1, got 0"),
    ("group size not an int", None, ["decompose", "tiny", "{tmp}/new", "--group-size", "abc"],
     "Input should be a valid integer"),
    ("negative rho", None, ["decompose", "tiny", "{tmp}/new", "--rho", "-0.1"], "rho must be in [0, 1], got -0.1"),
    ("rho above 1", None, ["decompose", "tiny", "{tmp}/new", "--rho", "1.5"], "rho must be in [0, 1], got 1.5"),
    ("negative tau", None, ["decompose", "tiny", "{tmp}/new", "--tau", "-1"], "tau must be a finite number >= 0"),
    ("n-calib 0", None, ["decompose", "tiny", "{tmp}/new", "--n-calib", "0"], "n_calib must be >= 1"),
    ("missing calib file", None, ["decompose", "tiny", "{tmp}/new", *SMALL, "--calib", "{tmp}/nope.txt"],
     "nope.txt not found"),
    ("unknown corpus name", None, ["decompose", "tiny", "{tmp}/new", *SMALL, "--calib", "shakespear"],
     "unknown corpus 'shakespear'"),
    ("empty calib file", lambda t: (t / "empty.txt").write_text("\n"),
     ["decompose", "tiny", "{tmp}/new", *SMALL, "--calib", "{tmp}/empty.txt"], "is empty"),
    ("non-UTF-8 calib file", lambda t: (t / "latin1.txt").write_bytes("café crème ".encode("latin-1") * 50),
     ["decompose", "tiny", "{tmp}/new", *SMALL, "--calib", "{tmp}/latin1.txt"], "is not UTF-8 text (byte 0xe9"),
    ("manifest entry without size", lambda t: _edit_manifest(t / "dec", lambda m: m["files"]["base.safetensors"]
                                                             .pop("size")),
     ["info", "{dec}"], "file entry 'base.safetensors' has no valid 'size'"),
    ("manifest entry without sha256", lambda t: _edit_manifest(t / "dec", lambda m: m["files"]["rest.safetensors"]
                                                               .pop("sha256")),
     ["ppl", "{dec}", "--alpha", "0", "--text", "{corpus}"], "file entry 'rest.safetensors' has no valid 'sha256'"),
    ("manifest layer without tensors", lambda t: _edit_manifest(t / "dec", lambda m: m["layers"].update(
        {"model.layers.9.mlp.up_proj": m["layers"]["model.layers.0.mlp.up_proj"]})),
     ["info", "{dec}"], "tensors do not match the manifest's layer table"),
    ("manifest layer the model lacks", lambda t: _add_phantom_layer(t / "dec"),
     ["generate", "{dec}", "Hi", "--alpha", "0"], "names layer 'model.layers.9.mlp.up_proj' but the llama"),
    ("manifest not JSON", lambda t: (t / "dec/libortho.json").write_text("{not json"),
     ["info", "{dec}"], "libortho.json is not valid JSON"),
    ("truncated base", lambda t: _truncate(t / "dec/base.safetensors"), ["info", "{dec}"], "(truncated or replaced)"),
    ("flipped byte in ortho", lambda t: _flip_last_byte(t / "dec/ortho.safetensors"),
     ["ppl", "{dec}", "--alpha", "1", "--text", "{corpus}", "--seq-len", "32"], "does not match its SHA-256"),
    ("config.json removed", lambda t: (t / "dec/config.json").unlink(),
     ["generate", "{dec}", "Hi", "--alpha", "0"], "config.json listed in the manifest but missing"),
    ("tokenizer removed", lambda t: (t / "dec/byte_tokenizer.json").unlink(),
     ["ppl", "{dec}", "--alpha", "0", "--text", "{corpus}"], "byte_tokenizer.json listed in the manifest but missing"),
    ("not a decomposition", lambda t: (t / "other").mkdir(), ["info", "{tmp}/other"],
     "is not a libortho decomposition"),
    ("missing decomposition", None, ["ppl", "{tmp}/gone"], "decomposition directory"),
    ("ppl missing text file", None, ["ppl", "{dec}", "--alpha", "0", "--text", "{tmp}/nope.txt"], "nope.txt not found"),
    ("ppl empty text file", lambda t: (t / "empty.txt").write_text("  \n"),
     ["ppl", "{dec}", "--alpha", "0", "--text", "{tmp}/empty.txt"], "is empty: nothing to score"),
    ("ppl seq-len 1", None, ["ppl", "{dec}", "--seq-len", "1"], "seq_len must be >= 2"),
    ("ppl n-blocks 0", None, ["ppl", "{dec}", "--n-blocks", "0"], "n_blocks must be >= 1"),
    ("generate 0 new tokens", None, ["generate", "{dec}", "Hi", "--max-new-tokens", "0"],
     "max_new_tokens must be >= 1"),
    ("generate empty prompt", None, ["generate", "{dec}", ""], "the prompt is empty"),
    ("report on a non-result JSON", lambda t: (t / "x.json").write_text('{"a": 1}'),
     ["report", "{tmp}/x.json"], "is not an experiment's result.json"),
    ("report on a JSON list", lambda t: (t / "x.json").write_text("[1, 2]"),
     ["report", "{tmp}/x.json"], "is not an experiment's result.json"),
    ("report missing file", None, ["report", "{tmp}/result.json"], "result file"),
    ("experiment misspelled selector", None,
     ["experiment", "kill-switch", "--out", "{tmp}/exp", "--selector", "obz"], "unknown selector 'obz'"),
    ("experiment alpha nan", None, ["experiment", "kill-switch", "--out", "{tmp}/exp", "--alphas", "0,nan"],
     "alphas must be a non-empty list of values in [0, 1]"),
    ("experiment alphas not numbers", None, ["experiment", "kill-switch", "--out", "{tmp}/exp", "--alphas", "0,x"],
     "--alphas must be comma-separated numbers"),
    ("experiment config not an object", lambda t: (t / "cfg.json").write_text("[1]"),
     ["experiment", "kill-switch", "--out", "{tmp}/exp", "--config", "{tmp}/cfg.json"],
     "is not a valid config file (a JSON list, not an object)"),
    ("experiment config unknown nested field", lambda t: (t / "cfg.json").write_text('{"quant": {"bitz": 4}}'),
     ["experiment", "kill-switch", "--out", "{tmp}/exp", "--config", "{tmp}/cfg.json"], "invalid kill-switch config"),
    ("experiment config nested not an object", lambda t: (t / "cfg.json").write_text('{"quant": 4}'),
     ["experiment", "kill-switch", "--out", "{tmp}/exp", "--config", "{tmp}/cfg.json"], "must be an object"),
    ("experiment config alphas not a list", lambda t: (t / "cfg.json").write_text('{"alphas": 0.5}'),
     ["experiment", "kill-switch", "--out", "{tmp}/exp", "--config", "{tmp}/cfg.json"], "must be a list"),
    ("experiment config alpha null", lambda t: (t / "cfg.json").write_text('{"alphas": [null]}'),
     ["experiment", "kill-switch", "--out", "{tmp}/exp", "--config", "{tmp}/cfg.json"], "alphas"),
    ("experiment unknown general corpus", None,
     ["experiment", "kill-switch", "--out", "{tmp}/exp", "--general", "fortune"], "unknown corpus 'fortune'"),
    ("experiment unknown model", None, ["experiment", "kill-switch", "--out", "{tmp}/exp", "--model", "{tmp}/m"],
     "/m' not found"),
]


@pytest.mark.parametrize(("setup", "argv", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_malformed_input_is_refused_cleanly(tmp_path, built, setup, argv, expected) -> None:
    shutil.copytree(built / "dec", tmp_path / "dec")
    shutil.copy(built / "corpus.txt", tmp_path / "corpus.txt")
    if setup is not None:
        setup(tmp_path)
    paths = {"dec": tmp_path / "dec", "tmp": tmp_path, "corpus": tmp_path / "corpus.txt", "notok": built / "notok"}
    before, notok_before = _snapshot(tmp_path), _snapshot(built / "notok")
    res = runner.invoke(app, [a.format(**paths) for a in argv])
    assert res.exit_code not in (0, None), res.output
    assert isinstance(res.exception, SystemExit), f"unhandled {res.exception!r}"  # not a crash
    assert "Traceback" not in res.output
    assert expected in " ".join(res.output.replace("│", " ").split()), res.output  # typer boxes usage errors
    ours = [line for line in res.output.splitlines() if line.startswith("error: ")]
    if ours:  # the library's own refusals: exactly one line holding the whole message
        assert len(ours) == 1 and expected in ours[0], res.output
    assert _snapshot(tmp_path) == before  # nothing written, nothing deleted, no temp dirs left
    assert _snapshot(built / "notok") == notok_before


def test_table_covers_the_listed_cases() -> None:
    """Thirty and more rows, and every command of the CLI is exercised by at least one."""
    assert len(ROWS) >= 30
    assert {r[2][0] for r in ROWS} >= {"decompose", "ppl", "generate", "info", "report", "demo", "experiment"}


def test_ppl_alpha_0_on_a_full_decomposition_does_not_warn_locked(built, caplog) -> None:
    res = runner.invoke(app, ["ppl", str(built / "dec"), "--alpha", "0", "--text", str(built / "corpus.txt"),
                              "--seq-len", "32", "--n-blocks", "2"])
    assert res.exit_code == 0, res.output
    assert "locked" not in res.output and not [r for r in caplog.records if "locked" in r.getMessage()]


def test_info_on_a_missing_directory_answers_fast_and_quietly(tmp_path) -> None:
    """A fresh interpreter: no torch import before the path is checked, no third-party noise."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "libortho.cli", "info", str(tmp_path / "nonexistent")],
                          capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: decomposition directory {tmp_path / 'nonexistent'} not found"
    assert proc.stdout == "" and "Failed to load" not in proc.stderr
    assert elapsed < 3.0, f"took {elapsed:.1f} s"


def test_help_does_not_import_torch() -> None:
    code = ("import sys; from typer.testing import CliRunner; from libortho.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "False"], proc.stderr


def test_cli_run_that_loads_a_model_prints_no_third_party_noise(built) -> None:
    """torchao's "Failed to load" lines, torch's pytree and sparse-CSR notices stay out of a real run."""
    proc = subprocess.run([sys.executable, "-m", "libortho.cli", "ppl", str(built / "dec"), "--alpha", "1",
                           "--text", str(built / "corpus.txt"), "--seq-len", "32", "--n-blocks", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ppl=")
    for noise in ("Failed to load", "Enum subclass", "Sparse CSR", "Warning", "locked"):
        assert noise not in proc.stderr, proc.stderr
