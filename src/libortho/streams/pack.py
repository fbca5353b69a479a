"""Bit-packing of b-bit integer codes into bytes, row by row.

Codes of width ``bits`` are laid out little-endian inside a row: value i occupies bits
``[i*bits, (i+1)*bits)`` of the row's bit string, so 4-bit codes are two per byte (low nibble
first) and 3-bit codes are 8 per 3 bytes. Rows are padded to whole bytes.
"""

from __future__ import annotations

import torch

from libortho.config import SUPPORTED_BITS


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes one packed row of ``n`` codes of width ``bits`` occupies."""
    return (n * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` of shape ``(..., n)`` into uint8 ``(..., bytes)``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: {SUPPORTED_BITS}")
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}]")
    n = c.shape[-1]
    if bits == 8:
        return c.to(torch.uint8).contiguous()
    if bits == 4:
        if n % 2:
            c = torch.nn.functional.pad(c, (0, 1))
        return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8).contiguous()
    # generic path: expand to a bit string, pad to bytes, re-group by 8
    shifts = torch.arange(bits, dtype=torch.int32, device=c.device)
    bitstr = ((c.unsqueeze(-1) >> shifts) & 1).flatten(-2)
    pad = (-bitstr.shape[-1]) % 8
    if pad:
        bitstr = torch.nn.functional.pad(bitstr, (0, pad))
    bitstr = bitstr.unflatten(-1, (-1, 8))
    weights = (1 << torch.arange(8, dtype=torch.int32, device=c.device))
    return (bitstr * weights).sum(-1).to(torch.uint8).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``(..., bytes)`` to uint8 codes ``(..., n)``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot unpack {bits}-bit codes; supported: {SUPPORTED_BITS}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_row_bytes(n, bits):
        raise ValueError(
            f"packed row has {packed.shape[-1]} bytes, expected {packed_row_bytes(n, bits)} "
            f"for {n} codes of {bits} bits"
        )
    p = packed.to(torch.int32)
    if bits == 8:
        return packed.clone()
    if bits == 4:
        out = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)
        return out[..., :n].to(torch.uint8)
    bitstr = ((p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32, device=p.device)) & 1).flatten(-2)
    bitstr = bitstr[..., : n * bits].unflatten(-1, (n, bits))
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=p.device)
    return (bitstr * weights).sum(-1).to(torch.uint8)
