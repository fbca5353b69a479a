"""Loading causal LMs from local files only: the SmolLM2 cache, a tiny test model, HF dirs, GGUF."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from libortho.models.assets import ensure_smollm2, strip_gguf_quantizer
from libortho.models.tiny import ByteTokenizer, build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ALIASES = ("smollm2-135m", "smollm2", "tiny")


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for ``smollm2-135m``, ``tiny``, a local HF directory or a ``.gguf`` file."""
    name = str(spec)
    if name in ("smollm2-135m", "smollm2"):
        path: Path = ensure_smollm2()
    elif name == "tiny":
        return build_tiny_llama().to(dtype), ByteTokenizer()
    else:
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"model {name!r} not found: give {', '.join(ALIASES)}, a local directory "
                                    "or a .gguf file (nothing is downloaded from a hub)")
    kw: dict[str, Any] = {"local_files_only": True}
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; give a HF model directory or a GGUF file")
        path, kw["gguf_file"] = path.parent, path.name
    elif not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except ValueError as err:
        raise ValueError(f"{path} does not hold a causal language model: {err}") from err
    if (path / ByteTokenizer.FILE).exists():
        tok: Any = ByteTokenizer()
    else:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    if "gguf_file" in kw:
        strip_gguf_quantizer(model)  # dequantized on load: plain fp32 from here on
    return model.eval(), tok
