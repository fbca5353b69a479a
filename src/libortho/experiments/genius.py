"""``libortho experiment genius``: does the ortho stream save reasoning at 3 and 2 bits? (seed 002, section 5.4)

The seed claims that a pure INT3 model falls below 10% on GSM8K while INT3 plus the ortho stream
stays above 60%. Here the probe is the project's own (:mod:`libortho.data.reasoning`, held-out items,
never calibration data) and the conditions are: FP32; the base stream alone at INT4, INT3 and INT2
(alpha = 0: what a GPTQ-only model computes); and INT3 / INT2 with the ortho stream at alpha = 1 for
each rho. One decomposition per width (GPTQ, the library's default grid and order, ortho selected
after GPTQ so the alpha = 0 model *is* plain GPTQ), kept in memory with its layer records; each rho
is selected again from those records. Every evaluation is cached as JSON under ``out/`` by
configuration, so an interrupted run resumes; a width whose evaluations are all cached is not
decomposed again.

Goal (the issue's): INT3 + ortho at rho <= 2% keeps >= 80% of FP32 accuracy (four-way choice).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from libortho.atomic import atomic_write_json
from libortho.config import SUPPORTED_BITS, DecomposeConfig, QuantConfig, SelectConfig, lists_to_tuples
from libortho.data import calibration_blocks
from libortho.data.reasoning import FAMILIES, reasoning_problems, shots_by_family
from libortho.eval.reasoning import score_probe
from libortho.experiments.store import cached_json

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class GeniusConfig:
    """Every knob of the genius experiment (defaults: the SmolLM2 run in docs/results/genius_smollm2)."""

    model: str = "smollm2-135m"
    n_items: int = 504
    n_shots: int = 3
    families: tuple[str, ...] = FAMILIES
    probe_seed: int = 0
    pure_bits: tuple[int, ...] = (4, 3, 2)
    ortho_bits: tuple[int, ...] = (3, 2)
    rhos: tuple[float, ...] = (0.01, 0.02, 0.05)
    group_size: int = 64
    selector: str = "diag"
    calib: tuple[str, ...] = ("shakespeare",)
    n_calib: int = 128
    seq_len: int = 512
    batch_size: int = 32

    def __post_init__(self) -> None:
        lists_to_tuples(self)
        for b in (*self.pure_bits, *self.ortho_bits):
            if b not in SUPPORTED_BITS:
                raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {b}")
        if any(not 0 < r < 1 for r in self.rhos):
            raise ValueError(f"rhos must lie in (0, 1), got {self.rhos}")
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ValueError(f"unknown problem families {bad or '(none)'}; available: {', '.join(FAMILIES)}")
        for name in ("n_items", "n_calib", "seq_len", "batch_size", "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_shots < 0:
            raise ValueError(f"n_shots must be >= 0, got {self.n_shots}")
        SelectConfig(selector=self.selector)  # refuses an unknown selector with its own message

    def decompose_config(self, bits: int) -> DecomposeConfig:
        """The decomposition of one width: the library's default quantizer at ``bits``, ortho after GPTQ."""
        return DecomposeConfig(quant=QuantConfig(bits=bits, group_size=self.group_size),
                               select=SelectConfig(selector=self.selector, rho=max(self.rhos)), ortho=False)

    def probe_key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("model", "n_items", "n_shots", "families", "probe_seed")}


def conditions(cfg: GeniusConfig) -> list[tuple[str, int | None, float | None]]:
    """(name, bits, rho) of every evaluated model: FP32, pure widths, widths with the ortho stream."""
    out: list[tuple[str, int | None, float | None]] = [("fp32", None, None)]
    out += [(f"int{b}", b, None) for b in cfg.pure_bits]
    out += [(f"int{b}+ortho{r:g}", b, r) for b in cfg.ortho_bits for r in cfg.rhos]
    return out


def _describe(value: dict[str, Any]) -> str:
    return (f"choice {sum(value['choice']) / len(value['choice']):.3f}  "
            f"exact {sum(value['exact']) / len(value['exact']):.3f}")


def _cached(path: Path, key: dict[str, Any], build: Callable[[], dict[str, Any]], log: Callable[[str], None]
            ) -> dict[str, Any]:
    return cached_json(path, key, build, log, _describe)


def _width_evals(cfg: GeniusConfig, bits: int, tok: Any, evaluate: Callable[[torch.nn.Module], dict[str, Any]],
                 out: Path, pkey: dict[str, Any], log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The conditions of one width: decomposed once (only when an evaluation is missing), rho re-selected."""
    from libortho.models import load_model
    from libortho.pipeline import attach_ortho, decompose, select_ortho
    from libortho.runtime import set_alpha
    from libortho.workflows import bits_summary

    dcfg = cfg.decompose_config(bits)
    dkey = {**pkey, "decompose": dcfg.to_dict(), "calib": [cfg.calib, cfg.n_calib, cfg.seq_len]}
    state: dict[str, Any] = {}

    def decomposed() -> tuple[torch.nn.Module, Any]:
        if "model" not in state:
            log(f"decompose INT{bits} ...")
            torch.manual_seed(0)
            m, _ = load_model(cfg.model)
            calib = calibration_blocks(list(cfg.calib), tok, n_blocks=cfg.n_calib, block_len=cfg.seq_len, seed=0)
            state["model"], state["res"] = m, decompose(m, calib, dcfg, keep_records=True, progress=False)
        return state["model"], state["res"]

    def build(rho: float | None) -> dict[str, Any]:
        m, res = decomposed()
        if rho is None:  # the base stream alone: what a GPTQ-only model computes
            set_alpha(m, 0.0)
            return {**evaluate(m), **bits_summary(res.base, None)}
        ortho = select_ortho(res.records, SelectConfig(selector=cfg.selector, rho=rho))
        attach_ortho(m, ortho, alpha=1.0)
        return {**evaluate(m), **bits_summary(res.base, ortho)}

    return {name: _cached(out / f"eval-{name}.json", {**dkey, "rho": rho}, lambda r=rho: build(r), log)
            for name, b, rho in conditions(cfg) if b == bits}


def run_genius(cfg: GeniusConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every condition and write ``out/result.json``."""
    from libortho.experiments.kill_switch import environment
    from libortho.models import load_model

    out = Path(out)

    def log(msg: str) -> None:
        if progress:
            print(f"[genius {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    problems = reasoning_problems(cfg.n_items, "heldout", seed=cfg.probe_seed, families=cfg.families)
    shots = (shots_by_family(cfg.n_shots, seed=cfg.probe_seed, families=cfg.families) if cfg.n_shots
             else {f: [] for f in cfg.families})
    model, tok = load_model(cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    pkey = cfg.probe_key()

    def evaluate(m: torch.nn.Module, control: bool = False) -> dict[str, Any]:
        return score_probe(m, tok, problems, shots, control=control, batch_size=cfg.batch_size)

    evals = {"fp32": _cached(out / "eval-fp32.json", pkey, lambda m=model: evaluate(m, control=True), log)}
    del model
    for bits in sorted(set(cfg.pure_bits) | set(cfg.ortho_bits), reverse=True):
        evals.update(_width_evals(cfg, bits, tok, evaluate, out, pkey, log))
    result = {"experiment": "genius", "config": asdict(cfg), "environment": environment(),
              "problems": [{"question": p.question, "answer": p.answer, "family": p.family} for p in problems],
              "evals": {name: evals[name] for name, _, _ in conditions(cfg)}}
    atomic_write_json(out / RESULT_FILE, result)
    return result
