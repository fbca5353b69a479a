"""Names and the first read of a decomposition's manifest, without torch.

The CLI refuses a bad decomposition directory before it imports torch (:mod:`libortho.workflows`),
and :mod:`libortho.io` reads the same manifest before loading tensors; both start here, so the
file names and the checks of "is this a readable manifest at all" exist once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT_VERSION = 3  # 3: sparse indices delta-coded on disk ("index_coding": "delta8" in the memory table)
SUPPORTED_VERSIONS = (1, 2, 3)  # 2: memory streams of any form and the "memory" table; 1: sparse only
MANIFEST = "libortho.json"
BASE, ORTHO, REST = "base.safetensors", "ortho.safetensors", "rest.safetensors"
RESERVED = (MANIFEST, BASE, ORTHO, REST)


class CorruptDecompositionError(ValueError):
    """A file of a saved decomposition does not match its manifest (hash, size) or cannot be parsed."""


def read_manifest_json(path: str | Path) -> dict[str, Any]:
    """The manifest of decomposition directory ``path`` parsed as a JSON object; nothing more is checked."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"decomposition directory {path} not found")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath} not found: {path} is not a libortho decomposition (or was not finished)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptDecompositionError(f"{mpath} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise CorruptDecompositionError(f"{mpath} does not hold a JSON object: not a libortho manifest")
    return manifest
