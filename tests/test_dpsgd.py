"""DP-SGD (train/dpsgd.py): per-row gradients, clipping, noise scale, sampling, accounting, frozen parameters."""

import math

import pytest
import torch
from torch import nn

from libortho.data.records import IGNORE, TokenRows
from libortho.models import load_model
from libortho.train.dpsgd import DPSGDConfig, clip_and_sum, dp_train, noisy_mean, poisson_batch, row_gradient


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model("tiny")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 200, (12, 16), generator=gen)
    labels = ids.clone()
    labels[:, :3] = IGNORE
    return model, TokenRows(ids, labels)


def test_row_gradient_is_that_rows_mean_loss_gradient(tiny) -> None:
    model, rows = tiny
    params = [model.get_submodule("model.layers.0.mlp.up_proj").weight]
    got, loss = row_gradient(model, params, rows, 5)
    logits = model(input_ids=rows.input_ids[5:6]).logits[0, :-1]  # a reference written out by hand
    target = rows.labels[5, 1:]
    keep = target != IGNORE
    ref_loss = nn.functional.cross_entropy(logits[keep].float(), target[keep])
    (ref,) = torch.autograd.grad(ref_loss, params)
    assert loss == pytest.approx(float(ref_loss), rel=1e-5)
    torch.testing.assert_close(got[0], ref, rtol=1e-4, atol=1e-7)


def test_clip_and_sum_scales_each_row_to_the_norm() -> None:
    a = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]  # norm 5
    b = [torch.tensor([0.3, 0.0]), torch.tensor([0.4])]  # norm 0.5
    total, clipped = clip_and_sum([a, b], 1.0)
    assert clipped == 1
    torch.testing.assert_close(total[0], torch.tensor([0.6 + 0.3, 0.0]))
    torch.testing.assert_close(total[1], torch.tensor([0.8 + 0.4]))
    unclipped, none = clip_and_sum([a, b], None)
    assert none == 0 and torch.allclose(unclipped[1], torch.tensor([4.4]))


def test_noise_has_the_calibrated_scale() -> None:
    gen = torch.Generator().manual_seed(0)
    out = noisy_mean([], [torch.Size([200_000])], sigma=1.5, clip=0.5, denom=4.0, generator=gen)
    assert float(out[0].mean()) == pytest.approx(0.0, abs=2e-3)
    assert float(out[0].std()) == pytest.approx(1.5 * 0.5 / 4.0, rel=0.01)
    exact = noisy_mean([torch.ones(3)], [torch.Size([3])], sigma=0.0, clip=1.0, denom=2.0, generator=gen)
    torch.testing.assert_close(exact[0], torch.full((3,), 0.5))


def test_poisson_sampling_rate() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = [len(poisson_batch(1000, 0.02, gen)) for _ in range(400)]
    assert sum(sizes) / len(sizes) == pytest.approx(20, rel=0.05)
    assert len(set(sizes)) > 5  # the batch size varies, as Poisson sampling must


def test_dp_train_moves_only_its_parameters_and_accounts(tiny) -> None:
    model, rows = tiny
    trained = model.get_submodule("model.layers.1.mlp.down_proj").weight
    other = model.get_submodule("model.layers.0.mlp.down_proj").weight
    before_t, before_o = trained.detach().clone(), other.detach().clone()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    log = dp_train(model, rows, [trained], DPSGDConfig(steps=5, expected_batch=3, eps=4.0, lr=1e-3), progress=False)
    assert not torch.equal(trained, before_t) and torch.equal(other, before_o)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert log.delta == pytest.approx(1 / 120) and log.sample_rate == pytest.approx(0.25)
    assert 0.9 * 4.0 <= log.eps <= 4.0 + 1e-6 and log.sigma > 0
    assert len(log.losses) == 5 and 0 <= log.clipped_fraction <= 1
    with torch.no_grad():
        trained.copy_(before_t)


def test_more_privacy_needs_more_noise() -> None:
    from libortho.train.dp import dpsgd_noise_multiplier

    s = [dpsgd_noise_multiplier(e, 1e-4, 0.05, 200) for e in (1.0, 4.0, 16.0)]
    assert s[0] > s[1] > s[2] > 0
    assert not math.isnan(s[2])


def test_config_refusals() -> None:
    with pytest.raises(ValueError, match="eps"):
        DPSGDConfig(eps=0.0)
    with pytest.raises(ValueError, match="positive"):
        DPSGDConfig(clip=0.0)
    assert not DPSGDConfig(eps=None).private() and DPSGDConfig(eps=None, sigma=0.5).private()
