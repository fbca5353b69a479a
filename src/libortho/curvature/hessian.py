"""GPTQ layer Hessian ``H = 2/n * sum x x^T`` over a layer's calibration inputs.

Accumulated as a running mean so the scale never depends on how the data were batched, and
mergeable across data-parallel workers (exactly, by counts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def accumulate_hessian(H: torch.Tensor, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch ``x`` (..., d_in) into the running ``H`` over ``n`` rows; returns (H, n')."""
    if x.shape[-1] != H.shape[0]:
        raise ValueError(f"input has {x.shape[-1]} features, Hessian is {tuple(H.shape)}")
    x = x.reshape(-1, x.shape[-1]).to(H.dtype)
    m = x.shape[0]
    if m == 0:
        return H, n
    total = n + m
    H = H * (n / total) + (x.T @ x) * (2.0 / total)
    return H, total


class HessianAccumulator:
    """Running ``2/n X^T X`` for one layer; ``add_batch`` per forward, ``H`` when done."""

    def __init__(self, d_in: int, dtype: torch.dtype = torch.float32) -> None:
        self._H = torch.zeros(d_in, d_in, dtype=dtype)
        self._n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Fold a batch of layer inputs (..., d_in) into the running Hessian."""
        self._H, self._n = accumulate_hessian(self._H, self._n, x.detach())

    @property
    def H(self) -> torch.Tensor:
        return self._H

    @property
    def n(self) -> int:
        return self._n

    def merge(self, other: HessianAccumulator) -> HessianAccumulator:
        """Combine with another worker's accumulator (weighted by row counts), in place."""
        total = self._n + other._n
        if total:
            self._H = self._H * (self._n / total) + other._H.to(self._H.dtype) * (other._n / total)
        self._n = total
        return self

    def all_reduce(self) -> HessianAccumulator:
        """Sum over ``torch.distributed`` workers (count-weighted); a no-op when not initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        weighted = self._H * self._n
        count = torch.tensor([float(self._n)], dtype=torch.float64)
        dist.all_reduce(weighted)
        dist.all_reduce(count)
        self._n = int(count.item())
        self._H = weighted / max(self._n, 1)
        return self
