"""Curvature as one operator: what a selector needs from the curvature of a layer, whatever its form.

A selector scores each residual entry ``R_ij`` by its curvature: its own diagonal entry of the
Fisher/Hessian (``diag``) or the inverse's (``obs``: ``R_ij^2 / [F^-1]_(ij),(ij)``). Both are per entry
of the weight, so a :class:`Curvature` gives them as tensors that broadcast to ``(d_out, d_in)``:

* :class:`LayerHessian`: GPTQ's input Hessian ``H`` (the same for every output row): ``H_jj`` and
  ``[H_d^-1]_jj`` with the one damping rule of :mod:`libortho.curvature.damping`;
* :class:`KFACCurvature`: ``F ≈ G ⊗ A``: the diagonal is ``G_ii A_jj``, and the inverse's diagonal is
  ``[G_d^-1]_ii [A_d^-1]_jj`` with each factor damped by a fraction of its mean eigenvalue.

Score functions take ``(R, curvature)``; a bare tensor is read as a :class:`LayerHessian`
(:func:`as_curvature`), so K-FAC plugs into every selector without a special case.
"""

from __future__ import annotations

import abc
import weakref
from typing import Any

import torch

from libortho.curvature.damping import inverse_diag
from libortho.curvature.kfac import KFACFactors


class Curvature(abc.ABC):
    """Per-entry curvature of one linear layer's weight."""

    @abc.abstractmethod
    def check(self, shape: tuple[int, int]) -> None:
        """Refuse a weight shape this curvature is not for (one-line ValueError)."""

    @abc.abstractmethod
    def diagonal(self) -> torch.Tensor:
        """Diagonal of the curvature, broadcastable to ``(d_out, d_in)``."""

    @abc.abstractmethod
    def inverse_diagonal(self) -> torch.Tensor:
        """Diagonal of the damped curvature's inverse, broadcastable to ``(d_out, d_in)``."""


class LayerHessian(Curvature):
    """GPTQ's layer Hessian ``H (d_in, d_in)``; ``damp`` as in GPTQ (fraction of the mean diagonal)."""

    def __init__(self, H: torch.Tensor, damp: float = 0.01) -> None:
        if H.dim() != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"a layer Hessian is a square matrix, got {tuple(H.shape)}")
        self.H, self.damp = H, damp

    def check(self, shape: tuple[int, int]) -> None:
        if self.H.shape != (shape[1], shape[1]):
            raise ValueError(f"H has shape {tuple(self.H.shape)}, expected {(shape[1], shape[1])}")

    def diagonal(self) -> torch.Tensor:
        return torch.diagonal(self.H).float()[None, :]

    def inverse_diagonal(self) -> torch.Tensor:
        return inverse_hessian_diag(self.H, self.damp)[None, :]  # remembers the last H: siblings share it


class KFACCurvature(Curvature):
    """K-FAC's ``G ⊗ A``; ``damp`` is the fraction of each factor's mean eigenvalue added before inverting."""

    def __init__(self, factors: KFACFactors, damp: float = 0.1) -> None:
        if damp < 0:
            raise ValueError(f"damping must be >= 0, got {damp}")
        if factors.ekfac is not None:
            raise ValueError("these K-FAC factors carry EK-FAC eigenvalues, which are not a Kronecker product: "
                             "KFACCurvature inverts G and A factor by factor (drop ekfac to use it)")
        self.f, self.damp = factors, damp

    def check(self, shape: tuple[int, int]) -> None:
        if tuple(shape) != self.f.shape:
            raise ValueError(f"weight has shape {tuple(shape)}, the K-FAC factors are for {self.f.shape}")

    def diagonal(self) -> torch.Tensor:
        return torch.outer(torch.diagonal(self.f.G), torch.diagonal(self.f.A)).float()

    def inverse_diagonal(self) -> torch.Tensor:
        f = self.f.eigen()

        def inv_diag(Q: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
            d = lam + self.damp * float(lam.mean())
            if float(d.min()) <= 0:
                raise ValueError("a K-FAC factor is singular: use damp > 0")
            return (Q * Q / d[None, :]).sum(1)

        return torch.outer(inv_diag(f.QG, f.lamG), inv_diag(f.QA, f.lamA)).float()


def as_curvature(H: torch.Tensor | Curvature | None) -> Curvature | None:
    """A tensor is a layer Hessian; a :class:`Curvature` is itself; None stays None."""
    if H is None or isinstance(H, Curvature):
        return H
    return LayerHessian(H)


_last_inverse: list[Any] = []  # [weakref to H, H._version, damp, result]: linears of one stage share H


def inverse_hessian_diag(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``diag(H^-1)`` of the damped Hessian, raising the damping until Cholesky succeeds.

    The last result is remembered for the same (unmodified) H tensor: q/k/v and gate/up share
    one Hessian, so their selection factorises it once.
    """
    if _last_inverse and _last_inverse[0]() is H and _last_inverse[1:3] == [H._version, damp]:
        return _last_inverse[3].clone()
    out = _inverse_hessian_diag(H, damp)
    _last_inverse[:] = [weakref.ref(H), H._version, damp, out]
    return out.clone()


def _inverse_hessian_diag(H: torch.Tensor, damp: float) -> torch.Tensor:
    return inverse_diag(H, damp)[0].float()
