"""Gaussian KL and the discretized decoder likelihood against closed forms."""

from __future__ import annotations

import math

import pytest
import torch as th
from torch.distributions import Normal, kl_divergence

from guided_diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)


def test_normal_kl_of_identical_gaussians_is_zero():
    mean, logvar = th.randn(4, 3), th.randn(4, 3)
    assert normal_kl(mean, logvar, mean, logvar).abs().max() < 1e-6


def test_normal_kl_matches_known_gaussians():
    th.manual_seed(0)
    m1, m2 = th.randn(50, dtype=th.float64), th.randn(50, dtype=th.float64)
    lv1, lv2 = th.randn(50, dtype=th.float64), th.randn(50, dtype=th.float64)
    want = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert th.allclose(normal_kl(m1, lv1, m2, lv2), want, rtol=1e-10)
    # Scalars broadcast: KL(N(1, e^0) || N(0, 1)) = 1/2.
    assert normal_kl(th.ones(2), 0.0, 0.0, 0.0).tolist() == [0.5, 0.5]
    with pytest.raises(TypeError, match="tensor"):
        normal_kl(0.0, 0.0, 0.0, 0.0)


def test_approx_cdf_is_close_to_exact_normal_cdf():
    x = th.linspace(-6, 6, 1001, dtype=th.float64)
    exact = 0.5 * (1 + th.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 2e-4
    assert approx_standard_normal_cdf(th.zeros(1)).item() == 0.5


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.9, -1.0), (-0.97, -4.5), (0.3, 0.5)])
def test_discretized_likelihood_sums_to_one_over_256_bins(mean, log_scale):
    bins = th.arange(256, dtype=th.float64) / 127.5 - 1  # the 8-bit values in [-1, 1]
    means = th.full_like(bins, mean)
    log_scales = th.full_like(bins, log_scale)
    logp = discretized_gaussian_log_likelihood(bins, means=means, log_scales=log_scales)
    assert logp.shape == bins.shape and (logp <= 0).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_of_narrow_gaussian_and_edge_bins():
    x = th.tensor([-1.0, 0.0, 1.0])
    # A Gaussian much narrower than a bin puts all its mass on the bin it sits in.
    logp = discretized_gaussian_log_likelihood(x, means=x.clone(), log_scales=th.full_like(x, -8.0))
    assert logp.abs().max() < 1e-5
    # Edge bins reach to infinity: a mean far beyond 1 still gives the top bin probability ~1.
    far = discretized_gaussian_log_likelihood(
        th.tensor([1.0, -1.0]), means=th.tensor([5.0, -5.0]), log_scales=th.zeros(2)
    )
    assert far.abs().max() < 1e-3
    # An impossible bin is floored at log(1e-12) instead of -inf.
    floor = discretized_gaussian_log_likelihood(
        th.tensor([0.0]), means=th.tensor([0.9]), log_scales=th.tensor([-6.0])
    )
    assert floor.item() == pytest.approx(math.log(1e-12), rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        discretized_gaussian_log_likelihood(x, means=th.zeros(2), log_scales=th.zeros(3))


def test_mean_flat_is_the_per_example_mean_and_nn_reexports_it():
    from guided_diffusion import losses, nn

    x = th.arange(24.0).view(2, 3, 4)
    assert th.equal(losses.mean_flat(x), th.tensor([5.5, 17.5]))  # means of 0..11 and 12..23
    assert nn.mean_flat is losses.mean_flat  # the original's import path keeps working
