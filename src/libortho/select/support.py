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


def optimal_values(E: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, damp: float = 0.01,
                   chunk: int = 256) -> torch.Tensor:
    """Ortho values on ``mask`` minimising ``(e - d)^T H (e - d)`` per row with the base fixed.

    ``E = W - Q`` is the full residual; on each row's support S the solution is
    ``d_S = (H_SS)^-1 (H e)_S`` (damped like GPTQ). Rows are solved in padded batches.
    Returns a dense matrix that is zero off the support.
    """
    Hd = damped_hessian(H, damp)
    E64 = E.double()
    HE = E64 @ Hd  # (d_out, d_in): row i is (H e_i)^T since H is symmetric
    out = torch.zeros_like(E64)
    counts = mask.sum(1)
    rows = torch.nonzero(counts, as_tuple=False).flatten()
    for start in range(0, rows.numel(), chunk):
        r = rows[start:start + chunk]
        kmax = int(counts[r].max())
        cols = torch.zeros(r.numel(), kmax, dtype=torch.long)
        valid = torch.zeros(r.numel(), kmax, dtype=torch.bool)
        for t, i in enumerate(r.tolist()):
            c = torch.nonzero(mask[i], as_tuple=False).flatten()
            cols[t, : c.numel()] = c
            valid[t, : c.numel()] = True
        A = Hd[cols.unsqueeze(-1), cols.unsqueeze(-2)]  # (b, k, k)
        pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)
        eye = torch.eye(kmax, dtype=A.dtype).expand_as(A)
        A = torch.where(pair, A, eye)
        b = torch.where(valid, HE[r.unsqueeze(-1), cols], torch.zeros((), dtype=A.dtype))
        d = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
        for t, i in enumerate(r.tolist()):
            n = int(valid[t].sum())
            out[i, cols[t, :n]] = d[t, :n]
    return out.to(E.dtype)
