"""Timestep respacing: run a diffusion trained with T steps on a subset of its timesteps.

Keeping steps S = {s_1 < ... < s_K} of the original process and setting
beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}} gives a K-step process with the *same* marginals
q(x_{s_k} | x_0) (Nichol & Dhariwal 2021, sec 4), so a model trained on T steps can sample in K.
"""

from __future__ import annotations

# The original's home of these names. SpacedDiffusion lives beside GaussianDiffusion, whose
# `respace()` builds one: in one module, the pair needs no import inside a function.
from .config import space_timesteps  # noqa: F401
from .gaussian_diffusion import SpacedDiffusion, _WrappedModel  # noqa: F401
