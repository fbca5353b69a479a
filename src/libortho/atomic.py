"""Atomic file operations: the one home for "write beside, fsync, rename into place".

Every writer in libortho (the decomposition format in :mod:`libortho.io`, training checkpoints,
the model cache, experiment results, reports, figures, benchmark JSON) goes through these few
functions, so a crash or an exception never leaves a half-written file or directory behind and an
existing target is replaced only once the new one is complete. Nothing here knows about tensors
beyond turning them into JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_default(o: Any) -> Any:
    """JSON for the odd types configs carry: tensors, paths, dtypes, dataclasses, enums, sets."""
    import torch  # local: keeps this module importable (and fast) without torch loaded

    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path | torch.dtype):
        return str(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, enum.Enum):
        return o.value
    if isinstance(o, set | frozenset):
        return sorted(o, key=str)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """Permissions a plain ``open``/``mkdir`` would give (temp files and dirs are created private)."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write_file(path: str | Path, write: Callable[[Path], None], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, fsync, then rename it into place.

    ``suffix`` lets writers that infer the format from the name (matplotlib) see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text (UTF-8) atomically; see :func:`atomic_write_file`."""
    return atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON (indented, odd types converted) atomically; see :func:`atomic_write_file`."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def read_json_object(path: str | Path, what: str, remedy: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; an unreadable file or another JSON value is a one-line ``ValueError`` that
    names the file, says it is not a valid ``what`` and (``remedy``) what to do about it."""
    tail = f": {remedy}" if remedy else ""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a valid {what} ({err}){tail}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a valid {what} (a JSON {type(data).__name__}, not an object){tail}")
    return data


def replace_dir(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is first moved aside, then deleted."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path`` (an old one is
    moved aside, then deleted), on any error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        os.chmod(tmp, default_mode(directory=True))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
