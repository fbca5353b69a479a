"""The on-disk model cache: build once, reuse by key, rebuild on demand, never leave half-written models."""

import json
from pathlib import Path

import pytest
import torch

from libortho.experiments.store import META, cached_model
from libortho.models import build_tiny_llama


class _Builder:
    """Counts builds; each build makes a distinct tiny Llama (seed = build number)."""

    def __init__(self, info: dict | None = None, fail: bool = False) -> None:
        self.calls = 0
        self.info = info if info is not None else {"steps": 3, "losses": [2.0, 1.5, 1.25]}
        self.fail = fail

    def __call__(self) -> tuple[torch.nn.Module, dict]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("training diverged")
        return build_tiny_llama(seed=self.calls), dict(self.info)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_builds_once_then_reuses_with_the_original_wall_time(tmp_path: Path) -> None:
    path, build = tmp_path / "models" / "ft", _Builder()
    key = {"model": "tiny", "lr": 1e-3, "repeats": (1, 4), "seed": 0}
    m1, info1 = cached_model(path, key, build)
    assert build.calls == 1 and info1["reused"] is False and info1["steps"] == 3 and info1["wall_s"] > 0
    assert not m1.training and (path / META).is_file()
    meta = json.loads((path / META).read_text())
    assert meta["key"]["repeats"] == [1, 4] and meta["info"]["wall_s"] == info1["wall_s"]

    # the same key (a list where the first call had a tuple, keys in another order) is reused
    m2, info2 = cached_model(path, {"seed": 0, "repeats": [1, 4], "lr": 1e-3, "model": "tiny"}, build)
    assert build.calls == 1 and info2["reused"] is True
    assert info2["wall_s"] == info1["wall_s"] and info2["losses"] == info1["losses"]
    assert m2 is not m1 and _same(m1, m2) and not m2.training
    assert m2.lm_head.weight.dtype == torch.float32
    with torch.no_grad():
        ids = torch.arange(10).view(1, 10)
        torch.testing.assert_close(m1(input_ids=ids).logits, m2(input_ids=ids).logits)


def test_rebuilds_on_another_key_or_fresh(tmp_path: Path) -> None:
    path, build = tmp_path / "ft", _Builder()
    cached_model(path, {"seed": 0}, build)
    m, info = cached_model(path, {"seed": 1}, build)
    assert build.calls == 2 and info["reused"] is False and _same(m, build_tiny_llama(seed=2))
    # the store holds one model: the first key's was replaced
    _, info = cached_model(path, {"seed": 0}, build)
    assert build.calls == 3 and info["reused"] is False
    m, info = cached_model(path, {"seed": 0}, build, fresh=True)
    assert build.calls == 4 and info["reused"] is False
    m_again, info = cached_model(path, {"seed": 0}, build)
    assert build.calls == 4 and info["reused"] is True and _same(m, m_again)  # the fresh build was stored


def test_reported_wall_time_is_kept(tmp_path: Path) -> None:
    build = _Builder(info={"wall_s": 12.5, "note": "from a log"})
    _, info = cached_model(tmp_path / "ft", {"k": 1}, build)
    assert info == {"wall_s": 12.5, "note": "from a log", "reused": False}
    _, info = cached_model(tmp_path / "ft", {"k": 1}, build)
    assert info == {"wall_s": 12.5, "note": "from a log", "reused": True}


def test_no_temporary_directories_are_left(tmp_path: Path) -> None:
    build = _Builder()
    for key, fresh in (({"a": 1}, False), ({"a": 1}, False), ({"a": 2}, False), ({"a": 2}, True)):
        cached_model(tmp_path / "ft", key, build, fresh=fresh)
        assert _entries(tmp_path) == ["ft"]
    assert not [p for p in (tmp_path / "ft").rglob("*") if "tmp" in p.name]


def test_a_directory_without_metadata_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "ft"
    path.mkdir()
    (path / "junk.bin").write_bytes(b"half written")
    build = _Builder()
    _, info = cached_model(path, {"a": 1}, build)
    assert build.calls == 1 and info["reused"] is False
    assert not (path / "junk.bin").exists() and (path / META).is_file()


def test_a_failing_build_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "models" / "ft"
    with pytest.raises(RuntimeError, match="diverged"):
        cached_model(path, {"a": 1}, _Builder(fail=True))
    assert not path.exists()
    assert not (path.parent.exists() and _entries(path.parent))


def test_a_failing_save_leaves_nothing_and_keeps_the_old_model(tmp_path: Path) -> None:
    path = tmp_path / "ft"

    def broken_build() -> tuple[torch.nn.Module, dict]:
        model = build_tiny_llama(seed=7)

        def save_pretrained(target, *args, **kwargs):
            Path(target, "partial.bin").write_bytes(b"x")
            raise OSError("disk full")

        model.save_pretrained = save_pretrained
        return model, {}

    with pytest.raises(OSError, match="disk full"):
        cached_model(path, {"a": 1}, broken_build)
    assert _entries(tmp_path) == []

    build = _Builder()
    old, _ = cached_model(path, {"a": 1}, build)
    with pytest.raises(OSError, match="disk full"):
        cached_model(path, {"a": 2}, broken_build)
    assert _entries(tmp_path) == ["ft"] and not (path / "partial.bin").exists()
    kept, info = cached_model(path, {"a": 1}, build)
    assert info["reused"] is True and build.calls == 1 and _same(kept, old)
