"""The sparse ortho stream: a coordinate stream of high-precision residual entries.

Entries are stored as row-major *sorted* flat indices ``i * d_in + j`` (int32) and values
(fp16 by default). A CSR view is built for compute. Storage only: no ``nn.Module``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name (``fp16``/``bf16``/``fp32``) of a memory stream dtype; ValueError for any other."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"memory stream dtype {dtype} is not one of {sorted(DTYPES)}")
    return DTYPE_NAMES[dtype]


def check_meta_kind(meta: dict[str, Any], kind: str) -> None:
    """Refuse stream metadata written for another form (``from_tensors`` of the wrong class)."""
    if meta.get("kind", kind) != kind:
        raise ValueError(f"metadata of a {meta.get('kind')!r} stream given to the {kind!r} form")


@dataclass(frozen=True, eq=False)
class SparseOrtho:
    """Sorted flat int32 indices + values of one ``(d_out, d_in)`` sparse matrix (memory form ``sparse``)."""

    kind: ClassVar[str] = "sparse"
    site: ClassVar[str] = "linear"  # added to one linear layer's output
    tensor_names: ClassVar[tuple[str, ...]] = ("indices", "values")  # what tensors() returns, in file order

    indices: torch.Tensor  # int32 (nnz,), strictly increasing
    values: torch.Tensor  # fp16/bf16/fp32 (nnz,)
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if self.indices.dtype != torch.int32 or self.indices.dim() != 1:
            raise ValueError("ortho indices must be a 1-D int32 tensor")
        if self.values.shape != self.indices.shape:
            raise ValueError(f"ortho values {tuple(self.values.shape)} and indices "
                             f"{tuple(self.indices.shape)} differ in shape")
        n = self.shape[0] * self.shape[1]
        if n >= 2**31:
            raise ValueError(f"matrix of {n} entries does not fit int32 flat indices")
        if self.indices.numel():
            if int(self.indices[0]) < 0 or int(self.indices[-1]) >= n:
                raise ValueError("ortho indices out of range for shape " + str(self.shape))
            if self.indices.numel() > 1 and not bool((self.indices[1:] > self.indices[:-1]).all()):
                raise ValueError("ortho indices must be strictly increasing (row-major sorted)")

    @classmethod
    def from_mask(cls, values: torch.Tensor, mask: torch.Tensor, dtype: str = "fp16") -> SparseOrtho:
        """Keep ``values[mask]`` of a dense ``(d_out, d_in)`` tensor, cast to ``dtype``."""
        if values.shape != mask.shape:
            raise ValueError("values and mask must have the same shape")
        flat = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
        return cls.from_flat(flat, values.flatten()[flat], tuple(values.shape), dtype)

    @classmethod
    def from_flat(cls, flat_idx: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int],
                  dtype: str = "fp16") -> SparseOrtho:
        """Build from (possibly unsorted) flat indices and their values."""
        if dtype not in DTYPES:
            raise ValueError(f"unknown ortho dtype {dtype!r}; choose from {sorted(DTYPES)}")
        order = torch.argsort(flat_idx)
        return cls(
            indices=flat_idx[order].to(torch.int32).contiguous().clone(),
            values=vals[order].detach().to(DTYPES[dtype]).contiguous().clone(),
            shape=(int(shape[0]), int(shape[1])),
        )

    @classmethod
    def empty(cls, shape: tuple[int, int], dtype: str = "fp16") -> SparseOrtho:
        return cls(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=DTYPES[dtype]), shape)

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def density(self) -> float:
        return self.nnz / float(self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        return self.indices.numel() * 4 + self.values.numel() * self.values.element_size()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The named tensors a file stores: ``indices`` (int32) and ``values``."""
        return {"indices": self.indices, "values": self.values}

    def meta(self) -> dict[str, Any]:
        """JSON-able description for a manifest: form, site, shape, nnz and value dtype."""
        return {"kind": self.kind, "site": self.site, "shape": list(self.shape), "nnz": self.nnz,
                "dtype": dtype_name(self.values.dtype)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> SparseOrtho:
        """Inverse of :meth:`tensors` / :meth:`meta` (the shape comes from ``meta``)."""
        check_meta_kind(meta, cls.kind)
        shape = meta["shape"]
        return cls(tensors["indices"], tensors["values"], (int(shape[0]), int(shape[1])))

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column index (int64) of every stored entry."""
        flat = self.indices.to(torch.int64)
        return flat // self.shape[1], flat % self.shape[1]

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.zeros(self.shape[0] * self.shape[1], dtype=dtype)
        out[self.indices.to(torch.int64)] = self.values.to(dtype)
        return out.view(self.shape)

    def to_csr(self, dtype: torch.dtype = torch.float32, index_dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """A ``torch.sparse_csr`` view ``(d_out, d_in)`` for compute (values cast to ``dtype``)."""
        rows, cols = self.rows_cols()
        crow = torch.zeros(self.shape[0] + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=self.shape[0]), 0)
        return torch.sparse_csr_tensor(crow.to(index_dtype), cols.to(index_dtype), self.values.to(dtype).contiguous(),
                                       size=self.shape, check_invariants=False)
