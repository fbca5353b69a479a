"""OrthoLinear: ``y = base(x) + alpha * memory(x) + bias``, a drop-in for ``nn.Linear``.

The memory of a linear site is a sparse ortho stream (:class:`SparseOrtho`) or a low-rank update
(:class:`LowRankMemory`); both sit behind the same alpha switch.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from libortho.runtime.kernels import cpu
from libortho.runtime.switch import LOCKED_MESSAGE, AlphaSwitch
from libortho.streams import BaseStream, LowRankMemory, SparseOrtho

LinearMemory = SparseOrtho | LowRankMemory



class OrthoLinear(AlphaSwitch, nn.Module):
    """A linear layer stored as a b-bit base stream plus an optional memory stream (sparse or low-rank).

    ``alpha`` is a plain Python float, so the switch costs one branch per call; at ``alpha == 0``
    the memory stream is not touched (the null test). Without a memory stream the layer is locked
    at ``alpha = 0``. Kernel tensors are non-persistent buffers; saving goes through
    ``base_stream``/``ortho_stream`` (the storage objects), so ``state_dict`` holds only the bias.
    """

    def __init__(self, base: BaseStream, ortho: LinearMemory | None = None, bias: torch.Tensor | None = None,
                 alpha: float = 1.0, base_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.out_features, self.in_features = base.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self.base_stream = base
        self.base_dtype = base_dtype
        self.register_buffer("_packed", None, persistent=False)
        self.register_buffer("_scales_zeros", None, persistent=False)
        self.register_buffer("_weight", None, persistent=False)
        self.register_buffer("_csr", None, persistent=False)  # sparse memory
        self.register_buffer("_lr_A", None, persistent=False)  # low-rank memory (r, d_in)
        self.register_buffer("_lr_B", None, persistent=False)  # low-rank memory (d_out, r)
        self._int4, self._dense_dtype, self.kernel_note = self._choose_kernel()
        if not self._int4:
            self._build_base()
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.ortho_stream: LinearMemory | None = None
        self._alpha = 0.0
        self.set_ortho(ortho)
        self.alpha = alpha if ortho is not None else 0.0

    @property
    def kernel(self) -> str:
        """Name of the base kernel: ``int4pack`` or ``dense-<dtype>`` (see ``kernel_note`` for why dense)."""
        return "int4pack" if self._int4 else "dense-" + str(self._dense_dtype).removeprefix("torch.")

    @property
    def locked(self) -> bool:
        """True when no memory stream is attached (alpha is pinned to 0)."""
        return self.ortho_stream is None

    def _choose_kernel(self) -> tuple[bool, torch.dtype, str]:
        """INT4 kernel when the layer's format allows it *and* its weights stay within the fidelity bound.

        Otherwise the dense path in ``base_dtype`` (format) or in fp32 (bound exceeded: reported by
        ``kernel_note`` and a :class:`~libortho.runtime.kernels.cpu.KernelFallbackWarning`).
        """
        b = self.base_stream
        if not cpu.int4pack_supported(b.bits, b.group_size, *b.shape):
            return False, self.base_dtype, "format not served by the INT4 kernel"
        self._packed, self._scales_zeros = cpu.prepare_int4pack(b)
        worst = float(cpu.int4pack_step_error(b, self._scales_zeros).max())
        if worst <= cpu.INT4PACK_MAX_STEP_ERROR:
            return True, cpu.INT4PACK_DTYPE, f"INT4 kernel, weights within {worst:.4f} grid step of the stored ones"
        self._packed = self._scales_zeros = None
        warnings.warn("a base stream's scales/zeros would be off by more than 1/32 grid step in the INT4 kernel "
                      "(scales not bf16-exact or zero points outside [0, 15]): such layers run dense in fp32; "
                      "see OrthoLinear.kernel_note", cpu.KernelFallbackWarning, stacklevel=3)
        return False, torch.float32, (f"dense fp32: the INT4 kernel's bf16 scale/offset would be off by {worst:.4f} "
                                      f"grid step (> 1/32)")

    def _build_base(self) -> None:
        """(Re)build the kernel-ready base tensors from the base stream."""
        if self._int4:
            self._packed, self._scales_zeros = cpu.prepare_int4pack(self.base_stream)
        else:
            self._weight = cpu.dense_base_weight(self.base_stream, self._dense_dtype)

    def set_ortho(self, ortho: LinearMemory | None) -> None:
        """Attach (or detach, with None) the memory stream at run time; detaching sets alpha to 0."""
        if ortho is not None and not isinstance(ortho, (SparseOrtho, LowRankMemory)):
            raise TypeError(f"a linear layer takes a sparse or low-rank memory, not {type(ortho).__name__}")
        if ortho is not None and tuple(ortho.shape) != (self.out_features, self.in_features):
            raise ValueError(f"ortho shape {tuple(ortho.shape)} does not match layer "
                             f"{(self.out_features, self.in_features)}")
        self.ortho_stream = ortho
        self._build_memory()
        if ortho is None:
            self._alpha = 0.0

    def _build_memory(self) -> None:
        """(Re)build the kernel tensors of the memory stream: a CSR for sparse, fp32 factors for low-rank."""
        o = self.ortho_stream
        self._csr = cpu.ortho_csr(o) if isinstance(o, SparseOrtho) else None
        self._lr_A, self._lr_B = cpu.lowrank_factors(o) if isinstance(o, LowRankMemory) else (None, None)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> OrthoLinear:
        """``.to()``/``.half()`` move the bias; kernel tensors keep the dtypes their kernels need."""
        super()._apply(fn, recurse)
        if ((self._csr is not None and self._csr.dtype != cpu.ORTHO_DTYPE)
                or (self._lr_A is not None and self._lr_A.dtype != cpu.MEMORY_DTYPE)):
            self._build_memory()
        expected = cpu.INT4PACK_DTYPE if self._int4 else self._dense_dtype
        held = self._scales_zeros if self._int4 else self._weight
        if held.dtype != expected:
            self._build_base()
        return self

    def __deepcopy__(self, memo: dict) -> OrthoLinear:
        """Deep copy; torch cannot deep-copy sparse CSR tensors, so the copy rebuilds its CSR from its stream."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = dict(self.__dict__, _buffers={k: None if k == "_csr" else v for k, v in self._buffers.items()})
        for key, value in state.items():
            object.__setattr__(new, key, copy.deepcopy(value, memo))
        if isinstance(new.ortho_stream, SparseOrtho):
            new._csr = cpu.ortho_csr(new.ortho_stream)
        return new

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q^T`` (no bias) as a fresh tensor of ``x.dtype``."""
        if self._int4:
            return cpu.int4pack_matmul(x, self._packed, self._scales_zeros, self.base_stream.group_size,
                                       self.out_features)
        return cpu.dense_base_matmul(x, self._weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) [+ alpha * memory(x)] + bias``; output dtype equals ``x.dtype``."""
        y = self.base_forward(x)
        if self._alpha != 0.0:
            if self._csr is not None:
                y = cpu.sparse_ortho_addmm_(y, x, self._csr, self._alpha)
            elif self._lr_A is not None:
                y = cpu.lowrank_addmm_(y, x, self._lr_A, self._lr_B, self._alpha)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def effective_weight(self, alpha: float | None = None) -> torch.Tensor:
        """Dense fp32 ``Q + alpha * W_memory`` (analysis and tests; not used by forward)."""
        a = self._alpha if alpha is None else float(alpha)
        W = self.base_stream.dequantize(torch.float32)
        if a != 0.0:
            if self.ortho_stream is None:
                raise RuntimeError(LOCKED_MESSAGE)
            W = W + a * self.ortho_stream.to_dense(torch.float32)
        return W

    def extra_repr(self) -> str:
        b, o = self.base_stream, self.ortho_stream
        if isinstance(o, SparseOrtho):
            ortho = f"memory=sparse, nnz={o.nnz}, density={o.density:.4%}"
        elif isinstance(o, LowRankMemory):
            ortho = f"memory=lowrank, rank={o.rank}"
        else:
            ortho = "ortho=None (locked)"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={b.bits}, "
                f"group_size={b.group_size}, {ortho}, alpha={self._alpha:g}, bias={self.bias is not None}, "
                f"kernel={self.kernel}")
