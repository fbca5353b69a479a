"""CPU kernels of the two streams: torch's packed INT4 matmul (bf16 activations), a dense
dequantized fallback for other widths/group sizes, and a CSR sparse matmul for the ortho stream."""

from __future__ import annotations

import torch

from libortho.streams.base import BaseStream, expand_groups

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)


def int4pack_supported(bits: int, group_size: int, d_out: int, d_in: int) -> bool:
    """Whether ``_weight_int4pack_mm_for_cpu`` can serve this layer (4-bit, whole groups, N % 16 == 0)."""
    return (bits == 4 and group_size in INT4PACK_GROUP_SIZES and d_in % group_size == 0
            and d_in % 2 == 0 and d_out % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def prepare_int4pack(stream: BaseStream) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel layout: packed uint8 ``(d_out, d_in/2)`` and bf16 ``(n_groups, d_out, 2)`` scale/offset.

    The kernel computes ``(code - 8) * scale + offset``; ours is ``(code - zero) * scale``, so
    ``offset = (8 - zero) * scale``.
    """
    codes = stream.codes().to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale = stream.scales.float()
    offset = (8.0 - stream.zeros.float()) * scale
    sz = torch.stack([scale.t(), offset.t()], dim=-1).contiguous().to(torch.bfloat16)
    return packed, sz


def int4pack_matmul(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor,
                    group_size: int, d_out: int) -> torch.Tensor:
    """``x @ Q^T`` via the packed INT4 kernel; computes in bf16, returns ``x.dtype``."""
    lead = x.shape[:-1]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.reshape(-1, x.shape[-1]).to(torch.bfloat16), packed, group_size, scales_zeros)
    return y.reshape(*lead, d_out).to(x.dtype)


def dense_weight(stream: BaseStream, dtype: torch.dtype) -> torch.Tensor:
    """Dequantized weight for the fallback path (computed in fp32, cast to ``dtype``)."""
    d_in = stream.shape[1]
    s = expand_groups(stream.scales.float(), d_in, stream.group_size)
    z = expand_groups(stream.zeros.float(), d_in, stream.group_size)
    return ((stream.codes().float() - z) * s).to(dtype).contiguous()


def dense_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` with activations cast to the weight's dtype; returns ``x.dtype``."""
    return torch.nn.functional.linear(x.to(weight.dtype), weight).to(x.dtype)


def sparse_matmul(x: torch.Tensor, csr: torch.Tensor) -> torch.Tensor:
    """``x @ W_ortho^T`` for a CSR ``(d_out, d_in)`` matrix, any leading batch dims, fp32 compute."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(csr.dtype)
    y = torch.sparse.mm(csr, x2.t()).t()
    return y.reshape(*lead, csr.shape[0]).to(x.dtype)
