"""``libortho experiment geoq``: geometry-aware randomised quantization on the kill-switch benchmark (seed 004).

The seed's proposal: quantize "functional" regions (general skill) at more bits with GPTQ and
"sensitive" regions (memorised detail) at fewer bits with random rounding, so the model keeps its
skill and loses its records, at the bits of a uniform quantizer. Measured here on the kill-switch
benchmark (its preset: SmolLM2 fine-tuned on public text plus member canaries):

* regions are (row, quantization group) pairs of every decoder linear (:mod:`libortho.quant.regional`);
* functional score ``W^2 h_public`` (diagonal of the public calibration Hessian); sensitivity scores from
  :data:`~libortho.quant.regional.SENSITIVITY`: ``update`` (what fine-tuning wrote, weighted by the
  private records' curvature), ``private_curvature``, and ``random`` (the control: same counts, no geometry);
* the ``frac`` most sensitive regions at ``widths[0]`` bits with dither ``noise``, the ``frac`` most
  functional of the rest at ``widths[2]``, the others at ``widths[1]``: equal mean code width to uniform
  ``widths[1]``. The accounting adds the bits that name each region's width (``log2 3`` per group);
* baselines: uniform INT-``widths[1]`` and INT-``widths[0]`` GPTQ through the same code path
  (no noise), the fine-tuned FP model and the model before fine-tuning.

Layer Hessians (public and private) come from one sequential INT4 decomposition of the fine-tuned
model (the kill-switch pipeline's), shared by every arm. Each arm's evaluation is cached as JSON
under ``out/arms/``, so a run resumes; the fine-tuned model is cached under ``models_dir``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from libortho.atomic import atomic_write_json
from libortho.config import lists_to_tuples
from libortho.experiments.store import cached_json
from libortho.quant.regional import SENSITIVITY, LayerView, RegionPlan, functional_score, plan_regions, regional_gptq

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Arm:
    """One quantized model: uniform at ``bits`` (``sensitivity`` None) or a regional plan."""

    name: str
    sensitivity: str | None
    bits: int
    noise: float
    seed: int


@dataclass(frozen=True)
class GeoQuantConfig:
    """The experiment's knobs (defaults: the SmolLM2 run in docs/results/geoq_smollm2/geoq)."""

    model: str = "smollm2-135m"
    widths: tuple[int, ...] = (3, 4, 5)
    frac: float = 0.125
    noises: tuple[float, ...] = (0.0, 1.0, 2.0)
    sensitivities: tuple[str, ...] = ("update", "private_curvature", "random")
    dither_seeds: tuple[int, ...] = (0, 1)  # two draws of every random plan: the dither's own variance
    seed: int = 0
    models_dir: str = ""  # where the fine-tuned model is cached ("" = out/models); a location, not a knob
    kill_switch: dict[str, Any] = field(default_factory=dict)  # overrides of the kill-switch preset (tests)

    def __post_init__(self) -> None:
        lists_to_tuples(self)
        if len(self.widths) != 3 or not 2 <= self.widths[0] < self.widths[1] < self.widths[2] <= 8:
            raise ValueError(f"widths must be (low, middle, high) code widths in [2, 8], got {self.widths}")
        if not 0 < self.frac <= 0.5:
            raise ValueError(f"frac must be in (0, 0.5], got {self.frac}")
        if not self.noises or any(not n >= 0 for n in self.noises):
            raise ValueError(f"noises must be a non-empty list of values >= 0 (grid steps), got {self.noises}")
        for s in self.sensitivities:
            SENSITIVITY.entry(s)  # one-line KeyError naming the registered scores
        if not self.dither_seeds:
            raise ValueError("give at least one dither seed")

    def arms(self) -> list[Arm]:
        """Uniform middle and low widths, then every (sensitivity, noise, seed) plan; a seed only matters where
        something is random (noise > 0 or random regions), so other plans run once. The first dither seed's arm
        keeps the untagged name (``geo-update-n1``) and later seeds add ``-s<seed>``, so adding a seed to a
        finished run reuses its cached arms."""
        lo, mid, _ = self.widths
        out = [Arm(f"uniform-int{mid}", None, mid, 0.0, 0), Arm(f"uniform-int{lo}", None, lo, 0.0, 0)]
        for s in self.sensitivities:
            for n in self.noises:
                random = n > 0 or s == "random"
                for seed in self.dither_seeds if random else self.dither_seeds[:1]:
                    tag = f"-s{seed}" if random and seed != self.dither_seeds[0] else ""
                    out.append(Arm(f"geo-{s}-n{n:g}{tag}", s, mid, n, seed))
        return out


def quantize_arm(ft: nn.Module, records: dict[str, Any], pre: dict[str, torch.Tensor], arm: Arm,
                 cfg: GeoQuantConfig, quant: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A dense copy of ``ft`` whose decomposed linears hold the arm's quantized weights, and its accounting."""
    model = copy.deepcopy(ft)
    gen = torch.Generator().manual_seed(arm.seed)
    g = quant.group_size
    loss = clipped = params = 0.0
    code_bits = width_bits = 0.0
    for name, rec in records.items():
        W = rec.weight.float()
        view = LayerView(W, pre.get(name), torch.diagonal(rec.hessian).float(),
                         torch.diagonal(rec.selection_hessian).float())
        n_groups = (W.shape[1] + g - 1) // g
        if arm.sensitivity is None:
            plan = RegionPlan.uniform(W.shape[0], n_groups, arm.bits)
        else:
            plan = plan_regions(functional_score(view, g), SENSITIVITY[arm.sensitivity](view, g, gen),
                                (cfg.widths[0], arm.bits, cfg.widths[2]), cfg.frac, cfg.frac, arm.noise)
        Wq, info = regional_gptq(W, rec.hessian, plan, quant, gen)
        with torch.no_grad():
            model.get_submodule(name).weight.copy_(Wq)
        loss, clipped = loss + info["loss"], clipped + info["clipped"]
        params += W.numel()
        code_bits += info["mean_code_bits"] * W.numel()
        width_bits += info["width_bits"] / g * W.numel()
    return model.eval(), {"gptq_loss": loss, "clipped": int(clipped), "params": int(params),
                          "mean_code_bits": code_bits / params, "width_bits_per_param": width_bits / params}


def _pre_weights(load_pre: Any, names: list[str]) -> dict[str, torch.Tensor]:
    pre = load_pre()
    out = {n: pre.get_submodule(n).weight.detach().float().clone() for n in names}
    del pre
    return out


def run_geoq(cfg: GeoQuantConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Fine-tune (cached), collect the layer Hessians, quantize and measure every arm, write ``out/result.json``."""
    from libortho.config import DecomposeConfig
    from libortho.experiments.kill_switch import benchmark_config, environment, open_benchmark
    from libortho.pipeline import decompose
    from libortho.workflows import bits_summary

    out = Path(out)
    kcfg = benchmark_config(cfg.model, cfg.seed, cfg.kill_switch)
    kcfg = replace(kcfg, harness=replace(kcfg.harness, keep_scores=True))  # the report's paired intervals
    if kcfg.quant.order != "natural" or kcfg.quant.bits != cfg.widths[1]:
        raise ValueError(f"the kill-switch quantizer must run in the natural order at {cfg.widths[1]} bits "
                         f"(the uniform baseline), got order {kcfg.quant.order!r}, {kcfg.quant.bits} bits")
    bench, _, say = open_benchmark(kcfg, out, cfg.models_dir, "geoq", progress)
    t0 = time.perf_counter()
    res = decompose(copy.deepcopy(bench.ft), bench.data.calibration,
                    DecomposeConfig(quant=kcfg.quant, select=kcfg.select, ortho=True), keep_records=True,
                    progress=False, select_calibration=bench.data.private_calibration)
    overhead = bits_summary(res.base, None)["base_bits_per_param"] - kcfg.quant.bits  # scales and zeros
    say(f"layer Hessians (public + private) in {time.perf_counter() - t0:.0f} s; {len(res.records)} linears")
    pre = _pre_weights(bench.load_pre, list(res.records))
    base_key = {"kill_switch": kcfg.to_dict(), "widths": cfg.widths, "frac": cfg.frac}
    arms: dict[str, Any] = {}
    for ref in ("ft", "pre"):
        arms[ref] = {"metrics": cached_json(out / "arms" / f"{ref}.json", {**base_key, "ref": ref},
                                            lambda r=ref: bench.harness.evaluate(bench.ft if r == "ft"
                                                                                 else bench.load_pre(), progress=False),
                                            say)}
    for arm in cfg.arms():
        def build(arm: Arm = arm) -> dict[str, Any]:
            model, acct = quantize_arm(bench.ft, res.records, pre, arm, cfg, kcfg.quant)
            return {"accounting": acct, "metrics": bench.harness.evaluate(model, progress=False)}

        value = cached_json(out / "arms" / f"{arm.name}.json", {**base_key, "arm": asdict(arm)}, build, say,
                            lambda v: f"extraction {v['metrics']['extraction']['rate']:.3f}  exposure "
                                      f"{v['metrics']['exposure']['mean']:.2f}  general PPL "
                                      f"{v['metrics']['ppl_general']:.2f}")
        acct = value["accounting"]
        bits = acct["mean_code_bits"] + acct["width_bits_per_param"] + overhead
        arms[arm.name] = {**asdict(arm), **value, "bits_per_param": bits}
    result = {"experiment": "geoq", "config": asdict(cfg), "kill_switch_config": kcfg.to_dict(),
              "environment": environment(), "data": bench.data.describe(), "finetune": bench.ft_info,
              "grid_overhead_bits": overhead, "arms": arms}
    atomic_write_json(out / RESULT_FILE, result)
    return result
