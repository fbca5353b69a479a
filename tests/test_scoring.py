"""Per-token scores (``next_token_stats``, ``token_stats``) against explicit formulas and slow unpadded passes."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from libortho.eval.scoring import TokenStats, next_token_stats, token_stats

LN2 = math.log(2.0)


def _explicit_stats(logits: list[float], target: int) -> tuple[float, float, float]:
    """log p(target), E_z[log p(z)] and std_z[log p(z)] with plain Python floats (centred variance)."""
    m = max(logits)
    z = sum(math.exp(x - m) for x in logits)
    logp = [x - m - math.log(z) for x in logits]
    p = [math.exp(v) for v in logp]
    mu = sum(pi * li for pi, li in zip(p, logp, strict=True))
    var = sum(pi * (li - mu) ** 2 for pi, li in zip(p, logp, strict=True))
    return logp[target], mu, math.sqrt(var)


# --------------------------------------------------------------------------------------------- next_token_stats


def test_next_token_stats_matches_explicit_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g) * 3
    targets = torch.randint(0, 5, (2, 3), generator=g)
    lp, mu, sd = next_token_stats(logits, targets)
    assert lp.shape == mu.shape == sd.shape == (2, 3)
    assert lp.dtype == mu.dtype == sd.dtype == torch.float64
    for i in range(2):
        for t in range(3):
            e_lp, e_mu, e_sd = _explicit_stats(logits[i, t].tolist(), int(targets[i, t]))
            assert float(lp[i, t]) == pytest.approx(e_lp, abs=1e-6)
            assert float(mu[i, t]) == pytest.approx(e_mu, abs=1e-6)
            assert float(sd[i, t]) == pytest.approx(e_sd, abs=1e-6)


def test_next_token_stats_known_answers() -> None:
    # p = (1/2, 1/4, 1/4): log p = (-ln2, -2ln2, -2ln2), mu = -1.5 ln2, sigma = ln2 / 2.
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    lp, mu, sd = next_token_stats(logits, torch.tensor([0, 2]))
    torch.testing.assert_close(lp, torch.tensor([-LN2, -2 * LN2], dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(mu, torch.full((2,), -1.5 * LN2, dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(sd, torch.full((2,), LN2 / 2, dtype=torch.float64), atol=1e-7, rtol=0)
    # Uniform over V: every log p is -ln V and the spread is zero.
    v = 7
    lp, mu, sd = next_token_stats(torch.zeros(v), torch.tensor(3))
    assert float(lp) == pytest.approx(-math.log(v), abs=1e-12)
    assert float(mu) == pytest.approx(-math.log(v), abs=1e-6)  # the vocabulary mean is reduced in float32
    assert float(sd) == pytest.approx(0.0, abs=1e-6)
    # A (numerically) one-hot distribution: the likely token has log p ~ 0, mu ~ 0.
    lp, mu, sd = next_token_stats(torch.tensor([0.0, 60.0, 0.0]), torch.tensor(1))
    assert float(lp) == pytest.approx(0.0, abs=1e-20) and abs(float(mu)) < 1e-20 and float(sd) < 1e-10


def test_next_token_stats_is_shift_invariant_and_sigma_nonnegative() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 11, generator=g)
    targets = torch.randint(0, 11, (4, 6), generator=g)
    a = next_token_stats(logits, targets)
    b = next_token_stats(logits + 123.0, targets)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    assert (a[2] >= 0).all()
    # sigma never NaN even when the E[x^2] - mu^2 form cancels to a tiny negative number
    _, _, sd = next_token_stats(torch.full((3, 9), 0.5), torch.zeros(3, dtype=torch.long))
    assert torch.isfinite(sd).all() and (sd >= 0).all()


# --------------------------------------------------------------------------------------------- token_stats


def _slow_token_stats(model: nn.Module, rows: list[list[int]], start: int) -> TokenStats:
    """Each row alone, without padding and without a cache; formulas written out per token."""
    lps, mus, sds = [], [], []
    for r in rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([r]), use_cache=False).logits[0].double()
        out = [_explicit_stats(logits[t - 1].tolist(), r[t]) for t in range(start, len(r))]
        lps.append(torch.tensor([o[0] for o in out], dtype=torch.float64))
        mus.append(torch.tensor([o[1] for o in out], dtype=torch.float64))
        sds.append(torch.tensor([o[2] for o in out], dtype=torch.float64))
    return TokenStats(lps, mus, sds)


def _rows() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    lengths = [9, 4, 13, 2, 7]
    return [[257, *torch.randint(0, 256, (n - 1,), generator=g).tolist()] for n in lengths]


def _assert_stats_close(a: TokenStats, b: TokenStats, atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for field in ("logp", "mu", "sigma"):
        for x, y in zip(getattr(a, field), getattr(b, field), strict=True):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("start", [1, 2])
def test_token_stats_matches_slow_unpadded_forward(tiny_llama, start: int) -> None:
    rows = _rows()
    if start == 2:
        rows = [r for r in rows if len(r) > 2]
    got = token_stats(tiny_llama, rows, pad_id=258, start=start, batch_size=2)
    ref = _slow_token_stats(tiny_llama, rows, start)
    assert [x.numel() for x in got.logp] == [len(r) - start for r in rows]
    assert all(x.dtype == torch.float64 for x in got.logp + got.mu + got.sigma)
    _assert_stats_close(got, ref)
    # mean_nll is minus the mean log-likelihood of each record
    torch.testing.assert_close(got.mean_nll(), torch.stack([-x.mean() for x in ref.logp]), atol=1e-5, rtol=0)


def test_token_stats_is_padding_and_batching_invariant(tiny_llama) -> None:
    rows = _rows()
    base = token_stats(tiny_llama, rows, pad_id=258, batch_size=16)
    _assert_stats_close(base, token_stats(tiny_llama, rows, pad_id=0, batch_size=16))
    _assert_stats_close(base, token_stats(tiny_llama, rows, pad_id=65, batch_size=1))
    _assert_stats_close(base, token_stats(tiny_llama, rows, pad_id=258, batch_size=3))
    # a record's scores do not depend on which (or how long) rows share its batch
    alone = token_stats(tiny_llama, [rows[1]], pad_id=258)
    torch.testing.assert_close(alone.logp[0], base.logp[1], atol=1e-5, rtol=0)
    assert not base.logp[0].requires_grad


def test_token_stats_known_answer_with_a_uniform_model() -> None:
    class Uniform(nn.Module):
        def forward(self, input_ids, use_cache=False, **_):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 10))

    st = token_stats(Uniform(), [[1, 2, 3], [4, 5]], pad_id=0)
    for lp, mu, sd in zip(st.logp, st.mu, st.sigma, strict=True):
        torch.testing.assert_close(lp, torch.full_like(lp, -math.log(10)))
        torch.testing.assert_close(mu, torch.full_like(mu, -math.log(10)))
        assert (sd.abs() < 1e-6).all()
    torch.testing.assert_close(st.mean_nll(), torch.full((2,), math.log(10), dtype=torch.float64))


def test_token_stats_uses_the_right_positions() -> None:
    """A model whose logits at position t put all mass on token (x_t + 1): only +1 successions score ~0."""

    class Successor(nn.Module):
        def forward(self, input_ids, use_cache=False, **_):
            return SimpleNamespace(logits=40.0 * nn.functional.one_hot((input_ids + 1) % 8, 8).float())

    st = token_stats(Successor(), [[1, 2, 3, 5], [6, 7]], pad_id=0)
    assert st.logp[0][:2].abs().max() < 1e-12 and st.logp[0][2] < -30  # 3 -> 5 is not a successor
    assert st.logp[1].abs().max() < 1e-12


def test_token_stats_rejects_bad_input() -> None:
    class NaNModel(nn.Module):
        def forward(self, input_ids, use_cache=False, **_):
            return SimpleNamespace(logits=torch.full((*input_ids.shape, 5), float("nan")))

    with pytest.raises(ValueError, match="start"):
        token_stats(NaNModel(), [[1, 2], [3]], pad_id=0)
    with pytest.raises(ValueError, match="start"):
        token_stats(NaNModel(), [[1, 2, 3]], pad_id=0, start=3)
    with pytest.raises(FloatingPointError):
        token_stats(NaNModel(), [[1, 2, 3]], pad_id=0)


def test_token_stats_rejects_start_zero(tiny_llama) -> None:
    with pytest.raises(ValueError, match="start"):
        token_stats(tiny_llama, [[257, 1, 2]], pad_id=258, start=0)
