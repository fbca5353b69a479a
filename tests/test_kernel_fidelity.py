"""How far the INT4 kernel's weights are from the stored fp16 base stream, in grid steps.

The runtime's output on an identity input is the weight it computes with (rounded to bf16 on the
way out); the reference is the stored stream dequantized in fp64. Grid-made streams must stay
within 1/32 of a step per group; streams the kernel cannot serve that well run dense in fp32, and
say so.
"""

import pytest
import torch

from libortho.config import QuantConfig
from libortho.quant import rtn_quantize
from libortho.runtime import OrthoLinear
from libortho.runtime.kernels import cpu
from libortho.streams import BaseStream

BOUND = 1 / 32
D_OUT, D_IN, GS = 32, 256, 64


def _runtime_weight(stream: BaseStream) -> tuple[torch.Tensor, torch.Tensor, OrthoLinear]:
    """(runtime output on the identity, transposed to (d_out, d_in); the kernel's exact fp64 weight; the layer)."""
    layer = OrthoLinear(stream, None)
    d_in, gs = stream.shape[1], stream.group_size
    with torch.no_grad():
        out = layer(torch.eye(d_in)).t().double()
    S, O = (layer._scales_zeros[..., k].double().t().repeat_interleave(gs, 1) for k in (0, 1))
    return out, (stream.codes().double() - 8) * S + O, layer


def _stored(stream: BaseStream) -> torch.Tensor:
    """The stored fp16 scales and zeros applied to the codes, in fp64 (exact): ``(code - zero) * scale``."""
    gs, d_in = stream.group_size, stream.shape[1]
    s, z = (t.double().repeat_interleave(gs, 1)[:, :d_in] for t in (stream.scales, stream.zeros))
    return (stream.codes().double() - z) * s


def _group_steps(err: torch.Tensor, stream: BaseStream) -> torch.Tensor:
    """Per-group max of ``err`` (d_out, d_in) divided by the group's scale."""
    d_out, gs = stream.shape[0], stream.group_size
    return (err.view(d_out, -1, gs).amax(-1)) / stream.scales.double()


def _weights(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D_OUT, D_IN, generator=g) * 0.05
    W[:, :GS] += 0.3 * torch.randn(D_OUT, 1, generator=g)  # first group of every row shifted: often one-signed
    return {"mixed": W, "positive": W.abs() + 0.01, "negative": -W.abs() - 0.02, "tiny": W * 1e-4,
            "huge": W * 1e4, "outliers": W * (1 + 20 * (torch.rand(D_OUT, D_IN, generator=g) < 0.01))}[kind]


@pytest.mark.parametrize("kind", ["mixed", "positive", "negative", "tiny", "huge", "outliers"])
@pytest.mark.parametrize("grid,symmetric", [("minmax", False), ("minmax", True), ("mse", False), ("hqq", False)])
def test_grid_streams_run_on_int4pack_within_a_32nd_of_a_step(grid, symmetric, kind) -> None:
    stream = rtn_quantize(_weights(kind, 0), QuantConfig(bits=4, group_size=GS, grid=grid, symmetric=symmetric,
                                                         method="rtn")).to_stream()
    z = stream.zeros.float()
    assert bool(((z >= 0) & (z <= 15)).all())  # the grids keep zero points in range
    out, kernel_w, layer = _runtime_weight(stream)
    assert layer.kernel == "int4pack"
    ref = _stored(stream)
    torch.testing.assert_close(ref.float(), stream.dequantize(), rtol=1e-6, atol=0)
    # the runtime computes exactly with kernel_w: its identity output is kernel_w rounded to bf16
    assert torch.equal(out, kernel_w.to(torch.bfloat16).double())
    weight_steps = _group_steps((kernel_w - ref).abs(), stream)
    assert float(weight_steps.max()) < BOUND
    # the library's own bound covers what was measured
    assert bool((cpu.int4pack_step_error(stream, layer._scales_zeros) >= weight_steps - 1e-9).all())
    # what a caller sees adds only the bf16 rounding of the output (relative 2^-8)
    out_err = (out - ref).abs() - 2.0**-8 * ref.abs()
    assert float(_group_steps(out_err, stream).max()) < BOUND


def _hand_stream(zeros: torch.Tensor, scales: torch.Tensor, seed: int = 1) -> BaseStream:
    codes = torch.randint(0, 16, (D_OUT, D_IN), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    codes[:, 0], codes[:, 1] = 0, 15  # every group uses both extreme codes
    return BaseStream.from_codes(codes, scales, zeros, 4, GS)


def _bf16_exact_scales(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(D_OUT, D_IN // GS, generator=g) * 0.02 + 1e-3).bfloat16().float()


@pytest.mark.parametrize("name", ["integer", "fractional (HQQ-like)", "extremes 0 and 15"])
def test_in_range_zeros_with_bf16_exact_scales_meet_the_bound(name) -> None:
    g = torch.Generator().manual_seed(2)
    shape = (D_OUT, D_IN // GS)
    zeros = {"integer": torch.randint(0, 16, shape, generator=g).float(),
             "fractional (HQQ-like)": torch.rand(shape, generator=g) * 15,
             "extremes 0 and 15": 15 * torch.randint(0, 2, shape, generator=g).float()}[name]
    stream = _hand_stream(zeros, _bf16_exact_scales(3))
    out, kernel_w, layer = _runtime_weight(stream)
    assert layer.kernel == "int4pack"
    steps = _group_steps((kernel_w - _stored(stream)).abs(), stream)
    assert float(steps.max()) < BOUND


@pytest.mark.parametrize("name", ["zeros below 0", "zeros above 15", "fp16 scales (not bf16-exact)"])
def test_streams_off_the_bound_fall_back_to_dense_fp32_and_say_so(name) -> None:
    g = torch.Generator().manual_seed(4)
    shape = (D_OUT, D_IN // GS)
    if name == "zeros below 0":
        zeros, scales = -torch.randint(1, 31, shape, generator=g).float(), _bf16_exact_scales(5)
    elif name == "zeros above 15":
        zeros, scales = torch.randint(16, 46, shape, generator=g).float(), _bf16_exact_scales(5)
    else:
        zeros, scales = torch.randint(0, 16, shape, generator=g).float(), torch.rand(shape, generator=g) * 0.02 + 1e-3
    stream = _hand_stream(zeros, scales)
    packed, sz = cpu.prepare_int4pack(stream)
    # measured on the kernel itself: these groups would be served more than 1/32 step off
    y = cpu.int4pack_matmul(torch.eye(D_IN), packed, sz, GS, D_OUT).t().double()
    S, O = (sz[..., k].double().t().repeat_interleave(GS, 1) for k in (0, 1))
    kernel_w = (stream.codes().double() - 8) * S + O
    assert torch.equal(y, kernel_w.to(torch.bfloat16).double())
    assert float(_group_steps((kernel_w - _stored(stream)).abs(), stream).max()) > BOUND
    with pytest.warns(cpu.KernelFallbackWarning, match="1/32 grid step"):
        layer = OrthoLinear(stream, None)
    assert layer.kernel == "dense-float32" and "> 1/32" in layer.kernel_note
    x = torch.randn(5, D_IN, generator=g)
    torch.testing.assert_close(layer(x), x @ stream.dequantize().T, rtol=1e-5, atol=1e-6)
