"""Finding the decoder blocks and linear layers of Hugging Face causal LMs."""

from __future__ import annotations

from torch import nn

BLOCK_PATHS = ("model.layers", "model.decoder.layers", "gpt_neox.layers", "transformer.h", "transformer.blocks")


class UnsupportedModelError(ValueError):
    """The model's architecture or layer types are not supported, with what to do about it."""


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks in data-flow order (Llama/Qwen2/Mistral/Gemma, OPT, NeoX, GPT-2 style)."""
    for path in BLOCK_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod):
            return list(mod)
    raise UnsupportedModelError(
        f"cannot find the decoder blocks of {type(model).__name__}: looked for {', '.join(BLOCK_PATHS)}")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's ``nn.Linear`` layers by relative name, in registration (data-flow) order.

    GPT-2 style ``Conv1D`` layers (transposed weights) are refused rather than silently skipped.
    """
    conv1d = _conv1d_type()
    out: dict[str, nn.Linear] = {}
    for name, mod in block.named_modules():
        if conv1d is not None and isinstance(mod, conv1d):
            raise UnsupportedModelError(
                f"layer {name!r} is a transformers Conv1D (GPT-2 style, weight stored transposed); "
                "libortho decomposes nn.Linear layers only: convert it to nn.Linear first")
        if isinstance(mod, nn.Linear):
            out[name] = mod
    return out


def find_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Linear]:
    """Every decoder-block linear by qualified name, skipping names containing a ``skip`` substring."""
    prefixes = {id(m): n for n, m in model.named_modules()}
    out: dict[str, nn.Linear] = {}
    for block in decoder_blocks(model):
        for name, lin in block_linears(block).items():
            full = f"{prefixes[id(block)]}.{name}"
            if not any(s in full for s in skip):
                out[full] = lin
    return out
