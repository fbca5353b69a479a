"""The one damping rule: dead inputs to 1, damp x mean(diag) added, raised tenfold until Cholesky works."""

from __future__ import annotations

import pytest
import torch

from libortho.curvature.damping import damped, damped_cholesky, inverse_diag, inverse_upper_cholesky


def test_damped_sets_dead_inputs_and_adds_a_fraction_of_the_mean_diagonal() -> None:
    H = torch.diag(torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64))
    H[0, 2] = H[2, 0] = 0.5
    Hd = damped(H, 0.1)
    mean = (2.0 + 1.0 + 4.0) / 3  # after the dead input is set to 1
    assert torch.allclose(torch.diagonal(Hd), torch.tensor([2.0, 1.0, 4.0], dtype=torch.float64) + 0.1 * mean)
    assert Hd[0, 2] == 0.5 and H[1, 1] == 0.0  # off-diagonal kept, input untouched


def test_an_indefinite_hessian_gets_its_damping_raised_and_reported() -> None:
    H = torch.tensor([[1.0, 0.0], [0.0, -0.5]], dtype=torch.float64)  # mean diag 0.25
    L, used = damped_cholesky(H, 0.01)
    assert used > 0.01 and -0.5 + used * 0.25 > 0 and -0.5 + used / 10 * 0.25 <= 0
    assert torch.allclose(L @ L.T, damped(H, used))
    with pytest.raises(ValueError, match="not positive definite"):
        damped_cholesky(torch.tensor([[1.0, 0.0], [0.0, -1e9]], dtype=torch.float64), 0.01)


def test_inverse_factors_agree_with_a_plain_inverse() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=g, dtype=torch.float64)
    H = 2 / 50 * X.T @ X
    inv = torch.linalg.inv(damped(H, 0.01))
    U, used = inverse_upper_cholesky(H, 0.01)
    assert used == 0.01 and torch.allclose(U.T @ U, inv)
    d, _ = inverse_diag(H, 0.01)
    assert torch.allclose(d, torch.diagonal(inv))
