"""Per-layer CPU kernel timings on SmolLM2's linear shapes: where dequantize + bf16 GEMM beats the INT4 kernel.

For each shape and token count: the INT4 kernel, the transient dequantization + dense bf16 GEMM
(alone, and with a 1%-dense sparse stream folded in), the MKL CSR product of that stream (the decode
memory path) and a dense fp32 GEMM; medians in microseconds. ``crossover`` is the smallest token count
from which the dense path is faster for every shape: the basis of ``cpu.DENSE_PREFILL_MIN_TOKENS``.

    .venv/bin/python bench/kernel_crossover.py --out docs/results/performance_smollm2/kernel_crossover.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from libortho.atomic import atomic_write_json
from provenance import git_state

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))
TOKENS = (1, 4, 16, 64, 128, 192, 256, 512, 2048)


def median_us(f: Callable[[], object], n: int) -> float:
    for _ in range(3):
        f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def time_layer(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, csr: torch.Tensor, W: torch.Tensor,
               runs: int) -> dict[str, float]:
    """Median microseconds of every path for one layer and one input."""
    from libortho.runtime.kernels import cpu

    d_out = W.shape[0]
    y = cpu.int4pack_matmul(x, packed, sz, 64, d_out)
    return {"int4_us": median_us(lambda: cpu.int4pack_matmul(x, packed, sz, 64, d_out), runs),
            "dense_us": median_us(lambda: cpu.int4pack_dense_matmul(x, packed, sz, 64, d_out), runs),
            "dense_fold_us": median_us(lambda: cpu.int4pack_dense_matmul(
                x, packed, sz, 64, d_out, fold=lambda w: cpu.fold_csr_(w, csr, 1.0)), runs),
            "csr_add_us": median_us(lambda: cpu.sparse_ortho_addmm_(y.clone(), x, csr, 1.0), runs),
            "fp32_us": median_us(lambda: torch.nn.functional.linear(x, W), runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from libortho.quant.grid import QuantResult
    from libortho.runtime.kernels import cpu
    from libortho.streams import SparseOrtho

    g = torch.Generator().manual_seed(0)
    rows = []
    for d_out, d_in in SHAPES:
        ng = d_in // 64
        base = QuantResult(torch.randint(0, 16, (d_out, d_in), generator=g, dtype=torch.uint8),
                           (torch.rand(d_out, ng, generator=g) * 0.02 + 0.001).bfloat16().float(),
                           torch.randint(0, 16, (d_out, ng), generator=g).float(), 4, 64).to_stream()
        packed, sz = cpu.prepare_int4pack(base)
        ortho = SparseOrtho.from_mask(torch.randn(d_out, d_in, generator=g),
                                      torch.rand(d_out, d_in, generator=g) < 0.01, "fp16")
        csr = cpu.ortho_csr(ortho)
        W = base.dequantize(torch.float32)
        for t in TOKENS:
            x = torch.randn(t, d_in, generator=g)
            row = {"shape": [d_out, d_in], "tokens": t, **time_layer(x, packed, sz, csr, W, args.runs)}
            rows.append(row)
            print(row, flush=True)
    faster = {t: all(r["dense_us"] < r["int4_us"] for r in rows if r["tokens"] == t) for t in TOKENS}
    crossover = next((t for t in TOKENS if all(faster[u] for u in TOKENS if u >= t)), None)
    atomic_write_json(args.out, {"benchmark": "kernel_crossover", "threads": args.threads, "rows": rows,
                                 "crossover_tokens": crossover,
                                 "dense_min_tokens_in_use": cpu.DENSE_PREFILL_MIN_TOKENS, "git": git_state()})
    print(f"crossover {crossover} tokens (in use: {cpu.DENSE_PREFILL_MIN_TOKENS}) -> {args.out}")


if __name__ == "__main__":
    main()
