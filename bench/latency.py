"""Null test and ortho overhead on CPU: decode and prefill latency, interleaved, medians.

Compares the decompositions written by ppl_table.py: the independent base-only GPTQ g64 model
(decomposed without an ortho stream), the default g64 model (obs, rho = 1%) with its ortho stream
at alpha = 0 and at alpha = 1, and the original FP32 model: decode (ms/token), prefill of 16 x 128
and of 1 x 512 tokens. Also the resident bytes of the quantized linears (kernel tensors and what
else each layer holds, from ``OrthoLinear.resident_bytes``) and which kernel serves each layer.
Run it on an idle machine.

    .venv/bin/python bench/latency.py --out docs/results/dual_stream_smollm2/latency.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from libortho.atomic import atomic_write_json
from libortho.checkpoint import load
from libortho.models import load_model
from libortho.runtime import kernel_report, ortho_layers, set_alpha
from provenance import git_state


@torch.no_grad()
def decode_step_time(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> float:
    """Mean seconds per generated token over ``steps`` cached single-token forwards."""
    out = model(input_ids=prompt, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t) / steps


@torch.no_grad()
def prefill_time(model: torch.nn.Module, batch: torch.Tensor) -> float:
    t = time.perf_counter()
    model(input_ids=batch, use_cache=False)
    return time.perf_counter() - t


def interleaved(fns: dict[str, Callable[[], float]], runs: int, warmup: int = 2) -> dict[str, float]:
    """Run each measurement in turn, ``runs`` rounds, return the median per name."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(runs):
        names = list(fns) if i % 2 == 0 else list(reversed(fns))  # alternate order against drift
        for k in names:
            times[k].append(fns[k]())
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("bench/results/smol-g64-obs1"))
    ap.add_argument("--base-dir", type=Path, default=Path("bench/results/smol-g64-base"),
                    help="an independent decomposition saved without an ortho stream")
    ap.add_argument("--out", type=Path, default=Path("docs/results/dual_stream_smollm2/latency.json"))
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--prefill-runs", type=int, default=20)
    args = ap.parse_args()
    started = git_state()
    torch.manual_seed(0)
    base_only, _ = load(args.base_dir, load_ortho=False)
    with_ortho, _ = load(args.dir, alpha=0.0)
    ortho_on, _ = load(args.dir, alpha=1.0)
    fp32, _ = load_model("smollm2-135m")
    vocab = fp32.config.vocab_size
    prompt = torch.randint(0, vocab, (1, 32))
    batch = torch.randint(0, vocab, (16, 128))
    long = torch.randint(0, vocab, (1, 512))
    set_alpha(ortho_on, 1.0)
    decode = interleaved({
        "base_only": lambda: decode_step_time(base_only, prompt, args.decode_steps),
        "alpha0": lambda: decode_step_time(with_ortho, prompt, args.decode_steps),
        "alpha1": lambda: decode_step_time(ortho_on, prompt, args.decode_steps),
        "fp32": lambda: decode_step_time(fp32, prompt, args.decode_steps),
    }, args.runs)
    prefill = interleaved({
        "base_only": lambda: prefill_time(base_only, batch),
        "alpha0": lambda: prefill_time(with_ortho, batch),
        "alpha1": lambda: prefill_time(ortho_on, batch),
        "fp32": lambda: prefill_time(fp32, batch),
    }, args.prefill_runs, warmup=1)
    prefill_long = interleaved({
        "alpha0": lambda: prefill_time(with_ortho, long),
        "alpha1": lambda: prefill_time(ortho_on, long),
        "fp32": lambda: prefill_time(fp32, long),
    }, args.prefill_runs, warmup=1)
    ratios = {
        "null_decode_alpha0_over_base": decode["alpha0"] / decode["base_only"],
        "null_prefill_alpha0_over_base": prefill["alpha0"] / prefill["base_only"],
        "overhead_decode_alpha1_over_alpha0": decode["alpha1"] / decode["alpha0"],
        "overhead_prefill_alpha1_over_alpha0": prefill["alpha1"] / prefill["alpha0"],
        "decode_speedup_alpha0_vs_fp32": decode["fp32"] / decode["alpha0"],
        "decode_speedup_alpha1_vs_fp32": decode["fp32"] / decode["alpha1"],
        "prefill_16x128_alpha0_over_fp32": prefill["alpha0"] / prefill["fp32"],
        "prefill_1x512_alpha0_over_fp32": prefill_long["alpha0"] / prefill_long["fp32"],
        "overhead_prefill_1x512_alpha1_over_alpha0": prefill_long["alpha1"] / prefill_long["alpha0"],
    }
    layers = ortho_layers(with_ortho)
    params = sum(m.in_features * m.out_features for m in layers.values())
    parts: dict[str, int] = {}
    for m in layers.values():
        for k, v in m.resident_bytes().items():
            parts[k] = parts.get(k, 0) + v
    resident = {"quantized_params": params, "bytes": parts,
                "base_bytes_per_param": (parts["base_kernel"] + parts["base_stream"]) / params,
                "with_memory_bytes_per_param": sum(parts.values()) / params,
                "what": "base: INT4 kernel tensors (packed codes, bf16 scale/offset) plus the fp16 group "
                        "parameters kept to rebuild the stored stream; memory: the CSR the decode path reads "
                        "and the stored stream; bias included in the second figure"}
    res = {"benchmark": "latency", "dir": str(args.dir), "base_dir": str(args.base_dir),
           "threads": torch.get_num_threads(), "decode_steps": args.decode_steps,
           "git": [started],
           "decode_s_per_token": decode, "prefill_16x128_s": prefill, "prefill_1x512_s": prefill_long,
           "ratios": ratios, "resident": resident, "kernels": kernel_report(with_ortho),
           "runs": args.runs, "prefill_runs": args.prefill_runs}
    atomic_write_json(args.out, res)
    for k, v in decode.items():
        print(f"decode  {k:<10} {1e3 * v:8.2f} ms/token")
    for k, v in prefill.items():
        print(f"prefill {k:<10} {v:8.3f} s (16x128)")
    for k, v in prefill_long.items():
        print(f"prefill {k:<10} {v:8.3f} s (1x512)")
    print(f"resident base {resident['base_bytes_per_param']:.3f} B/param, with memory "
          f"{resident['with_memory_bytes_per_param']:.3f}")
    for k, v in ratios.items():
        print(f"{k:<40} {v:.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
