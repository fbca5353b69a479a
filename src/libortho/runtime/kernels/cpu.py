"""CPU kernels of the two streams: pure functions, no module state.

* base stream, 4-bit: torch's packed INT4 matmul (``_weight_int4pack_mm_for_cpu``), bf16 activations;
* base stream, anything else: the dequantized weight cached once in a compute dtype (bf16 default);
* ortho stream: MKL CSR sparse matmul in fp32 (int32 indices), fused into the base output in place;
* low-rank memory: two dense fp32 matmuls ``(x A^T) B^T``, fused into the base output in place;
* neuron memory: the gated MLP of the added neurons, ``down (act(gate x) * up x)``, in fp32.

Constraints of the INT4 kernel found by experiment on torch 2.13 (CPU):

* codes must be int32 ``(N, K)`` in ``[0, 15]`` for ``_convert_weight_to_int4pack_for_cpu``
  (uint8 is refused); the packed result is uint8 ``(N, K / 2)``; ``innerKTiles`` is ignored on CPU;
* ``N`` (= d_out) must be a multiple of 16; ``K`` (= d_in) a multiple of the group size;
* group size in {32, 64, 128, 256} (16 and 512 are refused);
* activations 2-D and contiguous; ``scales_and_zeros`` is ``(K / g, N, 2)`` with ``[..., 0]`` the scale
  and ``[..., 1]`` the offset, in the activation dtype; the kernel computes
  ``W = (code - 8) * scale + offset``;
* bf16 is the only fast activation dtype: fp32/fp16 activations take a reference path ~80x slower
  at 512 tokens, so we always compute in bf16 (scale and offset are therefore rounded to bf16);
* results are batch-invariant (row i does not depend on the other rows), so prefill and decode agree;
* the kernel dequantizes in fp32 from the bf16 scale and offset, accumulates in fp32 and rounds the
  output to bf16: on an identity input its output is exactly ``bf16((code - 8) * S + O)``.

What "bit-identical at alpha = 0" means. At alpha = 0 the ortho stream is never read, so the
logits of a decomposition are bit-identical to those of the *same* decomposition loaded without
its ortho stream (same base stream, same kernels). They are *not* bit-identical to the stored
fp16 weights dequantized in fp32: the INT4 kernel computes with bf16 activations, a bf16 output,
and a bf16 scale ``S`` and offset ``O``. The grids (:mod:`libortho.quant.grid`) store scales that
bf16 holds exactly and zero points in ``[0, 15]``, so ``S`` is the stored scale and the only weight
error is the bf16 rounding of ``O = (8 - zero) * scale``: below 1/32 of the group's grid step
(:data:`INT4PACK_MAX_STEP_ERROR`, a constant per group; measured by ``tests/test_kernel_fidelity.py``).
A layer whose stored scales/zeros would exceed that bound (a stream written by an older version,
or zero points outside ``[0, 15]``) is not served by the INT4 kernel: ``OrthoLinear`` runs it on the
dense fp32 path and says so (``kernel_note`` and a :class:`KernelFallbackWarning`). Layers the
INT4 kernel cannot take by format (other bit widths or group sizes) run on the fp32 dequantization
cast once to ``base_dtype`` (bf16 by default: a relative rounding of at most 2^-8 per weight).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from libortho.streams.base import BaseStream
from libortho.streams.memory import LowRankMemory, NeuronMemory
from libortho.streams.ortho import SparseOrtho

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)
INT4PACK_N_MULTIPLE = 16
INT4PACK_DTYPE = torch.bfloat16
INT4PACK_MAX_STEP_ERROR = 1 / 32  # largest per-group weight error (in grid steps) the INT4 kernel may add
ORTHO_DTYPE = torch.float32
MEMORY_DTYPE = torch.float32  # dense memory factors: fp16/bf16/fp32 storage is exact in fp32


class KernelFallbackWarning(UserWarning):
    """A layer the INT4 kernel could run is served by the dense path, to keep its weights within the bound."""


def _has_int4pack() -> bool:
    """Whether this torch build ships the CPU packed INT4 ops."""
    ops = torch.ops.aten
    return hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")


def int4pack_supported(bits: int, group_size: int, d_out: int, d_in: int) -> bool:
    """Whether the CPU packed INT4 kernel can serve a ``(d_out, d_in)`` layer of this format."""
    return (bits == 4 and group_size in INT4PACK_GROUP_SIZES and d_in % group_size == 0
            and d_out % INT4PACK_N_MULTIPLE == 0 and d_out > 0 and _has_int4pack())


def prepare_int4pack(stream: BaseStream) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel layout of a 4-bit stream: uint8 ``(d_out, d_in/2)`` and bf16 ``(n_groups, d_out, 2)``.

    Ours is ``(code - zero) * s``, the kernel's ``(code - 8) * S + O`` with ``S = bf16(s)``. The error
    ``(code - 8)(S - s) + O - (8 - zero) s`` is linear in the code, so ``O`` rounds the value that
    centres it over codes 0..15: ``(8 - zero) s + (S - s) / 2`` (computed in fp64). For the grids'
    bf16-exact scales ``S = s`` and ``O = bf16((8 - zero) s)``.
    """
    d_out, d_in = stream.shape
    if not int4pack_supported(stream.bits, stream.group_size, d_out, d_in):
        raise ValueError(f"the INT4 kernel cannot serve bits={stream.bits}, group={stream.group_size}, "
                         f"shape={stream.shape}")
    codes = stream.codes().to(torch.int32).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    s = stream.scales.double()
    S = s.to(INT4PACK_DTYPE).double()
    offset = (8.0 - stream.zeros.double()) * s + (S - s) / 2
    scales_and_zeros = torch.stack((S.t(), offset.t()), dim=-1).to(INT4PACK_DTYPE).contiguous()
    return packed, scales_and_zeros


def int4pack_choice(stream: BaseStream) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str]:
    """The INT4 kernel's tensors for ``stream`` if it serves it, else None; and a note saying why.

    The kernel serves a 4-bit stream whose format it takes (group size in 32..256 dividing d_in,
    d_out a multiple of 16) *and* whose weights it reproduces within :data:`INT4PACK_MAX_STEP_ERROR`.
    """
    if not int4pack_supported(stream.bits, stream.group_size, *stream.shape):
        return None, (f"format not served by the INT4 kernel (bits={stream.bits}, group={stream.group_size}, "
                      f"shape={stream.shape[0]}x{stream.shape[1]})")
    packed, sz = prepare_int4pack(stream)
    worst = float(int4pack_step_error(stream, sz).max())
    if worst <= INT4PACK_MAX_STEP_ERROR:
        return (packed, sz), f"INT4 kernel, weights within {worst:.4f} grid step of the stored ones"
    return None, (f"dense fp32: the INT4 kernel's bf16 scale/offset would be off by {worst:.4f} "
                  f"grid step (> 1/32)")


def int4pack_step_error(stream: BaseStream, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """Per group ``(d_out, n_groups)``: the largest ``|kernel weight - stored weight|`` over codes 0..15, in steps.

    The kernel weight is ``(code - 8) * S + O`` from ``scales_and_zeros`` (exact in fp64), the stored
    one ``(code - zero) * scale``; the error is linear in the code, so codes 0 and 15 bound it.
    A zero scale counts as an infinite error unless the group's weights are exactly reproduced.
    """
    s, z = stream.scales.double().t(), stream.zeros.double().t()
    S, O = scales_and_zeros[..., 0].double(), scales_and_zeros[..., 1].double()
    err = torch.stack([((c - 8) * S + O - (c - z) * s).abs() for c in (0.0, 15.0)]).amax(0)
    steps = torch.where(s > 0, err / s.clamp_min(torch.finfo(torch.float64).tiny),
                        torch.where(err > 0, float("inf"), 0.0))
    return steps.t()


def int4pack_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                    group_size: int, d_out: int) -> torch.Tensor:
    """``x @ Q^T`` for ``x (..., d_in)``: bf16 activations through the kernel, result in ``x.dtype``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(INT4PACK_DTYPE).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_and_zeros)
    return y.to(x.dtype).view(*lead, d_out)


INT4PACK_BLOCK_N = 64  # the CPU packing interleaves output rows in blocks of 64 (when d_out allows)
# token count from which dequantize + dense bf16 beats the INT4 kernel on every one of SmolLM2's shapes at
# 2 threads (bench/kernel_crossover.py -> docs/results/performance_smollm2/kernel_crossover.json)
DENSE_PREFILL_MIN_TOKENS = 512


def int4pack_dequantize(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                        d_out: int) -> torch.Tensor:
    """The INT4 kernel's own weights ``bf16((code - 8) * S + O)``, ``(d_out, d_in)``, from its packed layout.

    For ``d_out`` a multiple of 64 the CPU packing stores, per block of 64 output rows and per input
    column, 32 bytes: byte ``j`` holds row ``j`` in its low nibble and row ``j + 32`` in its high one
    (found by probing ``_convert_weight_to_int4pack_for_cpu``; ``tests/test_kernels_cpu.py`` checks it
    against the kernel on an identity input). Other shapes go through the kernel on the identity
    (exact, slower). The result equals what the kernel multiplies by, bit for bit.
    """
    return int4pack_weight_fp32(packed, scales_and_zeros, group_size, d_out).to(INT4PACK_DTYPE)


def int4pack_weight_fp32(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                         d_out: int) -> torch.Tensor:
    """``(code - 8) * S + O`` in fp32 (before the kernel's bf16 rounding); see :func:`int4pack_dequantize`."""
    d_in = packed.shape[1] * 2
    if d_out % INT4PACK_BLOCK_N:
        eye = torch.eye(d_in, dtype=INT4PACK_DTYPE)
        W = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, group_size, scales_and_zeros).t()
        return W.float().contiguous()
    codes = int4pack_codes(packed, d_out).float().contiguous().view(d_out, d_in // group_size, group_size)
    so = scales_and_zeros.float().permute(1, 0, 2).contiguous()  # (d_out, groups, [scale, offset])
    # in place on contiguous tensors: ~6x faster than a broadcast addcmul over strided scales
    return codes.sub_(8.0).mul_(so[..., :1]).add_(so[..., 1:]).view(d_out, d_in)


def int4pack_codes(packed: torch.Tensor, d_out: int) -> torch.Tensor:
    """The uint8 codes ``(d_out, d_in)`` the packed INT4 layout holds (``d_out`` a multiple of 64).

    Lets a layer keep one copy of its codes (the kernel's) and still give back its exact base stream.
    """
    if d_out % INT4PACK_BLOCK_N:
        raise ValueError(f"the packed layout is decoded for d_out a multiple of {INT4PACK_BLOCK_N}, got {d_out}")
    d_in = packed.shape[1] * 2
    b = packed.view(d_out // INT4PACK_BLOCK_N, d_in, INT4PACK_BLOCK_N // 2)
    return torch.cat((b & 15, b >> 4), dim=-1).transpose(1, 2).reshape(d_out, d_in)


def int4pack_dense_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                          group_size: int, d_out: int, fold: Callable[[torch.Tensor], None] | None = None,
                          ) -> torch.Tensor:
    """``x @ Q^T`` through a transient bf16 dequantization and a dense bf16 GEMM (prefill: many tokens).

    Same weights as :func:`int4pack_matmul` (bit for bit), another summation order; the dense copy
    lives only for this call, so resident memory stays the packed codes. ``fold`` may add the memory
    stream (times alpha) to the fp32 weight in place before it is rounded to bf16: the ortho work then
    costs one scatter instead of a second matmul.
    """
    if fold is None:
        W = int4pack_dequantize(packed, scales_and_zeros, group_size, d_out)
    else:
        W32 = int4pack_weight_fp32(packed, scales_and_zeros, group_size, d_out)
        fold(W32)
        W = W32.to(INT4PACK_DTYPE)
    return torch.nn.functional.linear(x.to(INT4PACK_DTYPE), W).to(x.dtype)


def fold_csr_(W: torch.Tensor, csr: torch.Tensor, alpha: float) -> None:
    """``W += alpha * W_ortho`` in place on a dense fp32 ``(d_out, d_in)`` weight (the prefill path's
    fused ortho): one ``index_add_`` over the flat positions the CSR holds (each at most once)."""
    d_out, d_in = csr.shape
    crow = csr.crow_indices()
    rows = torch.repeat_interleave(torch.arange(d_out), (crow[1:] - crow[:-1]).long())
    flat = rows * d_in + csr.col_indices().long()
    W.view(-1).index_add_(0, flat, csr.values().to(W.dtype), alpha=alpha)


def dense_base_weight(stream: BaseStream, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The fallback path's cached weight: Q dequantized in fp32, then cast once to ``dtype``."""
    return stream.dequantize(dtype).contiguous()


def dense_base_matmul(x: torch.Tensor, weight_dense: torch.Tensor) -> torch.Tensor:
    """``x @ Q^T`` with activations cast to the cached weight's dtype; result in ``x.dtype``."""
    return torch.nn.functional.linear(x.to(weight_dense.dtype), weight_dense).to(x.dtype)


def ortho_csr(ortho: SparseOrtho, dtype: torch.dtype = ORTHO_DTYPE) -> torch.Tensor:
    """CSR ``(d_out, d_in)`` with int32 indices (faster in MKL than int64) and ``dtype`` values."""
    with warnings.catch_warnings():  # torch's one-time "Sparse CSR tensor support is in beta state" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)
        return ortho.to_csr(dtype, index_dtype=torch.int32)


def sparse_ortho_matmul(x: torch.Tensor, csr: torch.Tensor) -> torch.Tensor:
    """``x @ W_ortho^T`` for a CSR ``(d_out, d_in)``; any leading dims, ``csr.dtype`` compute, ``x.dtype`` out."""
    lead, d_out = x.shape[:-1], csr.shape[0]
    x2 = x.reshape(-1, x.shape[-1]).to(csr.dtype)
    out = torch.empty(x2.shape[0], d_out, dtype=csr.dtype)
    torch.mm(csr, x2.t(), out=out.t())  # MKL writes the column-major result straight into row-major out
    return out.to(x.dtype).view(*lead, d_out)


def sparse_ortho_addmm_(y: torch.Tensor, x: torch.Tensor, csr: torch.Tensor, alpha: float) -> torch.Tensor:
    """``y + alpha * x @ W_ortho^T``, accumulated in place into ``y`` (a fresh base output) when it is fp32.

    Fastest variant measured (576<->1536, 1% density, 1-2048 tokens): ``y^T += alpha * csr @ x^T`` on
    the transposed views, which MKL handles column-major without any copy or separate add.
    """
    d_out, d_in = csr.shape
    acc = y.reshape(-1, d_out).to(csr.dtype)  # a view of y when y is already fp32 and contiguous
    acc.t().addmm_(csr, x.reshape(-1, d_in).to(csr.dtype).t(), alpha=alpha)
    return acc.to(y.dtype).view(y.shape)


def lowrank_factors(mem: LowRankMemory, dtype: torch.dtype = MEMORY_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel copies ``(A (r, d_in), B (d_out, r))`` of a low-rank memory, contiguous in ``dtype``."""
    return mem.A.to(dtype).contiguous(), mem.B.to(dtype).contiguous()


def lowrank_addmm_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """``y + alpha * (x @ A^T) @ B^T`` in the factors' dtype, accumulated in place into ``y`` when it is fp32.

    The rank-r bottleneck ``x @ A^T`` comes first, so the cost is ``r (d_in + d_out)`` per token and the
    dense update ``B @ A`` is never formed.
    """
    d_out, d_in = B.shape[0], A.shape[1]
    acc = y.reshape(-1, d_out).to(B.dtype)  # a view of y when y is already in B.dtype and contiguous
    low = x.reshape(-1, d_in).to(A.dtype) @ A.t()
    acc.addmm_(low, B.t(), alpha=alpha)
    return acc.to(y.dtype).view(y.shape)


def neuron_tensors(mem: NeuronMemory, dtype: torch.dtype = MEMORY_DTYPE) -> tuple[torch.Tensor, ...]:
    """Kernel copies ``(gate (k, d), up (k, d), down (d, k))`` of a neuron memory, contiguous in ``dtype``."""
    return tuple(t.to(dtype).contiguous() for t in (mem.gate, mem.up, mem.down))


def gated_neurons(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                  act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``down @ (act(gate @ x) * (up @ x))`` for ``x (..., d)``, computed and returned in the tensors' dtype."""
    h = x.to(gate.dtype)
    inner = act(torch.nn.functional.linear(h, gate)) * torch.nn.functional.linear(h, up)
    return torch.nn.functional.linear(inner, down)


def neurons_add(out: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 act: Callable[[torch.Tensor], torch.Tensor], alpha: float) -> torch.Tensor:
    """``out + alpha * gated_neurons(x)`` (a new tensor), added in the tensors' dtype, rounded once to ``out.dtype``."""
    return torch.add(out.to(gate.dtype), gated_neurons(x, gate, up, down, act), alpha=alpha).to(out.dtype)
