"""Pilot of the memory learning rate: two-phase on the tiny model at several memory settings.

    .venv/bin/python bench/separation_memory_lr.py --work runs/memory_lr --threads 1

Runs the demo stage of the separation experiment (tiny model; plain fine-tuning, the masked
retrain and two-phase, INT4 at alpha 0 and 1) once per setting in ``SETTINGS``, each in its own
folder that starts from a copy of the first folder's cached references (so only two-phase trains
again), and collects every run's rows into ``--out`` (default
``docs/results/separation_tiny/pilot_memory_lr.json``). The fine-tuning schedule is the one that
makes the tiny model memorise (``BASE``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

OUT = Path("docs/results/separation_tiny/pilot_memory_lr.json")
BASE: dict[str, Any] = {"finetune": {"lr": 0.003, "epochs": 2.0}, "repeats": 32, "public_blocks": 160}
SETTINGS = {"lr1x_n64": {"memory_lr_scale": 1.0}, "lr10x_n64": {"memory_lr_scale": 10.0},
            "lr10x_n256": {"memory_lr_scale": 10.0, "neurons": 256}}
ROWS = ("ft_fp", "retrain_masked_int4", "two-phase_int4_a0", "two-phase_int4_a1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/memory_lr"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def row(entry: dict[str, Any]) -> dict[str, Any]:
    """The figures of one evaluation this pilot compares."""
    m = entry["metrics"]
    return {"label": entry["label"], "extracted": sum(p["extracted"] for p in m["per_canary"]),
            "n": len(m["per_canary"]), "exposure_mean": m["exposure"]["mean"],
            "secret_auc": m["mia"]["secret_loss"]["auc"], "ppl_domain": m["ppl_domain"],
            "ppl_general": m["ppl_general"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import os

    from libortho.atomic import atomic_write_json

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result: dict[str, Any] = {"what": __doc__.splitlines()[0], "script": "bench/separation_memory_lr.py",
                              "base": BASE, "settings": {}}
    first: Path | None = None
    for name, over in SETTINGS.items():
        out = args.work / name
        if first is not None and not (out / "seed0").exists():
            shutil.copytree(first / "seed0", out / "seed0")  # the references (and pre-training) are reused
        cfg = {**BASE, "method_overrides": {"two-phase": over}}
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg))
        subprocess.run([sys.executable, "-m", "libortho.cli", "experiment", "separation", "--stage", "demo",
                        "--methods", "two-phase", "--config", str(out / "config.json"), "--out", str(out),
                        "--quiet"], check=True, env=env)
        res = json.loads((out / "result.json").read_text())
        evals = res["seeds"]["0"]["evals"]
        result["settings"][name] = {"overrides": over, "rows": {r: row(evals[r]) for r in ROWS if r in evals},
                                    "two_phase_cost": res["seeds"]["0"]["stages"].get("two-phase")}
        first = first or out
        result["environment"] = res["environment"]
        atomic_write_json(args.out, result)
    print(json.dumps({k: {r: (v["exposure_mean"], v["ppl_domain"]) for r, v in s["rows"].items()}
                      for k, s in result["settings"].items()}, indent=1))


if __name__ == "__main__":
    main()
