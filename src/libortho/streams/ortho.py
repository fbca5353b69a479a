"""The sparse ortho stream: a coordinate stream of high-precision residual entries.

In memory, entries are row-major *sorted* flat indices ``i * d_in + j`` (int32) and values (fp16 by
default); a CSR view is built for compute. Storage only: no ``nn.Module``.

On disk the indices are delta-coded (``index_coding = "delta8"``): each entry stores the gap to the
previous index in one byte (1..255), and gaps that do not fit are written as the byte 0 plus the
absolute index in a separate int32 ``far`` array. At 1% density the mean gap is ~100, so an entry
costs 8 bits plus ~8% of 32 for escapes, instead of 32: with fp16 values ~26 bits per nonzero
(:func:`encode_indices`, :func:`decode_indices`; :attr:`SparseOrtho.nbytes` counts this coding).
Files written before (plain int32 ``indices``) are still read.
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


INDEX_CODING = "delta8"
_MAX_GAP = 255


def encode_indices(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Strictly increasing flat indices -> (uint8 gaps, int32 far): gap 1..255 in a byte, else 0 + far."""
    idx = indices.to(torch.int64)
    prev = torch.cat([torch.tensor([-1], dtype=torch.int64), idx[:-1]])
    gap = idx - prev
    escape = gap > _MAX_GAP
    gaps = torch.where(escape, 0, gap).to(torch.uint8)
    return gaps, idx[escape].to(torch.int32)


def decode_indices(gaps: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_indices` (vectorised: a running sum of gaps restarted at every escape)."""
    if gaps.dtype != torch.uint8 or far.dtype != torch.int32 or gaps.dim() != 1 or far.dim() != 1:
        raise ValueError("delta-coded indices need 1-D uint8 gaps and 1-D int32 far indices")
    g = gaps.to(torch.int64)
    escape = g == 0
    if int(escape.sum()) != far.numel():
        raise ValueError(f"{int(escape.sum())} escaped gaps but {far.numel()} far indices")
    cs = torch.cumsum(g, 0)
    seg = torch.cumsum(escape.to(torch.int64), 0)  # how many escapes up to and including each entry
    starts = torch.cat([torch.tensor([-1], dtype=torch.int64), far.to(torch.int64)])
    cs_at = torch.cat([torch.zeros(1, dtype=torch.int64), cs[escape]])
    return (starts[seg] + cs - cs_at[seg]).to(torch.int32)


@dataclass(frozen=True, eq=False)
class SparseOrtho:
    """Sorted flat int32 indices + values of one ``(d_out, d_in)`` sparse matrix (memory form ``sparse``)."""

    kind: ClassVar[str] = "sparse"
    site: ClassVar[str] = "linear"  # added to one linear layer's output
    tensor_names: ClassVar[tuple[str, ...]] = ("gaps", "far", "values")  # what tensors() returns, in file order

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
        """Bytes as stored: delta-coded indices (1 byte each, 4 more per escape) and the values."""
        escapes = int(encode_indices(self.indices)[1].numel()) if self.nnz else 0
        return self.nnz + 4 * escapes + self.values.numel() * self.values.element_size()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The named tensors a file stores: delta-coded ``gaps`` (uint8) and ``far`` (int32), ``values``."""
        gaps, far = encode_indices(self.indices)
        return {"gaps": gaps, "far": far, "values": self.values}

    def meta(self) -> dict[str, Any]:
        """JSON-able description for a manifest: form, site, shape, nnz, value dtype and index coding."""
        return {"kind": self.kind, "site": self.site, "shape": list(self.shape), "nnz": self.nnz,
                "dtype": dtype_name(self.values.dtype), "index_coding": INDEX_CODING}

    @classmethod
    def file_tensor_names(cls, meta: dict[str, Any]) -> tuple[str, ...]:
        """The tensors a file holds for this stream: plain ``indices`` in files without an index coding."""
        return cls.tensor_names if meta.get("index_coding") == INDEX_CODING else ("indices", "values")

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> SparseOrtho:
        """Inverse of :meth:`tensors` / :meth:`meta` (the shape comes from ``meta``)."""
        check_meta_kind(meta, cls.kind)
        shape = meta["shape"]
        coding = meta.get("index_coding")
        if coding not in (None, INDEX_CODING):
            raise ValueError(f"unknown ortho index coding {coding!r} (this libortho reads {INDEX_CODING!r})")
        indices = tensors["indices"] if coding is None else decode_indices(tensors["gaps"], tensors["far"])
        return cls(indices, tensors["values"], (int(shape[0]), int(shape[1])))

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
