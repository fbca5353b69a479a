"""How far K-FAC and EK-FAC are from the exact Fisher block of a layer (tiny Llama, empirical Fisher).

For a few small linears of the tiny Llama (blocks up to 4096 x 4096), the exact block
``E_n[vec(dW_n) vec(dW_n)^T]`` is formed from per-example gradients (one autograd pass per example,
:func:`libortho.curvature.kfac.per_example_fisher`); K-FAC's ``G ⊗ A`` and EK-FAC's re-fitted
eigenvalues are compared with it (relative Frobenius error) at several (examples x positions).
With one example of one position K-FAC is exact (error ~1e-16): the row that checks the harness.
(At a single position the query/key projections get no gradient at all: one key makes the attention
weight constant. So every other row has several positions.) The model is briefly fitted to
Shakespeare bytes, so the gradients are not those of a random network. JSON + Markdown under
``docs/results/geometry_tiny/``.

    .venv/bin/python bench/kfac_error.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from libortho.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from provenance import git_state  # noqa: E402

OUT = Path("docs/results/geometry_tiny/kfac_error.json")
LAYERS = ("model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.q_proj")


def trained_tiny(steps: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """The tiny Llama after ``steps`` AdamW steps on Shakespeare bytes, and held-out byte blocks."""
    from libortho.data import load_corpus, token_blocks
    from libortho.models import build_tiny_llama
    from libortho.models.tiny import ByteTokenizer

    model = build_tiny_llama(seed=seed).train()
    tok = ByteTokenizer()
    docs = load_corpus("shakespeare")
    train = token_blocks(docs, tok, block_len=64, n_blocks=8 * steps, seed=seed)
    held = token_blocks(docs, tok, block_len=64, n_blocks=64, seed=seed + 1, split="heldout")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for b in train.split(8):
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), held


def errors(model: torch.nn.Module, blocks: torch.Tensor, layers: tuple[str, ...]) -> dict[str, Any]:
    from libortho.curvature.kfac import fisher_error, fit_kfac, per_example_fisher

    mods = dict(model.named_modules())
    lins = {n: mods[n] for n in layers}
    kf = fit_kfac(model, [blocks], lins, fisher="empirical")
    ek = fit_kfac(model, [blocks], lins, fisher="empirical", ekfac=True)
    out = {}
    for n, lin in lins.items():
        F = per_example_fisher(model, [blocks], lin)
        out[n] = {"kfac": fisher_error(kf[n].fisher_block(), F), "ekfac": fisher_error(ek[n].fisher_block(), F),
                  "params": lin.weight.numel(), "fisher_norm": float(torch.linalg.matrix_norm(F))}
    return out


def render(state: dict[str, Any]) -> str:
    L = ["# K-FAC and EK-FAC against the exact Fisher block (tiny Llama, issue 10)", "",
         "Rendered by `bench/kfac_error.py` from `kfac_error.json`. Relative Frobenius error "
         "||approx - F|| / ||F|| of each layer's block, F from per-example gradients (empirical Fisher). "
         f"Model trained {state['train_steps']} steps on Shakespeare bytes; held-out blocks.", "",
         "| examples x positions | layer | params | ‖F‖ | K-FAC error | EK-FAC error |", "|---|---|---|---|---|---|"]
    for row in state["rows"]:
        for n, e in row["layers"].items():
            L.append(f"| {row['examples']} x {row['positions']} | {n} | {e['params']} | {e['fisher_norm']:.3g} | "
                     f"{e['kfac']:.3g} | "
                     f"{e['ekfac']:.3g} |")
    L += ["", "EK-FAC is the best diagonal in K-FAC's eigenbasis, so its error is never the larger one; with one "
          "example of one position both are exact."]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--shapes", default="1x1,8x8,32x8,8x32,32x32,64x32", help="examples x positions, comma-separated")
    args = ap.parse_args(argv)
    if args.out.suffix != ".json":
        raise SystemExit(f"--out must be a .json file, got {args.out}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    torch.manual_seed(0)
    model, held = trained_tiny(args.train_steps)
    model = model.double()
    state: dict[str, Any] = {"benchmark": "kfac_error", "train_steps": args.train_steps, "git": git_state(),
                             "rows": []}
    for n_ex, pos in shapes:
        if n_ex > held.shape[0] or pos + 1 > held.shape[1]:
            raise SystemExit(f"shape {n_ex}x{pos} exceeds the held-out blocks {tuple(held.shape)}")
        blocks = held[:n_ex, :pos + 1]  # pos positions with a next token each
        row = {"examples": n_ex, "positions": pos, "layers": errors(model, blocks, LAYERS)}
        state["rows"].append(row)
        print(f"  {n_ex} x {pos}: " + ", ".join(f"{n.split('.')[-1]} kfac {e['kfac']:.3g} ekfac {e['ekfac']:.3g}"
                                               for n, e in row["layers"].items()), flush=True)
        atomic_write_json(args.out, {**state, "partial": True})
    atomic_write_json(args.out, state)
    atomic_write_text(args.out.with_suffix(".md"), render(state))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
