"""Choosing the ortho support from scores, and the values stored on it."""

from __future__ import annotations

import torch

from libortho.select.scores import damped_hessian


def topk_mask(scores: torch.Tensor, rho: float) -> torch.Tensor:
    """Boolean mask of the ``round(rho * numel)`` highest-scoring entries (ties broken by index)."""
    k = int(round(rho * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(scores.flatten().float(), k, sorted=False).indices] = True
    return mask.view(scores.shape)


def threshold_mask(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Boolean mask of entries whose score is strictly above ``tau``."""
    return scores > tau


def global_threshold(scores: list[torch.Tensor], rho: float) -> float:
    """Score threshold that keeps the top ``rho`` fraction of all entries of all layers."""
    total = sum(s.numel() for s in scores)
    k = int(round(rho * total))
    if k <= 0:
        return float("inf")
    flat = torch.cat([s.flatten().float() for s in scores])
    # the k-th largest score; entries strictly above it plus ties are kept by `>=`
    return float(torch.kthvalue(flat, total - k + 1).values)


# Batches of per-row systems hold at most this many float64 entries (32 MiB): rows with large
# supports are solved one by one, small ones many at a time.
SOLVE_BATCH_ENTRIES = 1 << 22


def optimal_values(E: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Ortho values on ``mask`` minimising ``(e - d)^T H (e - d)`` per row with the base fixed.

    ``E = W - Q`` is the full residual; on each row's support S the solution is
    ``d_S = (H_SS)^-1 (H e)_S`` with H damped like GPTQ (:func:`damped_hessian`: dead inputs get
    ``H_jj = 1``, then ``damp * mean(diag H)`` is added to the diagonal). Rows are grouped by support
    size, so no system is padded, and each group is solved in batches of bounded memory by Cholesky.
    Cholesky, not LU: torch's batched LU solve on CPU fails with "Parameter 6 was incorrect on entry
    to DLASWP" for systems of ~150 unknowns or more when more than one thread runs (pytorch#142815).
    A system whose block is not positive definite is solved alone by LU. Returns a dense matrix
    (dtype of E) that is zero off the support.
    """
    if E.shape != mask.shape or H.shape != (E.shape[1], E.shape[1]):
        raise ValueError(f"optimal values need E and mask of one shape and H (d_in, d_in); got E {tuple(E.shape)}, "
                         f"mask {tuple(mask.shape)}, H {tuple(H.shape)}")
    Hd = damped_hessian(H, damp)
    HE = E.double() @ Hd  # (d_out, d_in): row i is (H e_i)^T since H is symmetric
    out = torch.zeros_like(HE)
    counts = mask.sum(1)
    for k in torch.unique(counts[counts > 0]).tolist():
        rows = torch.nonzero(counts == k, as_tuple=False).flatten()
        per = max(1, SOLVE_BATCH_ENTRIES // (k * k))
        for start in range(0, rows.numel(), per):
            r = rows[start:start + per]
            cols = torch.nonzero(mask[r], as_tuple=False)[:, 1].view(r.numel(), k)  # row-major: k per row
            out[r.unsqueeze(-1), cols] = _solve_spd(Hd[cols.unsqueeze(-1), cols.unsqueeze(-2)],
                                                    HE[r.unsqueeze(-1), cols])
    return out.to(E.dtype)


def _solve_spd(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``A x = b`` for a batch ``A (n, k, k)``, ``b (n, k)``: Cholesky, LU one by one where it fails."""
    L, info = torch.linalg.cholesky_ex(A)
    x = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    for t in torch.nonzero(info, as_tuple=False).flatten().tolist():
        x[t] = torch.linalg.solve(A[t], b[t])
    return x
