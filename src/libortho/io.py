"""The on-disk decomposition format: separate base/ortho/rest safetensors + a manifest written last.

A directory holds ``base.safetensors`` (``{layer}.packed`` / ``.scales`` / ``.zeros``),
``ortho.safetensors`` (every memory stream of any form as ``{name}.{tensor}``: ``.indices`` /
``.values`` for sparse, ``.A`` / ``.B`` for low-rank, ``.gate`` / ``.up`` / ``.down`` for neurons;
optional and physically separate), ``rest.safetensors`` (embeddings, norms, biases...), tokenizer
files, ``config.json`` and ``libortho.json`` (format version, config, provenance, per-layer bits /
group size / shape / nnz / memory kind, the ``memory`` table of stream metadata, per-file SHA-256
and size). Linear-site streams are named by their linear layer, mlp-site streams by their MLP.
Everything is written into a temporary sibling directory and renamed into place, so a crash leaves
no half-written output; reading verifies every present file against the manifest. Version 1
directories (sparse streams only, no ``memory`` table) still read. This module knows nothing of
``nn.Module``.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from libortho.atomic import atomic_directory, atomic_write_json, json_default, sha256_file
from libortho.manifest import (  # noqa: F401  (re-exported: the format's names)
    BASE,
    FORMAT_VERSION,
    MANIFEST,
    ORTHO,
    RESERVED,
    REST,
    SUPPORTED_VERSIONS,
    CorruptDecompositionError,
    read_manifest_json,
)
from libortho.streams import DTYPES, STREAM_FORMS, BaseStream, MemoryStream, SparseOrtho, stream_from_tensors
from libortho.version import __version__

log = logging.getLogger(__name__)


MLP_LINEARS = {"up_proj": 1, "gate_proj": 1, "down_proj": 0}  # a gated MLP's linears: axis of d_model in (d_out, d_in)


def _check_streams(base: dict[str, BaseStream], ortho: dict[str, MemoryStream] | None) -> None:
    """Refuse memory streams that do not fit the base streams (one-line ValueErrors).

    A linear-site stream needs a base stream of the same name and shape; an mlp-site stream must not
    be named like a base layer, and its width must match the MLP's linears that have base streams.
    """
    for name, o in (ortho or {}).items():
        if not isinstance(o, tuple(STREAM_FORMS.values())):
            raise ValueError(f"memory stream {name!r} is a {type(o).__name__}, not one of {sorted(STREAM_FORMS)}")
        if o.site == "linear":
            if name not in base:
                raise ValueError(f"ortho stream {name!r} has no base stream")
            if tuple(o.shape) != tuple(base[name].shape):
                raise ValueError(f"ortho stream {name!r} has shape {tuple(o.shape)}, "
                                 f"base has {tuple(base[name].shape)}")
            continue
        if name in base:
            raise ValueError(f"{o.kind} memory {name!r} belongs to an MLP, but {name!r} is a linear layer")
        for linear, axis in MLP_LINEARS.items():
            b = base.get(f"{name}.{linear}")
            if b is not None and b.shape[axis] != o.d_model:
                raise ValueError(f"{o.kind} memory {name!r} has width {o.d_model}, {name}.{linear} has "
                                 f"d_model {b.shape[axis]}")


def _layer_meta(base: dict[str, BaseStream], ortho: dict[str, MemoryStream] | None) -> dict[str, dict]:
    """Per-layer bits, group size, shape, nnz (sparse entries), memory value dtype and memory kind."""
    meta = {}
    for name, b in base.items():
        o = None if ortho is None else ortho.get(name)
        dtype = None if o is None else DTYPES[o.meta()["dtype"]]
        meta[name] = {"bits": b.bits, "group_size": b.group_size, "shape": list(b.shape),
                      "nnz": o.nnz if isinstance(o, SparseOrtho) else 0,
                      "ortho_dtype": None if dtype is None else str(dtype).removeprefix("torch."),
                      "memory_kind": None if o is None else o.kind}
    return meta


def _provenance(provenance: dict) -> dict:
    """Caller provenance plus library, torch, safetensors and Python versions and the write time."""
    import safetensors

    return {"libortho": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version(), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **provenance}


def _write_payload(tmp: Path, base: dict[str, BaseStream], ortho: dict[str, MemoryStream] | None,
                   rest: dict[str, torch.Tensor], extra_files: dict[str, Path], hf_config: dict | None) -> None:
    """Write the tensor files, tokenizer/extra files and ``config.json`` into ``tmp``."""
    save_file({f"{n}.{k}": getattr(b, k).detach().cpu().contiguous() for n, b in base.items()
               for k in ("packed", "scales", "zeros")}, tmp / BASE, metadata={"format": "libortho-base"})
    if ortho is not None:
        save_file({f"{n}.{k}": t.detach().cpu().contiguous() for n, o in ortho.items()
                   for k, t in o.tensors().items()}, tmp / ORTHO, metadata={"format": "libortho-ortho"})
    save_file({k: v.detach().cpu().contiguous() for k, v in rest.items()}, tmp / REST,
              metadata={"format": "libortho-rest"})
    for name, src in extra_files.items():
        if name in RESERVED or Path(name).name != name:
            raise ValueError(f"extra file name {name!r} is reserved or not a plain file name")
        shutil.copyfile(src, tmp / name)
    if hf_config is not None:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, default=json_default) + "\n")


def write_decomposition(out_dir: str | Path, base: dict[str, BaseStream], ortho: dict[str, MemoryStream] | None,
                        rest: dict[str, torch.Tensor], config: dict, provenance: dict,
                        extra_files: dict[str, Path] | None = None, hf_config: dict | None = None,
                        overwrite: bool = False) -> Path:
    """Write a decomposition atomically (temp dir beside ``out_dir``, manifest last, rename); returns ``out_dir``.

    ``ortho`` holds the memory streams of any form: linear-site ones (sparse, low-rank) keyed by their
    linear layer's name, mlp-site ones (neurons) keyed by their MLP's name; None writes no ortho file.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    _check_streams(base, ortho)
    with atomic_directory(out) as tmp:
        _write_payload(tmp, base, ortho, rest, {k: Path(v) for k, v in (extra_files or {}).items()}, hf_config)
        files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format_version": FORMAT_VERSION, "has_ortho": ortho is not None, "config": config,
                    "provenance": _provenance(provenance), "layers": _layer_meta(base, ortho),
                    "memory": {n: o.meta() for n, o in (ortho or {}).items()}, "files": files}
        atomic_write_json(tmp / MANIFEST, manifest)
    return out


@dataclass(eq=False)
class Decomposition:
    """What :func:`read_decomposition` returns; ``ortho`` (memory streams of any form) is None when missing or
    not requested. ``memory`` is the manifest's memory table (name -> stream metadata), also when ``ortho``
    is None, so a loader knows which sites a withheld memory had; for version 1 it is derived from the layers."""

    base: dict[str, BaseStream]
    ortho: dict[str, MemoryStream] | None
    rest: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    path: Path
    ortho_missing: bool = False
    missing_files: tuple[str, ...] = ()  # listed in the manifest but absent (ortho.safetensors excepted)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)


def _verify(path: Path, files: dict[str, dict], names: list[str]) -> None:
    """Check size then SHA-256 of each named file against the manifest."""
    for name in names:
        p = path / name
        want = files.get(name)
        if want is None:
            raise CorruptDecompositionError(f"{p} is not listed in the manifest {path / MANIFEST}")
        size = p.stat().st_size
        if size != want["size"]:
            raise CorruptDecompositionError(f"{p} has {size} bytes, the manifest says {want['size']} "
                                            "(truncated or replaced)")
        if sha256_file(p) != want["sha256"]:
            raise CorruptDecompositionError(f"{p} does not match its SHA-256 in the manifest (corrupted or modified)")


def _load(p: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with parse errors turned into :class:`CorruptDecompositionError`."""
    try:
        return load_file(p)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CorruptDecompositionError(f"{p} cannot be read as safetensors: {err}") from err


def _read_manifest(path: Path) -> dict[str, Any]:
    """The parsed, version-checked manifest of a decomposition directory."""
    mpath = path / MANIFEST
    manifest = read_manifest_json(path)
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise CorruptDecompositionError(f"{mpath}: unsupported format version {version!r} "
                                        f"(this libortho reads {', '.join(map(str, SUPPORTED_VERSIONS))})")
    for key in ("layers", "files") if version == 1 else ("layers", "memory", "files"):
        if not isinstance(manifest.get(key), dict):
            raise CorruptDecompositionError(f"{mpath} has no {key!r} table")
    _check_file_table(mpath, manifest["files"])
    bad = [n for n, m in manifest["layers"].items() if not isinstance(m, dict)]
    if bad:
        raise CorruptDecompositionError(f"{mpath}: layer entry {bad[0]!r} is not a table")
    if version != 1:
        _check_memory_table(mpath, manifest["memory"])
    return manifest


def _check_memory_table(mpath: Path, memory: dict[str, Any]) -> None:
    """Each memory entry is a table naming a known form (``kind``) at that form's site."""
    for name, meta in memory.items():
        if not isinstance(meta, dict):
            raise CorruptDecompositionError(f"{mpath}: memory entry {name!r} is not a table")
        kind = meta.get("kind")
        if kind not in STREAM_FORMS:
            raise CorruptDecompositionError(f"{mpath}: memory stream {name!r} has unknown kind {kind!r} "
                                            f"(this libortho knows {', '.join(sorted(STREAM_FORMS))})")
        if meta.get("site") != STREAM_FORMS[kind].site:
            raise CorruptDecompositionError(f"{mpath}: memory stream {name!r} of kind {kind!r} has site "
                                            f"{meta.get('site')!r}, expected {STREAM_FORMS[kind].site!r}")


def memory_table(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Name -> stream metadata of every memory stream a manifest declares (version 1: its sparse layers)."""
    if manifest.get("format_version") != 1:
        return manifest.get("memory", {})
    if not manifest.get("has_ortho", True):
        return {}
    return {n: {"kind": "sparse", "site": "linear", "shape": m.get("shape"), "nnz": m.get("nnz")}
            for n, m in manifest["layers"].items() if m.get("ortho_dtype") is not None}


def _check_file_table(mpath: Path, files: dict[str, Any]) -> None:
    """Each manifest file entry is a plain file name with an integer ``size`` and a hex ``sha256``."""
    for name, entry in files.items():
        if not name or Path(name).name != name or name in (".", ".."):
            raise CorruptDecompositionError(f"{mpath}: file entry {name!r} is not a plain file name")
        if not isinstance(entry, dict):
            raise CorruptDecompositionError(f"{mpath}: file entry {name!r} is not a table")
        size, digest = entry.get("size"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CorruptDecompositionError(f"{mpath}: file entry {name!r} has no valid 'size' (got {size!r})")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise CorruptDecompositionError(f"{mpath}: file entry {name!r} has no valid 'sha256' (got {digest!r})")


def _file_tensor_names(meta: dict[str, Any]) -> tuple[str, ...]:
    """The tensor names a file holds for a stream (a form may have changed its file coding over versions)."""
    form = STREAM_FORMS[meta["kind"]]
    names = getattr(form, "file_tensor_names", None)
    return form.tensor_names if names is None else names(meta)


def _build_streams(path: Path, layers: dict[str, dict], memory: dict[str, dict], use_ortho: bool
                   ) -> tuple[dict[str, BaseStream], dict[str, MemoryStream] | None]:
    """Base (and optionally memory) stream objects from the tensor files and the manifest's tables."""
    raw = _load(path / BASE)
    try:
        base = {n: BaseStream(raw[f"{n}.packed"], raw[f"{n}.scales"], raw[f"{n}.zeros"], int(m["bits"]),
                              int(m["group_size"]), (int(m["shape"][0]), int(m["shape"][1])))
                for n, m in layers.items()}
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise CorruptDecompositionError(f"{path}: tensors do not match the manifest's layer table: {err}") from err
    if not use_ortho:
        return base, None
    o = _load(path / ORTHO)
    try:
        ortho = {n: stream_from_tensors({t: o[f"{n}.{t}"] for t in _file_tensor_names(m)}, m)
                 for n, m in memory.items()}
        _check_streams(base, ortho)
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise CorruptDecompositionError(f"{path / ORTHO}: tensors do not match the manifest's memory table: "
                                        f"{err}") from err
    return base, ortho


def read_decomposition(path: str | Path, load_ortho: bool = True, verify: bool = True) -> Decomposition:
    """Read a saved decomposition, by default verifying every present file's size and SHA-256."""
    path = Path(path)
    manifest = _read_manifest(path)
    for required in (BASE, REST):
        if not (path / required).is_file():
            raise FileNotFoundError(f"{path / required} is missing: the decomposition is incomplete")
    has_ortho = (path / ORTHO).is_file()
    use_ortho = load_ortho and has_ortho
    if verify:
        extras = [n for n in manifest["files"] if n not in (BASE, REST, ORTHO) and (path / n).is_file()]
        _verify(path, manifest["files"], [BASE, REST, *([ORTHO] if has_ortho else []), *extras])
    memory = memory_table(manifest)
    base, ortho = _build_streams(path, manifest["layers"], memory, use_ortho)
    if not has_ortho:
        why = "deleted or withheld" if ORTHO in manifest["files"] else "never saved"
        log.warning("ortho stream not found: model locked at alpha=0 (%s, %s)", path / ORTHO, why)
    missing = tuple(n for n in manifest["files"] if n != ORTHO and not (path / n).is_file())
    return Decomposition(base, ortho, _load(path / REST), manifest, path, ortho_missing=not has_ortho,
                         missing_files=missing, memory=memory)
