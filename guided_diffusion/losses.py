"""Likelihood pieces of the variational bound: Gaussian KL and the discretized image decoder.

The bound L_vlb of Ho et al. 2020 (eq. 5) is a sum of KL terms between Gaussians plus a decoder
term -log p(x_0 | x_1) that scores 8-bit pixels; both are computed here elementwise, in nats.
"""

from __future__ import annotations

import math

import numpy as np
import torch as th

# One 8-bit pixel bin is 2/255 wide once pixels are scaled to [-1, 1]; its half-width:
_HALF_BIN = 1.0 / 255.0
# Keeps log() finite where a probability underflows (as the original does).
_LOG_FLOOR = 1e-12


def mean_flat(tensor: th.Tensor) -> th.Tensor:
    """Mean over all non-batch dimensions: [N x ...] -> [N] (per-example losses)."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> th.Tensor:
    """
    KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Any argument may be a Python/NumPy scalar; at least one must be a tensor, which fixes the
    dtype and device of the result.  Shapes broadcast.

    :return: a tensor with the broadcast shape of the inputs.
    """
    ref = next((v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, th.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument to fix dtype and device")
    # Scalars become tensors so that th.exp() accepts them.
    logvar1, logvar2 = (
        v if isinstance(v, th.Tensor) else th.tensor(v).to(ref) for v in (logvar1, logvar2)
    )
    # Closed form of the KL between two univariate Gaussians.
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + th.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * th.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: th.Tensor) -> th.Tensor:
    """
    Standard normal CDF, with the tanh approximation that the original (and PixelCNN++) uses:
    Phi(x) ~= 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), absolute error below 2e-4.
    """
    return 0.5 * (1.0 + th.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * th.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: th.Tensor, *, means: th.Tensor, log_scales: th.Tensor
) -> th.Tensor:
    """
    Log-likelihood of 8-bit images under a Gaussian discretized to the 256 pixel bins
    (Ho et al. 2020, eq. 13): each bin has width 2/255, and the two edge bins extend to -inf/+inf
    so the 256 probabilities sum to one.

    :param x: the [N x C x ...] target images, uint8 values rescaled to [-1, 1].
    :param means: the Gaussian means, same shape as x.
    :param log_scales: the Gaussian log standard deviations, same shape as x.
    :return: a tensor like x of log probabilities, in nats.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x {tuple(x.shape)}, means {tuple(means.shape)} and log_scales "
            f"{tuple(log_scales.shape)} must have the same shape"
        )
    centered_x = x - means
    inv_stdv = th.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + _HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - _HALF_BIN))
    log_cdf_plus = th.log(cdf_plus.clamp(min=_LOG_FLOOR))  # lowest bin: (-inf, x + 1/255]
    log_one_minus_cdf_min = th.log((1.0 - cdf_min).clamp(min=_LOG_FLOOR))  # top bin
    log_cdf_delta = th.log((cdf_plus - cdf_min).clamp(min=_LOG_FLOOR))  # interior bins
    # The edge bins are recognised by value (-1 and 1 are the only pixels beyond +-0.999).
    return th.where(
        x < -0.999,
        log_cdf_plus,
        th.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


# ------------------------------------------------------------------------------------------------
# Per-timestep coefficients as tensors (the original kept these in gaussian_diffusion.py)


def _per_example(x: th.Tensor) -> tuple:
    """The shape [N x 1 x ...] of per-example coefficients that broadcast against x."""
    return (x.shape[0],) + (1,) * (x.ndim - 1)


def _nonzero_mask(t: th.Tensor, x: th.Tensor) -> th.Tensor:
    """1 where t != 0, else 0, shaped [N x 1 x ...] to broadcast against x."""
    return (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))


def _extract_into_tensor(arr: np.ndarray, timesteps: th.Tensor, broadcast_shape) -> th.Tensor:
    """
    Extract values from a 1-D NumPy array for a batch of indices.

    :param arr: the 1-D float64 NumPy array.
    :param timesteps: a tensor of indices into the array to extract, [N].
    :param broadcast_shape: a larger shape of K dimensions with the batch dimension equal to N.
    :return: a float32 tensor of shape [N x 1 x ...] with K dimensions, expanded to
             broadcast_shape.  Indexing happens in float64; only the picked values are rounded.
    """
    res = th.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)
