"""OrthoLinear and its CPU kernels: dense references, the alpha switch, the null test, isolation, patching."""

import copy
import warnings

import pytest
import torch

from libortho.config import QuantConfig
from libortho.quant import rtn_quantize
from libortho.runtime import OrthoLinear, alpha_scope, get_alpha, ortho_layers, replace_module, set_alpha
from libortho.runtime.kernels import cpu
from libortho.streams import BaseStream, SparseOrtho


def _raw_stream(W: torch.Tensor, bits: int, gs: int) -> BaseStream:
    """Min-max over each group's own range, fp16 scale, fractional zero point: a foreign writer's stream.

    Nothing keeps the zero point in range: one-signed groups get zeros outside ``[0, 2^b - 1]``, and
    the scales are not bf16-exact, so the INT4 kernel cannot serve it within its bound.
    """
    d_out, d_in = W.shape
    ng = -(-d_in // gs)
    Wp = torch.nn.functional.pad(W, (0, ng * gs - d_in), value=float("nan")).view(d_out, ng, gs)
    lo = torch.nan_to_num(Wp, nan=float("inf")).amin(-1)
    hi = torch.nan_to_num(Wp, nan=float("-inf")).amax(-1)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-4).half().float()
    zero = (-lo / scale).half().float()
    s, z = (t.repeat_interleave(gs, 1)[:, :d_in] for t in (scale, zero))
    codes = torch.clamp(torch.round(W / s + z), 0, 2**bits - 1).to(torch.uint8)
    return BaseStream.from_codes(codes, scale, zero, bits, gs)


def _grid_stream(W: torch.Tensor, bits: int, gs: int) -> BaseStream:
    """What decompose stores: the library's min-max grid (bf16-exact scales, zeros in range)."""
    return rtn_quantize(W, QuantConfig(bits=bits, group_size=gs, method="rtn")).to_stream()


def _weights(d_out: int, d_in: int, g: torch.Generator) -> torch.Tensor:
    """Random weights; every 4th row all-positive and the next all-negative (zero points out of range if allowed)."""
    W = torch.randn(d_out, d_in, generator=g) * 0.05
    W[0::4] = W[0::4].abs() + 0.02
    W[1::4] = -W[1::4].abs() - 0.03
    return W


def _layer(d_out: int, d_in: int, gs: int, bits: int = 4, rho: float = 0.02, seed: int = 0,
           dtype: str = "fp32", source: str = "grid") -> tuple[torch.Tensor, BaseStream, SparseOrtho, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = _weights(d_out, d_in, g)
    base = (_grid_stream if source == "grid" else _raw_stream)(W, bits, gs)
    mask = torch.rand(d_out, d_in, generator=g) < rho
    return W, base, SparseOrtho.from_mask(W - base.dequantize(), mask, dtype), mask


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_int4pack_constraints() -> None:
    assert cpu.int4pack_supported(4, 64, 1536, 576) and cpu.int4pack_supported(4, 128, 576, 1536)
    for gs in (32, 64, 128, 256):
        assert cpu.int4pack_supported(4, gs, 16, 512)
    assert not cpu.int4pack_supported(3, 64, 64, 128)  # 4-bit only
    assert not cpu.int4pack_supported(4, 16, 64, 128)  # group sizes 32..256
    assert not cpu.int4pack_supported(4, 512, 64, 512)
    assert not cpu.int4pack_supported(4, 32, 64, 100)  # partial last group
    assert not cpu.int4pack_supported(4, 32, 40, 128)  # N % 16


@pytest.mark.parametrize("source", ["grid", "raw"])
@pytest.mark.parametrize("d_out,d_in,gs", [(96, 128, 64), (48, 96, 32), (16, 256, 256), (32, 256, 128)])
def test_int4pack_matches_dense_reference(d_out, d_in, gs, source) -> None:
    _, base, _, _ = _layer(d_out, d_in, gs, source=source)
    packed, sz = cpu.prepare_int4pack(base)
    assert packed.dtype == torch.uint8 and packed.shape == (d_out, d_in // 2)
    assert sz.dtype == torch.bfloat16 and sz.shape == (d_in // gs, d_out, 2)
    x = torch.randn(2, 5, d_in)
    y = cpu.int4pack_matmul(x, packed, sz, gs, d_out)
    assert y.shape == (2, 5, d_out) and y.dtype == torch.float32
    # exact model of the kernel: bf16 activations, bf16 scale and offset, fp32 accumulation, bf16 output
    s, off = (sz[..., k].float().t().repeat_interleave(gs, 1) for k in (0, 1))
    q_kernel = (base.codes().float() - 8) * s + off
    torch.testing.assert_close(y, x.bfloat16().float() @ q_kernel.T, rtol=1e-2, atol=1e-3)
    assert _rel(y, x @ base.dequantize().T) < 1e-2
    # zero points outside [0, 15] (raw streams) are served, but only within a larger error
    z = base.zeros.float()
    assert bool(((z < 0) | (z > 15)).any()) == (source == "raw")
    worst = float(cpu.int4pack_step_error(base, sz).max())
    assert (worst <= cpu.INT4PACK_MAX_STEP_ERROR) == (source == "grid")


@pytest.mark.parametrize("d_out,d_in,gs,bits", [(40, 96, 32, 4), (24, 100, 32, 4), (32, 64, 16, 4),
                                                (24, 64, 16, 3), (32, 70, 32, 2), (16, 64, 64, 8)])
def test_fallback_paths(d_out, d_in, gs, bits) -> None:
    _, base, _, _ = _layer(d_out, d_in, gs, bits)
    Q, x = base.dequantize(), torch.randn(3, 4, d_in)
    bf16 = OrthoLinear(base, None)
    assert bf16.kernel == "dense-bfloat16" and bf16._weight.dtype == torch.bfloat16
    assert _rel(bf16(x), x @ Q.T) < 1e-2
    fp32 = OrthoLinear(base, None, base_dtype=torch.float32)
    assert fp32.kernel == "dense-float32"
    torch.testing.assert_close(fp32(x), x @ Q.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d_out,d_in,gs,bits", [(96, 128, 64, 4), (40, 96, 32, 4), (24, 64, 16, 3)])
def test_ortho_path_is_linear_in_alpha(d_out, d_in, gs, bits) -> None:
    W, base, ortho, mask = _layer(d_out, d_in, gs, bits)
    layer = OrthoLinear(base, ortho, alpha=1.0)
    Q, O = base.dequantize(), ortho.to_dense()
    x = torch.randn(3, 5, d_in)
    out = {}
    for alpha in (0.0, 0.5, 1.0):
        layer.alpha = alpha
        out[alpha] = layer(x)
        assert out[alpha].shape == (3, 5, d_out) and out[alpha].dtype == x.dtype
        assert _rel(out[alpha], x @ (Q + alpha * O).T) < 1e-2  # bf16 activations on the base path
    # the ortho term itself is fp32: differences between alphas are exact up to fp32 rounding
    torch.testing.assert_close(out[1.0] - out[0.0], x @ O.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0.5] - out[0.0], 0.5 * (out[1.0] - out[0.0]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.effective_weight(1.0)[mask], W[mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.effective_weight(0.0), Q)


def test_sparse_ortho_matmul_any_leading_dims() -> None:
    _, _, ortho, _ = _layer(48, 80, 16, rho=0.05, dtype="fp16")
    csr, O = cpu.ortho_csr(ortho), ortho.to_dense()
    assert csr.crow_indices().dtype == torch.int32 and csr.dtype == torch.float32
    for shape in [(80,), (7, 80), (2, 3, 80)]:
        x = torch.randn(*shape)
        y = cpu.sparse_ortho_matmul(x, csr)
        assert y.shape == (*shape[:-1], 48)
        torch.testing.assert_close(y, x @ O.T, rtol=1e-5, atol=1e-6)
    xb = torch.randn(4, 80).bfloat16()
    assert cpu.sparse_ortho_matmul(xb, csr).dtype == torch.bfloat16
    empty = cpu.ortho_csr(SparseOrtho.empty((48, 80)))
    assert torch.equal(cpu.sparse_ortho_matmul(torch.randn(3, 80), empty), torch.zeros(3, 48))


@pytest.mark.parametrize("d_out,d_in,gs,bits", [(64, 128, 32, 4), (30, 100, 32, 4), (1536 // 8, 576 // 8, 72, 4),
                                                (32, 64, 16, 3), (48, 64, 64, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("source", ["grid", "raw"])
def test_null_test_bit_identical(d_out, d_in, gs, bits, dtype, source) -> None:
    _, base, ortho, _ = _layer(d_out, d_in, gs, bits, source=source)
    bias = torch.randn(d_out)
    with_o, without = OrthoLinear(base, ortho, bias, alpha=0.0), OrthoLinear(base, None, bias)
    for shape in [(1, d_in), (7, d_in), (2, 3, d_in)]:
        x = torch.randn(*shape).to(dtype)
        assert torch.equal(with_o(x), without(x))
        assert with_o(x).dtype == dtype
    with_o.alpha = 1.0
    assert not torch.equal(with_o(x), without(x))


@pytest.mark.parametrize("d_out,d_in,gs", [(64, 128, 32), (30, 100, 32)])
def test_streams_share_no_storage(d_out, d_in, gs) -> None:
    _, base, ortho, _ = _layer(d_out, d_in, gs)
    layer = OrthoLinear(base, ortho, alpha=1.0)
    csr = layer._csr
    base_ts = [base.packed, base.scales, base.zeros] + [b for n, b in layer.named_buffers() if n != "_csr"]
    ortho_ts = [ortho.indices, ortho.values, csr.crow_indices(), csr.col_indices(), csr.values()]
    base_ptrs = {t.untyped_storage().data_ptr() for t in base_ts}
    ortho_ptrs = {t.untyped_storage().data_ptr() for t in ortho_ts}
    assert not base_ptrs & ortho_ptrs
    assert set(layer.state_dict()) == set()  # kernel tensors are not persistent; saving goes via the streams


def test_locked_layer_and_attach_detach() -> None:
    _, base, ortho, _ = _layer(32, 64, 32)
    locked = OrthoLinear(base, None)
    assert locked.alpha == 0.0 and locked.locked and "locked" in repr(locked)
    with pytest.raises(RuntimeError, match="not loaded"):
        locked.alpha = 1.0
    with pytest.raises(RuntimeError, match="not loaded"):
        locked.effective_weight(1.0)
    locked.alpha = 0.0  # allowed
    locked.set_ortho(ortho)
    locked.alpha = 0.75
    assert "nnz=" in repr(locked) and "alpha=0.75" in repr(locked) and "int4pack" in repr(locked)
    locked.set_ortho(None)
    assert locked.alpha == 0.0
    with pytest.raises(ValueError, match="finite"):
        OrthoLinear(base, ortho).alpha = float("nan")
    with pytest.raises(ValueError, match="does not match"):
        OrthoLinear(base, SparseOrtho.empty((64, 32)))


def test_module_dtype_conversion_keeps_kernels_working() -> None:
    _, base, ortho, _ = _layer(32, 64, 32)
    for b in (base, _layer(32, 64, 16)[1]):
        layer = OrthoLinear(b, ortho, torch.randn(32), alpha=1.0)
        x = torch.randn(3, 64)
        ref = layer(x)
        layer.to(torch.bfloat16)
        assert layer.bias.dtype == torch.bfloat16 and layer._csr.dtype == torch.float32
        y = layer(x.bfloat16())
        assert y.dtype == torch.bfloat16 and _rel(y, ref) < 2e-2


def test_patching_and_alpha_controls() -> None:
    _, base, ortho, _ = _layer(32, 64, 32)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Sequential(torch.nn.Linear(64, 32)))
    old = replace_module(model, "0", OrthoLinear(base, ortho, alpha=1.0))
    assert isinstance(old, torch.nn.Linear)
    replace_module(model, "1.0", OrthoLinear(base, ortho, alpha=1.0))
    with pytest.raises(AttributeError):
        replace_module(model, "1.5", torch.nn.Identity())
    assert list(ortho_layers(model)) == ["0", "1.0"]
    assert set_alpha(model, 0.25, pattern=r"^1\.") == 1
    assert get_alpha(model) == {"0": 1.0, "1.0": 0.25}
    with alpha_scope(model, 0.0):
        assert get_alpha(model) == {"0": 0.0, "1.0": 0.0}
    assert get_alpha(model) == {"0": 1.0, "1.0": 0.25}
    with pytest.raises(KeyError), alpha_scope(model, 0.5, pattern="^0$"):
        assert get_alpha(model) == {"0": 0.5, "1.0": 0.25}
        raise KeyError("restored on error too")
    assert get_alpha(model) == {"0": 1.0, "1.0": 0.25}
    with pytest.raises(ValueError, match="no OrthoLinear"):
        set_alpha(model, 0.0, pattern="nothing")
    replace_module(model, "1.0", OrthoLinear(base, None))  # a layer whose ortho was withheld
    assert set_alpha(model, 0.0) == 2
    with pytest.raises(RuntimeError, match="not loaded"):
        set_alpha(model, 1.0)
    assert get_alpha(model) == {"0": 0.0, "1.0": 0.0}  # all-or-nothing
    assert set_alpha(model, 1.0, pattern="^0$") == 1


def _tiny_llama(gs: int, with_ortho: bool, seed: int = 0, source: str = "grid") -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for name, mod in list(model.model.layers.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            W = mod.weight.detach().float()
            base = (_grid_stream if source == "grid" else _raw_stream)(W, 4, gs)
            mask = torch.rand(W.shape, generator=g) < 0.02
            ortho = SparseOrtho.from_mask(W - base.dequantize(), mask) if with_ortho else None
            replace_module(model.model.layers, name, OrthoLinear(base, ortho, mod.bias, alpha=0.0))
    return model


@pytest.mark.parametrize("gs,source,kernels", [(32, "grid", {"int4pack"}), (16, "grid", {"dense-bfloat16"}),
                                                (32, "raw", {"int4pack", "dense-float32"})])
def test_null_test_inside_llama(gs, source, kernels) -> None:
    """At alpha = 0 a model with ortho streams gives the logits of the same base without them, on every kernel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cpu.KernelFallbackWarning)
        model, plain = _tiny_llama(gs, True, source=source), _tiny_llama(gs, False, source=source)
    layers = ortho_layers(model)
    assert len(layers) == 14 and {m.kernel for m in layers.values()} == kernels  # raw: some layers fall back
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
        set_alpha(model, 1.0)
        on = model(ids).logits
        assert not torch.equal(on, plain(ids).logits)
        with alpha_scope(model, 0.0):
            assert torch.equal(model(ids).logits, plain(ids).logits)
        assert torch.equal(model(ids).logits, on)
    with pytest.raises(RuntimeError, match="not loaded"):
        set_alpha(plain, 1.0)
    out = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 13)
    set_alpha(model, 0.0)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False),
                       plain.generate(ids[:1], max_new_tokens=4, do_sample=False))
    clone = copy.deepcopy(model)  # torch cannot deep-copy CSR tensors: OrthoLinear rebuilds its own
    set_alpha(clone, 1.0)
    with torch.no_grad():
        assert torch.equal(clone(ids).logits, on) and torch.equal(model(ids).logits, plain(ids).logits)
