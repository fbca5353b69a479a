"""End-to-end workflows behind the CLI: decompose-and-save, generate, perplexity, info, demo.

Every workflow validates its inputs (paths, alpha, names, sizes) *before* loading torch models,
so a typo costs a second, not a calibration; and refuses rather than silently doing something
other than asked (alpha = 1 without an ortho stream, a file where a directory belongs). Heavy
imports (torch, transformers) are local to the functions that need them, so importing this module
and failing on bad input stay fast.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from libortho.manifest import MANIFEST, ORTHO
from libortho.manifest import read_manifest_json as _read_manifest

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from rich.console import Console

    from libortho.config import DecomposeConfig

ORTHO_FILE = ORTHO
CORE_FILES = ("base.safetensors", "rest.safetensors", "config.json")
DEFAULT_EVAL_BLOCKS = 32


def check_alpha(alpha: float) -> float:
    """The privacy switch lives in [0, 1]: 0 = base stream only, 1 = the full ortho stream."""
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1] (0 = base only, 1 = full ortho stream), got {alpha}")
    return alpha


def check_positive(name: str, value: int | None, minimum: int = 1) -> None:
    """Refuse a count or length below ``minimum`` (None means "use the default")."""
    if value is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """OUT must be a new or empty directory (or any directory with ``overwrite``), never an existing file."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is a file, not a directory: give a directory path for OUT")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (use --overwrite to replace it)")


def read_manifest_json(path: Path) -> dict[str, Any]:
    """The manifest of a decomposition directory, checked only as far as needed to refuse early."""
    manifest = _read_manifest(path)
    if not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{Path(path) / MANIFEST} has no 'files' table: not a libortho manifest")
    return manifest


def check_loadable(path: Path, alpha: float, need_tokenizer: bool = True) -> None:
    """Refuse, before loading anything, a run that cannot honour ``alpha`` or lacks files it needs.

    Without ``ortho.safetensors`` the model is locked at alpha = 0: asking for more is an error, not
    a silent run at 0. Files the manifest lists but that are gone (a removed tokenizer) are named.
    """
    manifest = read_manifest_json(path)
    if alpha != 0.0 and not (path / ORTHO_FILE).is_file():
        why = ("deleted or withheld" if ORTHO_FILE in manifest["files"]
               else "the decomposition was saved without one")
        raise FileNotFoundError(f"{path / ORTHO_FILE} is missing ({why}): this decomposition runs only at "
                                f"alpha 0, not {alpha:g}")
    missing = [n for n in manifest["files"] if n != ORTHO_FILE and not (path / n).is_file()]
    core = [n for n in missing if n in CORE_FILES]
    if core:
        raise FileNotFoundError(f"{path} is incomplete: {', '.join(core)} listed in the manifest but missing")
    if need_tokenizer and missing:
        raise FileNotFoundError(f"{path}: {', '.join(missing)} listed in the manifest but missing "
                                "(the tokenizer was removed?)")


def decompose_and_save(model_spec: str, out: Path, cfg: DecomposeConfig, calib_sources: list[str],
                       n_calib: int, seq_len: int, seed: int = 0, overwrite: bool = False,
                       progress: bool = True) -> dict[str, Any]:
    """Load a model, decompose it on public calibration text, save it; return a summary.

    OUT, the calibration sources and the sizes are checked before the model is loaded; a model
    directory without a tokenizer is refused before its weights are read.
    """
    from libortho.checkpoint import save
    from libortho.data import calibration_blocks
    from libortho.data.corpora import check_source, load_corpus
    from libortho.models import load_model
    from libortho.pipeline import decompose

    out = Path(out)
    check_out_dir(out, overwrite)
    check_positive("n_calib", n_calib)
    check_positive("seq_len", seq_len, 2)
    if not calib_sources:
        raise ValueError("no calibration sources given")
    for src in calib_sources:
        check_source(src)
        if not any(d.strip() for d in load_corpus(src)):
            raise ValueError(f"calibration source {src} is empty: nothing to calibrate on")
    model, tok = load_model(model_spec, require_tokenizer=True)
    from libortho.runtime.behaviour import behaviour_sites

    if behaviour_sites(model):
        raise ValueError(f"{model_spec} carries a behaviour stream: decompose would drop it with the linears it "
                         "hooks; decompose the unedited checkpoint, then add the stream with `libortho ablate "
                         "OUT --stream`")
    calib = calibration_blocks(calib_sources, tok, n_blocks=n_calib, block_len=seq_len, seed=seed)
    result = decompose(model, calib, cfg, progress=progress)
    prov = {"source_model": model_spec, "calibration": {"sources": calib_sources, "n": n_calib,
                                                        "seq_len": seq_len, "seed": seed},
            "stats": result.stats}
    save(model, out, config=cfg.to_dict(), tokenizer=tok, provenance=prov, overwrite=overwrite)
    return {"out": str(out), **result.stats, **bits_summary(result.base, result.ortho)}


def bits_summary(base: dict, ortho: dict | None) -> dict[str, Any]:
    """Bits per quantized parameter of the base stream, the memory (ortho) streams of every form, and both.

    ``ortho_density`` counts sparse entries only (nnz / quantized params); ``memory_params`` counts every
    stored memory number (nnz, ``r (d_in + d_out)``, ``3 k d``), ``memory_kinds`` the streams per form.
    """
    from libortho.streams import memory_params

    memory = list((ortho or {}).values())
    params = sum(b.shape[0] * b.shape[1] for b in base.values())
    base_bytes = sum(b.nbytes for b in base.values())
    ortho_bytes = sum(o.nbytes for o in memory)
    nnz = sum(o.nnz for o in memory if o.kind == "sparse")
    kinds: dict[str, int] = {}
    for o in memory:
        kinds[o.kind] = kinds.get(o.kind, 0) + 1
    return {"quantized_params": params, "base_bits_per_param": 8 * base_bytes / params,
            "ortho_bits_per_param": 8 * ortho_bytes / params,
            "total_bits_per_param": 8 * (base_bytes + ortho_bytes) / params,
            "ortho_density": nnz / params, "memory_params": sum(memory_params(o) for o in memory),
            "memory_bytes": ortho_bytes, "memory_kinds": dict(sorted(kinds.items()))}


def check_behaviour_alpha(path: Path, behaviour_alpha: float) -> None:
    """Refuse alpha_b != 0 when the directory's behaviour stream is withheld (its tensors are missing)."""
    from libortho.behaviour_io import BEHAVIOUR_TENSORS, has_behaviour

    if not (math.isfinite(behaviour_alpha) and 0.0 <= behaviour_alpha <= 1.0):
        raise ValueError(f"behaviour alpha must be a number in [0, 1] (0 = unedited, 1 = edit applied), "
                         f"got {behaviour_alpha}")
    if behaviour_alpha != 0.0 and has_behaviour(path) and not (path / BEHAVIOUR_TENSORS).is_file():
        raise FileNotFoundError(f"{path / BEHAVIOUR_TENSORS} is missing (withheld): the behaviour stream runs only "
                                f"at alpha_b 0, not {behaviour_alpha:g}")


def load_checked(path: Path, alpha: float, behaviour_alpha: float = 1.0) -> tuple[Any, Any]:
    """(model at ``alpha`` and ``behaviour_alpha``, tokenizer) of a saved decomposition, after the checks.

    At alpha = 0 the ortho stream is not even read (the switch), so no "locked" warning is due; the
    behaviour stream (if the directory has one) is read only at alpha_b != 0.
    """
    from libortho.checkpoint import load

    path = Path(path)
    check_loadable(path, alpha)
    check_behaviour_alpha(path, behaviour_alpha)
    model, tok = load(path, alpha=alpha, load_ortho=alpha != 0.0, behaviour_alpha=behaviour_alpha,
                      load_behaviour=behaviour_alpha != 0.0)
    if tok is None:
        raise FileNotFoundError(f"{path} has no usable tokenizer (tokenizer files missing or unreadable)")
    return model, tok


def generate_text(path: Path, prompt: str, alpha: float, max_new_tokens: int = 40,
                  behaviour_alpha: float = 1.0) -> str:
    """Greedy continuation of ``prompt`` from a saved decomposition at ``alpha`` (and ``behaviour_alpha``)."""
    alpha = check_alpha(alpha)
    check_positive("max_new_tokens", max_new_tokens)
    if not prompt:
        raise ValueError("the prompt is empty: give some text to continue")
    model, tok = load_checked(Path(path), alpha, behaviour_alpha)
    return greedy(model, tok, prompt, max_new_tokens)


def greedy(model: torch.nn.Module, tok: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding with the model's own ``generate``; returns only the new text."""
    import torch

    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def perplexity_of(path: Path, alpha: float, text: str, n_blocks: int | None, seq_len: int,
                  seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Perplexity of a saved decomposition at ``alpha`` on a named corpus or on a user's own text.

    A named corpus (shakespeare, fortunes, python-docs) is scored on ``n_blocks`` (default 32) blocks
    sampled from its held-out split. A text file (or directory of .txt files) is the user's own
    data: it is scored whole, in order, as many blocks of ``seq_len`` as it holds plus the last
    partial block (when >= 2 tokens); ``n_blocks`` then keeps only the first blocks.
    ``tokens`` in the result counts the scored predictions (each block's first token has none).
    """
    from libortho.data.corpora import check_source, is_named_corpus, load_corpus

    alpha = check_alpha(alpha)
    check_positive("n_blocks", n_blocks)
    check_positive("seq_len", seq_len, 2)
    check_loadable(Path(path), alpha)
    check_source(text)
    docs = load_corpus(text)
    if not any(d.strip() for d in docs):
        raise ValueError(f"{text} is empty: nothing to score")
    model, tok = load_checked(Path(path), alpha)
    if is_named_corpus(text):
        return _corpus_perplexity(model, tok, docs, text, n_blocks or DEFAULT_EVAL_BLOCKS, seq_len, seed, progress)
    return _whole_text_perplexity(model, tok, docs, text, n_blocks, seq_len, progress)


def _corpus_perplexity(model: Any, tok: Any, docs: list[str], name: str, n_blocks: int, seq_len: int,
                       seed: int, progress: bool) -> dict[str, Any]:
    """Held-out-split perplexity of a named corpus (blocks sampled by ``seed``)."""
    from libortho.data import token_blocks
    from libortho.eval import perplexity

    blocks = token_blocks(docs, tok, block_len=seq_len, n_blocks=n_blocks, seed=seed, split="heldout")
    r = perplexity(model, blocks, progress=progress)
    return {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "text_tokens": int(blocks.numel()),
            "blocks": int(blocks.shape[0]), "tail_tokens": 0, "seq_len": seq_len, "source": name,
            "scope": f"{blocks.shape[0]} blocks of {seq_len} sampled from the held-out split of {name}"}


def _whole_text_perplexity(model: Any, tok: Any, docs: list[str], source: str, n_blocks: int | None,
                           seq_len: int, progress: bool) -> dict[str, Any]:
    """Perplexity over every token of a user's text: full blocks plus the last partial one."""
    from libortho.data.blocks import whole_text_blocks
    from libortho.eval import perplexity

    full, tail = whole_text_blocks(docs, tok, seq_len)
    capped = n_blocks is not None and (n_blocks < full.shape[0] or (n_blocks == full.shape[0] and tail is not None))
    if capped:
        full, tail = full[:n_blocks], None
    parts = [perplexity(model, b, progress=progress) for b in (full, tail) if b is not None and b.shape[0]]
    scored = sum(p.tokens for p in parts)
    nll = sum(p.nll * p.tokens for p in parts) / scored
    tail_len = 0 if tail is None else int(tail.shape[1])
    scope = f"{full.shape[0]} blocks of {seq_len}" + (f" + 1 of {tail_len}" if tail_len else "")
    scope += f" from {source}, in order" + (" (the first blocks only: --n-blocks)" if capped else ", the whole text")
    return {"ppl": math.exp(nll), "nll": nll, "tokens": scored, "text_tokens": int(full.numel()) + tail_len,
            "blocks": int(full.shape[0]), "tail_tokens": tail_len, "seq_len": seq_len, "source": source,
            "scope": scope}


def describe(path: Path) -> dict[str, Any]:
    """Per-layer shapes, bits and memory (nnz and density for sparse) of a saved decomposition, plus totals.

    Linear-site memory shows in the layer rows (``memory_kind``, ``memory_params``); ``mlp_memory`` lists
    the mlp-site streams (neurons), which belong to no linear layer.
    """
    read_manifest_json(Path(path))  # the fast refusals first, before torch is imported
    from libortho.io import read_decomposition
    from libortho.runtime.kernels import native
    from libortho.runtime.kernels.cpu import int4pack_choice
    from libortho.streams import memory_params

    dec = read_decomposition(path, load_ortho=True, verify=True)
    rows = []
    fallbacks: dict[str, str] = {}
    for name, b in dec.base.items():
        o = dec.ortho.get(name) if dec.ortho is not None else None
        sparse = o is not None and o.kind == "sparse"
        served, note = int4pack_choice(b)
        kernel = "int4pack" if served is not None else ("dense-bfloat16" if note.startswith("format") else "dense-fp32")
        if served is None:
            fallbacks[name] = note
        rows.append({"name": name, "shape": list(b.shape), "bits": b.bits, "group_size": b.group_size,
                     "kernel": kernel,
                     "nnz": o.nnz if sparse else 0, "density": o.density if sparse else 0.0,
                     "memory_kind": None if o is None else o.kind,
                     "memory_params": 0 if o is None else memory_params(o)})
    mlp_memory = [{"name": n, "kind": o.kind, "params": memory_params(o), "bytes": o.nbytes}
                  for n, o in (dec.ortho or {}).items() if o.site == "mlp"]
    rest_params = sum(t.numel() for t in dec.rest.values())
    files = {k: v.get("size") for k, v in dec.manifest.get("files", {}).items()}
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["kernel"]] = counts.get(r["kernel"], 0) + 1
    from libortho.behaviour_io import read_behaviour

    beh = read_behaviour(path, load=False)
    behaviour = None if beh is None else {"sites": len(beh.sites), "withheld": not (Path(path) / beh.manifest[
        "file"]["name"]).is_file(), "strengths": sorted({s["strength"] for s in beh.manifest["sites"].values()})}
    return {"path": str(path), "layers": rows, "mlp_memory": mlp_memory, "ortho_loaded": dec.ortho is not None,
            "behaviour": behaviour,
            "kernels": dict(sorted(counts.items())), "kernel_fallbacks": len(fallbacks),
            "kernel_fallback_reasons": sorted(set(fallbacks.values())),
            "sparse_decode_kernel": "native-csr" if native.library() is not None else f"mkl-csr ({native.status()})",
            "missing_files": list(dec.missing_files), "rest_params": rest_params, "file_bytes": files,
            **bits_summary(dec.base, dec.ortho)}


def run_demo(model_spec: str, out: Path, console: Console, overwrite: bool = False, n_calib: int = 32,
             seq_len: int = 256, n_eval: int = 16) -> dict[str, Any]:
    """Decompose the default model quickly, then show perplexity and text at alpha 0 and 1.

    ``out`` must be new or empty unless ``overwrite``: the demo never replaces a directory it was
    not told it may replace.
    """
    from libortho.checkpoint import load
    from libortho.config import DecomposeConfig, QuantConfig, SelectConfig
    from libortho.data import load_corpus, token_blocks
    from libortho.eval import perplexity
    from libortho.models import load_model
    from libortho.runtime import set_alpha

    out = Path(out)
    check_out_dir(out, overwrite)
    cfg = DecomposeConfig(quant=QuantConfig(bits=4, group_size=64), select=SelectConfig(rho=0.01))
    t0 = time.perf_counter()
    fp_model, tok = load_model(model_spec, require_tokenizer=True)
    eval_blocks = token_blocks(load_corpus("shakespeare"), tok, block_len=seq_len, n_blocks=n_eval,
                               seed=1, split="heldout")
    rows = {"fp32": perplexity(fp_model, eval_blocks, progress=True, desc="ppl fp32").ppl}
    del fp_model
    summary = decompose_and_save(model_spec, out, cfg, ["shakespeare"], n_calib, seq_len, overwrite=overwrite)
    model, tok = load(out, alpha=1.0)
    prompt, texts = "To be, or not to be,", {}
    for alpha in (1.0, 0.0):
        set_alpha(model, alpha)
        rows[f"alpha={alpha:g}"] = perplexity(model, eval_blocks, progress=True, desc=f"ppl a={alpha:g}").ppl
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
