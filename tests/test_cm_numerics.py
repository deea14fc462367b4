"""Numerics of consistency models: the float64 boundary and parameterisation, the teacher's step."""

import json
import math

import numpy as np
import pytest
import torch as th

from guided_diffusion import sample_util, samplers
from guided_diffusion.config import ConsistencyConfig, defaults
from guided_diffusion.samplers import ConsistencyFunction, cm_timesteps, sample_timesteps
from guided_diffusion.script_util import create_gaussian_diffusion


class ConstantX0(th.nn.Module):
    """An x_0-predicting 'network' that outputs a fixed image D (so f is known in closed form)."""

    def __init__(self, d):
        super().__init__()
        self.d = d

    def forward(self, x, t, **kwargs):
        return self.d.expand_as(x)


def test_f_at_the_top_of_a_cosine_grid_has_no_float32_cancellation():
    """
    At t = 999 of cosine-1000, x~ = x / alpha ~ 2e4 x and c_out = 1 - 3e-7: the float32 form
    x~ - c_out (x~ - D) loses ~1e-3 per value (measured here as the power check); f is computed
    in float64 and matches the float64 closed form c_skip x~ + c_out D to float32 rounding.
    """
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="cosine", predict_xstart=True)
    g = th.Generator().manual_seed(0)
    x = th.randn(8, 3, 16, 16, generator=g)
    d = th.rand(1, 3, 16, 16, generator=g) * 2 - 1
    fn = ConsistencyFunction(diffusion, ConstantX0(d), t_min=0)
    acp = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
    sig = np.sqrt((1 - acp) / acp)
    t = 999
    c_skip, alpha = sig[0] / sig[t], math.sqrt(acp[t])
    exact = c_skip * x.double() / alpha + (1 - c_skip) * d.double()
    with th.no_grad():
        f = fn(x, t)
    assert f.dtype == th.float32
    assert (f.double() - exact).abs().max() < 1e-6
    # The old float32 form on the same numbers: errors of about one uint8 level (2/255 ~ 8e-3).
    x_tilde = x / th.tensor(alpha, dtype=th.float32)
    old = x_tilde - th.tensor(1 - c_skip, dtype=th.float32) * (x_tilde - d)
    assert (old.double() - exact).abs().max() > 1e-4


class CountingX0(th.nn.Module):
    """x_0-predicting stand-in that records the (original) timestep of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append(int(t[0]))
        return th.zeros_like(x)


@pytest.mark.parametrize("cm_steps, cm_spacing", [(18, "karras"), (12, "logsnr"), (40, "karras")])
def test_k_step_sampling_evaluates_only_training_grid_levels_k_times(cm_steps, cm_spacing,
                                                                     tmp_path):
    """
    The levels come from the student's training grid, read from its run's args.json: K network
    evaluations, each at a grid point it was trained on, the first at the grid's top.
    """
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="cosine", predict_xstart=True)
    (tmp_path / "args.json").write_text(json.dumps(
        dict(training_mode="consistency_distillation", cm_steps=cm_steps, cm_spacing=cm_spacing)))
    grid = sample_util.consistency_grid(str(tmp_path / "model000450.pt"), diffusion)
    assert grid.tolist() == cm_timesteps(diffusion.alphas_cumprod, cm_steps, cm_spacing).tolist()
    shape = (2, 3, 4, 4)
    for k in (1, 2, 3, 4, 6):
        model = CountingX0()
        x = samplers.sample(diffusion, model, shape, noise=th.randn(shape), sampler="consistency",
                            steps=k, cm_grid=grid)
        assert th.isfinite(x).all()
        assert len(model.calls) == k == samplers.nfe("consistency", k)
        assert set(model.calls) <= set(grid[1:].tolist()), (model.calls, grid)
        assert model.calls[0] == 999 and all(a > b for a, b in zip(model.calls, model.calls[1:]))
    with pytest.raises(ValueError, match="exceeds the student's training grid"):
        samplers.sample(diffusion, CountingX0(), shape, sampler="consistency", steps=cm_steps,
                        cm_grid=grid)


def test_second_level_is_the_training_point_nearest_the_measured_sigma():
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    acp = diffusion.alphas_cumprod
    grid = cm_timesteps(acp, 18, "karras")
    sig = np.sqrt((1 - acp) / acp)
    two = sample_timesteps(acp, 2, grid)
    inner = grid[1:-1]
    best = inner[np.abs(np.log(sig[inner]) - math.log(samplers.CM_SECOND_SIGMA)).argmin()]
    assert two.tolist() == [999, best]
    # Without a grid: the grid of cm_distill's default flags.
    cm = defaults(ConsistencyConfig)
    default_grid = cm_timesteps(acp, cm["cm_steps"], cm["cm_spacing"])
    assert sample_timesteps(acp, 3).tolist() == sample_timesteps(acp, 3, default_grid).tolist()
