"""CPU kernels of the dual-stream layer against slow references written from the definitions.

References: the INT4 kernel itself on an identity input (what it multiplies by), the stored
stream's codes, and ``x @ W_eff^T`` with ``W_eff = Q + alpha * W_memory`` built densely in fp64.
"""

from __future__ import annotations

import pytest
import torch

from libortho.quant.grid import QuantResult
from libortho.runtime import OrthoLinear
from libortho.runtime.kernels import cpu
from libortho.streams import LowRankMemory, SparseOrtho


def _stream(d_out: int, d_in: int, g: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (d_out, d_in), generator=gen, dtype=torch.uint8)
    ng = d_in // g
    scales = (torch.rand(d_out, ng, generator=gen) * 0.02 + 0.001).to(torch.bfloat16).float()  # bf16-exact
    zeros = torch.randint(0, 16, (d_out, ng), generator=gen).float()
    return QuantResult(codes, scales, zeros, 4, g).to_stream()


def _sparse(d_out: int, d_in: int, density: float = 0.01, seed: int = 1) -> SparseOrtho:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(d_out, d_in, generator=gen) < density
    return SparseOrtho.from_mask(torch.randn(d_out, d_in, generator=gen) * 0.05, mask, "fp16")


def _lowrank(d_out: int, d_in: int, r: int = 4, seed: int = 2) -> LowRankMemory:
    gen = torch.Generator().manual_seed(seed)
    return LowRankMemory(B=torch.randn(d_out, r, generator=gen) * 0.1, A=torch.randn(r, d_in, generator=gen) * 0.1)


@pytest.mark.parametrize("shape", [(64, 64), (192, 576), (576, 1536), (1536, 576), (48, 128), (16, 64)])
def test_dequantize_is_what_the_int4_kernel_multiplies_by(shape) -> None:
    """Fails if the decoded nibble layout is wrong anywhere (row pairing, block of 64, column order)."""
    d_out, d_in = shape
    s = _stream(d_out, d_in)
    packed, sz = cpu.prepare_int4pack(s)
    eye = torch.eye(d_in, dtype=torch.bfloat16)
    kernel_w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, 64, sz).t()
    assert torch.equal(cpu.int4pack_dequantize(packed, sz, 64, d_out), kernel_w)
    if d_out % 64 == 0:
        assert torch.equal(cpu.int4pack_codes(packed, d_out), s.codes())
    else:
        with pytest.raises(ValueError, match="multiple of 64"):
            cpu.int4pack_codes(packed, d_out)


def test_layer_keeps_one_copy_of_the_codes_and_gives_the_stream_back() -> None:
    s = _stream(192, 576)
    lin = OrthoLinear(s, None)
    assert lin.kernel == "int4pack" and lin._stream is None
    back = lin.base_stream
    assert torch.equal(back.packed, s.packed) and torch.equal(back.scales, s.scales)
    assert torch.equal(back.zeros, s.zeros) and back.shape == s.shape
    res = lin.resident_bytes()
    params = 192 * 576
    assert (res["base_kernel"] + res["base_stream"]) / params <= 0.65  # packed codes + bf16 and fp16 group params
    assert res["memory_kernel"] == res["memory_stream"] == 0


def _reference(x: torch.Tensor, lin: OrthoLinear, alpha: float) -> torch.Tensor:
    W = lin.effective_weight(alpha).double()
    return x.double() @ W.T


# 48: not a multiple of 64 (identity dequantization); 64 x 160: one block of 64 rows, 5 groups of 32
@pytest.mark.parametrize("shape", [(192, 576), (48, 128), (64, 160)])
@pytest.mark.parametrize("memory", ["sparse", "lowrank"])
@pytest.mark.parametrize("tokens", [1, 7, 600])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.5])
def test_forward_matches_the_dense_reference_on_every_path(shape, memory, tokens, alpha) -> None:
    """Decode (base kernel + gather/scatter or skinny matmuls) and prefill (memory folded into the
    transient weight, tokens >= dense_min_tokens) both give x @ (Q + alpha M)^T up to bf16 rounding.
    Fails if the fold forgets alpha, adds the memory twice, or the gather pairs rows and columns wrongly."""
    d_out, d_in = shape
    mem = _sparse(d_out, d_in, density=0.03 if d_in >= 512 else 0.1) if memory == "sparse" else _lowrank(d_out, d_in)
    lin = OrthoLinear(_stream(d_out, d_in, g=32 if d_in % 64 else 64), mem, alpha=alpha)
    assert lin.kernel == "int4pack"
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(tokens))
    assert lin._prefill(x) == (tokens >= lin.dense_min_tokens)
    got = lin(x).double()
    want = _reference(x, lin, alpha)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2e-2 * scale  # bf16 activations and weights: ~2^-8 relative
    if alpha:
        # the memory's own contribution is there, with the right size (not just noise around the base)
        base = _reference(x, lin, 0.0)
        contrib, seen = want - base, got - base
        assert torch.linalg.norm(seen - contrib) <= 0.1 * torch.linalg.norm(contrib)


def test_fold_adds_alpha_times_the_sparse_stream_exactly() -> None:
    """The prefill fold: W + alpha * W_ortho, each stored entry once, nothing elsewhere."""
    o = _sparse(96, 128, density=0.05)
    W = torch.randn(96, 128)
    got = W.clone()
    cpu.fold_csr_(got, cpu.ortho_csr(o), 0.7)
    torch.testing.assert_close(got, W + 0.7 * o.to_dense(torch.float32), rtol=1e-6, atol=1e-6)


def test_prefill_and_decode_agree_and_alpha_zero_never_reads_memory() -> None:
    """At alpha = 0 the memory tensors are never touched: poisoning them changes nothing (the null test)."""
    lin = OrthoLinear(_stream(192, 576), _sparse(192, 576), alpha=0.0)
    x = torch.randn(600, 576)
    before = lin(x)
    lin._csr.values().fill_(float("nan"))
    assert torch.equal(lin(x), before) and torch.equal(lin(x[:3]), lin(x[:3]))
    lin2 = OrthoLinear(_stream(192, 576), None)
    assert torch.equal(lin2(x), before)


def test_autocast_gives_the_autocast_dtype_like_nn_linear() -> None:
    lin = OrthoLinear(_stream(64, 64), None)
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16 == torch.nn.Linear(64, 64)(x).dtype
    assert lin(x).dtype == torch.float32


def _siblings(alpha: float = 1.0):
    from libortho.runtime.linear import SharedInputMemory

    layers = [OrthoLinear(_stream(n, 576, seed=n), _sparse(n, 576, density=0.02, seed=n + 1), alpha=alpha)
              for n in (576, 192, 192)]
    shared = SharedInputMemory(layers)
    for m in layers:
        m._shared = shared
    return layers, shared


def test_siblings_share_one_sparse_product_and_never_a_stale_one(monkeypatch) -> None:
    """q/k/v reading one x (MKL path: the compiled kernel switched off): the stacked product equals each
    layer's own; an x modified in place, a new x, or a changed memory stream is recomputed. Fails if the
    cache is keyed on the address alone."""
    import copy

    from libortho.runtime.kernels import native

    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", True)

    layers, shared = _siblings()
    alone = [OrthoLinear(m.base_stream, m.ortho_stream, alpha=1.0) for m in layers]
    x = torch.randn(2, 576)
    for m, ref in zip(layers, alone, strict=True):
        torch.testing.assert_close(m(x), ref(x), rtol=1e-3, atol=1e-3)
    first = shared._last[2]
    layers[1](x)
    assert shared._last[2] is first  # served from the shared product
    x.mul_(2.0)  # same tensor, new content
    torch.testing.assert_close(layers[2](x), alone[2](x), rtol=1e-3, atol=1e-3)
    y = torch.randn(2, 576)
    torch.testing.assert_close(layers[0](y), alone[0](y), rtol=1e-3, atol=1e-3)
    layers[1].set_ortho(_sparse(192, 576, density=0.05, seed=9))
    layers[1].alpha = 1.0
    torch.testing.assert_close(layers[1](y), OrthoLinear(layers[1].base_stream, layers[1].ortho_stream)(y),
                               rtol=1e-3, atol=1e-3)
    layers[0].alpha = 0.5  # siblings at different alphas: each falls back to its own product
    torch.testing.assert_close(layers[0](y), OrthoLinear(layers[0].base_stream, layers[0].ortho_stream,
                                                         alpha=0.5)(y), rtol=1e-3, atol=1e-3)
    clone = copy.deepcopy(layers)
    assert clone[0]._shared is clone[1]._shared is clone[2]._shared and clone[0]._shared is not shared
    torch.testing.assert_close(clone[2](y), layers[2](y))
