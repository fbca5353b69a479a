"""DP noise calibration: the Gaussian mechanism's profile, group privacy, opacus' accountant round trip."""

import math

import numpy as np
import pytest

from libortho.train.dp import (
    analytic_gaussian_sigma,
    classical_gaussian_sigma,
    dpsgd_epsilon,
    dpsgd_noise_multiplier,
    gaussian_delta,
    group_privacy,
    max_delta,
)


def _empirical_delta(sigma: float, eps: float, n: int = 2_000_000) -> float:
    """delta(eps) = E_{x ~ P}[max(0, 1 - e^{eps - L(x)})] with the privacy loss L of N(0,s^2) vs N(1,s^2),
    by Monte Carlo: an estimate written without the closed form."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, sigma, n)
    loss = (-(x**2) + (x - 1) ** 2) / (2 * sigma**2)  # log p0(x) - log p1(x)
    return float(np.maximum(0.0, 1 - np.exp(eps - loss)).mean())


@pytest.mark.parametrize("sigma,eps", [(1.0, 0.5), (2.0, 0.2), (0.7, 1.5)])
def test_gaussian_profile_matches_monte_carlo(sigma: float, eps: float) -> None:
    assert gaussian_delta(sigma, eps) == pytest.approx(_empirical_delta(sigma, eps), abs=2e-3)


@pytest.mark.parametrize("eps,delta", [(0.5, 1e-5), (1.0, 1e-6), (4.0, 1e-3), (0.1, 1e-4)])
def test_analytic_sigma_is_tight_and_below_the_classical_bound(eps: float, delta: float) -> None:
    s = analytic_gaussian_sigma(eps, delta, sensitivity=2.0)
    assert gaussian_delta(s, eps, 2.0) <= delta * (1 + 1e-9)
    assert gaussian_delta(s * (1 - 1e-6), eps, 2.0) > delta  # any less noise breaks it
    if eps < 1:
        assert s <= classical_gaussian_sigma(eps, delta, 2.0)
    assert analytic_gaussian_sigma(eps, delta, 4.0) == pytest.approx(2 * s, rel=1e-9)  # linear in sensitivity


def test_group_privacy_and_delta_budget() -> None:
    assert group_privacy(0.5, 1e-6, 1)[0] == 0.5 and group_privacy(0.5, 1e-6, 1)[1] == pytest.approx(1e-6)
    assert group_privacy(16.0, 1e-5, 64) == (1024.0, 1.0)  # k e^{(k-1) eps} delta overflows: no guarantee left
    assert group_privacy(1.0, 1e-5, 12)[1] == 1.0  # 12 e^11 1e-5 > 1: capped, not a probability above 1
    e, d = group_privacy(0.5, 1e-6, 4)
    assert e == 2.0 and d == pytest.approx(4 * math.exp(1.5) * 1e-6)
    assert max_delta(1000) == 1e-4
    with pytest.raises(ValueError, match="group size"):
        group_privacy(1.0, 1e-5, 0)
    with pytest.raises(ValueError, match="eps > 0"):
        analytic_gaussian_sigma(0.0, 1e-5)


def test_dpsgd_noise_multiplier_round_trips_through_the_accountant() -> None:
    for eps in (1.0, 4.0, 8.0):
        sigma = dpsgd_noise_multiplier(eps, 1e-5, sample_rate=0.01, steps=500)
        got = dpsgd_epsilon(sigma, 1e-5, 0.01, 500)
        assert got <= eps and got == pytest.approx(eps, rel=0.05)
    # more privacy needs more noise
    assert dpsgd_noise_multiplier(1.0, 1e-5, 0.01, 500) > dpsgd_noise_multiplier(8.0, 1e-5, 0.01, 500)
