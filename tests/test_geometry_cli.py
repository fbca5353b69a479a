"""`libortho geometry A B`: update spectra per layer and the loss path, from two saved models."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from libortho.cli import app
from libortho.models import build_tiny_llama
from libortho.models.tiny import ByteTokenizer

runner = CliRunner()
LAYER = "model.layers.0.mlp.up_proj"


def test_geometry_finds_the_rank_one_update_and_walks_the_path(tmp_path) -> None:
    a = build_tiny_llama(seed=0)
    b = build_tiny_llama(seed=0)
    with torch.no_grad():
        w = dict(b.named_modules())[LAYER].weight
        w += 0.5 * torch.outer(torch.ones(w.shape[0]), torch.linspace(-1, 1, w.shape[1]))
    for m, d in ((a, "a"), (b, "b")):
        m.save_pretrained(tmp_path / d)
        ByteTokenizer().save_pretrained(tmp_path / d)
    out = tmp_path / "geo"
    res = runner.invoke(app, ["geometry", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                              "--text", "shakespeare", "--n-blocks", "2", "--seq-len", "32", "--points", "5"])
    assert res.exit_code == 0, res.output
    g = json.loads((out / "geometry.json").read_text())
    row = g["weights"]["layers"][LAYER]
    assert row["rank_at_energy"] == 1 and abs(row["stable_rank"] - 1) < 1e-6 and row["rel_change"] > 0
    others = [v for n, v in g["weights"]["layers"].items() if n != LAYER]
    assert others and all(v["rel_change"] == 0 for v in others)
    assert len(g["lmc"]["ts"]) == 5 and g["lmc"]["barrier"] >= 0 and (out / "geometry.png").stat().st_size > 0
    assert "barrier" in res.output and LAYER in res.output


def test_geometry_refuses_bad_input_before_loading(tmp_path) -> None:
    res = runner.invoke(app, ["geometry", "tiny", str(tmp_path / "missing"), "--out", str(tmp_path / "g")])
    assert res.exit_code == 2 and "no model at" in res.output
    res = runner.invoke(app, ["geometry", "tiny", "tiny", "--points", "2", "--out", str(tmp_path / "g")])
    assert res.exit_code == 2 and "--points" in res.output and not (tmp_path / "g").exists()
