"""A compiled sparse accumulate for decode: ``y += alpha * x @ W_ortho^T`` in one C call.

At one token, MKL's CSR product costs 20-40 us per call, as much as the INT4 base kernel itself, and
the torch ops around it (casts, the add) cost as much again: the ortho stream cannot stay within 10%
of the base that way. This module compiles a plain C loop over the CSR rows (fp32 accumulation,
bf16 or fp32 activations and outputs, bf16 rounded to nearest even like torch) with the system C
compiler the first time it is needed, caches the shared object under
``~/.cache/libortho/kernels`` (keyed by the source, the compiler and, for the extension, the
interpreter), and calls it as a CPython extension function (about 0.1 us per call; where Python's
headers are missing, through ctypes, about 1.5 us) with no extra tensors. Without a compiler, or if
the build fails, the runtime keeps the MKL path and says so (:func:`status`, ``libortho info``).

The kernel is single-threaded: it serves up to :data:`MAX_TOKENS` tokens (decode and short
prompts; a conservative bound, not a measured crossover), above that MKL's threaded product does.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from libortho.atomic import atomic_write_file

log = logging.getLogger(__name__)

MAX_TOKENS = 16
CACHE_ENV = "LIBORTHO_KERNEL_CACHE"
DISABLE_ENV = "LIBORTHO_NO_NATIVE"

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f2bf(float f) {  /* round to nearest even; NaN becomes torch's canonical 0x7fc0 */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* y[t, r] += alpha * sum_k val[k] * x[t, col[k]] over row r's entries k of a CSR (d_out rows).
   x: (T, d_in) row-major, bf16 if x_bf16 else fp32; y: (T, d_out) row-major, bf16 if y_bf16 else fp32.
   A bf16 token is widened to fp32 once into per-call scratch (stack up to 16k inputs, else heap: no
   state shared between calls or threads); each row sums into four partial accumulators, so its
   additions do not wait on one another. Returns 0, or -1 if scratch memory could not be had. */
int ortho_csr_addmv(int64_t T, int64_t d_out, int64_t d_in, const int32_t *crow, const int32_t *col,
                    const float *val, const void *x, int x_bf16, void *y, int y_bf16, float alpha) {
    float stack[x_bf16 && d_in <= 16384 ? d_in : 1];
    float *xs = stack;
    if (x_bf16 && d_in > 16384 && !(xs = (float *)malloc(sizeof(float) * (size_t)d_in))) return -1;
    for (int64_t t = 0; t < T; ++t) {
        const float *xf = (const float *)x + t * d_in;
        if (x_bf16) {
            const uint16_t *xb = (const uint16_t *)x + t * d_in;
            for (int64_t j = 0; j < d_in; ++j) xs[j] = bf2f(xb[j]);
            xf = xs;
        }
        uint16_t *yb = (uint16_t *)y + t * d_out;
        float *yf = (float *)y + t * d_out;
        for (int64_t r = 0; r < d_out; ++r) {
            int32_t k = crow[r], k1 = crow[r + 1];
            if (k == k1) continue;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
            for (; k + 4 <= k1; k += 4) {
                a0 += val[k] * xf[col[k]];
                a1 += val[k + 1] * xf[col[k + 1]];
                a2 += val[k + 2] * xf[col[k + 2]];
                a3 += val[k + 3] * xf[col[k + 3]];
            }
            for (; k < k1; ++k) a0 += val[k] * xf[col[k]];
            float acc = (a0 + a1) + (a2 + a3);
            if (y_bf16) yb[r] = f2bf(bf2f(yb[r]) + alpha * acc);
            else yf[r] = yf[r] + alpha * acc;
        }
    }
    if (xs != stack) free(xs);
    return 0;
}
"""

# The CPython entry point (METH_FASTCALL: ~0.1 us per call) over the same kernel; built where Python's
# headers are installed, else the kernel is called through ctypes (~1.5 us per call).
PY_WRAPPER = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *py_addmv(PyObject *self, PyObject *const *a, Py_ssize_t n) {
    (void)self;
    if (n != 11) { PyErr_SetString(PyExc_TypeError, "addmv takes 11 arguments"); return NULL; }
    int64_t T = PyLong_AsLongLong(a[0]), d_out = PyLong_AsLongLong(a[1]), d_in = PyLong_AsLongLong(a[2]);
    void *crow = PyLong_AsVoidPtr(a[3]), *col = PyLong_AsVoidPtr(a[4]), *val = PyLong_AsVoidPtr(a[5]);
    void *x = PyLong_AsVoidPtr(a[6]), *y = PyLong_AsVoidPtr(a[8]);
    int xb = PyObject_IsTrue(a[7]), yb = PyObject_IsTrue(a[9]);
    float alpha = (float)PyFloat_AsDouble(a[10]);
    if (PyErr_Occurred()) return NULL;
    int rc = ortho_csr_addmv(T, d_out, d_in, crow, col, val, x, xb, y, yb, alpha);
    return PyLong_FromLong(rc);
}

static PyMethodDef methods[] = {
    {"addmv", (PyCFunction)(void (*)(void))py_addmv, METH_FASTCALL, "y += alpha * x @ W^T over a CSR"},
    {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_libortho_csr", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__libortho_csr(void) { return PyModule_Create(&module); }
"""

ABI_ENV = "LIBORTHO_NATIVE_ABI"  # "ctypes" forces the ctypes entry point (tests cover both)

_lib: Any = None  # the loaded extension module or shared library
_fn: Callable[..., int] | None = None  # its addmv entry point
_BF16 = torch.bfloat16
_tried = False
_reason = "not built yet"


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "libortho" / "kernels"))


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compile(cc: str, source: str, flags: list[str], stem: str, suffix: str) -> Path:
    """Compile ``source`` once per (source, compiler, flags) into the cache; the path of the shared object."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\n".join([source, cc, version, *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{stem}_{key}{suffix}"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{stem}.c"
        src.write_text(source)

        def build(out: Path) -> None:
            proc = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                raise RuntimeError(f"{cc} failed: {why}")

        atomic_write_file(target, build, suffix=suffix)  # a concurrent builder never loads a half-written file
    return target


def _build() -> tuple[Any, Callable[..., int], str]:
    """(loaded object, addmv entry point, which entry point) for this interpreter."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    # no fused multiply-adds: the sums round like the reference's separate multiply and add
    flags = ["-O3", "-shared", "-fPIC", "-std=c99", "-fno-strict-aliasing", "-ffp-contract=off"]
    include = sysconfig.get_paths().get("include")
    if os.environ.get(ABI_ENV) != "ctypes" and include and (Path(include) / "Python.h").exists():
        try:
            suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
            path = _compile(cc, SOURCE + PY_WRAPPER, [*flags, f"-I{include}"], "_libortho_csr", suffix)
            spec = importlib.util.spec_from_file_location("_libortho_csr", path)
            if spec is None or spec.loader is None:
                raise RuntimeError(f"cannot load {path}")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod, mod.addmv, "python-extension"
        except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:
            log.info("libortho: CPython entry point not built (%s); trying ctypes", e)
    lib = ctypes.CDLL(str(_compile(cc, SOURCE, flags, "ortho_csr", ".so")))
    fn = lib.ortho_csr_addmv
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, i64, i64, vp, vp, vp, vp, ctypes.c_int, vp, ctypes.c_int, ctypes.c_float]
    fn.restype = ctypes.c_int
    return lib, fn, "ctypes"


def library() -> Any:
    """The compiled kernel (built on first call), or None where it cannot be built or is disabled."""
    global _lib, _fn, _tried, _reason
    if not _tried:
        _tried = True
        if os.environ.get(DISABLE_ENV):
            _reason = f"disabled by {DISABLE_ENV}"
        else:
            try:
                _lib, _fn, how = _build()
                _reason = f"ok ({how})"
            except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:
                _reason = f"build failed: {e}"
                log.warning("libortho: compiled sparse kernel unavailable (%s); decode uses MKL CSR", e)
    return _lib


def status() -> str:
    """``ok (python-extension)`` or ``ok (ctypes)`` when the compiled kernel is in use, else why not."""
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

    def __deepcopy__(self, memo: dict) -> CsrKernel:
        dense = torch.sparse_csr_tensor(self.crow.clone(), self.col.clone(), self.val.clone(), (self.d_out, self.d_in))
        return CsrKernel(dense)

    def addmm_(self, y: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """``y += alpha * x @ W^T`` in place, for contiguous ``x (..., d_in)``, ``y (..., d_out)`` of
        bf16 or fp32 and at most :data:`MAX_TOKENS` rows; returns ``y``. Callers check :func:`usable`."""
        # pointers are read at every call (never cached): a copied, pickled or moved kernel stays safe
        if _fn(y.numel() // self.d_out, self.d_out, self.d_in, self.crow.data_ptr(), self.col.data_ptr(),
               self.val.data_ptr(), x.data_ptr(), x.dtype == _BF16, y.data_ptr(), y.dtype == _BF16, alpha):
            raise MemoryError("ortho_csr_addmv: no scratch memory for the widened input")
        return y


_DTYPES = (torch.bfloat16, torch.float32)


def usable(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the compiled kernel can serve this call (library built, small CPU contiguous bf16/fp32)."""
    return (_lib is not None and x.dtype in _DTYPES and y.dtype in _DTYPES and x.device.type == "cpu"
            and x.numel() // x.shape[-1] <= MAX_TOKENS and x.is_contiguous() and y.is_contiguous()
            and not (x.requires_grad or y.requires_grad)
            # a raw-pointer write is invisible to tracers and compilers: they take the torch path
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


__all__ = ["MAX_TOKENS", "CsrKernel", "library", "status", "usable"]
