"""Bit-packing round-trips for every supported width, on arbitrary row lengths."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from libortho.streams.pack import pack_codes, packed_row_bytes, unpack_codes


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 4), n=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_pack_roundtrip(bits: int, rows: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_row_bytes(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_int4_nibble_order() -> None:
    packed = pack_codes(torch.tensor([[1, 2, 15]], dtype=torch.uint8), 4)
    assert packed.tolist() == [[0x21, 0x0F]]


def test_pack_rejects_out_of_range_and_bad_widths() -> None:
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="supported"):
        pack_codes(torch.tensor([[1]]), 5)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.uint8), 4, 8)
