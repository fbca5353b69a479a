"""Check the production exposure estimate (64 samples + skew-normal fit) against exact enumeration.

    .venv/bin/python bench/exposure_check.py                 # SmolLM2-135M, one thread, ~35 min, resumable
    .venv/bin/python bench/exposure_check.py --render-only   # re-render report.md + the figure from result.json

Writes ``OUT/result.json`` (config, environment, every canary's exact and estimated exposures, the
error bands and the conclusion) and renders ``OUT/report.md`` and ``OUT/estimate_vs_exact.png`` from
that JSON only. Models and per-canary results are cached under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exposure_check_render import render  # noqa: E402

OUT = Path("docs/results/exposure_check")
WORK = Path("runs/exposure_check")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT, help="where result.json, report.md and the figure go")
    p.add_argument("--work", type=Path, default=WORK, help="cache of the fine-tuned model and per-canary results")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seeds", type=int, default=None, help="sample seeds per canary and sample size")
    p.add_argument("--fresh", action="store_true", help="fine-tune again even if a cached model matches")
    p.add_argument("--render-only", action="store_true", help="only re-render from OUT/result.json")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the check with the given arguments and write ``result.json``."""
    import torch

    from libortho.atomic import atomic_write_json
    from libortho.experiments.exposure_check import ExposureCheckConfig, run_exposure_check

    torch.set_num_threads(args.threads)
    cfg = ExposureCheckConfig(model=args.model)
    if args.seeds is not None:
        from dataclasses import replace

        cfg = replace(cfg, n_seeds=args.seeds)
    result = run_exposure_check(cfg, args.work, fresh=args.fresh, log=lambda m: print(m, flush=True))
    atomic_write_json(args.out / "result.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        path = args.out / "result.json"
        if not path.is_file():
            print(f"error: {path} not found: run without --render-only first", file=sys.stderr)
            return 2
        result = json.loads(path.read_text())
    else:
        result = run(args)
    for p in render(result, args.out):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
