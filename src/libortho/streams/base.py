"""The dense base stream: packed b-bit codes plus per-group fp16 scales and zero points.

Dequantized value of entry (i, j): ``(code[i, j] - zero[i, g(j)]) * scale[i, g(j)]`` with
``g(j) = j // group_size``; the last group may be partial. Storage only: no ``nn.Module``.

The format accepts any fp16 scale and zero point. The grids that write it store bf16-exact scales
and zero points in ``[0, 2^b - 1]``, which is what lets the runtime's INT4 kernel reproduce these
weights within 1/32 of a grid step; other streams still load, on the dense path
(see :mod:`libortho.runtime.kernels.cpu`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from libortho.config import SUPPORTED_BITS
from libortho.streams.pack import pack_codes, packed_row_bytes, unpack_codes


def num_groups(d_in: int, group_size: int) -> int:
    """Number of column groups along ``in_features`` (the last may be partial)."""
    return (d_in + group_size - 1) // group_size


def expand_groups(t: torch.Tensor, d_in: int, group_size: int) -> torch.Tensor:
    """Repeat per-group columns ``(d_out, n_groups)`` to per-column ``(d_out, d_in)``."""
    return t.repeat_interleave(group_size, dim=1)[:, :d_in]


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                     ) -> torch.Tensor:
    """fp32 ``(code - zero[g(j)]) * scale[g(j)]`` for unpacked codes ``(d_out, d_in)``."""
    d_in = codes.shape[1]
    s = expand_groups(scales.float(), d_in, group_size)
    z = expand_groups(zeros.float(), d_in, group_size)
    return (codes.float() - z) * s


@dataclass(frozen=True, eq=False)
class BaseStream:
    """Packed integer codes + fp16 group parameters of one weight matrix ``(d_out, d_in)``."""

    packed: torch.Tensor  # uint8 (d_out, packed_row_bytes(d_in, bits))
    scales: torch.Tensor  # fp16 (d_out, n_groups)
    zeros: torch.Tensor  # fp16 (d_out, n_groups), in code units (may be fractional or out of range)
    bits: int
    group_size: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        d_out, d_in = self.shape
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bits {self.bits}")
        ng = num_groups(d_in, self.group_size)
        if tuple(self.packed.shape) != (d_out, packed_row_bytes(d_in, self.bits)):
            raise ValueError(f"packed codes have shape {tuple(self.packed.shape)}, expected "
                             f"{(d_out, packed_row_bytes(d_in, self.bits))}")
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if tuple(t.shape) != (d_out, ng):
                raise ValueError(f"{name} have shape {tuple(t.shape)}, expected {(d_out, ng)}")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bits: int, group_size: int) -> BaseStream:
        """Pack unpacked codes ``(d_out, d_in)``; scales/zeros are stored as fp16."""
        d_out, d_in = codes.shape
        return cls(
            packed=pack_codes(codes, bits),
            scales=scales.detach().to(torch.float16).contiguous().clone(),
            zeros=zeros.detach().to(torch.float16).contiguous().clone(),
            bits=bits,
            group_size=group_size,
            shape=(int(d_out), int(d_in)),
        )

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes ``(d_out, d_in)``."""
        return unpack_codes(self.packed, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense dequantized weight Q ``(d_out, d_in)``, computed in fp32 then cast."""
        return dequantize_codes(self.codes(), self.scales, self.zeros, self.group_size).to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of storage (codes + scales + zeros)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros))
