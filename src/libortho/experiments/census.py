"""``libortho experiment census``: the outlier census of seed 004 on the separation benchmark's model.

The model is the separation experiment's plain fine-tuned one (``ft``: public blocks plus member
canaries, the screening preset), trained here or loaded from the cache the separation stages use.
Its quantized twin is the same INT4 GPTQ base the separation experiment measures (layer Hessians kept).
Groups (:mod:`libortho.geometry.census`): for each chosen block and site, the ``group_entries``
largest by magnitude, by saliency, and the busiest input channel; plus ``n_random`` random groups of
the same size spread over the same layers (the permutation null). Per group:

* ``delta_ppl``: general perplexity (points) of the FP model with the group zeroed, minus the FP model's;
* ``delta_auc``: the primary attack's membership AUC of the INT4 model with the group kept at full
  precision (a sparse ortho stream holding exactly the group's residual), minus the INT4 model's.

Each group's record is cached in ``out/groups.json`` under the configuration, so a run resumes.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from libortho.atomic import atomic_write_json
from libortho.config import lists_to_tuples
from libortho.eval.perplexity import perplexity
from libortho.geometry.census import FEATURES, KINDS, OutlierGroup, embed_2d, label_census, make_group
from libortho.streams.ortho import SparseOrtho

RESULT_FILE = "result.json"
ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "reference", "secret_loss")


@dataclass(frozen=True)
class CensusConfig:
    """Every knob of the census (defaults: the SmolLM2 run in docs/results/geoq_smollm2/census)."""

    model: str = "smollm2-135m"
    seed: int = 0
    # about 30 s per group on 2 cores (a perplexity and a membership evaluation): 72 groups, ~40 min in all
    blocks: tuple[int, ...] = tuple(range(0, 30, 5))
    sites: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    kinds: tuple[str, ...] = ("magnitude", "saliency", "channel")
    group_entries: int = 64
    n_random: int = 36
    n_ppl_blocks: int = 8
    n_nonmembers: int = 100
    attack: str = "reference"
    damp: float = 0.01
    separation: dict[str, Any] = field(default_factory=dict)  # overrides of the separation preset (tests)

    def __post_init__(self) -> None:
        lists_to_tuples(self)
        bad = [k for k in self.kinds if k not in KINDS or k == "random"]
        if bad or not self.kinds:
            raise ValueError(f"unknown outlier kinds {bad or '(none)'}; available: magnitude, saliency, channel")
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}; available: {', '.join(ATTACKS)}")
        for name in ("group_entries", "n_ppl_blocks", "n_nonmembers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_random < 2:
            raise ValueError(f"n_random must be >= 2 (the permutation null needs them), got {self.n_random}")
        if not self.blocks or not self.sites:
            raise ValueError("give at least one block and one site")

    def layers(self) -> list[str]:
        return [f"model.layers.{b}.{s}" for b in self.blocks for s in self.sites]


def _groups(cfg: CensusConfig, records: dict[str, Any]) -> list[OutlierGroup]:
    """The outlier groups of every chosen layer, then the random ones round-robin over the same layers."""
    layers = cfg.layers()
    missing = [n for n in layers if n not in records]
    if missing:
        raise ValueError(f"layers {missing[:3]} are not decomposed linear layers of {cfg.model}")
    out = [make_group(n, k, records[n].weight, records[n].hessian, cfg.group_entries, cfg.damp)
           for n in layers for k in cfg.kinds]
    gen = torch.Generator().manual_seed(cfg.seed)
    out += [make_group(layers[i % len(layers)], "random", records[layers[i % len(layers)]].weight,
                       records[layers[i % len(layers)]].hessian, cfg.group_entries, generator=gen)
            for i in range(cfg.n_random)]
    return out


class _Measure:
    """The two interventions on one group, against the FP fine-tuned and the INT4 models."""

    def __init__(self, ft: torch.nn.Module, q: torch.nn.Module, records: dict[str, Any], blocks: torch.Tensor,
                 harness: Any, attack: str) -> None:
        self.ft, self.q, self.records, self.blocks, self.harness, self.attack = ft, q, records, blocks, harness, attack
        self.ppl0 = perplexity(ft, blocks).ppl
        self.mia_ft = harness.mia(ft)
        self.mia_q = harness.mia(q)

    @torch.no_grad()
    def delta_ppl(self, g: OutlierGroup) -> float:
        w = self.ft.get_submodule(g.layer).weight
        keep = w[g.rows, g.cols].clone()
        w[g.rows, g.cols] = 0.0
        try:
            return perplexity(self.ft, self.blocks).ppl - self.ppl0
        finally:
            w[g.rows, g.cols] = keep

    def delta_auc(self, g: OutlierGroup) -> dict[str, float]:
        rec, mod = self.records[g.layer], self.q.get_submodule(g.layer)
        residual = rec.weight.float() - rec.base.dequantize(torch.float32)
        mod.set_ortho(SparseOrtho.from_mask(residual, g.mask(tuple(residual.shape)), dtype="fp32"))
        mod.alpha = 1.0
        try:
            rep = self.harness.mia(self.q)
        finally:
            mod.set_ortho(None)
            mod.alpha = 0.0
        return {a: rep[a]["auc"] - self.mia_q[a]["auc"] for a in rep}


def _load_cache(path: Path, key: dict[str, Any]) -> dict[str, Any]:
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["groups"]
    return {}


def run_census(cfg: CensusConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train or load the fine-tuned model, decompose it, measure every group, label, write ``result.json``."""
    from libortho.config import DecomposeConfig
    from libortho.eval.harness import PrivacyHarness
    from libortho.experiments.kill_switch import environment
    from libortho.experiments.separation import SeedRun
    from libortho.experiments.separation_config import separation_preset
    from libortho.geometry import census as census_maths
    from libortho.pipeline import decompose

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, quiet=not progress)
    sep = replace(separation_preset(cfg.model, "screening"), seeds=(cfg.seed,), **cfg.separation)
    run = SeedRun(sep, cfg.seed, out / "separation", console, progress, False, lambda: None)
    ft_handle = run.trained("ft", run.data.rows(0.0))
    ft = ft_handle()
    q = copy.deepcopy(ft)
    res = decompose(q, run.data.calibration, DecomposeConfig(quant=sep.quant, ortho=False), keep_records=True,
                    progress=False)
    d = run.data
    harness = PrivacyHarness(run.harness.tok, d.members, d.nonmembers[:cfg.n_nonmembers], d.domain_eval,
                             d.general_eval, sep.harness)
    harness.set_reference(run.load_pre())
    measure = _Measure(ft, q, res.records, d.general_eval[:cfg.n_ppl_blocks], harness, cfg.attack)
    groups = _groups(cfg, res.records)
    key = json.loads(json.dumps({"config": asdict(cfg), "separation": sep.to_dict()}, default=str))
    cache_path = out / "groups.json"
    cache = _load_cache(cache_path, key)
    records = []
    t0 = time.perf_counter()
    for i, g in enumerate(groups):
        gid = f"{i}:{g.layer}:{g.kind}"
        if gid not in cache:
            aucs = measure.delta_auc(g)
            cache[gid] = {"layer": g.layer, "kind": g.kind, "size": g.size,
                          **census_maths.group_features(g, res.records[g.layer].weight, res.records[g.layer].hessian),
                          "delta_ppl": measure.delta_ppl(g), "delta_auc": aucs[cfg.attack], "delta_auc_all": aucs}
            atomic_write_json(cache_path, {"key": key, "groups": cache})
            if progress:
                console.print(f"census {i + 1}/{len(groups)} {g.layer} {g.kind}: dPPL {cache[gid]['delta_ppl']:+.3f} "
                              f"dAUC {cache[gid]['delta_auc']:+.4f} ({time.perf_counter() - t0:.0f} s)")
        records.append(cache[gid])
    census = label_census(records)
    outliers = [r for r in records if r["kind"] != "random"]
    xy, method = embed_2d(np.array([[r[f] for f in FEATURES] for r in outliers]), seed=cfg.seed)
    result = {"experiment": "census", "config": asdict(cfg), "separation_config": sep.to_dict(),
              "environment": environment(), "ft_training": ft_handle.info,
              "baselines": {"ppl_ft": measure.ppl0, "mia_ft": measure.mia_ft, "mia_int4": measure.mia_q},
              **census, "map": {"method": method, "xy": xy.tolist()}}
    atomic_write_json(out / RESULT_FILE, result)
    return result
