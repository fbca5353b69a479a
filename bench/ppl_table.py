"""Perplexity table on SmolLM2-135M: FP32, INT4 RTN/GPTQ, LibOrtho (selector x rho x alpha), peers.

One GPTQ pass per group size serves every selector/rho (the base is calibrated with the ortho
stream off, so alpha = 0 is the same GPTQ model for all of them; each one's alpha = 0 logits are
checked bit-identical to the base-only model on a probe batch instead of re-running the eval).

    .venv/bin/python bench/ppl_table.py --out bench/results/ppl_table.json
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import time
from pathlib import Path

import torch

from libortho.atomic import atomic_write_json
from libortho.checkpoint import save
from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
from libortho.data import calibration_blocks, load_corpus, token_blocks
from libortho.eval import perplexity
from libortho.models import load_model
from libortho.pipeline import attach_ortho, decompose, select_ortho
from libortho.runtime import set_alpha
from libortho.workflows import bits_summary


def _ppl(model: torch.nn.Module, blocks: torch.Tensor, label: str) -> float:
    t = time.perf_counter()
    r = perplexity(model, blocks, batch_size=4, progress=False)
    print(f"  {label:<34} ppl {r.ppl:9.4f}   ({time.perf_counter() - t:5.1f} s)", flush=True)
    return r.ppl


@torch.no_grad()
def _logits(model: torch.nn.Module, probe: torch.Tensor) -> torch.Tensor:
    return model(input_ids=probe, use_cache=False).logits


def run_group(fp: torch.nn.Module, tok, gs: int, calib: torch.Tensor, evals: torch.Tensor,
              args: argparse.Namespace, rows: list[dict], save_dir: Path | None) -> dict:
    """All rows for one group size; returns the GPTQ decomposition stats."""
    if args.only_baselines:
        run_baselines(fp, gs, evals, args.baselines, rows)
        return {}
    probe = evals[:1, :128]
    rtn = copy.deepcopy(fp)
    r = decompose(rtn, None, DecomposeConfig(quant=QuantConfig(group_size=gs, method="rtn"), ortho=False),
                  progress=False)
    rows.append({"method": "INT4 RTN", "group_size": gs, "ppl": _ppl(rtn, evals, f"RTN g{gs}"),
                 **bits_summary(r.base, None)})
    del rtn
    model = copy.deepcopy(fp)
    cfg = DecomposeConfig(quant=QuantConfig(group_size=gs, method="gptq", grid=args.grid), ortho=False)
    res = decompose(model, calib, cfg, keep_records=True, true_sequential=not args.fast)
    stats = dict(res.stats, peak_process_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"  GPTQ g{gs} decomposition: {stats['wall_s']:.0f} s", flush=True)
    base_ppl = _ppl(model, evals, f"GPTQ g{gs}")
    base_logits = _logits(model, probe)
    rows.append({"method": "INT4 GPTQ", "group_size": gs, "ppl": base_ppl, **bits_summary(res.base, None)})
    combos = [(s, rho, "residual") for s in args.selectors for rho in args.rhos]
    combos += [("obs", rho, "optimal") for rho in args.rhos]
    for sel, rho, values in combos:
        ortho = select_ortho(res.records, SelectConfig(selector=sel, rho=rho, values=values))
        attach_ortho(model, ortho, alpha=1.0)
        label = f"LibOrtho {sel} rho={rho:g} {values} g{gs}"
        ppl1 = _ppl(model, evals, label + " a=1")
        set_alpha(model, 0.0)
        null_ok = bool(torch.equal(_logits(model, probe), base_logits))
        rows.append({"method": "LibOrtho", "selector": sel, "rho": rho, "values": values, "group_size": gs,
                     "ppl_alpha1": ppl1, "ppl_alpha0": base_ppl if null_ok else _ppl(model, evals, label + " a=0"),
                     "alpha0_bit_identical_to_gptq": null_ok, **bits_summary(res.base, ortho)})
        if save_dir is not None and sel == "obs" and rho == 0.01 and values == "residual":
            set_alpha(model, 1.0)
            save(model, save_dir / f"smol-g{gs}-obs1", config=cfg.to_dict(), tokenizer=tok, overwrite=True,
                 provenance={"source_model": "smollm2-135m", "stats": stats})
    del model, res
    run_baselines(fp, gs, evals, args.baselines, rows)
    return stats


def run_baselines(fp: torch.nn.Module, gs: int, evals: torch.Tensor, names: list[str], rows: list[dict]) -> None:
    """External INT4 baselines (HQQ, optimum-quanto) at the same group size."""
    if not names:
        return
    from libortho.eval.baselines import BASELINES

    for name in names:
        m = copy.deepcopy(fp)
        try:
            info = BASELINES[name](m, bits=4, group_size=gs)
        except (ValueError, ImportError) as err:  # record and go on: one peer must not sink the table
            print(f"  {name} g{gs} failed: {err}", flush=True)
            rows.append({"method": f"{name} INT4", "group_size": gs, "error": str(err)})
            continue
        rows.append({"method": f"{name} INT4", "group_size": gs, "ppl": _ppl(m, evals, f"{name} g{gs}"), **info})
        del m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/ppl_table.json"))
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    ap.add_argument("--selectors", nargs="+", default=["magnitude", "obs", "diag"])
    ap.add_argument("--baselines", nargs="*", default=["hqq", "quanto"])
    ap.add_argument("--grid", default="minmax")
    ap.add_argument("--calib", nargs="+", default=["shakespeare"])
    ap.add_argument("--eval-corpus", default="fortunes")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--fast", action="store_true", help="one Hessian pass per block (not true-sequential)")
    ap.add_argument("--only-baselines", action="store_true", help="FP32 + external baselines only")
    ap.add_argument("--save-dir", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    torch.manual_seed(0)
    fp, tok = load_model("smollm2-135m")
    calib = calibration_blocks(args.calib, tok, n_blocks=args.n_calib, block_len=args.seq_len, seed=0)
    evals = token_blocks(load_corpus(args.eval_corpus), tok, block_len=args.seq_len, n_blocks=args.n_eval,
                         seed=1, split="heldout")
    rows: list[dict] = [{"method": "FP32", "ppl": _ppl(fp, evals, "FP32")}]
    stats: dict[int, dict] = {}
    for gs in args.group_sizes:  # the JSON is rewritten after every group: a late failure loses nothing
        stats[gs] = run_group(fp, tok, gs, calib, evals, args, rows, args.save_dir)
        atomic_write_json(args.out, {"benchmark": "ppl_table", "partial": True, "rows": rows, "decomposition": stats})
    fp_ppl = rows[0]["ppl"]
    for r in rows:
        if r["method"] == "LibOrtho":
            gptq = next(x["ppl"] for x in rows if x["method"] == "INT4 GPTQ" and x["group_size"] == r["group_size"])
            r["gap_closed"] = (gptq - r["ppl_alpha1"]) / (gptq - fp_ppl)
    result = {"benchmark": "ppl_table", "args": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()},
              "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32; on a 4-bit g32 grid)",
              "eval_tokens": int(evals.shape[0] * (evals.shape[1] - 1)), "calib_tokens": int(calib.numel()),
              "decomposition": stats, "rows": rows,
              "machine": {"cpu": platform.processor(), "threads": torch.get_num_threads()}}
    atomic_write_json(args.out, result)
    print_table(rows, fp_ppl)
    print(f"wrote {args.out}")


def print_table(rows: list[dict], fp_ppl: float) -> None:
    """The table as Markdown on stdout (ratios vs FP32)."""
    print("| method | g | selector | rho | values | ppl a=1 | ppl a=0 | ratio vs FP32 | gap closed | bits/param |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r.get('group_size', '')} | failed: {r['error']} |")
            continue
        p1 = r.get("ppl_alpha1", r.get("ppl"))
        p0 = r.get("ppl_alpha0", "")
        bpp = r.get("total_bits_per_param", r.get("bits_per_param", 32.0))
        print(f"| {r['method']} | {r.get('group_size', '')} | {r.get('selector', '')} | {r.get('rho', '')} | "
              f"{r.get('values', '')} | {p1:.3f} | {p0 if p0 == '' else f'{p0:.3f}'} | {p1 / fp_ppl:.3f} | "
              f"{r.get('gap_closed', float('nan')):.1%} | {bpp:.3f} |")


if __name__ == "__main__":
    main()
