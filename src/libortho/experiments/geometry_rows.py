"""The switched-off models of the geometry table (:mod:`.geometry_table`): v1/v2 dual-stream rows, the
task-vector split at b = 0, and the K-FAC memory of the task vector. Each row is built from the table's
cached references (``t``: pre, ft, data, harness) and evaluated through ``t.row`` under its cache key."""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from libortho.experiments.store import _canonical

Batch = tuple[torch.Tensor, torch.Tensor]  # (input ids (B, T), labels (B, T)); label -100: no loss there


def private_rows(t: Any) -> torch.Tensor:
    return t.data.private_calibration


def private_batches(t: Any) -> list[Batch]:
    """The member records as the fine-tuning saw them: each packed row cut after its last record token (no
    padding), with the training labels (the separator that opens a record carries no loss)."""
    from libortho.data.records import IGNORE

    ids, labels = t.data.private_calibration, t.data.private_calibration_labels
    if labels is None:
        raise ValueError("the benchmark data carry no private labels (built by an older build_data)")
    out = []
    for r in range(ids.shape[0]):
        live = (labels[r] != IGNORE).nonzero()
        if live.numel():
            end = int(live.max()) + 1
            out.append((ids[r:r + 1, :end], labels[r:r + 1, :end]))
    return out


def public_batches(rows: torch.Tensor, batch: int = 4) -> list[Batch]:
    """Public blocks: every next token carries a loss."""
    return [(rows[i:i + batch], rows[i:i + batch]) for i in range(0, rows.shape[0], batch)]


def _kfac_factors(t: Any) -> dict[str, Any]:
    """K-FAC factors of the fine-tuned model's decoder linears on the private records (cached on disk)."""
    from libortho.curvature.kfac import fit_kfac, labelled_causal_lm_outputs, load_kfac, save_kfac
    from libortho.models.layers import find_linears

    rows = private_rows(t)
    key = {**t.base_key, "fisher": t.cfg.kfac_fisher, "rows": list(rows.shape), "records": "trimmed, labelled",
           "digest": hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16], "seed": t.cfg.bench.seed}
    path = t.out / "models" / "kfac_private.safetensors"
    if not t.fresh and path.is_file():
        factors, meta = load_kfac(path)
        if meta.get("key") == _canonical(key):
            t.result["stages"]["kfac_fit_s"] = meta.get("fit_s")  # as measured when they were fitted
            return factors
    layers = find_linears(t.ft)
    t0 = time.perf_counter()
    factors = fit_kfac(t.ft, [torch.stack([i, lab]) for i, lab in private_batches(t)], layers,
                       fisher=t.cfg.kfac_fisher, outputs=labelled_causal_lm_outputs, seed=t.cfg.bench.seed)
    t.result["stages"]["kfac_fit_s"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_kfac(factors, path, meta={"key": _canonical(key), "fit_s": t.result["stages"]["kfac_fit_s"]},
              with_eigen=True)
    return factors


def _tau(t: Any) -> dict[str, torch.Tensor]:
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


class Splits:
    """Task-vector splits of (pre, ft) by (rank, rest), made once and kept."""

    def __init__(self, t: Any) -> None:
        self.t = t
        self.made: dict[tuple[int, str], Any] = {}

    def get(self, k: int, rest: str = "ft") -> Any:
        from libortho.edit.task_vector import split_model

        if (k, rest) not in self.made:
            self.made[(k, rest)] = split_model(self.t.pre, self.t.ft, rank=k, rest=rest)
        return self.made[(k, rest)]


def split_row(t: Any, splits: Splits, k: int, rest: str, qkey: dict[str, Any] | None) -> None:
    """The split at b = 0 (``W_pre + tau_low``), at FP32 or (``qkey``) with its INT4 GPTQ base."""
    from libortho.assemble import quantized
    from libortho.edit.task_vector import apply_split

    def build() -> tuple[nn.Module, dict[str, Any]]:
        model = apply_split(t.pre, splits.get(k, rest), 1.0, 0.0)
        if qkey is not None:
            model = quantized(model, t.data.calibration, t.cfg.bench.quant)[0]
        return model, splits.get(k, rest).summary()

    name = f"tv_r{k}" + ("_int4" if qkey else "") + ("_restpre" if rest == "pre" else "")
    label = f"Task-vector split r={k}, b=0" + (", INT4" if qkey else "") + (", rest=pre" if rest == "pre" else "")
    t.row(name, label, "taskvec", {"m": "tv", "rank": k, "rest": rest, **(qkey or {})}, build, rank=k,
          base="int4" if qkey else "fp")


class KFACRows:
    """v2 K-FAC selector on the task vector: the memory is the private-curvature best rank-k part of tau."""

    def __init__(self, t: Any) -> None:
        self.t, self.tau = t, _tau(t)
        self.factors: dict[str, Any] = {}
        self.key = {"m": "kfac", "fisher": t.cfg.kfac_fisher, "damp": t.cfg.kfac_damp,
                    "rows": list(private_rows(t).shape), "records": "trimmed, labelled"}

    def streams(self, k: int) -> dict[str, Any]:
        if not self.factors:
            self.factors.update(_kfac_factors(self.t))
        return kfac_memory_of_update(self.tau, self.factors, k, self.t.cfg.kfac_damp)

    def rows(self, k: int, qkey: dict[str, Any]) -> None:
        from libortho.assemble import quantized

        t, d, q = self.t, self.t.data, self.t.cfg.bench.quant
        t.row(f"kfac_r{k}", f"K-FAC (private) memory r={k}, alpha=0", "kfac", {**self.key, "rank": k},
              lambda: (minus_memory(t.ft, self.streams(k)), {}), rank=k, base="fp")
        t.row(f"kfac_r{k}_int4", f"K-FAC (private) memory r={k}, alpha=0, INT4", "kfac",
              {**self.key, "rank": k, **qkey},
              lambda: quantized(minus_memory(t.ft, self.streams(k)), d.calibration, q), rank=k, base="int4")


def select_key(sel: Any) -> dict[str, Any]:
    """The fields of a sparse v1 selection that its rows depend on (stable as SelectConfig grows)."""
    return {k: getattr(sel, k) for k in ("selector", "rho", "scope", "tau", "values", "dtype", "joint",
                                         "curvature", "kfac_fisher", "kfac_damp")}


def v1_rows(t: Any, qkey: dict[str, Any]) -> None:
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
    t.row("v1_a0", "v1/v2 alpha=0 (GPTQ base; obs = diag = K-FAC)", "v1",
          {"m": "v1", "alpha": 0.0, "joint": b.select.joint, **qkey},
          lambda: _v1_off(made, v1), alpha=0.0)
    # v2: the same base, the memory chosen under K-FAC curvature (true Fisher on the public calibration) as a
    # rank-r stream within the obs stream's bits; its alpha 0 is the same GPTQ base as v1's (checked in a test)
    kcfg = replace(b.select, selector="kfac", curvature="kfac", kfac_fisher="true", kfac_damp=t.cfg.kfac_damp)
    t.row("v2_kfac_a1", "v2 (K-FAC selector) alpha=1", "v1", {"m": "v2", "select": select_key(kcfg),
                                                              "fisher": "true", "damp": t.cfg.kfac_damp, **qkey},
          lambda: _v2_on(t, kcfg, made.get("obs")), alpha=1.0, selector="kfac")


@torch.no_grad()
def _v2_on(t: Any, sel: Any, v1_model: nn.Module | None) -> tuple[nn.Module, dict[str, Any]]:
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
