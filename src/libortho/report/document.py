"""A tiny document model rendered to Markdown and to one self-contained HTML file.

A report is a list of blocks (heading, paragraph, table, figure, code); the same list renders to
Markdown (figures linked by relative path) and to HTML (figures inlined as base64 PNG, so the file
can be mailed or archived on its own). Text is escaped for HTML; ``**bold**`` and backticks are the
only inline markup understood.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    path: Path  # PNG file
    caption: str


@dataclass(frozen=True)
class Code:
    text: str


Block = Heading | Para | Table | Figure | Code


def to_markdown(blocks: list[Block], relative_to: Path) -> str:
    """Markdown text; figure paths are written relative to ``relative_to`` (the report's folder)."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(b.header) + " |", "|" + "|".join("---" for _ in b.header) + "|"]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in b.rows]
            out.append(("*" + b.caption + "*\n\n" if b.caption else "") + "\n".join(lines))
        elif isinstance(b, Figure):
            rel = Path(b.path).resolve().relative_to(relative_to.resolve())
            out.append(f"![{b.caption}]({rel.as_posix()})\n\n*{b.caption}*")
        elif isinstance(b, Code):
            out.append("```\n" + b.text.rstrip() + "\n```")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """HTML of one line of text with ``**bold**`` and ```code``` spans."""
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;
padding:.3em .6em;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{margin:1.5em 0}img{max-width:100%}figcaption{font-style:italic;color:#555}pre{background:#f6f8fa;padding:1em;
overflow-x:auto;font-size:.85em}code{background:#f3f3f3;padding:0 .2em}caption{caption-side:top;font-style:italic;
text-align:left;color:#555;padding-bottom:.3em}"""


def to_html(blocks: list[Block], title: str) -> str:
    """One self-contained HTML page (inline CSS, figures as base64 data URIs)."""
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append("<p>" + "<br>".join(_inline(line) for line in b.text.splitlines()) + "</p>")
        elif isinstance(b, Table):
            cap = f"<caption>{_inline(b.caption)}</caption>" if b.caption else ""
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            body.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Figure):
            data = base64.b64encode(Path(b.path).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(b.caption)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{_inline(b.caption)}</figcaption></figure>")
        elif isinstance(b, Code):
            body.append(f"<pre>{html.escape(b.text)}</pre>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def render_result(result_path: str | Path, out_dir: str | Path | None, experiment: str, needs: str, label: str,
                  build_blocks: Callable[[dict[str, Any], Path], list[Block]]) -> dict[str, Path]:
    """Read an experiment's ``result.json`` (refused unless its ``experiment`` and ``needs`` key are there), build
    its blocks (figures under ``out/figures``), write ``report.md`` and ``report.html`` atomically."""
    from libortho.atomic import atomic_write_text

    result_path = Path(result_path)
    if not result_path.is_file():
        raise FileNotFoundError(f"result file {result_path} not found")
    result = json.loads(result_path.read_text())
    if not isinstance(result, dict) or result.get("experiment") != experiment or needs not in result:
        raise ValueError(f"{result_path} is not {label} result ('experiment': '{experiment}' with {needs})")
    out = Path(out_dir) if out_dir is not None else result_path.parent
    blocks = build_blocks(result, out / "figures")
    md = atomic_write_text(out / "report.md", to_markdown(blocks, out))
    title = f"libortho {experiment}: {result['config']['model']}"
    page = atomic_write_text(out / "report.html", to_html(blocks, title))
    return {"markdown": md, "html": page, "figures": out / "figures"}
