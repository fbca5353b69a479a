"""Training-time separation: fine-tuning that puts what private records teach into a memory stream.

Post-hoc selection of an ortho stream does not separate private memory (docs/results/
kill_switch_smollm2), so these methods *control* where it goes while fine-tuning (seeds 000 §3.2,
001 §4.2/§4.4). Each is one file in :mod:`libortho.train.methods`, registered in
:data:`SEPARATION` with ``needs_labels`` (whether it reads the records' private-token labels):

- ``two-phase``: fine-tune on public data only (secrets masked out of the loss), then train only
  the memory on the private tokens: the control a reviewer asks for first;
- ``mask``: selective gradient masking (Shilov et al. 2025): ``W = W_shared + M * delta``;
- ``route``: gradient routing (Cloud et al. 2024): activation-level stop-gradients send private
  tokens' gradients into added neurons;
- ``ogd``: orthogonal gradient descent: low-rank memory whose updates are projected off the
  public activations' subspace after every optimizer step;
- ``memsink``: MemSinks (Ghosal et al. 2025): per-sequence sink neurons chosen by a hash of the
  sequence id, no labels needed.

A method's :meth:`Separation.fit` trains a model in place and returns a :class:`SeparationResult`
whose ``model`` is the plain shared model (memory stripped) and ``streams`` the memory as storage
streams, keyed by linear or MLP name, ready for an INT4 base (:mod:`libortho.workflows`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from libortho.config import EXPERIMENT_GRID, QuantConfig, fields_from_dict
from libortho.data.records import TokenRows
from libortho.registry import Registry
from libortho.train.loop import TrainConfig, TrainLog, train
from libortho.train.memory import MemoryContext, export_memory
from libortho.train.rules import StepRule

MEMORY_DTYPES = ("fp16", "bf16", "fp32")
# options added after the first recorded runs, with the default that reproduces those runs
LATER_OPTIONS: dict[str, Any] = {"fake_quant_fraction": 0.0, "fake_quant_bits": 4, "fake_quant_group": 64,
                                 "ogd_gradient_energy": None}


@dataclass(frozen=True)
class SeparationConfig:
    """Every knob of the separation methods (each method reads its own; the rest are ignored).

    train: the fine-tuning schedule (the same as plain fine-tuning's, for a fair comparison);
    memory_lr_scale: memory learning rate = ``train.lr * memory_lr_scale``; neurons: added MLP
    neurons per block (two-phase, route; memsink's sink pool); rank: low-rank memory (ogd);
    support / support_neurons / support_fraction: mask's memory support (existing MLP neurons,
    or a random fraction of every block linear's entries); memory_off_fraction: mask's share of
    public-only steps run with the memory switched off; ogd_energy: GPM energy of the public
    subspace; probe_rows: public rows that define it (and, disjoint, the held-out subspace eta is
    reported on); eta_every: steps between eta records; sink_fraction: memsink's share of the
    sink pool each sequence uses; phase2: two-phase's memory-only schedule (default: ``train``'s
    learning rate and as many epochs over the private rows); phase2_loss: what two-phase's memory
    learns, ``records`` (every token of the rows holding private records, so the memory also learns
    to leave their public text alone) or ``secrets`` (the private tokens only); phase2_public:
    two-phase's memory phase also runs on the public rows (so the memory learns to stay quiet on
    public text); memory_dtype: stored precision; fake_quant_fraction: the last share of the steps
    (two-phase: of its memory phase) run on a round-to-nearest fake-quantized base, with
    fake_quant_bits / fake_quant_group its grid (0: never); ogd_gradient_energy: ogd also keeps the
    memory's updates off the public *output-gradient* subspace at this energy (None: inputs only).
    """

    method: str = "mask"
    train: TrainConfig = field(default_factory=TrainConfig)
    memory_lr_scale: float = 1.0
    neurons: int = 32
    rank: int = 8
    support: str = "neurons"
    support_neurons: int = 32
    support_fraction: float = 0.01
    memory_off_fraction: float = 0.1
    ogd_energy: float = 0.97
    probe_rows: int = 32
    eta_every: int = 10
    sink_fraction: float = 0.25
    phase2: TrainConfig | None = None
    phase2_loss: str = "records"
    phase2_public: bool = True
    memory_dtype: str = "fp16"
    seed: int = 0
    fake_quant_fraction: float = 0.0
    fake_quant_bits: int = 4
    fake_quant_group: int = 64
    ogd_gradient_energy: float | None = None

    def __post_init__(self) -> None:
        SEPARATION.check([self.method])
        if self.support not in ("neurons", "entries"):
            raise ValueError(f"support must be 'neurons' or 'entries', got {self.support!r}")
        for name in ("neurons", "rank", "support_neurons", "probe_rows", "eta_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("support_fraction", "sink_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.memory_off_fraction <= 1:
            raise ValueError(f"memory_off_fraction must be in [0, 1], got {self.memory_off_fraction}")
        if not 0 < self.ogd_energy <= 1:
            raise ValueError(f"ogd_energy must be in (0, 1], got {self.ogd_energy}")
        if not self.memory_lr_scale > 0:
            raise ValueError(f"memory_lr_scale must be > 0, got {self.memory_lr_scale}")
        if self.phase2_loss not in ("records", "secrets"):
            raise ValueError(f"phase2_loss must be 'records' or 'secrets', got {self.phase2_loss!r}")
        if self.memory_dtype not in MEMORY_DTYPES:
            raise ValueError(f"memory_dtype must be one of {MEMORY_DTYPES}, got {self.memory_dtype!r}")
        if not 0 <= self.fake_quant_fraction <= 1:
            raise ValueError(f"fake_quant_fraction must be in [0, 1], got {self.fake_quant_fraction}")
        if self.fake_quant_fraction:
            self.fake_quant_config()  # bits / group size checked now, not at the tail of training
        if self.ogd_gradient_energy is not None and not 0 < self.ogd_gradient_energy <= 1:
            raise ValueError(f"ogd_gradient_energy must be in (0, 1] or None, got {self.ogd_gradient_energy}")

    def fake_quant_config(self) -> QuantConfig:
        """The round-to-nearest grid of the fake-quantized base."""
        return QuantConfig(bits=self.fake_quant_bits, group_size=self.fake_quant_group, method="rtn",
                           **EXPERIMENT_GRID)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` for cache keys: options added after runs were recorded are left out while they
        hold their defaults (they change nothing then), so adding one never invalidates recorded runs."""
        d = self.to_dict()
        for name, default in LATER_OPTIONS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeparationConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        kw = fields_from_dict(cls, d, "separation config", {"train": TrainConfig, "phase2": TrainConfig})
        return cls(**kw)


@dataclass(eq=False)
class SeparationResult:
    """The shared model (plain, memory stripped), the memory streams and what training did."""

    model: nn.Module
    streams: dict[str, Any]
    method: str
    logs: dict[str, TrainLog]
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors)."""
        return {"method": self.method, "wall_s": self.wall_s,
                "train": {k: {"steps": v.steps, "tokens": v.tokens, "wall_s": v.wall_s,
                              "final_loss": v.losses[-1] if v.losses else None} for k, v in self.logs.items()},
                "memory_layers": len(self.streams), **self.extra}


class Separation(ABC):
    """Base of every method: attach a memory, train with a step rule, export.

    Subclasses implement :meth:`attach` (add the memory to ``model``; return the step rule) and may
    override :meth:`fit` (two-phase trains twice). ``self.ctx`` is the per-forward context shared
    with the memory modules.
    """

    name = "base"
    revision = 1  # bump when a change alters what the method trains: experiments key their caches on it

    def __init__(self, cfg: SeparationConfig) -> None:
        self.cfg = cfg
        self.ctx = MemoryContext()

    @abstractmethod
    def attach(self, model: nn.Module, data: TokenRows, probe: TokenRows | None) -> StepRule:
        """Add this method's memory to ``model`` and return the step rule that trains it."""

    def fit(self, model: nn.Module, data: TokenRows, probe: TokenRows | None = None, progress: bool = True,
            checkpoint_dir: str | Path | None = None) -> SeparationResult:
        """Train ``model`` in place on ``data`` (public and private rows); ``probe``: public rows for subspaces."""
        t0 = time.perf_counter()
        rule = self.with_fake_quant(self.attach(model, data, probe), model, self.cfg.train.total_steps(len(data)))
        log = train(model, data, self.cfg.train, progress=progress, desc=f"fine-tune ({self.name})", rule=rule,
                    checkpoint_dir=checkpoint_dir, checkpoint_every=_every(self.cfg.train, data))
        return self.finish(model, {"train": log}, t0, rule)

    def with_fake_quant(self, rule: StepRule, model: nn.Module, total_steps: int) -> StepRule:
        """``rule``, fake-quantizing the base over the last ``fake_quant_fraction`` of ``total_steps``."""
        from libortho.train.fake_quant import with_fake_quant

        return with_fake_quant(rule, model, self.cfg.fake_quant_fraction, self.cfg.fake_quant_config(), total_steps)

    def finish(self, model: nn.Module, logs: dict[str, TrainLog], t0: float, rule: StepRule) -> SeparationResult:
        """Strip the memory into streams and package the result. ``wall_s`` counts this process's time
        since ``t0`` plus the training time restored from checkpoints, so a resumed run costs what the
        uninterrupted one would have."""
        self.ctx.clear()
        model.eval()
        streams = export_memory(model, self.cfg.memory_dtype)
        restored = sum(log.restored_s for log in logs.values())
        return SeparationResult(model, streams, self.name, logs, time.perf_counter() - t0 + restored, rule.log())


def _every(cfg: TrainConfig, data: TokenRows) -> int:
    """Checkpoint interval: about ten checkpoints per run."""
    return max(1, cfg.total_steps(len(data)) // 10)


SEPARATION: Registry[type[Separation]] = Registry("separation method")


def separate(model: nn.Module, data: TokenRows, cfg: SeparationConfig, probe: TokenRows | None = None,
             progress: bool = True, checkpoint_dir: str | Path | None = None) -> SeparationResult:
    """Fine-tune ``model`` (in place) with the method ``cfg.method``; see :class:`Separation`."""
    entry = SEPARATION.entry(cfg.method)
    if entry.meta.get("needs_labels", True) and data.private is None:
        raise ValueError(f"method {cfg.method!r} needs private-token labels: give records with 'secret' spans "
                         "(or private: true)")
    return entry.impl(cfg).fit(model, data, probe, progress=progress, checkpoint_dir=checkpoint_dir)


def _register_builtin() -> None:
    """Import the method files so they register (they import this module)."""
    from libortho.train.methods import mask, memsink, ogd, route, two_phase  # noqa: F401


_register_builtin()
