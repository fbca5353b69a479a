"""The compiled decode kernel (runtime/kernels/native.py) against a dense fp64 reference and the MKL path.

Reference: ``y + alpha * x @ W^T`` with ``W`` the memory stream made dense, in fp64, rounded once to the
output dtype. Fails on a wrong CSR walk (row pointers, column indices), a wrong bf16 decode or rounding,
a stale kernel after the memory changes, or a forward that silently skips the memory.
"""

from __future__ import annotations

import copy

import pytest
import torch

from libortho.quant.grid import QuantResult
from libortho.runtime import OrthoLinear
from libortho.runtime.kernels import cpu, native
from libortho.streams import SparseOrtho

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no compiled kernel: {native.status()}")


@pytest.fixture(params=["python-extension", "ctypes"], autouse=True)
def entry_point(request, monkeypatch, tmp_path):
    """Every test runs on both ways in: the CPython extension function and the ctypes call."""
    monkeypatch.setattr(native, "_tried", False)
    if request.param == "ctypes":
        monkeypatch.setenv(native.ABI_ENV, "ctypes")
    native.library()
    if not native.status().endswith(f"({request.param})"):
        pytest.skip(f"{request.param} entry point not available here: {native.status()}")
    yield request.param
    monkeypatch.undo()
    native._tried = False
    native.library()  # back to the default entry point for the rest of the session


def _sparse(d_out: int, d_in: int, density: float, seed: int) -> SparseOrtho:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(d_out, d_in, generator=gen) < density
    mask[3] = False  # an empty row
    return SparseOrtho.from_mask(torch.randn(d_out, d_in, generator=gen) * 0.05, mask, "fp16")


def _stream(d_out: int, d_in: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (d_out, d_in), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(d_out, d_in // 64, generator=gen) * 0.02 + 0.001).to(torch.bfloat16).float()
    zeros = torch.randint(0, 16, (d_out, d_in // 64), generator=gen).float()
    return QuantResult(codes, scales, zeros, 4, 64).to_stream()


def _reference(layer: OrthoLinear, x: torch.Tensor) -> torch.Tensor:
    """The base kernel's own output plus ``alpha * x @ W_memory^T`` in fp64 (the memory part alone is checked)."""
    return layer.base_forward(x).double() + layer.alpha * x.double() @ layer.ortho_stream.to_dense().double().t()


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("y_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,alpha", [(1, 1.0), (3, -0.5), (native.MAX_TOKENS, 2.0)])
def test_kernel_equals_the_dense_reference(x_dtype, y_dtype, tokens, alpha) -> None:
    o = _sparse(96, 160, 0.05, seed=tokens)
    k = native.CsrKernel(cpu.ortho_csr(o))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, 160, generator=gen).to(x_dtype)
    y = torch.randn(tokens, 96, generator=gen).to(y_dtype)
    want = (y.double() + alpha * x.double() @ o.to_dense().double().t()).to(y_dtype)
    got = k.addmm_(y.clone(), x, alpha)
    if y_dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # one rounding to bf16 of an fp32 sum: at most one bf16 step apart, almost always equal
        step = want.float().abs().clamp_min(1e-30) * 2.0**-7
        assert ((got.float() - want.float()).abs() <= step).all()
        assert (got == want).float().mean() > 0.97


def test_bf16_rounding_is_torchs_round_to_nearest_even() -> None:
    """y = 0 plus one product per row lands on halfway cases, overflow range, a subnormal and NaN: the kernel
    rounds like torch (bit for bit; NaN stays NaN, its payload aside: torch's own paths differ there)."""
    vals = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 3.0e38, float("nan"), 1.0e-40])
    n = vals.numel()
    o = SparseOrtho.from_flat(torch.arange(n) * n + torch.arange(n), vals, (n, n), "fp32")
    k = native.CsrKernel(cpu.ortho_csr(o))
    got = k.addmm_(torch.zeros(1, n, dtype=torch.bfloat16), torch.ones(1, n), 1.0)
    want = vals.to(torch.bfloat16)
    finite = ~torch.isnan(vals)
    assert torch.equal(got[0][finite].view(torch.int16), want[finite].view(torch.int16))
    assert torch.isnan(got[0][~finite]).all()


def test_decode_forward_takes_the_compiled_kernel_and_agrees_with_mkl(monkeypatch) -> None:
    layer = OrthoLinear(_stream(128, 192), _sparse(128, 192, 0.02, seed=1), alpha=1.0)
    x = torch.randn(1, 1, 192).bfloat16()
    calls = []
    real = native.CsrKernel.addmm_
    monkeypatch.setattr(native.CsrKernel, "addmm_", lambda self, *a: calls.append(1) or real(self, *a))
    fast = layer(x)
    assert calls, "decode did not use the compiled kernel"
    monkeypatch.setattr(native, "_lib", None)
    slow = layer(x)
    assert fast.dtype == slow.dtype == torch.bfloat16
    assert (fast.float() - slow.float()).abs().max() <= slow.float().abs().max() * 2.0**-7
    layer.alpha = 0.0
    torch.testing.assert_close(layer(x), layer.base_forward(x), rtol=0, atol=0)


def test_a_replaced_or_copied_memory_is_never_served_from_an_old_kernel() -> None:
    layer = OrthoLinear(_stream(128, 192), _sparse(128, 192, 0.02, seed=1), alpha=1.0)
    x = torch.randn(1, 192)
    before = layer(x)
    layer.set_ortho(_sparse(128, 192, 0.05, seed=2))
    layer.alpha = 1.0
    want = _reference(layer, x)
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer(x), before)
    clone = copy.deepcopy(layer)
    del layer  # the copy must not point into the original's freed tensors
    torch.testing.assert_close(clone(x).double(), want, rtol=1e-5, atol=1e-5)


def test_a_failed_build_falls_back_to_mkl_and_says_why(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    assert native.library() is None and native.status().startswith("build failed")
    assert not list(tmp_path.iterdir())  # nothing half-written left in the cache
    layer = OrthoLinear(_stream(128, 192), _sparse(128, 192, 0.02, seed=1), alpha=1.0)
    x = torch.randn(1, 192)
    torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-5)


def test_wide_inputs_take_the_heap_scratch_and_still_agree() -> None:
    """More than 16k inputs: the widened bf16 token lives on the heap, not the stack; same result."""
    o = _sparse(8, 20000, 0.01, seed=5)
    k = native.CsrKernel(cpu.ortho_csr(o))
    x = torch.randn(2, 20000).bfloat16()
    y = torch.zeros(2, 8)
    want = x.double() @ o.to_dense().double().t()
    torch.testing.assert_close(k.addmm_(y, x, 1.0).double(), want, rtol=1e-5, atol=1e-5)
    assert copy.deepcopy(k).addmm_(torch.zeros(2, 8), x, 1.0).equal(y)


def test_a_pickled_layer_after_decode_computes_the_same(tmp_path) -> None:
    """torch.save / torch.load of a layer whose kernel already ran: no pointer outlives its tensor (this
    crashed when the kernel cached data pointers); a detached memory drops the kernel too."""
    layer = OrthoLinear(_stream(128, 192), _sparse(128, 192, 0.02, seed=1), alpha=1.0)
    x = torch.randn(1, 1, 192).bfloat16()
    want = layer(x)
    torch.save(layer, tmp_path / "layer.pt")
    del layer
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
    loaded.set_ortho(None)
    assert loaded._native is None


def test_tracing_takes_the_torch_path_so_the_memory_stays_in_the_graph() -> None:
    layer = OrthoLinear(_stream(128, 192), _sparse(128, 192, 0.02, seed=1), alpha=1.0)
    x = torch.randn(1, 192)
    traced = torch.jit.trace(layer, (x,), check_trace=False)
    torch.testing.assert_close(traced(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
