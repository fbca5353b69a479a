"""OrthoLinear: ``y = base(x) + alpha * ortho(x) + bias``, a drop-in for ``nn.Linear``."""

from __future__ import annotations

import math

import torch
from torch import nn

from libortho.runtime.kernels import cpu
from libortho.streams import BaseStream, SparseOrtho


class OrthoLinear(nn.Module):
    """A linear layer stored as a packed INT-b base stream plus an optional sparse ortho stream.

    ``alpha`` is a plain float so the switch costs one Python branch per call; at ``alpha == 0``
    the ortho stream is not touched at all (the null test). Without an ortho stream the layer is
    locked at ``alpha = 0``.
    """

    def __init__(self, base: BaseStream, ortho: SparseOrtho | None = None, bias: torch.Tensor | None = None,
                 alpha: float = 1.0, base_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.out_features, self.in_features = base.shape
        self.base_stream = base
        self.base_dtype = base_dtype
        if cpu.int4pack_supported(base.bits, base.group_size, *base.shape):
            packed, sz = cpu.prepare_int4pack(base)
            self.register_buffer("_packed", packed, persistent=False)
            self.register_buffer("_scales_zeros", sz, persistent=False)
            self.kernel = "int4pack"
        else:
            self.register_buffer("_dense", cpu.dense_weight(base, base_dtype), persistent=False)
            self.kernel = f"dense-{str(base_dtype).removeprefix('torch.')}"
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.ortho_stream: SparseOrtho | None = None
        self._csr: torch.Tensor | None = None
        self._alpha = 0.0
        self.set_ortho(ortho)
        self.alpha = alpha if ortho is not None else 0.0

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"alpha must be finite, got {value}")
        if value != 0.0 and self.ortho_stream is None:
            raise RuntimeError("this layer has no ortho stream (not loaded or withheld): it is locked at alpha = 0")
        self._alpha = value

    def set_ortho(self, ortho: SparseOrtho | None) -> None:
        """Attach (or detach, with None) the sparse ortho stream at run time."""
        if ortho is not None and tuple(ortho.shape) != (self.out_features, self.in_features):
            raise ValueError(f"ortho shape {ortho.shape} does not match layer {(self.out_features, self.in_features)}")
        self.ortho_stream = ortho
        self._csr = None if ortho is None else ortho.to_csr(torch.float32)
        if ortho is None:
            self._alpha = 0.0

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int4pack":
            return cpu.int4pack_matmul(x, self._packed, self._scales_zeros, self.base_stream.group_size,
                                       self.out_features)
        return cpu.dense_matmul(x, self._dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if self._alpha != 0.0:
            y = y + self._alpha * cpu.sparse_matmul(x, self._csr)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def effective_weight(self, alpha: float | None = None) -> torch.Tensor:
        """Dense fp32 ``Q + alpha * W_ortho`` (analysis and tests; not used by forward)."""
        a = self._alpha if alpha is None else float(alpha)
        W = self.base_stream.dequantize()
        if a != 0.0 and self.ortho_stream is not None:
            W = W + a * self.ortho_stream.to_dense()
        return W

    def extra_repr(self) -> str:
        o = self.ortho_stream
        dens = f"nnz={o.nnz}, density={o.density:.4%}" if o is not None else "ortho=None (locked)"
        return (f"in={self.in_features}, out={self.out_features}, bits={self.base_stream.bits}, "
                f"group={self.base_stream.group_size}, {dens}, alpha={self._alpha:g}, kernel={self.kernel}")
