"""Timestep respacing: run a diffusion trained with T steps on a subset of its timesteps.

Keeping steps S = {s_1 < ... < s_K} of the original process and setting
beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}} gives a K-step process with the *same* marginals
q(x_{s_k} | x_0) (Nichol & Dhariwal 2021, sec 4), so a model trained on T steps can sample in K.
"""

from __future__ import annotations

import numpy as np
import torch as th

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts) -> set:
    """
    Choose which timesteps of the original process to keep.

    The process is split into len(section_counts) equal sections (the first T % len sections are
    one step longer) and each section keeps its count of evenly strided steps, rounded to
    integers.  For example, T = 300 with [10, 15, 20] keeps 10 steps from the first 100,
    15 from the next 100 and 20 from the last 100.

    :param num_timesteps: T, the number of steps of the original process.
    :param section_counts: a list of step counts per section, or a string of comma-separated
                           counts ("10,15,20"; "250" is one section).  "ddimN" instead picks the
                           integer stride that gives exactly N steps, as the DDIM paper does.
    :return: the set of original timesteps to keep.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired_count = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(
                    f"timestep respacing {section_counts!r}: expected 'ddim' followed by a step "
                    f"count, e.g. 'ddim25'"
                ) from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep respacing {section_counts!r}: cannot take exactly {desired_count} "
                f"steps out of {num_timesteps} with an integer stride"
            )
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep respacing {section_counts!r}: expected comma-separated step counts "
                f"(e.g. '250' or '10,15,20') or 'ddimN'"
            ) from None
    section_counts = list(section_counts)
    if not section_counts:
        raise ValueError("timestep respacing needs at least one section count")
    if any(c < 0 for c in section_counts):
        raise ValueError(f"timestep respacing {section_counts}: counts must not be negative")

    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"timestep respacing {section_counts}: section {i} has {size} of the "
                f"{num_timesteps} steps, cannot take {section_count} from it"
            )
        # Stride that puts the first and last kept step on the section's ends.
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulate the float index (not i * stride): it rounds like the original.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


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
