"""Outlier census (seed 004): which groups of outlier weights carry function, which carry memory, and
whether the two kinds are geometrically apart.

A group is a set of entries of one linear layer, chosen by magnitude (largest ``|w|``), by saliency
(largest OBS cost of removal ``w^2 / [H^-1]_jj``), by channel (the largest ``|w|`` of the input channel
with the most activation energy, ``argmax H_jj``) or at random (the null); all of the same size, so the
null compares like with like. Each group is measured
twice by callbacks the experiment supplies:

* functional: ``delta_ppl`` -- perplexity points lost when the group is removed (zeroed);
* sensitive: ``delta_auc`` -- membership-inference AUC gained when the group is kept at full
  precision inside an otherwise quantized model.

The seed's thresholds are ``delta_ppl >= 0.3`` and ``delta_auc >= 0.1``; beside them the census
derives permutation-null thresholds from the random groups (a delta must exceed the 95th percentile of
theirs), since
quantizing a whole model moves AUC by only a few hundredths and 0.1 may be out of reach.

Geometric features per group (pure functions of W and H): magnitude (mean ``|w|`` over the layer's
RMS), curvature (mean ``H_jj`` of the group's columns over the layer's mean), Hessian alignment (the
group's Rayleigh quotient ``sum_r g_r H g_r^T / (||G||^2 lambda_max)``), and kurtosis (excess
kurtosis of the columns the group touches). Whether functional and sensitive groups are apart is
scored by silhouette and Davies-Bouldin (scikit-learn) on standardised features, and drawn on a 2-D map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from libortho.curvature.damping import inverse_diag

KINDS = ("magnitude", "saliency", "channel", "random")
SEED_PPL_THRESHOLD = 0.3
SEED_AUC_THRESHOLD = 0.1
FEATURES = ("magnitude", "curvature", "alignment", "kurtosis")


@dataclass(frozen=True)
class OutlierGroup:
    """Entries ``(rows[i], cols[i])`` of the linear layer ``layer``, chosen by ``kind``."""

    layer: str
    kind: str
    rows: torch.Tensor
    cols: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.rows.numel())

    def mask(self, shape: tuple[int, int]) -> torch.Tensor:
        """Boolean mask of the group's entries in a weight of ``shape``."""
        m = torch.zeros(shape, dtype=torch.bool)
        m[self.rows, self.cols] = True
        return m


def _top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.topk(scores.flatten(), min(k, scores.numel())).indices
    return idx // scores.shape[1], idx % scores.shape[1]


def make_group(layer: str, kind: str, W: torch.Tensor, H: torch.Tensor, k: int, damp: float = 0.01,
               generator: torch.Generator | None = None) -> OutlierGroup:
    """One group of ``layer`` (weight ``W (d_out, d_in)``, Hessian ``H``) of the given kind and about ``k`` entries."""
    if kind not in KINDS:
        raise ValueError(f"unknown outlier group kind {kind!r}; available: {', '.join(KINDS)}")
    if k < 1:
        raise ValueError(f"a group needs k >= 1 entries, got {k}")
    W = W.detach().double()
    if kind == "magnitude":
        rows, cols = _top(W.abs(), k)
    elif kind == "saliency":
        hinv, _ = inverse_diag(H.detach(), damp)
        rows, cols = _top(W**2 / hinv[None, :], k)
    elif kind == "channel":
        col = int(torch.argmax(torch.diagonal(H)))
        rows = torch.topk(W[:, col].abs(), min(k, W.shape[0])).indices
        cols = torch.full_like(rows, col)
    else:
        idx = torch.randperm(W.numel(), generator=generator)[:min(k, W.numel())]
        rows, cols = idx // W.shape[1], idx % W.shape[1]
    return OutlierGroup(layer, kind, rows, cols)


def excess_kurtosis(x: torch.Tensor) -> float:
    """Fisher's excess kurtosis of the values of ``x`` (0 for a Gaussian)."""
    x = x.double().flatten()
    c = x - x.mean()
    var = float((c**2).mean())
    return float((c**4).mean() / var**2 - 3.0) if var > 0 else 0.0


def group_features(group: OutlierGroup, W: torch.Tensor, H: torch.Tensor) -> dict[str, float]:
    """The group's geometric features (module docstring), each normalised by its layer."""
    W, H = W.detach().double(), H.detach().double()
    G = torch.zeros_like(W)
    G[group.rows, group.cols] = W[group.rows, group.cols]
    lam_max = float(torch.linalg.eigvalsh(H)[-1])
    energy = float((G * G).sum())
    diag = torch.diagonal(H)
    cols = torch.unique(group.cols)
    return {"magnitude": float(W[group.rows, group.cols].abs().mean() / W.pow(2).mean().sqrt()),
            "curvature": float(diag[group.cols].mean() / diag.mean()),
            "alignment": float(((G @ H) * G).sum() / (energy * lam_max)) if energy > 0 and lam_max > 0 else 0.0,
            "kurtosis": excess_kurtosis(W[:, cols])}


def null_threshold(null_deltas: list[float], level: float = 0.95) -> float:
    """The ``level`` quantile of the random groups' deltas: a delta above it is unusual for a group of that size."""
    if len(null_deltas) < 2:
        raise ValueError(f"a permutation-null threshold needs at least 2 random groups, got {len(null_deltas)}")
    return float(np.quantile(np.asarray(null_deltas, dtype=float), level))


def classify(delta_ppl: float, delta_auc: float, ppl_threshold: float, auc_threshold: float,
             strict: bool = False) -> str:
    """``functional``, ``sensitive``, ``both`` or ``neither`` under the given thresholds (``strict``: the delta
    must exceed the threshold, as for a null quantile, which random groups themselves reach)."""
    if strict:
        f, s = delta_ppl > ppl_threshold, delta_auc > auc_threshold
    else:
        f, s = delta_ppl >= ppl_threshold, delta_auc >= auc_threshold
    return "both" if f and s else "functional" if f else "sensitive" if s else "neither"


def separation_scores(features: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Silhouette and Davies-Bouldin of the labelled groups on standardised features (None where undefined:
    fewer than two labels, or a label with a single member)."""
    from sklearn.metrics import davies_bouldin_score, silhouette_score

    labels_arr = np.asarray(labels)
    names, counts = np.unique(labels_arr, return_counts=True)
    out: dict[str, Any] = {"labels": {str(n): int(c) for n, c in zip(names, counts, strict=True)}}
    if len(names) < 2 or counts.min() < 2 or len(labels) <= len(names):
        out.update(silhouette=None, davies_bouldin=None,
                   why="needs at least two labels with two or more groups each")
        return out
    X = np.asarray(features, dtype=float)
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    out.update(silhouette=float(silhouette_score(X, labels_arr)),
               davies_bouldin=float(davies_bouldin_score(X, labels_arr)))
    return out


def embed_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """A 2-D map of the standardised features: UMAP when umap-learn is installed, else t-SNE (named in the result)."""
    X = np.asarray(features, dtype=float)
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    try:
        import umap  # type: ignore[import-not-found]

        # a fixed random_state makes UMAP single-threaded; say so rather than let it warn
        reducer = umap.UMAP(n_components=2, random_state=seed, n_jobs=1, n_neighbors=min(15, len(X) - 1))
        return reducer.fit_transform(X), "umap"
    except ImportError:
        from sklearn.manifold import TSNE

        perplexity = max(2.0, min(30.0, (len(X) - 1) / 3))
        return TSNE(n_components=2, random_state=seed, perplexity=perplexity, init="pca").fit_transform(X), "tsne"


def run_census(groups: list[OutlierGroup], weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
               delta_ppl: Callable[[OutlierGroup], float], delta_auc: Callable[[OutlierGroup], float],
               on_group: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every group, derive both thresholds, label, score the separation of the labels.

    ``on_group(i, record)`` sees each record as it is measured (progress, caching).
    """
    records = []
    for i, g in enumerate(groups):
        rec = {"layer": g.layer, "kind": g.kind, "size": g.size,
               **group_features(g, weights[g.layer], hessians[g.layer]),
               "delta_ppl": float(delta_ppl(g)), "delta_auc": float(delta_auc(g))}
        records.append(rec)
        if on_group is not None:
            on_group(i, rec)
    return label_census(records)


def label_census(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Thresholds (seed and permutation-null), labels under each, separation scores, from measured records."""
    null = [r for r in records if r["kind"] == "random"]
    thresholds = {"seed": {"ppl": SEED_PPL_THRESHOLD, "auc": SEED_AUC_THRESHOLD}}
    if len(null) >= 2:
        thresholds["null"] = {"ppl": null_threshold([r["delta_ppl"] for r in null]),
                              "auc": null_threshold([r["delta_auc"] for r in null])}
    outliers = [r for r in records if r["kind"] != "random"]
    feats = np.array([[r[f] for f in FEATURES] for r in outliers]) if outliers else np.zeros((0, len(FEATURES)))
    out: dict[str, Any] = {"records": records, "thresholds": thresholds, "labels": {}, "separation": {}}
    for name, t in thresholds.items():
        labels = [classify(r["delta_ppl"], r["delta_auc"], t["ppl"], t["auc"], strict=name == "null")
                  for r in outliers]
        out["labels"][name] = labels
        both_kinds = [(f, lab) for f, lab in zip(feats, labels, strict=True) if lab in ("functional", "sensitive")]
        out["separation"][name] = separation_scores(np.array([f for f, _ in both_kinds]).reshape(-1, len(FEATURES)),
                                                    [lab for _, lab in both_kinds])
    return out
