"""Karras spacing of `--steps` and the UniPC solver, on the released schedules and closed forms.

The closed-form model and the log-SNR-uniform test grids come from test_samplers: for
N(mu, s^2) data the exact denoiser and the exact probability-flow ODE map are known.
"""

import numpy as np
import pytest
import torch as th

from guided_diffusion import samplers
from guided_diffusion.samplers import Denoiser, sample, select_timesteps, solve
from guided_diffusion.script_util import create_gaussian_diffusion
from test_samplers import GaussianModel, lambda_grid_diffusion, noise, observed_orders

# The released checkpoints' schedules: ADM ImageNet-64 (cosine, 1000 steps), the 128/256/512
# models and upsamplers (linear, 1000 steps); 4000-step cosine is the README's training example.
RELEASED = [("cosine", 1000), ("linear", 1000), ("cosine", 4000)]


def sigma_tilde(schedule, steps):
    acp = create_gaussian_diffusion(steps=steps, noise_schedule=schedule).alphas_cumprod
    return acp, np.sqrt((1 - acp) / acp)


@pytest.mark.parametrize("schedule, steps", RELEASED)
def test_karras_grid_enters_at_the_top_then_stays_at_or_below_the_cap(schedule, steps):
    acp, sig = sigma_tilde(schedule, steps)
    cap_index = int(np.flatnonzero(sig <= 80.0)[-1])  # noisiest grid point at or below 80
    assert sig[-1] > 80.0  # every released grid starts above the cap
    for n in (2, 3, 4, 5, 6, 8, 10, 12, 20, 25, 50, 100, 250):
        ts = select_timesteps(acp, n, "karras")
        assert len(ts) == n and ts[0] == steps - 1 and ts[-1] == 0, (n, ts)
        assert np.all(np.diff(ts) < 0), (n, ts)
        assert np.all(sig[ts[1:]] <= 80.0), (n, ts, sig[ts])
        if n >= 3:
            assert ts[1] == cap_index, (n, ts)  # one jump from the entry down to the cap
    if schedule == "cosine":  # logsnr, by contrast, spends points above the cap there
        assert np.sum(sig[select_timesteps(acp, 12, "logsnr")[1:]] > 80.0) >= 4


def test_cosine_cap_index_and_rho_spacing_in_closed_form():
    """
    On cosine-1000, sigma~(990) = 71.3 and sigma~(991) = 80.2, so the cap point is 990; the
    other points sit within one grid step of EDM's eq. 5 targets, computed here from the formula.
    """
    acp, sig = sigma_tilde("cosine", 1000)
    assert 71 < sig[990] <= 80 < sig[991]
    ts = select_timesteps(acp, 10, "karras", sigma_max=80.0, rho=7.0)
    i = np.arange(9) / 8
    targets = (sig[990] ** (1 / 7) + i * (sig[0] ** (1 / 7) - sig[990] ** (1 / 7))) ** 7
    for t, target in zip(ts[1:], targets):
        lo, hi = sig[max(t - 1, 0)], sig[min(t + 1, 999)]
        assert lo <= target <= hi, (ts, targets)
    # A larger rho crowds the points toward the clean end; sigma_max moves the cap.
    assert select_timesteps(acp, 10, "karras", rho=3.0)[5] > ts[5]
    assert select_timesteps(acp, 10, "karras", sigma_max=20.0)[1] == np.flatnonzero(sig <= 20)[-1]


def test_karras_grid_below_the_cap_and_bad_values():
    acp, sig = sigma_tilde("linear", 1000)  # top at sigma~ = 157
    ts = select_timesteps(acp, 6, "karras", sigma_max=200.0)  # all of the grid under the cap
    assert ts[0] == 999 and ts[-1] == 0 and ts[1] < 929  # spaced from the top, no entry jump
    # More points than the grid has below the cap: the rest go above, still strictly decreasing.
    ts = select_timesteps(acp, 990, "karras")
    assert len(set(ts)) == 990 and ts[0] == 999 and np.all(np.diff(ts) < 0)
    with pytest.raises(ValueError, match="--sigma_max"):
        select_timesteps(acp, 5, "karras", sigma_max=0.001)
    with pytest.raises(ValueError, match="--sigma_max and --rho"):
        select_timesteps(acp, 5, "karras", rho=0.0)
    with pytest.raises(ValueError, match="--sampler_spacing"):
        select_timesteps(acp, 5, "edm")


# Tiny models run fastest on one thread of a busy CPU (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _errors(name, ns):
    x_T = noise((32, 4, 1, 1))
    errors = []
    for n in ns:
        diffusion = lambda_grid_diffusion(n)
        model = GaussianModel(diffusion.alphas_cumprod)
        den = Denoiser(diffusion, model, clip_denoised=False)
        x = solve(name, den, x_T.clone(), list(range(n - 1, -1, -1)))
        assert den.nfe == n - 1  # UniC reuses the next evaluation: one per step
        errors.append((x - model.ode(x_T, n - 1, 0)).abs().max().item())
    return errors


def test_unipc_is_third_order_with_its_corrector():
    """
    UniPC-2 (bh2) on log-SNR-uniform grids of 32, 64, 128 points: the error against the exact
    flow falls by ~2^3 per doubling (measured 2.95, 3.01), one order above its predictor alone,
    which is DPM-Solver++(2M) (order 2): the corrector, not an extra evaluation, buys the order.
    """
    unipc, dpm2m = _errors("unipc", (32, 64, 128)), _errors("dpm++2m", (32, 64, 128))
    orders = observed_orders(unipc)
    assert 2.7 <= orders[-1] <= 3.3, (unipc, orders)
    assert 1.8 <= observed_orders(dpm2m)[-1] <= 2.2
    assert unipc[-1] < dpm2m[-1] / 5


def test_unipc_first_step_is_ddim_and_step_to_clean_is_the_x0_prediction():
    diffusion = create_gaussian_diffusion(steps=1000)
    model = GaussianModel(diffusion.alphas_cumprod)
    x = noise((8, 2, 1, 1))
    for ts in ([999, 500], [600, 300]):
        assert th.allclose(solve("unipc", Denoiser(diffusion, model, clip_denoised=False), x, ts),
                           solve("ddim", Denoiser(diffusion, model, clip_denoised=False), x, ts),
                           atol=1e-12)
    den = Denoiser(diffusion, model, clip_denoised=False)
    out = list(samplers.solve_progressive("unipc", den, x, [999, 400, 0, samplers.CLEAN]))
    assert th.equal(out[-1]["sample"], out[-1]["pred_xstart"])


@pytest.mark.parametrize("name", [*samplers.SAMPLERS])
@pytest.mark.parametrize("spacing", ["logsnr", "uniform", "karras"])
def test_few_steps_run_for_every_sampler_and_spacing(name, spacing):
    """--steps 2 and 3 sample (finite values); --steps 1 and beyond the grid refuse in one line."""
    diffusion = create_gaussian_diffusion(steps=1000)
    model = GaussianModel(diffusion.alphas_cumprod)
    shape = (4, 1, 1, 1)
    with pytest.raises(ValueError, match="--steps 1 is too few"):
        sample(diffusion, model, shape, sampler=name, steps=1, sampler_spacing=spacing,
               device="cpu")
    for steps in (2, 3):
        th.manual_seed(0)
        x = sample(diffusion, model, shape, noise=noise(shape), clip_denoised=False,
                   device="cpu", sampler=name, steps=steps, sampler_spacing=spacing)
        assert x.shape == shape and th.isfinite(x).all(), (name, spacing, steps)
    with pytest.raises(ValueError, match="--steps"):
        sample(diffusion, model, shape, sampler=name, steps=1001, sampler_spacing=spacing,
               device="cpu")


def test_heun_with_per_sample_timesteps_is_the_int_step_in_one_batched_evaluation():
    """
    Distillation's teacher step: a batch with a different (t, t_next) per sample, entry step
    (Euler) and clean end included, equals the int-timestep Heun step sample by sample (float64
    data: to rounding), in 2 evaluations of the whole batch.
    """
    diffusion = create_gaussian_diffusion(steps=1000)
    model = GaussianModel(diffusion.alphas_cumprod)
    pairs = [(999, 990), (990, 935), (400, 399), (20, 0), (5, samplers.CLEAN)]
    x = noise((len(pairs), 3, 1, 1))
    t = th.tensor([a for a, _ in pairs])
    t_next = th.tensor([b for _, b in pairs])
    den = Denoiser(diffusion, model, clip_denoised=False)
    batched = samplers.STEPS["heun"](den, x, t, t_next, [den(x, t)])
    assert den.nfe == 2
    for i, (a, b) in enumerate(pairs):
        one = Denoiser(diffusion, model, clip_denoised=False)
        xi = x[i:i + 1]
        ref = samplers.STEPS["heun"](one, xi, a, b, [one(xi, a)])
        assert th.allclose(batched[i:i + 1], ref, rtol=1e-10, atol=1e-12), (a, b)


def test_auto_spacing_is_each_samplers_measured_choice():
    """--sampler_spacing auto (the default) = AUTO_SPACING per sampler; DDPM/DDIM keep the
    original's uniform respacing, so `--sampler ddim --steps N` = `--timestep_respacing N`."""
    assert samplers.sampler_defaults()["sampler_spacing"] == "auto"
    for name in samplers.SAMPLERS:
        assert samplers.spacing_for(name, "auto") in ("logsnr", "uniform", "karras")
        assert samplers.spacing_for(name, "logsnr") == "logsnr"
    assert samplers.spacing_for("ddim", "auto") == "uniform"
    diffusion = create_gaussian_diffusion(steps=1000)
    model = GaussianModel(diffusion.alphas_cumprod)
    shape = (4, 2, 1, 1)
    auto = sample(diffusion, model, shape, noise=noise(shape), sampler="ddim", steps=10)
    spaced = create_gaussian_diffusion(steps=1000, timestep_respacing="10")
    assert th.equal(auto, spaced.ddim_sample_loop(model, shape, noise=noise(shape)))
