"""The separation experiment (issue 8): does training-time control make alpha = 0 a real privacy switch?

Per seed: the model before fine-tuning; plain fine-tuning on public blocks + member records
(``ft``); the references *retrain, secrets masked* (``retrain_masked``, also two-phase's phase 1)
and *retrain, records dropped* (``retrain_dropped``); every separation method; the unlearning
baselines swept over learning rate and steps and tuned by a rule fixed here. Every model is
measured at full precision and with an INT4 GPTQ base (methods at alpha 0 and 1). Then the
relearning attack, the label-noise arm and memsink's per-record deletion. Trained models,
memory streams and evaluations are cached by configuration under ``out/seed<S>/`` so an
interrupted run resumes where it stopped; ``result.json`` is rewritten after every evaluation.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rich.console import Console
from torch import nn

from libortho.assemble import (
    dual_stream,
    full_precision_with_memory,
    load_streams,
    quantized,
    save_streams,
)
from libortho.atomic import atomic_write_json
from libortho.data.corpora import default_general_corpus
from libortho.data.records import TokenRows
from libortho.eval.harness import PrivacyHarness
from libortho.experiments.kill_switch import _load_pre_and_tokenizer, _tiny_pre_loader, environment
from libortho.experiments.separation_config import SeparationExpConfig, base_key, quant_key
from libortho.experiments.separation_controls import deletion_stage, eta_stage, relearn_stage, unlearning_stage
from libortho.experiments.separation_data import SeparationData, build_separation_data
from libortho.experiments.separation_summary import rank_methods, summarise_separation
from libortho.experiments.store import _canonical, cached_model
from libortho.runtime import set_alpha
from libortho.train.loop import TrainConfig, train
from libortho.train.separation import SEPARATION

RESULT_FILE = "result.json"


class SeedRun:
    """One seed of the experiment: data, harness, caches, and one method per stage."""

    def __init__(self, cfg: SeparationExpConfig, seed: int, out: Path, console: Console, progress: bool,
                 fresh: bool, record: Callable[[], None]) -> None:
        self.cfg, self.seed, self.work, self.progress, self.fresh = cfg, seed, out / f"seed{seed}", progress, fresh
        self.say = lambda msg: console.print(f"[cyan]separation[/] seed {seed}: {msg}", highlight=False)
        self.record = record
        load_pre, tok = _load_pre_and_tokenizer(SimpleNamespace(model=cfg.model))
        general = default_general_corpus() if cfg.general == "auto" else cfg.general
        self.data: SeparationData = build_separation_data(cfg, seed, tok, general)
        self.stages: dict[str, Any] = {}
        if load_pre is None:
            ns = SimpleNamespace(model="tiny", tiny_arch=cfg.tiny_arch, pretrain=cfg.pretrain, seed=seed,
                                 pretrain_blocks=cfg.pretrain_blocks, block_len=cfg.block_len)
            load_pre, self.stages["pretrain"] = _tiny_pre_loader(ns, self.data, self.work / "models", fresh, self.say)
        self.load_pre = load_pre
        self.harness = PrivacyHarness(tok, self.data.members, self.data.nonmembers, self.data.domain_eval,
                                      self.data.general_eval, cfg.harness)
        self.harness.set_reference(load_pre())
        self.evals: dict[str, dict[str, Any]] = {}
        self._cleared: set[Path] = set()
        self.base_key = base_key(cfg, seed, general)
        self.quant_key = quant_key(cfg)
        # the non-members' exposure is the "never seen" control: measured on the reference rows only
        self.rows_harness = copy.copy(self.harness)
        self.rows_harness.cfg = replace(cfg.harness, exposure_nonmembers=False)

    # ---- caches -------------------------------------------------------------------------------
    def evaluate(self, name: str, label: str, group: str, build: Callable[[], nn.Module], key: dict[str, Any],
                 exposure: bool = True, harness: PrivacyHarness | None = None, **extra: Any) -> dict[str, Any]:
        """Metrics of the model ``build()`` makes, cached in ``evals/<name>.json`` under ``key``. Without an
        explicit ``harness``, reference rows get the full harness (with the non-members' exposure, the
        control), every other row the same harness without it."""
        harness = harness or (self.harness if group == "reference" else self.rows_harness)
        key = _canonical({**key, "harness": harness.describe(), "exposure": exposure})
        path = self.work / "evals" / f"{name}.json"
        if not self.fresh and path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                self.evals[name] = saved["entry"]
                return saved["entry"]
        model = build()
        metrics = harness.evaluate(model, progress=self.progress, exposure=exposure)
        del model
        entry = {"label": label, "group": group, "metrics": metrics, **extra}
        atomic_write_json(path, {"key": key, "entry": entry})
        self.evals[name] = entry
        m = metrics
        expo = m["exposure"]["mean"]
        self.say(f"{label:<34} extracted {sum(p['extracted'] for p in m['per_canary']):3d}/{len(m['per_canary'])}"
                 f"  exposure {'-' if expo is None else f'{expo:5.2f}'}  secret AUC "
                 f"{m['mia']['secret_loss']['auc']:.3f}  ppl {m['ppl_domain']:.2f}/{m['ppl_general']:.2f}"
                 f"  ({m['eval_s']:.0f} s)")
        self.record()
        return entry

    def checkpoint_dir(self, name: str, key: dict[str, Any]) -> Path:
        """Training checkpoints of model ``name`` under its cache ``key``: a run resumes only a checkpoint of
        the same configuration (never a stale one after a config change), and ``fresh`` starts it over."""
        digest = hashlib.sha256(json.dumps(_canonical(key), sort_keys=True).encode()).hexdigest()[:16]
        path = self.work / "ckpt" / name / digest
        if self.fresh and path not in self._cleared:
            self._cleared.add(path)
            shutil.rmtree(path, ignore_errors=True)
        return path

    def trained(self, name: str, rows: TokenRows, cfg: TrainConfig | None = None,
                start: Callable[[], nn.Module] | None = None, key: dict | None = None) -> tuple[nn.Module, dict]:
        """A plainly fine-tuned model, cached under ``models/<name>``."""
        cfg = cfg or replace_seed(self.cfg.finetune, self.seed)
        full_key = {**self.base_key, "stage": name, "train": cfg.__dict__, **(key or {})}

        def build() -> tuple[nn.Module, dict]:
            model = (start or self.load_pre)()
            every = max(1, cfg.total_steps(len(rows)) // 10)
            log = train(model, rows, cfg, progress=self.progress, desc=name,
                        checkpoint_dir=self.checkpoint_dir(name, full_key), checkpoint_every=every)
            return model, {"wall_s": log.wall_s, "steps": log.steps, "tokens": log.tokens,
                           "final_loss": log.losses[-1]}

        model, info = cached_model(self.work / "models" / name, full_key, build, self.fresh)
        self.stages[name] = info
        return model, info

    def method(self, m: str, noise: float = 0.0) -> tuple[nn.Module, dict[str, Any], dict]:
        """The shared model and memory streams of method ``m`` trained at label noise ``noise`` (cached)."""
        name = f"{m}@{noise:g}" if noise else m
        scfg = self.cfg.method_config(m, self.seed)
        key = {**self.base_key, "stage": "method", "method": scfg.to_dict(), "noise": noise,
               "revision": SEPARATION[m].revision}
        mem_dir, model_dir = self.work / "memory" / name, self.work / "models" / name
        streams: dict[str, Any] = {}

        def build() -> tuple[nn.Module, dict]:
            rows = self.data.rows(noise)
            kw: dict[str, Any] = {}
            if m == "two-phase":
                model, _ = self.trained("retrain_masked", self.data.rows(0.0).without_private_loss())
                model = copy.deepcopy(model).train()
                if noise:  # phase 1 must not see the secrets it would treat as public
                    model, _ = self.trained(f"retrain_masked@{noise:g}", rows.without_private_loss())
                    model = copy.deepcopy(model).train()
                kw["phase1_done"] = True
            else:
                model = self.load_pre()
            res = SEPARATION[m](scfg).fit(model, rows, None, progress=self.progress,
                                           checkpoint_dir=self.checkpoint_dir(name, key), **kw)
            save_streams(mem_dir, res.streams)
            streams.update(res.streams)
            return res.model, res.describe()

        if self.fresh or not (mem_dir / "memory.json").is_file():
            model, info = cached_model(model_dir, key, build, fresh=True)
        else:
            model, info = cached_model(model_dir, key, build, self.fresh)
            if not streams:
                streams = load_streams(mem_dir)
        self.stages[name] = info
        return model, streams, info


def replace_seed(cfg: TrainConfig, seed: int) -> TrainConfig:
    return replace(cfg, seed=seed)


def _references(run: SeedRun) -> dict[str, nn.Module]:
    """pre, FP fine-tuned and both retrain references, each at full precision and INT4."""
    cfg, d = run.cfg, run.data
    key = run.base_key
    run.evaluate("pre", "pre-fine-tune", "reference", run.load_pre, {**key, "m": "pre"})
    models = {"ft": run.trained("ft", d.rows(0.0))[0],
              "retrain_masked": run.trained("retrain_masked", d.rows(0.0).without_private_loss())[0]}
    if cfg.retrain_dropped:
        models["retrain_dropped"] = run.trained("retrain_dropped", d.rows_without_records())[0]
    labels = {"ft": "FP fine-tuned", "retrain_masked": "Retrain, secrets masked",
              "retrain_dropped": "Retrain, records dropped"}
    for name, model in models.items():
        info = run.stages[name]
        run.evaluate(f"{name}_fp", labels[name], "reference", lambda m=model: m, {**key, "m": name, "q": None},
                     cost=info)
        run.evaluate(f"{name}_int4", f"{labels[name]} + INT4", "reference",
                     lambda m=model: quantized(m, d.calibration, cfg.quant)[0],
                     {**key, "m": name, **run.quant_key}, cost=info)
    return models


def _methods(run: SeedRun, noise: float = 0.0, methods: tuple[str, ...] | None = None,
             full: bool = True) -> None:
    """Every method: INT4 base at alpha 0 and 1, and (``full``) the full-precision model at alpha 0 and 1."""
    for m in methods or run.cfg.methods:
        if noise and not SEPARATION.entry(m).meta.get("needs_labels", True):
            run.say(f"{m} reads no labels: its label-noise rows are its noise-free model")
            continue
        _one_method(run, m, noise, full)


def _one_method(run: SeedRun, m: str, noise: float, full: bool) -> None:
    cfg = run.cfg
    tag = f"{m}@{noise:g}" if noise else m
    shared, streams, info = run.method(m, noise)
    key = {**run.base_key, "m": tag, "method": cfg.method_config(m, run.seed).to_dict()}
    extra = {"method": m, "noise": noise, "cost": info}
    if full:
        run.evaluate(f"{tag}_fp_a0", f"{m} FP, alpha=0", "method", lambda: shared, {**key, "v": "fp0"},
                     alpha=0.0, base="fp", **extra)
        run.evaluate(f"{tag}_fp_a1", f"{m} FP, alpha=1", "method",
                     lambda: full_precision_with_memory(shared, streams)[0], {**key, "v": "fp1"}, alpha=1.0,
                     base="fp", **extra)
    holder: dict[str, nn.Module] = {}

    def q(alpha: float) -> nn.Module:
        if "m" not in holder:
            holder["m"] = dual_stream(shared, streams, run.data.calibration, cfg.quant)[0]
        set_alpha(holder["m"], alpha)
        return holder["m"]

    group = "label_noise" if noise else "method"
    what = f" ({noise:.0%} unlabelled)" if noise else ""
    for a in (0.0, 1.0):
        run.evaluate(f"{tag}_int4_a{a:g}", f"{m}{what} INT4, alpha={a:g}", group, lambda a=a: q(a),
                     {**key, "v": f"q{a:g}", **run.quant_key}, alpha=a, base="int4", **extra)


def run_seed(run: SeedRun) -> None:
    """Every stage of one seed, in order (each cached)."""
    cfg = run.cfg
    models = _references(run)
    _methods(run, full=cfg.full_precision_rows)
    eta_stage(run, models)
    if cfg.unlearning:
        unlearning_stage(run, models["ft"])
    ranking = rank_methods(run.evals, cfg.methods)
    run.stages["ranking"] = ranking
    best = ranking[0]["method"] if ranking else None
    noisy = cfg.label_noise_methods if cfg.label_noise_methods is not None else tuple(r["method"] for r in ranking[:2])
    for f in cfg.label_noise:
        _methods(run, noise=f, methods=noisy, full=False)
    if best is not None and cfg.relearn_steps:
        shared, streams, _ = run.method(best)
        relearn_stage(run, best, lambda: dual_stream(shared, streams, run.data.calibration, cfg.quant, alpha=0.0)[0])
    if cfg.relearn_steps:
        relearn_stage(run, "retrain_masked",
                 lambda: quantized(models["retrain_masked"], run.data.calibration, cfg.quant)[0])
    if "memsink" in cfg.methods and cfg.delete_records:
        deletion_stage(run)


def run_separation(cfg: SeparationExpConfig, out_dir: str | Path, progress: bool = True, fresh: bool = False,
                   console: Console | None = None) -> dict[str, Any]:
    """Run every seed of ``cfg``; writes ``out_dir/result.json`` after every evaluation and returns it."""
    console = console or Console(stderr=True)
    out, t0 = Path(out_dir), time.perf_counter()
    result: dict[str, Any] = {"experiment": "separation", "stage": cfg.stage, "config": cfg.to_dict(),
                              "environment": environment(), "seeds": {}}

    def record() -> None:
        result["wall_s"] = time.perf_counter() - t0
        result["summary"] = summarise_separation(result)
        atomic_write_json(out / RESULT_FILE, result)

    for seed in cfg.seeds:
        run = SeedRun(cfg, seed, out, console, progress, fresh, record)
        result["seeds"][str(seed)] = {"data": run.data.describe(), "stages": run.stages, "evals": run.evals,
                                      "unlabelled": {str(f): run.data.unlabelled(f) for f in cfg.label_noise},
                                      "member_kinds": [c.kind for c in run.data.members]}
        run_seed(run)
        record()
    return result
