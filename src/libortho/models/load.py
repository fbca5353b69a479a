"""Loading causal LMs from local files only: the SmolLM2 cache, a tiny test model, HF dirs, GGUF."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from libortho.models.assets import ensure_smollm2, strip_gguf_quantizer
from libortho.models.tiny import ByteTokenizer, build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger(__name__)
SMOLLM2_ALIASES = ("smollm2-135m", "smollm2", "smollm2-135m-instruct")
ALIASES = (*SMOLLM2_ALIASES, "tiny")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def resolve_spec(spec: str | Path) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a model alias, a local HF directory or a ``.gguf`` file."""
    name = str(spec)
    if name in SMOLLM2_ALIASES:
        return ensure_smollm2(), None
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {name!r} not found: give one of {', '.join(ALIASES)}, a local Hugging Face "
                                "directory or a .gguf file (nothing is downloaded from a hub)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf: give a Hugging Face model directory or a GGUF file")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found: {path} is not a Hugging Face model directory")
    return path, None


def has_tokenizer_files(path: str | Path) -> bool:
    """Whether a directory holds tokenizer files we know how to load (checked without loading them)."""
    path = Path(path)
    return (path / ByteTokenizer.FILE).is_file() or any((path / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, gguf_file: str | None = None) -> Any:
    """The tokenizer stored in a model or decomposition directory, or None (with a warning) when there is none.

    The one tokenizer loader of the package: model directories and saved decompositions both use it.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if (path / ByteTokenizer.FILE).is_file():
        return ByteTokenizer.from_pretrained(path)
    if gguf_file is None and not has_tokenizer_files(path):
        log.warning("no tokenizer files in %s: returning tokenizer None", path)
        return None
    kw: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, KeyError) as err:
        log.warning("tokenizer of %s could not be loaded (%s): returning tokenizer None", path, err)
        return None


def _load_causal_lm(path: Path, gguf_file: str | None, dtype: torch.dtype) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` from local files, with errors that name the path."""
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    where = path / gguf_file if gguf_file else path
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err) or "AutoModelForCausalLM" in str(err):
            raise ValueError(f"{where} does not hold a causal language model: {err}") from err
        raise ValueError(f"{where} could not be loaded as a causal language model: {err}") from err
    except OSError as err:
        raise FileNotFoundError(f"{where}: model weights could not be read ({err})") from err
    if gguf_file is not None:
        strip_gguf_quantizer(model)  # dequantized on load: plain fp32 from here on
    else:
        _own_memory(model, path)
    return model


def _own_memory(model: nn.Module, path: Path) -> None:
    """Move weights that ``from_pretrained`` left memory-mapped from the checkpoint into the process's memory.

    Mapped pages, once read, stay resident for the life of the mapping, and the mapping lives as long
    as any tensor in the file: decomposing a model that reads every weight once and then replaces it
    would keep the whole checkpoint resident (measured on SmolLM2: +540 MB of peak RSS). Read into
    ordinary memory, a replaced weight is freed and its memory reused.
    """
    from safetensors.torch import load as load_bytes

    files = sorted(f for f in path.glob("*.safetensors") if f.name != "behaviour.safetensors")
    if len(files) != 1:
        return  # sharded or non-safetensors checkpoints: left as transformers loaded them
    state = load_bytes(files[0].read_bytes())
    own = model.state_dict()
    if any(k not in own or own[k].shape != v.shape or own[k].dtype != v.dtype for k, v in state.items()):
        return  # another dtype or layout than the file: from_pretrained already made its own copies
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32,
               require_tokenizer: bool = False) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer or None) for ``smollm2-135m``, ``tiny``, a HF directory or a ``.gguf``.

    ``require_tokenizer``: refuse a directory without tokenizer files *before* reading its weights,
    and a tokenizer that does not load (callers that tokenize text need one).
    """
    if str(spec) == "tiny":
        return build_tiny_llama().to(dtype).eval(), ByteTokenizer()
    path, gguf_file = resolve_spec(spec)
    if require_tokenizer and gguf_file is None and not has_tokenizer_files(path):
        raise FileNotFoundError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                                "copy the model's tokenizer into it")
    model = _load_causal_lm(path, gguf_file, dtype)
    if gguf_file is None:
        from libortho.behaviour_io import attach_saved_behaviour

        if attach_saved_behaviour(model, path):  # an ablation kept as a stream beside the weights
            log.info("%s: behaviour stream attached (alpha_b = 1 unless withheld)", path)
    tok = load_tokenizer(path, gguf_file)
    if require_tokenizer and tok is None:
        raise ValueError(f"the tokenizer in {path} could not be loaded (see the warning above)")
    return model.eval(), tok
