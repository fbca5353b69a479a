"""Every issue-9 figure in one run, then the report: profile, perplexity table with peers, latency.

Stages (each writes its JSON under ``docs/results/performance_smollm2/``; ``--stages`` picks some, and a
finished stage is kept unless ``--fresh``):

1. ``profile``: bench/decompose_profile.py --quality (decomposition time beside one FP32 forward,
   phases, peak RSS, and whether the fast path cost perplexity);
2. ``ppl``: bench/ppl_table.py at g64: the default decomposition saved (and an independent one
   without ortho), ours at several rho, RTN, HQQ and optimum-quanto on the same held-out blocks
   (resumable: its own cache under ``bench/results/performance``);
3. ``latency``: bench/latency.py on those saved decompositions (decode, prefill 16 x 128 and 1 x 512,
   null test, alpha overhead, resident bytes, kernel report);
4. ``peers``: bench/peers_torchao.py from ``.venv-peers`` (``make peers-venv``; torchao is kept out of
   the main environment), torchao's INT4 on the same blocks; skipped with a message when that
   environment is missing;
5. ``report``: bench/performance_report.py: performance.json (every goal beside its threshold) and
   docs/results/performance_smollm2.md with the perplexity-vs-bits plot.

``baseline`` (not in the default list, about 11 minutes): the decomposition profile of the code before
this work (commit :data:`BASELINE_COMMIT`, the baseline code plus its phase timers), run from a git
worktree with that tree's ``src`` first on ``PYTHONPATH``, into ``decompose_profile_baseline.json``: the
report's *before* for goal 1 is then a measurement of this machine in this session, not an old JSON.

Run on an idle machine (nothing else on the cores):  .venv/bin/python bench/run_all.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = Path("docs/results/performance_smollm2")
WORK = Path("bench/results/performance")
STAGES = ("profile", "ppl", "latency", "peers", "report")
PEERS_PY = Path(".venv-peers/bin/python")
BASELINE_COMMIT = "1d1e1b130aa37d4492a37b5742b8186d3cb7c1a3"


def run_baseline() -> None:
    """The baseline code's decompose_profile.py from a throw-away worktree (see the module docstring)."""
    import os
    import tempfile

    repo = HERE.parent
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), BASELINE_COMMIT], check=True)
        try:
            env = dict(os.environ, PYTHONPATH=str(tree / "src"))
            probe = subprocess.run([sys.executable, "-c", "import libortho; print(libortho.__file__)"], env=env,
                                   check=True, capture_output=True, text=True).stdout.strip()
            if not probe.startswith(str(tree)):
                raise SystemExit(f"the baseline run would import {probe}, not the worktree's libortho")
            out = (repo / OUT / "decompose_profile_baseline.json").resolve()
            subprocess.run([sys.executable, str(tree / "bench" / "decompose_profile.py"), "--out", str(out)],
                           env=env, check=True, cwd=str(repo))
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], check=False)


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "profile": [py, str(HERE / "decompose_profile.py"), "--quality", "--out", str(OUT / "decompose_profile.json")],
        "ppl": [py, str(HERE / "ppl_table.py"), "--out", str(OUT / "ppl_table.json"), "--work", str(WORK),
                "--group-sizes", "64", "--null-groups", "64", "--rhos", *map(str, args.rhos),
                "--selectors", "obs", "--optimal-selectors", "obs", "--baselines", *args.baselines],
        "latency": [py, str(HERE / "latency.py"), "--dir", str(WORK / "smol-g64-obs1"),
                    "--base-dir", str(WORK / "smol-g64-base"), "--out", str(OUT / "latency.json")],
        "peers": [str(PEERS_PY), str(HERE / "peers_torchao.py")],
        "report": [py, str(HERE / "performance_report.py")],
    }


def done(stage: str) -> bool:
    """A stage counts as done when its JSON exists and is not marked partial."""
    import json

    path = {"profile": OUT / "decompose_profile.json", "ppl": OUT / "ppl_table.json",
            "latency": OUT / "latency.json", "peers": OUT / "peers_torchao.json"}.get(stage)
    return path is not None and path.exists() and not json.loads(path.read_text()).get("partial", False)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", choices=(*STAGES, "baseline"), default=list(STAGES))
    ap.add_argument("--fresh", action="store_true", help="re-run stages whose JSON already exists")
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    ap.add_argument("--baselines", nargs="+", default=["hqq", "quanto"])
    args = ap.parse_args(argv)
    cmds = commands(args)
    for stage in args.stages:
        if stage == "baseline":
            print("== baseline (the code before issue 9, from a worktree)", flush=True)
            run_baseline()
            continue
        if stage != "report" and done(stage) and not args.fresh:
            print(f"== {stage}: kept (its JSON is complete; --fresh re-runs it)", flush=True)
            continue
        if stage == "peers" and not PEERS_PY.exists():
            print(f"== peers: skipped ({PEERS_PY} is missing: make peers-venv)", flush=True)
            continue
        print(f"== {stage}", flush=True)
        subprocess.run(cmds[stage], check=True)


if __name__ == "__main__":
    main()
