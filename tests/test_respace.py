"""Timestep respacing: the original's step choices, a spaced process with unchanged marginals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch as th

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion, _WrappedModel, space_timesteps

from conftest import GOLDEN_DIR


def spaced(steps=1000, spec="10", schedule="linear", rescale_timesteps=False):
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, spec),
        betas=gd.get_named_beta_schedule(schedule, steps),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
        rescale_timesteps=rescale_timesteps,
    )


def test_space_timesteps_matches_original_golden():
    cases = json.loads((GOLDEN_DIR / "space_timesteps.json").read_text())
    assert cases
    for key, want in cases.items():
        n, spec = key.split("|")
        assert sorted(space_timesteps(int(n), spec)) == want, key


def test_space_timesteps_sections_and_strides():
    # One section: evenly strided, first and last step included.
    assert sorted(space_timesteps(10, "4")) == [0, 3, 6, 9]
    assert sorted(space_timesteps(10, [10])) == list(range(10))
    # Sections of 4, 3, 3 steps (the first gets the remainder), each strided on its own.
    assert sorted(space_timesteps(10, "2,1,3")) == [0, 3, 4, 7, 8, 9]
    assert sorted(space_timesteps(10, [2, 1, 3])) == [0, 3, 4, 7, 8, 9]
    # Counts of 1 take the start of the section; rounding follows Python's round().
    assert sorted(space_timesteps(100, "1,1")) == [0, 50]
    assert sorted(space_timesteps(8, "3")) == [0, 4, 7]  # round(3.5) == 4
    # DDIM: the integer stride that yields exactly N steps.
    assert sorted(space_timesteps(100, "ddim4")) == [0, 25, 50, 75]
    assert sorted(space_timesteps(1000, "ddim3")) == [0, 334, 668]


@pytest.mark.parametrize(
    "spec,match",
    [("ddim6", "ddim6"), ("11", "11"), ("5,7", "section 1"), ("ddimx", "ddimx"), ("a,b", "a,b")],
)
def test_space_timesteps_bad_specs_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        space_timesteps(10 if spec != "ddim6" else 20, spec)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_spaced_betas_reproduce_alphas_cumprod_at_kept_steps(schedule):
    base = gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule(schedule, 1000),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
    )
    diffusion = spaced(spec="10,20,5", schedule=schedule)
    kept = sorted(space_timesteps(1000, "10,20,5"))
    assert diffusion.timestep_map == kept and diffusion.num_timesteps == 35
    assert diffusion.original_num_steps == 1000
    # Same marginals q(x_t | x_0) at the kept steps, so the trained model still applies.
    np.testing.assert_allclose(diffusion.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-9)
    # Keeping every step changes nothing.
    full = spaced(spec="1000", schedule=schedule)
    np.testing.assert_allclose(full.betas, base.betas, rtol=1e-9)


def test_wrapped_model_sees_original_timesteps():
    seen = []

    def model(x, t, **kw):
        seen.append(t)
        return th.zeros_like(x)

    x = th.zeros(3, 1, 2, 2)
    t = th.tensor([0, 1, 4])
    diffusion = spaced(spec="5")  # keeps 0, 250, 500, 749, 999
    diffusion.p_mean_variance(model, x, t)
    assert seen[-1].tolist() == [0, 250, 999] and seen[-1].dtype == th.long
    # With rescale_timesteps the model sees original steps on a 1000-step clock, as floats.
    resc = spaced(steps=4000, spec="5", rescale_timesteps=True)
    resc.training_losses(model, x, t)
    assert seen[-1].dtype == th.float32
    assert seen[-1].tolist() == [0.0, 1000 * resc.timestep_map[1] / 4000, 999.75]
    # cond_fn gets the same mapping.
    out = diffusion.p_mean_variance(model, x, t)
    diffusion.condition_mean(model, out, x, t)
    diffusion.condition_score(model, out, x, t)
    assert seen[-1].tolist() == seen[-2].tolist() == [0, 250, 999]


def test_wrapping_is_idempotent():
    diffusion = spaced(spec="5")
    calls = []
    wrapped = diffusion._wrap_model(lambda x, t: calls.append(t) or th.zeros_like(x))
    assert isinstance(wrapped, _WrappedModel)
    assert diffusion._wrap_model(wrapped) is wrapped
    # A pre-wrapped model is not mapped twice (999 would be out of range of the map).
    diffusion.p_mean_variance(wrapped, th.zeros(1, 1, 2, 2), th.tensor([4]))
    assert calls[-1].tolist() == [999]


def test_out_of_range_timesteps_are_rejected():
    with pytest.raises(ValueError, match="outside"):
        SpacedDiffusion(
            use_timesteps=[0, 10],
            betas=gd.get_named_beta_schedule("cosine", 10),
            model_mean_type=gd.ModelMeanType.EPSILON,
            model_var_type=gd.ModelVarType.FIXED_LARGE,
            loss_type=gd.LossType.MSE,
        )


def test_respace_builds_the_factorys_diffusion():
    """`diffusion.respace` is the factory's construction: the same schedule, types and map."""
    from guided_diffusion.script_util import create_gaussian_diffusion

    flags = dict(steps=100, learn_sigma=True, noise_schedule="cosine", rescale_timesteps=True,
                 rescale_learned_sigmas=True)
    full = create_gaussian_diffusion(**flags)
    keep = sorted(space_timesteps(100, "3,7"))
    mine = full.respace(keep)
    ref = create_gaussian_diffusion(**flags, timestep_respacing="3,7")
    assert type(mine) is type(ref) and mine.timestep_map == ref.timestep_map == keep
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped"):
        assert np.array_equal(getattr(mine, name), getattr(ref, name)), name
    for name in ("model_mean_type", "model_var_type", "loss_type", "rescale_timesteps",
                 "original_num_steps"):
        assert getattr(mine, name) == getattr(ref, name), name
    assert np.array_equal(mine.base_kwargs["betas"], gd.get_named_beta_schedule("cosine", 100))


def test_respacing_a_spaced_diffusion_picks_from_its_grid():
    """Grid indices of a respaced diffusion map to base timesteps: the model sees those."""
    outer = spaced(1000, "10")
    inner = outer.respace([0, 4, 9])
    assert inner.timestep_map == [outer.timestep_map[i] for i in (0, 4, 9)] == [0, 444, 999]
    base = gd.GaussianDiffusion(**outer.base_kwargs)
    assert np.allclose(inner.alphas_cumprod, base.alphas_cumprod[[0, 444, 999]], rtol=1e-12)
    seen = []
    inner.p_mean_variance(lambda x, t: seen.append(t.tolist()) or th.zeros_like(x),
                          th.zeros(2, 1, 2, 2), th.tensor([1, 2]))
    assert seen == [[444, 999]]
    with pytest.raises(ValueError, match="10-step grid"):
        outer.respace([3, 10])
