"""The CLI end to end on the tiny model: decompose, info, ppl, generate, and its error messages."""

from pathlib import Path

from typer.testing import CliRunner

from libortho.cli import app

runner = CliRunner()
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 40


def _decompose(tmp: Path, *extra: str):
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT)
    return runner.invoke(app, ["decompose", "tiny", str(tmp / "out"), "--group-size", "32", "--rho", "0.02",
                               "--calib", str(corpus), "--n-calib", "4", "--seq-len", "32", *extra])


def test_cli_roundtrip(tmp_path) -> None:
    res = _decompose(tmp_path)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "libortho.json").exists()
    info = runner.invoke(app, ["info", str(tmp_path / "out")])
    assert info.exit_code == 0 and "mlp.down_proj" in info.output and "total_bits_per_param" in info.output
    corpus = str(tmp_path / "corpus.txt")
    for alpha in ("0", "1"):
        ppl = runner.invoke(app, ["ppl", str(tmp_path / "out"), "--alpha", alpha, "--text", corpus,
                                  "--n-blocks", "2", "--seq-len", "32"])
        assert ppl.exit_code == 0 and "ppl=" in ppl.output, ppl.output
    gen = runner.invoke(app, ["generate", str(tmp_path / "out"), "Hello", "--alpha", "0", "--max-new-tokens", "4"])
    assert gen.exit_code == 0, gen.output


def test_cli_errors_are_clear_and_leave_nothing(tmp_path) -> None:
    res = runner.invoke(app, ["decompose", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert res.exit_code == 2 and "not found" in res.output
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    res = _decompose(tmp_path)
    assert res.exit_code == 2 and "not empty" in res.output
    res = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not found" in res.output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left behind
