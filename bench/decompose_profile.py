"""Where the decomposition's time goes (issue 9, goal 1): one run, phases timed, beside one FP32 forward.

Decomposes SmolLM2-135M (GPTQ g64 + obs selector, rho = 1%, 128 x 512 calibration tokens by default)
and, in the same process, times one plain FP32 forward over the same calibration tokens at the same
batch size, so the goal is read as a ratio measured in one run (goal: decomposition / forward <= 1.0,
peak RSS <= 2 GB). The phases come from ``DecompositionResult.stats["phase_s"]``: calibration capture,
stage discovery, the stage forwards that feed the Hessian hooks (accumulation excluded), Hessian
accumulation, GPTQ (its inverse-Cholesky part shown separately), selection, and the forward that
advances the calibration activations to the next block. Run it on an idle machine.

    .venv/bin/python bench/decompose_profile.py --out docs/results/performance_smollm2/decompose_profile.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import psutil
import torch

from libortho.atomic import atomic_write_json
from provenance import git_state


@torch.no_grad()
def forward_time(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> float:
    """Seconds for one plain forward of ``model`` over every calibration block, ``batch_size`` at a time."""
    t = time.perf_counter()
    for i in range(0, tokens.shape[0], batch_size):
        model(input_ids=tokens[i:i + batch_size], use_cache=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="shakespeare")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rho", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-blocks", type=int, default=None, help="decompose only the first blocks (quick looks)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.out.suffix != ".json":
        raise SystemExit(f"--out must be a .json file, got {args.out}")
    torch.set_num_threads(args.threads)

    import libortho
    from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
    from libortho.data import calibration_blocks
    from libortho.models import decoder_blocks, load_model

    model, tok = load_model(args.model)
    calib = calibration_blocks([args.calib], tok, n_blocks=args.n_calib, block_len=args.seq_len, seed=0)
    cfg = DecomposeConfig(quant=QuantConfig(bits=4, group_size=args.group_size, method="gptq"),
                          select=SelectConfig(selector="obs", rho=args.rho))
    model.eval()
    fwd_s = forward_time(model, calib, cfg.batch_size)
    print(f"one FP32 forward over {calib.numel()} tokens: {fwd_s:.1f} s", flush=True)
    res = libortho.decompose(model, calib, cfg, max_blocks=args.max_blocks)
    st = res.stats
    wall = st["wall_s"]
    phases = dict(sorted(st["phase_s"].items(), key=lambda kv: -kv[1]))
    blocks_total = len(decoder_blocks(model)) if args.max_blocks else st["blocks"]
    out = {
        "benchmark": "decompose_profile", "model": args.model, "calibration": args.calib,
        "calib_tokens": int(calib.numel()), "n_calib": args.n_calib, "seq_len": args.seq_len,
        "config": cfg.to_dict(), "threads": args.threads, "blocks": st["blocks"], "blocks_total": blocks_total,
        "fp32_forward_s": fwd_s, "decompose_s": wall, "ratio_to_forward": wall / fwd_s,
        "peak_rss_mb": st["peak_rss_mb"], "process_peak_rss_mb": psutil.Process().memory_info().rss / 2**20,
        "phase_s": phases, "phase_fraction": {k: v / wall for k, v in phases.items()},
        "phase_calls": st["phase_calls"],
        "goals": {"ratio_to_forward": {"goal": "<= 1.0", "holds": wall / fwd_s <= 1.0},
                  "decompose_s": {"goal": "<= 130", "holds": wall <= 130.0},
                  "peak_rss_mb": {"goal": "<= 2048", "holds": st["peak_rss_mb"] <= 2048}},
        "git": git_state(),
    }
    atomic_write_json(args.out, out)
    for k, v in phases.items():
        print(f"{k:28s} {v:8.1f} s  {v / wall:6.1%}")
    print(f"decompose {wall:.1f} s = {wall / fwd_s:.2f}x one FP32 forward; peak RSS {st['peak_rss_mb']:.0f} MB "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
