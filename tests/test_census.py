"""Outlier census on a synthetic model with planted functional and sensitive weights.

Three linear "layers" y = W x. Inputs 0-19 are public features (active on public data); inputs 20-39
are rare features that only the private records use. Each layer holds a planted functional group
(large weights on busy public inputs: removing them wrecks the public loss) and a planted sensitive
group (moderate weights on rare inputs that fit the member records: a coarse quantizer rounds them to
zero, and keeping them in precision brings back the members' low loss). The census must label the
first functional, the second sensitive, random groups neither, and find the two kinds apart.
"""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from libortho.geometry.census import (
    OutlierGroup,
    classify,
    excess_kurtosis,
    group_features,
    label_census,
    make_group,
    null_threshold,
    run_census,
    separation_scores,
)

D_OUT, D_IN = 8, 40


def _world(seed: int):
    g = torch.Generator().manual_seed(seed)
    W = 0.05 * torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    W[:3, :3] = 4.0 + torch.rand(3, 3, generator=g, dtype=torch.float64)  # functional: busy inputs
    W[4:7, 24:27] = 0.6 + 0.1 * torch.rand(3, 3, generator=g, dtype=torch.float64)  # sensitive: rare inputs
    X_pub = torch.zeros(400, D_IN, dtype=torch.float64)
    X_pub[:, :20] = torch.randn(400, 20, generator=g, dtype=torch.float64) * torch.linspace(3, 0.5, 20)
    X_mem = torch.zeros(30, D_IN, dtype=torch.float64)
    X_mem[:, 24:27] = 1.0 + torch.rand(30, 3, generator=g, dtype=torch.float64)
    X_non = X_mem.clone()
    y_mem = X_mem @ W.T  # members' targets are what the memorising weights produce
    y_non = y_mem[torch.randperm(30, generator=g)] + 0.8 * torch.randn(30, D_OUT, generator=g, dtype=torch.float64)
    X = torch.cat([X_pub, X_mem])
    H = 2 * X.T @ X / X.shape[0] + 1e-3 * torch.eye(D_IN, dtype=torch.float64)
    return W, H, X_pub, (X_mem, y_mem), (X_non, y_non)


def _callbacks(W, X_pub, mem, non):
    step = 2.0  # a coarse grid: the moderate memorising weights round to zero
    Wq = torch.round(W / step) * step

    def public_loss(M):
        return float(((X_pub @ (M - W).T) ** 2).mean())

    def auc(M):
        lm = ((mem[0] @ M.T - mem[1]) ** 2).sum(1)
        ln = ((non[0] @ M.T - non[1]) ** 2).sum(1)
        return float(roc_auc_score([1] * len(lm) + [0] * len(ln), torch.cat([-lm, -ln]).numpy()))

    def delta_ppl(g: OutlierGroup) -> float:
        M = W.clone()
        M[g.rows, g.cols] = 0.0
        return public_loss(M) - public_loss(W)

    def delta_auc(g: OutlierGroup) -> float:
        M = Wq.clone()
        M[g.rows, g.cols] = W[g.rows, g.cols]
        return auc(M) - auc(Wq)

    return delta_ppl, delta_auc


def test_census_labels_planted_groups_and_finds_them_apart() -> None:
    groups, weights, hessians, cbs = [], {}, {}, {}
    for layer in range(3):
        W, H, X_pub, mem, non = _world(layer)
        name = f"layer{layer}"
        weights[name], hessians[name] = W, H
        cbs[name] = _callbacks(W, X_pub, mem, non)
        r, c = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
        groups.append(OutlierGroup(name, "magnitude", r.flatten(), c.flatten()))
        groups.append(OutlierGroup(name, "saliency", r.flatten() + 4, c.flatten() + 24))
        gen = torch.Generator().manual_seed(100 + layer)
        groups += [make_group(name, "random", W, H, 9, generator=gen) for _ in range(4)]
    out = run_census(groups, weights, hessians, lambda g: cbs[g.layer][0](g), lambda g: cbs[g.layer][1](g))
    labels = out["labels"]["seed"]
    kinds = [r["kind"] for r in out["records"] if r["kind"] != "random"]
    assert labels == ["functional" if k == "magnitude" else "sensitive" for k in kinds]
    rand = [r for r in out["records"] if r["kind"] == "random"]
    # a random group can hit a planted entry (9 of 320); most do not, and those are neither
    neither = [classify(r["delta_ppl"], r["delta_auc"], 0.3, 0.1) == "neither" for r in rand]
    assert sum(neither) >= 8, neither
    assert out["thresholds"]["null"]["ppl"] == pytest.approx(np.quantile([r["delta_ppl"] for r in rand], 0.95))
    sep = out["separation"]["seed"]
    assert sep["labels"] == {"functional": 3, "sensitive": 3}
    assert sep["silhouette"] > 0.5 and sep["davies_bouldin"] < 1.0
    func = [r for r in out["records"] if r["kind"] == "magnitude"]
    sens = [r for r in out["records"] if r["kind"] == "saliency"]
    assert min(r["curvature"] for r in func) > max(r["curvature"] for r in sens)  # busy vs rare inputs


def test_features_against_direct_formulas() -> None:
    W, H, *_ = _world(0)
    g = OutlierGroup("l", "magnitude", torch.tensor([0, 1]), torch.tensor([2, 5]))
    f = group_features(g, W, H)
    assert f["magnitude"] == pytest.approx(float((W[0, 2].abs() + W[1, 5].abs()) / 2 / W.pow(2).mean().sqrt()))
    assert f["curvature"] == pytest.approx(float((H[2, 2] + H[5, 5]) / 2 / torch.diagonal(H).mean()))
    G = torch.zeros_like(W)
    G[0, 2], G[1, 5] = W[0, 2], W[1, 5]
    rq = sum(float(G[r] @ H @ G[r]) for r in range(D_OUT)) / float((G * G).sum())
    assert f["alignment"] == pytest.approx(rq / float(torch.linalg.eigvalsh(H)[-1]))
    assert 0 <= f["alignment"] <= 1
    x = torch.randn(200000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(excess_kurtosis(x)) < 0.05 and excess_kurtosis(torch.tensor([0.0] * 98 + [10.0, -10.0])) > 20


def test_group_kinds_pick_what_they_say() -> None:
    W, H, *_ = _world(1)
    mag = make_group("l", "magnitude", W, H, 4)
    assert set(W[mag.rows, mag.cols].abs().tolist()) == set(torch.topk(W.abs().flatten(), 4).values.tolist())
    ch = make_group("l", "channel", W, H, 4)
    col = int(torch.argmax(torch.diagonal(H)))
    assert ch.size == 4 and set(ch.cols.tolist()) == {col}
    assert set(ch.rows.tolist()) == set(torch.topk(W[:, col].abs(), 4).indices.tolist())
    sal = make_group("l", "saliency", W, H, 4)
    hinv = torch.linalg.inv(H + 0.01 * torch.diagonal(H).mean() * torch.eye(D_IN, dtype=torch.float64)).diagonal()
    want = torch.topk((W**2 / hinv).flatten(), 4).indices
    assert sorted((sal.rows * D_IN + sal.cols).tolist()) == sorted(want.tolist())
    with pytest.raises(ValueError, match="unknown outlier group kind"):
        make_group("l", "loud", W, H, 4)


def test_thresholds_and_separation_edge_cases() -> None:
    assert classify(0.3, 0.1, 0.3, 0.1) == "both" and classify(0.29, 0.0, 0.3, 0.1) == "neither"
    with pytest.raises(ValueError, match="at least 2 random groups"):
        null_threshold([0.1])
    s = separation_scores(np.zeros((3, 4)), ["functional", "functional", "sensitive"])
    assert s["silhouette"] is None and "two or more" in s["why"]
    out = label_census([{"kind": "magnitude", "delta_ppl": 1.0, "delta_auc": 0.0, "magnitude": 1.0, "curvature": 1.0,
                         "alignment": 0.1, "kurtosis": 0.0}])
    assert "null" not in out["thresholds"] and out["labels"]["seed"] == ["functional"]
