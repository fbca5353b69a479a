"""End-to-end workflows behind the CLI: decompose-and-save, generate, perplexity, info, demo."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from libortho.checkpoint import load, save
from libortho.config import DecomposeConfig
from libortho.data import calibration_blocks, load_corpus, token_blocks
from libortho.eval import perplexity
from libortho.io import read_decomposition
from libortho.models import load_model
from libortho.pipeline import decompose
from libortho.runtime import set_alpha


def decompose_and_save(model_spec: str, out: Path, cfg: DecomposeConfig, calib_sources: list[str],
                       n_calib: int, seq_len: int, seed: int = 0, overwrite: bool = False,
                       progress: bool = True) -> dict[str, Any]:
    """Load a model, decompose it on public calibration text, save it; return a summary."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use --overwrite)")
    model, tok = load_model(model_spec)
    calib = calibration_blocks(calib_sources, tok, n_blocks=n_calib, block_len=seq_len, seed=seed)
    result = decompose(model, calib, cfg, progress=progress)
    prov = {"source_model": model_spec, "calibration": {"sources": calib_sources, "n": n_calib,
                                                        "seq_len": seq_len, "seed": seed},
            "stats": result.stats}
    save(model, out, config=cfg.to_dict(), tokenizer=tok, provenance=prov, overwrite=overwrite)
    return {"out": str(out), **result.stats, **bits_summary(result.base, result.ortho)}


def bits_summary(base: dict, ortho: dict | None) -> dict[str, float]:
    """Bits per quantized parameter of the base stream, the ortho stream, and both."""
    params = sum(b.shape[0] * b.shape[1] for b in base.values())
    base_bytes = sum(b.nbytes for b in base.values())
    ortho_bytes = sum(o.nbytes for o in (ortho or {}).values())
    nnz = sum(o.nnz for o in (ortho or {}).values())
    return {"quantized_params": params, "base_bits_per_param": 8 * base_bytes / params,
            "ortho_bits_per_param": 8 * ortho_bytes / params,
            "total_bits_per_param": 8 * (base_bytes + ortho_bytes) / params,
            "ortho_density": nnz / params}


def generate_text(path: Path, prompt: str, alpha: float, max_new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt`` from a saved decomposition at ``alpha``."""
    model, tok = load(path, alpha=alpha, load_ortho=alpha != 0.0)
    if tok is None:
        raise ValueError(f"{path} has no tokenizer")
    return greedy(model, tok, prompt, max_new_tokens)


@torch.no_grad()
def greedy(model: torch.nn.Module, tok: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding with the model's own ``generate``; returns only the new text."""
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def perplexity_of(path: Path, alpha: float, text: str, n_blocks: int, seq_len: int,
                  seed: int = 0) -> dict[str, Any]:
    """Held-out perplexity of a saved decomposition at ``alpha`` on a corpus or text file."""
    model, tok = load(path, alpha=alpha, load_ortho=alpha != 0.0)
    blocks = token_blocks(load_corpus(text), tok, block_len=seq_len, n_blocks=n_blocks, seed=seed,
                          split="heldout")
    r = perplexity(model, blocks, progress=True)
    return {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens}


def describe(path: Path) -> dict[str, Any]:
    """Per-layer shapes, bits and ortho density of a saved decomposition, plus totals."""
    dec = read_decomposition(path, load_ortho=True, verify=True)
    rows = []
    for name, b in dec.base.items():
        o = dec.ortho.get(name) if dec.ortho is not None else None
        rows.append({"name": name, "shape": list(b.shape), "bits": b.bits, "group_size": b.group_size,
                     "nnz": o.nnz if o else 0, "density": o.density if o else 0.0})
    rest_params = sum(t.numel() for t in dec.rest.values())
    files = {k: v.get("size") for k, v in dec.manifest.get("files", {}).items()}
    return {"path": str(path), "layers": rows, "ortho_loaded": dec.ortho is not None,
            "rest_params": rest_params, "file_bytes": files, **bits_summary(dec.base, dec.ortho)}


def run_demo(model_spec: str, out: Path, console: Console, n_calib: int = 32, seq_len: int = 256,
             n_eval: int = 16) -> dict[str, Any]:
    """Decompose the default model quickly, then show perplexity and text at alpha 0 and 1."""
    from libortho.config import QuantConfig, SelectConfig

    cfg = DecomposeConfig(quant=QuantConfig(bits=4, group_size=64), select=SelectConfig(rho=0.01))
    t0 = time.perf_counter()
    fp_model, tok = load_model(model_spec)
    eval_blocks = token_blocks(load_corpus("shakespeare"), tok, block_len=seq_len, n_blocks=n_eval,
                               seed=1, split="heldout")
    fp = perplexity(fp_model, eval_blocks, progress=True, desc="ppl fp32")
    del fp_model
    summary = decompose_and_save(model_spec, out, cfg, ["shakespeare"], n_calib, seq_len, overwrite=True)
    model, tok = load(out, alpha=1.0)
    rows = {"fp32": fp.ppl}
    for alpha in (1.0, 0.0):
        set_alpha(model, alpha)
        rows[f"alpha={alpha:g}"] = perplexity(model, eval_blocks, progress=True, desc=f"ppl a={alpha:g}").ppl
    prompt = "To be, or not to be,"
    texts = {}
    for alpha in (1.0, 0.0):
        set_alpha(model, alpha)
        texts[alpha] = greedy(model, tok, prompt, 24)
    console.rule("libortho demo")
    console.print(f"model {model_spec}: INT4 g64 GPTQ base + obs rho=1% ortho, saved to {out}")
    for k, v in rows.items():
        console.print(f"  held-out Shakespeare perplexity {k:>9}: {v:8.3f}")
    for a, t in texts.items():
        console.print(f"  alpha={a:g}: {prompt!r} -> {t!r}")
    console.print(f"  bits/param {summary['total_bits_per_param']:.3f}, "
                  f"total {time.perf_counter() - t0:.0f} s")
    return {"ppl": rows, "texts": {str(k): v for k, v in texts.items()}, **summary}
