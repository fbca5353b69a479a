"""OrthoLinear: kernels vs dense references, the alpha switch, the null test, storage isolation."""

import pytest
import torch

from libortho.config import QuantConfig
from libortho.quant import rtn_quantize
from libortho.runtime import OrthoLinear, alpha_scope, get_alpha, replace_module, set_alpha
from libortho.streams import SparseOrtho


def _layer(d_out, d_in, gs, bits=4, rho=0.02, seed=0, ortho=True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) * 0.05
    res = rtn_quantize(W, QuantConfig(bits=bits, group_size=gs, method="rtn"))
    R = W - res.dequantize()
    mask = torch.rand(d_out, d_in, generator=g) < rho
    o = SparseOrtho.from_mask(R, mask, "fp32") if ortho else None
    return W, res.to_stream(), o, mask


@pytest.mark.parametrize("d_out,d_in,gs,bits,kernel", [
    (96, 128, 64, 4, "int4pack"), (48, 96, 32, 4, "int4pack"), (40, 96, 32, 4, "dense-bfloat16"),
    (24, 100, 32, 4, "dense-bfloat16"),
    (24, 64, 16, 3, "dense-bfloat16")])
def test_base_and_ortho_paths_match_dense_reference(d_out, d_in, gs, bits, kernel) -> None:
    W, base, ortho, mask = _layer(d_out, d_in, gs, bits)
    layer = OrthoLinear(base, ortho, alpha=1.0)
    assert layer.kernel == kernel
    x = torch.randn(3, 5, d_in)
    Q = base.dequantize()
    for alpha in (0.0, 0.5, 1.0):
        layer.alpha = alpha
        ref = x @ (Q + alpha * ortho.to_dense()).T
        out = layer(x)
        assert out.shape == (3, 5, d_out) and out.dtype == x.dtype
        assert float((out - ref).norm() / ref.norm()) < 1e-2  # bf16 activations on the base path
    eff = layer.effective_weight(1.0)
    torch.testing.assert_close(eff[mask], W[mask], rtol=0, atol=1e-6)  # alpha=1 restores W on the support


@pytest.mark.parametrize("d_out,d_in,gs", [(64, 128, 32), (30, 100, 32)])
def test_null_test_bit_identical_and_no_shared_storage(d_out, d_in, gs) -> None:
    _, base, ortho, _ = _layer(d_out, d_in, gs)
    with_o, without = OrthoLinear(base, ortho, alpha=0.0), OrthoLinear(base, None)
    x = torch.randn(7, d_in)
    assert torch.equal(with_o(x), without(x))
    base_ptrs = {t.untyped_storage().data_ptr() for t in (base.packed, base.scales, base.zeros)}
    base_ptrs |= {b.untyped_storage().data_ptr() for b in with_o.buffers() if b is not with_o._csr}
    ortho_ptrs = {t.untyped_storage().data_ptr() for t in (ortho.indices, ortho.values)}
    ortho_ptrs |= {with_o._csr.values().untyped_storage().data_ptr()}
    assert not base_ptrs & ortho_ptrs


def test_locked_layer_and_alpha_controls() -> None:
    _, base, ortho, _ = _layer(32, 64, 32)
    locked = OrthoLinear(base, None)
    assert locked.alpha == 0.0
    with pytest.raises(RuntimeError, match="locked at alpha = 0"):
        locked.alpha = 1.0
    with pytest.raises(ValueError, match="finite"):
        OrthoLinear(base, ortho).alpha = float("nan")
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(64, 32))
    replace_module(model, "0", OrthoLinear(base, ortho, alpha=1.0))
    replace_module(model, "1", OrthoLinear(base, ortho, alpha=1.0))
    assert set_alpha(model, 0.25, pattern=r"^1$") == 1
    assert get_alpha(model) == {"0": 1.0, "1": 0.25}
    with alpha_scope(model, 0.0):
        assert get_alpha(model) == {"0": 0.0, "1": 0.0}
    assert get_alpha(model) == {"0": 1.0, "1": 0.25}
    with pytest.raises(ValueError, match="no OrthoLinear"):
        set_alpha(model, 0.0, pattern="nothing")
