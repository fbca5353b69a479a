"""Triton backend: one fused kernel for ``y = x @ Q^T + alpha * x @ W_ortho^T`` (seed 002 §4).

Each program owns a ``BLOCK_M x BLOCK_N`` tile of the output. It walks ``K`` in ``BLOCK_K`` steps,
unpacks the INT4 codes of the tile (two per byte, low nibble first: the base stream's own packing),
dequantizes them with the group's fp16 scale and zero point, and accumulates ``x_tile @ w_tile^T`` in
fp32. Then, when the layer has a memory stream and ``alpha != 0``, the same accumulator takes the
sparse FMAs of the tile's rows (CSR: row pointers, int32 columns, fp32 values), one stored entry per
row per step, the longest row of the tile setting the trip count. ``HAS_ORTHO`` is a compile-time
constant: at ``alpha = 0`` a kernel without any sparse code is compiled and launched, so the switch
costs nothing and cannot read the memory stream.

On CUDA this is the GPU path; on CPU tensors it runs under ``TRITON_INTERPRET=1`` (slow, for tests).
The environment variable must be set before ``triton`` is imported.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from libortho.runtime.kernels import BACKENDS
from libortho.streams.base import BaseStream
from libortho.streams.ortho import SparseOrtho


def triton_available() -> bool:
    """Triton importable, and either a CUDA device or the interpreter (``TRITON_INTERPRET=1``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


_KERNEL = None


def _kernel():  # noqa: ANN202 - a triton.jit function
    """Compile-on-first-use, so importing this module never needs triton."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def fused_int4_sparse(x_ptr, packed_ptr, scales_ptr, zeros_ptr, crow_ptr, col_ptr, val_ptr, y_ptr,
                          M, N, K, G, alpha,
                          stride_xm, stride_pn, stride_sn, stride_ym,
                          HAS_ORTHO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            byte = tl.load(packed_ptr + offs_n[:, None] * stride_pn + (offs_k // 2)[None, :],
                           mask=n_ok[:, None] & k_ok[None, :], other=0).to(tl.int32)
            code = (byte >> ((offs_k % 2) * 4)[None, :]) & 15
            grp = offs_k // G
            s = tl.load(scales_ptr + offs_n[:, None] * stride_sn + grp[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + offs_n[:, None] * stride_sn + grp[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            w = (code.to(tl.float32) - z) * s  # (BLOCK_N, BLOCK_K)
            acc += tl.dot(x, tl.trans(w))
        if HAS_ORTHO:
            start = tl.load(crow_ptr + offs_n, mask=n_ok, other=0)
            end = tl.load(crow_ptr + offs_n + 1, mask=n_ok, other=0)
            longest = tl.max(end - start, axis=0)
            for j in range(0, longest):
                idx = start + j
                live = n_ok & (idx < end)
                col = tl.load(col_ptr + idx, mask=live, other=0)
                val = tl.load(val_ptr + idx, mask=live, other=0.0)
                xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :],
                             mask=m_ok[:, None] & live[None, :], other=0.0).to(tl.float32)
                acc += alpha * xv * val[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])

    _KERNEL = fused_int4_sparse
    return _KERNEL


@dataclass
class TritonLayer:
    """Kernel tensors of one layer: packed 4-bit codes, fp16 scales/zeros, CSR memory (or None)."""

    shape: tuple[int, int]
    group_size: int
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    crow: torch.Tensor | None
    cols: torch.Tensor | None
    vals: torch.Tensor | None


@BACKENDS.register("triton")
class TritonBackend:
    """Fused INT4 dequantize + sparse-ortho accumulate in one Triton kernel."""

    name = "triton"
    block_m, block_n, block_k = 16, 32, 32

    def available(self) -> bool:
        return triton_available()

    def prepare(self, base: BaseStream, ortho: SparseOrtho | None, device: str | torch.device) -> TritonLayer:
        if base.bits != 4:
            raise ValueError(f"the triton backend serves 4-bit base streams, got {base.bits} bits")
        if base.shape[1] % 2:
            raise ValueError("the triton backend needs an even in_features (two codes per byte)")
        crow = cols = vals = None
        if ortho is not None:
            csr = ortho.to_csr(torch.float32, index_dtype=torch.int32)
            crow, cols, vals = (t.to(device).contiguous() for t in
                                (csr.crow_indices(), csr.col_indices(), csr.values()))
        return TritonLayer(base.shape, base.group_size, base.packed.to(device).contiguous(),
                           base.scales.to(device).contiguous(), base.zeros.to(device).contiguous(), crow, cols, vals)

    def matmul(self, x: torch.Tensor, prepared: TritonLayer, alpha: float) -> torch.Tensor:
        if not self.available():
            raise RuntimeError("triton backend unavailable: needs triton and a CUDA device, or TRITON_INTERPRET=1")
        import triton

        p = prepared
        d_out, d_in = p.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, d_in).contiguous()
        M = x2.shape[0]
        y = torch.empty(M, d_out, dtype=torch.float32, device=x.device)
        has_ortho = alpha != 0.0 and p.crow is not None
        dummy = p.packed  # never read when HAS_ORTHO is False
        grid = (triton.cdiv(M, self.block_m), triton.cdiv(d_out, self.block_n))
        _kernel()[grid](x2, p.packed, p.scales, p.zeros,
                        p.crow if has_ortho else dummy, p.cols if has_ortho else dummy,
                        p.vals if has_ortho else dummy, y,
                        M, d_out, d_in, p.group_size, float(alpha),
                        x2.stride(0), p.packed.stride(0), p.scales.stride(0), y.stride(0),
                        HAS_ORTHO=has_ortho, BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k)
        return y.to(x.dtype).view(*lead, d_out)
