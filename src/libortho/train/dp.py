"""Differential-privacy calibration for dual DP (seed 002, section 5.5): the Gaussian mechanism, group
privacy for repeated canaries, and DP-SGD's noise multiplier from opacus' accountant.

* :func:`analytic_gaussian_sigma`: the smallest sigma for which adding ``N(0, sigma^2)`` to a query of
  L2 sensitivity ``Delta`` is (eps, delta)-DP, by the exact privacy profile of the Gaussian mechanism
  (Balle and Wang, 2018): ``delta(eps) = Phi(D/2s - eps s/D) - e^eps Phi(-D/2s - eps s/D)``. The classical
  ``sqrt(2 ln(1.25/delta)) Delta / eps`` is an upper bound on it (for eps < 1).
* :func:`group_privacy`: a record repeated ``k`` times in the training set is a change of ``k``
  records; an (eps, delta)-DP algorithm is (k eps, k e^{(k-1) eps} delta)-DP for groups of ``k``.
  A canary seen k times is protected only at that weaker level: the experiment reports both.
* :func:`dpsgd_noise_multiplier`: opacus' accountant (RDP by default) inverted for a target (eps, delta)
  at the given sampling rate and step count.
"""

from __future__ import annotations

import math

from scipy.stats import norm


def gaussian_delta(sigma: float, eps: float, sensitivity: float = 1.0) -> float:
    """The Gaussian mechanism's exact delta at ``eps`` (its privacy profile)."""
    if sigma <= 0 or sensitivity <= 0:
        raise ValueError(f"sigma and sensitivity must be > 0, got {sigma}, {sensitivity}")
    a = sensitivity / (2 * sigma)
    b = eps * sigma / sensitivity
    return float(norm.cdf(a - b) - math.exp(eps) * norm.cdf(-a - b))


def analytic_gaussian_sigma(eps: float, delta: float, sensitivity: float = 1.0, tol: float = 1e-12) -> float:
    """Smallest sigma making the Gaussian mechanism (eps, delta)-DP (bisection on the exact profile)."""
    if not eps > 0 or not 0 < delta < 1:
        raise ValueError(f"need eps > 0 and 0 < delta < 1, got eps={eps}, delta={delta}")
    lo, hi = 1e-6 * sensitivity, sensitivity
    while gaussian_delta(hi, eps, sensitivity) > delta:
        hi *= 2
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        if gaussian_delta(mid, eps, sensitivity) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def classical_gaussian_sigma(eps: float, delta: float, sensitivity: float = 1.0) -> float:
    """Dwork and Roth's ``sqrt(2 ln(1.25 / delta)) Delta / eps`` (valid for eps < 1; never below the analytic one)."""
    if not 0 < eps < 1 or not 0 < delta < 1:
        raise ValueError(f"the classical bound needs 0 < eps < 1 and 0 < delta < 1, got eps={eps}, delta={delta}")
    return math.sqrt(2 * math.log(1.25 / delta)) * sensitivity / eps


def group_privacy(eps: float, delta: float, k: int) -> tuple[float, float]:
    """(eps, delta) for groups of ``k`` records: ``(k eps, min(1, k e^{(k-1) eps} delta))``.

    A delta of 1 is no guarantee at all; the bound is computed in log space, so a large ``k eps`` gives 1 rather
    than an overflow."""
    if k < 1:
        raise ValueError(f"group size must be >= 1, got {k}")
    if delta <= 0:
        return k * eps, 0.0
    log_delta = math.log(k) + (k - 1) * eps + math.log(delta)
    return k * eps, 1.0 if log_delta >= 0 else math.exp(log_delta)


def max_delta(n_records: int) -> float:
    """The largest delta the experiments accept: ``1 / (10 N)``."""
    if n_records < 1:
        raise ValueError(f"n_records must be >= 1, got {n_records}")
    return 1.0 / (10 * n_records)


def dpsgd_noise_multiplier(eps: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """opacus' noise multiplier reaching (eps, delta) after ``steps`` Poisson-sampled steps at ``sample_rate``."""
    from opacus.accountants.utils import get_noise_multiplier

    if not 0 < sample_rate <= 1 or steps < 1:
        raise ValueError(f"need 0 < sample_rate <= 1 and steps >= 1, got {sample_rate}, {steps}")
    return float(get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=sample_rate, steps=steps,
                                      accountant=accountant))


def dpsgd_epsilon(noise_multiplier: float, delta: float, sample_rate: float, steps: int,
                  accountant: str = "rdp") -> float:
    """The epsilon opacus' accountant gives after ``steps`` steps at this noise multiplier."""
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))
