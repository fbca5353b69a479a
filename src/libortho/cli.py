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


@app.command()
def demo(out: Path = Path("runs/demo"), model: str = "smollm2-135m") -> None:
    """Decompose the embedded default model, compare perplexity at alpha 0 and 1, generate."""
    from libortho.workflows import run_demo

    run_demo(model, out, console)


if __name__ == "__main__":
    app()
