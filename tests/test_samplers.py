"""Samplers on data whose exact denoiser is known in closed form.

For data x_0 ~ N(mu, s^2 I) the marginal at timestep t is N(sqrt(a) mu, (a s^2 + 1 - a) I) with
a = alphas_cumprod[t], so the exact eps-predictor is
    eps*(x_t) = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a),
and the probability-flow ODE keeps the standardized value
z = (x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a) fixed at every time (it is the monotone transport
between Gaussians). Everything runs in float64 on a few dimensions, with no network.
"""

import math

import numpy as np
import pytest
import torch as th
from scipy.integrate import solve_ivp

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import samplers
from guided_diffusion.samplers import CLEAN, Denoiser, sample, select_timesteps, solve
from guided_diffusion.script_util import create_gaussian_diffusion

MU, S = 0.3, 0.5
ODE_SOLVERS = ["ddim", "plms", "dpm++2m", "dpm++3m", "heun", "unipc"]


class GaussianModel:
    """The exact predictor for N(mu, s^2 I) data, called with the *original* timesteps."""

    def __init__(self, alphas_cumprod, mu=MU, s=S, output="eps"):
        self.acp = th.tensor(np.asarray(alphas_cumprod), dtype=th.float64)
        self.mu, self.s, self.output = mu, s, output

    def __call__(self, x, t, y=None):
        a = self.acp[t.long()].view(-1, *[1] * (x.dim() - 1))
        var = a * self.s**2 + 1 - a
        if self.output == "x0":  # posterior mean E[x_0 | x_t]
            return self.mu + a.sqrt() * self.s**2 * (x - a.sqrt() * self.mu) / var
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mu) / var
        if self.output == "eps+var":  # a learned-sigma model: 2C channels, variance values v = 0.3
            return th.cat([eps, th.full_like(eps, 0.3)], dim=1)
        return eps

    def ode(self, x, t_from, t_to):
        """The exact probability-flow ODE map from timestep t_from to t_to."""
        a0, a1 = self.acp[t_from], self.acp[t_to]
        z = (x - a0.sqrt() * self.mu) / (a0 * self.s**2 + 1 - a0).sqrt()
        return a1.sqrt() * self.mu + (a1 * self.s**2 + 1 - a1).sqrt() * z


def lambda_grid_diffusion(n, lam_clean=6.0, lam_noisy=-8.0):
    """A diffusion whose n grid points are exactly uniform in log-SNR (index 0 = cleanest)."""
    lam = np.linspace(lam_clean, lam_noisy, n)
    acp = 1.0 / (1.0 + np.exp(-2.0 * lam))
    betas = 1.0 - acp / np.append(1.0, acp[:-1])
    return gd.GaussianDiffusion(
        betas=betas,
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
    )


def noise(shape, seed=0):
    return th.randn(*shape, generator=th.Generator().manual_seed(seed), dtype=th.float64)


def observed_orders(errors):
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


def test_select_timesteps_spans_the_grid_uniformly_in_log_snr():
    diffusion = create_gaussian_diffusion(steps=1000)
    acp = diffusion.alphas_cumprod
    lam = 0.5 * np.log(acp / (1 - acp))
    for n in (1, 2, 10, 25, 100, 1000):
        ts = select_timesteps(acp, n)
        assert len(ts) == n and ts[0] == 999 and (n == 1 or ts[-1] == 0)
        assert np.all(np.diff(ts) < 0), ts
    ts = select_timesteps(acp, 10)
    steps = np.diff(lam[ts])
    # Ten points over lambda in [-10.1, 9.2]: nearly equal steps of ~2.1 (rounded to the grid).
    assert np.allclose(steps, (lam[0] - lam[-1]) / 9, rtol=0.15), steps
    assert np.array_equal(select_timesteps(acp, 5, "uniform"), [999, 749, 500, 250, 0])
    with pytest.raises(ValueError, match="--steps"):
        select_timesteps(acp, 1001)


@pytest.mark.parametrize(
    "name, order, slack",
    [("ddim", 1, 0.1), ("dpm++2m", 2, 0.1), ("heun", 2, 0.2), ("plms", 2, 0.2),
     # On Gaussian data 3M even converges at order ~4 (measured 4.1): allow above 3.
     ("dpm++3m", 3, 1.3)],
)
def test_ode_solvers_converge_to_the_exact_flow_with_their_order(name, order, slack):
    """
    Integrate from lambda = -8 to lambda = 6 on grids exactly uniform in log-SNR with N = 32, 64,
    128 points; the error against the closed-form ODE solution falls by ~2^order per doubling.
    (PLMS's fixed Adams-Bashforth weights assume equal steps, which lambda-uniform steps are not in
    sigma/alpha: it is second order here.)
    """
    x_T = noise((32, 4, 1, 1))
    errors = []
    for n in (32, 64, 128):
        diffusion = lambda_grid_diffusion(n)
        model = GaussianModel(diffusion.alphas_cumprod)
        den = Denoiser(diffusion, model, clip_denoised=False)
        x = solve(name, den, x_T.clone(), list(range(n - 1, -1, -1)))
        errors.append((x - model.ode(x_T, n - 1, 0)).abs().max().item())
    orders = observed_orders(errors)
    assert errors[-1] < 0.05, errors
    assert order - slack <= orders[-1] <= order + slack, (errors, orders)


def test_dpmpp_3m_is_third_order_on_a_gaussian_mixture():
    """A bimodal 1-D mixture (no Gaussian super-convergence); reference from scipy's RK45."""
    means, stds, weights = th.tensor([-0.6, 0.7]), th.tensor([0.2, 0.3]), th.tensor([0.5, 0.5])

    def eps_fn(x, a):  # exact eps = -sqrt(1 - a) * score of the mixture marginal
        xs, a = x[..., None], a[..., None]
        var = a * stds**2 + 1 - a
        logp = th.log(weights) - 0.5 * th.log(var) - 0.5 * (xs - a.sqrt() * means) ** 2 / var
        post = th.softmax(logp, dim=-1)
        return (1 - a[..., 0]).sqrt() * (post * (xs - a.sqrt() * means) / var).sum(-1)

    x_T = noise((16, 1, 1, 1), seed=1)
    lam_noisy, lam_clean = -8.0, 6.0

    # PF-ODE in x~ = x / alpha and sigma~ = exp(-lambda): dx~/dsigma~ = eps(alpha x~).
    def rhs(sig, y):
        a = 1.0 / (1.0 + sig**2)
        x = th.tensor(y, dtype=th.float64) * math.sqrt(a)
        return eps_fn(x, th.full_like(x, a)).numpy()

    a_T = 1.0 / (1.0 + math.exp(-2 * lam_noisy))
    ivp = solve_ivp(rhs, (math.exp(-lam_noisy), math.exp(-lam_clean)),
                    (x_T.flatten() / math.sqrt(a_T)).numpy(), rtol=1e-11, atol=1e-12)
    a_0 = 1.0 / (1.0 + math.exp(-2 * lam_clean))
    reference = th.tensor(ivp.y[:, -1] * math.sqrt(a_0))

    def model(x, t, acp):
        return eps_fn(x, acp[t].view(-1, 1, 1, 1).expand_as(x))

    errors = []
    for n in (64, 128, 256):
        diffusion = lambda_grid_diffusion(n, lam_clean, lam_noisy)
        acp = th.tensor(diffusion.alphas_cumprod)
        den = Denoiser(diffusion, lambda x, t: model(x, t, acp), clip_denoised=False)
        x = solve("dpm++3m", den, x_T.clone(), list(range(n - 1, -1, -1)))
        errors.append((x.flatten() - reference).abs().max().item())
    orders = observed_orders(errors)
    assert all(2.5 <= o <= 3.6 for o in orders), (errors, orders)


# Tiny models run fastest on one thread of a busy CPU (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_samples_match_the_data_moments(name):
    """
    Every sampler's samples have the data's mean and variance within 5 standard errors once N is
    large enough, and visibly not at N = 2 (so the check has the power to see a wrong sampler).
    """
    diffusion = create_gaussian_diffusion(steps=1000)
    model = GaussianModel(diffusion.alphas_cumprod)
    shape = (4096, 4, 1, 1)
    n = math.prod(shape)
    tol_mean, tol_var = 5 * S / math.sqrt(n), 5 * S**2 * math.sqrt(2 / n)
    errors = []
    for steps in (2, {"ddpm": 250, "ddim": 250, "heun": 40, "dpm++2m-sde": 100}.get(name, 25)):
        th.manual_seed(0)  # DDPM's step noise
        # On the log-SNR grid these step counts were sized for (the default, `auto`, is chosen on
        # image data, where it differs: README).
        x = sample(diffusion, model, shape, noise=noise(shape), clip_denoised=False,
                   device="cpu", sampler=name, steps=steps, sampler_spacing="logsnr")
        errors.append((abs(x.mean().item() - MU), abs(x.var().item() - S**2)))
    (coarse_mean, coarse_var), (fine_mean, fine_var) = errors
    assert fine_mean < tol_mean and fine_var < tol_var, errors
    assert coarse_mean > tol_mean or coarse_var > tol_var, errors


@pytest.mark.parametrize("name", ["plms", "dpm++2m", "dpm++3m", "heun", "unipc"])
def test_eps_x0_and_learned_variance_models_give_the_same_samples(name):
    shape = (8, 3, 2, 2)
    outs = []
    for output, flags in [("eps", {}), ("x0", {"predict_xstart": True}),
                          ("eps+var", {"learn_sigma": True})]:
        diffusion = create_gaussian_diffusion(steps=1000, **flags)
        model = GaussianModel(diffusion.alphas_cumprod, output=output)
        outs.append(sample(diffusion, model, shape, noise=noise(shape), clip_denoised=False,
                           sampler=name, steps=12))
    # Only the float32 schedule coefficients of gaussian_diffusion separate the three routes.
    assert th.allclose(outs[0], outs[1], atol=1e-5) and th.allclose(outs[0], outs[2], atol=1e-9)
    assert not th.allclose(outs[0], noise(shape), atol=0.1)


def test_uniform_steps_are_the_original_respacing_and_ddim_is_first_order():
    """
    `--steps N --sampler_spacing uniform` runs on exactly the grid of `--timestep_respacing N`
    (the same samples, bit for bit, for DDIM and seeded DDPM), and DDIM converges at order 1 to the
    exact flow followed by the last step's x_0 prediction.
    """
    diffusion = create_gaussian_diffusion(steps=1000)
    model = GaussianModel(diffusion.alphas_cumprod)
    shape = (32, 4, 1, 1)
    x_T = noise(shape)
    errors = []
    for n in (25, 50, 100):
        x = sample(diffusion, model, shape, noise=x_T.clone(), clip_denoised=False,
                   device="cpu", sampler="ddim", steps=n, sampler_spacing="uniform")
        spaced = create_gaussian_diffusion(steps=1000, timestep_respacing=str(n))
        assert th.equal(x, spaced.ddim_sample_loop(model, shape, noise=x_T.clone(),
                                                   clip_denoised=False))
        t_top = spaced.timestep_map[-1]
        x_end = model.ode(x_T, t_top, 0)
        reference = GaussianModel(diffusion.alphas_cumprod, output="x0")(
            x_end, th.zeros(shape[0], dtype=th.long))
        errors.append((x - reference).abs().max().item())
    orders = observed_orders(errors)
    assert all(0.85 <= o <= 1.15 for o in orders), (errors, orders)
    th.manual_seed(3)
    x = sample(diffusion, model, shape, noise=x_T.clone(), clip_denoised=False, sampler="ddpm",
               steps=10, sampler_spacing="uniform")
    th.manual_seed(3)
    spaced = create_gaussian_diffusion(steps=1000, timestep_respacing="10")
    assert th.equal(x, spaced.p_sample_loop(model, shape, noise=x_T.clone(), clip_denoised=False))


class CountingModel(GaussianModel):
    """GaussianModel that records the (original) timesteps of every call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def __call__(self, x, t, y=None):
        self.calls.append(int(t[0]))
        return super().__call__(x, t, y)


@pytest.mark.parametrize("name", samplers.SAMPLERS)
@pytest.mark.parametrize("spacing", ["logsnr", "uniform", "karras", "edm"])
def test_every_sampler_runs_the_one_loop_on_the_steps_timesteps_with_nfe(
        name, spacing, monkeypatch):
    """
    `--steps N` means one thing for every sampler: the loop `solve_progressive` runs on the N grid
    timesteps `select_timesteps` picks, evaluating the model nfe(sampler, N) times (N, Heun 2N - 2)
    and at no other timesteps; the Denoiser counts the same number.
    """
    loops = []
    real_loop = samplers.solve_progressive

    def spy(sampler, den, *args, **kwargs):
        loops.append((sampler, den))
        return real_loop(sampler, den, *args, **kwargs)

    monkeypatch.setattr(samplers, "solve_progressive", spy)
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True)
    model = CountingModel(diffusion.alphas_cumprod, output="eps+var")
    shape, steps = (2, 1, 2, 2), 7
    x = sample(diffusion, model, shape, noise=noise(shape), clip_denoised=False, sampler=name,
               steps=steps, sampler_spacing=spacing)
    assert x.shape == shape and th.isfinite(x).all()
    assert [n for n, _ in loops] == [name]
    assert loops[0][1].nfe == len(model.calls) == samplers.nfe(name, steps)
    chosen = select_timesteps(diffusion.alphas_cumprod, steps, spacing)  # default cap and rho
    assert sorted(set(model.calls), reverse=True) == chosen.tolist()
    # The original's loops are the same loop.
    loops.clear()
    if name in ("ddpm", "ddim"):
        loop = diffusion.p_sample_loop if name == "ddpm" else diffusion.ddim_sample_loop
        loop(model, shape, noise=noise(shape), clip_denoised=False)
        assert [n for n, _ in loops] == [name] and loops[0][1].nfe == 1000


@pytest.mark.parametrize("name", ["ddim", *ODE_SOLVERS[1:]])
def test_classifier_guidance_with_the_exact_classifier_gives_the_conditional_flow(name):
    """
    With the exact classifier between an "unconditional" N(0, 0.6^2) and a "conditional"
    N(mu, s^2), grad log p(y | x_t) = (eps_u - eps_c) / sqrt(1 - a), so guided sampling of the
    unconditional model at scale 1 must reproduce the conditional model's ODE samples. Run on a
    respaced diffusion: cond_fn must see the model's original timesteps.
    """
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim20")
    acp = diffusion.alphas_cumprod  # of the respaced grid: only used for the orig. timesteps below
    base = create_gaussian_diffusion(steps=1000).alphas_cumprod
    uncond = GaussianModel(base, mu=0.0, s=0.6)
    cond = GaussianModel(base)
    base_acp = th.tensor(base)

    def cond_fn(x, t, **kwargs):
        a = base_acp[t.long()].view(-1, 1, 1, 1)
        return (uncond(x, t) - cond(x, t)) / (1 - a).sqrt()

    assert len(acp) == 20
    shape = (16, 2, 1, 1)
    kwargs = dict(noise=noise(shape), clip_denoised=False, sampler=name, device="cpu")
    guided = sample(diffusion, uncond, shape, cond_fn=cond_fn, **kwargs)
    target = sample(diffusion, cond, shape, **kwargs)
    assert th.allclose(guided, target, atol=1e-6)
    assert not th.allclose(sample(diffusion, uncond, shape, **kwargs), target, atol=0.05)


def test_sample_validates_its_options():
    diffusion = create_gaussian_diffusion(steps=100)
    model = GaussianModel(diffusion.alphas_cumprod)
    shape = (2, 1, 1, 1)
    with pytest.raises(ValueError, match="--sampler"):
        sample(diffusion, model, shape, sampler="euler_a", device="cpu")
    with pytest.raises(TypeError, match="unknown option"):
        sample(diffusion, model, shape, sampler="ddim", stepz=3, device="cpu")
    with pytest.raises(ValueError, match="--eta"):
        sample(diffusion, model, shape, sampler="plms", eta=0.5, device="cpu")
    with pytest.raises(ValueError, match="--sampler_spacing"):
        sample(diffusion, model, shape, sampler="ddim", steps=3, sampler_spacing="log")
    with pytest.raises(ValueError, match="previous grid point"):
        solve("ddpm", Denoiser(diffusion, model), noise(shape), [99, 50, CLEAN])
    assert set(samplers.sampler_defaults()) == {"sampler", "steps", "sampler_spacing",
                                                "sigma_max", "rho", "sigma_min", "cfg_scale",
                                                "eta"}
    assert samplers.nfe("heun", 10) == 18 and samplers.nfe("dpm++2m", 20) == 20


def test_sampler_table_metrics():
    """The quality table's eval space, toy FID and coverage on real digits."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "scripts" / "sampler_table.py"
    spec = importlib.util.spec_from_file_location("sampler_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    from datasets.digits import load_digits

    feats, labels, is_val = table.real_digits(16)
    images, _ = load_digits()
    # Bicubic up to 16 px and 2x2 averages back nearly recover the 8x8 digits (ink 0..16):
    # mean error 0.67 (bicubic overshoot and uint8 rounding), against 3.7 for a random pairing.
    recovered = (feats.view(-1, 8, 8) + 1) * 8
    real = th.from_numpy(images).float()
    assert (recovered - real).abs().mean() < 1.0 < 3.0 < (recovered - real.roll(1, 0)).abs().mean()
    fit = table.gaussian_fit(feats[~is_val])
    assert abs(table.frechet_distance(fit, fit)) < 1e-6
    shifted = table.gaussian_fit(feats[~is_val] + 0.1)
    assert abs(table.frechet_distance(fit, shifted) - 64 * 0.01) < 1e-6  # ||mean shift||^2

    class Oracle(th.nn.Module):  # "judges" by a label lookup on the first pixel's index
        def forward(self, x):
            return th.nn.functional.one_hot(self.labels, 10).float()

    oracle = Oracle()
    oracle.labels = th.arange(100) % 10
    assert table.judge_metrics(oracle, feats[:100], th.arange(100) % 10) == pytest.approx((1, 1))
    oracle.labels = th.zeros(100, dtype=th.long)
    acc, cov = table.judge_metrics(oracle, feats[:100], th.arange(100) % 10)
    assert acc == pytest.approx(0.1) and cov == pytest.approx(0.1)


def test_dpmpp_2m_sde_first_step_is_the_ddpm_posterior_step():
    """SDE-DPM-Solver++ of first order = ancestral sampling with the posterior variance beta~."""
    diffusion = create_gaussian_diffusion(steps=1000, sigma_small=True, timestep_respacing="50")
    base = create_gaussian_diffusion(steps=1000)
    model = GaussianModel(base.alphas_cumprod)
    x, i = noise((64, 2, 1, 1)), 30
    th.manual_seed(5)
    ddpm = diffusion.p_sample(model, x, th.full((64,), i), clip_denoised=False)["sample"]
    th.manual_seed(5)
    den = Denoiser(diffusion, model, clip_denoised=False)
    mine = solve("dpm++2m-sde", den, x, [i, i - 1])
    assert th.allclose(mine, ddpm, atol=1e-6)
    th.manual_seed(6)
    assert not th.allclose(solve("dpm++2m-sde", den, x, [i, i - 1]), ddpm, atol=1e-3)


def test_dpmpp_2m_sde_draws_its_step_noise_from_noise_fn():
    diffusion = create_gaussian_diffusion(steps=1000)
    model = GaussianModel(diffusion.alphas_cumprod)
    shape = (4, 2, 1, 1)
    calls = []

    def zeros_like(x):
        calls.append(x.shape)
        return th.zeros_like(x)

    kwargs = dict(noise=noise(shape), clip_denoised=False, sampler="dpm++2m-sde", steps=6)
    x = sample(diffusion, model, shape, noise_fn=zeros_like, **kwargs)
    assert len(calls) == 5 and calls[0] == shape  # one draw per step, none into sigma = 0
    assert th.equal(x, sample(diffusion, model, shape, noise_fn=zeros_like, **kwargs))
    assert not th.allclose(x, sample(diffusion, model, shape, **kwargs), atol=1e-3)
