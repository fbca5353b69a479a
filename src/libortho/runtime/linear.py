"""OrthoLinear: ``y = base(x) + alpha * memory(x) + bias``, a drop-in for ``nn.Linear``.

The memory of a linear site is a sparse ortho stream (:class:`SparseOrtho`) or a low-rank update
(:class:`LowRankMemory`); both sit behind the same alpha switch.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn

from libortho.runtime.kernels import cpu, native
from libortho.runtime.switch import LOCKED_MESSAGE, AlphaSwitch
from libortho.streams import BaseStream, LowRankMemory, SparseOrtho
from libortho.streams.ortho import dtype_name
from libortho.streams.pack import pack_codes

LinearMemory = SparseOrtho | LowRankMemory


class SharedInputMemory:
    """The sparse memory of sibling layers that read one input (q/k/v, gate/up) as one stacked CSR.

    At decode the per-call cost of a sparse product dominates its arithmetic, so the first sibling
    called with ``x`` computes ``x @ W_ortho^T`` for all of them in one MKL call and the others take
    their slice of it. The result is remembered for that very tensor (a weak reference and its
    version counter), so a new or modified input is never served a stale product. Used only while
    every member has a sparse memory and the same alpha; rebuilt when a member's memory changes.
    """

    def __init__(self, members: list[OrthoLinear]) -> None:
        if len({m.in_features for m in members}) != 1:
            raise ValueError("layers sharing an input must have the same in_features")
        self.members = members
        self._streams: list[LinearMemory | None] | None = None  # the members' streams the CSR was built from
        self._csr: torch.Tensor | None = None
        self._offsets: dict[int, tuple[int, int]] = {}
        self._last: tuple[weakref.ref, int, torch.Tensor] | None = None

    def _usable(self) -> bool:
        alphas = {m._alpha for m in self.members}
        return len(alphas) == 1 and all(m._csr is not None for m in self.members)

    def __deepcopy__(self, memo: dict) -> SharedInputMemory:
        new = SharedInputMemory.__new__(SharedInputMemory)
        memo[id(self)] = new  # before the members: each of them refers back to this group
        new.__init__([copy.deepcopy(m, memo) for m in self.members])
        return new

    def _build(self) -> None:
        streams = [m.ortho_stream for m in self.members]
        if self._streams is not None and all(a is b for a, b in zip(streams, self._streams, strict=True)):
            return
        rows = sum(o.shape[0] for o in streams)
        d_in = streams[0].shape[1]
        flat, vals, start = [], [], 0
        for m, o in zip(self.members, streams, strict=True):
            r, c = o.rows_cols()
            flat.append((r + start) * d_in + c)
            vals.append(o.values)
            self._offsets[id(m)] = (start, start + o.shape[0])
            start += o.shape[0]
        stacked = SparseOrtho.from_flat(torch.cat(flat), torch.cat(vals), (rows, d_in),
                                        dtype_name(streams[0].values.dtype))
        self._csr = cpu.ortho_csr(stacked)
        self._streams, self._last = streams, None

    def contribution(self, layer: OrthoLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``x @ W_ortho^T`` of ``layer`` (fp32, ``(tokens, d_out)``) from the shared product; None if unusable."""
        if not self._usable():
            return None
        self._build()
        last = self._last
        if last is None or last[0]() is not x or last[1] != x._version:
            out = cpu.sparse_ortho_matmul(x.reshape(-1, x.shape[-1]), self._csr)
            self._last = last = (weakref.ref(x), x._version, out)
        a, b = self._offsets[id(layer)]
        return last[2][:, a:b]


class OrthoLinear(AlphaSwitch, nn.Module):
    """A linear layer stored as a b-bit base stream plus an optional memory stream (sparse or low-rank).

    ``alpha`` is a plain Python float, so the switch costs one branch per call; at ``alpha == 0``
    the memory stream is not touched (the null test). Without a memory stream the layer is locked
    at ``alpha = 0``. Kernel tensors are non-persistent buffers; saving goes through
    ``base_stream``/``ortho_stream`` (the storage objects), so ``state_dict`` holds only the bias.
    Torch cannot deep-copy sparse CSR tensors: a copy rebuilds its CSR from its stream.
    On the INT4 kernel, a call with at least ``dense_min_tokens`` tokens (prefill) dequantizes the
    packed codes to a transient bf16 weight and runs a dense GEMM instead (same weights, faster there).
    """

    dense_min_tokens: int = cpu.DENSE_PREFILL_MIN_TOKENS

    def __init__(self, base: BaseStream, ortho: LinearMemory | None = None, bias: torch.Tensor | None = None,
                 alpha: float = 1.0, base_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.out_features, self.in_features = base.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self._stream: BaseStream | None = base
        self.bits, self.group_size = base.bits, base.group_size
        self.base_dtype = base_dtype
        self.register_buffer("_packed", None, persistent=False)
        self.register_buffer("_scales_zeros", None, persistent=False)
        self.register_buffer("_weight", None, persistent=False)
        self.register_buffer("_csr", None, persistent=False)  # sparse memory (MKL CSR, fp32 values)
        self.register_buffer("_lr_A", None, persistent=False)  # low-rank memory (r, d_in)
        self.register_buffer("_lr_B", None, persistent=False)  # low-rank memory (d_out, r)
        self._int4, self._dense_dtype, self.kernel_note = self._choose_kernel()
        if not self._int4:
            self._build_base()
        elif self.out_features % cpu.INT4PACK_BLOCK_N == 0:
            # one copy of the codes: the kernel's packed layout; base_stream is rebuilt from it on demand
            self._stream_params = (base.scales, base.zeros)
            self._stream = None
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.ortho_stream: LinearMemory | None = None
        self._shared: SharedInputMemory | None = None  # set by libortho.runtime.group_shared_inputs
        self._native: tuple[torch.Tensor, native.CsrKernel] | None = None  # (the CSR it was built from, kernel)
        self._alpha = 0.0
        self.set_ortho(ortho)
        self.alpha = alpha if ortho is not None else 0.0

    @property
    def base_stream(self) -> BaseStream:
        """The stored base stream (codes + fp16 group parameters), exactly as given to the layer.

        On the INT4 kernel the layer keeps only the kernel's packed codes, so this is rebuilt from them.
        """
        if self._stream is not None:
            return self._stream
        scales, zeros = self._stream_params
        codes = cpu.int4pack_codes(self._packed, self.out_features)
        return BaseStream(pack_codes(codes, self.bits), scales, zeros, self.bits, self.group_size,
                          (self.out_features, self.in_features))

    def resident_bytes(self) -> dict[str, int]:
        """Bytes this layer holds in memory, by part: base kernel tensors, stored stream, memory, bias."""
        def size(*ts: torch.Tensor | None) -> int:
            return sum(t.numel() * t.element_size() for t in ts if t is not None and t.layout == torch.strided)

        base = size(self._packed, self._scales_zeros, self._weight)
        stream = (size(*self._stream_params) if self._stream is None
                  else size(self._stream.packed, self._stream.scales, self._stream.zeros))
        csr = self._csr
        kernel_memory = size(self._lr_A, self._lr_B) + (0 if csr is None else sum(
            t.numel() * t.element_size() for t in (csr.crow_indices(), csr.col_indices(), csr.values())))
        stored_memory = 0 if self.ortho_stream is None else self.ortho_stream.nbytes
        return {"base_kernel": base, "base_stream": stream, "memory_kernel": kernel_memory,
                "memory_stream": stored_memory, "bias": size(self.bias)}

    @property
    def kernel(self) -> str:
        """Name of the base kernel: ``int4pack`` or ``dense-<dtype>`` (see ``kernel_note`` for why dense)."""
        return "int4pack" if self._int4 else "dense-" + str(self._dense_dtype).removeprefix("torch.")

    @property
    def memory_kernel(self) -> str:
        """What adds the memory at decode: ``native-csr`` (compiled, up to its token limit, else MKL),
        ``mkl-csr``, ``lowrank`` or ``none``."""
        if self._csr is not None:
            return "native-csr" if native.library() is not None else "mkl-csr"
        return "lowrank" if self._lr_A is not None else "none"

    @property
    def locked(self) -> bool:
        """True when no memory stream is attached (alpha is pinned to 0)."""
        return self.ortho_stream is None

    def _choose_kernel(self) -> tuple[bool, torch.dtype, str]:
        """INT4 kernel when the layer's format allows it *and* its weights stay within the fidelity bound.

        Otherwise the dense path in ``base_dtype`` (format) or in fp32 (bound exceeded: reported by
        ``kernel_note`` and a :class:`~libortho.runtime.kernels.cpu.KernelFallbackWarning`).
        """
        tensors, note = cpu.int4pack_choice(self.base_stream)
        if tensors is not None:
            self._packed, self._scales_zeros = tensors
            return True, cpu.INT4PACK_DTYPE, note
        if note.startswith("format"):
            return False, self.base_dtype, note
        warnings.warn("a base stream's scales/zeros would be off by more than 1/32 grid step in the INT4 kernel "
                      "(scales not bf16-exact or zero points outside [0, 15]): such layers run dense in fp32; "
                      "see OrthoLinear.kernel_note", cpu.KernelFallbackWarning, stacklevel=3)
        return False, torch.float32, note

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
        self._native = None  # the compiled kernel's view of the old CSR goes with it
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

    def _prefill(self, x: torch.Tensor) -> bool:
        """Whether this call takes the dense (dequantize + GEMM) path: INT4 layer and many tokens."""
        return self._int4 and x.numel() >= self.dense_min_tokens * self.in_features

    def __deepcopy__(self, memo: dict) -> OrthoLinear:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = dict(self.__dict__, _buffers={k: None if k == "_csr" else v for k, v in self._buffers.items()},
                     _native=None)
        for key, value in state.items():
            object.__setattr__(new, key, copy.deepcopy(value, memo))
        if isinstance(new.ortho_stream, SparseOrtho):
            new._csr = cpu.ortho_csr(new.ortho_stream)
        return new

    def _native_kernel(self) -> native.CsrKernel | None:
        """The compiled decode kernel's view of the current CSR (rebuilt when the CSR is replaced)."""
        csr = self._csr
        if csr is None or native.library() is None:
            return None
        held = self._native
        if held is None or held[0] is not csr:
            held = self._native = (csr, native.CsrKernel(csr))
        return held[1]

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q^T`` (no bias) as a fresh tensor of ``x.dtype``."""
        if self._int4:
            kernel = cpu.int4pack_dense_matmul if self._prefill(x) else cpu.int4pack_matmul
            return kernel(x, self._packed, self._scales_zeros, self.group_size, self.out_features)
        return cpu.dense_base_matmul(x, self._weight)

    def _fold(self, W: torch.Tensor) -> None:
        """Add ``alpha * W_memory`` to a dense fp32 weight in place (the prefill path)."""
        if self._csr is not None:
            cpu.fold_csr_(W, self._csr, self._alpha)
        else:
            W.addmm_(self._lr_B, self._lr_A, alpha=self._alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) [+ alpha * memory(x)] + bias``; output dtype equals ``x.dtype``, or the autocast
        dtype when autocast is on (as ``nn.Linear`` would give).

        Prefill (INT4 layer, at least ``dense_min_tokens`` tokens): the memory is folded into the
        transient fp32 weight before its bf16 rounding, one GEMM for both streams. Otherwise (decode)
        the base kernel runs and a sparse memory is added in place by the compiled kernel
        (:mod:`~libortho.runtime.kernels.native`, up to its token limit) or else MKL's CSR product
        (shared by sibling layers); a low-rank memory by two skinny matmuls.
        """
        if self._alpha != 0.0 and self._prefill(x):
            y = cpu.int4pack_dense_matmul(x, self._packed, self._scales_zeros, self.group_size,
                                          self.out_features, fold=self._fold)
        else:
            y = self.base_forward(x)
            nk = self._native_kernel() if self._alpha != 0.0 else None
            if nk is not None and native.usable(x, y):
                nk.addmm_(y, x, self._alpha)
            elif self._alpha != 0.0:
                shared = None if self._shared is None else self._shared.contribution(self, x)
                if shared is not None:
                    y = torch.add(y.reshape(shared.shape).to(shared.dtype), shared, alpha=self._alpha
                                  ).to(y.dtype).view(y.shape)
                elif self._csr is not None:
                    y = cpu.sparse_ortho_addmm_(y, x, self._csr, self._alpha)
                elif self._lr_A is not None:
                    y = cpu.lowrank_addmm_(y, x, self._lr_A, self._lr_B, self._alpha)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if torch.is_autocast_enabled(x.device.type):
            y = y.to(torch.get_autocast_dtype(x.device.type))
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
