"""Frozen dataclasses for every knob of the decomposition.

Every algorithm reads its settings from one of these, so a result JSON can record the exact
configuration with :func:`dataclasses.asdict` and a saved decomposition can be rebuilt from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

SUPPORTED_BITS = (2, 3, 4, 8)


def _check_registered(kind: str, name: str, module: str, registry: str) -> None:
    """Refuse a name missing from a registry, at construction: a typo must fail before any calibration.

    The registry module is imported here, lazily, so this file stays importable without torch and
    selectors/quantizers registered by user code before the config is built are accepted.
    """
    import importlib

    names = getattr(importlib.import_module(module), registry)
    if name not in names:
        raise ValueError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(names))}")

def _check_registered_any(kind: str, name: str, registries: tuple[tuple[str, str], ...]) -> None:
    """As :func:`_check_registered` over several registries (the name must be in one of them)."""
    import importlib

    names: set[str] = set()
    for module, registry in registries:
        names |= set(getattr(importlib.import_module(module), registry))
    if name not in names:
        raise ValueError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(names))}")


QuantMethod = Literal["rtn", "gptq"]
GridMethod = Literal["minmax", "mse", "hqq"]
SelectorName = str
Scope = Literal["layer", "global"]
OrthoValues = Literal["residual", "optimal"]
OrthoDtype = Literal["fp16", "bf16", "fp32"]


@dataclass(frozen=True)
class QuantConfig:
    """How the dense base stream is quantized.

    bits: code width b; group_size: columns (along ``in_features``) sharing one scale/zero, the
    last group may be partial; symmetric: zero point fixed at 2^(b-1); grid: how scale/zero are
    chosen per group (min-max, MSE-optimal clipping search, HQQ-style proximal zero refinement);
    method: round-to-nearest or GPTQ error feedback; damp: GPTQ damping as a fraction of mean
    diag(H) (raised automatically when Cholesky fails); block_size: GPTQ lazy-update block;
    act_order: quantize columns by decreasing diag(H) (groups stay static, in original order);
    min_pivot: quantize columns in the lattice view's greedy order instead, smallest nearest-plane
    pivot first (:mod:`libortho.quant.order`; groups static too). At most one of the two.

    Defaults: GPTQ on the HQQ grid with act-order, chosen on a validation corpus (python-docs) among
    min-max, MSE and HQQ grids with and without act-order and joint outlier selection, and judged on
    another (fortunes): ``bench/quality_search.py``, docs/results/performance_smollm2.md.
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    grid: GridMethod = "hqq"
    method: QuantMethod = "gptq"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    min_pivot: bool = False

    @property
    def order(self) -> str:
        """The column order GPTQ uses: ``natural``, ``act`` or ``min_pivot``."""
        return "min_pivot" if self.min_pivot else "act" if self.act_order else "natural"

    @property
    def static_groups(self) -> bool:
        """Whether group grids are fit once on the original columns (any order but the natural one)."""
        return self.order != "natural"

    def __post_init__(self) -> None:
        if self.act_order and self.min_pivot:
            raise ValueError("act_order and min_pivot are two column orders: min_pivot=True needs act_order=False")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.grid not in ("minmax", "mse", "hqq"):
            raise ValueError(f"unknown grid method {self.grid!r} (minmax, mse, hqq)")
        if self.symmetric and self.grid == "hqq":
            raise ValueError("the hqq grid optimises a free zero point: symmetric=True needs grid 'minmax' or 'mse'")
        _check_registered("quantization method", self.method, "libortho.quant", "QUANTIZERS")
        if not 0 < self.damp < 1:  # also refuses NaN
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


# The base grid of the experiments' committed results (privacy harness, separation, fine-tuning): GPTQ or
# RTN on the min-max grid without act-order. The library default moved to the HQQ grid with act-order
# (issue 9); the experiments keep this one so their cache keys and numbers do not change.
EXPERIMENT_GRID: dict[str, Any] = {"grid": "minmax", "act_order": False}


@dataclass(frozen=True)
class SelectConfig:
    """Which residual entries go to the sparse ortho stream.

    selector: a name in :data:`libortho.select.SELECTORS` (magnitude, obs, diag);
    rho: fraction of entries kept (per layer or global by score); tau: keep every entry whose
    score exceeds tau instead (overrides rho); values: ``residual`` stores R on the support
    (seed 002, literal), ``optimal`` re-solves the support values against H with the base fixed.
    joint: choose the support inside GPTQ's error-feedback loop (SpQR) instead of after it:
    the kept entries are exact while later columns compensate the rest; the selector's score
    then only trims or fills the joint support to exactly rho (``residual`` values on joint
    entries are their in-loop residuals). Needs the GPTQ quantizer, layer scope and rho.
    """

    # diag beat obs in 6 of 9 paired comparisons (Holm, 95%) and lost none: docs/results/dual_stream_smollm2
    selector: SelectorName = "diag"
    rho: float = 0.01
    scope: Scope = "layer"
    tau: float | None = None
    values: OrthoValues = "residual"
    dtype: OrthoDtype = "fp16"
    joint: bool = False
    curvature: str = "hessian"
    kfac_fisher: str = "true"
    kfac_damp: float = 0.1

    def __post_init__(self) -> None:
        if self.joint and (self.scope != "layer" or self.tau is not None):
            raise ValueError("joint selection picks rho per layer inside GPTQ: it needs scope 'layer' and no tau")
        if self.joint and not self.rho < 1:
            raise ValueError(f"joint selection needs rho < 1 (a fraction GPTQ keeps exact), got {self.rho}")
        if self.curvature not in ("hessian", "kfac"):
            raise ValueError(f"curvature must be 'hessian' or 'kfac', got {self.curvature!r}")
        if self.kfac_fisher not in ("true", "empirical"):
            raise ValueError(f"kfac_fisher must be 'true' or 'empirical', got {self.kfac_fisher!r}")
        if not 0 < self.kfac_damp < math.inf:  # also refuses NaN
            raise ValueError(f"kfac_damp must be a finite number > 0, got {self.kfac_damp}")
        import importlib

        factored = self.selector in importlib.import_module("libortho.select.kfac").KFAC_MEMORY
        if factored:
            if self.curvature != "kfac":
                raise ValueError(f"selector {self.selector!r} builds a K-FAC low-rank stream: it needs "
                                 "curvature='kfac'")
            if self.scope != "layer" or self.tau is not None or self.joint:
                raise ValueError(f"selector {self.selector!r} sizes each layer's stream by the bits of rho there: "
                                 "it needs scope 'layer', no tau and no joint selection")
        else:
            _check_registered_any("selector", self.selector, (("libortho.select", "SELECTORS"),
                                                              ("libortho.select.kfac", "KFAC_MEMORY")))
        if self.curvature == "kfac" and self.values == "optimal":
            raise ValueError("values='optimal' re-solves against the layer Hessian; with curvature='kfac' use "
                             "values='residual'")
        if not 0 <= self.rho <= 1:  # also refuses NaN
            raise ValueError(f"rho must be in [0, 1], got {self.rho}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if self.values not in ("residual", "optimal"):
            raise ValueError(f"values must be 'residual' or 'optimal', got {self.values!r}")
        if self.dtype not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"ortho dtype must be fp16, bf16 or fp32, got {self.dtype!r}")
        if self.tau is not None and not 0 <= self.tau < math.inf:
            raise ValueError(f"tau must be a finite number >= 0, got {self.tau}")


@dataclass(frozen=True)
class DecomposeConfig:
    """The whole offline decomposition: quantizer, selector and which layers to touch.

    skip: substrings of module names left in full precision (``lm_head`` by default: it is
    tied to the embeddings in many small models). ortho: False builds a base-only model
    (the reference for the null test). calib_dtype: precision of the calibration forwards and
    Hessian products: ``bf16`` (autocast forwards, bf16 products summed in fp32 per 512 rows:
    about 2x faster, Hessian error ~3e-4 relative, ten times below its sampling noise at 64k
    tokens) or ``fp32`` (exact reference).
    """

    quant: QuantConfig = field(default_factory=QuantConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    skip: tuple[str, ...] = ("lm_head",)
    ortho: bool = True
    batch_size: int = 8
    calib_dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.calib_dtype not in ("bf16", "fp32"):
            raise ValueError(f"calib_dtype must be 'bf16' or 'fp32', got {self.calib_dtype!r}")
        if self.select.joint and self.quant.method != "gptq":
            raise ValueError(f"joint selection runs inside GPTQ; quant method is {self.quant.method!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecomposeConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        d = dict(d)
        quant = QuantConfig(**d.pop("quant", {}))
        select = SelectConfig(**d.pop("select", {}))
        if "skip" in d:
            d["skip"] = tuple(d["skip"])
        return cls(quant=quant, select=select, **d)


def fields_from_dict(cls: type, d: dict[str, Any], what: str,
                     nested: dict[str, type] | None = None) -> dict[str, Any]:
    """Keyword arguments for dataclass ``cls`` from a JSON object: unknown keys refused (naming ``what``),
    lists turned back into tuples, and the ``nested`` fields (name -> dataclass) built from their objects."""
    from dataclasses import fields

    extra = set(d) - {f.name for f in fields(cls)}
    if extra:
        raise ValueError(f"unknown {what} keys {sorted(extra)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    for key, typ in (nested or {}).items():
        if isinstance(kw.get(key), dict):
            kw[key] = typ(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw[key].items()})
    return kw


def lists_to_tuples(obj: Any) -> None:
    """In a frozen dataclass's ``__post_init__``: turn list fields (as JSON config files give them) into tuples,
    so configurations stay hashable and compare equal however they were written."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, list):
            object.__setattr__(obj, f.name, tuple(v))
