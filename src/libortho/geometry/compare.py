"""Compare two models' geometry: per-layer update spectra and the loss path between them.

``libortho geometry A B`` (the CLI) reads two models (a Hugging Face directory, a named model, or a
saved decomposition at a chosen alpha, read through its dense weights ``Q + alpha M``), then reports
for every decoder linear the update ``ΔW = W_b - W_a``: its relative size, its singular values,
its stable rank ``||ΔW||_F^2 / ||ΔW||_2^2`` and the rank that holds a given share of its energy;
and, when text is given, the linear-mode-connectivity curve and barrier between the two.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from libortho.geometry.spectra import singular_values
from libortho.models.layers import find_linears


def dense_weights(model: nn.Module, alpha: float = 1.0, skip: tuple[str, ...] = ("lm_head",)
                  ) -> dict[str, torch.Tensor]:
    """Every decoder linear's dense weight; a dual-stream layer gives ``Q + alpha * M``."""
    from libortho.runtime.linear import OrthoLinear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, OrthoLinear):
            W = mod.base_stream.dequantize(torch.float32)
            if mod.ortho_stream is not None and alpha != 0:
                W = W + alpha * mod.ortho_stream.to_dense(torch.float32)
            out[name] = W
    if out:
        return out
    return {n: lin.weight.detach().float() for n, lin in find_linears(model, skip).items()}


def dense_model(model: nn.Module, alpha: float = 1.0) -> nn.Module:
    """A plain fp32 model with the weights :func:`dense_weights` reads (for loss paths)."""
    from libortho.assemble import dequantized
    from libortho.runtime.linear import OrthoLinear

    if not any(isinstance(m, OrthoLinear) for m in model.modules()):
        return copy.deepcopy(model).float().eval()
    weights = dense_weights(model, alpha)
    out = dequantized(model).eval()
    mods = dict(out.named_modules())
    with torch.no_grad():
        for n, W in weights.items():
            mods[n].weight.copy_(W)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def update_stats(dW: torch.Tensor, W_ref: torch.Tensor, energy: float = 0.9, top: int = 8) -> dict[str, Any]:
    """Relative size, singular values (top ``top``), stable rank and rank at ``energy`` of one update."""
    s = singular_values(dW)
    e = s**2
    total = float(e.sum())
    if total == 0:
        return {"rel_change": 0.0, "top_singular_values": [], "stable_rank": 0.0, "rank_at_energy": 0}
    k = int(torch.searchsorted(torch.cumsum(e, 0) / total, torch.tensor(energy, dtype=e.dtype) - 1e-12)) + 1
    return {"rel_change": float(dW.double().norm() / W_ref.double().norm().clamp_min(1e-30)),
            "top_singular_values": s[:top].tolist(), "stable_rank": total / float(e[0]), "rank_at_energy": k}


def compare_weights(Wa: dict[str, torch.Tensor], Wb: dict[str, torch.Tensor], energy: float = 0.9
                    ) -> dict[str, Any]:
    """:func:`update_stats` of ``Wb - Wa`` per layer and pooled (norms over all layers)."""
    if set(Wa) != set(Wb):
        diff = sorted(set(Wa) ^ set(Wb))[:3]
        raise ValueError(f"the two models have different linear layers (e.g. {diff})")
    layers = {}
    num = den = 0.0
    for n in sorted(Wa):
        if Wa[n].shape != Wb[n].shape:
            raise ValueError(f"{n}: shapes differ, {tuple(Wa[n].shape)} vs {tuple(Wb[n].shape)}")
        dW = Wb[n].double() - Wa[n].double()
        layers[n] = update_stats(dW, Wa[n], energy)
        num += float(dW.norm() ** 2)
        den += float(Wa[n].double().norm() ** 2)
    return {"energy": energy, "layers": layers, "rel_change": (num / max(den, 1e-300)) ** 0.5,
            "mean_stable_rank": sum(v["stable_rank"] for v in layers.values()) / len(layers)}


def load_dense(spec: str, alpha: float = 1.0) -> tuple[nn.Module, Any]:
    """(dense fp32 model, tokenizer or None) for a named model, an HF directory or a saved decomposition."""
    p = Path(spec)
    if (p / "libortho.json").exists():
        from libortho.checkpoint import load

        model, tok = load(p, alpha=alpha)
        return dense_model(model, alpha), tok
    from libortho.models import load_model

    model, tok = load_model(spec)
    return model.eval(), tok


def plot_geometry(result: dict[str, Any], out: Path, layers: int = 6) -> Path:
    """Singular-value spectra of a few layers' updates and, when measured, the loss path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from libortho.atomic import atomic_write_file

    has_lmc = "lmc" in result
    fig, axes = plt.subplots(1, 2 if has_lmc else 1, figsize=(11 if has_lmc else 6, 4))
    ax = axes[0] if has_lmc else axes
    names = sorted(result["weights"]["layers"], key=lambda n: -result["weights"]["layers"][n]["rel_change"])
    for n in names[:layers]:
        sv = result["weights"]["layers"][n]["top_singular_values"]
        if sv:
            ax.semilogy(range(1, len(sv) + 1), sv, "o-", label=n, ms=3)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value of ΔW")
    ax.set_title("largest updates: spectra")
    ax.legend(fontsize=6)
    if has_lmc:
        c = result["lmc"]
        axes[1].plot(c["ts"], c["losses"], "o-")
        axes[1].plot([0, 1], [c["losses"][0], c["losses"][-1]], "--", color="grey")
        axes[1].set_xlabel("t (0 = A, 1 = B)")
        axes[1].set_ylabel("mean token NLL")
        axes[1].set_title(f"loss path, barrier {c['barrier']:.4f}")
    fig.tight_layout()
    atomic_write_file(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), suffix=".png")
    plt.close(fig)
    return out


def run_geometry(a: str, b: str, out: Path, alpha_a: float = 1.0, alpha_b: float = 1.0, text: str | None = None,
                 n_blocks: int = 4, seq_len: int = 256, points: int = 11, energy: float = 0.9) -> dict[str, Any]:
    """Load A and B, compare their linears, optionally walk the loss path on ``text``; write JSON + PNG in ``out``."""
    from libortho.atomic import atomic_write_json
    from libortho.geometry.lmc import lmc_curve
    from libortho.workflows import check_alpha

    check_alpha(alpha_a)
    check_alpha(alpha_b)
    if points < 3:
        raise ValueError(f"--points must be >= 3, got {points}")
    if not 0 < energy <= 1:
        raise ValueError(f"--energy must be in (0, 1], got {energy}")
    for spec in (a, b):
        if ("/" in spec or spec.startswith(".")) and not Path(spec).exists():
            raise FileNotFoundError(f"no model at {spec}")
    ma, tok_a = load_dense(a, alpha_a)
    mb, tok_b = load_dense(b, alpha_b)
    result: dict[str, Any] = {"a": {"spec": a, "alpha": alpha_a}, "b": {"spec": b, "alpha": alpha_b},
                              "weights": compare_weights(dense_weights(ma), dense_weights(mb), energy)}
    if text:
        from libortho.data import load_corpus, token_blocks
        from libortho.eval import perplexity

        tok = tok_a or tok_b
        if tok is None:
            raise ValueError("neither model has a tokenizer: the loss path needs one")
        blocks = token_blocks(load_corpus(text), tok, block_len=seq_len, n_blocks=n_blocks, seed=1, split="heldout")
        curve = lmc_curve(ma, mb, lambda m: perplexity(m, blocks, batch_size=4, progress=False).nll, points)
        result["lmc"] = {"text": text, "n_blocks": n_blocks, "seq_len": seq_len, "ts": curve.ts,
                         "losses": curve.losses, "barrier": curve.barrier}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "geometry.json", result)
    plot_geometry(result, out / "geometry.png")
    return result
