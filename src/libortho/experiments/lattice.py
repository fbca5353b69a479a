"""``libortho experiment lattice``: GPTQ as Babai on a real model -- bounds, column orders, LLL (seed 004).

Stages, each cached as JSON under ``out/`` by configuration (a re-run resumes where it stopped):

1. ``fp32``: perplexity of the unquantized model on held-out blocks (per-block NLLs kept);
2. ``quant-b{bits}-{order}``: the base stream alone (no ortho stream), GPTQ with the given column
   order, sequential calibration; perplexity at alpha = 0, and per stage of linears sharing one
   Hessian: the measured lattice error ``sum_r e_r H e_r^T`` (``2 x`` GPTQ's loss), Babai's bound
   ``1/4 sum_k D_k sum_r s_rk^2`` and the entries whose code was clipped (where the bound stops
   holding). The first of these runs also saves W and H of the layers the lattice stages study;
3. ``babai``: on those real layers, explicit nearest plane (:func:`libortho.quant.babai.babai_quantize`)
   against GPTQ with one group per row, clipped (both) and unclipped (Babai alone, with its bound);
4. ``lll``: per layer and block dimension, the columns GPTQ's act-order takes first (the basis in that
   order reversed, so nearest plane on it is GPTQ's act-order on the block), per-channel
   grid: Gram-Schmidt profiles, bound and nearest-plane error before and after LLL (delta 0.99),
   unclipped and clipped (:func:`libortho.quant.lll.reduce_and_compare`);
5. ``quant-b{bits}-{order}-calib{seed}``: the ``replicate_orders`` runs again on other calibration draws, so
   the order ranking is seen under a second calibration set, not only under resampled evaluation blocks.

``result.json`` holds the configuration, the environment and every stage; the report
(:mod:`libortho.report.lattice`) is rendered from it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from libortho.atomic import atomic_write_json
from libortho.config import DecomposeConfig, QuantConfig, lists_to_tuples
from libortho.curvature.damping import damped
from libortho.data import calibration_blocks, load_corpus, token_blocks
from libortho.eval.perplexity import perplexity
from libortho.eval.stats import paired_bootstrap_ppl_diff
from libortho.experiments.store import cached_json
from libortho.quant.babai import babai_quantize
from libortho.quant.gptq import gptq_quantize
from libortho.quant.grid import fit_grid
from libortho.quant.lll import reduce_and_compare
from libortho.quant.order import ORDERS, column_order

RESULT_FILE = "result.json"
INPUTS_FILE = "lattice_inputs.pt"
INPUTS_KEY_FILE = "lattice_inputs.json"  # what the saved W and H were made under


@dataclass(frozen=True)
class LatticeConfig:
    """Every knob of the lattice experiment (defaults: the SmolLM2 run in docs/results/geoq_smollm2)."""

    model: str = "smollm2-135m"
    bits: tuple[int, ...] = (4, 3)
    group_size: int = 64
    grid: str = "minmax"
    orders: tuple[str, ...] = ORDERS
    calib: tuple[str, ...] = ("shakespeare",)
    n_calib: int = 128
    eval_corpus: str = "fortunes"
    n_eval: int = 32
    seq_len: int = 512
    damp: float = 0.01
    layers: tuple[str, ...] = ("model.layers.0.self_attn.q_proj", "model.layers.14.self_attn.o_proj",
                               "model.layers.14.mlp.gate_proj", "model.layers.29.mlp.down_proj")
    lll_dims: tuple[int, ...] = (64, 128, 256)
    lll_bits: int = 4
    lll_delta: float = 0.99
    # the order comparison again on other calibration draws (seeds of calibration_blocks; the main draw is 0):
    # a PPL interval over evaluation blocks says nothing of how much one calibration set decides the ranking
    replicate_calib_seeds: tuple[int, ...] = (1,)
    replicate_orders: tuple[str, ...] = ("act", "min_pivot")

    def __post_init__(self) -> None:
        lists_to_tuples(self)
        bad = [o for o in (*self.orders, *self.replicate_orders) if o not in ORDERS]
        if bad or not self.orders:
            raise ValueError(f"unknown column order(s) {bad or '(none)'}; available: {', '.join(ORDERS)}")
        if not self.bits:
            raise ValueError("bits: give at least one code width")
        if 0 in self.replicate_calib_seeds or len(set(self.replicate_calib_seeds)) < len(self.replicate_calib_seeds):
            raise ValueError(f"replicate_calib_seeds must be distinct and not 0 (the main draw), "
                             f"got {self.replicate_calib_seeds}")
        if self.replicate_calib_seeds and len(self.replicate_orders) < 2:
            raise ValueError(f"replicate_orders: give at least two orders to compare, got {self.replicate_orders}")
        for b in (*self.bits, self.lll_bits):
            QuantConfig(bits=b)  # refuses unsupported widths with its own message
        if any(d < 2 or d > 256 for d in self.lll_dims):
            raise ValueError(f"lll_dims must lie in [2, 256] (fpylll on a laptop), got {self.lll_dims}")
        if not 0.25 < self.lll_delta <= 1:
            raise ValueError(f"lll_delta must be in (0.25, 1], got {self.lll_delta}")
        for name in ("n_calib", "n_eval", "seq_len", "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def quant(self, bits: int, order: str) -> QuantConfig:
        """The base quantizer of one run."""
        return QuantConfig(bits=bits, group_size=self.group_size, grid=self.grid, method="gptq", damp=self.damp,
                           act_order=order == "act", min_pivot=order == "min_pivot")

    def data_key(self) -> dict[str, Any]:
        """What every stage's numbers depend on besides its own knobs."""
        return {k: getattr(self, k) for k in ("model", "calib", "n_calib", "eval_corpus", "n_eval", "seq_len")}


def _ppl_entry(model: torch.nn.Module, evals: torch.Tensor) -> dict[str, Any]:
    r = perplexity(model, evals, batch_size=4)
    return {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "block_nll": list(r.block_nll)}


def stage_rows(records: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per group of linears quantized together (they share one Hessian and one GPTQ run).

    The bound and the clipped count are the joint run's (stacked rows); each linear's ``loss`` is its own
    rows' share, so the group's error is their sum.
    """
    rows: dict[int, dict[str, Any]] = {}
    for name, rec in records.items():
        info = rec.quant_info
        row = rows.setdefault(id(rec.hessian), {"layers": [], "d_in": int(rec.weight.shape[1]), "rows": 0,
                                                "error": 0.0, "bound": float(info["babai_bound"]),
                                                "clipped": int(info["clipped"])})
        row["layers"].append(name)
        row["rows"] += int(rec.weight.shape[0])
        row["error"] += 2 * float(info["loss"])
    for row in rows.values():
        if row["rows"] != int(records[row["layers"][0]].quant_info.get("joint_rows", row["rows"])):
            raise ValueError(f"stage {row['layers']}: the joint run had other rows than its linears")
        row["clipped_fraction"] = row["clipped"] / (row["rows"] * row["d_in"])
    return list(rows.values())


def run_quantized(cfg: LatticeConfig, bits: int, order: str, load: Callable[[], tuple[Any, Any]],
                  calib: torch.Tensor, evals: torch.Tensor, inputs_path: Path | None) -> dict[str, Any]:
    """Decompose (base stream only) with one order and width; PPL at alpha = 0 and per-stage lattice figures."""
    from libortho.pipeline import decompose

    model, _ = load()
    res = decompose(model, calib, DecomposeConfig(quant=cfg.quant(bits, order), ortho=False), keep_records=True,
                    progress=False)
    if inputs_path is not None:
        torch.save({n: {"W": res.records[n].weight.clone(), "H": res.records[n].hessian.clone()}
                    for n in cfg.layers}, inputs_path)
    rows = stage_rows(res.records)
    return {"bits": bits, "order": order, "decompose_s": res.stats["wall_s"], "stages": rows,
            "alpha0": _ppl_entry(model, evals)}


def babai_check(W: torch.Tensor, H: torch.Tensor, cfg: LatticeConfig) -> dict[str, Any]:
    """Explicit nearest plane against GPTQ on one real layer, one group per row (static grid), act-order."""
    q = QuantConfig(bits=cfg.lll_bits, group_size=W.shape[1], grid=cfg.grid, damp=cfg.damp, act_order=True)
    t0 = time.perf_counter()
    g = gptq_quantize(W.double(), q, H)
    t_gptq = time.perf_counter() - t0
    boxed = babai_quantize(W, H, q, clip=True)
    t_babai = time.perf_counter() - t0 - t_gptq
    free = babai_quantize(W, H, q, clip=False)
    Qg = g.dequantize().double()
    return {"shape": list(W.shape), "relative_difference": float((Qg - boxed.Q).norm() / boxed.Q.norm()),
            "codes_differing": int((g.codes.double() != boxed.codes).sum()),
            "gptq_clipped": int(g.info["clipped"]), "babai_clipped": boxed.clipped,
            "gptq_error": 2 * float(g.info["loss"]), "babai_error": float(boxed.row_error.sum()),
            "bound": float(boxed.row_bound.sum()), "unclipped_error": float(free.row_error.sum()),
            "unclipped_outside_box": free.clipped,
            "unclipped_rows_within_bound": float((free.row_error <= free.row_bound * (1 + 1e-9)).double().mean()),
            "gptq_s": t_gptq, "babai_s": t_babai}


def lll_block(W: torch.Tensor, H: torch.Tensor, dim: int, cfg: LatticeConfig) -> dict[str, Any]:
    """LLL on the block of the ``dim`` columns act-order takes first (per-channel grid, damped H)."""
    q = QuantConfig(bits=cfg.lll_bits, group_size=W.shape[1], grid=cfg.grid, damp=cfg.damp, act_order=True)
    W = W.double()
    s, z = (t.double()[:, 0] for t in fit_grid(W, q))
    # the basis runs in act-order *reversed*: Babai fixes the last basis vector first, so its steps then go in
    # GPTQ's act-order and nearest plane on the unreduced basis is GPTQ on the block
    cols = column_order(H, "act", cfg.damp)[:dim].flip(0)
    Hd = damped(H.double(), cfg.damp)[cols][:, cols]
    y = W[:, cols] / s[:, None] + z[:, None]
    return {"columns": cols.tolist(), **reduce_and_compare(Hd, y, s, 2**cfg.lll_bits - 1, cfg.lll_delta).to_dict()}


def ppl_comparisons(runs: dict[str, dict[str, Any]], cfg: LatticeConfig,
                    orders: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Paired-bootstrap PPL differences between ``orders`` (default: the config's) at each width (same evaluation
    blocks)."""
    orders = cfg.orders if orders is None else orders
    out = []
    for bits in cfg.bits:
        for i, a in enumerate(orders):
            for b in orders[i + 1:]:
                ra, rb = runs[f"b{bits}-{a}"]["alpha0"], runs[f"b{bits}-{b}"]["alpha0"]
                iv = paired_bootstrap_ppl_diff(ra["block_nll"], rb["block_nll"])
                out.append({"bits": bits, "a": a, "b": b, "diff": iv.estimate, "low": iv.low, "high": iv.high,
                            "p": iv.p_value})
    return out


def run_lattice(cfg: LatticeConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every stage and write ``out/result.json``."""
    from libortho.experiments.kill_switch import environment
    from libortho.models import load_model

    out = Path(out)

    def log(msg: str) -> None:
        if progress:
            print(f"[lattice {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def load() -> tuple[Any, Any]:
        torch.manual_seed(0)
        return load_model(cfg.model)

    model, tok = load()
    modules = dict(model.named_modules())
    missing = [n for n in cfg.layers if not isinstance(modules.get(n), torch.nn.Linear)]
    if missing:
        raise ValueError(f"layers {missing} are not linear layers of {cfg.model}")
    out.mkdir(parents=True, exist_ok=True)
    calib = calibration_blocks(list(cfg.calib), tok, n_blocks=cfg.n_calib, block_len=cfg.seq_len, seed=0)
    evals = token_blocks(load_corpus(cfg.eval_corpus), tok, block_len=cfg.seq_len, n_blocks=cfg.n_eval, seed=1,
                         split="heldout")
    base_key = cfg.data_key()
    result: dict[str, Any] = {"experiment": "lattice", "config": asdict(cfg), "environment": environment()}
    result["fp32"] = cached_json(out / "fp32.json", base_key, lambda m=model: _ppl_entry(m, evals), log)
    del model
    runs: dict[str, dict[str, Any]] = {}
    inputs_path, inputs_key_path = out / INPUTS_FILE, out / INPUTS_KEY_FILE
    first = (cfg.bits[0], cfg.orders[0])
    inputs_key = json.loads(json.dumps({**base_key, "quant": asdict(cfg.quant(*first)), "layers": list(cfg.layers)},
                                       sort_keys=True, default=str))
    stale = not (inputs_path.is_file() and inputs_key_path.is_file()
                 and json.loads(inputs_key_path.read_text()) == inputs_key)
    for bits in cfg.bits:
        for order in cfg.orders:
            key = {**base_key, "quant": asdict(cfg.quant(bits, order)), "stage_rows": 2}
            save_inputs = (bits, order) == first and stale
            path = out / f"quant-b{bits}-{order}.json"
            if save_inputs and path.is_file():
                path.unlink()  # its decomposition is the one that saves the layers' W and H
            runs[f"b{bits}-{order}"] = cached_json(
                path, key, lambda b=bits, o=order, s=save_inputs: run_quantized(
                    cfg, b, o, load, calib, evals, inputs_path if s else None), log)
            if save_inputs:  # the key last: W and H without it are stale
                atomic_write_json(inputs_key_path, inputs_key)
    result["runs"] = runs
    result["ppl_comparisons"] = ppl_comparisons(runs, cfg)
    replicates: dict[str, Any] = {}
    for seed in cfg.replicate_calib_seeds:
        calib_s = calibration_blocks(list(cfg.calib), tok, n_blocks=cfg.n_calib, block_len=cfg.seq_len, seed=seed)
        runs_s = {f"b{b}-{o}": cached_json(
            out / f"quant-b{b}-{o}-calib{seed}.json",
            {**base_key, "calib_seed": seed, "quant": asdict(cfg.quant(b, o)), "stage_rows": 2},
            lambda b=b, o=o, c=calib_s: run_quantized(cfg, b, o, load, c, evals, None), log)
            for b in cfg.bits for o in cfg.replicate_orders}
        replicates[str(seed)] = {"runs": runs_s, "ppl_comparisons": ppl_comparisons(runs_s, cfg,
                                                                                     cfg.replicate_orders)}
    result["calib_replicates"] = replicates
    inputs = torch.load(inputs_path)
    lkey = {**base_key, "quant": asdict(cfg.quant(*first)), "bits": cfg.lll_bits, "grid": cfg.grid,
            "damp": cfg.damp}
    result["babai"] = {n: cached_json(out / f"babai-{n}.json", lkey, lambda n=n: babai_check(inputs[n]["W"],
                                                                                        inputs[n]["H"], cfg), log)
                       for n in cfg.layers}
    llkey = {**lkey, "delta": cfg.lll_delta, "basis": "act reversed"}
    result["lll"] = {n: {str(d): cached_json(out / f"lll-{n}-{d}.json", llkey,
                                         lambda n=n, d=d: lll_block(inputs[n]["W"], inputs[n]["H"], d, cfg), log)
                         for d in cfg.lll_dims} for n in cfg.layers}
    atomic_write_json(out / RESULT_FILE, result)
    return result
