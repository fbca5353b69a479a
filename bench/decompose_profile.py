"""Where the decomposition's time goes (issue 9, goal 1): phases timed, beside one FP32 forward, one run.

Decomposes SmolLM2-135M (GPTQ g64 + obs selector, rho = 1%, 128 x 512 calibration tokens by default)
and, in the same run, times one plain FP32 forward over the same calibration tokens at the same
batch size, so the goal is read as a ratio (decomposition / forward <= 1.0, peak RSS <= 2 GB). Each
measurement runs in a fresh spawned process, so its peak RSS (``ru_maxrss`` read right after the
decomposition returns) is its own and no allocator state leaks from one to the next; both use the
allocator setting decompose() makes (runtime/allocator.py). The phases come from
``DecompositionResult.stats["phase_s"]``: calibration capture, plan discovery, the stage forwards
(accumulation excluded), Hessian accumulation, GPTQ (its inverse-Cholesky part shown separately),
selection, and the forward that advances the calibration activations to the next block.

``--quality`` checks that the fast path did not cost quality: perplexity on held-out text of another
corpus (fortunes) at alpha = 0 and 1 for (a) the default decomposition, (b) the same with
``calib_dtype="fp32"`` (the exact reference precision), (c) bf16 forwards with fp32 Hessian products
(a perturbation control) and (d) the default on a calibration sample drawn with another seed: (c)
and (d) are the noise a reviewer would compare (a - b) against. Paired per-block differences come
with bootstrap 95% intervals. Run it on an idle machine.

    .venv/bin/python bench/decompose_profile.py --quality --out docs/results/performance_smollm2/decompose_profile.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from libortho.atomic import atomic_write_json
from ppl_table import in_child
from provenance import git_state


def _setup(args: argparse.Namespace, calib_seed: int = 0) -> tuple[Any, Any, torch.Tensor]:
    torch.set_num_threads(args.threads)
    from libortho.data import calibration_blocks
    from libortho.models import load_model
    from libortho.runtime.allocator import retain_freed_memory

    retain_freed_memory()  # what decompose() does: the forward runs under the same allocator
    model, tok = load_model(args.model)
    calib = calibration_blocks([args.calib], tok, n_blocks=args.n_calib, block_len=args.seq_len, seed=calib_seed)
    return model.eval(), tok, calib


def default_config(args: argparse.Namespace) -> Any:
    from libortho.config import DecomposeConfig, QuantConfig, SelectConfig

    return DecomposeConfig(quant=QuantConfig(bits=4, group_size=args.group_size, method="gptq", grid=args.grid,
                                             act_order=args.act_order),
                           select=SelectConfig(selector="obs", rho=args.rho))


@torch.no_grad()
def child_forward(args: argparse.Namespace) -> dict[str, float]:
    """Seconds for one plain FP32 forward over every calibration block, ``batch_size`` at a time."""
    model, _, calib = _setup(args)
    bs = default_config(args).batch_size
    t = time.perf_counter()
    for i in range(0, calib.shape[0], bs):
        model(input_ids=calib[i:i + bs], use_cache=False)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child_decompose(args: argparse.Namespace, calib_dtype: str, calib_seed: int, evaluate: bool,
                    exact_products: bool = False) -> dict[str, Any]:
    """Decompose in this fresh process; its peak RSS up to then; optionally held-out perplexity at alpha 0, 1.

    ``exact_products`` (a control, not an option of the library): bf16 forwards but fp32 Hessian products.
    """
    import libortho
    from libortho.curvature import capture
    from libortho.curvature.hessian import HessianAccumulator
    from libortho.data import load_corpus, token_blocks
    from libortho.eval.perplexity import perplexity

    if exact_products:
        capture.HessianAccumulator = lambda d, dtype, product_dtype=None, **kw: HessianAccumulator(d, dtype)

    model, tok, calib = _setup(args, calib_seed)
    cfg = dataclasses.replace(default_config(args), calib_dtype=calib_dtype)
    res = libortho.decompose(model, calib, cfg, max_blocks=args.max_blocks, progress=False)
    out = {"config": cfg.to_dict(), "calib_seed": calib_seed, "exact_products": exact_products, "stats": res.stats,
           "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if evaluate:
        evals = token_blocks(load_corpus(args.eval_corpus), tok, block_len=args.seq_len, n_blocks=args.n_eval,
                             seed=1, split="heldout")
        for a in (0.0, 1.0):
            libortho.set_alpha(model, a)
            r = perplexity(model, evals)
            out[f"alpha{a:g}"] = {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "block_nll": list(r.block_nll)}
            print(f"  calib_dtype={calib_dtype} seed={calib_seed} alpha={a:g}: ppl {r.ppl:.3f}", flush=True)
    return out


def child_fp32_ppl(args: argparse.Namespace) -> dict[str, Any]:
    from libortho.data import load_corpus, token_blocks
    from libortho.eval.perplexity import perplexity

    model, tok, _ = _setup(args)
    evals = token_blocks(load_corpus(args.eval_corpus), tok, block_len=args.seq_len, n_blocks=args.n_eval,
                         seed=1, split="heldout")
    r = perplexity(model, evals)
    return {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "block_nll": list(r.block_nll)}


def paired(a: list[float], b: list[float], seed: int = 0, n_boot: int = 2000) -> dict[str, float]:
    """Mean per-block NLL difference a - b (nats/token) with a paired bootstrap 95% interval."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d.numel(), (n_boot, d.numel()), generator=g)
    boots = d[idx].mean(1)
    return {"mean": float(d.mean()), "lo": float(boots.quantile(0.025)), "hi": float(boots.quantile(0.975))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="shakespeare")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rho", type=float, default=0.01)
    ap.add_argument("--grid", default=None, help="base grid (default: the library's QuantConfig default)")
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                    help="GPTQ act-order (default: the library's QuantConfig default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-blocks", type=int, default=None, help="decompose only the first blocks (quick looks)")
    ap.add_argument("--quality", action="store_true", help="also compare held-out perplexity (see above)")
    ap.add_argument("--eval-corpus", default="fortunes")
    ap.add_argument("--n-eval", type=int, default=48)
    ap.add_argument("--keep-quality", action="store_true",
                    help="re-time only: keep the quality section (with its own git record) of an existing --out")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.out.suffix != ".json":
        raise SystemExit(f"--out must be a .json file, got {args.out}")
    from libortho.config import QuantConfig

    args.grid = QuantConfig.grid if args.grid is None else args.grid
    args.act_order = QuantConfig.act_order if args.act_order is None else args.act_order
    started = git_state()
    fwd = in_child(child_forward, args)
    print(f"one FP32 forward over {args.n_calib * args.seq_len} tokens: {fwd['seconds']:.1f} s", flush=True)
    run = in_child(child_decompose, args, "bf16", 0, args.quality)
    st = run["stats"]
    wall, peak = st["wall_s"], run["process_peak_rss_mb"]
    phases = dict(sorted(st["phase_s"].items(), key=lambda kv: -kv[1]))
    out = {
        "benchmark": "decompose_profile", "model": args.model, "calibration": args.calib,
        "calib_tokens": args.n_calib * args.seq_len, "n_calib": args.n_calib, "seq_len": args.seq_len,
        "config": run["config"], "threads": args.threads, "blocks": st["blocks"], "block_plans": st["block_plans"],
        "fp32_forward_s": fwd["seconds"], "decompose_s": wall, "ratio_to_forward": wall / fwd["seconds"],
        "peak_rss_mb": peak, "peak_rss_sampled_in_decompose_mb": st["peak_rss_mb"],
        "forward_process_peak_rss_mb": fwd["peak_rss_mb"],
        "phase_s": phases, "phase_fraction": {k: v / wall for k, v in phases.items()},
        "phase_calls": st["phase_calls"],
        "goals": {"ratio_to_forward": {"goal": "<= 1.0", "holds": wall / fwd["seconds"] <= 1.0},
                  "decompose_s": {"goal": "<= 130", "holds": wall <= 130.0},
                  "peak_rss_mb": {"goal": "<= 2048", "holds": peak <= 2048}},
        "git": started,
    }
    for k, v in phases.items():
        print(f"{k:28s} {v:8.1f} s  {v / wall:6.1%}")
    print(f"decompose {wall:.1f} s = {wall / fwd['seconds']:.2f}x one FP32 forward; peak RSS {peak:.0f} MB", flush=True)
    if args.quality:
        q: dict[str, Any] = {"eval_corpus": args.eval_corpus, "fp32": in_child(child_fp32_ppl, args),
                             "default": {k: run[k] for k in ("alpha0", "alpha1")}}
        q["fp32_precision"] = in_child(child_decompose, args, "fp32", 0, True)
        q["bf16_forward_fp32_products"] = in_child(child_decompose, args, "bf16", 0, True, True)
        q["default_calib_seed1"] = in_child(child_decompose, args, "bf16", 1, True)
        for a in ("alpha0", "alpha1"):
            base = q["default"][a]["block_nll"]
            q[f"delta_{a}"] = {f"default_minus_{k}": paired(base, q[k][a]["block_nll"])
                               for k in ("fp32_precision", "bf16_forward_fp32_products", "default_calib_seed1")}
        out["quality"] = q
    elif args.keep_quality and args.out.exists():
        old = json.loads(args.out.read_text())
        if "quality" in old:
            out["quality"] = dict(old["quality"], measured_by=old.get("git"))
    atomic_write_json(args.out, out)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
