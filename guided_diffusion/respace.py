"""Timestep respacing: run a diffusion trained with T steps on a subset of its timesteps.

Keeping steps S = {s_1 < ... < s_K} of the original process and setting
beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}} gives a K-step process with the *same* marginals
q(x_{s_k} | x_0) (Nichol & Dhariwal 2021, sec 4), so a model trained on T steps can sample in K.
"""

from __future__ import annotations

import numpy as np
import torch as th

from .config import space_timesteps  # noqa: F401 -- the original's home of this name
from .gaussian_diffusion import GaussianDiffusion


class SpacedDiffusion(GaussianDiffusion):
    """
    A diffusion process which can skip steps of a base diffusion process.

    Models are still called with the *original* timesteps: every model and cond_fn passed in is
    wrapped so that spaced step k becomes timestep_map[k] (rescaled to [0, 1000) when
    rescale_timesteps is set).

    :param use_timesteps: a collection of timesteps of the original process to keep.
    :param kwargs: the keyword arguments of GaussianDiffusion for the base process.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map = []
        self.original_num_steps = len(kwargs["betas"])
        unknown = sorted(s for s in self.use_timesteps if not 0 <= s < self.original_num_steps)
        if unknown:
            raise ValueError(
                f"use_timesteps {unknown[:5]} are outside the base process's "
                f"{self.original_num_steps} steps"
            )

        base_diffusion = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                # Chosen so that the cumulative product over kept steps is abar_i.
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        base_kwargs = dict(kwargs, betas=base_diffusion.betas)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self.base_kwargs = base_kwargs  # `respace` respaces the base process, not this one

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):  # already maps timesteps: never map twice
            return model
        return _WrappedModel(
            model, self.timestep_map, self.rescale_timesteps, self.original_num_steps
        )

    def _scale_timesteps(self, t):
        # Scaling is done by the wrapped model, on the original timesteps.
        return t


class _WrappedModel:
    """Calls `model` (or a cond_fn) with spaced timesteps mapped back to the original ones."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        map_tensor = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        new_ts = map_tensor[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
