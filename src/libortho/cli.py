"""The ``libortho`` command line: thin wrappers that validate, call the library and print.

Input errors are one line on stderr and exit code 2, never a traceback (``LIBORTHO_DEBUG=1`` re-raises
them, for bug reports). Nothing heavy is imported at module level: ``--help`` and input errors answer
in well under a second, and the library's workflows validate paths and numbers before they import
torch or load a model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from libortho.cli_common import (
    INPUT_ERRORS,
    _input_errors,
    _names,
    _print_table,
    app,
    console,
)
from libortho.cli_experiments import experiment_app
from libortho.config import QuantConfig as _Q  # torch-free; the defaults' one source
from libortho.config import SelectConfig as _S

__all__ = ["INPUT_ERRORS", "app"]

app.add_typer(experiment_app, name="experiment")

DecDir = Annotated[Path, typer.Argument(help="a saved decomposition directory", metavar="DIR", show_default=False)]
AlphaOpt = Annotated[float, typer.Option(help="the privacy switch, in [0, 1]: 0 = base stream only, 1 = full ortho")]


@app.command()
def decompose(
    model: Annotated[str, typer.Argument(help="smollm2-135m, tiny, a HF directory or a .gguf file", metavar="MODEL")],
    out: Annotated[Path, typer.Argument(help="output directory (new or empty unless --overwrite)", metavar="OUT")],
    bits: int = _Q.bits, group_size: int = _Q.group_size, method: str = _Q.method, grid: str = _Q.grid,
    act_order: bool = _Q.act_order, symmetric: bool = _Q.symmetric,
    rho: float = _S.rho, selector: str = _S.selector, scope: str = _S.scope,
    tau: Annotated[float | None, typer.Option(help="score threshold (overrides rho)")] = None,
    values: str = _S.values, ortho_dtype: str = _S.dtype, no_ortho: bool = False,
    joint: Annotated[bool, typer.Option(help="choose the ortho support inside GPTQ's loop (SpQR-style)")] = _S.joint,
    curvature: Annotated[str, typer.Option(help="what the selector scores with: hessian (GPTQ's layer H) or kfac "
                                                "(K-FAC factors fitted on the calibration; selectors kfac, "
                                                "kfac-eigen, kfac-lambda build low-rank streams)")] = _S.curvature,
    kfac_fisher: Annotated[str, typer.Option(help="K-FAC labels: true (sampled from the model) or empirical")
                           ] = _S.kfac_fisher,
    kfac_damp: Annotated[float, typer.Option(help="K-FAC damping, fraction of each factor's mean eigenvalue")
                         ] = _S.kfac_damp,
    calib: Annotated[list[str] | None, typer.Option(help="corpus name or text file; repeat to mix")] = None,
    n_calib: int = 128, seq_len: int = 512, seed: int = 0, overwrite: bool = False,
) -> None:
    """Decompose MODEL into base + ortho streams and save them to OUT."""
    with _input_errors():
        from libortho.workflows import check_out_dir

        check_out_dir(out, overwrite)  # before importing torch: a wrong OUT answers at once
        from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
        from libortho.workflows import decompose_and_save

        cfg = DecomposeConfig(
            quant=QuantConfig(bits=bits, group_size=group_size, method=method, grid=grid,
                              act_order=act_order, symmetric=symmetric),
            select=SelectConfig(selector=selector, rho=rho, scope=scope, tau=tau, values=values,
                                dtype=ortho_dtype, joint=joint, curvature=curvature, kfac_fisher=kfac_fisher,
                                kfac_damp=kfac_damp),
            ortho=not no_ortho)
        summary = decompose_and_save(model, out, cfg, calib or ["shakespeare"], n_calib, seq_len,
                                     seed, overwrite)
    console.print_json(json.dumps(summary))


@app.command()
def finetune(
    model: Annotated[str, typer.Argument(help="smollm2-135m, tiny, a HF directory or a .gguf file", metavar="MODEL")],
    private: Annotated[Path, typer.Option(help="JSONL records: {text, secret?, private?, id?} a line",
                                          show_default=False)],
    method: Annotated[str, typer.Option(help="separation method: mask, memsink, ogd, route, two-phase",
                                        show_default=False)],
    out: Annotated[Path, typer.Option(help="output directory (new or empty unless --overwrite)", show_default=False)],
    public: Annotated[list[str] | None, typer.Option(help="corpus name or text file; repeat to mix "
                                                         "[default: shakespeare]")] = None,
    nonmembers: Annotated[Path | None, typer.Option(help="JSONL records never trained on (report MIA)")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps (instead of --epochs)")] = None,
    epochs: Annotated[float | None, typer.Option(help="passes over the rows [default: 1]")] = None,
    lr: float = 1e-4, batch_size: int = 8, block_len: int = 256, n_public_blocks: int = 256,
    repeats: Annotated[int, typer.Option(help="copies of each record in the training rows")] = 1,
    bits: int = 4, group_size: int = 64, n_calib: int = 64, seq_len: int = 256, seed: int = 0,
    report: Annotated[Path | None, typer.Option(help="privacy report JSON, written outside OUT")] = None,
    show_secrets: Annotated[bool, typer.Option(help="per-record details, secrets included, in the report")]
    = False,
    secret_space: Annotated[str | None, typer.Option(help="the secrets' space for exposure in the report, "
                                                          "ALPHABET:LENGTH (digits:4, hex:8, abc:5)")] = None,
    fake_quant: Annotated[float, typer.Option(help="last share of training run on the base fake-quantized to "
                                                   "the saved INT-b grid (0: off)")] = 0.0,
    ogd_gradient_energy: Annotated[float | None, typer.Option(
        help="ogd: also keep memory updates off the public output-gradient subspace at this energy")] = None,
    bf16: bool = False, overwrite: bool = False, quiet: bool = False,
) -> None:
    """Fine-tune MODEL on public text + private records; save base (INT-b) + memory (ortho) streams to OUT."""
    with _input_errors():
        from libortho.finetune import finetune_and_save

        summary = finetune_and_save(
            model, out, private, public or ["shakespeare"], method, nonmembers=nonmembers, steps=steps,
            epochs=epochs, lr=lr, batch_size=batch_size, block_len=block_len, n_public_blocks=n_public_blocks,
            repeats=repeats, bits=bits, group_size=group_size, n_calib=n_calib, seq_len=seq_len, seed=seed,
            bf16=bf16, overwrite=overwrite, progress=not quiet, report=report, show_secrets=show_secrets,
            secret_space=secret_space, fake_quant=fake_quant, ogd_gradient_energy=ogd_gradient_energy)
    console.print_json(json.dumps(summary))


@app.command()
def generate(path: DecDir, prompt: str, alpha: AlphaOpt = 1.0, max_new_tokens: int = 40,
             behaviour_alpha: Annotated[float, typer.Option(help="the behaviour stream's switch (if DIR has one): "
                                                                 "1 = edit applied, 0 = unedited")] = 1.0) -> None:
    """Greedy-generate a continuation of PROMPT with the decomposition in DIR."""
    with _input_errors():
        from libortho.workflows import generate_text

        text = generate_text(path, prompt, alpha, max_new_tokens, behaviour_alpha)
    typer.echo(text)  # the model's text verbatim: no markup, emoji codes or wrapping


@app.command()
def ppl(path: DecDir, alpha: AlphaOpt = 1.0,
        text: Annotated[str, typer.Option(help="corpus name (held-out split) or your text file (scored whole)")]
        = "shakespeare",
        n_blocks: Annotated[int | None, typer.Option(help="blocks: corpus default 32; a file: only the first N")]
        = None,
        seq_len: int = 512, seed: int = 0) -> None:
    """Perplexity of the decomposition in DIR on TEXT at a given alpha."""
    with _input_errors():
        from libortho.workflows import perplexity_of

        res = perplexity_of(path, alpha, text, n_blocks, seq_len, seed)
    typer.echo(f"ppl={res['ppl']:.4f} nll={res['nll']:.5f} alpha={alpha:g} tokens={res['tokens']} "
               f"(tokens scored; {res['scope']})")


@app.command()
def geometry(a: Annotated[str, typer.Argument(help="model A: a decomposition or HF directory, or a model name",
                                              metavar="A")],
             b: Annotated[str, typer.Argument(help="model B, the same architecture", metavar="B")],
             out: Annotated[Path, typer.Option(help="where geometry.json and geometry.png go")] = Path("geometry"),
             alpha_a: Annotated[float, typer.Option(help="alpha of A when it is a decomposition")] = 1.0,
             alpha_b: Annotated[float, typer.Option(help="alpha of B when it is a decomposition")] = 1.0,
             text: Annotated[str | None, typer.Option(help="corpus for the loss path (none: no path)")] = None,
             n_blocks: int = 4, seq_len: int = 256, points: int = 11, energy: float = 0.9) -> None:
    """Update spectra of B - A per linear layer and, with --text, the loss path and its barrier."""
    with _input_errors():
        from libortho.geometry.compare import run_geometry

        res = run_geometry(a, b, out, alpha_a, alpha_b, text, n_blocks, seq_len, points, energy)
    w = res["weights"]
    table = Table("layer", "|dW|/|W|", "stable rank", f"rank @ {w['energy']:.0%}", "top singular values")
    for n, r in w["layers"].items():
        table.add_row(n, f"{r['rel_change']:.4g}", f"{r['stable_rank']:.2f}", str(r["rank_at_energy"]),
                      ", ".join(f"{v:.3g}" for v in r["top_singular_values"][:3]))
    Console(width=max(console.width, 120)).print(table)
    typer.echo(f"overall |dW|/|W| = {w['rel_change']:.4g}, mean stable rank {w['mean_stable_rank']:.2f}")
    if "lmc" in res:
        typer.echo(f"loss path on {res['lmc']['text']}: barrier {res['lmc']['barrier']:.5f} "
                   f"(ends {res['lmc']['losses'][0]:.4f} -> {res['lmc']['losses'][-1]:.4f} nats)")
    typer.echo(f"wrote {out / 'geometry.json'} and {out / 'geometry.png'}")


@app.command()
def info(path: DecDir) -> None:
    """Sizes, bits per parameter and ortho density per layer of a saved decomposition."""
    with _input_errors():
        from libortho.workflows import describe

        d = describe(path)
    table = Table("layer", "shape", "bits", "group", "kernel", "ortho nnz", "density")
    for row in d["layers"]:
        table.add_row(row["name"], "x".join(map(str, row["shape"])), str(row["bits"]),
                      str(row["group_size"]), row["kernel"], str(row["nnz"]), f"{row['density']:.4%}")
    Console(width=max(console.width, 120)).print(table)  # full layer names, also when piped
    console.print({k: v for k, v in d.items() if k != "layers"})


@app.command()
def ablate(
    model: Annotated[str, typer.Argument(help="smollm2-135m, tiny, a HF directory or a saved decomposition",
                                         metavar="MODEL")],
    with_: Annotated[Path, typer.Option("--with", help="JSONL prompts that show the behaviour (A)",
                                        show_default=False)],
    without: Annotated[Path, typer.Option(help="JSONL prompts that do not (B), matched to A where possible",
                                          show_default=False)],
    out: Annotated[Path, typer.Option(help="output directory (new or empty unless --overwrite)", show_default=False)],
    stream: Annotated[bool, typer.Option(help="keep the edit as a behaviour stream with its own alpha instead of "
                                              "writing it into the weights")] = False,
    strength: Annotated[float, typer.Option(help="lambda: 1 projects the direction out")] = 1.0,
    min_fraction: Annotated[float, typer.Option(help="edit (and aggregate over) layers l >= this * L")] = 0.7,
    direction_layer: Annotated[int | None, typer.Option(help="use this layer's own direction, not the aggregate")
                               ] = None,
    per_layer: Annotated[bool, typer.Option(help="edit each layer along its own direction")] = False,
    positions: Annotated[str, typer.Option(help="last (last prompt token) or post_instruction")] = "last",
    held_out: Annotated[float, typer.Option(help="share of templates (else prompts) held out for before/after")
                        ] = 0.25,
    markers: Annotated[str | None, typer.Option(help="comma-separated behaviour markers (default: refusals)")
                       ] = None,
    seed: int = 0, overwrite: bool = False,
) -> None:
    """Find the direction separating A from B and project it out of the residual writers of the late layers."""
    with _input_errors():
        from libortho.behaviour_edit import ablate_and_save

        summary = ablate_and_save(model, with_, without, out, stream=stream, strength=strength,
                                  min_fraction=min_fraction, direction_layer=direction_layer, positions=positions,
                                  per_layer=per_layer,
                                  held_out_fraction=held_out, markers=_names(markers), seed=seed, overwrite=overwrite)
    console.print_json(json.dumps(summary))


def _result_json(path: Path) -> dict[str, Any]:
    """An experiment's result.json, refused early when it is not one (nothing is written then)."""
    if not path.is_file():
        raise FileNotFoundError(f"result file {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    need = {"kill_switch": "summary", "separation": "seeds", "ablation": "benchmarks", "lattice": "runs",
            "genius": "evals", "census": "records", "dual_dp_noise": "points", "geoq": "arms",
            "dual_dp_sgd": "points"}
    kind = data.get("experiment") if isinstance(data, dict) else None
    if kind not in need or need[kind] not in data:
        kinds = ", ".join(f"'{k}' with '{v}'" for k, v in need.items())
        raise ValueError(f"{path} is not an experiment's result.json (needs 'experiment' as one of: {kinds})")
    return data


def _renderer(kind: str) -> Any:
    """The report renderer of an experiment kind that has no terminal table."""
    if kind == "ablation":
        from libortho.report.ablation import render_ablation_report

        return render_ablation_report
    if kind == "lattice":
        from libortho.report.lattice import render_lattice_report

        return render_lattice_report
    if kind == "census":
        from libortho.report.census import render_census_report

        return render_census_report
    if kind == "dual_dp_noise":
        from libortho.report.dual_dp import render_dual_dp_report

        return render_dual_dp_report
    if kind == "geoq":
        from libortho.report.geoq import render_geoq_report

        return render_geoq_report
    if kind == "dual_dp_sgd":
        from libortho.report.dual_dp_sgd import render_dpsgd_report

        return render_dpsgd_report
    from libortho.report.genius import render_genius_report

    return render_genius_report


@app.command()
def report(result: Annotated[Path, typer.Argument(help="an experiment's result.json", metavar="RESULT")],
           out: Annotated[Path | None, typer.Option(help="where to write (default: beside RESULT)")] = None) -> None:
    """Render plots and the Markdown + HTML report of an experiment result."""
    with _input_errors():
        data = _result_json(result)
        if out is not None and out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} exists and is a file, not a directory: give a folder for --out")
        if data["experiment"] not in ("separation", "kill_switch"):
            paths = _renderer(data["experiment"])(result, out)
            typer.echo(f"report: {paths['markdown']}\n        {paths['html']}")
            return
        if data["experiment"] == "separation":
            from libortho.report.separation import compact_table, load_separation, render_separation_report

            paths = render_separation_report(result, out)
            data = load_separation(result)
        else:
            from libortho.report.kill_switch import compact_table, render_report

            paths = render_report(result, out)
    _print_table(compact_table(data))
    typer.echo(f"report: {paths['markdown']}\n        {paths['html']}")


@app.command()
def demo(out: Annotated[Path, typer.Option(help="output directory (new or empty unless --overwrite)")]
         = Path("runs/libortho-demo"),
         model: str = "smollm2-135m",
         overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists and is not empty")] = False) -> None:
    """Decompose the embedded default model, compare perplexity at alpha 0 and 1, generate."""
    with _input_errors():
        from libortho.workflows import check_out_dir

        check_out_dir(out, overwrite)
        from libortho.workflows import run_demo

        run_demo(model, out, console, overwrite=overwrite)


if __name__ == "__main__":
    app()
