"""A compiled sparse accumulate for decode: ``y += alpha * x @ W_ortho^T`` in one C call.

At one token, MKL's CSR product costs 20-40 us per call, as much as the INT4 base kernel itself, and
the torch ops around it (casts, the add) cost as much again: the ortho stream cannot stay within 10%
of the base that way. This module compiles a plain C loop over the CSR rows (fp32 accumulation,
bf16 or fp32 activations and outputs, bf16 rounded to nearest even like torch) with the system C
compiler the first time it is needed, caches the shared object under
``~/.cache/libortho/kernels`` (keyed by the source and the compiler), and calls it through ctypes:
about 2 us of overhead and no extra tensors. Without a compiler, or if the build fails, the
runtime keeps the MKL path and says so (:func:`status`).

The kernel is single-threaded: it serves up to :data:`MAX_TOKENS` tokens; above that MKL's
threaded product is faster (bench/kernel_crossover.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_TOKENS = 16
CACHE_ENV = "LIBORTHO_KERNEL_CACHE"
DISABLE_ENV = "LIBORTHO_NO_NATIVE"

SOURCE = r"""
#include <stdint.h>
#include <string.h>

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f2bf(float f) {  /* round to nearest even; NaN becomes torch's canonical 0x7fc0 */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* y[t, r] += alpha * sum_k val[k] * x[t, col[k]] over row r's entries k of a CSR (d_out rows).
   x: (T, d_in) row-major, bf16 if x_bf16 else fp32; y: (T, d_out) row-major, bf16 if y_bf16 else fp32. */
void ortho_csr_addmv(int64_t T, int64_t d_out, int64_t d_in, const int32_t *crow, const int32_t *col,
                     const float *val, const void *x, int x_bf16, void *y, int y_bf16, float alpha) {
    for (int64_t t = 0; t < T; ++t) {
        const uint16_t *xb = (const uint16_t *)x + t * d_in;
        const float *xf = (const float *)x + t * d_in;
        uint16_t *yb = (uint16_t *)y + t * d_out;
        float *yf = (float *)y + t * d_out;
        for (int64_t r = 0; r < d_out; ++r) {
            float acc = 0.0f;
            int32_t k0 = crow[r], k1 = crow[r + 1];
            if (k0 == k1) continue;
            if (x_bf16) for (int32_t k = k0; k < k1; ++k) acc += val[k] * bf2f(xb[col[k]]);
            else for (int32_t k = k0; k < k1; ++k) acc += val[k] * xf[col[k]];
            if (y_bf16) yb[r] = f2bf(bf2f(yb[r]) + alpha * acc);
            else yf[r] = yf[r] + alpha * acc;
        }
    }
}
"""

_lib: ctypes.CDLL | None = None
_tried = False
_reason = "not built yet"


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "libortho" / "kernels"))


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    flags = ["-O3", "-shared", "-fPIC", "-std=c99", "-fno-strict-aliasing"]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\n".join([SOURCE, cc, version, *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"ortho_csr_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "ortho_csr.c", Path(tmp) / "ortho_csr.so"
            src.write_text(SOURCE)
            proc = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                raise RuntimeError(f"{cc} failed: {why}")
            os.replace(out, target)  # atomic: a concurrent builder never loads a half-written file
    lib = ctypes.CDLL(str(target))
    fn = lib.ortho_csr_addmv
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, i64, i64, vp, vp, vp, vp, ctypes.c_int, vp, ctypes.c_int, ctypes.c_float]
    fn.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call), or None where it cannot be built or is disabled."""
    global _lib, _tried, _reason
    if not _tried:
        _tried = True
        if os.environ.get(DISABLE_ENV):
            _reason = f"disabled by {DISABLE_ENV}"
        else:
            try:
                _lib = _build()
                _reason = "ok"
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _reason = f"build failed: {e}"
                log.warning("libortho: compiled sparse kernel unavailable (%s); decode uses MKL CSR", e)
    return _lib


def status() -> str:
    """``ok`` when the compiled kernel is in use, else why not (after :func:`library` was asked)."""
    library()
    return _reason


class CsrKernel:
    """A CSR memory stream held for the compiled kernel: contiguous int32 indices, fp32 values."""

    __slots__ = ("crow", "col", "val", "d_out", "d_in")

    def __init__(self, csr: torch.Tensor) -> None:
        if csr.layout != torch.sparse_csr or csr.dtype != torch.float32:
            raise ValueError(f"CsrKernel needs an fp32 sparse CSR tensor, got {csr.layout} {csr.dtype}")
        self.crow = csr.crow_indices().to(torch.int32).contiguous()
        self.col = csr.col_indices().to(torch.int32).contiguous()
        self.val = csr.values().contiguous()
        self.d_out, self.d_in = csr.shape

    def addmm_(self, y: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """``y += alpha * x @ W^T`` in place, for contiguous ``x (..., d_in)``, ``y (..., d_out)`` of
        bf16 or fp32 and at most :data:`MAX_TOKENS` rows; returns ``y``. Callers check :func:`usable`."""
        T = y.numel() // self.d_out
        lib = _lib
        assert lib is not None
        lib.ortho_csr_addmv(T, self.d_out, self.d_in, self.crow.data_ptr(), self.col.data_ptr(), self.val.data_ptr(),
                            x.data_ptr(), x.dtype == torch.bfloat16,
                            y.data_ptr(), y.dtype == torch.bfloat16, alpha)
        return y


_DTYPES = (torch.bfloat16, torch.float32)


def usable(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the compiled kernel can serve this call (library built, small CPU contiguous bf16/fp32)."""
    return (_lib is not None and x.dtype in _DTYPES and y.dtype in _DTYPES and x.device.type == "cpu"
            and x.numel() // x.shape[-1] <= MAX_TOKENS and x.is_contiguous() and y.is_contiguous()
            and not (x.requires_grad or y.requires_grad))


__all__ = ["MAX_TOKENS", "CsrKernel", "library", "status", "usable"]
