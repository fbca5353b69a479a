"""Compute kernels of the dual-stream layer behind one interface: base matmul, ortho accumulate, alpha.

A backend (:class:`KernelBackend`) turns a base stream and a sparse memory stream into its own
kernel tensors once (:meth:`~KernelBackend.prepare`) and then computes
``y = x @ Q^T + alpha * x @ W_ortho^T`` with them (:meth:`~KernelBackend.matmul`); at ``alpha = 0``
the memory tensors are not read. :data:`BACKENDS` registers them by name:

* ``cpu`` (:mod:`.cpu`): torch's packed INT4 kernel for decode, a transient dequantization + bf16 GEMM
  for prefill with the memory folded into that weight, MKL CSR for the memory at decode;
* ``triton`` (:mod:`.triton`): one fused kernel that dequantizes INT4 tiles and accumulates the sparse
  ortho FMAs into the same accumulator, the sparse part compiled away at ``alpha = 0``; runs on CUDA
  devices, and on CPU tensors under ``TRITON_INTERPRET=1`` (correctness only).

``OrthoLinear`` uses the CPU kernels directly (its tensors are module buffers); the interface is what a
device backend implements and what the tests hold every backend to.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from libortho.registry import Registry
from libortho.streams.base import BaseStream
from libortho.streams.ortho import SparseOrtho


class KernelBackend(Protocol):
    """One way to compute a dual-stream linear layer."""

    name: str

    def available(self) -> bool:
        """Whether this backend can run here (its library and device are present)."""
        ...

    def prepare(self, base: BaseStream, ortho: SparseOrtho | None, device: str | torch.device) -> Any:
        """The backend's kernel tensors for one layer (built once, reused by every call)."""
        ...

    def matmul(self, x: torch.Tensor, prepared: Any, alpha: float) -> torch.Tensor:
        """``x @ Q^T + alpha * x @ W_ortho^T`` for ``x (..., d_in)``, in ``x.dtype``."""
        ...


BACKENDS: Registry[type] = Registry("kernel backend")


def backend(name: str) -> KernelBackend:
    """An instance of the registered backend ``name`` (KeyError naming the known ones otherwise)."""
    from libortho.runtime.kernels import cpu_backend, triton  # noqa: F401 - registration

    return BACKENDS[name]()


__all__ = ["BACKENDS", "KernelBackend", "backend"]
