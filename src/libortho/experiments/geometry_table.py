"""The seeds' table 1 on our kill-switch benchmark: post-hoc v1/v2 switches, the task-vector split, retraining.

Seeds 000/001 (§5 table 1) compare ways of making a fine-tuned model forget its private records
with a switch. This experiment measures, on the kill-switch benchmark (:mod:`.kill_switch`: the same
data, fine-tuned model and harness), each switch *off*:

- ``ft``, ``retrain`` (fine-tuned on public data only), ``pre``: the references;
- ``v1_obs`` / ``v1_diag``: GPTQ INT4 base + sparse ortho stream of the quantization residual (alpha 0
  is the base alone, the same for both selectors: measured once and checked bit for bit);
- ``v2_kfac_a1``: the same base with the v2 K-FAC selector (``SelectConfig(curvature="kfac")``: true
  Fisher on the public calibration, a rank-r stream in the obs stream's bits) at alpha 1; its alpha 0
  is that same base, so ``v1_a0`` is its switch-off row too;
- ``tv_r{k}``: the task-vector split ``W_pre + τ_low`` (``b = 0``) at rank ``k`` per matrix, at FP32 and
  with its INT4 GPTQ base; the non-linear tensors the fine-tuning moved are kept fine-tuned
  (``rest="ft"``), and one control at the chosen rank reverts them too (``rest="pre"``);
- ``kfac_r{k}``: the v2 K-FAC selector applied to the task vector: the rank-``k`` part of ``τ`` that
  matters most to the private records' loss under their K-FAC (empirical) Fisher becomes the memory
  stream; alpha 0 is ``W_ft - M``. The records are the forget set, known to the owner as they are to
  the unlearning baselines.

The goal of the split (issue 10) is a rank with exposure <= retrain + 1 bit at skill >= 0.9: the rank
is *chosen on one half of the member canaries and reported on the other half*. Per layer eta on a
held-out public subspace (beside the random baseline), linear mode connectivity between the
switched-off models and the references on public and private text, and the update spectra come
with it. Every stage is cached under its configuration (models, evaluations, curves), so a run
resumes where it stopped; the JSON is the only source of the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from libortho.atomic import atomic_write_json, read_json_object
from libortho.experiments.config import KillSwitchConfig, preset
from libortho.experiments.geometry_rows import KFACRows, Splits, split_row, v1_rows
from libortho.experiments.store import _canonical, cached_model

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class GeometryTableConfig:
    """What the table measures on top of the kill-switch benchmark ``bench``."""

    bench: KillSwitchConfig
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    int4_ranks: tuple[int, ...] = (1, 4, 16, 64)
    kfac_ranks: tuple[int, ...] = (4, 16)
    kfac_damp: float = 0.1
    kfac_fisher: str = "empirical"
    eta_energy: float = 0.97
    lmc_points: int = 11
    lmc_blocks: int = 8
    skill_goal: float = 0.9
    exposure_margin_bits: float = 1.0
    n_boot: int = 2000
    slq_probes: int = 4
    slq_steps: int = 30
    slq_blocks: int = 4
    slq_max_params: int = 5_000_000

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bench"] = self.bench.to_dict()
        return d

    def check(self) -> None:
        """Refuse a config that cannot run, before anything is loaded."""
        for name in ("ranks", "int4_ranks", "kfac_ranks"):
            if any(r < 1 for r in getattr(self, name)):
                raise ValueError(f"{name} must be positive ranks, got {getattr(self, name)}")
        if not self.ranks:
            raise ValueError("ranks is empty: the split needs at least one rank")
        if not self.kfac_ranks:
            raise ValueError("kfac_ranks is empty: the eta stage reads the largest K-FAC memory")
        if not 0 < self.kfac_damp < float("inf"):
            raise ValueError(f"kfac_damp must be a finite number > 0, got {self.kfac_damp}")
        if not 0 < self.eta_energy <= 1:
            raise ValueError(f"eta_energy must be in (0, 1], got {self.eta_energy}")
        if self.kfac_fisher not in ("true", "empirical"):
            raise ValueError(f"kfac_fisher must be 'true' or 'empirical', got {self.kfac_fisher!r}")
        if self.slq_probes < 1 or self.slq_steps < 2 or self.slq_blocks < 1:
            raise ValueError(f"slq_probes, slq_blocks must be >= 1 and slq_steps >= 2, got {self.slq_probes}, "
                             f"{self.slq_blocks}, {self.slq_steps}")
        if self.lmc_points < 3:
            raise ValueError(f"lmc_points must be >= 3, got {self.lmc_points}")


def default_config(model: str = "smollm2-135m") -> GeometryTableConfig:
    return GeometryTableConfig(bench=preset(model))


def halves(members: list[Any]) -> tuple[list[int], list[int]]:
    """Two halves of the member canaries, balanced in repeat count first and in kind second.

    Within each repeat count (levels in ascending order) the canaries are ordered by kind (in order of
    first appearance) and dealt alternately, the dealing starting on A for even levels and on B for odd
    ones. So each half gets half of every repeat count (up to one), and with the benchmark's 4 canaries
    per kind seen 1, 1, 4 and 16 times, each kind gives each half one canary seen once and one of the
    others: no half collects all the most repeated canaries. Half A chooses the rank, half B reports it;
    deterministic, and fixed before anything is measured."""
    kinds: dict[str, int] = {}
    for m in members:
        kinds.setdefault(m.kind, len(kinds))
    a: list[int] = []
    b: list[int] = []
    for level, reps in enumerate(sorted({m.repeats for m in members})):
        idx = sorted((i for i, m in enumerate(members) if m.repeats == reps), key=lambda i: (kinds[members[i].kind], i))
        for p, i in enumerate(idx):
            (a if (p + level) % 2 == 0 else b).append(i)
    return sorted(a), sorted(b)


def half_stats(metrics: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    """Extraction and mean exposure of one half of the members."""
    if not idx:
        raise ValueError("an empty half of the member canaries")
    per = [metrics["per_canary"][i] for i in idx]
    return {"n": len(per), "extracted": int(sum(p["extracted"] for p in per)),
            "exposure": sum(p["exposure"] for p in per) / len(per)}


def choose_rank(rows: dict[str, dict[str, Any]], retrain_a: float, skill_goal: float, margin: float
                ) -> dict[str, Any]:
    """The split's rank, read from half A only: among ranks whose half-A exposure is at most
    ``retrain_a + margin`` and whose skill is at least ``skill_goal``, the one with the highest skill
    (ties: the lower rank). None when no rank passes both (then the reason is given)."""
    private_ok = sorted(n for n, r in rows.items() if r["half_a"]["exposure"] <= retrain_a + margin)
    skill_ok = sorted(n for n, r in rows.items() if r["skill"] is not None and r["skill"] >= skill_goal)
    ok = set(private_ok) & set(skill_ok)
    best = max(ok, key=lambda n: (rows[n]["skill"], -rows[n]["rank"])) if ok else None
    return {"chosen": best, "exposure_ok": private_ok, "skill_ok": skill_ok}


class _Table:
    """The benchmark's data, harness and models, and the cache of every row."""

    def __init__(self, cfg: GeometryTableConfig, out: Path, console: Console, progress: bool, fresh: bool) -> None:
        from libortho.eval.harness import PrivacyHarness
        from libortho.experiments.kill_switch import _finetuned, _load_pre_and_tokenizer, _tiny_pre_loader, build_data

        self.cfg, self.out, self.progress, self.fresh = cfg, out, progress, fresh
        self.say = lambda msg: console.print(f"[cyan]geometry-table[/] {msg}", highlight=False)  # noqa: E731
        b = cfg.bench
        torch.manual_seed(b.seed)
        load_pre, tok = _load_pre_and_tokenizer(b)
        self.tok = tok
        self.data = build_data(b, tok)
        self.result: dict[str, Any] = {"rows": {}, "stages": {}}
        if load_pre is None:  # the tiny model: pre-trained inside the run (cached), as in the kill-switch experiment
            load_pre, self.result["stages"]["pretrain"] = _tiny_pre_loader(b, self.data, out / "models", fresh,
                                                                           self.say)
        self.load_pre = load_pre
        self.harness = PrivacyHarness(tok, self.data.members, self.data.nonmembers, self.data.domain_eval,
                                      self.data.general_eval, b.harness)
        self.pre = self.load_pre()
        self.harness.set_reference(self.pre)
        self.ft, self.ft_info = _finetuned(b, self.data, self.load_pre, out / "models", fresh)
        self.result["stages"]["finetune"] = self.ft_info
        # the rows' common key: the benchmark less its v1 selector (the v1 rows name theirs: select_key)
        bench = {k: v for k, v in b.to_dict().items() if k not in ("select", "alphas", "unlearning")}
        self.base_key = {"bench": bench, "harness": _canonical(self.harness.describe())}

    # ---- caches ------------------------------------------------------------------------------
    def _cached_json(self, sub: str, name: str, key: dict[str, Any], make: Callable[[], dict[str, Any]]
                     ) -> dict[str, Any]:
        path = self.out / sub / f"{name}.json"
        key = _canonical({**self.base_key, **key})
        if not self.fresh and path.is_file():
            saved = read_json_object(path, f"recorded {sub}", "delete it to measure again")
            if saved.get("key") == key:
                return saved["entry"]
        entry = make()
        atomic_write_json(path, {"key": key, "entry": entry})
        return entry

    def row(self, name: str, label: str, group: str, key: dict[str, Any],
            build: Callable[[], tuple[nn.Module, dict[str, Any]]], **extra: Any) -> dict[str, Any]:
        """Metrics of ``build()``'s model, cached in ``evals/<name>.json`` under ``key``."""

        def make() -> dict[str, Any]:
            t0 = time.perf_counter()
            model, cost = build()
            build_s = time.perf_counter() - t0
            metrics = self.harness.evaluate(model, progress=self.progress)
            del model
            return {"label": label, "group": group, "metrics": metrics, "build_s": build_s, "cost": cost, **extra}

        entry = self._cached_json("evals", name, key, make)
        m = entry["metrics"]
        self.say(f"{label:<36} extracted {sum(p['extracted'] for p in m['per_canary']):2d}/{len(m['per_canary'])}"
                 f"  exposure {m['exposure']['mean']:5.2f}  ppl {m['ppl_domain']:.2f}/{m['ppl_general']:.2f}")
        self.result["rows"][name] = entry
        return entry

    def retrained(self) -> tuple[nn.Module, dict[str, Any]]:
        """Retrain without the private records (the kill-switch experiment's cached ``retrain``)."""
        from libortho.data.records import mixture
        from libortho.experiments.kill_switch import _pre_key
        from libortho.train.unlearn import UnlearnTask, run_unlearning

        b, d = self.cfg.bench, self.data
        public_only = mixture(d.public, None, b.seed, n_private=len(d.private))
        task = UnlearnTask(forget=d.forget, retain=d.public, retrain_data=public_only, retrain_config=b.finetune,
                           load_pre=self.load_pre)

        def build() -> tuple[nn.Module, dict[str, Any]]:
            o = run_unlearning("retrain", self.ft, task, b.unlearn, progress=self.progress)
            return o.model, {"wall_s": o.wall_s, "steps": o.log["steps"], "tokens": o.log.get("tokens")}

        key = {"stage": "retrain", "pre": _pre_key(b, d), "train": b.finetune.__dict__, "seed": b.seed,
               "data": [b.domain, b.public_blocks, b.block_len, len(d.private)]}
        return cached_model(self.out / "models" / "retrain", key, build, self.fresh)


# ---- the rows' models --------------------------------------------------------------------------
def run_geometry_table(cfg: GeometryTableConfig, out_dir: str | Path, progress: bool = True, fresh: bool = False,
                       console: Console | None = None) -> dict[str, Any]:
    """Every row, the rank choice, eta, LMC, spectra (and the Hessian's on small models); writes
    ``out_dir/result.json`` and returns it."""
    from libortho.experiments.kill_switch import environment

    cfg.check()
    console = console or Console(stderr=True)
    out, t0 = Path(out_dir), time.perf_counter()
    t = _Table(cfg, out, console, progress, fresh)
    b, d = cfg.bench, t.data
    qkey = {"quant": asdict(b.quant), "calib": [b.calib_blocks, b.calib_len]}
    retrain = _reference_rows(t, qkey)
    v1_rows(t, qkey)
    splits = Splits(t)
    for k in cfg.ranks:
        split_row(t, splits, k, "ft", None)
    for k in cfg.int4_ranks:
        split_row(t, splits, k, "ft", qkey)
    kfac = KFACRows(t)
    for k in cfg.kfac_ranks:
        kfac.rows(k, qkey)
    chosen_rank = _choose(t)
    split_row(t, splits, chosen_rank, "pre", None)
    _diagnostics(t, retrain, splits.get(chosen_rank), kfac, chosen_rank, qkey)
    result = {"experiment": "geometry_table", "config": cfg.to_dict(), "environment": environment(),
              "data": d.describe(), "harness": t.harness.describe(), **t.result,
              "wall_s": time.perf_counter() - t0}
    atomic_write_json(out / RESULT_FILE, result)
    t.say(f"done in {result['wall_s'] / 60:.1f} min: {out / RESULT_FILE}")
    return result


def _reference_rows(t: _Table, qkey: dict[str, Any]) -> nn.Module:
    """pre, ft, retrain (and its INT4 GPTQ): the references every switch is read against."""
    from libortho.assemble import quantized

    t.row("pre", "pre-fine-tune", "reference", {"m": "pre"}, lambda: (t.pre, {}))
    t.row("ft", "FP fine-tuned", "reference", {"m": "ft"}, lambda: (t.ft, t.ft_info))
    retrain, rinfo = t.retrained()
    t.result["stages"]["retrain"] = rinfo
    t.row("retrain", "Retrain w/o private", "reference", {"m": "retrain"}, lambda: (retrain, rinfo))
    t.row("retrain_int4", "Retrain w/o private + INT4", "reference", {"m": "retrain", **qkey},
          lambda: quantized(retrain, t.data.calibration, t.cfg.bench.quant))
    return retrain


def _choose(t: _Table) -> int:
    """The split's rank, chosen on half A of the member canaries (half B reports it); records the choice.

    When no rank meets both goals, the control rank is the best trade-off on half A: the highest skill less
    the exposure excess over retrain + margin."""
    from libortho.experiments.summary import skill_retained

    cfg, rows = t.cfg, t.result["rows"]
    ha, hb = halves(t.data.members)
    pre_ppl, ft_ppl = rows["pre"]["metrics"]["ppl_domain"], rows["ft"]["metrics"]["ppl_domain"]
    cand = {}
    for k in cfg.ranks:
        m = rows[f"tv_r{k}"]["metrics"]
        cand[f"tv_r{k}"] = {"rank": k, "skill": skill_retained(pre_ppl, m["ppl_domain"], ft_ppl),
                            "half_a": half_stats(m, ha)}
    ret_a = half_stats(rows["retrain"]["metrics"], ha)
    choice = choose_rank(cand, ret_a["exposure"], cfg.skill_goal, cfg.exposure_margin_bits)
    if choice["chosen"]:
        rank = cand[choice["chosen"]]["rank"]
    else:
        rank = max(cand.values(), key=lambda r: (r["skill"] or -1e9) - max(
            r["half_a"]["exposure"] - ret_a["exposure"] - cfg.exposure_margin_bits, 0))["rank"]
    t.result["choice"] = {"halves": {"a": ha, "b": hb}, "candidates": cand, **choice, "retrain_half_a": ret_a,
                          "retrain_half_b": half_stats(rows["retrain"]["metrics"], hb), "control_rank": rank}
    return rank


def _diagnostics(t: _Table, retrain: nn.Module, split: Any, kfac: KFACRows, rank: int, qkey: dict[str, Any]
                 ) -> None:
    """eta, update spectra, LMC (cached), and the Hessian spectra where the model is small enough."""
    from libortho.edit.task_vector import apply_split
    from libortho.experiments import geometry_diagnostics as gd

    cfg = t.cfg
    t.say("eta, spectra, linear mode connectivity")
    t.result["eta"] = t._cached_json("geometry", "eta", {"energy": cfg.eta_energy, "rank": rank,
                                                          "kfac": [kfac.key, list(cfg.kfac_ranks)]},
                                     lambda: gd.eta_table(t, kfac.tau, retrain, split, kfac.streams))
    t.result["spectra"] = t._cached_json("geometry", "spectra", {"v": 1}, lambda: gd.update_spectra(kfac.tau))
    t.result["lmc"] = t._cached_json("geometry", "lmc", {"points": cfg.lmc_points, "blocks": cfg.lmc_blocks,
                                                         "private": "records, loss tokens", "rank": rank, **qkey},
                                     lambda: gd.lmc_pairs(t, retrain, split))
    n = gd.linear_parameter_count(t.ft)
    if n > cfg.slq_max_params:
        t.result["hessian"] = {"skipped": f"{n / 1e6:.1f}M decoder-linear weights > slq_max_params "
                                          f"{cfg.slq_max_params / 1e6:.1f}M (one Hessian-vector product per "
                                          "Lanczos step; run it on the tiny model)"}
        return
    directions = {"tau": kfac.tau, "tau_low": {n: split.layers[n].low() for n in kfac.tau},
                  "tau_high": {n: split.layers[n].high() for n in kfac.tau}}
    key = {"probes": cfg.slq_probes, "steps": cfg.slq_steps, "blocks": cfg.slq_blocks, "rank": rank,
           "private": "records, loss tokens"}
    t.result["hessian"] = t._cached_json(
        "geometry", "hessian", key,
        lambda: gd.hessian_spectra(t, {"pre": t.pre, "ft": t.ft, "tv_a0": apply_split(t.pre, split, 1.0, 0.0),
                                       "retrain": retrain}, directions))


def config_from_file(path: str | Path | None, model: str) -> GeometryTableConfig:
    """The default config for ``model``, with the top-level fields of a JSON file (if given) replaced."""
    cfg = default_config(model)
    if path is None:
        return cfg
    d = json.loads(Path(path).read_text())
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a geometry-table config is a JSON object")
    unknown = sorted(set(d) - set(GeometryTableConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown geometry-table config fields: {', '.join(unknown)}")
    tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "bench"}
    if "bench" in d:  # the kill-switch benchmark's own fields, over the model's preset
        tuples["bench"] = KillSwitchConfig.from_dict({**cfg.bench.to_dict(), **d["bench"]})
    return replace(cfg, **tuples)

