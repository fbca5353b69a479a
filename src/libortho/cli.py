"""The ``libortho`` command line: thin wrappers that parse, call the library and print."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Split an LLM into an INT-b base stream and a sparse ortho stream with an alpha switch.")
console = Console()


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


@app.command()
def decompose(
    model: Annotated[str, typer.Argument(help="smollm2-135m, tiny, a HF directory or a .gguf file")],
    out: Annotated[Path, typer.Argument(help="output directory (must not exist unless --overwrite)")],
    bits: int = 4, group_size: int = 128, method: str = "gptq", grid: str = "minmax",
    act_order: bool = False, symmetric: bool = False,
    rho: float = 0.01, selector: str = "obs", scope: str = "layer",
    tau: Annotated[float | None, typer.Option(help="score threshold (overrides rho)")] = None,
    values: str = "residual", ortho_dtype: str = "fp16", no_ortho: bool = False,
    calib: Annotated[list[str], typer.Option(help="corpus name or text file; repeat to mix")] = None,
    n_calib: int = 128, seq_len: int = 512, seed: int = 0, overwrite: bool = False,
) -> None:
    """Decompose MODEL into base + ortho streams and save them to OUT."""
    from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
    from libortho.workflows import decompose_and_save

    try:
        cfg = DecomposeConfig(
            quant=QuantConfig(bits=bits, group_size=group_size, method=method, grid=grid,
                              act_order=act_order, symmetric=symmetric),
            select=SelectConfig(selector=selector, rho=rho, scope=scope, tau=tau, values=values,
                                dtype=ortho_dtype),
            ortho=not no_ortho)
        summary = decompose_and_save(model, out, cfg, calib or ["shakespeare"], n_calib, seq_len,
                                     seed, overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        _fail(str(err))
    console.print_json(json.dumps(summary))


@app.command()
def generate(path: Path, prompt: str, alpha: float = 1.0, max_new_tokens: int = 40) -> None:
    """Greedy-generate a continuation of PROMPT with the decomposition at PATH."""
    from libortho.workflows import generate_text

    try:
        console.print(generate_text(path, prompt, alpha, max_new_tokens))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(str(err))


@app.command()
def ppl(path: Path, alpha: float = 1.0,
        text: Annotated[str, typer.Option(help="corpus name or text file")] = "shakespeare",
        n_blocks: int = 32, seq_len: int = 512, seed: int = 0) -> None:
    """Perplexity of the decomposition at PATH on held-out TEXT at a given alpha."""
    from libortho.workflows import perplexity_of

    try:
        res = perplexity_of(path, alpha, text, n_blocks, seq_len, seed)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(str(err))
    console.print(f"ppl={res['ppl']:.4f} nll={res['nll']:.5f} tokens={res['tokens']} alpha={alpha}")


@app.command()
def info(path: Path) -> None:
    """Sizes, bits per parameter and ortho density per layer of a saved decomposition."""
    from libortho.workflows import describe

    try:
        d = describe(path)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    table = Table("layer", "shape", "bits", "group", "ortho nnz", "density")
    for row in d["layers"]:
        table.add_row(row["name"], "x".join(map(str, row["shape"])), str(row["bits"]),
                      str(row["group_size"]), str(row["nnz"]), f"{row['density']:.4%}")
    console.print(table)
    console.print({k: v for k, v in d.items() if k != "layers"})


experiment_app = typer.Typer(no_args_is_help=True, help="Experiments that test the seed documents' claims.")
app.add_typer(experiment_app, name="experiment")


def _floats(text: str | None) -> tuple[float, ...] | None:
    return None if text is None else tuple(float(x) for x in text.split(",") if x.strip())


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


@experiment_app.command("kill-switch")
def kill_switch(
    model: Annotated[str, typer.Option(help="tiny (trained in the run), smollm2-135m, a HF dir or .gguf")] = "tiny",
    out: Annotated[Path | None, typer.Option(help="output folder (default runs/kill-switch-<model>)")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON file of KillSwitchConfig fields to override")] = None,
    seed: int | None = None,
    alphas: Annotated[str | None, typer.Option(help="comma-separated alpha values")] = None,
    selector: str | None = None, rho: float | None = None, group_size: int | None = None,
    select_calibration: Annotated[str | None, typer.Option(help="public or private")] = None,
    unlearning: Annotated[str | None, typer.Option(help="comma-separated baselines")] = None,
    general: Annotated[str | None, typer.Option(help="general corpus (default: fortunes, else python-docs)")] = None,
    fresh: Annotated[bool, typer.Option(help="retrain everything instead of reusing cached models")] = False,
    quiet: bool = False,
) -> None:
    """Fine-tune on public text + private canaries, decompose, sweep alpha, compare with baselines, report."""
    from dataclasses import replace

    from libortho.experiments.config import KillSwitchConfig, preset, with_overrides
    from libortho.experiments.kill_switch import RESULT_FILE, run_kill_switch
    from libortho.report.kill_switch import compact_table, render_report

    try:
        cfg = preset(model)
        if config is not None:
            cfg = KillSwitchConfig.from_dict({**cfg.to_dict(), **json.loads(config.read_text())})
        cfg = with_overrides(cfg, seed=seed, alphas=_floats(alphas), select_calibration=select_calibration,
                             unlearning=_names(unlearning), general=general)
        sel = {k: v for k, v in {"selector": selector, "rho": rho}.items() if v is not None}
        if sel:
            cfg = replace(cfg, select=replace(cfg.select, **sel))
        if group_size is not None:
            cfg = replace(cfg, quant=replace(cfg.quant, group_size=group_size))
        out = out or Path("runs") / f"kill-switch-{Path(model).name}"
        result = run_kill_switch(cfg, out, progress=not quiet, fresh=fresh, console=Console(stderr=True))
        paths = render_report(out / RESULT_FILE)
    except (ValueError, FileNotFoundError, KeyError, FloatingPointError, json.JSONDecodeError) as err:
        _fail(str(err))
    _print_table(compact_table(result))
    console.print(f"result: {out / RESULT_FILE}\nreport: {paths['markdown']}\n        {paths['html']}")


def _print_table(t: object) -> None:
    """A report table on the terminal (at least 120 columns wide, also when piped to a file)."""
    table = Table(*t.header, title=t.caption, title_justify="left")
    for row in t.rows:
        table.add_row(*[c.replace("**", "") for c in row])
    Console(width=max(console.width, 120)).print(table)


@app.command()
def report(result: Annotated[Path, typer.Argument(help="an experiment's result.json")],
           out: Annotated[Path | None, typer.Option(help="where to write (default: beside RESULT)")] = None) -> None:
    """Render plots and the Markdown + HTML report of an experiment result."""
    from libortho.report.kill_switch import compact_table, render_report

    try:
        paths = render_report(result, out)
        _print_table(compact_table(json.loads(result.read_text())))
    except (ValueError, FileNotFoundError, KeyError) as err:
        _fail(str(err))
    console.print(f"report: {paths['markdown']}\n        {paths['html']}")


@app.command()
def demo(out: Path = Path("runs/demo"), model: str = "smollm2-135m") -> None:
    """Decompose the embedded default model, compare perplexity at alpha 0 and 1, generate."""
    from libortho.workflows import run_demo

    run_demo(model, out, console)


if __name__ == "__main__":
    app()
