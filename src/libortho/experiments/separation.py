"""The separation experiment (issue 8): does training-time control make alpha = 0 a real privacy switch?

Per seed: the model before fine-tuning; plain fine-tuning on public blocks + member records
(``ft``); the references *retrain, secrets masked* (``retrain_masked``, also two-phase's phase 1)
and *retrain, records dropped* (``retrain_dropped``); every separation method; the unlearning
baselines swept over learning rate and steps and tuned by a rule fixed here. Every model is
measured at full precision and with an INT4 GPTQ base (methods at alpha 0 and 1). Then the
relearning attack, the label-noise arm and memsink's per-record deletion.

Everything is cached by configuration, in two places: the *results* (``out/seed<S>/evals/`` and
``stages/``: small JSON, safe to commit) and the *cache* (``cache/seed<S>/``: trained models, memory
streams, training checkpoints; large, never committed). A model is trained or loaded only when an
evaluation or a stage that is not in the results needs it, so a run whose results were committed
resumes in a later session, on a fresh machine, where it stopped: no recorded evaluation is
repeated, and a recorded stage is trained again only when a missing row needs its model and the
cache lacks it (that training is recorded beside the first, see :class:`Lazy`). ``result.json`` is
rewritten after every evaluation.
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
from libortho.atomic import atomic_write_json, read_json_object
from libortho.data.corpora import default_general_corpus
from libortho.data.records import TokenRows
from libortho.eval.harness import PrivacyHarness
from libortho.experiments.kill_switch import _load_pre_and_tokenizer, _tiny_pre_loader, environment
from libortho.experiments.separation_config import SeparationExpConfig, base_key, quant_key
from libortho.experiments.separation_controls import (
    deletion_stage,
    eta_of,
    eta_stage,
    relearn_stage,
    unlearning_stage,
)
from libortho.experiments.separation_data import SeparationData, build_separation_data
from libortho.experiments.separation_results import RESULT_FILE, evals_dir, lean
from libortho.experiments.separation_summary import rank_methods, relearn_targets, summarise_separation
from libortho.experiments.store import META, _canonical, cached_model, is_cached_model
from libortho.runtime import set_alpha
from libortho.train.loop import TrainConfig, train
from libortho.train.separation import SEPARATION


class Lazy:
    """A trained model (or model and memory streams) made only when first called, by training it or by
    loading it from the cache; ``info`` (how it was trained) comes from the run's results when they
    hold it, so a fully recorded stage never needs its model.

    A recorded stage whose model a missing row needs, on a machine whose cache lacks it, is trained
    again (deterministically, from the same seed); that training is added to the results under
    ``retrained`` beside the first, never in its place."""

    def __init__(self, make: Callable[[], tuple[Any, dict[str, Any]]], info: dict[str, Any] | None,
                 on_info: Callable[[dict[str, Any]], None], key: dict[str, Any] | None = None,
                 cached: Callable[[], bool] | None = None) -> None:
        self._make, self._info, self._on_info = make, info, on_info
        self._cached = cached
        self.key = key  # what the model depends on (its cache key)
        self._value: Any = None
        self.made = False

    @property
    def available(self) -> bool:
        """Whether calling costs no training: the model is in memory or in the cache under its key."""
        return self.made or (self._cached is not None and self._cached())

    def __call__(self) -> Any:
        if not self.made:
            self._value, info = self._make()
            self.made = True
            if self._info is None:
                self._info = info
                self._on_info(info)
            elif not info.get("reused", False):  # recorded, but trained again here
                self._info = {**self._info, "retrained": [*self._info.get("retrained", []), info]}
                self._on_info(self._info)
        return self._value

    def release(self) -> None:
        """Forget the model (the next call loads it from the cache again); the training record stays."""
        self._value, self.made = None, False

    @property
    def info(self) -> dict[str, Any]:
        if self._info is None:
            self()
        assert self._info is not None
        return self._info


class SeedRun:
    """One seed of the experiment: data, harness, results and cache, and one method per stage."""

    def __init__(self, cfg: SeparationExpConfig, seed: int, out: Path, console: Console, progress: bool,
                 fresh: bool, record: Callable[[], None], cache: Path | None = None,
                 reuse: tuple[Path, ...] = ()) -> None:
        self.cfg, self.seed, self.work, self.progress, self.fresh = cfg, seed, out / f"seed{seed}", progress, fresh
        # other runs' results (their out folders): a row or record they hold under the same key is copied here
        self.reuse = tuple(Path(r) / f"seed{seed}" for r in reuse)
        self.heavy = (cache or out) / f"seed{seed}"
        self._handles: dict[str, Lazy] = {}
        self._made: set[str] = set()  # stages made (trained or loaded) in this run
        self.made_s = 0.0  # seconds spent making (training or loading) stage models
        self.say = lambda msg: console.print(f"[cyan]separation[/] seed {seed}: {msg}", highlight=False)
        self.record = record
        load_pre, tok = _load_pre_and_tokenizer(SimpleNamespace(model=cfg.model))
        general = default_general_corpus() if cfg.general == "auto" else cfg.general
        self.data: SeparationData = build_separation_data(cfg, seed, tok, general)
        self.stages: dict[str, Any] = {}
        if load_pre is None:
            ns = SimpleNamespace(model="tiny", tiny_arch=cfg.tiny_arch, pretrain=cfg.pretrain, seed=seed,
                                 pretrain_blocks=cfg.pretrain_blocks, block_len=cfg.block_len)
            load_pre, self.stages["pretrain"] = _tiny_pre_loader(ns, self.data, self.heavy / "models", fresh, self.say)
        self.load_pre = load_pre
        self.harness = PrivacyHarness(tok, self.data.members, self.data.nonmembers, self.data.domain_eval,
                                      self.data.general_eval, cfg.harness)
        self.harness.set_reference(load_pre())
        self.evals: dict[str, dict[str, Any]] = {}
        self._cleared: set[Path] = set()
        self.base_key = base_key(cfg, seed, general)
        self.quant_key = quant_key(cfg)
        self.eta_bases: dict[str, Any] | None = None  # held-out public input subspaces (the eta stage's)
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
        path = self.work.parent / evals_dir(self.seed) / f"{name}.json"
        saved = self.recorded(path, key, "recorded evaluation")
        if saved is not None:
            self.evals[name] = saved
            return saved
        made, t0 = self.made_s, time.perf_counter()
        model = build()
        # what making this row's model cost (quantization, unlearning, relearning), less any stage it trained
        build_s = time.perf_counter() - t0 - (self.made_s - made)
        metrics = harness.evaluate(model, progress=self.progress, exposure=exposure)
        del model
        extra = {k: v.info if isinstance(v, Lazy) else v for k, v in extra.items()}
        entry = {"label": label, "group": group, "metrics": metrics, "build_s": build_s, **extra}
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

    def recorded(self, path: Path, key: dict[str, Any], what: str) -> Any:
        """What ``path`` (a JSON record ``{"key", "entry" or "info"}`` under this run's results) holds under
        ``key``, else the same record of a ``reuse`` run (copied here, with where it came from), else None.
        The key is the whole identity of a row, so a copied row is the row this run would have measured."""
        if self.fresh:
            return None
        rel = path.relative_to(self.work)
        for src in (path, *(r / rel for r in self.reuse)):
            if src.is_file():
                saved = read_json(src, what)
                if saved.get("key") == key:
                    if src != path:
                        atomic_write_json(path, {**saved, "copied_from": str(src)})
                    return saved.get("entry", saved.get("info"))
        return None

    def checkpoint_dir(self, name: str, key: dict[str, Any]) -> Path:
        """Training checkpoints of model ``name`` under its cache ``key``: a run resumes only a checkpoint of
        the same configuration (never a stale one after a config change), and ``fresh`` starts it over."""
        digest = hashlib.sha256(json.dumps(_canonical(key), sort_keys=True).encode()).hexdigest()[:16]
        path = self.heavy / "ckpt" / name / digest
        if self.fresh and path not in self._cleared:
            self._cleared.add(path)
            shutil.rmtree(path, ignore_errors=True)
        return path

    def recorded_info(self, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
        """How stage ``name`` was trained, from the results (or, for a run recorded before the results held
        stages, from the cached model's metadata), when it was trained under ``key``; else None."""
        info = self.recorded(self.work / "stages" / f"{name}.json", _canonical(key), "training record")
        if info is not None:
            return info
        path = self.heavy / "models" / name / META
        if not self.fresh and path.is_file():
            saved = read_json(path, "training record")
            if saved.get("key") == _canonical(key):
                return saved["info"]
        return None

    def _handle(self, name: str, key: dict[str, Any], make: Callable[[bool], tuple[Any, dict[str, Any]]],
                cached: Callable[[], bool] | None = None) -> Lazy:
        """The one lazy handle of stage ``name`` (its info written to the results once known). ``make(fresh)``
        trains or loads it; under ``--fresh`` only its first making in this run trains, later ones (after a
        release) load what that one cached."""
        if name in self._handles:
            return self._handles[name]

        def keep(info: dict[str, Any]) -> None:
            self.stages[name] = info
            atomic_write_json(self.work / "stages" / f"{name}.json", {"key": _canonical(key), "info": info})

        def timed() -> tuple[Any, dict[str, Any]]:
            start, t0 = self.made_s, time.perf_counter()
            fresh = self.fresh and name not in self._made
            self._made.add(name)
            try:
                return make(fresh)
            finally:  # a stage made inside this one (two-phase's phase 1) is already inside this elapsed time
                self.made_s = start + time.perf_counter() - t0

        info = self.recorded_info(name, key)
        handle = Lazy(timed, info, keep, key=key,
                      cached=None if cached is None else (lambda: (not self.fresh or name in self._made) and cached()))
        if info is not None:
            keep(info)
        self._handles[name] = handle
        return handle

    def trained(self, name: str, rows: TokenRows, cfg: TrainConfig | None = None,
                start: Callable[[], nn.Module] | None = None, key: dict | None = None) -> Lazy:
        """A plainly fine-tuned model, cached under ``models/<name>`` and trained only when first needed."""
        cfg = cfg or replace_seed(self.cfg.finetune, self.seed)
        full_key = {**self.base_key, "stage": name, "train": cfg.__dict__, **(key or {})}

        def build() -> tuple[nn.Module, dict]:
            model = (start or self.load_pre)()
            every = max(1, cfg.total_steps(len(rows)) // 10)
            log = train(model, rows, cfg, progress=self.progress, desc=name,
                        checkpoint_dir=self.checkpoint_dir(name, full_key), checkpoint_every=every)
            return model, {"wall_s": log.wall_s, "steps": log.steps, "tokens": log.tokens,
                           "final_loss": log.losses[-1]}

        model_dir = self.heavy / "models" / name
        return self._handle(name, full_key, lambda fresh: cached_model(model_dir, full_key, build, fresh),
                            cached=lambda: is_cached_model(model_dir, full_key))

    def method(self, m: str, noise: float = 0.0) -> Lazy:
        """Method ``m`` trained at label noise ``noise``: a handle whose call gives (shared model, memory
        streams), trained only when first needed (cached)."""
        name = f"{m}@{noise:g}" if noise else m
        scfg = self.cfg.method_config(m, self.seed)
        key = {**self.base_key, "stage": "method", "method": scfg.key_dict(), "noise": noise,
               "revision": SEPARATION[m].revision}
        mem_dir, model_dir = self.heavy / "memory" / name, self.heavy / "models" / name

        # two-phase's phase 1 (its handle made now, so its training record joins the result's stages); it
        # must not see the secrets it would treat as public: at label noise it is a retrain of its own
        phase1 = (None if m != "two-phase" else
                  self.trained("retrain_masked", self.data.rows(0.0).without_private_loss()) if not noise else
                  self.trained(f"retrain_masked@{noise:g}", self.data.rows(noise).without_private_loss()))

        def make(fresh: bool) -> tuple[tuple[nn.Module, dict[str, Any]], dict]:
            streams: dict[str, Any] = {}

            def build() -> tuple[nn.Module, dict]:
                rows = self.data.rows(noise)
                kw: dict[str, Any] = {}
                if phase1 is not None:
                    model = copy.deepcopy(phase1()).train()
                    kw["phase1_done"] = True
                else:
                    model = self.load_pre()
                res = SEPARATION[m](scfg).fit(model, rows, None, progress=self.progress,
                                               checkpoint_dir=self.checkpoint_dir(name, key), **kw)
                save_streams(mem_dir, res.streams)
                streams.update(res.streams)
                return res.model, res.describe()

            stale = fresh or not (mem_dir / "memory.json").is_file()
            model, info = cached_model(model_dir, key, build, fresh=stale)
            return (model, streams or load_streams(mem_dir)), info

        return self._handle(name, key, make, cached=lambda: (is_cached_model(model_dir, key)
                                                              and (mem_dir / "memory.json").is_file()))


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON file of the run's results; a damaged one is a one-line error naming it (never silently retrained)."""
    return read_json_object(path, what, "restore it from git or delete it")


def replace_seed(cfg: TrainConfig, seed: int) -> TrainConfig:
    return replace(cfg, seed=seed)


def _references(run: SeedRun) -> dict[str, Lazy]:
    """pre, FP fine-tuned and both retrain references, each at full precision and INT4."""
    cfg, d = run.cfg, run.data
    key = run.base_key
    run.evaluate("pre", "pre-fine-tune", "reference", run.load_pre, {**key, "m": "pre"})
    models = {"ft": run.trained("ft", d.rows(0.0)),
              "retrain_masked": run.trained("retrain_masked", d.rows(0.0).without_private_loss())}
    if cfg.retrain_dropped:
        models["retrain_dropped"] = run.trained("retrain_dropped", d.rows_without_records())
    labels = {"ft": "FP fine-tuned", "retrain_masked": "Retrain, secrets masked",
              "retrain_dropped": "Retrain, records dropped"}
    for name, model in models.items():
        run.evaluate(f"{name}_fp", labels[name], "reference", model, {**key, "m": name, "q": None}, cost=model)
        run.evaluate(f"{name}_int4", f"{labels[name]} + INT4", "reference",
                     lambda m=model: quantized(m(), d.calibration, cfg.quant)[0],
                     {**key, "m": name, **run.quant_key}, cost=model)
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
    trained = run.method(m, noise)
    key = {**run.base_key, "m": tag, "method": cfg.method_config(m, run.seed).key_dict(),
           "revision": SEPARATION[m].revision}
    extra = {"method": m, "noise": noise, "cost": trained}
    if full:
        run.evaluate(f"{tag}_fp_a0", f"{m} FP, alpha=0", "method", lambda: trained()[0], {**key, "v": "fp0"},
                     alpha=0.0, base="fp", **extra)
        run.evaluate(f"{tag}_fp_a1", f"{m} FP, alpha=1", "method",
                     lambda: full_precision_with_memory(*trained())[0], {**key, "v": "fp1"}, alpha=1.0,
                     base="fp", **extra)
    holder: dict[str, nn.Module] = {}

    def q(alpha: float) -> nn.Module:
        if "m" not in holder:
            holder["m"] = dual_stream(*trained(), run.data.calibration, cfg.quant)[0]
        set_alpha(holder["m"], alpha)
        return holder["m"]

    group = "label_noise" if noise else "method"
    what = f" ({noise:.0%} unlabelled)" if noise else ""
    for a in (0.0, 1.0):
        run.evaluate(f"{tag}_int4_a{a:g}", f"{m}{what} INT4, alpha={a:g}", group, lambda a=a: q(a),
                     {**key, "v": f"q{a:g}", **run.quant_key}, alpha=a, base="int4", **extra)
    if not noise and trained.made:  # its eta while the model is at hand (recorded, so never trained for again)
        eta_of(run, m, trained, True)
    trained.release()  # later stages (eta, relearning, deletion) load it from the cache again


def run_seed(run: SeedRun) -> None:
    """Every stage of one seed (each cached; a model is made only where a stage needs it).

    Ordered so that a model, once made, serves every stage that needs it before a later stage makes the
    next one (the cache of trained models may not outlive a working session; the JSON results do): each
    stage that may make models is followed by the eta of whatever is at hand, memsink's deletion comes
    right after the method rows, the relearning attack needs its targets (relearn_targets) and the masked retrain, and
    the unlearning baselines the FP fine-tuned model, whose eta closes the seed."""
    cfg = run.cfg
    models = _references(run)
    eta_stage(run, models, available_only=True)
    _methods(run, full=cfg.full_precision_rows)
    eta_stage(run, models, available_only=True)
    if "memsink" in cfg.methods and cfg.delete_records:
        deletion_stage(run)
    ranking = rank_methods(run.evals, cfg.methods)
    run.stages["ranking"] = ranking
    noisy = cfg.label_noise_methods if cfg.label_noise_methods is not None else tuple(r["method"] for r in ranking[:2])
    for f in cfg.label_noise:
        _methods(run, noise=f, methods=noisy, full=False)
    for m in relearn_targets(cfg.stage, cfg.methods, [r["method"] for r in ranking]) if cfg.relearn_steps else []:
        target = run.method(m)
        relearn_stage(run, m, lambda target=target: dual_stream(*target(), run.data.calibration, cfg.quant,
                                                                 alpha=0.0)[0])
    if cfg.relearn_steps:
        relearn_stage(run, "retrain_masked",
                      lambda: quantized(models["retrain_masked"](), run.data.calibration, cfg.quant)[0])
    eta_stage(run, models, available_only=True)
    if cfg.unlearning:
        unlearning_stage(run, models["ft"])
    eta_stage(run, models)


def run_separation(cfg: SeparationExpConfig, out_dir: str | Path, progress: bool = True, fresh: bool = False,
                   console: Console | None = None, cache_dir: str | Path | None = None,
                   reuse: tuple[str | Path, ...] = ()) -> dict[str, Any]:
    """Run every seed of ``cfg``; writes ``out_dir/result.json`` after every evaluation and returns it.

    ``out_dir`` holds the results (result, evaluations, training infos: JSON only), ``cache_dir``
    (default ``out_dir``) the trained models, memory streams and checkpoints. ``reuse``: the results
    folders of other runs, whose rows and records under the same keys are copied instead of measured
    again (a pilot that varies one method then re-measures none of the references)."""
    reuse_dirs = tuple(Path(r) for r in reuse)
    for r in reuse_dirs:
        if not (r / RESULT_FILE).is_file():
            raise FileNotFoundError(f"--reuse {r}: no {RESULT_FILE} there (give the out folder of a separation run)")
        if r.resolve() == Path(out_dir).resolve():
            raise ValueError(f"--reuse {r} is this run's own --out")
    console = console or Console(stderr=True)
    out, t0 = Path(out_dir), time.perf_counter()
    result: dict[str, Any] = {"experiment": "separation", "stage": cfg.stage, "config": cfg.to_dict(),
                              "environment": environment(), "seeds": {}}

    def record() -> None:
        result["wall_s"] = time.perf_counter() - t0
        result["summary"] = summarise_separation(result)
        atomic_write_json(out / RESULT_FILE, lean(result))

    for seed in cfg.seeds:
        run = SeedRun(cfg, seed, out, console, progress, fresh, record,
                      None if cache_dir is None else Path(cache_dir), reuse_dirs)
        result["seeds"][str(seed)] = {"data": run.data.describe(), "stages": run.stages, "evals": run.evals,
                                      "unlabelled": {str(f): run.data.unlabelled(f) for f in cfg.label_noise},
                                      "member_kinds": [c.kind for c in run.data.members]}
        run_seed(run)
        record()
    return result
