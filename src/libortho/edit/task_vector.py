"""Task-vector split: a fine-tuning update as a low-rank "general" part and a residual "memory" part.

For each linear layer, ``τ = W_ft - W_pre``; its SVD ``τ = Σ s_i u_i v_i^T`` is cut at rank ``k``
(fixed, or the fewest directions holding ``energy`` of ``||τ||_F^2``): ``τ_low`` keeps the top ``k``
directions, ``τ_high = τ - τ_low`` the rest. The model becomes ``W = W_pre + a τ_low + b τ_high`` with
one switch per stream (seeds 000/001: a memorised record is expected to live in the long tail, so
``b = 0`` should forget it while ``a = 1`` keeps the skill).

Only linear layers are split. Everything else the fine-tuning moved (embeddings, which small models
tie to ``lm_head``, and norms) must be handled explicitly: ``rest="pre"`` keeps the pre-trained values
(the fine-tuning's change there is dropped and its size reported), ``rest="ft"`` keeps the fine-tuned
ones (then the dense base of both adapters is the pre-trained model *with* those tensors, written
beside the adapters by :func:`export_lora`). Leaving it unset when something else did move is refused.

Both parts export as PEFT LoRA adapters (per-module ranks, ``lora_alpha = r`` so the scale is 1):
``τ_low = B A`` with ``B = U_k S_k``, ``A = V_k^T``; ``τ_high`` likewise from the remaining directions.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from libortho.models.layers import find_linears

REST_CHOICES = ("pre", "ft")


@dataclass
class SplitLayer:
    """One linear layer's split: factors of ``τ_low`` and ``τ_high`` (each ``B (d_out, r)``, ``A (r, d_in)``)."""

    low_B: torch.Tensor
    low_A: torch.Tensor
    high_B: torch.Tensor
    high_A: torch.Tensor
    energy_low: float  # fraction of ||τ||_F^2 in τ_low

    @property
    def rank(self) -> int:
        return self.low_A.shape[0]

    def low(self) -> torch.Tensor:
        return self.low_B @ self.low_A

    def high(self) -> torch.Tensor:
        return self.high_B @ self.high_A


@dataclass
class TaskVectorSplit:
    """Every linear layer's split, what happened to the other parameters, and the rule that cut the ranks."""

    layers: dict[str, SplitLayer]
    rest: str
    rest_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # fine-tuned values kept when rest="ft"
    rest_change: dict[str, float] = field(default_factory=dict)  # relative change of each other parameter
    rule: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        ranks = [s.rank for s in self.layers.values()]
        return {"layers": len(ranks), "rank_min": min(ranks), "rank_max": max(ranks),
                "rank_mean": sum(ranks) / len(ranks),
                "energy_low_mean": sum(s.energy_low for s in self.layers.values()) / len(ranks),
                "rest": self.rest, "rest_changed": sorted(k for k, v in self.rest_change.items() if v > 0),
                **self.rule}


def split_matrix(tau: torch.Tensor, rank: int | None = None, energy: float | None = None) -> SplitLayer:
    """Cut one task-vector matrix at ``rank`` or at the energy fraction ``energy`` (exactly one of them)."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if rank is not None and rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    U, S, Vh = torch.linalg.svd(tau.double(), full_matrices=False)
    total = float((S**2).sum())
    if energy is not None and total == 0:
        k = 0  # an untouched matrix: no direction holds any energy, so none is kept
    elif energy is not None:
        cum = torch.cumsum(S**2, 0) / max(total, 1e-300)
        k = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12)) + 1
    else:
        k = rank
    k = min(k, S.numel())
    tiny = float(S.max()) * 1e-12 if total > 0 else 0.0
    nz = int(torch.gt(S, tiny).sum()) if total > 0 else 0  # the rest keeps only directions that exist
    hi = max(nz, k)
    return SplitLayer(low_B=(U[:, :k] * S[:k]).float(), low_A=Vh[:k].float(),
                      high_B=(U[:, k:hi] * S[k:hi]).float(), high_A=Vh[k:hi].float(),
                      energy_low=float((S[:k] ** 2).sum()) / total if total > 0 else 1.0)


def split_model(pre: nn.Module, ft: nn.Module, rank: int | None = None, energy: float | None = None,
                rest: str | None = None, skip: tuple[str, ...] = ("lm_head",)) -> TaskVectorSplit:
    """Split every decoder linear's task vector; other parameters follow ``rest`` (module docstring)."""
    if rest is not None and rest not in REST_CHOICES:
        raise ValueError(f"rest must be one of {REST_CHOICES}, got {rest!r}")
    lin_pre, lin_ft = find_linears(pre, skip), find_linears(ft, skip)
    if set(lin_pre) != set(lin_ft):
        raise ValueError("the two models have different linear layers")
    sd_pre, sd_ft = pre.state_dict(), ft.state_dict()
    if set(sd_pre) != set(sd_ft):
        raise ValueError("the two models have different parameters")
    linear_keys = {f"{n}.weight" for n in lin_pre}
    change = {}
    for k, v in sd_pre.items():
        if k in linear_keys or not v.is_floating_point():
            continue
        if v.shape != sd_ft[k].shape:
            raise ValueError(f"{k}: shapes differ between the models")
        change[k] = float((sd_ft[k].double() - v.double()).norm() / max(float(v.double().norm()), 1e-30))
    moved = sorted(k for k, c in change.items() if c > 0)
    if moved and rest is None:
        raise ValueError(f"the fine-tuning also moved {len(moved)} non-linear tensors (e.g. {moved[0]}): "
                         "pass rest='pre' (keep pre-trained) or rest='ft' (keep fine-tuned)")
    layers = {}
    for n, lin in lin_pre.items():
        if lin_ft[n].bias is not None and not torch.equal(lin_ft[n].bias, lin.bias):
            raise ValueError(f"{n}: the bias moved; only weight task vectors are split")
        layers[n] = split_matrix(lin_ft[n].weight.detach() - lin.weight.detach(), rank=rank, energy=energy)
    rest_tensors = {k: sd_ft[k].detach().clone() for k in moved} if rest == "ft" else {}
    return TaskVectorSplit(layers, rest or "pre", rest_tensors, change,
                           {"rank": rank} if rank is not None else {"energy": energy})


@torch.no_grad()
def apply_split(pre: nn.Module, split: TaskVectorSplit, a: float = 1.0, b: float = 1.0) -> nn.Module:
    """A dense copy of ``pre`` with ``W = W_pre + a τ_low + b τ_high`` and the other tensors per ``split.rest``."""
    model = copy.deepcopy(pre)
    mods = dict(model.named_modules())
    for n, s in split.layers.items():
        w = mods[n].weight
        w.copy_((w.double() + a * s.low().double() + b * s.high().double()).to(w.dtype))
    if split.rest_tensors:
        sd = model.state_dict()
        for k, v in split.rest_tensors.items():
            sd[k].copy_(v)
    return model


def export_lora(split: TaskVectorSplit, part: str, out_dir: str | Path, base_model: str = "",
                pre: nn.Module | None = None) -> Path:
    """Write ``τ_low`` (``part="low"``) or ``τ_high`` (``"high"``) as a PEFT LoRA adapter directory.

    Layers whose part is empty (rank 0) are left out of the adapter. With ``split.rest == "ft"`` the
    adapters' base is the pre-trained model with the fine-tuned non-linear tensors: pass ``pre`` and
    that base is saved under ``out_dir/base`` (``save_pretrained``) for ``PeftModel.from_pretrained``.
    """
    if part not in ("low", "high"):
        raise ValueError(f"part must be 'low' or 'high', got {part!r}")
    from safetensors.torch import save_file

    from libortho.atomic import atomic_directory

    tensors, ranks = {}, {}
    for n, s in split.layers.items():
        B, A = (s.low_B, s.low_A) if part == "low" else (s.high_B, s.high_A)
        if A.shape[0] == 0:
            continue
        tensors[f"base_model.model.{n}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = B.contiguous()
        ranks[n] = int(A.shape[0])
    if not ranks:
        raise ValueError(f"the {part} part is empty in every layer: nothing to export")
    if split.rest == "ft" and split.rest_tensors and pre is None:
        raise ValueError("rest='ft' moved non-linear tensors: pass pre= so the adapters' base is saved too")
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": r0, "lora_alpha": r0, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted(ranks), "rank_pattern": {_exact(n): r for n, r in ranks.items() if r != r0},
              "alpha_pattern": {_exact(n): r for n, r in ranks.items() if r != r0}, "inference_mode": True,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False}
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
        (tmp / "libortho_split.json").write_text(json.dumps({"part": part, **split.summary()}, indent=1))
        if split.rest == "ft" and split.rest_tensors:
            apply_split(pre, _rest_only(split), 0.0, 0.0).save_pretrained(tmp / "base")
    return Path(out_dir)


def _exact(name: str) -> str:
    """A PEFT pattern matching exactly this module path (PEFT matches patterns as regexes on the key)."""
    import re

    return re.escape(name)


def _rest_only(split: TaskVectorSplit) -> TaskVectorSplit:
    return TaskVectorSplit({}, split.rest, split.rest_tensors, split.rest_change, split.rule)


def tau_norms(split: TaskVectorSplit) -> Mapping[str, float]:
    """||τ||_F per layer (from the two parts, which are orthogonal)."""
    return {n: float((s.low().double().norm() ** 2 + s.high().double().norm() ** 2) ** 0.5)
            for n, s in split.layers.items()}
