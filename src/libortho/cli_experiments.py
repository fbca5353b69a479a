"""``libortho experiment ...``: one command per experiment that tests a seed's claims (thin: parse, run, render)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer
from rich.console import Console

from libortho.cli_common import (
    _config_file,
    _floats,
    _input_errors,
    _names,
    _overrides,
    _print_table,
    _run_and_report,
)

experiment_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                             help="Experiments that test the seed documents' claims.")


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


@experiment_app.command("lattice")
def lattice(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny, or a HF directory")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="output folder (stages are cached there and resumed)")]
    = Path("runs/lattice-smollm2"),
    config: Annotated[Path | None, typer.Option(help="JSON file of LatticeConfig fields to override")] = None,
    quiet: bool = False,
) -> None:
    """GPTQ as Babai on a real model: the bound per layer, column orders on perplexity, LLL on Hessian blocks."""
    from libortho.experiments.lattice import LatticeConfig, run_lattice
    from libortho.report.lattice import render_lattice_report

    _run_and_report(out, lambda: LatticeConfig(model=model, **_overrides(config, LatticeConfig)), run_lattice,
                    render_lattice_report, quiet)


@experiment_app.command("genius")
def genius(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny, or a HF directory")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="output folder (evaluations are cached there and resumed)")]
    = Path("runs/genius-smollm2"),
    config: Annotated[Path | None, typer.Option(help="JSON file of GeniusConfig fields to override")] = None,
    quiet: bool = False,
) -> None:
    """Reasoning probe at FP32, pure INT4/3/2 and INT3/2 + ortho stream (seed 002's "saving the genius")."""
    from libortho.experiments.genius import GeniusConfig, run_genius
    from libortho.report.genius import render_genius_report

    _run_and_report(out, lambda: GeniusConfig(model=model, **_overrides(config, GeniusConfig)), run_genius,
                    render_genius_report, quiet)


@experiment_app.command("census")
def census(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny, or a HF directory")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="output folder (the fine-tuned model and every group are cached there)")]
    = Path("runs/census-smollm2"),
    config: Annotated[Path | None, typer.Option(help="JSON file of CensusConfig fields to override")] = None,
    quiet: bool = False,
) -> None:
    """Outlier census: functional (dPPL) and sensitive (dAUC) groups, their geometry, a 2-D map (seed 004)."""
    from libortho.experiments.census import CensusConfig, run_census
    from libortho.report.census import render_census_report

    _run_and_report(out, lambda: CensusConfig(model=model, **_overrides(config, CensusConfig)), run_census,
                    render_census_report, quiet)


@experiment_app.command("dual-dp")
def dual_dp(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny, or a HF directory")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="output folder (the fine-tuned model and every point are cached there)")]
    = Path("runs/dual-dp-smollm2"),
    config: Annotated[Path | None, typer.Option(help="JSON file of NoiseSweepConfig fields to override")] = None,
    models_dir: Annotated[str, typer.Option(help="where the fine-tuned model is cached (default OUT/models); "
                                                 "dual-dp and geoq can share one")] = "",
    quiet: bool = False,
) -> None:
    """Dual DP, noise arm: Gaussian noise on the ortho stream only vs on all weights, utility vs leakage."""
    from libortho.experiments.dual_dp import NoiseSweepConfig, run_noise_sweep
    from libortho.report.dual_dp import render_dual_dp_report

    _run_and_report(out, lambda: NoiseSweepConfig(model=model, models_dir=models_dir,
                                                        **_overrides(config, NoiseSweepConfig)),
                    run_noise_sweep, render_dual_dp_report, quiet)


@experiment_app.command("geoq")
def geoq(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny, or a HF directory")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="output folder (every arm's evaluation is cached there)")]
    = Path("runs/geoq-smollm2"),
    config: Annotated[Path | None, typer.Option(help="JSON file of GeoQuantConfig fields to override")] = None,
    models_dir: Annotated[str, typer.Option(help="where the fine-tuned model is cached (default OUT/models); "
                                                 "dual-dp and geoq can share one")] = "",
    quiet: bool = False,
) -> None:
    """Geometry-aware randomised quantization vs uniform INT4 at equal bits, on the kill-switch benchmark (seed 004)."""
    from libortho.experiments.geoq import GeoQuantConfig, run_geoq
    from libortho.report.geoq import render_geoq_report

    _run_and_report(out, lambda: GeoQuantConfig(model=model, models_dir=models_dir,
                                                      **_overrides(config, GeoQuantConfig)), run_geoq,
                    render_geoq_report, quiet)


@experiment_app.command("dual-dp-sgd")
def dual_dp_sgd(
    model: Annotated[str, typer.Option(help="tiny (the epsilon sweep), smollm2-135m, or a HF directory")] = "tiny",
    out: Annotated[Path, typer.Option(help="output folder (models and every point are cached there)")]
    = Path("runs/dual-dp-sgd-tiny"),
    config: Annotated[Path | None, typer.Option(help="JSON file of DPSGDSweepConfig fields to override")] = None,
    models_dir: Annotated[str, typer.Option(help="where the fine-tuned models are cached (default OUT/models)")] = "",
    quiet: bool = False,
) -> None:
    """Dual DP, DP-SGD arms: memory neurons only vs all linears after a public fine-tune vs all rows private."""
    from dataclasses import asdict

    from libortho.experiments.dual_dp_sgd import DPSGDSweepConfig, run_dpsgd_sweep, sweep_preset
    from libortho.report.dual_dp_sgd import render_dpsgd_report

    def make() -> DPSGDSweepConfig:
        return DPSGDSweepConfig(**{**asdict(sweep_preset(model)), "models_dir": models_dir,
                                   **_overrides(config, DPSGDSweepConfig)})

    _run_and_report(out, make, run_dpsgd_sweep, render_dpsgd_report, quiet)
