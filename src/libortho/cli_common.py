"""What every ``libortho`` command shares: the environment, the consoles, one-line errors, config files.

Importing it is cheap (no torch): ``--help`` and input errors stay fast.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

# Known import-time noise of third-party packages, dropped by exact message: transformers imports
# torchao whenever it is installed (transformers/quantizers/auto.py -> quantizer_torchao), which logs
# its optional CUDA extensions it cannot load on a CPU machine and registers enums torch now warns about.
_NOISE = {"torchao": "Failed to load ", "torch.utils._pytree": "is an Enum subclass and is now natively supported"}


class _DropNoise(logging.Filter):
    """Drop one logger's records whose message contains a known fragment; keep everything else."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


for _name, _fragment in _NOISE.items():
    logging.getLogger(_name).addFilter(_DropNoise(_fragment))

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Split an LLM into an INT-b base stream and a sparse ortho stream with an alpha switch.")
console = Console()
err_console = Console(stderr=True, soft_wrap=True, highlight=False)
INPUT_ERRORS = (ValueError, OSError, KeyError, RuntimeError, FloatingPointError)


def _fail(msg: str) -> None:
    """One line on stderr, exit code 2."""
    err_console.print(f"[bold red]error:[/] {escape(' '.join(str(msg).split()))}", markup=True)
    raise typer.Exit(2)


@contextmanager
def _input_errors() -> Iterator[None]:
    """Turn the library's refusals into :func:`_fail` (a one-line message) unless LIBORTHO_DEBUG is set."""
    try:
        yield
    except INPUT_ERRORS as err:
        if os.environ.get("LIBORTHO_DEBUG"):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        _fail(str(msg) or type(err).__name__)


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise ValueError(f"--alphas must be comma-separated numbers, got {text!r}") from err


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


def _config_file(path: Path) -> dict[str, Any]:
    """A JSON object of KillSwitchConfig fields."""
    from libortho.atomic import read_json_object

    return read_json_object(path, "config file", "give a JSON object of config fields")


def _overrides(config: Path | None, cls: type) -> dict[str, Any]:
    """The fields a ``--config`` JSON file sets for the dataclass ``cls`` (``model`` comes from its option)."""
    fields = _config_file(config) if config is not None else {}
    known = set(cls.__dataclass_fields__) - {"model"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown} in {config} (known: {', '.join(sorted(known))})")
    return fields


def _run_and_report(out: Path, make_config: Any, run: Any, render: Any, quiet: bool) -> None:
    """Check ``out``, build the configuration (refusing bad fields before any work), run, render the report."""
    with _input_errors():
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} exists and is a file, not a directory: give a folder for --out")
        cfg = make_config()
        run(cfg, out, progress=not quiet)
        paths = render(out / "result.json")
    typer.echo(f"result: {out / 'result.json'}\nreport: {paths['markdown']}\n        {paths['html']}")


def _print_table(t: Any) -> None:
    """A report table on the terminal (at least 120 columns wide, also when piped to a file)."""
    table = Table(*t.header, title=t.caption, title_justify="left")
    for row in t.rows:
        table.add_row(*[c.replace("**", "") for c in row])
    Console(width=max(console.width, 120)).print(table)
