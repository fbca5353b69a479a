"""The two-stream file format: round trip, physical separation, hashes, atomicity."""

import pytest
import torch

from libortho.io import CorruptDecompositionError, read_decomposition, write_decomposition
from libortho.streams import BaseStream, SparseOrtho


def _streams():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (6, 20), generator=g).to(torch.uint8)
    scales, zeros = torch.rand(6, 3, generator=g), torch.rand(6, 3, generator=g) * 15
    base = {"l.a": BaseStream.from_codes(codes, scales, zeros, 4, 8)}
    ortho = {"l.a": SparseOrtho.from_mask(torch.randn(6, 20, generator=g), torch.rand(6, 20, generator=g) < 0.1)}
    rest = {"embed.weight": torch.randn(10, 4, generator=g)}
    return base, ortho, rest


def _write(path, **kw):
    base, ortho, rest = _streams()
    return write_decomposition(path, base, ortho, rest, config={"k": 1}, provenance={"p": "t"}, **kw), base, ortho, rest


def test_roundtrip_and_separate_files(tmp_path) -> None:
    out, base, ortho, rest = _write(tmp_path / "d")
    assert sorted(p.name for p in out.iterdir()) == ["base.safetensors", "libortho.json", "ortho.safetensors",
                                                     "rest.safetensors"]
    dec = read_decomposition(out)
    b, o = dec.base["l.a"], dec.ortho["l.a"]
    assert torch.equal(b.packed, base["l.a"].packed) and torch.equal(b.scales, base["l.a"].scales)
    assert torch.equal(o.indices, ortho["l.a"].indices) and torch.equal(o.values, ortho["l.a"].values)
    assert torch.equal(dec.rest["embed.weight"], rest["embed.weight"])
    assert dec.manifest["layers"]["l.a"]["nnz"] == ortho["l.a"].nnz
    assert set(dec.manifest["files"]) == {"base.safetensors", "ortho.safetensors", "rest.safetensors"}


def test_missing_ortho_locks_and_corruption_is_refused(tmp_path) -> None:
    out, *_ = _write(tmp_path / "d")
    (out / "ortho.safetensors").unlink()
    dec = read_decomposition(out)
    assert dec.ortho is None and dec.ortho_missing
    original = (out / "base.safetensors").read_bytes()
    data = bytearray(original)
    data[-3] ^= 0xFF
    (out / "base.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptDecompositionError, match="SHA-256"):
        read_decomposition(out)
    (out / "base.safetensors").write_bytes(original)
    (out / "rest.safetensors").write_bytes((out / "rest.safetensors").read_bytes()[:-10])
    with pytest.raises(CorruptDecompositionError, match="truncated"):
        read_decomposition(out, verify=True)
    (out / "libortho.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a libortho decomposition"):
        read_decomposition(out)


def test_failed_write_leaves_nothing_and_no_overwrite(tmp_path, monkeypatch) -> None:
    import libortho.io as io

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io, "atomic_write_json", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(tmp_path / "d")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    _write(tmp_path / "d")
    with pytest.raises(FileExistsError, match="not empty"):
        _write(tmp_path / "d")
    _write(tmp_path / "d", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
