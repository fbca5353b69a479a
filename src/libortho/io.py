"""The on-disk decomposition format: separate base/ortho/rest safetensors + a manifest written last.

A directory holds ``base.safetensors`` (packed codes, scales, zeros per layer),
``ortho.safetensors`` (sorted int32 flat indices + values per layer; optional, physically
separate), ``rest.safetensors`` (embeddings, norms, biases...), tokenizer files, ``config.json``
and ``libortho.json`` (format version, config, provenance, per-layer metadata, per-file SHA-256).
Everything is written into a temporary sibling directory and renamed into place, so a crash
leaves no half-written output; loading verifies every hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from libortho.streams import BaseStream, SparseOrtho

FORMAT_VERSION = 1
MANIFEST = "libortho.json"
BASE, ORTHO, REST = "base.safetensors", "ortho.safetensors", "rest.safetensors"
log = logging.getLogger(__name__)


class CorruptDecompositionError(ValueError):
    """A file of a saved decomposition does not match its manifest (hash, size) or cannot be parsed."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _layer_meta(base: dict[str, BaseStream], ortho: dict[str, SparseOrtho] | None) -> dict[str, dict]:
    meta = {}
    for name, b in base.items():
        o = None if ortho is None else ortho.get(name)
        meta[name] = {"bits": b.bits, "group_size": b.group_size, "shape": list(b.shape),
                      "nnz": 0 if o is None else o.nnz,
                      "ortho_dtype": None if o is None else str(o.values.dtype).removeprefix("torch.")}
    return meta


def write_decomposition(out_dir: str | Path, base: dict[str, BaseStream], ortho: dict[str, SparseOrtho] | None,
                        rest: dict[str, torch.Tensor], config: dict, provenance: dict,
                        extra_files: dict[str, Path] | None = None, hf_config: dict | None = None,
                        overwrite: bool = False) -> Path:
    """Write a decomposition atomically (temp dir + rename, manifest last); returns ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_file({f"{n}.{k}": getattr(b, k).contiguous() for n, b in base.items()
                   for k in ("packed", "scales", "zeros")}, tmp / BASE)
        if ortho is not None:
            save_file({f"{n}.{k}": getattr(o, k).contiguous() for n, o in ortho.items()
                       for k in ("indices", "values")}, tmp / ORTHO)
        save_file({k: v.contiguous() for k, v in rest.items()}, tmp / REST)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        if hf_config is not None:
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, default=_json_default))
        files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "config": config, "provenance": provenance, "layers": _layer_meta(base, ortho),
                    "files": files}
        atomic_write_json(tmp / MANIFEST, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass(eq=False)
class Decomposition:
    """What :func:`read_decomposition` returns; ``ortho`` is None when missing or not requested."""

    base: dict[str, BaseStream]
    ortho: dict[str, SparseOrtho] | None
    rest: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    path: Path
    ortho_missing: bool = False


def _verify(path: Path, files: dict[str, dict], names: list[str]) -> None:
    for name in names:
        p = path / name
        want = files.get(name)
        if want is None:
            raise CorruptDecompositionError(f"{p} is not listed in the manifest")
        if p.stat().st_size != want["size"]:
            raise CorruptDecompositionError(f"{p} has {p.stat().st_size} bytes, manifest says {want['size']} "
                                            "(truncated or replaced)")
        if sha256_file(p) != want["sha256"]:
            raise CorruptDecompositionError(f"{p} does not match its SHA-256 in the manifest (corrupted)")


def _load(p: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(p)
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptDecompositionError(f"{p} cannot be read as safetensors: {err}") from err


def read_decomposition(path: str | Path, load_ortho: bool = True, verify: bool = True) -> Decomposition:
    """Read and (by default) hash-verify a saved decomposition."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise FileNotFoundError(f"{mpath} not found: {path} is not a libortho decomposition (or was not finished)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise CorruptDecompositionError(f"{mpath} is not valid JSON: {err}") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorruptDecompositionError(f"{mpath}: unsupported format version {manifest.get('format_version')!r}")
    for required in (BASE, REST):
        if not (path / required).exists():
            raise FileNotFoundError(f"{path / required} is missing: the decomposition is incomplete")
    has_ortho = (path / ORTHO).exists()
    use_ortho = load_ortho and has_ortho
    if verify:
        _verify(path, manifest["files"], [BASE, REST] + ([ORTHO] if use_ortho else []) +
                [n for n in manifest["files"] if n not in (BASE, REST, ORTHO) and (path / n).exists()])
    raw = _load(path / BASE)
    layers = manifest["layers"]
    base = {n: BaseStream(raw[f"{n}.packed"], raw[f"{n}.scales"], raw[f"{n}.zeros"], m["bits"], m["group_size"],
                          tuple(m["shape"])) for n, m in layers.items()}
    ortho = None
    if use_ortho:
        o = _load(path / ORTHO)
        ortho = {n: SparseOrtho(o[f"{n}.indices"], o[f"{n}.values"], tuple(layers[n]["shape"]))
                 for n in layers if f"{n}.indices" in o}
    elif load_ortho:
        log.warning("ortho stream not found in %s: model locked at alpha = 0", path)
    return Decomposition(base, ortho, _load(path / REST), manifest, path, ortho_missing=not has_ortho)
