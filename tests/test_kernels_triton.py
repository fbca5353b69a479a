"""The fused Triton kernel (INT4 dequantize + sparse ortho FMA) against a dense reference, on CPU.

Runs in a subprocess with ``TRITON_INTERPRET=1`` (the interpreter must be chosen before triton is
imported, and other tests import torch's compile stack). Small shapes: odd token counts, several
groups, rows with no stored entry and rows with many, alpha 0, 1 and 0.3. Also holds both
backends to the :class:`~libortho.runtime.kernels.KernelBackend` interface on the same inputs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = textwrap.dedent("""
    import json, torch
    from libortho.quant.grid import QuantResult
    from libortho.runtime.kernels import backend
    from libortho.streams import SparseOrtho

    def case(d_out, d_in, g, tokens, density, seed):
        gen = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, 16, (d_out, d_in), generator=gen, dtype=torch.uint8)
        ng = d_in // g
        scales = (torch.rand(d_out, ng, generator=gen) * 0.05 + 0.01).to(torch.bfloat16).float()
        zeros = torch.randint(0, 16, (d_out, ng), generator=gen).float()
        base = QuantResult(codes, scales, zeros, 4, g).to_stream()
        mask = torch.rand(d_out, d_in, generator=gen) < density
        mask[3] = False  # a row with no stored entry
        mask[5, : d_in // 2] = True  # a long row
        ortho = SparseOrtho.from_mask(torch.randn(d_out, d_in, generator=gen) * 0.1, mask, "fp16")
        x = torch.randn(tokens, d_in, generator=gen)
        return base, ortho, x

    out = []
    tri, cpu = backend("triton"), backend("cpu")
    assert tri.available()
    for (d_out, d_in, g, tokens, density) in [(32, 64, 16, 5, 0.05), (48, 96, 32, 17, 0.1), (64, 128, 64, 1, 0.02)]:
        base, ortho, x = case(d_out, d_in, g, tokens, density, seed=d_out)
        Q = base.dequantize(torch.float64)
        O = ortho.to_dense(torch.float64)
        for alpha in (0.0, 1.0, 0.3):
            want = x.double() @ (Q + alpha * O).T
            got = tri.matmul(x, tri.prepare(base, ortho, "cpu"), alpha).double()
            ref_cpu = cpu.matmul(x, cpu.prepare(base, ortho, "cpu"), alpha).double()
            scale = float(want.abs().max())
            out.append({"shape": [d_out, d_in, g, tokens], "alpha": alpha,
                        "triton_err": float((got - want).abs().max()) / scale,
                        "cpu_err": float((ref_cpu - want).abs().max()) / scale,
                        "ortho_part": float((x.double() @ (alpha * O).T).abs().max()) / scale})
        # alpha = 0 compiles the sparse part away: poisoned memory values change nothing
        prep = tri.prepare(base, ortho, "cpu")
        clean = tri.matmul(x, prep, 0.0)
        prep.vals.fill_(float("nan"))
        assert torch.equal(tri.matmul(x, prep, 0.0), clean)
        assert torch.isnan(tri.matmul(x, prep, 1.0)).any()
    print(json.dumps(out))
""")


def test_fused_triton_kernel_matches_the_dense_reference_under_the_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 9
    for r in rows:
        assert r["triton_err"] <= 1e-5, r  # fp32 accumulation of exact fp32 weights
        assert r["cpu_err"] <= 2e-2, r  # bf16 activations and weights on the CPU path
        if r["alpha"]:
            assert r["ortho_part"] > 1e-2, r  # the memory matters here, so a dropped FMA would show
