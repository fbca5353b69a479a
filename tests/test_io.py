"""The decomposition file format: round trip, locked model, corruption, atomicity."""

import json
import logging
from pathlib import Path

import pytest
import torch

import libortho.io as lio
from libortho.atomic import atomic_write_json, sha256_file
from libortho.io import CorruptDecompositionError, read_decomposition, write_decomposition
from libortho.streams import BaseStream, SparseOrtho


def _streams(seed: int = 0) -> tuple[dict, dict, dict]:
    """Two layers (one with a partial group, one with an empty ortho stream) and a few rest tensors."""
    g = torch.Generator().manual_seed(seed)
    base, ortho = {}, {}
    for name, (d_out, d_in), bits in (("layers.0.q", (8, 48), 4), ("layers.0.down", (6, 20), 8)):
        codes = torch.randint(0, 2**bits, (d_out, d_in), generator=g, dtype=torch.uint8)
        n_groups = -(-d_in // 16)
        scales, zeros = torch.rand(d_out, n_groups, generator=g), torch.rand(d_out, n_groups, generator=g) * 8
        base[name] = BaseStream.from_codes(codes, scales, zeros, bits, 16)
        flat = torch.randperm(d_out * d_in, generator=g)[:10] if bits == 4 else torch.zeros(0, dtype=torch.long)
        ortho[name] = SparseOrtho.from_flat(flat, torch.randn(flat.numel(), generator=g), (d_out, d_in))
    rest = {"embed.weight": torch.randn(16, 8, generator=g), "norm.weight": torch.ones(8, dtype=torch.bfloat16)}
    return base, ortho, rest


def _write(out: Path, with_ortho: bool = True, **kw) -> Path:
    base, ortho, rest = _streams()
    return write_decomposition(out, base, ortho if with_ortho else None, rest, config={"bits": 4, "rho": 0.01},
                               provenance={"source_model": "unit-test"}, **kw)


def test_round_trip_preserves_every_tensor(tmp_path) -> None:
    base, ortho, rest = _streams()
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"vocab": 3}')
    out = write_decomposition(tmp_path / "dec", base, ortho, rest, config={"bits": 4}, provenance={"source_model": "x"},
                              extra_files={"tokenizer.json": tok}, hf_config={"model_type": "llama"})
    assert sorted(p.name for p in out.iterdir()) == ["base.safetensors", "config.json", "libortho.json",
                                                    "ortho.safetensors", "rest.safetensors", "tokenizer.json"]
    dec = read_decomposition(out)
    assert not dec.ortho_missing and dec.path == out
    for n, b in base.items():
        got = dec.base[n]
        assert (got.bits, got.group_size, got.shape) == (b.bits, b.group_size, b.shape)
        assert all(torch.equal(getattr(got, k), getattr(b, k)) for k in ("packed", "scales", "zeros"))
        assert torch.equal(dec.ortho[n].indices, ortho[n].indices) and torch.equal(dec.ortho[n].values, ortho[n].values)
    assert dec.ortho["layers.0.down"].nnz == 0
    assert all(torch.equal(dec.rest[k], v) and dec.rest[k].dtype == v.dtype for k, v in rest.items())
    m = dec.manifest
    assert m["format_version"] == lio.FORMAT_VERSION and m["config"] == {"bits": 4}
    assert m["layers"]["layers.0.q"] == {"bits": 4, "group_size": 16, "shape": [8, 48], "nnz": 10,
                                         "ortho_dtype": "float16", "memory_kind": "sparse"}
    assert m["memory"]["layers.0.q"] == {"kind": "sparse", "site": "linear", "shape": [8, 48], "nnz": 10,
                                         "dtype": "fp16", "index_coding": "delta8"}
    assert {"libortho", "torch", "written"} <= set(m["provenance"]) and m["provenance"]["source_model"] == "x"
    assert m["files"]["base.safetensors"]["sha256"] == sha256_file(out / "base.safetensors")
    assert "libortho.json" not in m["files"] and json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_base_and_ortho_live_in_separate_files(tmp_path) -> None:
    from safetensors import safe_open

    out = _write(tmp_path / "dec")
    with safe_open(out / "base.safetensors", "pt") as f:
        assert all(k.rsplit(".", 1)[1] in ("packed", "scales", "zeros") for k in f.keys())  # noqa: SIM118
    with safe_open(out / "ortho.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(f"{n}.{k}" for n in ("layers.0.q", "layers.0.down")  # noqa: SIM118
                                          for k in ("gaps", "far", "values"))
        assert f.get_tensor("layers.0.q.gaps").dtype == torch.uint8
        assert f.get_tensor("layers.0.q.far").dtype == torch.int32


def test_missing_ortho_gives_a_locked_model(tmp_path, caplog) -> None:
    out = _write(tmp_path / "dec")
    (out / "ortho.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="libortho.io"):
        dec = read_decomposition(out)
    assert dec.ortho is None and dec.ortho_missing and len(dec.base) == 2
    assert "ortho stream not found: model locked at alpha=0" in caplog.text
    never = read_decomposition(_write(tmp_path / "never", with_ortho=False))
    assert never.ortho_missing and not never.manifest["has_ortho"]
    unloaded = read_decomposition(_write(tmp_path / "full"), load_ortho=False)
    assert unloaded.ortho is None and not unloaded.ortho_missing


@pytest.mark.parametrize("name", ["base.safetensors", "ortho.safetensors", "rest.safetensors"])
def test_flipped_byte_is_detected(tmp_path, name) -> None:
    out = _write(tmp_path / "dec")
    data = bytearray((out / name).read_bytes())
    data[-3] ^= 0x01
    (out / name).write_bytes(bytes(data))
    with pytest.raises(CorruptDecompositionError, match=name):
        read_decomposition(out)
    if name == "ortho.safetensors":  # a present but corrupted ortho file is never silently skipped
        with pytest.raises(CorruptDecompositionError, match=name):
            read_decomposition(out, load_ortho=False)


def test_truncated_file_is_detected_with_and_without_verification(tmp_path) -> None:
    out = _write(tmp_path / "dec")
    p = out / "base.safetensors"
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(CorruptDecompositionError, match="truncated"):
        read_decomposition(out)
    with pytest.raises(CorruptDecompositionError, match="base.safetensors"):
        read_decomposition(out, verify=False)


def test_missing_manifest_or_base_is_file_not_found(tmp_path) -> None:
    out = _write(tmp_path / "dec")
    (out / "base.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="base.safetensors"):
        read_decomposition(out)
    (out / "libortho.json").unlink()
    with pytest.raises(FileNotFoundError, match="libortho.json"):
        read_decomposition(out)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_decomposition(tmp_path / "nothing-here")


def test_corrupt_manifest_is_refused(tmp_path) -> None:
    out = _write(tmp_path / "dec")
    (out / "libortho.json").write_text("{not json")
    with pytest.raises(CorruptDecompositionError, match="libortho.json"):
        read_decomposition(out)
    (out / "libortho.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CorruptDecompositionError, match="version"):
        read_decomposition(out)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda f: f["base.safetensors"].pop("size"), "'base.safetensors' has no valid 'size'"),
    (lambda f: f["base.safetensors"].update(size="57936"), "'base.safetensors' has no valid 'size'"),
    (lambda f: f["rest.safetensors"].pop("sha256"), "'rest.safetensors' has no valid 'sha256'"),
    (lambda f: f["rest.safetensors"].update(sha256="XYZ"), "'rest.safetensors' has no valid 'sha256'"),
    (lambda f: f.update({"../escape.txt": dict(f["base.safetensors"])}), "not a plain file name"),
    (lambda f: f.update({"base.safetensors": "abc"}), "'base.safetensors' is not a table"),
])
def test_malformed_file_table_is_a_corrupt_decomposition(tmp_path, edit, match) -> None:
    """Entries missing their size/hash (or naming paths outside the directory) are refused, not a KeyError."""
    out = _write(tmp_path / "dec")
    m = json.loads((out / "libortho.json").read_text())
    edit(m["files"])
    (out / "libortho.json").write_text(json.dumps(m))
    with pytest.raises(CorruptDecompositionError, match=match):
        read_decomposition(out)


def test_files_listed_but_missing_are_reported(tmp_path) -> None:
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    base, ortho, rest = _streams()
    out = write_decomposition(tmp_path / "dec", base, ortho, rest, config={}, provenance={},
                              extra_files={"tokenizer.json": tok})
    assert read_decomposition(out).missing_files == ()
    (out / "tokenizer.json").unlink()
    (out / "ortho.safetensors").unlink()  # reported as ortho_missing, not here
    dec = read_decomposition(out)
    assert dec.missing_files == ("tokenizer.json",) and dec.ortho_missing


def test_checkpoint_refuses_layers_the_architecture_lacks(tmp_path, tiny_llama) -> None:
    """A manifest layer that config.json's architecture does not have, or has with another shape."""
    import libortho
    from libortho.config import DecomposeConfig, QuantConfig, SelectConfig

    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = DecomposeConfig(quant=QuantConfig(bits=4, group_size=32, method="rtn"),
                          select=SelectConfig(selector="magnitude", rho=0.02))
    libortho.decompose(tiny_llama, calib, cfg, progress=False)
    out = libortho.save(tiny_llama, tmp_path / "dec")
    hf = json.loads((out / "config.json").read_text())
    for edit, match in (({"num_hidden_layers": 1}, "'model.layers.1.self_attn.q_proj' but the llama architecture"),
                        ({"intermediate_size": 128}, r"layer 'model.layers.0.mlp.gate_proj' is \(160, 64\)")):
        (out / "config.json").write_text(json.dumps({**hf, **edit}))
        with pytest.raises(CorruptDecompositionError, match=match):
            libortho.load(out, verify=False)  # (the hash check would stop it first; this is the second line)


def test_exception_mid_write_leaves_nothing(tmp_path, monkeypatch) -> None:
    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lio, "atomic_write_json", boom)  # fails after the tensor files are written
    with pytest.raises(RuntimeError, match="disk full"):
        _write(tmp_path / "dec")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_refused_unless_asked(tmp_path) -> None:
    out = _write(tmp_path / "dec")
    before = sha256_file(out / "libortho.json")
    with pytest.raises(FileExistsError, match="overwrite"):
        _write(out)
    assert sha256_file(out / "libortho.json") == before
    (out / "stale.txt").write_text("old")
    _write(out, with_ortho=False, overwrite=True)
    assert not (out / "stale.txt").exists() and not (out / "ortho.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dec"]  # no temp or old copies left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_decomposition(_write(empty)).manifest["has_ortho"]


def test_inconsistent_streams_are_refused(tmp_path) -> None:
    base, ortho, rest = _streams()
    ortho["layers.9.x"] = SparseOrtho.empty((2, 2))
    with pytest.raises(ValueError, match="no base stream"):
        write_decomposition(tmp_path / "dec", base, ortho, rest, {}, {})
    assert not (tmp_path / "dec").exists()


def test_atomic_write_json_and_sha256(tmp_path) -> None:
    p = atomic_write_json(tmp_path / "sub" / "r.json", {"a": torch.tensor([1, 2]), "p": Path("/x"),
                                                         "d": torch.float16})
    assert json.loads(p.read_text()) == {"a": [1, 2], "p": "/x", "d": "torch.float16"}
    assert [x.name for x in p.parent.iterdir()] == ["r.json"]
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists() and sorted(x.name for x in tmp_path.iterdir()) == ["sub"]
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_one_home_for_atomic_replace_and_for_the_version() -> None:
    """No second atomic-replace implementation and no ``import libortho`` for ``__version__`` in the package."""
    import re

    src = Path(lio.__file__).parent
    for f in src.rglob("*.py"):
        text = f.read_text()
        if f.name != "atomic.py":
            assert not re.search(r"os\.replace|os\.rename|mkdtemp", text), f"{f} replaces files itself"
        assert not re.search(r"^\s*import libortho\s*$|libortho\.__version__", text, re.M), f"{f} imports the package"


def _logits(model: torch.nn.Module, ids: torch.Tensor, alpha: float) -> torch.Tensor:
    from libortho.runtime import set_alpha

    set_alpha(model, alpha)
    with torch.no_grad():
        return model(ids).logits


def test_version_1_directory_still_loads(tmp_path, tiny_llama) -> None:
    """A directory as the version-1 writer left it (sparse only, no memory table) loads to a working model."""
    from safetensors.torch import save_file

    import libortho
    from libortho.checkpoint import split_state
    from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
    from libortho.runtime import switchable_layers

    model = tiny_llama
    cfg = DecomposeConfig(quant=QuantConfig(bits=4, group_size=32, method="rtn"),
                          select=SelectConfig(selector="magnitude", rho=0.05))
    libortho.decompose(model, torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)), cfg,
                       progress=False)
    ids = torch.randint(1, 259, (2, 10), generator=torch.Generator().manual_seed(8))
    on, off = _logits(model, ids, 1.0), _logits(model, ids, 0.0)
    assert not torch.equal(on, off)
    base, ortho, rest = split_state(model)
    out = tmp_path / "v1"
    out.mkdir()
    save_file({f"{n}.{k}": getattr(b, k).contiguous() for n, b in base.items() for k in ("packed", "scales", "zeros")},
              out / "base.safetensors", metadata={"format": "libortho-base"})
    save_file({f"{n}.{k}": getattr(o, k).contiguous() for n, o in ortho.items() for k in ("indices", "values")},
              out / "ortho.safetensors", metadata={"format": "libortho-ortho"})
    save_file(rest, out / "rest.safetensors", metadata={"format": "libortho-rest"})
    (out / "config.json").write_text(json.dumps(model.config.to_dict()))
    layers = {n: {"bits": b.bits, "group_size": b.group_size, "shape": list(b.shape), "nnz": ortho[n].nnz,
                  "ortho_dtype": str(ortho[n].values.dtype).removeprefix("torch.")} for n, b in base.items()}
    files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in sorted(out.iterdir())}
    (out / "libortho.json").write_text(json.dumps({"format_version": 1, "has_ortho": True, "config": {},
                                                   "provenance": {"libortho": "0.1"}, "layers": layers,
                                                   "files": files}))
    dec = read_decomposition(out)
    assert set(dec.memory) == set(base) and all(isinstance(o, SparseOrtho) for o in dec.ortho.values())
    loaded, _ = libortho.load(out, alpha=1.0)
    assert torch.equal(_logits(loaded, ids, 1.0), on) and torch.equal(_logits(loaded, ids, 0.0), off)
    (out / "ortho.safetensors").unlink()
    locked, _ = libortho.load(out)
    assert all(m.locked for m in switchable_layers(locked).values())
    with torch.no_grad():
        assert torch.equal(locked(ids).logits, off)
