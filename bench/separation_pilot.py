"""Pilot of the separation preset: how hard plain fine-tuning memorises, and what it costs in skill.

    .venv/bin/python bench/separation_pilot.py --lr 5e-4 --repeats 16 --epochs 1 --threads 1

Plain bf16 fine-tuning of SmolLM2 on the separation experiment's data (public blocks + member
records, seed 0) at one learning rate / repetition count / epoch count, then greedy extraction of
every member and perplexity on the held-out domain and general blocks, beside the same numbers for
the model before fine-tuning. Each setting's row is appended (replaced when re-run) to
``--out`` (default ``docs/results/separation_smollm2/pilot_lr.json``). The preset in
``experiments/separation_config.py`` is chosen from these rows: extraction >= 50% (the issue's bar)
with domain perplexity not above the pre-fine-tune model's.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

OUT = Path("docs/results/separation_smollm2/pilot_lr.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--public-blocks", type=int, default=None, help="default: the preset's")
    p.add_argument("--members", type=int, default=None, help="default: the preset's")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m or tiny (pre-trained once, cached)")
    p.add_argument("--work", type=Path, default=Path("runs/separation_pilot"), help="cache of the tiny pre-training")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def measure(model: Any, tok: Any, data: Any) -> dict[str, Any]:
    """Extraction of every member and the two perplexities."""
    from libortho.eval.extraction import extract
    from libortho.eval.perplexity import perplexity

    t0 = time.perf_counter()
    ext = extract(model, tok, data.members, batch_size=32)
    dom = perplexity(model, data.domain_eval, batch_size=8)
    gen = perplexity(model, data.general_eval, batch_size=8)
    return {"extraction_rate": sum(e.extracted for e in ext) / len(ext), "n_members": len(ext),
            "ppl_domain": dom.ppl, "ppl_general": gen.ppl, "eval_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from types import SimpleNamespace

    from libortho.atomic import atomic_write_json
    from libortho.data.corpora import default_general_corpus
    from libortho.experiments.kill_switch import _load_pre_and_tokenizer, environment
    from libortho.experiments.separation_config import separation_preset
    from libortho.experiments.separation_data import build_separation_data
    from libortho.train.loop import train

    base = separation_preset(args.model)
    cfg = replace(base, repeats=args.repeats, public_blocks=args.public_blocks or base.public_blocks,
                  members=args.members or base.members, finetune=replace(base.finetune, lr=args.lr, epochs=args.epochs))
    load_pre, tok = _load_pre_and_tokenizer(SimpleNamespace(model=cfg.model))
    data = build_separation_data(cfg, 0, tok, default_general_corpus())
    if load_pre is None:  # the tiny model: pre-trained here (cached under --work)
        from libortho.experiments.kill_switch import _tiny_pre_loader

        ns = SimpleNamespace(model="tiny", tiny_arch=cfg.tiny_arch, pretrain=cfg.pretrain, seed=0,
                             pretrain_blocks=cfg.pretrain_blocks, block_len=cfg.block_len)
        load_pre, _ = _tiny_pre_loader(ns, data, args.work / "tiny", False, print)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {
        "what": __doc__.splitlines()[0], "script": "bench/separation_pilot.py", "runs": []}
    if "pre" not in result:
        result["pre"] = {"model": args.model, **measure(load_pre().eval(), tok, data)}
    rows = data.rows(0.0)
    model = load_pre()
    log = train(model, rows, cfg.finetune, progress=True, desc=f"lr {args.lr:g} x{args.repeats}")
    row = {"config": {"model": args.model, "lr": args.lr, "repeats": args.repeats, "epochs": args.epochs,
                      "public_blocks": cfg.public_blocks, "members": cfg.members, "free_len": cfg.free_len,
                      "batch_size": cfg.finetune.batch_size, "bf16": cfg.finetune.bf16, "threads": args.threads},
           "train_rows": len(rows.input_ids), "train_tokens": log.tokens, "steps": log.steps,
           "train_s": log.wall_s, "final_loss": log.losses[-1], **measure(model.eval(), tok, data),
           "environment": environment()}
    if args.out.is_file():  # re-read: another pilot may have written its row meanwhile
        result = {**json.loads(args.out.read_text()), "pre": result["pre"]}
    result["runs"] = [r for r in result["runs"] if r["config"] != row["config"]] + [row]
    atomic_write_json(args.out, result)
    print(json.dumps({k: v for k, v in row.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
    main()
