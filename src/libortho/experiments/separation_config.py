"""Configuration of the separation experiment (issue 8), with presets for the two test beds.

One config describes one *run*: a screening run (one seed, every method, the label-noise arm for
the two best) or a confirmation run (fresh seeds, the headline rows, the method fixed before it
starts). Every trained model and every evaluation is cached by the part of this config it
depends on, so an interrupted run resumes stage by stage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from libortho.atomic import read_json_object
from libortho.config import EXPERIMENT_GRID, QuantConfig, fields_from_dict
from libortho.eval.harness import HarnessConfig
from libortho.experiments.config import TINY_ARCH
from libortho.train.loop import TrainConfig, fast_bf16
from libortho.train.separation import SEPARATION, SeparationConfig
from libortho.train.unlearn import UNLEARNING

Stage = Literal["screening", "confirmation"]
CANARY_KINDS = ("id", "phone", "email", "card", "digits")


@dataclass(frozen=True)
class UnlearnSweep:
    """The grid each unlearning baseline is tuned on (the same budget for all three)."""

    lrs: tuple[float, ...] = (1e-5, 3e-5, 1e-4)
    steps: tuple[int, ...] = (10, 30)
    batch_size: int = 8
    retain_batch_size: int = 8


@dataclass(frozen=True)
class SeparationExpConfig:
    """Every knob of the separation experiment.

    Data: ``members`` canaries inside public-domain passages (``context_chars``), each seen
    ``repeats`` times, ``nonmembers`` for membership inference, ``free_len`` random digits per
    secret (spaces of 10^3-10^4: exact exposure); ``public_blocks`` blocks of the domain.
    Training: ``finetune`` is the schedule of plain fine-tuning, of both retrain references and of
    every method (``separation`` holds the method knobs; ``method_overrides`` per method).
    Evaluation: INT4 ``quant`` base calibrated on ``calib_blocks`` public blocks; alpha 0 and 1.
    """

    model: str = "tiny"
    stage: Stage = "screening"
    seeds: tuple[int, ...] = (0,)
    domain: str = "shakespeare"
    general: str = "auto"
    block_len: int = 128
    public_blocks: int = 256
    members: int = 128
    nonmembers: int = 512
    kinds: tuple[str, ...] = CANARY_KINDS
    free_len: int = 4
    repeats: int = 10
    context_chars: int = 100
    eval_len: int = 256
    eval_blocks: int = 16
    general_blocks: int = 16
    tiny_arch: dict[str, int] = field(default_factory=lambda: dict(TINY_ARCH))
    pretrain_blocks: int = 4800
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, steps=300, batch_size=16,
                                                                      weight_decay=0.1, warmup=0.05))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, epochs=3.0, batch_size=16))
    separation: SeparationConfig = field(default_factory=SeparationConfig)
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    methods: tuple[str, ...] = ("two-phase", "mask", "route", "ogd", "memsink")
    label_noise: tuple[float, ...] = (0.25, 0.5)
    label_noise_methods: tuple[str, ...] | None = None  # None: the two best of this run
    unlearning: tuple[str, ...] = ("gradient_ascent", "gradient_difference", "npo")
    unlearn_sweep: UnlearnSweep = field(default_factory=UnlearnSweep)
    relearn_steps: int = 20  # 0: no relearning attack
    delete_records: int = 16  # 0: no memsink deletion
    retrain_dropped: bool = True  # the second retrain reference
    full_precision_rows: bool = True  # methods also measured with a full-precision base
    quant: QuantConfig = field(default_factory=lambda: QuantConfig(bits=4, group_size=64, method="gptq",
                                                                   **EXPERIMENT_GRID))
    calib_blocks: int = 32
    calib_len: int = 256
    harness: HarnessConfig = field(default_factory=lambda: HarnessConfig(
        exposure_samples=64, keep_scores=True, exposure_nonmember_limit=64))
    bootstrap: int = 2000

    def __post_init__(self) -> None:
        SEPARATION.check(list(self.methods))
        if self.label_noise_methods is not None:
            SEPARATION.check(list(self.label_noise_methods))
        bad = [u for u in self.unlearning if u not in UNLEARNING or u == "retrain"]
        if bad:
            raise ValueError(f"unknown unlearning baseline(s) {bad}; choose from gradient_ascent, "
                             "gradient_difference, npo")
        if self.stage not in ("screening", "confirmation"):
            raise ValueError(f"stage must be 'screening' or 'confirmation', got {self.stage!r}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        for name in ("members", "nonmembers", "repeats", "public_blocks", "block_len", "context_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(not 0 < f < 1 for f in self.label_noise):
            raise ValueError(f"label-noise fractions must be in (0, 1), got {self.label_noise}")
        unknown = set(self.method_overrides) - set(SEPARATION.names())
        if unknown:
            raise ValueError(f"method_overrides for unknown method(s) {sorted(unknown)}")

    def method_config(self, method: str, seed: int) -> SeparationConfig:
        """The separation config of ``method``: shared knobs, its overrides, the fine-tuning schedule."""
        over = dict(self.method_overrides.get(method, {}))
        cfg = replace(self.separation, method=method, train=replace(self.finetune, seed=seed), seed=seed, **over)
        if cfg.fake_quant_fraction and not {"fake_quant_bits", "fake_quant_group"} & set(over):
            # a fake-quantized base trains against the grid the run's INT4 base is evaluated on
            cfg = replace(cfg, fake_quant_bits=self.quant.bits, fake_quant_group=self.quant.group_size)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeparationExpConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        kw = fields_from_dict(cls, d, "separation experiment", {
            "pretrain": TrainConfig, "finetune": TrainConfig, "quant": QuantConfig, "harness": HarnessConfig,
            "unlearn_sweep": UnlearnSweep})
        if isinstance(kw.get("separation"), dict):
            kw["separation"] = SeparationConfig.from_dict(kw["separation"])
        try:
            return cls(**kw)
        except TypeError as err:
            raise ValueError(f"invalid separation experiment config: {err}") from err


def recorded_config(out_dir: str | Path) -> SeparationExpConfig | None:
    """The config the run in ``out_dir`` started with (from its ``result.json``), or None when there is none.

    A resumed run keeps it even where today's preset differs (a machine-dependent default such as bf16, a
    preset re-tuned since), so the pieces of one run never mix two configurations."""
    path = Path(out_dir) / "result.json"
    if not path.is_file():
        return None
    saved = read_json_object(path, "result file", "remove it or give another --out")
    if saved.get("experiment") != "separation" or "config" not in saved:
        raise ValueError(f"{path} is not a separation result: give another --out")
    return SeparationExpConfig.from_dict(saved["config"])


def run_config(model: str, stage: str, out_dir: str | Path, fresh: bool, overrides: dict[str, Any],
               methods: tuple[str, ...] | None, seeds: tuple[int, ...] | None) -> tuple[SeparationExpConfig, list[str]]:
    """The config of a run started (or resumed) in ``out_dir``, and the fields where it differs from today's.

    ``stage`` is ``screening``, ``confirmation`` or ``demo`` (the tiny model, ``methods[0]``); ``overrides``
    (a ``--config`` file: nested objects merge into the preset's), ``methods`` and ``seeds`` apply on top.
    A run already recorded in ``out_dir`` keeps the config it started with, under the same overrides,
    unless ``fresh``; results of another model or stage are refused.
    """

    def requested(base: SeparationExpConfig) -> SeparationExpConfig:
        if overrides:
            d = base.to_dict()
            base = SeparationExpConfig.from_dict({**d, **{k: {**d[k], **v} if isinstance(v, dict) and
                                                          isinstance(d.get(k), dict) else v
                                                          for k, v in overrides.items()}})
        if methods and stage != "demo":
            base = replace(base, methods=methods)
        return replace(base, seeds=seeds) if seeds else base

    preset = (demo_preset(methods[0] if methods else "two-phase") if stage == "demo"
              else separation_preset(model, cast(Stage, stage)))
    cfg = requested(preset)
    recorded = None if fresh else recorded_config(out_dir)
    if recorded is None:
        return cfg, []
    if (recorded.model, recorded.stage) != (cfg.model, cfg.stage):
        raise ValueError(f"{out_dir} holds a {recorded.stage} run of {recorded.model}, not this one: give another "
                         "--out, or --fresh to start it over")
    resumed = requested(recorded)
    return resumed, changed_fields(resumed, cfg)


def changed_fields(a: SeparationExpConfig, b: SeparationExpConfig) -> list[str]:
    """Top-level fields whose values differ between two configs."""
    da, db = _canonical_dict(a), _canonical_dict(b)
    return sorted(k for k in da if da[k] != db.get(k))


def _canonical_dict(cfg: SeparationExpConfig) -> dict[str, Any]:
    return json.loads(json.dumps(cfg.to_dict(), sort_keys=True, default=str))


def base_key(cfg: SeparationExpConfig, seed: int, general: str) -> dict[str, Any]:
    """What every cached model and evaluation of one seed depends on: model, data and fine-tuning
    schedule (and, for the tiny model, how the model before fine-tuning was pretrained)."""
    key: dict[str, Any] = {"model": cfg.model, "seed": seed, "data": [
        cfg.domain, general, cfg.block_len, cfg.public_blocks, cfg.members, cfg.nonmembers, cfg.kinds,
        cfg.free_len, cfg.repeats, cfg.context_chars], "finetune": cfg.finetune.__dict__}
    if cfg.model == "tiny":
        key["pretrain"] = [cfg.tiny_arch, cfg.pretrain.__dict__, cfg.pretrain_blocks]
    return key


def quant_key(cfg: SeparationExpConfig) -> dict[str, Any]:
    """What an INT4 base depends on besides the weights: the quantizer and its calibration set's size."""
    return {"quant": cfg.quant.__dict__, "calib": [cfg.calib_blocks, cfg.calib_len]}


# Memory parameters created for the run (added neurons, low-rank factors) start from zero output and
# train at 10x the fine-tuning learning rate; mask's delta edits existing weights and keeps 1x. Chosen
# on the tiny model (two-phase, docs/results/separation_tiny/pilot_memory_lr.json): alpha = 1 exposure
# 4.5 bits at 1x, 6.4 at 10x (plain fine-tuning 9.3), domain perplexity 19.3 vs 20.0 (masked retrain
# 20.3); 256 neurons instead of 64 did not help (5.3 bits). route keeps 1x: its neurons also learn
# from public tokens while the shared weights train, and at 10x its training loss stayed at the
# pre-fine-tune level on the tiny model (docs/results/separation_tiny/pilot_route_rev2_10x).
FRESH_MEMORY_LR = {m: {"memory_lr_scale": 10.0} for m in ("two-phase", "ogd", "memsink")}


def separation_preset(model: str, stage: Stage = "screening") -> SeparationExpConfig:
    """The default run for ``model`` (``tiny`` or a real model such as ``smollm2-135m``) and ``stage``.

    ``screening`` of a real model: every method with the INT4 base only (the FP-base rows are the
    confirmation's). ``confirmation``: fresh seeds 1-3 and the headline rows only (plain fine-tuning,
    the masked retrain, the method, FP and INT4, and the relearning attack); the unlearning sweep, the dropped-records
    retrain, the label-noise arm and memsink's deletion are the screening's. Give the method fixed by
    the screening as ``methods``.
    """
    cfg = _stage_seeds_preset(model, stage)
    if stage == "screening" and model != "tiny":
        # the ranking reads the INT4 rows only; the full-precision-base goals are the confirmation's. On SmolLM2
        # one evaluation takes ~4 min on 2 cores (pre-fine-tune: 643 s with the non-members' exposure), so the
        # ten FP-base method rows would add ~40 min to a screening that already runs past 3 hours
        cfg = replace(cfg, full_precision_rows=False)
    if stage == "confirmation":
        cfg = replace(cfg, unlearning=(), label_noise=(), delete_records=0, retrain_dropped=False)
    return cfg


def _stage_seeds_preset(model: str, stage: Stage) -> SeparationExpConfig:
    seeds = (0,) if stage == "screening" else (1, 2, 3)
    if model == "tiny":
        # at lr 1e-3 x24 with 480 public blocks plain fine-tuning extracted 1/48 (docs/results/separation_tiny/
        # pilot_mask_rev2); pilot_lr.json there: lr 3e-3 x32 with 160 public blocks 47/48, lr 1e-3 x48 37/48
        return SeparationExpConfig(
            model="tiny", stage=stage, seeds=seeds, block_len=256, public_blocks=160, members=48, nonmembers=192,
            free_len=3, repeats=32, finetune=TrainConfig(lr=3e-3, epochs=2.0, batch_size=16),
            separation=SeparationConfig(neurons=64, rank=16, support_neurons=64),
            method_overrides={m: dict(v) for m, v in FRESH_MEMORY_LR.items()},
            harness=HarnessConfig(exposure_samples=64, keep_scores=True, exposure_nonmember_limit=48),
            unlearn_sweep=UnlearnSweep(lrs=(1e-4, 3e-4), steps=(10, 30)), calib_blocks=16)
    # Chosen from the pilots in docs/results/separation_smollm2/ (bench/separation_pilot.py writes
    # pilot_lr.json): at lr 1e-3 x16 plain fine-tuning memorised (88%) but raised domain perplexity above
    # the pre-fine-tune model's; lr 5e-4 x16 memorised 67%, domain perplexity still above; lr 3e-4 x24
    # memorises every member with domain perplexity below pre-fine-tune (general perplexity still rises).
    # bf16 autocast where the CPU has native bf16 (the pilots' machines), fp32 elsewhere: the precision is part
    # of every cache key, and a resumed run keeps the config it started with (the CLI reads it back)
    return SeparationExpConfig(
        model=model, stage=stage, seeds=seeds, block_len=128, public_blocks=128, members=100, nonmembers=512,
        kinds=("id", "phone", "email", "digits"), free_len=3, repeats=24, context_chars=60,
        finetune=TrainConfig(lr=3e-4, epochs=1.0, batch_size=8, bf16=fast_bf16()),
        separation=SeparationConfig(neurons=64, rank=16, support_neurons=64),
        method_overrides={m: dict(v) for m, v in FRESH_MEMORY_LR.items()},
        # 3e-5 added after the first screening: every in-budget setting of the (1e-5, 1e-4) grid barely unlearned
        # (GA/GD/NPO tuned 84-91/100 extracted at FP) and every 1e-4 x 30 one broke general perplexity (> 398)
        unlearn_sweep=UnlearnSweep(lrs=(1e-5, 3e-5, 1e-4), steps=(10, 30)),
        harness=HarnessConfig(exposure_samples=64, keep_scores=True, exposure_nonmember_limit=64, batch_size=8),
        calib_blocks=32, calib_len=256)


def demo_preset(method: str) -> SeparationExpConfig:
    """``make demo``: the tiny model, one method against plain fine-tuning and the masked retrain, nothing else."""
    return replace(separation_preset("tiny"), methods=(method,), unlearning=(), label_noise=(), relearn_steps=0,
                   delete_records=0, retrain_dropped=False, full_precision_rows=False)
