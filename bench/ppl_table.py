"""Perplexity table on SmolLM2-135M: FP32, INT4 RTN/GPTQ, LibOrtho (selector x rho x values), peers.

One protocol, resumable stage by stage (every stage's output is cached under ``--work``):

1. ``decompose``: per group size, a GPTQ decomposition *with* the default ortho stream (obs, rho 1%,
   residual values) in a fresh child process, saved as a decomposition directory, plus every
   layer's Hessian (so selectors can be re-scored later without recalibrating). For the group sizes
   in ``--null-groups`` a second, independent child decomposes the same model *without* an ortho
   stream: the null test compares the two, and both perplexities are measured.
   Peak RSS is the child's own (``ru_maxrss``: model load + calibration + decomposition).
2. ``sweep``: for each selector x rho x values, the ortho stream re-selected from the saved
   Hessians, attached to the saved base, perplexity at alpha = 1 (per-block NLLs kept).
3. ``peers``: FP32, RTN, HQQ and optimum-quanto at the same group size.
4. ``compare``: paired-bootstrap intervals over the evaluation blocks (diag vs obs at each rho and
   group size, optimal vs residual values), the verdict rendered from them by :func:`verdicts`.

    .venv/bin/python bench/ppl_table.py --out docs/results/dual_stream_smollm2/ppl_table.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from comparisons import compare_rows, verdicts  # noqa: E402
from libortho.atomic import atomic_write_json  # noqa: E402
from provenance import git_state  # noqa: E402

DEFAULT_SELECT = {"selector": "obs", "rho": 0.01, "values": "residual"}


def eval_blocks(tok: Any, args: argparse.Namespace) -> torch.Tensor:
    from libortho.data import load_corpus, token_blocks

    return token_blocks(load_corpus(args.eval_corpus), tok, block_len=args.seq_len, n_blocks=args.n_eval,
                        seed=1, split="heldout")


def calib_blocks(tok: Any, args: argparse.Namespace) -> torch.Tensor:
    from libortho.data import calibration_blocks

    return calibration_blocks(args.calib, tok, n_blocks=args.n_calib, block_len=args.seq_len, seed=0)


def measure(model: torch.nn.Module, blocks: torch.Tensor, label: str) -> dict[str, Any]:
    """Perplexity with its per-block NLLs and the time it took."""
    from libortho.eval import perplexity

    t = time.perf_counter()
    r = perplexity(model, blocks, batch_size=4, progress=False)
    dt = time.perf_counter() - t
    print(f"  {label:<44} ppl {r.ppl:9.4f}   ({dt:5.1f} s)", flush=True)
    return {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "block_nll": list(r.block_nll), "eval_s": dt}


def child_decompose(gs: int, with_ortho: bool, out_dir: str, hess_path: str | None, args: argparse.Namespace
                    ) -> dict[str, Any]:
    """Runs in a fresh process: load, calibrate, decompose, save. Returns the stats (RSS is this process's)."""
    from safetensors.torch import save_file

    from libortho.checkpoint import save
    from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
    from libortho.models import load_model
    from libortho.pipeline import decompose
    from libortho.workflows import bits_summary

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    calib = calib_blocks(tok, args)
    cfg = DecomposeConfig(quant=QuantConfig(group_size=gs, method="gptq", grid=args.grid, act_order=False),
                          select=SelectConfig(**DEFAULT_SELECT), ortho=with_ortho)
    res = decompose(model, calib, cfg, keep_records=hess_path is not None, progress=False)
    stats = dict(res.stats, child_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 with_ortho=with_ortho, **bits_summary(res.base, res.ortho if with_ortho else None))
    if hess_path is not None:
        # linears of one stage share one Hessian tensor; safetensors wants each stored once per name
        save_file({n: r.hessian.clone() for n, r in res.records.items()}, hess_path)
    save(model, out_dir, config=cfg.to_dict(), tokenizer=tok, overwrite=True,
         provenance={"source_model": args.model, "stats": stats})
    return stats


def in_child(fn: Any, *a: Any) -> Any:
    """Run ``fn(*a)`` in a fresh spawned process (its memory and peak RSS are its own)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
        return ex.submit(fn, *a).result()


def stage_decompose(gs: int, args: argparse.Namespace, state: dict) -> None:
    """Stage 1 for one group size (skipped where the state already holds it)."""
    key = f"g{gs}"
    dec = state.setdefault("decomposition", {}).setdefault(key, {})
    if "with_ortho" not in dec:
        print(f"decompose g{gs} with ortho (child process) ...", flush=True)
        dec["with_ortho"] = in_child(child_decompose, gs, True, str(args.work / f"smol-g{gs}-obs1"),
                                     str(args.work / f"hessians-g{gs}.safetensors"), args)
        save_state(args, state)
    if gs in args.null_groups and "base_only" not in dec:
        print(f"decompose g{gs} without ortho (independent child process) ...", flush=True)
        dec["base_only"] = in_child(child_decompose, gs, False, str(args.work / f"smol-g{gs}-base"), None, args)
        save_state(args, state)


def stage_sweep(gs: int, fp: torch.nn.Module, evals: torch.Tensor, args: argparse.Namespace, state: dict) -> None:
    """Stage 2: every selector x rho x values at alpha = 1 from the saved Hessians and base."""
    from safetensors.torch import load_file

    from libortho.checkpoint import load
    from libortho.config import SelectConfig
    from libortho.pipeline import LayerRecord, attach_ortho, select_ortho
    from libortho.workflows import bits_summary

    rows = state.setdefault("rows", {})
    combos = [(s, rho, "residual") for s in args.selectors for rho in args.rhos]
    combos += [(s, rho, "optimal") for s in args.optimal_selectors for rho in args.rhos]
    todo = [c for c in combos if f"libortho-g{gs}-{c[0]}-{c[1]:g}-{c[2]}" not in rows]
    if not todo:
        return
    model, _ = load(args.work / f"smol-g{gs}-obs1", alpha=1.0)
    hess = load_file(args.work / f"hessians-g{gs}.safetensors")
    weights = dict(fp.named_modules())
    records = {n: LayerRecord(weights[n].weight.detach(), m.base_stream, hess[n])
               for n, m in model.named_modules() if n in hess}
    base = {n: r.base for n, r in records.items()}
    for sel, rho, values in todo:
        key = f"libortho-g{gs}-{sel}-{rho:g}-{values}"
        row = {"method": "LibOrtho", "group_size": gs, "selector": sel, "rho": rho, "values": values}
        try:
            ortho = select_ortho(records, SelectConfig(selector=sel, rho=rho, values=values))
        except (RuntimeError, ValueError) as err:  # record and go on: one failure must not sink the table
            print(f"  {key} failed: {err}", flush=True)
            rows[key] = {**row, "error": f"{type(err).__name__}: {err}"}
            save_state(args, state)
            continue
        attach_ortho(model, ortho, alpha=1.0)
        rows[key] = {**row, "alpha1": measure(model, evals, f"LibOrtho {sel} rho={rho:g} {values} g{gs} a=1"),
                     **bits_summary(base, ortho)}
        save_state(args, state)


@torch.no_grad()
def stage_null(gs: int, evals: torch.Tensor, args: argparse.Namespace, state: dict) -> None:
    """Stage 1b: perplexity of the saved decompositions at alpha = 0 (measured) and the null test."""
    from libortho.checkpoint import load
    from libortho.runtime import set_alpha
    from libortho.workflows import bits_summary

    rows = state.setdefault("rows", {})
    key_a0 = f"libortho-g{gs}-default-alpha0"
    if key_a0 in rows:
        return
    with_ortho, _ = load(args.work / f"smol-g{gs}-obs1", alpha=0.0)
    base = {n: m.base_stream for n, m in with_ortho.named_modules() if hasattr(m, "base_stream")}
    ortho = {n: m.ortho_stream for n, m in with_ortho.named_modules() if getattr(m, "ortho_stream", None) is not None}
    row = {"method": "LibOrtho", "group_size": gs, **DEFAULT_SELECT, "alpha0": measure(
        with_ortho, evals, f"LibOrtho default g{gs} a=0 (saved, reloaded)"), **bits_summary(base, ortho)}
    set_alpha(with_ortho, 1.0)
    row["alpha1_reloaded"] = measure(with_ortho, evals, f"LibOrtho default g{gs} a=1 (saved, reloaded)")
    if gs in args.null_groups:
        base_only, _ = load(args.work / f"smol-g{gs}-base", load_ortho=False)
        rows[f"gptq-g{gs}"] = {"method": "INT4 GPTQ", "group_size": gs,
                               "ppl_measured": measure(base_only, evals, f"GPTQ g{gs} (independent, no ortho)"),
                               **bits_summary(base, None)}
        set_alpha(with_ortho, 0.0)
        probe = evals[:4]
        a, b = base_only(input_ids=probe).logits, with_ortho(input_ids=probe).logits
        row["null_test"] = {"probe_tokens": int(probe.numel()), "bit_identical": bool(torch.equal(a, b)),
                            "max_abs_logit_diff": float((a - b).abs().max()),
                            "what": "logits of two independent decompositions (child processes), one saved "
                                    "without an ortho stream, the other with it at alpha = 0"}
        print(f"  null test g{gs}: bit-identical={row['null_test']['bit_identical']} "
              f"max |diff|={row['null_test']['max_abs_logit_diff']:.3g}", flush=True)
    rows[key_a0] = row
    save_state(args, state)


def stage_peers(gs: int, fp: torch.nn.Module, evals: torch.Tensor, args: argparse.Namespace, state: dict) -> None:
    """Stage 3: RTN (ours) and the external INT4 peers at the same group size."""
    from libortho.config import DecomposeConfig, QuantConfig
    from libortho.eval.baselines import BASELINES
    from libortho.pipeline import decompose
    from libortho.workflows import bits_summary

    rows = state.setdefault("rows", {})
    if f"rtn-g{gs}" not in rows:
        m = copy.deepcopy(fp)
        r = decompose(m, None, DecomposeConfig(quant=QuantConfig(group_size=gs, method="rtn", grid="minmax"),
                                               ortho=False),
                      progress=False)
        rows[f"rtn-g{gs}"] = {"method": "INT4 RTN", "group_size": gs, "ppl_measured": measure(m, evals, f"RTN g{gs}"),
                              **bits_summary(r.base, None)}
        save_state(args, state)
    for name in args.baselines:
        key = f"{name}-g{gs}"
        if key in rows:
            continue
        m = copy.deepcopy(fp)
        try:
            t = time.perf_counter()
            info = BASELINES[name](m, bits=4, group_size=gs)
            info["quantize_s"] = time.perf_counter() - t
        except (ValueError, ImportError) as err:
            rows[key] = {"method": f"{name} INT4", "group_size": gs, "error": str(err)}
        else:
            rows[key] = {"method": f"{name} INT4", "group_size": gs,
                         "ppl_measured": measure(m, evals, f"{name} g{gs}"), **info}
        save_state(args, state)
        del m


def save_state(args: argparse.Namespace, state: dict) -> None:
    """Rewrite the result JSON after every stage: an interrupted run resumes where it stopped."""
    state["partial"] = True
    atomic_write_json(args.out, state)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="tests use the tiny model")
    ap.add_argument("--out", type=Path, default=Path("docs/results/dual_stream_smollm2/ppl_table.json"))
    ap.add_argument("--work", type=Path, default=Path("bench/results"), help="saved decompositions, Hessians")
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--null-groups", type=int, nargs="*", default=[64])
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    ap.add_argument("--selectors", nargs="+", default=["magnitude", "obs", "diag"])
    ap.add_argument("--optimal-selectors", nargs="*", default=["obs", "diag"])
    ap.add_argument("--baselines", nargs="*", default=["hqq", "quanto"])
    ap.add_argument("--grid", default="minmax")
    ap.add_argument("--calib", nargs="+", default=["shakespeare"])
    ap.add_argument("--eval-corpus", default="fortunes")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--stages", nargs="+", default=["decompose", "null", "sweep", "peers"])
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    from libortho.models import load_model

    state = json.loads(args.out.read_text()) if args.out.exists() else {}
    state.update({"benchmark": "ppl_table",
                  "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32; on a 4-bit g32 grid)",
                  "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}})
    state.setdefault("git", []).append(git_state())
    torch.manual_seed(0)
    fp, tok = load_model(args.model)
    evals = eval_blocks(tok, args)
    state["eval_tokens"] = int(evals.shape[0] * (evals.shape[1] - 1))
    state["calib_tokens"] = args.n_calib * args.seq_len
    rows = state.setdefault("rows", {})
    if "fp32" not in rows:
        rows["fp32"] = {"method": "FP32", "ppl_measured": measure(fp, evals, "FP32"), "bits_per_param": 32.0}
        save_state(args, state)
    for gs in args.group_sizes:
        if "decompose" in args.stages:
            stage_decompose(gs, args, state)
        if "null" in args.stages:
            stage_null(gs, evals, args, state)
        if "sweep" in args.stages:
            stage_sweep(gs, fp, evals, args, state)
        if "peers" in args.stages:
            stage_peers(gs, fp, evals, args, state)
    state["comparisons"] = compare_rows(state["rows"], args.group_sizes, args.rhos)
    state["verdicts"] = verdicts(state["comparisons"])
    all_stages = {"decompose", "null", "sweep", "peers"}
    state["partial"] = not all_stages <= set(args.stages) or any("error" in r for r in state["rows"].values())
    atomic_write_json(args.out, state)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
