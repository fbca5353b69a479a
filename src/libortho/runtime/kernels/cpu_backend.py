"""The CPU kernels (:mod:`.cpu`) behind the :class:`~libortho.runtime.kernels.KernelBackend` interface."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from libortho.runtime.kernels import BACKENDS, cpu, native
from libortho.streams.base import BaseStream
from libortho.streams.ortho import SparseOrtho


@dataclass
class CpuLayer:
    """Kernel tensors of one layer on CPU: INT4 packing (or a dense weight), the memory's CSR, and the
    compiled decode kernel's view of it (None where that kernel could not be built)."""

    base: BaseStream
    packed: torch.Tensor | None
    scales_zeros: torch.Tensor | None
    weight: torch.Tensor | None
    csr: torch.Tensor | None
    native: native.CsrKernel | None = None


@BACKENDS.register("cpu")
class CpuBackend:
    """INT4 kernel for decode, dequantize + bf16 GEMM (memory folded in) for prefill; at decode the memory
    is added by the compiled CSR kernel (:mod:`.native`) where it serves the call, else by MKL's CSR."""

    name = "cpu"
    dense_min_tokens = cpu.DENSE_PREFILL_MIN_TOKENS

    def available(self) -> bool:
        return True

    def prepare(self, base: BaseStream, ortho: SparseOrtho | None, device: str | torch.device = "cpu") -> CpuLayer:
        if torch.device(device).type != "cpu":
            raise ValueError(f"the cpu backend runs on CPU tensors, not {device}")
        tensors, _note = cpu.int4pack_choice(base)
        packed, sz = tensors if tensors is not None else (None, None)
        weight = None if tensors is not None else cpu.dense_base_weight(base, torch.float32)
        csr = None if ortho is None else cpu.ortho_csr(ortho)
        kernel = native.CsrKernel(csr) if csr is not None and native.library() is not None else None
        return CpuLayer(base, packed, sz, weight, csr, kernel)

    def matmul(self, x: torch.Tensor, prepared: CpuLayer, alpha: float) -> torch.Tensor:
        p, (d_out, d_in) = prepared, prepared.base.shape
        memory = alpha != 0.0 and p.csr is not None
        if p.packed is None:
            y = cpu.dense_base_matmul(x, p.weight)
        elif x.numel() >= self.dense_min_tokens * d_in:
            fold = (lambda W: cpu.fold_csr_(W, p.csr, alpha)) if memory else None
            return cpu.int4pack_dense_matmul(x, p.packed, p.scales_zeros, p.base.group_size, d_out, fold=fold)
        else:
            y = cpu.int4pack_matmul(x, p.packed, p.scales_zeros, p.base.group_size, d_out)
        if not memory:
            return y
        if p.native is not None and native.usable(x, y):
            return p.native.addmm_(y, x, alpha)
        return cpu.sparse_ortho_addmm_(y, x, p.csr, alpha)
