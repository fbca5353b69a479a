"""``libortho experiment dual-dp``, part one: Gaussian noise on the memory (ortho) stream only vs on all weights.

Seed 002 (section 5.5) proposes "dual differential privacy": noise where memory lives, none where
general skill lives. On the kill-switch benchmark (SmolLM2 fine-tuned on public text plus canaries,
its preset), the model is decomposed once (GPTQ base + ortho stream) and turned back into dense
effective weights ``W = Q + O``. Two arms then perturb it:

* ``ortho``: ``O + sigma * rms(O) * xi`` on the ortho stream's entries only (``rms`` per layer over its entries);
* ``all``: ``W + sigma * rms(W) * xi`` on every entry of every decomposed linear;

``xi`` standard normal from a seeded generator. Each (arm, sigma) is measured by the privacy harness
(extraction, exposure, MIA, domain and general perplexity) and cached as JSON under ``out/points/``;
``sigma = 0`` is the shared starting point. The utility-leakage curves of the two arms are the result.
This is noise calibrated to nothing (no (eps, delta) is claimed for it): the DP-SGD part of the issue,
with real accounting, is :mod:`libortho.train.dp`'s to carry.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from libortho.atomic import atomic_write_json
from libortho.config import lists_to_tuples
from libortho.experiments.store import cached_json

RESULT_FILE = "result.json"
ARMS = ("ortho", "all")


@dataclass(frozen=True)
class NoiseSweepConfig:
    """The sweep's knobs (defaults: the SmolLM2 run in docs/results/dual_dp_smollm2/noise)."""

    model: str = "smollm2-135m"
    ortho_sigmas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    all_sigmas: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    seed: int = 0
    models_dir: str = ""  # where the fine-tuned model is cached ("" = out/models); a location, not a knob
    kill_switch: dict[str, Any] = field(default_factory=dict)  # overrides of the kill-switch preset (tests)

    def __post_init__(self) -> None:
        lists_to_tuples(self)
        for name in ("ortho_sigmas", "all_sigmas"):
            vals = getattr(self, name)
            if not vals or any(not s > 0 for s in vals):
                raise ValueError(f"{name} must be a non-empty list of positive noise scales, got {vals}")

    def points(self) -> list[tuple[str, float]]:
        """(arm, sigma) of every measured model, the shared noiseless one first."""
        return [("none", 0.0), *[("ortho", s) for s in self.ortho_sigmas], *[("all", s) for s in self.all_sigmas]]


def effective_parts(decomposed: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per decomposed linear: (dequantized base, dense ortho stream or None)."""
    from libortho.runtime.linear import OrthoLinear

    out = {}
    for name, mod in decomposed.named_modules():
        if isinstance(mod, OrthoLinear):
            o = mod.ortho_stream
            out[name] = (mod.base_stream.dequantize(torch.float32), None if o is None else o.to_dense())
    return out


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt()) if x.numel() else 0.0


@torch.no_grad()
def noisy_model(ft: nn.Module, parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]], arm: str, sigma: float,
                seed: int) -> nn.Module:
    """A dense copy of ``ft`` whose decomposed linears hold ``Q + O`` with the arm's noise (module docstring)."""
    if arm not in (*ARMS, "none"):
        raise ValueError(f"unknown noise arm {arm!r}; available: {', '.join(ARMS)}")
    model = copy.deepcopy(ft)
    gen = torch.Generator().manual_seed(seed)
    for name, (Q, O) in parts.items():
        W = Q.clone()
        if O is not None:
            if arm == "ortho" and sigma > 0:
                support = O != 0
                vals = O[support]
                O = O.clone()
                O[support] = vals + sigma * _rms(vals) * torch.randn(vals.shape, generator=gen)
            W += O
        if arm == "all" and sigma > 0:
            W += sigma * _rms(W) * torch.randn(W.shape, generator=gen)
        model.get_submodule(name).weight.copy_(W)
    return model.eval()


def run_noise_sweep(cfg: NoiseSweepConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Fine-tune (cached), decompose, measure every (arm, sigma) point, write ``out/result.json``."""
    from libortho.experiments.kill_switch import _decomposed, benchmark_config, environment, open_benchmark

    out = Path(out)
    kcfg = benchmark_config(cfg.model, cfg.seed, cfg.kill_switch)
    bench, _, say = open_benchmark(kcfg, out, cfg.models_dir, "dual-dp", progress)
    data, harness, ft, ft_info = bench.data, bench.harness, bench.ft, bench.ft_info
    t0 = time.perf_counter()
    dec, dec_info = _decomposed(ft, kcfg, data, ortho=True, method="gptq")
    parts = effective_parts(dec)
    del dec
    say(f"decomposed in {time.perf_counter() - t0:.0f} s; {len(parts)} linears")
    base_key = {"kill_switch": kcfg.to_dict(), "decompose": "gptq+ortho"}
    points = {}
    for arm, sigma in cfg.points():
        def build(arm: str = arm, sigma: float = sigma) -> dict[str, Any]:
            return harness.evaluate(noisy_model(ft, parts, arm, sigma, cfg.seed), progress=False)

        points[f"{arm}:{sigma:g}"] = {"arm": arm, "sigma": sigma, "metrics": cached_json(
            out / "points" / f"{arm}-{sigma:g}.json", {**base_key, "arm": arm, "sigma": sigma, "seed": cfg.seed},
            build, say, lambda m: f"extraction {m['extraction']['rate']:.3f}  general PPL {m['ppl_general']:.2f}")}
    result = {"experiment": "dual_dp_noise", "config": asdict(cfg), "kill_switch_config": kcfg.to_dict(),
              "environment": environment(), "data": data.describe(), "finetune": ft_info, "decomposition": dec_info,
              "points": points}
    atomic_write_json(out / RESULT_FILE, result)
    return result
