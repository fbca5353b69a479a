"""Fine-tuning of a Hugging Face causal LM: AdamW, gradient accumulation, warm-up + decay,
clipping, bf16 autocast, a progress bar, resumable checkpoints, determinism by seed, and
data-parallel workers over ``torch.distributed``.

By default every trainable parameter learns the token-mean cross-entropy over every label that
is not ``-100`` in an optimizer step (all micro-batches and processes together), so gradient
accumulation and N workers give the same update as one big batch. A :class:`~libortho.train.rules.StepRule`
changes which loss reaches which parameters (the separation methods). The data order comes from
a generator seeded with ``TrainConfig.seed``; the same seed, data and model give the same weights.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from libortho.atomic import atomic_directory
from libortho.data.records import IGNORE, TokenRows
from libortho.train import distributed as dist
from libortho.train.rules import ParamGroup, StepCounts, StepRule

Schedule = Literal["constant", "linear", "cosine"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    steps: optimizer steps (None: ``epochs`` passes over the rows); batch_size: rows per
    micro-batch; grad_accum: micro-batches per step; warmup: fraction of steps with a linear
    ramp; schedule: decay after warm-up; max_grad_norm: clipping (0 disables).
    """

    lr: float = 1e-4
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: float = 0.05
    schedule: Schedule = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: bool = False

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r} (constant, linear, cosine)")

    def total_steps(self, n_rows: int) -> int:
        """Optimizer steps this config takes on ``n_rows`` rows."""
        if self.steps is not None:
            return self.steps
        per_step = self.batch_size * self.grad_accum
        return max(1, math.ceil(self.epochs * n_rows / per_step))


@dataclass
class TrainLog:
    """What a training run did: per-step losses, tokens, wall time (over every process that worked on
    it), and whether it resumed (``restored_s``: the part of ``wall_s`` spent before the resume)."""

    steps: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    restored_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fast_bf16(device: str = "cpu") -> bool:
    """Whether bf16 autocast speeds training up on ``device``.

    On a CPU only with native bf16 arithmetic (AVX-512 BF16 or AMX), which oneDNN's bf16 GEMM needs;
    without it torch runs bf16 matmuls through a reference GEMM (measured on a 2-core AVX2 EPYC:
    one SmolLM2 step of 8 x 128 tokens took over 7 minutes in bf16 against 11-15 s in fp32).
    """
    if device != "cpu":
        return device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def lr_factor(step: int, total: int, warmup: float, schedule: Schedule) -> float:
    """Learning-rate multiplier at (0-based) ``step``: linear warm-up, then constant/linear/cosine decay."""
    n_warm = int(warmup * total)
    if step < n_warm:
        return (step + 1) / n_warm
    if schedule == "constant" or total <= n_warm:
        return 1.0
    frac = (step - n_warm) / max(1, total - n_warm)
    return 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


def batch_order(n_rows: int, total_steps: int, rows_per_step: int, seed: int) -> torch.Tensor:
    """Row indices for every step ``(total_steps, rows_per_step)``: seeded reshuffle at each epoch."""
    if n_rows < 1:
        raise ValueError("no training rows")
    need = total_steps * rows_per_step
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randperm(n_rows, generator=gen) for _ in range(math.ceil(need / n_rows))]
    return torch.cat(parts)[:need].view(total_steps, rows_per_step)


def causal_lm_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labels != -100, and how many there were."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    target = labels[:, 1:]
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, int((target != IGNORE).sum())


def make_optimizer(model: nn.Module, cfg: TrainConfig, groups: list[ParamGroup] | None = None) -> torch.optim.Optimizer:
    """AdamW over the groups' parameters (default: every trainable one); no weight decay on biases,
    norms and embeddings (1-D or embedding). A group's learning rate is ``cfg.lr * lr_scale``."""
    groups = groups if groups is not None else [ParamGroup("all", [p for p in model.parameters() if p.requires_grad])]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = []
    for g in groups:
        decay = [p for p in g.params if not (p.dim() < 2 or id(p) in embeddings)]
        no_decay = [p for p in g.params if p.dim() < 2 or id(p) in embeddings]
        lr = cfg.lr * g.lr_scale
        out += [{"params": decay, "weight_decay": cfg.weight_decay, "lr": lr, "name": f"{g.name}"},
                {"params": no_decay, "weight_decay": 0.0, "lr": lr, "name": f"{g.name}/no_decay"}]
    return torch.optim.AdamW([g for g in out if g["params"]], lr=cfg.lr, betas=cfg.betas)


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    log: TrainLog, cfg: TrainConfig, rule: dict[str, Any] | None = None) -> Path:
    """Model weights, optimizer state, step and log, written to a temp dir and renamed (state.json last)."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(_untie(state), tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "log": log.to_dict(), "config": asdict(cfg),
                                                  "rule": rule or {"rule": "plain"}}, default=str))
    return path


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that share storage with an earlier one (safetensors refuses shared tensors)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig, rule: dict[str, Any] | None = None) -> tuple[int, TrainLog]:
    """Restore a checkpoint written by :func:`save_checkpoint`; refuses one made with another config."""
    path = Path(path)
    meta_path = path / "state.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {path} is not a finished training checkpoint")
    meta = json.loads(meta_path.read_text())
    if meta["config"] != json.loads(json.dumps(asdict(cfg))):
        raise ValueError(f"checkpoint {path} was written with a different TrainConfig: {meta['config']}")
    want_rule = json.loads(json.dumps(rule or {"rule": "plain"}, default=str))
    if meta.get("rule", {"rule": "plain"}) != want_rule:
        raise ValueError(f"checkpoint {path} was written by another step rule: {meta.get('rule')} (now {want_rule})")
    missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return int(meta["step"]), TrainLog(**meta["log"])


def _micro_batches(data: TokenRows, idx: torch.Tensor, batch_size: int, rule: StepRule, step: int
                   ) -> Iterator[TokenRows]:
    """Micro-batches of rows ``idx``, never mixing rows the rule keys differently (:meth:`StepRule.row_groups`).

    A row's key depends only on the row and the step, so every process makes the same decision
    about the same row, and the summed gradient does not depend on how rows are split.
    """
    keys = rule.row_groups(data.subset(idx), step)
    for key in torch.unique(keys).tolist():
        part = idx[keys == key]
        for i in range(0, part.numel(), batch_size):
            yield data.subset(part[i:i + batch_size])


def train(model: nn.Module, data: TokenRows, cfg: TrainConfig, progress: bool = True, desc: str = "train",
          checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
          on_step: Callable[[int, float], None] | None = None, rule: StepRule | None = None) -> TrainLog:
    """Fine-tune ``model`` on ``data`` (in place) with ``rule`` (default: every trainable parameter); returns the log.

    With ``checkpoint_dir`` a checkpoint is written every ``checkpoint_every`` steps and at the end,
    and a run finds and resumes from an existing one (same config and rule) instead of starting
    over. Under an initialised ``torch.distributed`` group each process takes its share of every
    step and only rank 0 writes checkpoints and shows progress.
    """
    rule = rule or StepRule()
    device = next(model.parameters()).device.type
    if cfg.bf16 and not fast_bf16(device):
        warnings.warn(f"bf16 autocast on a {device} without native bf16 (no AVX-512 BF16 / AMX): torch's fallback "
                      "GEMM makes training tens of times slower than fp32; set bf16=False", stacklevel=2)
    total = cfg.total_steps(len(data))
    order = batch_order(len(data), total, cfg.batch_size * cfg.grad_accum, cfg.seed)
    groups = rule.groups(model)
    opt = make_optimizer(model, cfg, groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.warmup, cfg.schedule))
    log, start = TrainLog(), 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and (ckpt / "state.json").is_file():
        start, log = load_checkpoint(ckpt, model, opt, cfg, rule.state())
        log.resumed_from, log.restored_s = start, log.wall_s
        for _ in range(start):
            sched.step()
    dist.check_same_weights(model)
    torch.manual_seed(cfg.seed)
    was_training = model.training
    model.train()
    t0 = time.perf_counter() - log.wall_s
    main = dist.is_main_process()
    bar = tqdm(range(start, total), desc=desc, disable=not (progress and main), unit="step", initial=start,
               total=total)
    try:
        for step in bar:
            loss, counts = _step(model, opt, data, order[step], cfg, rule, groups, step)
            sched.step()
            rule.after_step(model, step)
            log.steps, log.wall_s = step + 1, time.perf_counter() - t0
            log.losses.append(loss)
            log.tokens += counts.total
            bar.set_postfix(loss=f"{loss:.3f}")
            if on_step is not None:
                on_step(step, loss)
            if ckpt is not None and main and checkpoint_every and (step + 1) % checkpoint_every == 0 \
                    and step + 1 < total:
                save_checkpoint(ckpt, model, opt, step + 1, log, cfg, rule.state())
    finally:
        model.train(was_training)
    if ckpt is not None and main:
        save_checkpoint(ckpt, model, opt, total, log, cfg, rule.state())
    return log


def _step(model: nn.Module, opt: torch.optim.Optimizer, data: TokenRows, idx: torch.Tensor, cfg: TrainConfig,
          rule: StepRule, groups: list[ParamGroup], step: int) -> tuple[float, StepCounts]:
    """One optimizer step over the global rows ``idx`` (this process's share, in micro-batches).

    Returns the token-mean loss over the whole step and its global token counts.
    """
    counts = StepCounts.of(data.subset(idx))
    active = rule.active(step, counts)
    total = 0.0
    device = next(model.parameters()).device.type  # bf16 autocast on the device the model runs on
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.bf16):
        for rows in _micro_batches(data, dist.shard(idx), cfg.batch_size, rule, step):
            total += rule.micro(model, rows, counts)
    for group, on in zip(groups, active, strict=True):
        if not on:
            for p in group.params:
                p.grad = None
            continue
        dist.all_reduce_grads(group.params)
        if cfg.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(group.params, cfg.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return dist.all_reduce_sum(total) / max(1, counts.total), counts
