"""``libortho experiment dual-dp-sgd``: DP-SGD on the memory parameters vs two baselines (seed 002, section 5.5).

On the kill-switch benchmark (public domain text plus member canaries, the ``private`` rows), three
ways to learn the private rows under differential privacy, each at every target epsilon of the sweep
and without privacy (the reference):

* ``memory``: the public fine-tune (all weights, public rows only, no noise: the kill-switch
  benchmark's "retrain without the private records" recipe), then ``memory_neurons`` new neurons per
  MLP (:class:`libortho.train.memory.TrainNeurons`, the memory stream's trainable form) trained by
  DP-SGD on the private rows; nothing else moves. Measured with the memory on (alpha = 1).
* ``public_then_private``: the same public fine-tune, then DP-SGD on every decoder linear over the
  private rows.
* ``full``: DP-SGD from the model before fine-tuning on every decoder linear over public and
  private rows together (all rows are private then).

Norms and embeddings stay frozen in the DP runs (opacus has no sampler for RMSNorm). Accounting
(:mod:`libortho.train.dpsgd`): one row is the privacy unit, ``delta = 1 / (10 N)`` with ``N`` the
rows the arm trains on; a canary repeated ``k`` times touches at most ``k`` rows, so it is protected
only at the group level ``(k eps, k e^{(k-1) eps} delta)`` (:func:`libortho.train.dp.group_privacy`),
reported per repeat count. Each (arm, epsilon) evaluation is cached under ``out/points/``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from libortho.atomic import atomic_write_json
from libortho.config import lists_to_tuples
from libortho.experiments.store import cached_json, cached_model

RESULT_FILE = "result.json"
ARMS = ("memory", "public_then_private", "full")


@dataclass(frozen=True)
class DPSGDSweepConfig:
    """The sweep's knobs (defaults: the tiny-model epsilon sweep in docs/results/dual_dp_tiny/dpsgd)."""

    model: str = "tiny"
    eps: tuple[float, ...] = (1.0, 4.0, 16.0)
    nonprivate: bool = True
    arms: tuple[str, ...] = ARMS
    memory_neurons: int = 32
    steps: int = 300
    expected_batch: float = 16.0
    clip: float = 1.0
    lr: float = 1e-3
    memory_lr: float | None = None  # the memory neurons' Adam lr (None: lr); new neurons start at zero output
    seed: int = 0
    models_dir: str = ""  # where the fine-tuned models are cached ("" = out/models); a location, not a knob
    kill_switch: dict[str, Any] = field(default_factory=dict)  # overrides of the kill-switch preset (tests)

    def __post_init__(self) -> None:
        lists_to_tuples(self)
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise ValueError(f"unknown DP arms {bad or '(none)'}; available: {', '.join(ARMS)}")
        if any(not e > 0 for e in self.eps) or not (self.eps or self.nonprivate):
            raise ValueError(f"eps must be positive targets (and at least one point), got {self.eps}")
        if self.memory_neurons < 1:
            raise ValueError(f"memory_neurons must be >= 1, got {self.memory_neurons}")

    def points(self) -> list[tuple[str, float | None]]:
        """(arm, target eps or None for the non-private reference) of every trained model."""
        levels: list[float | None] = [*self.eps, *([None] if self.nonprivate else [])]
        return [(a, e) for a in self.arms for e in levels]


def sweep_preset(model: str) -> DPSGDSweepConfig:
    """The defaults for ``model``: the tiny model's epsilon sweep, or two epsilons and the non-private reference on a
    real model (SmolLM2: 31 private rows of 128 tokens, one backward per drawn row, so few steps)."""
    if model == "tiny":
        return DPSGDSweepConfig()
    return DPSGDSweepConfig(model=model, eps=(4.0, 64.0), nonprivate=True, memory_neurons=32, steps=40,
                            expected_batch=8.0, lr=2e-4, memory_lr=2e-3)


def decoder_linear_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weight of every linear inside the decoder blocks (what full-model DP-SGD trains)."""
    from libortho.models import block_linears, decoder_blocks

    return [m.weight for block in decoder_blocks(model) for m in block_linears(block).values()]


def _train_point(arm: str, eps: float | None, cfg: DPSGDSweepConfig, bench: Any, public: nn.Module,
                 progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The arm's model trained at ``eps`` and its DP log."""
    from libortho.data.records import TokenRows, mixture
    from libortho.train.dpsgd import DPSGDConfig, dp_train
    from libortho.train.memory import MemoryContext, attach_neurons, memory_parameters

    d = bench.data
    lr = cfg.memory_lr if arm == "memory" and cfg.memory_lr is not None else cfg.lr
    dcfg = DPSGDConfig(steps=cfg.steps, expected_batch=cfg.expected_batch, clip=cfg.clip, lr=lr, eps=eps,
                       seed=cfg.seed)
    if arm == "full":
        model, rows = bench.load_pre(), mixture(d.public, d.private, cfg.seed)
        params = decoder_linear_weights(model)
    else:
        model, rows = copy.deepcopy(public), TokenRows(d.private.input_ids, d.private.labels)
        if arm == "memory":
            attach_neurons(model, cfg.memory_neurons, MemoryContext(), seed=cfg.seed)
            params = memory_parameters(model)
        else:
            params = decoder_linear_weights(model)
    log = dp_train(model, rows, params, dcfg, progress=progress, desc=f"{arm} eps={eps}")
    return model, {**log.to_dict(), "rows": len(rows), "trained_params": sum(p.numel() for p in params)}


def _group_levels(eps: float | None, delta: float | None, repeats: list[int]) -> dict[str, Any]:
    from libortho.train.dp import group_privacy

    if eps is None or delta is None:
        return {}
    return {str(k): dict(zip(("eps", "delta"), group_privacy(eps, delta, k), strict=True))
            for k in sorted(set(repeats))}


def run_dpsgd_sweep(cfg: DPSGDSweepConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Public fine-tune (cached), every (arm, eps) DP-SGD run and its evaluation (cached), ``out/result.json``."""
    from libortho.data.records import mixture
    from libortho.experiments.kill_switch import benchmark_config, environment, open_benchmark
    from libortho.train.loop import train

    out = Path(out)
    kcfg = benchmark_config(cfg.model, cfg.seed, cfg.kill_switch)
    kcfg = replace(kcfg, harness=replace(kcfg.harness, keep_scores=True))  # per-block NLLs: paired PPL intervals
    bench, models, say = open_benchmark(kcfg, out, cfg.models_dir, "dual-dp-sgd", progress)
    d = bench.data

    def build_public() -> tuple[nn.Module, dict[str, Any]]:
        model = bench.load_pre()
        tl = train(model, mixture(d.public, None, kcfg.seed, n_private=len(d.private)), kcfg.finetune,
                   progress=progress, desc="fine-tune (public only)")
        return model, {"wall_s": tl.wall_s, "steps": tl.steps, "tokens": tl.tokens, "final_loss": tl.losses[-1]}

    public_key = {"stage": "public", "kill_switch": {k: v for k, v in kcfg.to_dict().items() if k != "harness"}}
    public, public_info = cached_model(models / "public", public_key, build_public)
    say(f"public fine-tune {'reused' if public_info.get('reused') else 'trained'} ({public_info['wall_s']:.0f} s)")
    repeats = [c.repeats for c in d.members]
    refs = {"ft": bench.ft, "public": public}
    points: dict[str, Any] = {}
    for name, model in refs.items():
        points[name] = {"arm": name, "eps": None, "metrics": cached_json(
            out / "points" / f"{name}.json", {"kill_switch": kcfg.to_dict(), "ref": name},
            lambda m=model: bench.harness.evaluate(m, progress=False), say)}
    dp_keys = ("memory_neurons", "steps", "expected_batch", "clip", "lr", "memory_lr", "seed")
    for arm, eps in cfg.points():
        def build(arm: str = arm, eps: float | None = eps) -> dict[str, Any]:
            t0 = time.perf_counter()
            model, log = _train_point(arm, eps, cfg, bench, public, progress)
            return {"dp": log, "train_s": time.perf_counter() - t0,
                    "metrics": bench.harness.evaluate(model, progress=False)}

        tag = "inf" if eps is None else f"{eps:g}"
        value = cached_json(out / "points" / f"{arm}-eps{tag}.json",
                            {"kill_switch": kcfg.to_dict(), "arm": arm, "eps": eps,
                             **{k: getattr(cfg, k) for k in dp_keys}}, build, say,
                            lambda v: f"eps {v['dp']['eps']}  exposure {v['metrics']['exposure']['mean']:.2f}  "
                                      f"domain PPL {v['metrics']['ppl_domain']:.2f}")
        points[f"{arm}:{tag}"] = {"arm": arm, "eps": eps, **value,
                                  "group_privacy": _group_levels(value["dp"]["eps"], value["dp"]["delta"], repeats)}
    result = {"experiment": "dual_dp_sgd", "config": asdict(cfg), "kill_switch_config": kcfg.to_dict(),
              "environment": environment(), "data": d.describe(), "finetune": bench.ft_info,
              "public_finetune": public_info, "points": points}
    atomic_write_json(out / RESULT_FILE, result)
    return result
