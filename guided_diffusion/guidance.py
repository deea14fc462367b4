"""Guidance: classifier-free guidance as a model wrapper, and the classifier-guidance gradient.

Both are independent of the sampler: CFG changes what the model returns, classifier guidance is a
`cond_fn` that the loops add to the mean (DDPM) or to the score (DDIM and the ODE solvers).
"""

from __future__ import annotations

from typing import Callable

import torch as th
import torch.nn as nn
import torch.nn.functional as F


class ClassifierFreeGuidance(nn.Module):
    """
    Classifier-free guidance (Ho & Salimans 2021; their guidance weight is our w - 1):
        eps = eps_uncond + w (eps_cond - eps_uncond) = (1 - w) eps_uncond + w eps_cond,
    with the conditional and unconditional branches evaluated in one batched forward pass.

    The (1 - w, w) form makes w = 1 return the conditional and w = 0 the unconditional prediction
    exactly. Only the first C output channels (eps, or x_0 for --predict_xstart models; the
    combination is the same because x_0 is affine in eps with label-independent coefficients) are
    guided; a learned-sigma model's variance channels (C..2C) come from the conditional branch.

    :param model: a class-conditional model trained with label dropout (`class_dropout_prob > 0`).
    :param scale: the guidance weight w.
    :param null_label: the label index of the unconditional branch (the model's `num_classes`).
    :param channels: guide only the first `channels` output channels (3: DiT's forward_with_cfg,
        which leaves the 4th latent channel unguided); None: all C input channels.
    """

    def __init__(self, model: nn.Module, scale: float, null_label: int,
                 channels: int | None = None):
        super().__init__()
        self.model = model
        self.scale = float(scale)
        self.null_label = int(null_label)
        self.channels = channels

    def forward(self, x: th.Tensor, timesteps: th.Tensor, y: th.Tensor | None = None, **kwargs):
        """
        :param x: the [N x C x ...] input batch.
        :param timesteps: a 1-D batch of timesteps.
        :param y: [N] class labels (required).
        :return: the model's [N x C' x ...] output with guided prediction channels.
        """
        if y is None:
            raise ValueError(
                "classifier-free guidance needs class labels: pass model_kwargs={'y': ...}")
        if self.scale == 1.0:
            return self.model(x, timesteps, y=y, **kwargs)  # exactly the conditional model
        n, c = x.shape[0], self.channels or x.shape[1]
        null = th.full_like(y, self.null_label)
        if self.scale == 0.0:
            # Unconditional: one forward of the null branch, unless variance channels must come
            # from the conditional branch.
            uncond = self.model(x, timesteps, y=null, **kwargs)
            if uncond.shape[1] == c:
                return uncond
            return th.cat([uncond[:, :c], self.model(x, timesteps, y=y, **kwargs)[:, c:]], dim=1)
        doubled = {k: th.cat([v, v]) if th.is_tensor(v) and v.shape[:1] == (n,) else v
                   for k, v in kwargs.items()}
        out = self.model(
            th.cat([x, x]), th.cat([timesteps, timesteps]), y=th.cat([y, null]), **doubled)
        cond, uncond = out[:n], out[n:]
        w = self.scale
        guided = (1.0 - w) * uncond[:, :c] + w * cond[:, :c]
        return th.cat([guided, cond[:, c:]], dim=1)


def cfg_model(model: nn.Module, cfg_scale: float) -> nn.Module:
    """
    Wrap `model` for classifier-free guidance at weight `cfg_scale` (returned as is when it is 1).

    The null label is the model's `num_classes`: the extra row of `label_emb` that exists only when
    the model was built with `class_dropout_prob > 0`.
    """
    if cfg_scale == 1.0:
        return model
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None or not getattr(model, "class_dropout_prob", 0.0) > 0:
        raise ValueError(
            f"--cfg_scale {cfg_scale} needs a class-conditional model trained with "
            f"--class_dropout_prob > 0 (it has a null label); this model has "
            f"num_classes={num_classes}, "
            f"class_dropout_prob={getattr(model, 'class_dropout_prob', None)}"
        )
    # A model may ask for DiT's 3-channel guidance (`--cfg_channels 3` sets `cfg_channels`).
    return ClassifierFreeGuidance(model, cfg_scale, null_label=num_classes,
                                  channels=getattr(model, "cfg_channels", None) or None)


def classifier_cond_fn(classifier: nn.Module, scale: float) -> Callable:
    """
    Classifier guidance's gradient (Dhariwal & Nichol 2021, Algorithms 1-2):
    cond_fn(x, t, y) = scale * grad_x log p_phi(y | x_t, t).

    :param classifier: a noisy-image classifier taking (x, t) and returning [N x K] logits.
    :param scale: the classifier scale s.
    :return: cond_fn(x, t, y=None, **kwargs) -> [N x C x H x W] gradient.
    """

    def cond_fn(x: th.Tensor, t: th.Tensor, y: th.Tensor | None = None, **kwargs) -> th.Tensor:
        if y is None:
            raise ValueError("classifier guidance needs class labels: pass model_kwargs={'y': ...}")
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[th.arange(len(y), device=y.device), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn
