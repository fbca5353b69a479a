"""Small-sample statistics against slow references written from the definitions."""

import math

import numpy as np
import pytest

from libortho.eval.stats import clopper_pearson, mcnemar_exact, paired_bootstrap_ppl_diff


def _binom_tail_ge(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed term by term."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize(("k", "n"), [(1, 24), (3, 24), (12, 24), (23, 24), (5, 7)])
def test_clopper_pearson_bounds_solve_the_tail_equations(k, n) -> None:
    ci = clopper_pearson(k, n, level=0.95)
    assert ci.estimate == pytest.approx(k / n)
    # the lower bound L has P(X >= k | L) = 2.5%, the upper bound U has P(X <= k | U) = 2.5%
    assert _binom_tail_ge(k, n, ci.low) == pytest.approx(0.025, abs=1e-6)
    assert 1 - _binom_tail_ge(k + 1, n, ci.high) == pytest.approx(0.025, abs=1e-6)
    assert ci.low < k / n < ci.high


def test_clopper_pearson_edges_and_errors() -> None:
    zero, full = clopper_pearson(0, 24), clopper_pearson(24, 24)
    assert zero.low == 0.0 and 1 - _binom_tail_ge(1, 24, zero.high) == pytest.approx(0.025, abs=1e-6)
    assert full.high == 1.0 and full.low == pytest.approx(0.025 ** (1 / 24), rel=1e-9)
    for k, n in ((3, 2), (-1, 5), (0, 0)):
        with pytest.raises(ValueError, match="0 <= k <= n"):
            clopper_pearson(k, n)


@pytest.mark.parametrize(("b", "c", "p"), [(0, 0, 1.0), (0, 2, 0.5), (0, 5, 2 / 32), (1, 3, 2 * 5 / 16),
                                           (3, 1, 2 * 5 / 16), (10, 0, 2 / 1024), (4, 4, 1.0)])
def test_mcnemar_exact_known_values(b, c, p) -> None:
    first = [True] * b + [False] * c + [True] * 3 + [False] * 7  # 3 concordant yes, 7 concordant no
    second = [False] * b + [True] * c + [True] * 3 + [False] * 7
    res = mcnemar_exact(first, second)
    assert (res.b, res.c) == (b, c)
    assert res.p_value == pytest.approx(p)


def test_mcnemar_refuses_unpaired() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar_exact([True], [True, False])


def test_paired_bootstrap_sign_width_and_pairing() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(3.0, 0.5, size=32)  # block difficulty varies a lot
    same = paired_bootstrap_ppl_diff(base, base)
    assert same.estimate == 0.0 and same.low == 0.0 and same.high == 0.0
    worse = base + 0.02 + rng.normal(0, 0.002, size=32)  # b is slightly but consistently better
    ci = paired_bootstrap_ppl_diff(worse, base, n_boot=4000)
    assert ci.estimate == pytest.approx(math.exp(worse.mean()) - math.exp(base.mean()))
    assert ci.low > 0 and ci.excludes(0.0)  # pairing cancels block difficulty: the small shift is significant
    # the same shift on unpaired (shuffled) blocks is drowned by block difficulty: the interval is far wider
    shuffled = paired_bootstrap_ppl_diff(rng.permutation(worse), base, n_boot=4000)
    assert shuffled.high - shuffled.low > 10 * (ci.high - ci.low)
    flipped = paired_bootstrap_ppl_diff(base, worse, n_boot=4000)
    assert flipped.high < 0


def test_paired_bootstrap_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="equal 1-D"):
        paired_bootstrap_ppl_diff([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="equal 1-D"):
        paired_bootstrap_ppl_diff([1.0], [1.0])


def test_holm_step_down_known_cases() -> None:
    from libortho.eval.stats import holm

    # m = 4: 0.01 <= 0.05/4, 0.015 <= 0.05/3, 0.03 > 0.05/2 stops: the last two are kept even though 0.04 < 0.05
    assert holm([0.03, 0.01, 0.04, 0.015]) == [False, True, False, True]
    assert holm([0.2, 0.3]) == [False, False]
    assert holm([0.001] * 12) == [True] * 12
    assert holm([0.02] * 3) == [False] * 3  # each alone would pass at 5%; together they do not


def test_bootstrap_p_value_small_for_a_consistent_shift_and_large_for_noise() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(3.0, 0.5, size=32)
    assert paired_bootstrap_ppl_diff(base + 0.02, base, n_boot=2000).p_value <= 1 / 2000 + 1e-12
    noise = paired_bootstrap_ppl_diff(base + rng.normal(0, 0.05, size=32), base, n_boot=2000)
    assert noise.p_value > 0.05


def test_pair_matrix_auc_equals_sklearn_and_bootstrap_interval_brackets_it() -> None:
    from sklearn.metrics import roc_auc_score

    from libortho.eval.stats import bootstrap_auc, pair_matrix

    rng = np.random.default_rng(0)
    m = np.round(rng.normal(0.5, 1, 40), 1)  # rounding makes ties, which count one half
    n = np.round(rng.normal(0.0, 1, 90), 1)
    want = roc_auc_score(np.r_[np.ones(40), np.zeros(90)], np.r_[m, n])
    assert pair_matrix(m, n).mean() == pytest.approx(want, abs=1e-12)
    iv = bootstrap_auc(m, n, n_boot=500, seed=1)
    assert iv.estimate == pytest.approx(want, abs=1e-12) and iv.low < want < iv.high
    # a slow bootstrap by explicit resampling gives the same spread
    slow = [roc_auc_score(np.r_[np.ones(40), np.zeros(90)],
                          np.r_[m[rng.integers(0, 40, 40)], n[rng.integers(0, 90, 90)]]) for _ in range(500)]
    assert iv.high - iv.low == pytest.approx(np.quantile(slow, 0.975) - np.quantile(slow, 0.025), rel=0.25)


def test_privleak_is_zero_against_itself_and_signed_against_a_weaker_reference() -> None:
    from libortho.eval.stats import bootstrap_privleak

    rng = np.random.default_rng(2)
    m, n = rng.normal(1, 1, 60), rng.normal(0, 1, 200)
    same = bootstrap_privleak(m, n, m, n, n_boot=300)
    assert same.estimate == 0.0 and same.low == 0.0 and same.high == 0.0
    ref_m = rng.normal(0, 1, 60)  # a reference that did not memorise: AUC ~ 0.5
    leak = bootstrap_privleak(m, n, ref_m, n, n_boot=300)
    assert leak.estimate > 0.3 and leak.low > 0
    with pytest.raises(ValueError, match="same records"):
        bootstrap_privleak(m, n, m[:10], n)


def test_bootstrap_ppl_is_exp_of_mean_block_nll() -> None:
    from libortho.eval.stats import bootstrap_ppl

    nll = [3.0, 3.2, 2.9, 3.1, 3.05]
    iv = bootstrap_ppl(nll, n_boot=400)
    assert iv.estimate == pytest.approx(math.exp(np.mean(nll)))
    assert math.exp(min(nll)) <= iv.low <= iv.estimate <= iv.high <= math.exp(max(nll))


def test_stratified_bootstrap_pools_the_mean_and_removes_between_group_variance() -> None:
    from libortho.eval.stats import bootstrap_mean, stratified_bootstrap_mean

    rng = np.random.default_rng(5)
    noisy = rng.normal(0, 1, 100)
    iv = stratified_bootstrap_mean([np.full(100, 5.0), noisy], n_boot=4000)
    assert iv.estimate == pytest.approx(np.r_[np.full(100, 5.0), noisy].mean())
    # the constant group adds no sampling noise: the pooled mean's spread is half the noisy group's alone
    alone = bootstrap_mean(noisy, n_boot=4000)
    assert (iv.high - iv.low) == pytest.approx(0.5 * (alone.high - alone.low), rel=0.15)
    # a plain bootstrap over the concatenation would mix the two levels and be far wider
    plain = bootstrap_mean(np.r_[np.full(100, 5.0), noisy], n_boot=4000)
    assert plain.high - plain.low > 2 * (iv.high - iv.low)
    with pytest.raises(ValueError, match="empty group"):
        stratified_bootstrap_mean([noisy, []])


def test_stratified_bootstrap_covers_the_true_mean_about_95_percent() -> None:
    from libortho.eval.stats import stratified_bootstrap_mean

    rng = np.random.default_rng(11)
    hits = 0
    for t in range(200):
        groups = [rng.exponential(1.0, 60) + mu for mu in (0.0, 2.0, 4.0)]  # true pooled mean 3
        iv = stratified_bootstrap_mean(groups, n_boot=500, seed=t)
        hits += iv.low <= 3.0 <= iv.high
    assert 0.88 <= hits / 200 <= 0.99


def test_pooled_privleak_averages_the_seeds_and_matches_one_seed() -> None:
    from libortho.eval.stats import bootstrap_privleak, pooled_privleak

    rng = np.random.default_rng(3)
    seeds = [(rng.normal(s, 1, 50), rng.normal(0, 1, 150), rng.normal(0, 1, 50), rng.normal(0, 1, 150))
             for s in (0.2, 1.0, 2.0)]
    one = pooled_privleak(seeds[:1], n_boot=300, seed=4)
    ref = bootstrap_privleak(*seeds[0], n_boot=300, seed=4)
    assert (one.estimate, one.low, one.high) == pytest.approx((ref.estimate, ref.low, ref.high))
    per = [bootstrap_privleak(*s, n_boot=300).estimate for s in seeds]
    pooled = pooled_privleak(seeds, n_boot=300)
    assert pooled.estimate == pytest.approx(np.mean(per))
    assert pooled.low < pooled.estimate < pooled.high
    # the mean of three independent seeds: its spread is sqrt(sum of the seeds' variances) / 3
    widths = np.array([(lambda iv: iv.high - iv.low)(bootstrap_privleak(*s, n_boot=300)) for s in seeds])
    assert pooled.high - pooled.low == pytest.approx(np.sqrt((widths ** 2).sum()) / 3, rel=0.3)
    with pytest.raises(ValueError, match="same records"):
        pooled_privleak([(seeds[0][0], seeds[0][1], seeds[0][2][:5], seeds[0][3])])
