"""Finding the decoder blocks and linear layers of Hugging Face causal LMs.

Supported layouts: Llama/Qwen2/Mistral/Gemma/Phi-3 (``model.layers``), OPT (``model.decoder.layers``),
GPT-NeoX/Pythia (``gpt_neox.layers``), GPT-2/GPT-J/Falcon/BLOOM (``transformer.h``), MPT
(``transformer.blocks``). Only ``nn.Linear`` layers are decomposed: GPT-2's ``Conv1D`` (weight
stored transposed) is refused with an error that says what to do.
"""

from __future__ import annotations

from torch import nn

BLOCK_PATHS = ("model.layers", "model.decoder.layers", "model.language_model.layers", "gpt_neox.layers",
               "transformer.h", "transformer.blocks", "transformer.layers")


class UnsupportedModelError(ValueError):
    """The model's architecture or layer types are not supported, with what to do about it."""


def _conv1d_type() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` when transformers provides it."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def refuse_conv1d(module: nn.Module, prefix: str = "") -> None:
    """Raise :class:`UnsupportedModelError` naming the first GPT-2 style ``Conv1D`` inside ``module``."""
    conv1d = _conv1d_type()
    if conv1d is None:  # pragma: no cover
        return
    for name, mod in module.named_modules():
        if isinstance(mod, conv1d):
            full = ".".join(p for p in (prefix, name) if p) or type(module).__name__
            raise UnsupportedModelError(
                f"layer {full!r} is a transformers Conv1D (GPT-2 style, weight stored transposed as "
                "(in_features, out_features)); libortho decomposes nn.Linear layers only: convert it first, "
                "e.g. nn.Linear(w.shape[0], w.shape[1]) with weight = conv.weight.T and bias = conv.bias")


def _find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and ``ModuleList`` of the decoder blocks."""
    for path in BLOCK_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod):
            return path, mod
    raise UnsupportedModelError(
        f"cannot find the decoder blocks of {type(model).__name__}: looked for {', '.join(BLOCK_PATHS)} "
        "(Llama/Qwen2/Mistral/Gemma, OPT, GPT-NeoX and GPT-2 style layouts are supported)")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks in data-flow order (Llama/Qwen2/Mistral/Gemma, OPT, NeoX, GPT-2 style)."""
    return list(_find_block_list(model)[1])


def block_prefix(model: nn.Module) -> str:
    """Qualified name of the blocks' ``ModuleList`` (``model.layers`` for Llama), block i is ``{prefix}.{i}``."""
    return _find_block_list(model)[0]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's ``nn.Linear`` layers by relative name, in registration order.

    Hugging Face blocks register attention (q, k, v, o) before the MLP (gate, up, down), so this
    is the order the data flows. GPT-2 style ``Conv1D`` layers are refused rather than skipped.
    """
    refuse_conv1d(block)
    return {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}


def block_linear_names(model: nn.Module) -> list[str]:
    """Full module names of every decoder block's linears, block by block (what the INT4 base quantizes)."""
    prefix = block_prefix(model)
    return [f"{prefix}.{i}.{rel}" for i, b in enumerate(decoder_blocks(model)) for rel in block_linears(b)]


def find_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of the model by qualified name, except names containing a ``skip`` substring."""
    refuse_conv1d(model)
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and not any(s in name for s in skip)}
