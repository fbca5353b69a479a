"""The behaviour stream on disk: ``behaviour.safetensors`` plus its manifest ``behaviour.json``.

The pair lives beside an ordinary Hugging Face checkpoint or inside a saved decomposition; it is
independent of either format, so a behaviour edit can be shipped, replaced or withheld on its own.
``behaviour.json`` (written last) records the format version, the per-site strengths and widths,
how the direction was found, and the SHA-256 and size of ``behaviour.safetensors``. Deleting the
tensor file and keeping the manifest is the withheld state: a loader knows the sites and locks them
at alpha_b = 0 (which is the *unedited* model: withholding an ablation brings the behaviour back).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from libortho.atomic import atomic_write_file, atomic_write_json, sha256_file
from libortho.manifest import CorruptDecompositionError
from libortho.streams.behaviour import BehaviourStream
from libortho.version import __version__

BEHAVIOUR_TENSORS, BEHAVIOUR_MANIFEST = "behaviour.safetensors", "behaviour.json"
BEHAVIOUR_FORMAT = 1


@dataclass(frozen=True, eq=False)
class BehaviourFile:
    """What :func:`read_behaviour` found: the stream (None when withheld) and the sites the manifest names."""

    stream: BehaviourStream | None
    sites: tuple[str, ...]
    manifest: dict[str, Any]

    @property
    def withheld(self) -> bool:
        return self.stream is None


def has_behaviour(path: str | Path) -> bool:
    """Whether directory ``path`` declares a behaviour stream (its manifest exists)."""
    return (Path(path) / BEHAVIOUR_MANIFEST).is_file()


def write_behaviour(path: str | Path, stream: BehaviourStream, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``stream`` into directory ``path`` (created if needed): tensors first, manifest last, each atomic."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in stream.tensors().items()}
    atomic_write_file(out / BEHAVIOUR_TENSORS,
                      lambda tmp: save_file(tensors, str(tmp), metadata={"format": "libortho-behaviour"}),
                      suffix=".safetensors.tmp")
    f = out / BEHAVIOUR_TENSORS
    manifest = {"format_version": BEHAVIOUR_FORMAT, "libortho": __version__, **stream.meta(),
                "provenance": dict(provenance or {}),
                "file": {"name": BEHAVIOUR_TENSORS, "sha256": sha256_file(f), "size": f.stat().st_size}}
    atomic_write_json(out / BEHAVIOUR_MANIFEST, manifest)
    return out


def _manifest(path: Path) -> dict[str, Any]:
    mpath = path / BEHAVIOUR_MANIFEST
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptDecompositionError(f"{mpath} is not valid JSON: {err}") from err
    if not isinstance(m, dict) or m.get("format_version") != BEHAVIOUR_FORMAT:
        raise CorruptDecompositionError(f"{mpath}: not a behaviour manifest of format {BEHAVIOUR_FORMAT}")
    if not isinstance(m.get("sites"), dict) or not m["sites"] or not isinstance(m.get("file"), dict):
        raise CorruptDecompositionError(f"{mpath} has no 'sites' or 'file' table")
    return m


def read_behaviour(path: str | Path, load: bool = True, verify: bool = True) -> BehaviourFile | None:
    """The behaviour stream of directory ``path``; None when it declares none.

    A manifest without its tensor file (or ``load=False``) reads as withheld; a tensor file that does
    not match the manifest's size or SHA-256 is a :class:`CorruptDecompositionError`.
    """
    path = Path(path)
    if not has_behaviour(path):
        return None
    m = _manifest(path)
    sites = tuple(m["sites"])
    f = path / BEHAVIOUR_TENSORS
    if not load or not f.is_file():
        return BehaviourFile(None, sites, m)
    if verify:
        want = m["file"]
        if f.stat().st_size != want.get("size") or sha256_file(f) != want.get("sha256"):
            raise CorruptDecompositionError(f"{f} does not match its size / SHA-256 in {path / BEHAVIOUR_MANIFEST}")
    try:
        stream = BehaviourStream.from_tensors(load_file(f), m)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
        raise CorruptDecompositionError(f"{f} does not hold the stream {BEHAVIOUR_MANIFEST} describes: {err}") from err
    return BehaviourFile(stream, sites, m)


def attach_saved_behaviour(model: Any, path: str | Path, alpha: float = 1.0, load: bool = True,
                           verify: bool = True) -> int:
    """Attach the behaviour stream saved in directory ``path`` (a decomposition or an HF checkpoint).

    Returns the number of sites (0 when ``path`` declares none). A withheld stream (manifest without its
    tensor file, or ``load=False``) attaches locked at alpha_b = 0: the unedited model.
    """
    from libortho.runtime.behaviour import attach_behaviour

    found = read_behaviour(path, load=load, verify=verify)
    if found is None:
        return 0
    if found.withheld:
        return attach_behaviour(model, None, sites=list(found.sites))
    return attach_behaviour(model, found.stream, alpha=alpha)
