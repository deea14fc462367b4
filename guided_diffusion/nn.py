"""Small building blocks shared by the U-Net, the classifier and the trainer.

Names and signatures follow the original guided-diffusion `nn.py`, so code written against it
(e.g. `from guided_diffusion.nn import mean_flat, timestep_embedding`) keeps working.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch as th
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .losses import mean_flat  # noqa: F401  (diffusion math; the original's nn.mean_flat)

# The original shipped its own SiLU for old PyTorch versions; the name is kept for imports.
SiLU = nn.SiLU


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always normalizes in float32 and returns the input's dtype.

    Under fp16 the per-group variance of large activations overflows or loses precision, so the
    statistics are computed in float32 (the weights stay float32 after `convert_to_fp16`, too).
    """

    def forward(self, x: th.Tensor) -> th.Tensor:
        return super().forward(x.float()).type(x.dtype)


def group_norm_act(
    norm: nn.GroupNorm,
    x: th.Tensor,
    scale: th.Tensor | None = None,
    shift: th.Tensor | None = None,
    act: bool = True,
) -> th.Tensor:
    """
    SiLU(norm(x) * (1 + scale) + shift) in as few passes over `x` as eager PyTorch allows.

    The fused blocks' (`--fused_blocks`) replacement for `norm -> [AdaGN] -> SiLU` as three to
    five separate ops. AdaGN's per-sample scale and shift fold into the norm's per-channel affine,
    (g * w + b) * (1 + s) + t = g * (w * (1 + s)) + (b * (1 + s) + t), so the normalization
    writes the conditioned result directly: for a contiguous (NCHW) input by normalizing it as one
    sample of N*C channels and N*G groups, with per-(sample, channel) weights; for a
    channels_last input (whose N*C view is not free) by one multiply-add after the norm. The
    SiLU then runs in place when no gradient needs its input. bfloat16 inputs are normalized as
    they are (statistics in float32 inside the kernel); float16 in float32, as GroupNorm32 does.

    :param norm: the block's GroupNorm (its weight, bias, groups and eps are used).
    :param x: an [N x C x ...] tensor.
    :param scale: optional [N x C] AdaGN scale (the output is multiplied by 1 + scale).
    :param shift: optional [N x C] AdaGN shift, given with `scale`.
    :param act: apply SiLU.
    :return: a tensor of x's shape and dtype.
    """
    dtype = x.dtype
    if dtype == th.float16:  # fp16 group variances overflow: normalize in float32
        x = x.float()
    if scale is None:
        y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    else:
        n, c = x.shape[:2]
        gain = 1 + scale.float()
        weight = norm.weight * gain  # [N x C]
        bias = norm.bias * gain + shift.float()
        if x.is_contiguous():
            y = F.group_norm(x.reshape(1, n * c, *x.shape[2:]), n * norm.num_groups,
                             weight.reshape(-1), bias.reshape(-1), norm.eps).view(x.shape)
        else:
            y = F.group_norm(x, norm.num_groups, None, None, norm.eps)
            shape = (n, c) + (1,) * (x.ndim - 2)
            y = th.addcmul(bias.view(shape).to(y.dtype), y, weight.view(shape).to(y.dtype))
    if act:
        # In place only where autograd does not need the SiLU's input.
        y = F.silu(y, inplace=not (th.is_grad_enabled() and y.requires_grad))
    return y.type(dtype)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D convolution; the remaining arguments go to `nn.Conv{dims}d`."""
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")
    return convs[dims](*args, **kwargs)


def linear(*args, **kwargs) -> nn.Linear:
    """A fully connected layer (`nn.Linear`)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D average pooling; the remaining arguments go to `nn.AvgPool{dims}d`."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")
    return pools[dims](*args, **kwargs)


@th.no_grad()
def update_ema(
    target_params: Iterable[th.Tensor], source_params: Iterable[th.Tensor], rate: float = 0.99
) -> None:
    """Move target parameters towards the source: targ <- rate * targ + (1 - rate) * src.

    :param target_params: the EMA parameters, updated in place.
    :param source_params: the trained parameters.
    :param rate: the EMA decay (closer to 1 = slower moving average).
    """
    targets = list(target_params)
    sources = [src.to(targ.dtype) for targ, src in zip(targets, source_params)]
    if len(sources) != len(targets):
        raise ValueError(f"update_ema: {len(targets)} target and {len(sources)} source tensors")
    if not targets:
        return
    # The same two ops on every tensor as targ.mul_(rate).add_(src, alpha=1 - rate), batched per
    # device and dtype (equal bit for bit; tests/test_train_util.py), for a few hundred tensors.
    th._foreach_mul_(targets, rate)
    th._foreach_add_(targets, sources, alpha=1 - rate)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place and return it.

    Used on the last layer of every residual branch, so each block starts as the identity
    (Goyal et al. 2017's zero-init; the ADM paper inherits it from improved-diffusion).
    """
    with th.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply a module's parameters by `scale` in place and return it."""
    with th.no_grad():
        for p in module.parameters():
            p.mul_(scale)
    return module


def normalization(channels: int) -> nn.Module:
    """The normalization layer of every block: GroupNorm with 32 groups, computed in float32.

    :param channels: number of input channels (must be divisible by 32).
    """
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: th.Tensor, dim: int, max_period: float = 10000) -> th.Tensor:
    """Sinusoidal timestep embeddings (Vaswani et al. 2017, sec. 3.5; Ho et al. 2020, appendix B).

    The cosine half comes first, then the sine half, as in the original; frequencies go from 1
    down to 1/max_period geometrically.

    :param timesteps: a 1-D tensor of N indices, one per batch element (may be fractional).
    :param dim: the dimension of the output.
    :param max_period: controls the minimum frequency of the embeddings.
    :return: an [N x dim] float32 tensor of positional embeddings.
    """
    half = dim // 2
    exponent = th.arange(half, dtype=th.float32, device=timesteps.device) / half
    freqs = th.exp(-math.log(max_period) * exponent)
    args = timesteps[:, None].float() * freqs[None]
    emb = th.cat([th.cos(args), th.sin(args)], dim=-1)
    if dim % 2:
        emb = th.cat([emb, th.zeros_like(emb[:, :1])], dim=-1)
    return emb


def checkpoint(
    func: Callable[..., th.Tensor],
    inputs: Sequence[th.Tensor],
    params: Iterable[th.Tensor],
    flag: bool,
) -> th.Tensor:
    """Evaluate `func(*inputs)`, recomputing its activations in the backward pass if `flag`.

    Gradient checkpointing (Chen et al. 2016) trades compute for memory. PyTorch's non-reentrant
    checkpoint tracks every tensor `func` uses, parameters included, so frozen parameters and
    `torch.no_grad()` need no special handling, and the RNG state is restored for the recompute so
    dropout masks agree with the first pass.

    :param func: the function to evaluate.
    :param inputs: the argument sequence to pass to `func`.
    :param params: the parameters `func` depends on; kept for the original's signature (the
                   non-reentrant checkpoint finds them on its own).
    :param flag: if False, disable gradient checkpointing.
    """
    del params  # tracked automatically by the non-reentrant implementation
    if flag:
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
