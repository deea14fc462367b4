"""GaussianDiffusion: golden numbers from the original, and closed-form facts of the DDPM process.

Many tests use data x_0 ~ N(0, s^2 I), for which the optimal noise predictor is known exactly:
x_t ~ N(0, abar s^2 + 1 - abar) and E[eps | x_t] = sqrt(1 - abar) x_t / (abar s^2 + 1 - abar).
Samplers driven by it must reproduce the data distribution, without any training.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch as th

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import script_util
from guided_diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.unet import EncoderUNetModel

from conftest import crc32_init_, load_golden


def make_diffusion(
    steps=1000,
    schedule="linear",
    respacing=None,
    mean_type=gd.ModelMeanType.EPSILON,
    var_type=gd.ModelVarType.FIXED_LARGE,
    loss_type=gd.LossType.MSE,
    rescale_timesteps=False,
):
    betas = gd.get_named_beta_schedule(schedule, steps)
    kwargs = dict(
        betas=betas,
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )
    if respacing is None:
        return gd.GaussianDiffusion(**kwargs)
    return SpacedDiffusion(use_timesteps=space_timesteps(steps, respacing), **kwargs)


class GaussianDataEps(th.nn.Module):
    """The exact eps-predictor for data N(0, s^2 I) under the base schedule `alphas_cumprod`.

    It is called with the base process's timesteps (SpacedDiffusion maps them back).
    """

    def __init__(self, alphas_cumprod: np.ndarray, s: float):
        super().__init__()
        self.acp = th.from_numpy(alphas_cumprod)
        self.s = s
        self.dummy = th.nn.Parameter(th.zeros(()))  # gives the samplers a device to use

    def forward(self, x, t, **kwargs):
        a = self.acp[t].view(-1, *([1] * (x.ndim - 1)))
        return (th.sqrt(1 - a) * x.double() / (a * self.s**2 + 1 - a)).float()


# ---------------------------------------------------------------------------------------------
# Schedules


def test_linear_schedule_spans_ho_et_al_range_at_any_length():
    betas = gd.get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    # Scaled by 1000/T so that fewer steps reach the same final noise level.
    short = gd.get_named_beta_schedule("linear", 250)
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_cosine_schedule_reproduces_alpha_bar():
    T = 100
    betas = gd.get_named_beta_schedule("cosine", T)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    acp = np.cumprod(1 - betas)
    want = np.array([f((i + 1) / T) / f(0) for i in range(T)])
    # Exact until the last step, where beta is clipped at max_beta = 0.999.
    np.testing.assert_allclose(acp[:-1], want[:-1], rtol=1e-10)
    assert betas[-1] == 0.999
    clipped = gd.betas_for_alpha_bar(T, f, max_beta=0.5)
    assert clipped.max() == 0.5


def test_unknown_schedule_is_named_in_error():
    with pytest.raises(ValueError, match="quadratic"):
        gd.get_named_beta_schedule("quadratic", 10)


def test_invalid_betas_are_rejected():
    with pytest.raises(ValueError, match="betas"):
        gd.GaussianDiffusion(
            betas=np.array([0.1, 0.0]),
            model_mean_type=gd.ModelMeanType.EPSILON,
            model_var_type=gd.ModelVarType.FIXED_LARGE,
            loss_type=gd.LossType.MSE,
        )


# ---------------------------------------------------------------------------------------------
# Forward process and posterior


def test_q_sample_matches_closed_form_moments():
    diffusion = make_diffusion(steps=100)
    th.manual_seed(0)
    x0 = th.tensor([-0.8, 0.1, 0.9]).view(1, 3, 1, 1).expand(20000, 3, 8, 8)
    for step in (0, 30, 99):
        t = th.full((x0.shape[0],), step)
        xt = diffusion.q_sample(x0, t).double()
        acp = diffusion.alphas_cumprod[step]
        mean = xt.mean(dim=(0, 2, 3))
        var = xt.var(dim=(0, 2, 3))
        want_mean = math.sqrt(acp) * th.tensor([-0.8, 0.1, 0.9], dtype=th.float64)
        assert th.allclose(mean, want_mean, atol=4e-3)
        assert th.allclose(var, th.full((3,), 1 - acp, dtype=th.float64), rtol=2e-2, atol=1e-5)
        m, v, logv = diffusion.q_mean_variance(x0[:2], t[:2])
        assert th.allclose(m[:, :, 0, 0], want_mean.float().expand(2, 3))
        assert th.allclose(logv.exp(), v) and v[0, 0, 0, 0] == pytest.approx(1 - acp)


def test_posterior_matches_direct_bayes_computation():
    """Ho et al. eqs. 6-7 against Bayes' rule with q(x_{t-1}|x_0) and q(x_t|x_{t-1})."""
    diffusion = make_diffusion(steps=200, schedule="cosine")
    betas, acp = diffusion.betas, diffusion.alphas_cumprod
    t = np.arange(1, 200)
    # Prior x_{t-1} ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1});
    # likelihood x_t ~ N(sqrt(a_t) x_{t-1}, b_t)
    prior_var = 1 - acp[t - 1]
    precision = 1 / prior_var + (1 - betas[t]) / betas[t]
    var = 1 / precision
    coef_x0 = var * np.sqrt(acp[t - 1]) / prior_var
    coef_xt = var * np.sqrt(1 - betas[t]) / betas[t]
    np.testing.assert_allclose(diffusion.posterior_variance[t], var, rtol=1e-9)
    np.testing.assert_allclose(diffusion.posterior_mean_coef1[t], coef_x0, rtol=1e-9)
    np.testing.assert_allclose(diffusion.posterior_mean_coef2[t], coef_xt, rtol=1e-9)
    # At t = 0 the posterior is a point mass on x_0; its log variance is clipped to t = 1's.
    assert diffusion.posterior_mean_coef1[0] == pytest.approx(1.0)
    assert diffusion.posterior_mean_coef2[0] == 0.0 and diffusion.posterior_variance[0] == 0.0
    assert diffusion.posterior_log_variance_clipped[0] == math.log(diffusion.posterior_variance[1])
    # The tensor API uses these coefficients.
    x0, xt = th.randn(2, 3, 4, 4), th.randn(2, 3, 4, 4)
    tt = th.tensor([5, 150])
    mean, v, logv = diffusion.q_posterior_mean_variance(x0, xt, tt)
    want = (
        th.tensor(coef_x0[tt - 1]).float().view(2, 1, 1, 1) * x0
        + th.tensor(coef_xt[tt - 1]).float().view(2, 1, 1, 1) * xt
    )
    assert th.allclose(mean, want, atol=1e-6)
    assert th.allclose(v[:, 0, 0, 0], th.tensor(var[tt - 1]).float())


# ---------------------------------------------------------------------------------------------
# Reverse process parameterizations


@pytest.mark.parametrize("mean_type", list(gd.ModelMeanType))
def test_p_mean_variance_recovers_x0_from_each_parameterization(mean_type):
    diffusion = make_diffusion(steps=50, mean_type=mean_type, var_type=gd.ModelVarType.FIXED_SMALL)
    th.manual_seed(1)
    x0 = th.rand(3, 2, 4, 4) * 1.6 - 0.8
    eps = th.randn_like(x0)
    t = th.tensor([0, 7, 49])
    xt = diffusion.q_sample(x0, t, noise=eps)
    post_mean, _, _ = diffusion.q_posterior_mean_variance(x0, xt, t)
    perfect = {
        gd.ModelMeanType.EPSILON: eps,
        gd.ModelMeanType.START_X: x0,
        gd.ModelMeanType.PREVIOUS_X: post_mean,
    }[mean_type]
    out = diffusion.p_mean_variance(lambda x, tt: perfect, xt, t, clip_denoised=False)
    # PREVIOUS_X cannot recover x_0 at t = 0 better than float32 allows: coef1 ~ 1, coef2 = 0.
    assert th.allclose(out["pred_xstart"], x0, atol=2e-4)
    assert th.allclose(out["mean"], post_mean, atol=2e-5)
    assert th.allclose(out["variance"][:, 0, 0, 0],
                       th.tensor(diffusion.posterior_variance[t]).float())


def test_variance_choices():
    T = 100
    t = th.tensor([0, 5, 99])
    x = th.randn(3, 2, 4, 4)
    betas = gd.get_named_beta_schedule("linear", T)

    def var_at(var_type, model_out_var=None):
        diffusion = make_diffusion(steps=T, var_type=var_type)
        if model_out_var is None:
            model = lambda xx, tt: th.zeros_like(xx)  # noqa: E731
        else:
            def model(xx, tt):
                return th.cat([th.zeros_like(xx), th.full_like(xx, model_out_var)], 1)
        out = diffusion.p_mean_variance(model, x, t)
        # (At t = 0 FIXED_SMALL's variance is 0 and its log is clipped, so skip t = 0.)
        assert th.allclose(out["log_variance"][1:].exp(), out["variance"][1:], rtol=1e-5)
        return (diffusion, out["variance"][:, 0, 0, 0].double(),
                out["log_variance"][:, 0, 0, 0].double())

    diffusion, small, _ = var_at(gd.ModelVarType.FIXED_SMALL)
    assert th.allclose(small, th.tensor(diffusion.posterior_variance[t]), rtol=1e-6)
    # FIXED_LARGE is beta_t, except beta~_1 at t = 0 (beta_0 would make a poor decoder).
    _, large, _ = var_at(gd.ModelVarType.FIXED_LARGE)
    want = th.tensor([diffusion.posterior_variance[1], betas[5], betas[99]])
    assert th.allclose(large, want, rtol=1e-6)
    # LEARNED_RANGE: v = -1 is the clipped posterior variance, v = 1 is beta_t, v = 0 halfway
    # in log.
    _, _, lo = var_at(gd.ModelVarType.LEARNED_RANGE, -1.0)
    _, _, hi = var_at(gd.ModelVarType.LEARNED_RANGE, 1.0)
    _, _, mid = var_at(gd.ModelVarType.LEARNED_RANGE, 0.0)
    assert th.allclose(lo, th.tensor(diffusion.posterior_log_variance_clipped[t]), rtol=1e-6)
    assert th.allclose(hi, th.tensor(np.log(betas[t])), rtol=1e-6)
    assert th.allclose(mid, (lo + hi) / 2, rtol=1e-6)
    _, learned, _ = var_at(gd.ModelVarType.LEARNED, -3.0)
    assert th.allclose(learned, th.full((3,), math.exp(-3.0), dtype=th.float64), rtol=1e-6)
    # A learned-variance diffusion refuses a model without the extra channels.
    with pytest.raises(ValueError, match="channels"):
        make_diffusion(steps=T, var_type=gd.ModelVarType.LEARNED_RANGE).p_mean_variance(
            lambda xx, tt: xx, x, t
        )


def test_clipping_and_denoised_fn_act_on_x0_prediction():
    diffusion = make_diffusion(steps=10, schedule="cosine", mean_type=gd.ModelMeanType.START_X)
    x, t = th.randn(2, 1, 3, 3), th.tensor([3, 4])
    big = lambda xx, tt: th.full_like(xx, 3.0)  # noqa: E731
    assert diffusion.p_mean_variance(big, x, t)["pred_xstart"].max() == 1.0
    out = diffusion.p_mean_variance(big, x, t, clip_denoised=False, denoised_fn=lambda z: z * 0.1)
    assert th.allclose(out["pred_xstart"], th.full_like(x, 0.3))


def test_rescale_timesteps_feeds_the_model_a_1000_step_clock():
    seen = []
    diffusion = make_diffusion(steps=50, rescale_timesteps=True)
    model = lambda x, t: seen.append(t) or th.zeros_like(x)  # noqa: E731
    diffusion.p_mean_variance(model, th.zeros(2, 1, 2, 2), th.tensor([0, 49]))
    assert seen[0].dtype == th.float32 and seen[0].tolist() == [0.0, 980.0]


# ---------------------------------------------------------------------------------------------
# Guidance


def test_condition_mean_and_score_with_constant_gradient():
    diffusion = make_diffusion(steps=100)
    th.manual_seed(2)
    x, t = th.randn(2, 3, 4, 4), th.tensor([10, 80])
    eps = th.randn_like(x)
    out = diffusion.p_mean_variance(lambda xx, tt: eps, x, t, clip_denoised=False)
    g = th.randn_like(x)
    cond_fn = lambda xx, tt: g  # noqa: E731
    # Mean guidance: mu + Sigma g.
    new_mean = diffusion.condition_mean(cond_fn, out, x, t)
    assert th.allclose(new_mean, out["mean"] + out["variance"] * g)
    # Score guidance: eps - sqrt(1 - abar) g moves x_0 by (1 - abar) / sqrt(abar) g.
    acp = th.tensor(diffusion.alphas_cumprod[t]).float().view(2, 1, 1, 1)
    guided = diffusion.condition_score(cond_fn, out, x, t)
    assert th.allclose(guided["pred_xstart"], out["pred_xstart"] + (1 - acp) / acp.sqrt() * g,
                       atol=1e-5)
    want_mean, _, _ = diffusion.q_posterior_mean_variance(guided["pred_xstart"], x, t)
    assert th.allclose(guided["mean"], want_mean)
    assert guided["variance"] is out["variance"] and out["pred_xstart"] is not guided["pred_xstart"]


# ---------------------------------------------------------------------------------------------
# Bound and losses


def test_vb_terms_vanish_for_the_true_posterior():
    """A START_X model that knows x_0, with the posterior variance, has KL = 0 for t > 0."""
    diffusion = make_diffusion(steps=30, mean_type=gd.ModelMeanType.START_X,
                               var_type=gd.ModelVarType.FIXED_SMALL)
    th.manual_seed(3)
    x0 = (th.randint(0, 256, (3, 3, 4, 4)) / 127.5 - 1).float()
    t = th.tensor([0, 1, 29])
    xt = diffusion.q_sample(x0, t)
    out = diffusion._vb_terms_bpd(lambda x, tt: x0, x0, xt, t, clip_denoised=False)["output"]
    assert out[1:].abs().max() < 1e-4
    # At t = 0 the term is the decoder NLL: -log2 of the bin probabilities, averaged over pixels.
    p = diffusion.p_mean_variance(lambda x, tt: x0, xt, t, clip_denoised=False)
    ll = discretized_gaussian_log_likelihood(x0, means=p["mean"],
                                             log_scales=0.5 * p["log_variance"])
    assert out[0] == pytest.approx(-ll[0].mean().item() / math.log(2), rel=1e-5)
    assert out[0] > 0
    # A worse x_0 guess costs more bits (at t = 29 x_0 hardly matters: coef1 ~ 0).
    worse = diffusion._vb_terms_bpd(lambda x, tt: -x0, x0, xt, t, clip_denoised=False)["output"]
    assert (worse[:2] > out[:2] + 1).all()


def test_prior_bpd_is_kl_to_standard_normal():
    diffusion = make_diffusion(steps=40)
    x0 = th.rand(2, 3, 4, 4) * 2 - 1
    acp = diffusion.alphas_cumprod[-1]
    kl = normal_kl(math.sqrt(acp) * x0, th.tensor(math.log(1 - acp)), 0.0, 0.0)
    want = kl.mean(dim=(1, 2, 3)) / math.log(2)
    assert th.allclose(diffusion._prior_bpd(x0), want, rtol=1e-5)


def test_training_losses_by_objective():
    th.manual_seed(4)
    T = 100
    x0 = th.rand(4, 3, 4, 4) * 2 - 1
    noise = th.randn_like(x0)
    t = th.tensor([0, 10, 50, 99])
    # Model with trainable mean and variance channels, to follow gradients.
    mean_part = th.nn.Parameter(noise.clone())
    var_part = th.nn.Parameter(th.zeros_like(x0))
    model = lambda x, tt: th.cat([mean_part, var_part], dim=1)  # noqa: E731

    mse_diff = make_diffusion(steps=T, var_type=gd.ModelVarType.LEARNED_RANGE)
    terms = mse_diff.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    assert terms["mse"].abs().max() == 0  # the model predicts the noise exactly
    assert th.allclose(terms["loss"], terms["mse"] + terms["vb"])
    # Hybrid loss: the vb term trains only the variance (mean output frozen).
    terms["vb"].sum().backward()
    assert mean_part.grad is None or mean_part.grad.abs().max() == 0
    assert var_part.grad.abs().max() > 0

    # RESCALED_MSE scales vb by T/1000.
    resc = make_diffusion(steps=T, var_type=gd.ModelVarType.LEARNED_RANGE,
                          loss_type=gd.LossType.RESCALED_MSE)
    vb_resc = resc.training_losses(model, x0, t, noise=noise)["vb"]
    assert th.allclose(vb_resc, terms["vb"] * T / 1000.0)

    # KL objectives: the vb term alone, times T for RESCALED_KL.
    kl = make_diffusion(steps=T, var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.KL)
    kl_terms = kl.training_losses(model, x0, t, noise=noise)
    assert set(kl_terms) == {"loss"} and th.allclose(kl_terms["loss"], terms["vb"])
    rkl = make_diffusion(steps=T, var_type=gd.ModelVarType.LEARNED_RANGE,
                         loss_type=gd.LossType.RESCALED_KL)
    assert th.allclose(rkl.training_losses(model, x0, t, noise=noise)["loss"], terms["vb"] * T)
    assert gd.LossType.KL.is_vb() and gd.LossType.RESCALED_KL.is_vb()
    assert not gd.LossType.MSE.is_vb()

    # Targets of the other parameterizations.
    xt = mse_diff.q_sample(x0, t, noise=noise)
    for mean_type, target in (
        (gd.ModelMeanType.START_X, x0),
        (gd.ModelMeanType.PREVIOUS_X, mse_diff.q_posterior_mean_variance(x0, xt, t)[0]),
    ):
        d = make_diffusion(steps=T, mean_type=mean_type)
        got = d.training_losses(lambda x, tt: th.zeros_like(x), x0, t, noise=noise)
        assert th.allclose(got["mse"], (target**2).mean(dim=(1, 2, 3)), rtol=1e-5)


def test_calc_bpd_loop_sums_terms_and_prior():
    diffusion = make_diffusion(steps=6, schedule="cosine", var_type=gd.ModelVarType.FIXED_SMALL)
    model = GaussianDataEps(diffusion.alphas_cumprod, s=0.5)
    x0 = (th.randint(0, 256, (2, 3, 4, 4)) / 127.5 - 1).float()
    out = diffusion.calc_bpd_loop(model, x0, clip_denoised=True)
    assert out["vb"].shape == out["mse"].shape == out["xstart_mse"].shape == (2, 6)
    assert th.allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    assert th.allclose(out["prior_bpd"], diffusion._prior_bpd(x0))
    assert (out["vb"] >= -1e-5).all() and th.isfinite(out["total_bpd"]).all()


# ---------------------------------------------------------------------------------------------
# Samplers


def _gaussian_step_gain(a, a_prev, s, sampler, eta=0.0):
    """For data N(0, s^2) and the exact eps model, one sampler step x_t -> x_{t-1} is
    x_{t-1} = m x_t + sd z.  Returns (m, sd) computed here in float64 from the formulas of
    Ho et al. (eqs. 6-7, with sigma^2 = beta~) and Song et al. (eq. 12), independent of the code.
    """
    v = a * s**2 + 1 - a  # Var(x_t)
    x0_gain = math.sqrt(a) * s**2 / v  # E[x_0 | x_t] = x0_gain * x_t
    eps_gain = math.sqrt(1 - a) / v  # E[eps | x_t] = eps_gain * x_t
    if sampler == "ddpm":
        beta = 1 - a / a_prev
        coef1 = beta * math.sqrt(a_prev) / (1 - a)
        coef2 = (1 - a_prev) * math.sqrt(1 - beta) / (1 - a)
        return coef1 * x0_gain + coef2, math.sqrt(beta * (1 - a_prev) / (1 - a))
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)) if eta else 0.0
    return math.sqrt(a_prev) * x0_gain + math.sqrt(1 - a_prev - sigma**2) * eps_gain, sigma


def test_ddim_round_trip_through_reverse_sample():
    """Deterministic DDIM encodes x_0 to noise and decodes it back (Song et al. 2021, sec 4.3)."""
    s = 0.5
    base = make_diffusion(steps=1000)
    model = GaussianDataEps(base.alphas_cumprod, s=s)
    th.manual_seed(5)
    x = s * th.randn(4, 3, 8, 8)
    for respacing, tol in (("ddim50", 0.12), ("1000", 0.007)):
        diffusion = make_diffusion(steps=1000, respacing=respacing)
        acp = base.alphas_cumprod[diffusion.timestep_map]
        encoded = x
        for i in range(diffusion.num_timesteps - 1):
            t = th.full((x.shape[0],), i)
            encoded = diffusion.ddim_reverse_sample(model, encoded, t,
                                                    clip_denoised=False)["sample"]
        # For Gaussian data each step is linear: the code is x times a known gain (exactly
        # sqrt(Var(x_T) / Var(x_0)) in the ODE limit, a little less per discrete step).  The
        # reverse step is DDIM's step run from level acp[k] "down" to acp[k + 1].
        enc_gain = np.prod([_gaussian_step_gain(acp[k], acp[k + 1], s, "ddim")[0]
                            for k in range(len(acp) - 1)])
        assert th.allclose(encoded, x * enc_gain, rtol=1e-4, atol=1e-5)
        # Decode with the public loop; its second-to-last sample is x at step 0 (before the jump
        # to x_0).  Many steps make the round trip nearly exact.
        outs = list(diffusion.ddim_sample_loop_progressive(model, x.shape, noise=encoded,
                                                           clip_denoised=False))
        decoded = outs[-2]["sample"]
        rel = ((decoded - x).norm() / x.norm()).item()
        assert rel < tol, (respacing, rel)
    with pytest.raises(ValueError, match="eta"):
        diffusion.ddim_reverse_sample(model, x, th.zeros(4, dtype=th.long), eta=0.5)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_samplers_reproduce_gaussian_data(sampler, eta):
    """Sampling data N(0, s^2) with the exact eps model: the spread of the samples is the one the
    step formulas predict, and close to s."""
    s = 0.5
    base = make_diffusion(steps=1000)
    diffusion = make_diffusion(steps=1000, respacing="50", var_type=gd.ModelVarType.FIXED_SMALL)
    model = GaussianDataEps(base.alphas_cumprod, s=s)
    th.manual_seed(6)
    shape = (256, 1, 8, 8)
    if sampler == "ddpm":
        out = diffusion.p_sample_loop(model, shape, clip_denoised=False, progress=True)
    else:
        out = diffusion.ddim_sample_loop(model, shape, clip_denoised=False, eta=eta)
    assert out.shape == shape

    acp = base.alphas_cumprod[diffusion.timestep_map]
    var = 1.0  # x_T ~ N(0, I)
    for k in range(len(acp) - 1, 0, -1):
        m, sd = _gaussian_step_gain(acp[k], acp[k - 1], s, sampler, eta)
        var = m**2 * var + sd**2
    var *= (math.sqrt(acp[0]) * s**2 / (acp[0] * s**2 + 1 - acp[0])) ** 2  # last step: E[x_0|x_0']
    # 16384 samples: the std of the sample std is ~0.003.
    assert abs(out.mean().item()) < 0.015
    assert abs(out.std().item() - math.sqrt(var)) < 0.012, (out.std(), math.sqrt(var))
    assert abs(math.sqrt(var) - s) < 0.06  # 50 steps already come close to the data


def test_progressive_loop_yields_every_step_and_ends_at_the_loop_result():
    diffusion = make_diffusion(steps=1000, respacing="5")
    model = GaussianDataEps(make_diffusion(steps=1000).alphas_cumprod, s=0.5)
    noise = th.randn(2, 1, 4, 4)
    th.manual_seed(7)
    steps = list(diffusion.p_sample_loop_progressive(model, noise.shape, noise=noise,
                                                     progress=True))
    th.manual_seed(7)
    final = diffusion.p_sample_loop(model, noise.shape, noise=noise)
    assert len(steps) == 5 and set(steps[0]) == {"sample", "pred_xstart"}
    assert th.equal(steps[-1]["sample"], final)
    # The last step (t = 0) adds no noise: it returns the posterior mean.
    last_in = steps[-2]["sample"]
    mean = diffusion.p_mean_variance(model, last_in, th.zeros(2, dtype=th.long))["mean"]
    assert th.allclose(final, mean)
    with pytest.raises(TypeError, match="shape"):
        next(diffusion.p_sample_loop_progressive(model, 3))


def test_guided_samplers_call_cond_fn_with_original_timesteps():
    diffusion = make_diffusion(steps=100, respacing="4")
    model = GaussianDataEps(make_diffusion(steps=100).alphas_cumprod, s=0.5)
    seen = []

    def cond_fn(x, t, y=None):
        seen.append(t.tolist())
        assert y is not None
        return th.zeros_like(x)

    kw = dict(model_kwargs={"y": th.tensor([1, 2])}, cond_fn=cond_fn)
    wrapped = lambda x, t, y=None: model(x, t)  # noqa: E731
    wrapped.parameters = model.parameters
    noise = th.randn(2, 1, 4, 4)
    a = diffusion.ddim_sample_loop(wrapped, noise.shape, noise=noise, **kw)
    b = diffusion.ddim_sample_loop(wrapped, noise.shape, noise=noise,
                                   model_kwargs=kw["model_kwargs"])
    assert th.allclose(a, b)  # zero gradient changes nothing
    assert seen == [[99, 99], [66, 66], [33, 33], [0, 0]]
    seen.clear()
    diffusion.p_sample_loop(wrapped, noise.shape, noise=noise, **kw)
    assert seen == [[99, 99], [66, 66], [33, 33], [0, 0]]


# ---------------------------------------------------------------------------------------------
# Golden fixtures from the original code


@pytest.fixture(scope="module")
def golden_models():
    unet_case = load_golden("unet_adm32.pt")
    unet = crc32_init_(script_util.create_model(**unet_case["flags"]))
    clf_case = load_golden("classifier_attention32.pt")
    classifier = crc32_init_(EncoderUNetModel(**clf_case["flags"]))
    return unet, classifier


def _close(got, want, rtol=1e-4, atol=1e-5):
    got, want = th.as_tensor(got).double(), th.as_tensor(want).double()
    assert got.shape == want.shape
    err = (got - want).abs()
    assert (err <= atol + rtol * want.abs()).all(), f"max abs err {err.max():.3g}"


@pytest.mark.parametrize("name", ["diffusion_cosine_learned.pt",
                                  "diffusion_linear_learned_ddim10.pt"])
def test_matches_original_golden(name, golden_models):
    model, classifier = golden_models
    d = load_golden(name)
    diffusion = script_util.create_gaussian_diffusion(**d["diffusion_flags"])
    for k, v in d["arrays"].items():
        _close(getattr(diffusion, k), v, rtol=1e-9, atol=1e-12)
    assert diffusion.timestep_map == d["timestep_map"].tolist()
    x0, noise, t, kw = d["x_start"], d["noise"], d["t"], d["model_kwargs"]
    with th.no_grad():
        _close(diffusion.q_sample(x0, t, noise=noise), d["q_sample"])
        losses = diffusion.training_losses(model, x0, t, model_kwargs=kw, noise=noise)
        for k, v in d["training_losses"].items():
            _close(losses[k], v)
        x_t = d["q_sample"]
        pmv = diffusion.p_mean_variance(model, x_t, t, clip_denoised=True, model_kwargs=kw)
        for k, v in d["p_mean_variance"].items():
            _close(pmv[k], v)
        rev = diffusion.ddim_reverse_sample(model, x_t, t, clip_denoised=False, model_kwargs=kw)
        _close(rev["sample"], d["ddim_reverse_sample"])
        vb = diffusion._vb_terms_bpd(model, x0, x_t, t, clip_denoised=True, model_kwargs=kw)
        _close(vb["output"], d["vb_terms_bpd"])
        _close(diffusion._prior_bpd(x0), d["prior_bpd"])

    cond_fn = None
    if "condition_mean" in d:
        scale = d["classifier_scale"]

        def cond_fn(x, tt, y=None):
            # Classifier guidance: scale * grad_x log p(y | x_t).
            with th.enable_grad():
                x_in = x.detach().requires_grad_(True)
                log_probs = th.log_softmax(classifier(x_in, tt), dim=-1)
                selected = log_probs[range(len(log_probs)), y.view(-1)]
                return th.autograd.grad(selected.sum(), x_in)[0] * scale

        _close(diffusion.condition_mean(cond_fn, pmv, x_t, t, model_kwargs=kw), d["condition_mean"])
        cs = diffusion.condition_score(cond_fn, pmv, x_t, t, model_kwargs=kw)
        for k, v in d["condition_score"].items():
            _close(cs[k], v)
    if "ddim_sample_loop" in d:
        out = diffusion.ddim_sample_loop(
            model, tuple(d["ddim_noise"].shape), noise=d["ddim_noise"], clip_denoised=True,
            cond_fn=cond_fn, model_kwargs=kw, device="cpu", eta=0.0,
        )
        _close(out, d["ddim_sample_loop"], rtol=1e-3, atol=1e-4)


def test_sampling_steps_draw_their_noise_from_noise_fn():
    """DDPM and DDIM(eta>0) steps take their noise from noise_fn: seeded sampling relies on it."""
    from guided_diffusion.script_util import create_gaussian_diffusion

    diffusion = create_gaussian_diffusion(steps=100, noise_schedule="cosine",
                                          timestep_respacing="5")
    model = lambda x, t, **kw: 0.1 * x  # noqa: E731
    x_T = th.randn(2, 3, 4, 4, generator=th.Generator().manual_seed(0))
    calls = []

    def zeros(x):
        calls.append(tuple(x.shape))
        return th.zeros_like(x)

    for loop, kw in ((diffusion.p_sample_loop, {}), (diffusion.ddim_sample_loop, {"eta": 1.0})):
        calls.clear()
        with_fn = loop(model, x_T.shape, noise=x_T.clone(), noise_fn=zeros, **kw)
        assert calls == [tuple(x_T.shape)] * 5
        # Zero step noise equals the noise-free mean path; torch's noise does not.
        th.manual_seed(1)
        with_randn = loop(model, x_T.shape, noise=x_T.clone(), **kw)
        assert not th.allclose(with_fn, with_randn)
        assert th.equal(with_fn, loop(model, x_T.shape, noise=x_T.clone(), noise_fn=zeros, **kw))


# ---------------------------------------------------------------------------------------------
# The original's sampling steps, frozen: the loops must reproduce them bit for bit.


class _TinyModel(th.nn.Module):
    """A cheap network with a timestep dependence; 2C outputs when the variance is learned."""

    def __init__(self, learned: bool):
        super().__init__()
        g = th.Generator().manual_seed(3)
        out = 6 if learned else 3
        self.weight = th.nn.Parameter(0.3 * th.randn(out, 3, 1, 1, generator=g))

    def forward(self, x, t, y=None):
        h = th.nn.functional.conv2d(x, self.weight)
        scale = 1.0 + t.float().view(-1, 1, 1, 1) / 1000.0
        return th.tanh(h * scale + (0 if y is None else 0.1 * y.float().view(-1, 1, 1, 1)))


def _frozen_p_sample(diffusion, model, x, t, cond_fn, kw, noise):
    """Ho et al. Algorithm 2 with the mean shifted by cond_fn, exactly as the original writes it."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=True, model_kwargs=kw)
    if cond_fn is not None:
        out["mean"] = diffusion.condition_mean(cond_fn, out, x, t, model_kwargs=kw)
    mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
    return out["mean"] + mask * th.exp(0.5 * out["log_variance"]) * noise, out["pred_xstart"]


def _frozen_ddim_sample(diffusion, model, x, t, cond_fn, kw, eta, noise):
    """DDIM (Song et al. eq. 12, 16) with score guidance, exactly as the original writes it."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=True, model_kwargs=kw)
    if cond_fn is not None:
        out = diffusion.condition_score(cond_fn, out, x, t, model_kwargs=kw)
    eps = diffusion._predict_eps_from_xstart(x, t, out["pred_xstart"])
    per = (x.shape[0],) + (1,) * (x.ndim - 1)
    alpha_bar = gd._extract_into_tensor(diffusion.alphas_cumprod, t, per)
    alpha_bar_prev = gd._extract_into_tensor(diffusion.alphas_cumprod_prev, t, per)
    sigma = (eta * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
             * th.sqrt(1 - alpha_bar / alpha_bar_prev))
    mean_pred = (out["pred_xstart"] * th.sqrt(alpha_bar_prev)
                 + th.sqrt(1 - alpha_bar_prev - sigma**2) * eps)
    mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
    return mean_pred + mask * sigma * noise, out["pred_xstart"]


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("guided", [False, True])
def test_loops_and_steps_are_bit_identical_to_the_original_formulas(learned, guided):
    """
    p_sample_loop(_progressive), ddim_sample_loop(_progressive) with eta 0 and 0.7, and the
    single steps (per-example t) equal the original's step formulas exactly, with and without
    classifier guidance, on fixed and learned variances.
    """
    from guided_diffusion.script_util import create_gaussian_diffusion

    diffusion = create_gaussian_diffusion(steps=100, learn_sigma=learned, timestep_respacing="6")
    model = _TinyModel(learned)
    kw = {"y": th.tensor([1, 2])}
    cond_fn = (lambda x, t, y=None: 0.2 * th.sin(x) + 0.001 * t.float().view(-1, 1, 1, 1)
               ) if guided else None
    x_T = th.randn(2, 3, 4, 4, generator=th.Generator().manual_seed(0))
    step_noise = [th.randn_like(x_T) for _ in range(6)]

    def noise_fn_from(draws):
        it = iter(draws)
        return lambda x: next(it)

    for name in ("ddpm", "ddim0", "ddim0.7"):
        eta = 0.0 if name == "ddpm" else float(name[4:])
        x, expected = x_T, []
        for k, i in enumerate(range(5, -1, -1)):
            t = th.tensor([i, i])
            if name == "ddpm":
                x, x0 = _frozen_p_sample(diffusion, model, x, t, cond_fn, kw, step_noise[k])
            else:
                x, x0 = _frozen_ddim_sample(diffusion, model, x, t, cond_fn, kw, eta,
                                            step_noise[k])
            expected.append((x, x0))
        loop_kw = dict(noise=x_T.clone(), cond_fn=cond_fn, model_kwargs=kw,
                       noise_fn=noise_fn_from(step_noise))
        if name == "ddpm":
            got = list(diffusion.p_sample_loop_progressive(model, x_T.shape, **loop_kw))
            loop_kw["noise_fn"] = noise_fn_from(step_noise)
            final = diffusion.p_sample_loop(model, x_T.shape, **loop_kw)
        else:
            got = list(diffusion.ddim_sample_loop_progressive(model, x_T.shape, eta=eta, **loop_kw))
            loop_kw["noise_fn"] = noise_fn_from(step_noise)
            final = diffusion.ddim_sample_loop(model, x_T.shape, eta=eta, **loop_kw)
        assert len(got) == 6 and all(set(o) == {"sample", "pred_xstart"} for o in got)
        for o, (x, x0) in zip(got, expected):
            assert th.equal(o["sample"], x) and th.equal(o["pred_xstart"], x0), name
        assert th.equal(final, expected[-1][0]), name

    # Single steps at per-example timesteps (0 and 4 in one batch: one gets no noise).
    t = th.tensor([0, 4])
    x = x_T
    ref, ref_x0 = _frozen_p_sample(diffusion, model, x, t, cond_fn, kw, step_noise[0])
    out = diffusion.p_sample(model, x, t, cond_fn=cond_fn, model_kwargs=kw,
                             noise_fn=lambda z: step_noise[0])
    assert th.equal(out["sample"], ref) and th.equal(out["pred_xstart"], ref_x0)
    ref, ref_x0 = _frozen_ddim_sample(diffusion, model, x, t, cond_fn, kw, 0.5, step_noise[1])
    out = diffusion.ddim_sample(model, x, t, cond_fn=cond_fn, model_kwargs=kw, eta=0.5,
                                noise_fn=lambda z: step_noise[1])
    assert th.equal(out["sample"], ref) and th.equal(out["pred_xstart"], ref_x0)
    # The reverse (encoding) step: DDIM eq. 12 with sigma = 0 towards the next, noisier step.
    t = th.tensor([2, 5])  # 5 is the last step: alphas_cumprod_next = 0 there
    out = diffusion.ddim_reverse_sample(model, x, t, clip_denoised=False, model_kwargs=kw)
    pmv = diffusion.p_mean_variance(model, x, t, clip_denoised=False, model_kwargs=kw)
    eps = diffusion._predict_eps_from_xstart(x, t, pmv["pred_xstart"])
    a_next = gd._extract_into_tensor(diffusion.alphas_cumprod_next, t, (2, 1, 1, 1))
    ref = pmv["pred_xstart"] * th.sqrt(a_next) + th.sqrt(1 - a_next) * eps
    assert th.equal(out["sample"], ref) and th.equal(out["pred_xstart"], pmv["pred_xstart"])


def test_predict_eps_and_xstart_invert_the_forward_process():
    diffusion = make_diffusion(steps=100)
    x0, eps = th.randn(3, 2, 4, 4), th.randn(3, 2, 4, 4)
    t = th.tensor([0, 50, 99])
    x_t = diffusion.q_sample(x0, t, noise=eps)
    assert th.allclose(diffusion.predict_xstart(x_t, t, eps), x0, atol=1e-4)
    # At t = 99 sqrt(abar) ~ 0.006: eps is well determined there, x_0 poorly, and vice versa.
    assert th.allclose(diffusion.predict_eps(x_t, t, x0)[1:], eps[1:], atol=1e-4)
    # The original's private names are the same methods (user code calls them).
    assert gd.GaussianDiffusion._predict_xstart_from_eps is gd.GaussianDiffusion.predict_xstart
    assert gd.GaussianDiffusion._predict_eps_from_xstart is gd.GaussianDiffusion.predict_eps


def test_progressive_loops_leave_the_callers_grad_mode_alone():
    diffusion = make_diffusion(steps=100, respacing="3")
    model = GaussianDataEps(make_diffusion(steps=100).alphas_cumprod, s=0.5)
    modes = [th.is_grad_enabled() for _ in diffusion.ddim_sample_loop_progressive(
        model, (1, 1, 2, 2), noise=th.randn(1, 1, 2, 2))]
    assert modes == [True] * 3


def test_layering_diffusion_math_does_not_import_network_or_script_modules():
    """gaussian_diffusion never imports nn (network blocks); samplers never the flag layer."""
    import ast
    import pathlib

    root = pathlib.Path(gd.__file__).parent

    def imported(module):
        tree = ast.parse((root / f"{module}.py").read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names.add(node.module or "")
                names.update(f"{node.module or ''}.{a.name}".lstrip(".") for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return {n.split(".")[-1] for n in names} | {n.split(".")[0] for n in names}

    assert not {"nn", "unet", "script_util"} & imported("gaussian_diffusion")
    assert not {"script_util", "run_util", "unet"} & imported("samplers")
