"""K-FAC curvature of linear layers: Kronecker factors, their eigenbasis, EK-FAC eigenvalues.

For a linear layer ``s = W a`` inside a network trained on a per-example loss, the Fisher block of
``W`` is ``F = E_n[vec(dW_n) vec(dW_n)^T]`` with ``dW_n = sum_t g_t a_t^T`` the example's gradient
(``g = dloss/ds`` at each token position ``t``). K-FAC (Martens & Grosse 2015) replaces it by
``G ⊗ A`` with

* ``A = mean over token positions of a a^T`` (d_in x d_in),
* ``G = (1/examples) sum over positions of g g^T`` (d_out x d_out),

so that ``F ≈ kron(G, A)`` for ``vec`` in row-major order (``dW.flatten()``). The approximation is
exact for one example with one position; with many it drops the correlation between ``a`` and ``g``
across examples and the cross terms between positions (``fisher_error`` measures that against the
exact block on small layers). EK-FAC (George et al. 2018) keeps K-FAC's eigenbasis
``Q_G ⊗ Q_A`` but re-fits the eigenvalues as ``E_n[(Q_G^T dW_n Q_A)^2]``: in that basis it is the
best diagonal fit of ``F``, so its error is never larger than K-FAC's.

The loss is the model's own token cross-entropy, summed over positions per example. ``fisher="true"``
(the default) samples every label from the model's predictive distribution, so ``F`` is the Fisher of
the model; ``"empirical"`` uses the data's next tokens. Both factors accumulate through
:class:`~libortho.curvature.hessian.MomentSum`, the reduction behind the GPTQ Hessian, so they merge
exactly over data-parallel workers (:meth:`KFACAccumulator.all_reduce`).

Damping adds a fraction of each factor's mean eigenvalue to that factor, ``(G + d·mean λ_G)⊗(A + d·mean λ_A)``,
so the damped curvature stays a Kronecker product that the selectors invert factor by factor
(:meth:`KFACFactors.damped_eigenvalues`; EK-FAC's eigenvalues, not factored, get ``d·mean`` added).
Factors (and eigen-decompositions, and EK-FAC eigenvalues) are saved to and loaded from safetensors.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from libortho.curvature.hessian import MomentSum

FISHER_TYPES = ("true", "empirical")
IGNORE_INDEX = -100  # cross-entropy's ignore index: a position without a loss
OutputsFn = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def causal_lm_outputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the data's next tokens) of a causal LM over a (B, T) block.

    The model reads positions 0..T-2 only (causal: their logits are the same as in the full block),
    so every position whose input enters ``A`` also has a loss and a gradient in ``G``.
    """
    logits = model(input_ids=input_ids[:, :-1], use_cache=False).logits
    return logits, input_ids[:, 1:]


def labelled_causal_lm_outputs(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`causal_lm_outputs` for a batch stacked as ``(2, B, T)``: input ids and Hugging Face style
    labels (aligned with the ids, ``-100`` where a token carries no loss, e.g. a record's separator)."""
    if batch.dim() != 3 or batch.shape[0] != 2:
        raise ValueError(f"need a (2, B, T) stack of input ids and labels, got {tuple(batch.shape)}")
    logits = model(input_ids=batch[0][:, :-1], use_cache=False).logits
    return logits, batch[1][:, 1:]


@dataclass
class KFACFactors:
    """One linear layer's K-FAC statistics (``A``, ``G``) and, once computed, their eigen-decomposition.

    ``QA, lamA`` / ``QG, lamG``: eigenvectors (columns) and eigenvalues of ``A`` / ``G`` (ascending,
    negatives from rounding clipped to 0). ``ekfac``: EK-FAC eigenvalues (d_out, d_in) in the basis
    ``Q_G ⊗ Q_A``, when fitted.
    """

    A: torch.Tensor
    G: torch.Tensor
    n_tokens: int
    n_examples: int
    QA: torch.Tensor | None = None
    lamA: torch.Tensor | None = None
    QG: torch.Tensor | None = None
    lamG: torch.Tensor | None = None
    ekfac: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the layer's weight."""
        return self.G.shape[0], self.A.shape[0]

    def eigen(self) -> KFACFactors:
        """Eigen-decompose both factors (fp64), in place; returns self."""
        if self.QA is None:
            self.lamA, self.QA = _eigh(self.A)
            self.lamG, self.QG = _eigh(self.G)
        return self

    def eigenvalues(self) -> torch.Tensor:
        """(d_out, d_in) curvature of each eigen-direction ``q_G,i q_A,j^T``: EK-FAC's if fitted, else λ_G,i λ_A,j."""
        if self.ekfac is not None:
            return self.ekfac
        self.eigen()
        return torch.outer(self.lamG, self.lamA)

    def damped_eigenvalues(self, damp: float = 0.1) -> torch.Tensor:
        """The curvature of each eigen-direction after damping, as the selectors use it: each factor plus
        ``damp`` times its mean eigenvalue, ``(λ_G,i + d·mean λ_G)(λ_A,j + d·mean λ_A)``; for EK-FAC
        eigenvalues (not a product) ``λ + d·mean λ``."""
        if damp < 0:
            raise ValueError(f"damping must be >= 0, got {damp}")
        if self.ekfac is not None:
            return self.ekfac + damp * float(self.ekfac.mean())
        self.eigen()
        return torch.outer(self.lamG + damp * float(self.lamG.mean()), self.lamA + damp * float(self.lamA.mean()))

    def rotate(self, dW: torch.Tensor) -> torch.Tensor:
        """``Q_G^T dW Q_A``: a weight-shaped matrix in the K-FAC eigenbasis."""
        self.eigen()
        if tuple(dW.shape) != self.shape:
            raise ValueError(f"matrix has shape {tuple(dW.shape)}, the layer is {self.shape}")
        return self.QG.T @ dW.to(self.QG.dtype) @ self.QA

    def unrotate(self, C: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rotate`: ``Q_G C Q_A^T``."""
        self.eigen()
        return self.QG @ C.to(self.QG.dtype) @ self.QA.T

    def fisher_block(self) -> torch.Tensor:
        """The dense (d_out d_in)^2 approximation ``kron(G, A)`` or its EK-FAC version (small layers only)."""
        d = self.shape[0] * self.shape[1]
        if d > 4096:
            raise ValueError(f"a {d} x {d} Fisher block is too large to form; use eigenvalues() and rotate()")
        if self.ekfac is None:
            return torch.kron(self.G.double(), self.A.double())
        Q = torch.kron(self.QG, self.QA)
        return Q @ torch.diag(self.ekfac.flatten().double()) @ Q.T


def _eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lam, Q = torch.linalg.eigh(M.double())
    return lam.clamp_min(0.0), Q


class KFACAccumulator:
    """Running ``A`` and ``G`` of one linear layer (fp64 sums; counts of tokens and of examples)."""

    def __init__(self, d_in: int, d_out: int, dtype: torch.dtype = torch.float32) -> None:
        # products in ``dtype`` (fp32 for real models) summed in fp64, as for H: merging is exact
        self.A = MomentSum(d_in, dtype)
        self.G = MomentSum(d_out, dtype)
        self.ekfac_sum: torch.Tensor | None = None
        self.ekfac_n = 0

    def add(self, a: torch.Tensor, g: torch.Tensor) -> None:
        """Fold one batch: inputs ``a`` (B, T, d_in) and output gradients ``g`` (B, T, d_out)."""
        self.A.add_batch(a)
        self.G.add_batch(g, count=g.shape[0])

    def merge(self, other: KFACAccumulator) -> KFACAccumulator:
        """Add another worker's batches, in place (exact)."""
        self.A.merge(other.A)
        self.G.merge(other.G)
        return self

    def all_reduce(self) -> KFACAccumulator:
        """Sum over ``torch.distributed`` workers; a no-op when not initialised."""
        self.A.all_reduce()
        self.G.all_reduce()
        if self.ekfac_sum is not None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                n = torch.tensor([float(self.ekfac_n)], dtype=torch.float64)
                dist.all_reduce(self.ekfac_sum)
                dist.all_reduce(n)
                self.ekfac_n = int(n.item())
        return self

    def factors(self) -> KFACFactors:
        """The statistics as :class:`KFACFactors` (means over tokens for ``A``, over examples for ``G``)."""
        if self.A.n == 0 or self.G.n == 0:
            raise ValueError("no batches were accumulated for this layer")
        return KFACFactors(A=self.A.sum() / self.A.n, G=self.G.sum() / self.G.n, n_tokens=self.A.n,
                           n_examples=self.G.n)


@contextlib.contextmanager
def _capture(layers: Mapping[str, nn.Linear], on_pair: Callable[[str, torch.Tensor, torch.Tensor], None]
             ) -> Iterator[None]:
    """Hooks that hand each layer's (input, output gradient) pair to ``on_pair`` during backward."""
    handles = []

    def fwd(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            a = inp[0].detach()
            if out.requires_grad:
                out.register_hook(lambda g: on_pair(name, a, g.detach()))
        return hook

    flags = {n: lin.weight.requires_grad for n, lin in layers.items()}
    try:
        for name, lin in layers.items():
            lin.weight.requires_grad_(True)  # so the layer's output carries a gradient
            handles.append(lin.register_forward_hook(fwd(name)))
        yield
    finally:
        for h in handles:
            h.remove()
        for name, lin in layers.items():
            lin.weight.requires_grad_(flags[name])


def _per_example_loss_backward(model: nn.Module, batch: torch.Tensor, layers: Mapping[str, nn.Linear],
                               outputs: OutputsFn, fisher: str, gen: torch.Generator) -> None:
    logits, targets = outputs(model, batch)
    logits = logits.float()
    if fisher == "true":  # labels sampled from the model where the data has a loss; -100 stays without one
        with torch.no_grad():
            probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1).cpu()  # the generator is CPU
            sampled = torch.multinomial(probs, 1, generator=gen).view(targets.shape).to(targets.device)
            targets = torch.where(targets == IGNORE_INDEX, targets, sampled)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             reduction="sum")
    torch.autograd.grad(loss, [lin.weight for lin in layers.values()])


def fit_kfac(model: nn.Module, batches: Iterable[torch.Tensor], layers: Mapping[str, nn.Linear],
             fisher: str = "true", ekfac: bool = False, outputs: OutputsFn = causal_lm_outputs,
             seed: int = 0, distributed: bool = True, progress: bool = False) -> dict[str, KFACFactors]:
    """K-FAC factors (and optionally EK-FAC eigenvalues) of ``layers`` over calibration ``batches``.

    One forward + backward per batch (a second pass over the batches for EK-FAC, after the
    eigenbasis is known). ``outputs(model, batch)`` gives per-position logits and the data's labels
    (default: a causal LM's next tokens); the loss is their cross-entropy summed over positions. A label
    of -100 marks a position without a loss (under both Fishers); its input still counts in ``A`` (later
    positions read it), so trim padding off the batches rather than masking it.
    ``fisher="true"`` samples the labels from the model (seeded by ``seed``). With ``distributed``,
    the sums are all-reduced over ``torch.distributed`` workers when a group is initialised.
    """
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
    if not layers:
        raise ValueError("no layers to fit K-FAC factors for")
    for name, lin in layers.items():
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{name} is a {type(lin).__name__}, K-FAC here is for nn.Linear layers")
    batches = list(batches)
    if not batches:
        raise ValueError("no calibration batches")
    accs = {n: KFACAccumulator(lin.in_features, lin.out_features,
                               torch.float64 if lin.weight.dtype == torch.float64 else torch.float32)
            for n, lin in layers.items()}
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with _capture(layers, lambda n, a, g: accs[n].add(a, g)), torch.enable_grad():
            for i, b in enumerate(batches):
                _per_example_loss_backward(model, b, layers, outputs, fisher, gen)
                if progress:
                    print(f"  kfac factors: batch {i + 1}/{len(batches)}", flush=True)
        if distributed:
            for acc in accs.values():
                acc.A.all_reduce()
                acc.G.all_reduce()
        out = {n: acc.factors().eigen() for n, acc in accs.items()}
        if ekfac:
            _fit_ekfac(model, batches, layers, outputs, fisher, gen, out, accs, distributed, progress)
    finally:
        model.train(was_training)
    return out


def _fit_ekfac(model: nn.Module, batches: list[torch.Tensor], layers: Mapping[str, nn.Linear],
               outputs: OutputsFn, fisher: str, gen: torch.Generator, out: dict[str, KFACFactors],
               accs: dict[str, KFACAccumulator], distributed: bool, progress: bool) -> None:
    """Second pass: EK-FAC eigenvalues ``E_n[(Q_G^T dW_n Q_A)^2]`` from per-example gradients."""

    def on_pair(name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        f, acc = out[name], accs[name]
        a3 = a.reshape(a.shape[0], -1, a.shape[-1]).double() @ f.QA  # rotate first: (B, T, d_in)
        g3 = g.reshape(g.shape[0], -1, g.shape[-1]).double() @ f.QG
        C = torch.einsum("bto,bti->boi", g3, a3)  # per-example gradient in the eigenbasis
        sq = C.square().sum(0)
        acc.ekfac_sum = sq if acc.ekfac_sum is None else acc.ekfac_sum + sq
        acc.ekfac_n += C.shape[0]

    with _capture(layers, on_pair), torch.enable_grad():
        for i, b in enumerate(batches):
            _per_example_loss_backward(model, b, layers, outputs, fisher, gen)
            if progress:
                print(f"  ekfac eigenvalues: batch {i + 1}/{len(batches)}", flush=True)
    for name, acc in accs.items():
        if distributed:
            acc.all_reduce()
        out[name].ekfac = acc.ekfac_sum / max(acc.ekfac_n, 1)  # fp64, like the eigenbasis


def per_example_fisher(model: nn.Module, batches: Iterable[torch.Tensor], layer: nn.Linear,
                       labels: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                       outputs: OutputsFn = causal_lm_outputs) -> torch.Tensor:
    """The exact Fisher block ``E_n[vec(dW_n) vec(dW_n)^T]`` of one (small) layer, by autograd per example.

    The slow reference K-FAC is judged against: one backward per example, nothing shared with the
    hooks of :func:`fit_kfac`. ``labels(logits, data_labels)`` picks the labels (default: the data's).
    """
    rows = []
    flag = layer.weight.requires_grad
    layer.weight.requires_grad_(True)
    try:
        with torch.enable_grad():
            for b in batches:
                for x in b.split(1):
                    logits, targets = outputs(model, x)
                    logits = logits.float()
                    if labels is not None:
                        targets = labels(logits.detach(), targets)
                    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             targets.reshape(-1), reduction="sum")
                    (gw,) = torch.autograd.grad(loss, [layer.weight])
                    rows.append(gw.double().flatten())
    finally:
        layer.weight.requires_grad_(flag)
    V = torch.stack(rows)
    return V.T @ V / V.shape[0]


def fisher_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative Frobenius error ``||approx - exact|| / ||exact||`` of a Fisher block."""
    return float(torch.linalg.matrix_norm(approx.double() - exact.double()) / torch.linalg.matrix_norm(exact.double()))


# ---- saving ---------------------------------------------------------------------------------------------

_FIELDS = ("A", "G", "QA", "lamA", "QG", "lamG", "ekfac")


def save_kfac(factors: Mapping[str, KFACFactors], path: str | Path, meta: Mapping[str, Any] | None = None,
              with_eigen: bool = True, dtype: torch.dtype | None = None) -> None:
    """Write every layer's factors (and eigen-decompositions, EK-FAC eigenvalues) to one safetensors file.

    ``with_eigen=False`` keeps ``A`` and ``G`` only (the eigenbasis recomputed in fp64 on use), except for
    layers with EK-FAC eigenvalues: those are only meaningful in the basis they were measured in, so that
    basis is always written with them. ``dtype`` casts everything written (fp32 halves a model-wide file;
    a stored eigenbasis is then read back in that precision).
    """
    from safetensors.torch import save_file

    from libortho.atomic import atomic_write_file

    tensors: dict[str, torch.Tensor] = {}
    counts = {}
    for name, f in factors.items():
        for fld in _FIELDS if with_eigen or f.ekfac is not None else ("A", "G"):
            t = getattr(f, fld)
            if t is not None:
                tensors[f"{name}::{fld}"] = (t if dtype is None else t.to(dtype)).contiguous()
        counts[name] = [f.n_tokens, f.n_examples]
    header = {"format": "libortho-kfac-1", "counts": json.dumps(counts), "meta": json.dumps(dict(meta or {}))}
    atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def load_kfac(path: str | Path) -> tuple[dict[str, KFACFactors], dict[str, Any]]:
    """(factors by layer name, the metadata saved with them) from :func:`save_kfac`'s file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no K-FAC factor file at {path}")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != "libortho-kfac-1":
            raise ValueError(f"{path} is not a libortho K-FAC factor file")
        counts = json.loads(header["counts"])
        parts: dict[str, dict[str, torch.Tensor]] = {n: {} for n in counts}
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            name, fld = key.rsplit("::", 1)
            parts[name][fld] = f.get_tensor(key)
    out = {n: KFACFactors(n_tokens=c[0], n_examples=c[1], **parts[n]) for n, c in counts.items()}
    return out, json.loads(header.get("meta", "{}"))
