"""Membership inference: every attack against a hand computation, ROC summaries against known answers."""

import math
import zlib

import numpy as np
import pytest
import torch
from scipy import stats

from libortho.eval import mia
from libortho.eval.mia import (
    ATTACKS,
    RecordScores,
    attack_scores,
    lowest_k_mean,
    mia_report,
    records,
    roc_summary,
    tpr_at_fpr,
)
from libortho.eval.scoring import TokenStats, next_token_stats

LN2 = math.log(2.0)


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def _rec(logp, text: str = "abc", mu=None, sigma=None, ref=None) -> RecordScores:
    logp = torch.as_tensor(logp, dtype=torch.float64)
    mu = torch.zeros_like(logp) if mu is None else torch.as_tensor(mu, dtype=torch.float64)
    sigma = torch.ones_like(logp) if sigma is None else torch.as_tensor(sigma, dtype=torch.float64)
    return RecordScores(text, logp, mu, sigma, None if ref is None else torch.as_tensor(ref, dtype=torch.float64))


# --------------------------------------------------------------------------------------------- the registry


def test_registry_holds_the_documented_attacks() -> None:
    assert {"loss", "zlib", "min_k", "min_k_plus_plus", "reference"} <= set(ATTACKS)


def test_register_attack_adds_to_the_registry(monkeypatch) -> None:
    monkeypatch.setattr(mia, "ATTACKS", dict(mia.ATTACKS))

    @mia.register_attack("max_logp")
    def max_logp(r: RecordScores, _k: float) -> float:
        return float(r.logp.max())

    assert mia.ATTACKS["max_logp"] is max_logp
    out = mia.attack_scores([_rec([-1.0, -3.0]), _rec([-0.5, -9.0])], attacks=["max_logp", "loss"])
    np.testing.assert_allclose(out["max_logp"], [-1.0, -0.5])
    np.testing.assert_allclose(out["loss"], [-2.0, -4.75])
    assert "max_logp" in mia.attack_scores([_rec([-1.0, -2.0])])


# --------------------------------------------------------------------------------------------- attacks by hand


def test_lowest_k_mean_by_hand() -> None:
    v = _t(-1, -5, -2, -8, -0.5, -3, -4, -0.1, -6, -7)
    assert lowest_k_mean(v, 0.2) == pytest.approx((-8 - 7) / 2)  # ceil(0.2 * 10) = 2
    assert lowest_k_mean(v, 0.25) == pytest.approx((-8 - 7 - 6) / 3)  # ceil(2.5) = 3
    assert lowest_k_mean(v, 1.0) == pytest.approx(float(v.mean()))
    assert lowest_k_mean(v, 0.01) == -8  # at least one value
    assert lowest_k_mean(_t(-3, -1, -2), 0.2) == -3  # ceil(0.6) = 1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="k must be"):
            lowest_k_mean(v, bad)


def test_loss_and_min_k_by_hand() -> None:
    r = _rec([-0.5, -4.0, -1.0, -2.5, -0.1])
    assert ATTACKS["loss"](r, 0.2) == pytest.approx(-8.1 / 5)
    assert ATTACKS["min_k"](r, 0.2) == pytest.approx(-4.0)  # ceil(1.0) = 1 lowest
    assert ATTACKS["min_k"](r, 0.4) == pytest.approx((-4.0 - 2.5) / 2)
    assert ATTACKS["min_k"](r, 1.0) == pytest.approx(-8.1 / 5)


def test_min_k_plus_plus_by_hand_from_explicit_distributions() -> None:
    # Three next-token distributions over 3 tokens, written as probabilities; the record's tokens are
    # index 0 of the first, index 2 of the second and index 1 of the third.
    dists = [[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.7, 0.2, 0.1]]
    targets = [0, 2, 1]
    # by hand: first two have mu = -1.5 ln 2 and sigma = ln2 / 2, so z = +1 (p = 1/2) and z = -1 (p = 1/4)
    p3 = dists[2]
    mu3 = sum(p * math.log(p) for p in p3)
    sd3 = math.sqrt(sum(p * (math.log(p) - mu3) ** 2 for p in p3))
    z3 = (math.log(0.2) - mu3) / sd3
    assert mu3 == pytest.approx(-0.8018185525433372) and sd3 == pytest.approx(0.7031264534810098)
    expected_z = [1.0, -1.0, z3]  # z3 ~ -1.1486
    lp, mu, sd = next_token_stats(torch.log(torch.tensor(dists, dtype=torch.float64)), torch.tensor(targets))
    r = RecordScores("x", lp, mu, sd)
    zs = sorted(expected_z)
    assert ATTACKS["min_k_plus_plus"](r, 0.2) == pytest.approx(zs[0], abs=1e-9)  # ceil(0.6) = 1
    assert ATTACKS["min_k_plus_plus"](r, 0.5) == pytest.approx((zs[0] + zs[1]) / 2, abs=1e-9)  # ceil(1.5) = 2
    assert ATTACKS["min_k_plus_plus"](r, 1.0) == pytest.approx(sum(zs) / 3, abs=1e-9)
    # min-k (no normalisation) on the same record ranks the tokens differently: log 0.2 < log 0.25 < log 0.5
    assert ATTACKS["min_k"](r, 0.2) == pytest.approx(math.log(0.2))


def test_min_k_plus_plus_survives_zero_sigma() -> None:
    r = _rec([-1.0, -1.0], mu=[-1.0, -1.0], sigma=[0.0, 0.0])
    assert ATTACKS["min_k_plus_plus"](r, 1.0) == 0.0


def test_zlib_by_hand() -> None:
    text = "Directory: Alma Abernathy of Arden, e-mail alma.abernathy123@mailbox.example.\n"
    r = _rec([-1.0, -2.0, -3.0], text=text)
    n_bytes = len(zlib.compress(text.encode("utf-8")))
    assert 8 < n_bytes < len(text) + 12
    assert ATTACKS["zlib"](r, 0.2) == pytest.approx(-2.0 / n_bytes)
    # same likelihood, more compressible text -> the score is divided by fewer bytes
    rep = _rec([-1.0, -2.0, -3.0], text="a" * len(text))
    assert ATTACKS["zlib"](rep, 0.2) == pytest.approx(-2.0 / len(zlib.compress(b"a" * len(text))))
    assert ATTACKS["zlib"](rep, 0.2) < ATTACKS["zlib"](r, 0.2)
    # multi-byte characters count in UTF-8 bytes
    u = _rec([-1.0], text="é" * 40)
    assert ATTACKS["zlib"](u, 0.2) == pytest.approx(-1.0 / len(zlib.compress(("é" * 40).encode("utf-8"))))


def test_reference_by_hand() -> None:
    r = _rec([-1.0, -2.0, -3.0], ref=[-4.0, -4.0, -5.0, -3.0])
    assert ATTACKS["reference"](r, 0.2) == pytest.approx(-2.0 - (-4.0))
    with pytest.raises(ValueError, match="reference"):
        ATTACKS["reference"](_rec([-1.0]), 0.2)


def test_attacks_are_oriented_members_higher() -> None:
    """A record the model fits better (a memorised member) scores higher under every attack."""
    mu, sigma = [-2.0] * 5, [1.0] * 5
    member = _rec([-0.1, -0.2, -0.1, -0.3, -0.1], mu=mu, sigma=sigma, ref=[-2.0] * 5)
    other = _rec([-2.0, -3.0, -1.5, -4.0, -2.5], mu=mu, sigma=sigma, ref=[-2.0] * 5)
    for name, fn in ATTACKS.items():
        assert fn(member, 0.2) > fn(other, 0.2), name


# --------------------------------------------------------------------------------------------- records / attack_scores


def test_records_bundles_and_validates() -> None:
    st = TokenStats([_t(-1, -2), _t(-3)], [_t(0, 0), _t(0)], [_t(1, 1), _t(1)])
    ref = TokenStats([_t(-5, -5), _t(-6)], [_t(0, 0), _t(0)], [_t(1, 1), _t(1)])
    recs = records(["a", "b"], st, ref)
    assert [r.text for r in recs] == ["a", "b"] and recs[1].logp is st.logp[1] and recs[0].ref_logp is ref.logp[0]
    assert records(["a", "b"], st)[0].ref_logp is None
    with pytest.raises(ValueError, match="one entry per record"):
        records(["a"], st)
    with pytest.raises(ValueError, match="one entry per record"):
        records(["a", "b"], st, TokenStats([_t(-1)], [_t(0)], [_t(1)]))


def test_attack_scores_includes_reference_only_when_every_record_has_it() -> None:
    with_ref = [_rec([-1.0], ref=[-2.0]), _rec([-3.0], ref=[-1.0])]
    without = [_rec([-1.0]), _rec([-3.0], ref=[-1.0])]
    assert "reference" in attack_scores(with_ref)
    assert "reference" not in attack_scores(without)
    assert set(attack_scores(without)) == set(ATTACKS) - {"reference"}
    out = attack_scores(with_ref, attacks=["reference"])
    assert list(out) == ["reference"] and out["reference"].dtype == np.float64
    np.testing.assert_allclose(out["reference"], [1.0, -2.0])
    with pytest.raises(KeyError, match="unknown attack"):
        attack_scores(with_ref, attacks=["loss", "nope"])


# --------------------------------------------------------------------------------------------- ROC


def _slow_tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Max TPR over thresholds 'score >= t' (t from the scores, plus +inf) whose FPR <= fpr."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    best = 0.0
    for t in [np.inf, *np.unique(scores)]:
        if (neg >= t).mean() <= fpr + 1e-12:
            best = max(best, float((pos >= t).mean()))
    return best


def _slow_auc(member: np.ndarray, nonmember: np.ndarray) -> float:
    wins = sum(1.0 if m > n else 0.5 if m == n else 0.0 for m in member for n in nonmember)
    return wins / (member.size * nonmember.size)


def test_tpr_at_fpr_by_hand() -> None:
    member = np.array([0.9, 0.8, 0.4])
    nonmember = np.array([0.7, 0.3, 0.2, 0.1])
    labels = np.r_[np.ones(3), np.zeros(4)]
    scores = np.r_[member, nonmember]
    # threshold above 0.7: FPR 0, TPR 2/3; threshold 0.4: FPR 1/4, TPR 1
    assert tpr_at_fpr(labels, scores, 0.0) == pytest.approx(2 / 3)
    assert tpr_at_fpr(labels, scores, 0.2) == pytest.approx(2 / 3)
    assert tpr_at_fpr(labels, scores, 0.25) == pytest.approx(1.0)
    assert tpr_at_fpr(labels, scores, 1.0) == pytest.approx(1.0)
    # reversed orientation: no member is above any non-member at FPR 0
    assert tpr_at_fpr(labels, -scores, 0.0) == 0.0


def test_tpr_at_fpr_and_auc_match_slow_references_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        member = rng.integers(0, 12, 40).astype(float)  # many ties
        nonmember = rng.integers(-3, 9, 60).astype(float)
        labels = np.r_[np.ones(40), np.zeros(60)]
        scores = np.r_[member, nonmember]
        for fpr in (0.0, 0.01, 0.05, 0.1, 0.3, 0.5):
            assert tpr_at_fpr(labels, scores, fpr) == pytest.approx(_slow_tpr_at_fpr(labels, scores, fpr))
        assert roc_summary(member, nonmember)["auc"] == pytest.approx(_slow_auc(member, nonmember))


def test_roc_summary_identical_distributions_give_chance() -> None:
    rng = np.random.default_rng(1)
    s = roc_summary(rng.normal(size=5000), rng.normal(size=5000))
    assert s["auc"] == pytest.approx(0.5, abs=0.02)
    assert s["tpr_at_1pct_fpr"] < 0.04 and s["tpr_at_0.1pct_fpr"] < 0.01
    assert s["n_members"] == s["n_nonmembers"] == 5000
    # all-equal scores: exactly chance
    tie = roc_summary(np.zeros(10), np.zeros(30))
    assert tie["auc"] == 0.5 and tie["tpr_at_1pct_fpr"] == 0.0


def test_roc_summary_known_gaussian_shift() -> None:
    # members ~ N(1, 1), non-members ~ N(0, 1): AUC = Phi(1 / sqrt 2) ~ 0.7602
    rng = np.random.default_rng(2)
    s = roc_summary(rng.normal(1.0, 1.0, 6000), rng.normal(0.0, 1.0, 6000))
    assert s["auc"] == pytest.approx(stats.norm.cdf(1 / math.sqrt(2)), abs=0.015)


def test_roc_summary_perfect_separation_and_reversed() -> None:
    member, nonmember = np.linspace(1.0, 2.0, 50), np.linspace(-1.0, 0.5, 200)
    s = roc_summary(member, nonmember)
    assert s == {"auc": 1.0, "tpr_at_1pct_fpr": 1.0, "tpr_at_0.1pct_fpr": 1.0, "n_members": 50, "n_nonmembers": 200}
    r = roc_summary(nonmember, member)
    assert r["auc"] == 0.0 and r["tpr_at_1pct_fpr"] == 0.0 and r["tpr_at_0.1pct_fpr"] == 0.0


def test_roc_summary_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one"):
        roc_summary(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match="at least one"):
        roc_summary(np.array([1.0]), np.array([]))
    with pytest.raises(ValueError, match="finite"):
        roc_summary(np.array([1.0, np.nan]), np.array([0.0]))
    with pytest.raises(ValueError, match="finite"):
        roc_summary(np.array([1.0]), np.array([-np.inf]))


# --------------------------------------------------------------------------------------------- mia_report


def _population(seed: int, center: float, n: int, with_ref: bool) -> list[RecordScores]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lp = center + 0.3 * torch.randn(12, generator=g, dtype=torch.float64)
        out.append(_rec(lp.clamp(max=-1e-3), text=f"record {i} of seed {seed}", mu=torch.full((12,), -3.0),
                        sigma=torch.full((12,), 1.5), ref=torch.full((12,), -3.0) if with_ref else None))
    return out


def test_mia_report_separated_populations() -> None:
    members, nonmembers = _population(0, -0.5, 30, False), _population(1, -4.0, 40, False)
    rep = mia_report(members, nonmembers)
    assert set(rep) == set(ATTACKS) - {"reference"}
    for name, s in rep.items():
        assert s["auc"] == 1.0 and s["tpr_at_1pct_fpr"] == 1.0, name
        assert s["n_members"] == 30 and s["n_nonmembers"] == 40
    # swapping the roles flips every attack to AUC 0
    assert all(s["auc"] == 0.0 for s in mia_report(nonmembers, members).values())


def test_mia_report_reference_and_same_distribution() -> None:
    members, nonmembers = _population(2, -2.0, 200, True), _population(3, -2.0, 200, True)
    rep = mia_report(members, nonmembers)
    assert "reference" in rep
    for s in rep.values():
        assert 0.35 < s["auc"] < 0.65
    # the reference attack with a reference equal to the target gives exact chance (all scores zero)
    same = [RecordScores(r.text, r.logp, r.mu, r.sigma, r.logp) for r in members[:20]]
    same_n = [RecordScores(r.text, r.logp, r.mu, r.sigma, r.logp) for r in nonmembers[:20]]
    assert mia_report(same, same_n)["reference"]["auc"] == 0.5
    # reference scores on members only: the non-members cannot be scored by the same attacks
    with pytest.raises(ValueError, match="reference"):
        mia_report(members[:5], _population(4, -2.0, 5, False))


def test_mia_report_k_reaches_the_min_k_attacks() -> None:
    """k = 0.1 reads the single lowest token (member -1.5 < non-member -1: AUC 0); k = 0.2 the two lowest
    (member mean -0.755 > -1: AUC 1). The AUC flips only if ``mia_report`` passes k to the attacks."""
    member, nonmember = [_rec([-0.01] * 9 + [-1.5])], [_rec([-1.0] * 10)]
    at_01, at_02, default = (mia_report(member, nonmember, k=0.1), mia_report(member, nonmember, k=0.2),
                             mia_report(member, nonmember))
    for attack in ("min_k", "min_k_plus_plus"):  # mu = 0, sigma = 1: min-k%++ reads the same numbers
        assert at_01[attack]["auc"] == 0.0 and at_02[attack]["auc"] == 1.0, attack
        assert default[attack]["auc"] == 1.0  # the documented default k = 20%
    for attack in ("loss", "zlib"):  # whole-record attacks ignore k (member mean -0.159 > -1)
        assert at_01[attack] == at_02[attack] and at_01[attack]["auc"] == 1.0, attack
