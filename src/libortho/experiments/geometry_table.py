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

import copy
import hashlib
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
        if self.kfac_fisher not in ("true", "empirical"):
            raise ValueError(f"kfac_fisher must be 'true' or 'empirical', got {self.kfac_fisher!r}")
        if self.lmc_points < 3:
            raise ValueError(f"lmc_points must be >= 3, got {self.lmc_points}")


def default_config(model: str = "smollm2-135m") -> GeometryTableConfig:
    return GeometryTableConfig(bench=preset(model))


def halves(members: list[Any]) -> tuple[list[int], list[int]]:
    """Two balanced halves of the member canaries: within each (kind, repeats) stratum, alternately.

    Half A chooses the rank, half B reports it; deterministic, and fixed before anything is measured."""
    order = sorted(range(len(members)), key=lambda i: (members[i].kind, members[i].repeats, i))
    a, b = order[0::2], order[1::2]
    return sorted(a), sorted(b)


def half_stats(metrics: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    """Extraction and mean exposure of one half of the members."""
    per = [metrics["per_canary"][i] for i in idx]
    return {"n": len(per), "extracted": int(sum(p["extracted"] for p in per)),
            "exposure": sum(p["exposure"] for p in per) / len(per)}


def choose_rank(rows: dict[str, dict[str, Any]], retrain_a: float, skill_goal: float, margin: float
                ) -> dict[str, Any]:
    """The split's rank, read from half A only: among ranks whose half-A exposure is at most
    ``retrain_a + margin`` and whose skill is at least ``skill_goal``, the one with the highest skill
    (ties: the lower rank). None when no rank passes both (then the reason is given)."""
    ok = {n: r for n, r in rows.items() if r["half_a"]["exposure"] <= retrain_a + margin
          and r["skill"] is not None and r["skill"] >= skill_goal}
    if not ok:
        private_ok = [n for n, r in rows.items() if r["half_a"]["exposure"] <= retrain_a + margin]
        skill_ok = [n for n, r in rows.items() if r["skill"] is not None and r["skill"] >= skill_goal]
        return {"chosen": None, "exposure_ok": sorted(private_ok), "skill_ok": sorted(skill_ok)}
    best = max(ok, key=lambda n: (ok[n]["skill"], -ok[n]["rank"]))
    return {"chosen": best, "exposure_ok": sorted(ok), "skill_ok": sorted(ok)}


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
def _private_rows(t: _Table) -> torch.Tensor:
    return t.data.private_calibration


def _kfac_factors(t: _Table) -> dict[str, Any]:
    """K-FAC factors of the fine-tuned model's decoder linears on the private records (cached on disk)."""
    from libortho.curvature.kfac import fit_kfac, load_kfac, save_kfac
    from libortho.models.layers import find_linears

    rows = _private_rows(t)
    key = {"fisher": t.cfg.kfac_fisher, "rows": list(rows.shape),
           "digest": hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16], "seed": t.cfg.bench.seed}
    path = t.out / "models" / "kfac_private.safetensors"
    if not t.fresh and path.is_file():
        factors, meta = load_kfac(path)
        if meta.get("key") == _canonical(key):
            return factors
    layers = find_linears(t.ft)
    t0 = time.perf_counter()
    factors = fit_kfac(t.ft, [rows[i:i + 4] for i in range(0, rows.shape[0], 4)], layers,
                       fisher=t.cfg.kfac_fisher, seed=t.cfg.bench.seed)
    t.result["stages"]["kfac_fit_s"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_kfac(factors, path, meta={"key": _canonical(key), "fit_s": t.result["stages"]["kfac_fit_s"]},
              with_eigen=True)
    return factors


def _tau(t: _Table) -> dict[str, torch.Tensor]:
    from libortho.models.layers import find_linears

    lp, lf = find_linears(t.pre), find_linears(t.ft)
    return {n: (lf[n].weight.detach().double() - lp[n].weight.detach().double()) for n in lf}


def kfac_memory_of_update(tau: dict[str, torch.Tensor], factors: dict[str, Any], rank: int, damp: float
                          ) -> dict[str, Any]:
    """Per layer, the K-FAC best rank-``rank`` part of the update as a :class:`LowRankMemory` (fp32)."""
    from libortho.select.kfac import kfac_memory

    return {n: kfac_memory("kfac", dW.float(), factors[n], min(rank, *dW.shape), damp, dtype="fp32")
            for n, dW in tau.items()}


@torch.no_grad()
def minus_memory(model: nn.Module, streams: dict[str, Any]) -> nn.Module:
    """A copy of ``model`` with each named linear's memory subtracted from its weight (``W - M``)."""
    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    for n, st in streams.items():
        w = mods[n].weight
        w.copy_((w.double() - st.to_dense(torch.float64)).to(w.dtype))
    return out


def run_geometry_table(cfg: GeometryTableConfig, out_dir: str | Path, progress: bool = True, fresh: bool = False,
                       console: Console | None = None) -> dict[str, Any]:
    """Every row, the rank choice, eta, LMC and spectra; writes ``out_dir/result.json`` and returns it."""
    from libortho.assemble import quantized
    from libortho.edit.task_vector import apply_split, split_model
    from libortho.experiments.kill_switch import environment
    from libortho.experiments.summary import skill_retained

    cfg.check()
    console = console or Console(stderr=True)
    out, t0 = Path(out_dir), time.perf_counter()
    t = _Table(cfg, out, console, progress, fresh)
    b, d = cfg.bench, t.data
    q = b.quant
    qkey = {"quant": asdict(q), "calib": [b.calib_blocks, b.calib_len]}
    t.row("pre", "pre-fine-tune", "reference", {"m": "pre"}, lambda: (t.pre, {}))
    t.row("ft", "FP fine-tuned", "reference", {"m": "ft"}, lambda: (t.ft, t.ft_info))
    retrain, rinfo = t.retrained()
    t.result["stages"]["retrain"] = rinfo
    t.row("retrain", "Retrain w/o private", "reference", {"m": "retrain"}, lambda: (retrain, rinfo))
    t.row("retrain_int4", "Retrain w/o private + INT4", "reference", {"m": "retrain", **qkey},
          lambda: quantized(retrain, d.calibration, q))
    _v1_rows(t, qkey)
    # the task-vector split, b = 0
    splits: dict[int, Any] = {}

    def split(k: int, rest: str = "ft") -> Any:
        if (k, rest) not in splits:
            splits[(k, rest)] = split_model(t.pre, t.ft, rank=k, rest=rest)
        return splits[(k, rest)]

    for k in cfg.ranks:
        t.row(f"tv_r{k}", f"Task-vector split r={k}, b=0", "taskvec", {"m": "tv", "rank": k, "rest": "ft"},
              lambda k=k: (apply_split(t.pre, split(k), 1.0, 0.0), split(k).summary()), rank=k, base="fp")
    for k in cfg.int4_ranks:
        t.row(f"tv_r{k}_int4", f"Task-vector split r={k}, b=0, INT4", "taskvec",
              {"m": "tv", "rank": k, "rest": "ft", **qkey},
              lambda k=k: (quantized(apply_split(t.pre, split(k), 1.0, 0.0), d.calibration, q)[0],
                           split(k).summary()), rank=k, base="int4")
    # v2 K-FAC selector on the task vector (memory = private-curvature rank-k part of tau)
    tau = _tau(t)
    factors: dict[str, Any] = {}

    def kfac_streams(k: int) -> dict[str, Any]:
        if not factors:
            factors.update(_kfac_factors(t))
        return kfac_memory_of_update(tau, factors, k, cfg.kfac_damp)

    kkey = {"m": "kfac", "fisher": cfg.kfac_fisher, "damp": cfg.kfac_damp, "rows": list(_private_rows(t).shape)}
    for k in cfg.kfac_ranks:
        t.row(f"kfac_r{k}", f"K-FAC (private) memory r={k}, alpha=0", "kfac", {**kkey, "rank": k},
              lambda k=k: (minus_memory(t.ft, kfac_streams(k)), {}), rank=k, base="fp")
        t.row(f"kfac_r{k}_int4", f"K-FAC (private) memory r={k}, alpha=0, INT4", "kfac", {**kkey, "rank": k, **qkey},
              lambda k=k: quantized(minus_memory(t.ft, kfac_streams(k)), d.calibration, q), rank=k, base="int4")
    # the rank choice: half A chooses, half B reports
    rows = t.result["rows"]
    ha, hb = halves(d.members)
    pre_ppl, ft_ppl = rows["pre"]["metrics"]["ppl_domain"], rows["ft"]["metrics"]["ppl_domain"]
    cand = {}
    for k in cfg.ranks:
        m = rows[f"tv_r{k}"]["metrics"]
        cand[f"tv_r{k}"] = {"rank": k, "skill": skill_retained(pre_ppl, m["ppl_domain"], ft_ppl),
                            "half_a": half_stats(m, ha)}
    ret = rows["retrain"]["metrics"]
    choice = choose_rank(cand, half_stats(ret, ha)["exposure"], cfg.skill_goal, cfg.exposure_margin_bits)
    t.result["choice"] = {"halves": {"a": ha, "b": hb}, "candidates": cand, **choice,
                          "retrain_half_a": half_stats(ret, ha), "retrain_half_b": half_stats(ret, hb)}
    chosen_rank = cand[choice["chosen"]]["rank"] if choice["chosen"] else max(
        cand.values(), key=lambda r: (r["skill"] or -1e9) - max(r["half_a"]["exposure"] - half_stats(ret, ha)[
            "exposure"] - cfg.exposure_margin_bits, 0))["rank"]
    t.result["choice"]["control_rank"] = chosen_rank
    t.row(f"tv_r{chosen_rank}_restpre", f"Task-vector split r={chosen_rank}, b=0, rest=pre", "taskvec",
          {"m": "tv", "rank": chosen_rank, "rest": "pre"},
          lambda: (apply_split(t.pre, split(chosen_rank, "pre"), 1.0, 0.0), split(chosen_rank, "pre").summary()),
          rank=chosen_rank, base="fp")
    t.say("eta, spectra, linear mode connectivity")
    t.result["eta"] = t._cached_json("geometry", "eta", {"energy": cfg.eta_energy, "rank": chosen_rank,
                                                          "kfac": [kkey, list(cfg.kfac_ranks)]},
                                     lambda: _eta_table(t, tau, retrain, split(chosen_rank), kfac_streams))
    t.result["spectra"] = t._cached_json("geometry", "spectra", {"v": 1}, lambda: _spectra(tau))
    t.result["lmc"] = t._cached_json("geometry", "lmc", {"points": cfg.lmc_points, "blocks": cfg.lmc_blocks,
                                                         "rank": chosen_rank, **qkey},
                                     lambda: _lmc(t, retrain, split(chosen_rank), qkey))
    result = {"experiment": "geometry_table", "config": cfg.to_dict(), "environment": environment(),
              "data": d.describe(), "harness": t.harness.describe(), **t.result,
              "wall_s": time.perf_counter() - t0}
    atomic_write_json(out / RESULT_FILE, result)
    t.say(f"done in {result['wall_s'] / 60:.1f} min: {out / RESULT_FILE}")
    return result


def select_key(sel: Any) -> dict[str, Any]:
    """The fields of a sparse v1 selection that its rows depend on (stable as SelectConfig grows)."""
    return {k: getattr(sel, k) for k in ("selector", "rho", "scope", "tau", "values", "dtype")}


def _v1_rows(t: _Table, qkey: dict[str, Any]) -> None:
    """v1: GPTQ base + sparse ortho (obs, diag) at alpha 1; alpha 0 once (the base, shared by both)."""
    from libortho.config import DecomposeConfig
    from libortho.pipeline import decompose
    from libortho.runtime import set_alpha
    from libortho.workflows import bits_summary

    b, d = t.cfg.bench, t.data
    made: dict[str, nn.Module] = {}

    def v1(selector: str) -> tuple[nn.Module, dict[str, Any]]:
        model = copy.deepcopy(t.ft)
        res = decompose(model, d.calibration, DecomposeConfig(quant=b.quant, select=replace(b.select,
                                                                                             selector=selector)))
        made[selector] = model
        return model, {"wall_s": res.stats["wall_s"], **bits_summary(res.base, res.ortho)}

    def at(selector: str, alpha: float) -> tuple[nn.Module, dict[str, Any]]:
        model, cost = v1(selector)
        set_alpha(model, alpha)
        return model, cost

    for sel in ("obs", "diag"):
        skey = {"m": "v1", "select": select_key(replace(b.select, selector=sel)), **qkey}
        t.row(f"v1_{sel}_a1", f"v1 ({sel}) alpha=1", "v1", {**skey, "alpha": 1.0}, lambda s=sel: at(s, 1.0),
              alpha=1.0, selector=sel)
    t.row("v1_a0", "v1/v2 alpha=0 (GPTQ base; obs = diag = K-FAC)", "v1", {"m": "v1", "alpha": 0.0, **qkey},
          lambda: _v1_off(made, v1), alpha=0.0)
    # v2: the same base, the memory chosen under K-FAC curvature (true Fisher on the public calibration) as a
    # rank-r stream within the obs stream's bits; its alpha 0 is the same GPTQ base as v1's (checked in a test)
    kcfg = replace(b.select, selector="kfac", curvature="kfac", kfac_fisher="true", kfac_damp=t.cfg.kfac_damp)
    t.row("v2_kfac_a1", "v2 (K-FAC selector) alpha=1", "v1", {"m": "v2", "select": select_key(kcfg),
                                                              "fisher": "true", "damp": t.cfg.kfac_damp, **qkey},
          lambda: _v2_on(t, kcfg, made.get("obs")), alpha=1.0, selector="kfac")


@torch.no_grad()
def _v2_on(t: _Table, sel: Any, v1_model: nn.Module | None) -> tuple[nn.Module, dict[str, Any]]:
    """GPTQ base + K-FAC low-rank memory of the quantization residual, at alpha 1 (decompose's kfac path),
    with the check that its alpha 0 is v1's base bit for bit (``v1_model``, else a fresh GPTQ of ft)."""
    from libortho.assemble import quantized
    from libortho.config import DecomposeConfig
    from libortho.pipeline import decompose
    from libortho.runtime import set_alpha
    from libortho.workflows import bits_summary

    model = copy.deepcopy(t.ft)
    res = decompose(model, t.data.calibration, DecomposeConfig(quant=t.cfg.bench.quant, select=sel))
    ref = v1_model if v1_model is not None else quantized(t.ft, t.data.calibration, t.cfg.bench.quant)[0]
    set_alpha(ref, 0.0)
    set_alpha(model, 0.0)
    probe = torch.arange(64).view(1, 64) % 1000 + 10
    same = bool(torch.equal(model(probe).logits, ref(probe).logits))
    set_alpha(model, 1.0)
    return model, {"wall_s": res.stats["wall_s"], "kfac_s": res.stats["phase_s"].get("kfac"),
                   "alpha0_equals_v1_base": same, **bits_summary(res.base, res.ortho)}


@torch.no_grad()
def _v1_off(made: dict[str, nn.Module], v1: Callable[[str], tuple[nn.Module, dict[str, Any]]]
            ) -> tuple[nn.Module, dict[str, Any]]:
    """The alpha-0 model of v1, with the check that obs and diag give it bit for bit (same base)."""
    from libortho.runtime import set_alpha

    for sel in ("obs", "diag"):
        if sel not in made:
            v1(sel)
    a, b = made["obs"], made["diag"]
    set_alpha(a, 0.0)
    set_alpha(b, 0.0)
    probe = torch.arange(64).view(1, 64) % 1000 + 10
    same = bool(torch.equal(a(probe).logits, b(probe).logits))
    return a, {"obs_equals_diag_at_alpha0": same}


@torch.no_grad()
def _eta_table(t: _Table, tau: dict[str, torch.Tensor], retrain: nn.Module, split: Any,
               kfac_streams: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """eta per layer and pooled for each update, on the pre-trained model's held-out public input subspace."""
    from libortho.geometry import energy_basis
    from libortho.geometry.subspace import eta_report
    from libortho.models.layers import find_linears
    from libortho.train.methods.ogd import input_moments

    names = list(tau)
    bases = {n: energy_basis(C, t.cfg.eta_energy).float()
             for n, C in input_moments(t.pre, t.data.domain_eval, names).items()}
    lr, lp = find_linears(retrain), find_linears(t.pre)
    k = max(t.cfg.kfac_ranks)
    updates = {
        "ft": tau,
        "retrain": {n: lr[n].weight.double() - lp[n].weight.double() for n in names},
        "tv_low": {n: split.layers[n].low().double() for n in names},
        "tv_high": {n: split.layers[n].high().double() for n in names},
        f"kfac_r{k}": {n: s.to_dense(torch.float64) for n, s in kfac_streams(k).items()},
    }
    return {"energy": t.cfg.eta_energy, "rank": split.rule.get("rank"),
            "updates": {u: eta_report(dw, bases) for u, dw in updates.items()}}


@torch.no_grad()
def _spectra(tau: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Singular values of the fine-tuning update per layer (and its energy at the split's ranks)."""
    from libortho.geometry.spectra import singular_values

    out = {}
    for n, dW in tau.items():
        s = singular_values(dW)
        e = torch.cumsum(s.double() ** 2, 0) / float((s.double() ** 2).sum())
        out[n] = {"s": [float(v) for v in s[:64]], "energy_at": {str(r): float(e[min(r, len(e)) - 1])
                                                                 for r in (1, 2, 4, 8, 16, 32, 64)}}
    return out


def _lmc(t: _Table, retrain: nn.Module, split: Any, qkey: dict[str, Any]) -> dict[str, Any]:
    """Loss along straight lines between the switched-off models and the references, public and private."""
    from libortho.assemble import quantized
    from libortho.edit.task_vector import apply_split
    from libortho.eval.perplexity import token_nll
    from libortho.geometry.compare import dense_model
    from libortho.geometry.lmc import lmc_curve

    public = t.data.domain_eval[: t.cfg.lmc_blocks]
    private = _private_rows(t)

    def loss_on(rows: torch.Tensor) -> Callable[[nn.Module], float]:
        def f(m: nn.Module) -> float:
            m.eval()
            tot = n = 0.0
            for i in range(0, rows.shape[0], 4):
                nll = token_nll(m, rows[i:i + 4])
                tot += float(nll.sum())
                n += nll.numel()
            return tot / n
        return f

    tv = apply_split(t.pre, split, 1.0, 0.0)
    v1_a0 = dense_model(quantized(t.ft, t.data.calibration, t.cfg.bench.quant)[0], alpha=0.0)
    models = {"pre": t.pre, "ft": t.ft, "retrain": retrain, "tv_a0": tv, "v1_a0": v1_a0}
    pairs = [("pre", "tv_a0"), ("tv_a0", "retrain"), ("ft", "tv_a0"), ("ft", "retrain"), ("ft", "pre"),
             ("pre", "v1_a0"), ("v1_a0", "retrain"), ("ft", "v1_a0")]
    out: dict[str, Any] = {"pairs": {}}
    for a, b in pairs:
        curves = {}
        for text, rows in (("public", public), ("private", private)):
            c = lmc_curve(models[a], models[b], loss_on(rows), points=t.cfg.lmc_points)
            curves[text] = {"ts": c.ts, "losses": c.losses, "barrier": c.barrier}
        out["pairs"][f"{a}~{b}"] = curves
        t.say(f"LMC {a} ~ {b}: barrier public {curves['public']['barrier']:.4f}, "
              f"private {curves['private']['barrier']:.4f}")
    return out


def config_from_file(path: str | Path | None, model: str) -> GeometryTableConfig:
    """The default config for ``model``, with the top-level fields of a JSON file (if given) replaced."""
    cfg = default_config(model)
    if path is None:
        return cfg
    d = json.loads(Path(path).read_text())
    unknown = sorted(set(d) - set(GeometryTableConfig.__dataclass_fields__) - {"bench"})
    if unknown:
        raise ValueError(f"unknown geometry-table config fields: {', '.join(unknown)}")
    tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "bench"}
    return replace(cfg, **tuples)

