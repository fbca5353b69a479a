"""The CLI end to end on the tiny model: decompose, info, ppl, generate, and what each prints."""

import math
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from libortho.cli import app

runner = CliRunner()
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 40


def _decompose(tmp: Path, out: str = "out", *extra: str):
    """Tiny decomposition; rho is large so that alpha = 1 visibly changes greedy text on the random model."""
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT)
    return runner.invoke(app, ["decompose", "tiny", str(tmp / out), "--group-size", "32", "--rho", "0.25",
                               "--calib", str(corpus), "--n-calib", "4", "--seq-len", "32", *extra])


def _ppl_line(output: str) -> dict[str, float]:
    m = re.search(r"ppl=([\d.]+) nll=([\d.]+) alpha=([\d.]+) tokens=(\d+)", output)
    assert m, output
    return {"ppl": float(m[1]), "nll": float(m[2]), "alpha": float(m[3]), "tokens": int(m[4])}


def _reference_nll(model: torch.nn.Module, ids: list[int], seq_len: int) -> float:
    """Mean next-token NLL over consecutive blocks, written out here (not the library's helpers)."""
    total, count = 0.0, 0
    for i in range(0, len(ids), seq_len):
        block = torch.tensor(ids[i:i + seq_len]).view(1, -1)
        if block.shape[1] < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=block).logits.double(), -1)
        total -= float(logp[0, :-1].gather(-1, block[0, 1:, None]).sum())
        count += block.shape[1] - 1
    return total / count


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory) -> Path:
    """A full decomposition ``out`` and an independent base-only one ``base`` (``--no-ortho``), same calibration."""
    tmp = tmp_path_factory.mktemp("cli")
    for out, extra in (("out", ()), ("base", ("--no-ortho",))):
        res = _decompose(tmp, out, *extra)
        assert res.exit_code == 0, res.output
    return tmp


def test_cli_roundtrip_alpha_reaches_the_model(decomposed) -> None:
    import libortho

    out, corpus = decomposed / "out", decomposed / "corpus.txt"
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "mlp.down_proj" in info.output and "total_bits_per_param" in info.output
    assert "sparse_decode_kernel" in info.output  # which kernel adds the memory at decode, and why not native
    got = {}
    for alpha in ("0", "1"):
        res = runner.invoke(app, ["ppl", str(out), "--alpha", alpha, "--text", str(corpus),
                                  "--n-blocks", "2", "--seq-len", "32"])
        assert res.exit_code == 0, res.output
        got[alpha] = _ppl_line(res.output)
        assert got[alpha]["alpha"] == float(alpha) and got[alpha]["tokens"] == 2 * 31
    assert got["0"]["nll"] != got["1"]["nll"]  # fails if --alpha is ignored
    ids = list(TEXT.encode("utf-8"))[:64]  # the byte tokenizer: one token per UTF-8 byte
    model, _ = libortho.load(out, alpha=1.0)
    for alpha in ("0", "1"):
        libortho.set_alpha(model, float(alpha))
        want = _reference_nll(model, ids, 32)
        assert got[alpha]["nll"] == pytest.approx(want, abs=2e-5)
        assert got[alpha]["ppl"] == pytest.approx(math.exp(want), rel=1e-4)


def test_generate_at_alpha_0_is_the_base_only_model(decomposed) -> None:
    def gen(path: Path, alpha: str) -> str:
        res = runner.invoke(app, ["generate", str(path), "Hello", "--alpha", alpha, "--max-new-tokens", "16"])
        assert res.exit_code == 0, res.output
        return res.stdout

    at0 = gen(decomposed / "out", "0")
    assert at0 == gen(decomposed / "base", "0")  # an independent decomposition saved without ortho
    assert at0 != gen(decomposed / "out", "1")  # and alpha = 1 does reach generation


def test_ppl_scores_a_users_file_whole(decomposed, tmp_path) -> None:
    """A 12,000-character file: every block of 512 plus the partial last one, token count printed."""
    text = ("Call me Ishmael. Some years ago, never mind how long precisely, having little money. " * 150)[:12000]
    f = tmp_path / "mine.txt"
    f.write_text(text)
    res = runner.invoke(app, ["ppl", str(decomposed / "out"), "--alpha", "1", "--text", str(f)])
    assert res.exit_code == 0, res.output
    line = _ppl_line(res.output)
    n_full, tail = divmod(12000, 512)  # 23 blocks of 512 and 224 tokens left
    assert line["tokens"] == n_full * 511 + tail - 1
    assert "23 blocks of 512 + 1 of 224" in res.output and "the whole text" in res.output
    import libortho

    model, _ = libortho.load(decomposed / "out", alpha=1.0)
    assert line["nll"] == pytest.approx(_reference_nll(model, list(text.encode()), 512), abs=2e-5)
    f.write_text("x" * 65)  # two blocks of 32 and one token left over, which predicts nothing
    res = runner.invoke(app, ["ppl", str(decomposed / "out"), "--alpha", "0", "--text", str(f), "--seq-len", "32"])
    assert res.exit_code == 0 and _ppl_line(res.output)["tokens"] == 2 * 31 and "2 blocks of 32 from" in res.output


def test_ppl_on_a_named_corpus_keeps_the_heldout_split(decomposed) -> None:
    res = runner.invoke(app, ["ppl", str(decomposed / "out"), "--alpha", "0", "--text", "shakespeare",
                              "--n-blocks", "3", "--seq-len", "64"])
    assert res.exit_code == 0, res.output
    assert _ppl_line(res.output)["tokens"] == 3 * 63
    assert "sampled from the held-out split of shakespeare" in res.output


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


def test_decompose_with_kfac_curvature_saves_a_low_rank_stream_that_loads(decomposed) -> None:
    """--curvature kfac --selector kfac: a factored stream within the sparse stream's bits; alpha 0 = base only."""
    import json

    from libortho.checkpoint import load

    res = _decompose(decomposed, "kfac", "--curvature", "kfac", "--selector", "kfac")
    assert res.exit_code == 0, res.output
    manifest = json.loads((decomposed / "kfac" / "libortho.json").read_text())
    assert manifest["config"]["select"]["curvature"] == "kfac"
    model, _ = load(decomposed / "kfac", alpha=0.0)
    base, _ = load(decomposed / "base", alpha=0.0)
    ids = torch.randint(3, 259, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    kinds = {m.ortho_stream.kind for m in model.modules() if getattr(m, "ortho_stream", None) is not None}
    assert "lowrank" in kinds
    bad = _decompose(decomposed, "bad", "--selector", "kfac")
    assert bad.exit_code != 0 and "curvature='kfac'" in bad.output
