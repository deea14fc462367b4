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
        ts = select_timesteps(acp, n, "karras", sigma_max=80.0)
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
    assert select_timesteps(acp, 10, "karras", sigma_max=80.0, rho=3.0)[5] > ts[5]
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
        select_timesteps(acp, 5, "edm-like")


@pytest.mark.parametrize("schedule, steps", RELEASED)
@pytest.mark.parametrize("sigma_max, sigma_min", [(80.0, 0.0), (20.0, 0.05), (10.0, 0.1)])
def test_edm_grid_lies_wholly_between_the_caps(schedule, steps, sigma_max, sigma_min):
    """
    "edm": every evaluated point at or below the cap (no entry at the top) and the last one the
    grid point nearest sigma_min (no evaluation at sigma~ 0.006 on cosine); N points, N NFE.
    """
    acp, sig = sigma_tilde(schedule, steps)
    cap_index = int(np.flatnonzero(sig <= sigma_max)[-1])
    low_index = int(np.abs(np.log(sig) - np.log(max(sigma_min, sig[0]))).argmin())
    for n in (2, 3, 4, 5, 6, 8, 10, 20, 50):
        ts = select_timesteps(acp, n, "edm", sigma_max=sigma_max, sigma_min=sigma_min)
        assert len(ts) == n and np.all(np.diff(ts) < 0), (n, ts)
        assert ts[0] == cap_index and ts[-1] == low_index, (n, ts, cap_index, low_index)
        assert np.all(sig[ts] <= sigma_max), (n, sig[ts])
        # karras keeps its entry and its clean end whatever sigma_min says
        kt = select_timesteps(acp, n, "karras", sigma_max=sigma_max, sigma_min=sigma_min)
        assert kt[0] == steps - 1 and kt[-1] == 0


def test_edm_grid_follows_eq5_between_the_ends_in_closed_form():
    """EDM's eq. 5 written out: sigma_i = (hi^(1/rho) + i/(N-1) (lo^(1/rho) - hi^(1/rho)))^rho
    from the cap's sigma~ to sigma_min's grid point; each pick within one grid step of it."""
    acp, sig = sigma_tilde("cosine", 1000)
    assert 19.4 < sig[966] <= 20 < sig[967]  # the cap point of sigma_max 20
    ts = select_timesteps(acp, 6, "edm", sigma_max=20.0, sigma_min=0.05, rho=7.0)
    lo = sig[int(np.abs(np.log(sig) - np.log(0.05)).argmin())]
    i = np.arange(6) / 5
    targets = (sig[966] ** (1 / 7) + i * (lo ** (1 / 7) - sig[966] ** (1 / 7))) ** 7
    for t, target in zip(ts, targets):
        assert sig[max(t - 1, 0)] <= target <= sig[min(t + 1, 999)], (ts, targets)
    with pytest.raises(ValueError, match="--sigma_min"):
        select_timesteps(acp, 5, "edm", sigma_max=20.0, sigma_min=30.0)
    with pytest.raises(ValueError, match="--cm_spacing"):
        samplers.cm_timesteps(acp, 18, "edm")  # a distillation grid needs both ends


def test_edm_sampling_starts_at_the_cap_from_x_T():
    """
    The loop starts at the cap with x_T as the sample there and ends with the x_0 prediction at
    sigma_min's point: on N(mu, s^2) data the samples converge to the exact ODE map of x_T from
    the cap to that point followed by the exact posterior mean (solver error ~ 1/N^2). Entering
    at the top (karras) or ending at grid index 0 are different maps, over 10x farther away.
    """
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    model = GaussianModel(diffusion.alphas_cumprod)
    acp, _ = sigma_tilde("cosine", 1000)
    x_T = noise((512, 1, 1, 1))
    ts = select_timesteps(acp, 160, "edm", sigma_max=20.0, sigma_min=0.05)
    cap, low, a = int(ts[0]), int(ts[-1]), float(acp[ts[-1]])

    def posterior_mean(x_t):
        return model.mu + a ** 0.5 * model.s ** 2 * (x_t - a ** 0.5 * model.mu) / (
            a * model.s ** 2 + 1 - a)

    expected = posterior_mean(model.ode(x_T, cap, low))
    errors = []
    for n in (40, 160):
        x = sample(diffusion, model, x_T.shape, noise=x_T, clip_denoised=False,
                   sampler="dpm++2m", steps=n, sampler_spacing="edm", sigma_max=20.0,
                   sigma_min=0.05)
        errors.append((x.double() - expected).abs().max().item())
    assert errors[1] < 5e-4 and errors[0] > 4 * errors[1], errors
    for other in (posterior_mean(model.ode(x_T, 999, low)), model.ode(x_T, cap, 0)):
        assert (other - expected).abs().max().item() > 10 * errors[1]




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
    """--sampler_spacing auto (the default) = AUTO_SPACING per sampler; DDPM keeps the original's
    uniform respacing, and `--sampler ddim --steps N --sampler_spacing uniform` is exactly
    `--timestep_respacing N` with the original's DDIM loop."""
    assert samplers.sampler_defaults()["sampler_spacing"] == "auto"
    for name in samplers.SAMPLERS:
        assert samplers.spacing_for(name, "auto") in samplers.SPACINGS
        assert samplers.spacing_for(name, "logsnr") == "logsnr"
    assert samplers.spacing_for("ddpm", "auto") == "uniform"
    assert samplers.spacing_for("unipc", "auto") == samplers.spacing_for("ddim", "auto") == "edm"
    diffusion = create_gaussian_diffusion(steps=1000)
    model = GaussianModel(diffusion.alphas_cumprod)
    shape = (4, 2, 1, 1)
    auto = sample(diffusion, model, shape, noise=noise(shape), sampler="ddim", steps=10,
                  sampler_spacing="uniform")
    spaced = create_gaussian_diffusion(steps=1000, timestep_respacing="10")
    assert th.equal(auto, spaced.ddim_sample_loop(model, shape, noise=noise(shape)))
