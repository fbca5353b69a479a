"""Storage formats: BaseStream dequantization and validation, SparseOrtho sorting, views and validation,
the memory forms (low-rank, neurons) and their registry."""

import json

import pytest
import torch

from libortho.streams import (
    STREAM_FORMS,
    BaseStream,
    LowRankMemory,
    NeuronMemory,
    SparseOrtho,
    memory_params,
    stream_from_tensors,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("d_in,gs", [(11, 4), (16, 8), (7, 16)])  # partial last group, whole groups, one group
def test_base_stream_round_trip_matches_hand_dequantization(bits, d_in, gs) -> None:
    g = torch.Generator().manual_seed(bits * 100 + d_in)
    d_out, ng = 3, -(-d_in // gs)
    codes = torch.randint(0, 2**bits, (d_out, d_in), generator=g).to(torch.uint8)
    scales = torch.rand(d_out, ng, generator=g) + 0.01
    zeros = torch.rand(d_out, ng, generator=g) * (2**bits - 1)  # fractional zero points
    s = BaseStream.from_codes(codes, scales, zeros, bits, gs)
    sh, zh = scales.half().float(), zeros.half().float()  # stored as fp16
    ref = torch.empty(d_out, d_in)
    for i in range(d_out):
        for j in range(d_in):
            ref[i, j] = (float(codes[i, j]) - zh[i, j // gs]) * sh[i, j // gs]
    assert torch.equal(s.codes(), codes)
    assert s.scales.dtype == s.zeros.dtype == torch.float16
    torch.testing.assert_close(s.dequantize(), ref, rtol=1e-6, atol=1e-6)
    assert s.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert s.packed.shape == (d_out, (d_in * bits + 7) // 8)
    assert s.nbytes == s.packed.numel() + 2 * 2 * d_out * ng


def test_base_stream_from_codes_copies_its_inputs() -> None:
    scales, zeros = torch.ones(2, 1, dtype=torch.float16), torch.zeros(2, 1, dtype=torch.float16)
    s = BaseStream.from_codes(torch.zeros(2, 4, dtype=torch.uint8), scales, zeros, 4, 4)
    scales.fill_(7)
    assert float(s.scales.max()) == 1.0


def test_base_stream_validates_shapes_and_bits() -> None:
    u8 = torch.uint8
    with pytest.raises(ValueError, match="scales"):
        BaseStream(torch.zeros(2, 4, dtype=u8), torch.zeros(2, 1), torch.zeros(2, 2), 4, 4, (2, 8))
    with pytest.raises(ValueError, match="zeros"):
        BaseStream(torch.zeros(2, 4, dtype=u8), torch.zeros(2, 2), torch.zeros(3, 2), 4, 4, (2, 8))
    with pytest.raises(ValueError, match="packed"):
        BaseStream(torch.zeros(2, 3, dtype=u8), torch.zeros(2, 2), torch.zeros(2, 2), 4, 4, (2, 8))
    with pytest.raises(ValueError, match="bits"):
        BaseStream(torch.zeros(2, 4, dtype=u8), torch.zeros(2, 2), torch.zeros(2, 2), 5, 4, (2, 8))
    with pytest.raises(ValueError, match="out of range"):
        BaseStream.from_codes(torch.full((2, 4), 16), torch.ones(2, 1), torch.zeros(2, 1), 4, 4)


def _example() -> tuple[torch.Tensor, SparseOrtho]:
    dense = torch.zeros(4, 5)
    dense[3, 1], dense[0, 4], dense[2, 2], dense[2, 0] = 1.5, -2.0, 0.25, 3.0
    o = SparseOrtho.from_flat(torch.tensor([16, 4, 12, 10]), torch.tensor([1.5, -2.0, 0.25, 3.0]), (4, 5), "fp32")
    return dense, o


def test_sparse_ortho_from_flat_sorts_and_views_agree() -> None:
    dense, o = _example()
    assert o.indices.dtype == torch.int32 and o.indices.tolist() == [4, 10, 12, 16]
    assert o.values.tolist() == [-2.0, 3.0, 0.25, 1.5]  # values follow their indices
    assert o.nnz == 4 and o.density == pytest.approx(4 / 20)
    assert o.nbytes == 4 * 1 + 4 * 4  # one byte per delta-coded index (gaps 5, 6, 2, 4: no escape) + fp32 values
    rows, cols = o.rows_cols()
    assert rows.tolist() == [0, 2, 2, 3] and cols.tolist() == [4, 0, 2, 1]
    assert torch.equal(o.to_dense(), dense)
    csr = o.to_csr()
    assert csr.layout == torch.sparse_csr and torch.equal(csr.to_dense(), dense)
    assert csr.crow_indices().tolist() == [0, 1, 1, 3, 4]


@pytest.mark.parametrize("dtype,torch_dtype,size", [("fp16", torch.float16, 2), ("bf16", torch.bfloat16, 2),
                                                    ("fp32", torch.float32, 4)])
def test_sparse_ortho_from_mask_dtypes(dtype, torch_dtype, size) -> None:
    dense, _ = _example()
    o = SparseOrtho.from_mask(dense, dense != 0, dtype)
    assert o.values.dtype == torch_dtype and o.indices.tolist() == [4, 10, 12, 16]
    assert o.nbytes == 4 * 1 + 4 * size
    assert torch.equal(o.to_dense(), dense.to(torch_dtype).float())  # these values are exact in every dtype
    x = torch.randn(5, 3)
    torch.testing.assert_close(o.to_csr() @ x, dense @ x)


def test_sparse_ortho_random_csr_equals_dense() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(37, 53, generator=g)
    mask = torch.rand(37, 53, generator=g) < 0.05
    o = SparseOrtho.from_mask(W, mask, "fp32")
    assert o.nnz == int(mask.sum())
    assert torch.equal(o.to_csr().to_dense(), W * mask)
    assert SparseOrtho.empty((3, 4)).to_dense().abs().sum() == 0 and SparseOrtho.empty((3, 4)).nnz == 0


def test_sparse_ortho_validation() -> None:
    i32 = torch.int32
    with pytest.raises(ValueError, match="strictly increasing"):
        SparseOrtho(torch.tensor([3, 1], dtype=i32), torch.zeros(2), (2, 2))
    with pytest.raises(ValueError, match="strictly increasing"):
        SparseOrtho(torch.tensor([1, 1], dtype=i32), torch.zeros(2), (2, 2))  # duplicates
    with pytest.raises(ValueError, match="out of range"):
        SparseOrtho(torch.tensor([0, 4], dtype=i32), torch.zeros(2), (2, 2))
    with pytest.raises(ValueError, match="out of range"):
        SparseOrtho(torch.tensor([-1, 2], dtype=i32), torch.zeros(2), (2, 2))
    with pytest.raises(ValueError, match="int32"):
        SparseOrtho(torch.tensor([0, 1]), torch.zeros(2), (2, 2))
    with pytest.raises(ValueError, match="differ in shape"):
        SparseOrtho(torch.tensor([0, 1], dtype=i32), torch.zeros(3), (2, 2))
    with pytest.raises(ValueError, match="same shape"):
        SparseOrtho.from_mask(torch.zeros(2, 2), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown ortho dtype"):
        SparseOrtho.from_flat(torch.tensor([0]), torch.zeros(1), (2, 2), "fp8")


def _lowrank(d_out: int, d_in: int, r: int, dtype: str = "fp32") -> LowRankMemory:
    g = torch.Generator().manual_seed(0)
    return LowRankMemory.from_factors(torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g), dtype)


def _neurons(d: int, k: int, dtype: str = "fp32", activation: str = "silu") -> NeuronMemory:
    g = torch.Generator().manual_seed(0)
    return NeuronMemory.from_weights(torch.randn(k, d, generator=g), torch.randn(k, d, generator=g),
                                     torch.randn(d, k, generator=g), activation, dtype)


def test_lowrank_storage_and_validation() -> None:
    m = _lowrank(6, 10, 3, dtype="bf16")
    assert (m.shape, m.rank, m.kind, m.site) == ((6, 10), 3, "lowrank", "linear")
    assert m.A.dtype == m.B.dtype == torch.bfloat16 and m.nbytes == 2 * 3 * (6 + 10) and memory_params(m) == 48
    assert torch.equal(m.to_dense(), m.B.float() @ m.A.float()) and m.to_dense(torch.float16).dtype == torch.float16
    back = stream_from_tensors(m.tensors(), json.loads(json.dumps(m.meta())))
    assert isinstance(back, LowRankMemory) and torch.equal(back.A, m.A) and torch.equal(back.B, m.B)
    assert m.meta() == {"kind": "lowrank", "site": "linear", "shape": [6, 10], "rank": 3, "dtype": "bf16"}
    with pytest.raises(ValueError, match="do not chain"):
        LowRankMemory(torch.zeros(6, 3), torch.zeros(4, 10))
    with pytest.raises(ValueError, match="differ in dtype"):
        LowRankMemory(torch.zeros(6, 3), torch.zeros(3, 10, dtype=torch.float16))
    with pytest.raises(ValueError, match="2-D"):
        LowRankMemory(torch.zeros(6), torch.zeros(3, 10))
    with pytest.raises(ValueError, match="dtype"):
        LowRankMemory(torch.zeros(6, 3, dtype=torch.float64), torch.zeros(3, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-empty"):
        LowRankMemory(torch.zeros(6, 0), torch.zeros(0, 10))
    with pytest.raises(ValueError, match="unknown memory dtype"):
        LowRankMemory.from_factors(torch.zeros(6, 3), torch.zeros(3, 10), "fp8")
    with pytest.raises(ValueError, match="metadata says"):
        LowRankMemory.from_tensors(m.tensors(), {**m.meta(), "rank": 4})
    with pytest.raises(ValueError, match="'sparse' stream given to the 'lowrank' form"):
        LowRankMemory.from_tensors(m.tensors(), {"kind": "sparse"})


def test_neuron_storage_and_validation() -> None:
    n = _neurons(8, 3, dtype="fp16", activation="gelu")
    assert (n.n_neurons, n.d_model, n.kind, n.site, n.activation) == (3, 8, "neurons", "mlp", "gelu")
    assert n.nbytes == 2 * 3 * 3 * 8 and memory_params(n) == 3 * 3 * 8
    assert n.meta() == {"kind": "neurons", "site": "mlp", "n_neurons": 3, "d_model": 8, "dtype": "fp16",
                        "activation": "gelu"}
    back = stream_from_tensors(n.tensors(), n.meta())
    assert isinstance(back, NeuronMemory) and back.activation == "gelu"
    assert all(torch.equal(getattr(back, k), getattr(n, k)) for k in ("gate", "up", "down"))
    z = torch.zeros
    with pytest.raises(ValueError, match="shapes disagree"):
        NeuronMemory(z(3, 8), z(3, 8), z(3, 8), "silu")  # down must be (d, k), not (k, d)
    with pytest.raises(ValueError, match="shapes disagree"):
        NeuronMemory(z(3, 8), z(2, 8), z(8, 3), "silu")
    with pytest.raises(ValueError, match="differ in dtype"):
        NeuronMemory(z(3, 8), z(3, 8, dtype=torch.bfloat16), z(8, 3), "silu")
    with pytest.raises(ValueError, match="activation"):
        NeuronMemory(z(3, 8), z(3, 8), z(8, 3), "")
    with pytest.raises(ValueError, match="n_neurons=3, metadata says 4"):
        NeuronMemory.from_tensors(n.tensors(), {**n.meta(), "n_neurons": 4})


def test_registry_and_sparse_protocol() -> None:
    assert {"sparse": SparseOrtho, "lowrank": LowRankMemory, "neurons": NeuronMemory} == STREAM_FORMS
    s = SparseOrtho.from_flat(torch.tensor([5, 1]), torch.tensor([2.0, -1.0]), (2, 3), "bf16")
    assert (s.kind, s.site) == ("sparse", "linear") and sorted(s.tensors()) == ["far", "gaps", "values"]
    assert s.meta() == {"kind": "sparse", "site": "linear", "shape": [2, 3], "nnz": 2, "dtype": "bf16",
                        "index_coding": "delta8"}
    back = stream_from_tensors(s.tensors(), s.meta())
    assert torch.equal(back.to_dense(), s.to_dense()) and memory_params(back) == 2
    for cls in STREAM_FORMS.values():
        assert sorted(cls.tensor_names) == sorted(_form_example(cls).tensors())
    with pytest.raises(ValueError, match="unknown memory stream kind 'dora'"):
        stream_from_tensors({}, {"kind": "dora"})


def _form_example(cls: type) -> object:
    return {SparseOrtho: SparseOrtho.empty((2, 2)), LowRankMemory: _lowrank(2, 2, 1), NeuronMemory: _neurons(2, 1)}[cls]


def test_delta_coded_indices_round_trip_with_escapes() -> None:
    """Gaps of 1..255 in one byte, larger ones (and a first index past 254) through the far array.
    Fails on an off-by-one at an escape, at the start, or at the 255/256 boundary."""
    from libortho.streams.ortho import decode_indices, encode_indices

    cases = [[], [0], [254], [255], [256], [0, 255, 256, 511, 512, 100000, 100001, 100256, 100257],
             sorted(torch.randperm(2_000_000, generator=torch.Generator().manual_seed(0))[:20000].tolist())]
    for idx in cases:
        t = torch.tensor(idx, dtype=torch.int32)
        gaps, far = encode_indices(t)
        assert gaps.dtype == torch.uint8 and far.dtype == torch.int32
        assert torch.equal(decode_indices(gaps, far), t), idx[:10]
    gaps, far = encode_indices(torch.tensor([0, 300, 301], dtype=torch.int32))
    assert gaps.tolist() == [1, 0, 1] and far.tolist() == [300]
    with pytest.raises(ValueError, match="escaped"):
        decode_indices(gaps, far[:0])


def test_sparse_file_tensors_are_delta_coded_and_old_files_still_read() -> None:
    from libortho.streams import SparseOrtho

    mask = torch.rand(64, 300, generator=torch.Generator().manual_seed(1)) < 0.01
    o = SparseOrtho.from_mask(torch.randn(64, 300), mask, "fp16")
    t, m = o.tensors(), o.meta()
    assert set(t) == {"gaps", "far", "values"} and m["index_coding"] == "delta8"
    assert o.nbytes == t["gaps"].numel() + 4 * t["far"].numel() + 2 * o.nnz
    back = SparseOrtho.from_tensors(t, m)
    assert torch.equal(back.indices, o.indices) and torch.equal(back.values, o.values)
    old_meta = {k: v for k, v in m.items() if k != "index_coding"}
    old = SparseOrtho.from_tensors({"indices": o.indices, "values": o.values}, old_meta)
    assert torch.equal(old.to_dense(), o.to_dense())
    assert SparseOrtho.file_tensor_names(old_meta) == ("indices", "values")
    with pytest.raises(ValueError, match="coding"):
        SparseOrtho.from_tensors(t, dict(m, index_coding="huffman"))
