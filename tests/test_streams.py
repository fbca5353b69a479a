"""Storage formats: BaseStream dequantization and validation, SparseOrtho sorting and views."""

import pytest
import torch

from libortho.streams import BaseStream, SparseOrtho


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_base_stream_dequantizes_by_hand(bits) -> None:
    g = torch.Generator().manual_seed(bits)
    d_out, d_in, gs = 3, 11, 4  # partial last group
    codes = torch.randint(0, 2**bits, (d_out, d_in), generator=g).to(torch.uint8)
    scales, zeros = torch.rand(d_out, 3, generator=g), torch.rand(d_out, 3, generator=g) * 2**bits
    s = BaseStream.from_codes(codes, scales, zeros, bits, gs)
    ref = torch.empty(d_out, d_in)
    for i in range(d_out):
        for j in range(d_in):
            ref[i, j] = (codes[i, j] - zeros.half().float()[i, j // gs]) * scales.half().float()[i, j // gs]
    assert torch.equal(s.codes(), codes)
    torch.testing.assert_close(s.dequantize(), ref)
    assert s.nbytes == s.packed.numel() + 2 * 2 * d_out * 3


def test_base_stream_validates_shapes() -> None:
    with pytest.raises(ValueError, match="scales"):
        BaseStream(torch.zeros(2, 4, dtype=torch.uint8), torch.zeros(2, 1), torch.zeros(2, 2), 4, 4, (2, 8))
    with pytest.raises(ValueError, match="packed"):
        BaseStream(torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(2, 2), torch.zeros(2, 2), 4, 4, (2, 8))


def test_sparse_ortho_views_and_validation() -> None:
    dense = torch.zeros(4, 5)
    dense[3, 1], dense[0, 4], dense[2, 2] = 1.5, -2.0, 0.25
    o = SparseOrtho.from_flat(torch.tensor([16, 4, 12]), torch.tensor([1.5, -2.0, 0.25]), (4, 5), "fp32")
    assert o.indices.tolist() == [4, 12, 16] and o.nnz == 3 and o.density == pytest.approx(3 / 20)
    assert torch.equal(o.to_dense(), dense)
    assert torch.equal(o.to_csr().to_dense(), dense)
    assert o.nbytes == 3 * 4 + 3 * 4
    assert SparseOrtho.from_mask(dense, dense != 0, "fp16").values.dtype == torch.float16
    with pytest.raises(ValueError, match="strictly increasing"):
        SparseOrtho(torch.tensor([3, 1], dtype=torch.int32), torch.zeros(2), (2, 2))
    with pytest.raises(ValueError, match="out of range"):
        SparseOrtho(torch.tensor([0, 9], dtype=torch.int32), torch.zeros(2), (2, 2))
    with pytest.raises(ValueError, match="int32"):
        SparseOrtho(torch.tensor([0, 1]), torch.zeros(2), (2, 2))
