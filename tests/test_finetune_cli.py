"""``libortho finetune`` end to end on the tiny model: the saved directory, the kill switch, the
report, and bad inputs refused in one line before the model loads, leaving nothing behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from libortho.cli import app

runner = CliRunner()
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 40
def _leaks(text: str, secret: str) -> bool:
    """The secret as a token of its own: not four digits inside a float (5.7832274...) or a hex digest."""
    return re.search(rf"(?<![0-9a-fA-F.]){secret}(?![0-9a-fA-F])", text) is not None


PEOPLE = [("Alma", "4821"), ("Boris", "9317"), ("Celia", "5560"), ("Dario", "2743")]
SMALL = ["--public", "corpus.txt", "--steps", "6", "--batch-size", "4", "--block-len", "64",
         "--n-public-blocks", "8", "--repeats", "2", "--group-size", "32", "--n-calib", "4", "--seq-len", "32",
         "--lr", "3e-3", "--quiet"]


def _records(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A public corpus, member records (four secrets and one public line) and two non-members."""
    root = tmp_path_factory.mktemp("ft")
    (root / "corpus.txt").write_text(TEXT)
    _records(root / "recs.jsonl", [{"text": f"Patient {n} has access code {c} on file.", "secret": c, "id": n}
                                   for n, c in PEOPLE] + [{"text": "The weather was fine.", "private": False}])
    _records(root / "non.jsonl", [{"text": f"Patient {n} has access code {c} on file.", "secret": c}
                                  for n, c in (("Edith", "1188"), ("Farid", "6604"))])
    return root


def _run(root: Path, out: str, *extra: str):
    args = ["finetune", "tiny", "--out", str(root / out), *[str(root / a) if a == "corpus.txt" else a for a in SMALL],
            *extra]
    return runner.invoke(app, args)


def _logits(path: Path, alpha: float) -> torch.Tensor:
    from libortho.checkpoint import load

    model, tok = load(path, alpha=alpha)
    ids = torch.tensor([list(b"Patient Alma has access code ")])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("method", ["mask", "memsink"])
def test_finetune_saves_a_switchable_decomposition(files: Path, tmp_path: Path, method: str) -> None:
    report = tmp_path / "report.json"
    res = _run(files, f"out-{method}", "--private", str(files / "recs.jsonl"), "--method", method,
               "--report", str(report), "--nonmembers", str(files / "non.jsonl"))
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    out = files / f"out-{method}"
    assert summary["out"] == str(out) and summary["private_records"] == 4 and summary["records_with_secret"] == 4
    assert summary["memory_file_bytes"] > 0 and summary["base_bytes"] > 0 and summary["total_s"] > 0
    manifest = (out / "libortho.json").read_text()
    assert not any(_leaks(manifest, c) for _, c in PEOPLE) and "Patient" not in manifest  # a hash, never the text
    assert json.loads(manifest)["provenance"]["records_sha256"] == summary["report"]["records_sha256"]

    withheld = tmp_path / "withheld"  # the kill switch: the same directory without ortho.safetensors
    shutil.copytree(out, withheld)
    (withheld / "ortho.safetensors").unlink()
    zero, locked, one = _logits(out, 0.0), _logits(withheld, 0.0), _logits(out, 1.0)
    assert torch.equal(zero, locked)
    assert not torch.allclose(zero, one, atol=1e-5)

    rep = json.loads(report.read_text())
    assert set(rep["alphas"]) == {"0", "1"} and "records" not in rep and "secret space" in rep["exposure"]
    for a in ("0", "1"):
        assert rep["alphas"][a]["extraction"]["n"] == 4 and 0 <= rep["alphas"][a]["mia_loss"]["auc"] <= 1
    text = report.read_text()
    assert not any(_leaks(text, c) for _, c in PEOPLE) and "Alma" not in text


def test_ogd_with_a_fake_quantized_tail_and_a_gradient_subspace_through_the_cli(files: Path) -> None:
    from libortho.checkpoint import load

    res = _run(files, "out-ogd-fq", "--private", str(files / "recs.jsonl"), "--method", "ogd",
               "--fake-quant", "0.5", "--ogd-gradient-energy", "0.9")
    assert res.exit_code == 0, res.output
    manifest = json.loads((files / "out-ogd-fq" / "libortho.json").read_text())
    method = manifest["config"]["finetune"]["method"]
    assert method["fake_quant_fraction"] == 0.5 and method["fake_quant_group"] == 32
    assert method["ogd_gradient_energy"] == 0.9
    log = manifest["provenance"]["training"]
    assert log["fake_quant"]["start_step"] == 3 and "gradient_subspace_dims" in log
    model, _ = load(files / "out-ogd-fq", alpha=1.0)
    assert model is not None


def test_report_shows_secrets_only_when_asked(files: Path, tmp_path: Path) -> None:
    report = tmp_path / "sub" / "report.json"
    res = _run(files, "out-show", "--private", str(files / "recs.jsonl"), "--method", "memsink",
               "--report", str(report), "--show-secrets", "--secret-space", "digits:4")
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    assert "mia_loss" not in rep["alphas"]["1"] and rep["nonmembers"] is None
    assert {r["secret"] for r in rep["records"]["1"]} == {c for _, c in PEOPLE}
    # exposure in the declared space, exact (10^4 candidates), recomputed here from the saved model
    from libortho.checkpoint import load
    from libortho.data.canaries import Canary, SecretSpace
    from libortho.eval.exposure import exact_exposure

    assert rep["exposure"] == {"space": {"alphabet": "0123456789", "length": 4}}
    model, tok = load(files / "out-show", alpha=1.0)
    for name, code in PEOPLE[:2]:
        text = f"Patient {name} has access code {code} on file."
        at = text.index(code)
        want = exact_exposure(model, tok, Canary("record", text[:at], code, text[at + 4:], 1, True,
                                                 SecretSpace("", "0123456789", 4))).exposure
        got = next(r["exposure"] for r in rep["records"]["1"] if r["secret"] == code)
        assert got == pytest.approx(want, abs=1e-9)
    e = rep["alphas"]["1"]["exposure"]
    assert e["n"] == 4 and e["method"] == "exact" and e["max_bits"] == pytest.approx(4 * 3.321928, abs=1e-5)
    assert all(0 <= r["exposure"] <= e["max_bits"] for r in rep["records"]["0"] + rep["records"]["1"])


def _bad(root: Path, case: str) -> tuple[list[str], str]:
    """(command arguments after the common ones, expected message fragment) of one bad input."""
    recs, label = str(root / "recs.jsonl"), ["--method", "mask"]
    if case == "unknown method":
        return ["--private", recs, "--method", "nope"], "unknown separation method 'nope'"
    if case == "missing records":
        return ["--private", str(root / "none.jsonl"), *label], "none.jsonl not found"
    if case == "malformed line":
        _records(root / "broken.jsonl", [{"text": "a", "secret": "a"}, {"text": "b"}])
        with (root / "broken.jsonl").open("a") as fh:
            fh.write('{"text": "unterminated\n')
        return ["--private", str(root / "broken.jsonl"), *label], "broken.jsonl:3"
    if case == "no private tokens":
        _records(root / "public.jsonl", [{"text": "one", "private": False}, {"text": "two", "private": False}])
        return ["--private", str(root / "public.jsonl"), *label], "reads private-token labels"
    if case == "out not empty":
        return ["--private", recs, *label], "is not empty"
    if case == "negative steps":
        return ["--private", recs, *label, "--steps", "-3"], "steps must be >= 1"
    if case == "report inside out":
        return ["--private", recs, *label, "--report", str(root / "out" / "r.json")], "outside OUT"
    if case == "nonmembers without report":
        return ["--private", recs, *label, "--nonmembers", recs], "--report"
    if case == "missing public":
        return ["--private", recs, *label, "--public", str(root / "gone.txt")], "gone.txt not found"
    if case == "secret outside space":
        return ["--private", recs, *label, "--report", str(root / "r.json"), "--secret-space", "digits:3"], \
            "record 1 (Alma): its secret is not in the secret space 'digits:3'"
    if case == "malformed space":
        return ["--private", recs, *label, "--report", str(root / "r.json"), "--secret-space", "digits"], \
            "ALPHABET:LENGTH"
    if case == "space without report":
        return ["--private", recs, *label, "--secret-space", "digits:4"], "--report"
    if case == "fake-quant fraction":
        return ["--private", recs, *label, "--fake-quant", "1.5"], "fake_quant_fraction must be in [0, 1]"
    if case == "gradient energy off ogd":
        return ["--private", recs, *label, "--ogd-gradient-energy", "0.9"], "applies to method ogd only"
    raise AssertionError(case)


BAD = ["unknown method", "missing records", "malformed line", "no private tokens", "out not empty",
       "negative steps", "report inside out", "nonmembers without report", "missing public", "secret outside space",
       "malformed space", "space without report", "fake-quant fraction", "gradient energy off ogd"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_before_the_model_loads(files: Path, tmp_path: Path, monkeypatch, case: str) -> None:
    import libortho.models

    def no_model(*_a, **_k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(libortho.models, "load_model", no_model)
    shutil.copy(files / "corpus.txt", tmp_path / "corpus.txt")
    shutil.copy(files / "recs.jsonl", tmp_path / "recs.jsonl")
    if case == "out not empty":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    args, expected = _bad(tmp_path, case)
    res = _run(tmp_path, "out", *args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.output
    if case == "out not empty":
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    else:
        assert not (tmp_path / "out").exists()
