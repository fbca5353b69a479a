"""The ``libortho`` command line: thin wrappers that validate, call the library and print.

Input errors are one line on stderr and exit code 2, never a traceback (``LIBORTHO_DEBUG=1`` re-raises
them, for bug reports). Nothing heavy is imported at module level: ``--help`` and input errors answer
in well under a second, and the library's workflows validate paths and numbers before they import
torch or load a model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from libortho.config import QuantConfig as _Q  # noqa: E402 - torch-free; the defaults' one source
from libortho.config import SelectConfig as _S  # noqa: E402

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


experiment_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                             help="Experiments that test the seed documents' claims.")
app.add_typer(experiment_app, name="experiment")


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


@experiment_app.command("kill-switch")
def kill_switch(
    model: Annotated[str, typer.Option(help="tiny (trained in the run), smollm2-135m, a HF dir or .gguf")] = "tiny",
    out: Annotated[Path | None, typer.Option(help="output folder (default runs/kill-switch-<model>)")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON file of KillSwitchConfig fields to override")] = None,
    seed: int | None = None,
    alphas: Annotated[str | None, typer.Option(help="comma-separated alpha values in [0, 1]")] = None,
    selector: str | None = None, rho: float | None = None, group_size: int | None = None,
    select_calibration: Annotated[str | None, typer.Option(help="public or private")] = None,
    unlearning: Annotated[str | None, typer.Option(help="comma-separated baselines")] = None,
    general: Annotated[str | None, typer.Option(help="general corpus (default: fortunes, else python-docs)")] = None,
    fresh: Annotated[bool, typer.Option(help="retrain everything instead of reusing cached models")] = False,
    quiet: bool = False,
) -> None:
    """Fine-tune on public text + private canaries, decompose, sweep alpha, compare with baselines, report."""
    from dataclasses import replace

    with _input_errors():
        out = out or Path("runs") / f"kill-switch-{Path(model).name}"
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} exists and is a file, not a directory: give a folder for --out")
        overrides = _config_file(config) if config is not None else {}
        from libortho.experiments.config import KillSwitchConfig, check_inputs, preset, with_overrides

        cfg = preset(model)
        if overrides:
            base = cfg.to_dict()  # a nested override ({"quant": {"group_size": 32}}) keeps the preset's other fields
            cfg = KillSwitchConfig.from_dict({**base, **{k: {**base[k], **v} if isinstance(v, dict) and
                                                         isinstance(base.get(k), dict) else v
                                                         for k, v in overrides.items()}})
        cfg = with_overrides(cfg, seed=seed, alphas=_floats(alphas), select_calibration=select_calibration,
                             unlearning=_names(unlearning), general=general)
        sel = {k: v for k, v in {"selector": selector, "rho": rho}.items() if v is not None}
        if sel:
            cfg = replace(cfg, select=replace(cfg.select, **sel))
        if group_size is not None:
            cfg = replace(cfg, quant=replace(cfg.quant, group_size=group_size))
        check_inputs(cfg)  # every name and path is known before any training starts
        from libortho.experiments.kill_switch import RESULT_FILE, run_kill_switch
        from libortho.report.kill_switch import compact_table, render_report

        result = run_kill_switch(cfg, out, progress=not quiet, fresh=fresh, console=Console(stderr=True))
        paths = render_report(out / RESULT_FILE)
    _print_table(compact_table(result))
    typer.echo(f"result: {out / RESULT_FILE}\nreport: {paths['markdown']}\n        {paths['html']}")


@experiment_app.command("geometry-table")
def geometry_table(
    model: Annotated[str, typer.Option(help="smollm2-135m (default), tiny (trained in the run), a HF dir or .gguf")
                     ] = "smollm2-135m",
    out: Annotated[Path | None, typer.Option(help="output folder (default runs/geometry-table-<model>)")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON file of GeometryTableConfig fields to override")] = None,
    fresh: Annotated[bool, typer.Option(help="rebuild every cached model and row")] = False,
    separation_results: Annotated[Path | None, typer.Option(
        help="a separation run's results folder: its best training-time method's recorded rows join the report")
    ] = None,
    quiet: bool = False,
) -> None:
    """Seeds' table 1 on the kill-switch benchmark: v1/v2 switches, the task-vector split, eta, LMC, spectra."""
    with _input_errors():
        out = out or Path("runs") / f"geometry-table-{Path(model).name}"
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} exists and is a file, not a directory: give a folder for --out")
        from libortho.experiments.config import check_inputs
        from libortho.experiments.geometry_table import RESULT_FILE, config_from_file, run_geometry_table
        from libortho.report.geometry import render_geometry_report, separation_seed_dir

        if separation_results is not None and (not separation_results.is_dir()
                                               or separation_seed_dir(separation_results) is None):
            raise FileNotFoundError(f"--separation-results {separation_results}: no seed<N>/evals there (give the "
                                    "results folder of a separation run)")
        cfg = config_from_file(config, model)
        cfg.check()
        check_inputs(cfg.bench)
        run_geometry_table(cfg, out, progress=not quiet, fresh=fresh, console=Console(stderr=True))
        paths = render_geometry_report(out / RESULT_FILE, separation_dir=separation_results)
    typer.echo(f"result: {out / RESULT_FILE}\nreport: {paths['markdown']}\n        {paths['html']}")


@experiment_app.command("separation")
def separation(
    model: Annotated[str, typer.Option(help="tiny (trained in the run), smollm2-135m, a HF dir or .gguf")] = "tiny",
    stage: Annotated[str, typer.Option(help="screening (1 seed, every method), confirmation (3 fresh seeds) "
                                            "or demo (tiny, one method)")] = "screening",
    out: Annotated[Path | None, typer.Option(help="output folder (default runs/separation-<stage>-<model>)")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON file of SeparationExpConfig fields to override")] = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated separation methods")] = None,
    seeds: Annotated[str | None, typer.Option(help="comma-separated seeds")] = None,
    cache: Annotated[Path | None, typer.Option(help="folder for trained models, memory streams and checkpoints "
                                                     "(default: OUT); OUT then holds JSON only, which can be "
                                                     "committed and resumed on another machine")] = None,
    fresh: Annotated[bool, typer.Option(help="retrain everything instead of reusing cached models")] = False,
    reuse: Annotated[list[Path] | None, typer.Option(
        help="out folder of another separation run: its rows under the same keys are copied, not measured "
             "again (repeatable)")] = None,
    quiet: bool = False,
) -> None:
    """Training-time separation: every method against plain fine-tuning, retraining and unlearning, at FP and INT4."""

    with _input_errors():
        out = out or Path("runs") / f"separation-{stage}-{Path(model).name}"
        for flag, path in (("--out", out), ("--cache", cache)):
            if path is not None and path.exists() and not path.is_dir():
                raise FileExistsError(f"{path} exists and is a file, not a directory: give a folder for {flag}")
        overrides = _config_file(config) if config is not None else {}
        from libortho.experiments.separation_config import run_config

        if stage not in ("screening", "confirmation", "demo"):
            raise ValueError(f"--stage must be screening, confirmation or demo, got {stage!r}")
        names = _names(methods)
        if stage == "confirmation" and not names:
            raise ValueError("--stage confirmation needs --methods: the method the screening ranked first, fixed "
                             "before the run starts")
        seed_list = None
        if seeds:
            try:
                seed_list = tuple(int(x) for x in seeds.split(",") if x.strip())
            except ValueError as err:
                raise ValueError(f"--seeds must be comma-separated integers, got {seeds!r}") from err
        cfg, changed = run_config(model, stage, out, fresh, overrides, names, seed_list)
        if changed:
            typer.echo(f"resuming the run in {out} with the config it started with (today's preset differs "
                       f"in: {', '.join(changed)}); --fresh starts over with today's", err=True)
        from libortho.experiments.config import check_inputs

        check_inputs(SimpleNamespace(model=cfg.model, domain=cfg.domain, general=cfg.general))
        from libortho.experiments.separation import RESULT_FILE, run_separation

        result = run_separation(cfg, out, progress=not quiet, console=Console(stderr=True), fresh=fresh,
                                cache_dir=cache, reuse=tuple(reuse or ()))
        paths = _render_separation(out / RESULT_FILE)
    from libortho.report.separation import compact_table

    _print_table(compact_table(result))
    for seed, s in result["summary"]["seeds"].items():
        typer.echo(f"seed {seed}: " + ", ".join(f"{r['method']} {r['met']}/5" for r in s["ranking"]))
    typer.echo(f"result: {out / RESULT_FILE}" + (f"\nreport: {paths['markdown']}" if paths else ""))


def _render_separation(path: Path) -> dict[str, Path] | None:
    """The separation report, when the renderer is available."""
    try:
        from libortho.report.separation import render_separation_report
    except ImportError:
        return None
    return render_separation_report(path)


@experiment_app.command("ablation")
def ablation(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny, or a HF directory")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="output folder (stages are cached there and resumed)")]
    = Path("runs/ablation-smollm2"),
    benchmarks: Annotated[str, typer.Option(help="comma-separated: planted, refusal")] = "planted,refusal",
    config: Annotated[Path | None, typer.Option(help="JSON file of AblationConfig fields to override")] = None,
    trials: Annotated[int | None, typer.Option(help="Optuna trials per benchmark (default 50)")] = None,
    kl_budget: Annotated[float | None, typer.Option(help="first-token KL budget on neutral prompts")] = None,
    seed: int | None = None, quiet: bool = False,
) -> None:
    """Planted behaviour and the model's own refusals: find, remove, measure (behaviour, KL, PPL), report."""
    with _input_errors():
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} exists and is a file, not a directory: give a folder for --out")
        from libortho.experiments.ablation import AblationConfig, run_ablation

        fields = _config_file(config) if config is not None else {}
        fields.update({k: v for k, v in {"n_trials": trials, "kl_budget": kl_budget, "seed": seed}.items()
                       if v is not None})
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        known = set(AblationConfig.__dataclass_fields__) - {"model", "benchmarks"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown AblationConfig field(s) {unknown} in {config} "
                             f"(known: {', '.join(sorted(known))})")
        cfg = AblationConfig(model=model, benchmarks=_names(benchmarks) or (), **fields)
        from libortho.report.ablation import render_ablation_report

        result = run_ablation(cfg, out, progress=not quiet)
        paths = render_ablation_report(out / "result.json")
    del result
    typer.echo(f"result: {out / 'result.json'}\nreport: {paths['markdown']}\n        {paths['html']}")


def _overrides(config: Path | None, cls: type) -> dict[str, Any]:
    """The fields a ``--config`` JSON file sets for the dataclass ``cls`` (``model`` comes from its option)."""
    fields = _config_file(config) if config is not None else {}
    known = set(cls.__dataclass_fields__) - {"model"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown} in {config} (known: {', '.join(sorted(known))})")
    return fields


@experiment_app.command("lattice")
def lattice(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny, or a HF directory")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="output folder (stages are cached there and resumed)")]
    = Path("runs/lattice-smollm2"),
    config: Annotated[Path | None, typer.Option(help="JSON file of LatticeConfig fields to override")] = None,
    quiet: bool = False,
) -> None:
    """GPTQ as Babai on a real model: the bound per layer, column orders on perplexity, LLL on Hessian blocks."""
    with _input_errors():
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} exists and is a file, not a directory: give a folder for --out")
        from libortho.experiments.lattice import LatticeConfig, run_lattice
        from libortho.report.lattice import render_lattice_report

        cfg = LatticeConfig(model=model, **_overrides(config, LatticeConfig))
        run_lattice(cfg, out, progress=not quiet)
        paths = render_lattice_report(out / "result.json")
    typer.echo(f"result: {out / 'result.json'}\nreport: {paths['markdown']}\n        {paths['html']}")


@experiment_app.command("genius")
def genius(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny, or a HF directory")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="output folder (evaluations are cached there and resumed)")]
    = Path("runs/genius-smollm2"),
    config: Annotated[Path | None, typer.Option(help="JSON file of GeniusConfig fields to override")] = None,
    quiet: bool = False,
) -> None:
    """Reasoning probe at FP32, pure INT4/3/2 and INT3/2 + ortho stream (seed 002's "saving the genius")."""
    with _input_errors():
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} exists and is a file, not a directory: give a folder for --out")
        from libortho.experiments.genius import GeniusConfig, run_genius
        from libortho.report.genius import render_genius_report

        cfg = GeniusConfig(model=model, **_overrides(config, GeniusConfig))
        run_genius(cfg, out, progress=not quiet)
        paths = render_genius_report(out / "result.json")
    typer.echo(f"result: {out / 'result.json'}\nreport: {paths['markdown']}\n        {paths['html']}")


@experiment_app.command("census")
def census(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny, or a HF directory")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="output folder (the fine-tuned model and every group are cached there)")]
    = Path("runs/census-smollm2"),
    config: Annotated[Path | None, typer.Option(help="JSON file of CensusConfig fields to override")] = None,
    quiet: bool = False,
) -> None:
    """Outlier census: functional (dPPL) and sensitive (dAUC) groups, their geometry, a 2-D map (seed 004)."""
    with _input_errors():
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} exists and is a file, not a directory: give a folder for --out")
        from libortho.experiments.census import CensusConfig, run_census
        from libortho.report.census import render_census_report

        cfg = CensusConfig(model=model, **_overrides(config, CensusConfig))
        run_census(cfg, out, progress=not quiet)
        paths = render_census_report(out / "result.json")
    typer.echo(f"result: {out / 'result.json'}\nreport: {paths['markdown']}\n        {paths['html']}")


def _print_table(t: Any) -> None:
    """A report table on the terminal (at least 120 columns wide, also when piped to a file)."""
    table = Table(*t.header, title=t.caption, title_justify="left")
    for row in t.rows:
        table.add_row(*[c.replace("**", "") for c in row])
    Console(width=max(console.width, 120)).print(table)


def _result_json(path: Path) -> dict[str, Any]:
    """An experiment's result.json, refused early when it is not one (nothing is written then)."""
    if not path.is_file():
        raise FileNotFoundError(f"result file {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    need = {"kill_switch": "summary", "separation": "seeds", "ablation": "benchmarks", "lattice": "runs",
            "genius": "evals", "census": "records"}
    kind = data.get("experiment") if isinstance(data, dict) else None
    if kind not in need or need[kind] not in data:
        raise ValueError(f"{path} is not an experiment's result.json (needs 'experiment': 'kill_switch' with "
                         "'summary', 'separation' with 'seeds', 'ablation' with 'benchmarks', 'lattice' with 'runs', "
                         "'genius' with 'evals' or 'census' with 'records')")
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
        if data["experiment"] in ("ablation", "lattice", "genius", "census"):
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
