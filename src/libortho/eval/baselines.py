"""External weight-only quantization baselines (HQQ, optimum-quanto), applied to decoder-block linears.

Each entry of :data:`BASELINES` quantizes a model in place, touching only ``nn.Linear`` layers
inside the decoder blocks (never embeddings or ``lm_head``, which small models often tie), and
returns what it did. Imports are lazy: the packages are optional (the ``baselines`` extra).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from libortho.models.layers import find_linears
from libortho.runtime import replace_module

Baseline = Callable[..., dict[str, Any]]
BASELINES: dict[str, Baseline] = {}


def register_baseline(name: str) -> Callable[[Baseline], Baseline]:
    """Decorator adding a baseline to :data:`BASELINES`."""

    def wrap(fn: Baseline) -> Baseline:
        BASELINES[name] = fn
        return fn

    return wrap


def _require(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"baseline needs the package `{package}` (pip install {package})") from err


def _group_bits(d_out: int, d_in: int, bits: int, group_size: int, meta_bytes: int = 4) -> float:
    """Storage bits of codes plus one (scale, zero) pair of ``meta_bytes`` per group."""
    groups = d_out * -(-d_in // group_size)
    return d_out * d_in * bits + groups * meta_bytes * 8


@register_baseline("hqq")
def hqq_quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64,
                       skip: tuple[str, ...] = ("lm_head",)) -> dict[str, Any]:
    """HQQ (half-quadratic, calibration-free) on every block linear; fp32 compute on CPU."""
    hq = _require("hqq.core.quantize", "hqq")
    hq.HQQLinear.set_backend(hq.HQQBackend.PYTORCH)
    cfg = hq.BaseQuantizeConfig(nbits=bits, group_size=group_size)
    t0 = time.perf_counter()
    total_bits = params = 0
    for name, lin in find_linears(model, skip).items():
        q = hq.HQQLinear(lin, cfg, del_orig=True, compute_dtype=torch.float32, device="cpu")
        replace_module(model, name, q)
        total_bits += _group_bits(lin.out_features, lin.in_features, bits, group_size)
        params += lin.out_features * lin.in_features
    return {"name": "hqq", "bits": bits, "group_size": group_size, "time_s": time.perf_counter() - t0,
            "bits_per_param": total_bits / params,
            "bits_note": "codes + fp16 scale and zero per group (HQQ's own meta is stored at that precision)"}


@register_baseline("quanto")
def quanto_quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64,
                          skip: tuple[str, ...] = ("lm_head",)) -> dict[str, Any]:
    """optimum-quanto int4 weights (activations untouched) on every block linear.

    quanto picks its own group size (128, or the largest multiple of 32 below it dividing
    ``in_features``); we override it before freezing so all methods share ``group_size``, except
    where ``group_size`` does not divide ``in_features`` (quanto needs whole groups): those layers
    keep quanto's choice, reported in ``group_size_fallbacks``.
    """
    if bits != 4:
        raise ValueError("the quanto baseline is wired for 4-bit weights (qint4) only")
    oq = _require("optimum.quanto", "optimum-quanto")
    t0 = time.perf_counter()
    linears = find_linears(model, skip)
    total_bits = params = 0
    fallbacks: dict[str, int | None] = {}
    for name, lin in linears.items():
        qlin = oq.nn.QLinear.from_module(lin, weights=oq.qint4)
        if lin.in_features % group_size == 0:
            qlin.weight_group_size = group_size
        else:  # quanto needs whole groups: keep its own choice for this layer and say so
            fallbacks[name] = qlin.weight_group_size
        qlin.freeze()
        replace_module(model, name, qlin)
        total_bits += _group_bits(lin.out_features, lin.in_features, bits, qlin.weight_group_size or lin.in_features)
        params += lin.out_features * lin.in_features
    return {"name": "quanto", "bits": bits, "group_size": group_size, "time_s": time.perf_counter() - t0,
            "bits_per_param": total_bits / params, "bits_note": "codes + fp16 scale and shift per group",
            "group_size_fallbacks": sorted(set(fallbacks.values()), key=str), "layers_with_fallback": len(fallbacks)}
