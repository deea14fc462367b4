"""Every sampler as one step function of one loop: DDPM, DDIM and fast ODE/SDE solvers.

`sample(diffusion, model, shape, sampler=..., steps=..., ...)` is the one entry point the sampling
scripts call; the original's `p_sample_loop` / `ddim_sample_loop` (and their `_progressive` and
single-step forms) are thin shims over the same loop. The samplers:

- `"ddpm"`: ancestral sampling (Ho et al. 2020, Algorithm 2) with the model's fixed or learned
  variance; classifier guidance shifts the mean (Dhariwal & Nichol 2021, Algorithm 1).
- `"ddim"`: DDIM (Song et al. 2021, eqs. 12 and 16) with `--eta`; guidance shifts the score.
- `"plms"`, `"dpm++2m"`, `"dpm++3m"`, `"heun"`: solvers of the probability-flow ODE of the model's
  own VP schedule (alpha_t^2 = alphas_cumprod[t], sigma_t^2 = 1 - alphas_cumprod[t]), and
  `"dpm++2m-sde"`, the second-order multistep solver of the reverse SDE (stochastic like DDPM,
  which corrects model errors that a deterministic ODE solver carries to the end).
- `""` means "DDIM if --use_ddim else DDPM", the original's rule.

Every sampler is one function `step(denoiser, x, t, t_next, history) -> x_next` run by the single
loop `solve_progressive` (one sampler signature, as in k-diffusion). The `Denoiser` adapter is the
only place that calls the model: `diffusion.p_mean_variance` (respaced timesteps, eps/x0/learned-
variance outputs, `clip_denoised`, `denoised_fn`) plus classifier guidance, turned into the pair
(eps, x0) at a grid point. Classifier-free guidance wraps the model itself (`guidance.cfg_model`).

Time steps, the same rule for every sampler. A loop walks the diffusion's whole grid, from its
noisiest point down to index 0 and then one last step to the noise-free end (CLEAN: alpha = 1,
sigma = 0; DDPM's last step returns the posterior mean there, DDIM's the predicted x_0), evaluating
the model once per grid point. `--steps N` first respaces the diffusion to N of its grid
timesteps, chosen by `select_timesteps` under `--sampler_spacing` ("auto", the default: each
sampler's measured best, `AUTO_SPACING`): "logsnr" puts them as
close as possible to uniform in log-SNR lambda_t = log(alpha_t / sigma_t) (the spacing DPM-Solver
recommends for pixel-space models, Lu et al. 2022), "uniform" evenly in t exactly as
`--timestep_respacing N` does, "karras" by EDM's rho-spacing in sigma / alpha below a cap
(`karras_sigmas`, `_snap_karras`). The respaced diffusion is built by `diffusion.respace`, the same
`SpacedDiffusion` construction as the factory's. So `--steps N` costs N network evaluations (NFE)
for every sampler except Heun, whose corrector makes it 2N - 2. `--steps 0` keeps the diffusion's
grid (the full schedule, or `--timestep_respacing`, which with `--use_ddim` behave exactly as the
original's).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch as th
import torch.nn as nn
from tqdm.auto import tqdm

from .config import (
    CM_SPACINGS,
    SAMPLER_NAMES,
    SPACINGS,
    ConsistencyConfig,
    SamplerOptions,
    defaults,
    space_timesteps,
)
from .guidance import cfg_model
from .losses import _extract_into_tensor, _nonzero_mask, _per_example

CLEAN = -1  # grid index of the noise-free end of the ODE: alphas_cumprod = 1, sigma = 0


def sampler_defaults() -> dict:
    """Defaults of the sampling flags (`config.SamplerOptions`), as a dict."""
    return defaults(SamplerOptions)


@dataclass
class Prediction:
    """
    The model's prediction at one grid point.

    :param t: the grid index (an int in the loop; an [N] tensor in the single-step shims).
    :param eps: the [N x C x ...] noise prediction, consistent with x0.
    :param x0: the [N x C x ...] prediction of x_0 (clipped, denoised_fn'd, score-guided).
    :param out: the dict of `p_mean_variance` ('mean', 'variance', 'log_variance', 'pred_xstart').
    :param x: the [N x C x ...] sample at t that the loop steps on from: the one the model saw,
        until a corrector (UniPC's) replaces it with its corrected value.
    """

    t: int | th.Tensor
    eps: th.Tensor
    x0: th.Tensor
    out: dict
    x: th.Tensor | None = None


class Denoiser:
    """
    Adapter between a diffusion + model and the step functions: (eps, x0) at a grid timestep.

    :param diffusion: a GaussianDiffusion / SpacedDiffusion; its `alphas_cumprod` define the grid
        (for a SpacedDiffusion, the respaced grid; it maps grid indices to the model's timesteps).
    :param model: the network (possibly wrapped for classifier-free guidance).
    :param clip_denoised: clip the predicted x_0 to [-1, 1] (eps is recomputed from it, as in
        DDIM).
    :param denoised_fn: optional function applied to the predicted x_0 before clipping.
    :param cond_fn: optional classifier-guidance gradient function `cond_fn(x, t, **model_kwargs)`;
        applied in score form (`diffusion.condition_score`),
        eps <- eps - sqrt(1 - alpha_bar) * grad, except for DDPM, whose step shifts the mean.
    :param model_kwargs: extra model inputs, e.g. {'y': labels}.
    :param noise_fn: `randn_like` for the step noise of stochastic samplers (default torch's), so
        that seeded sampling can give every sample its own generator.
    """

    def __init__(
        self,
        diffusion,
        model,
        *,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        noise_fn: Callable[[th.Tensor], th.Tensor] | None = None,
    ):
        self.diffusion = diffusion
        self.noise_fn = noise_fn or th.randn_like
        self.model = model
        self.clip_denoised = clip_denoised
        self.denoised_fn = denoised_fn
        self.cond_fn = cond_fn
        self.model_kwargs = model_kwargs or {}
        self.alphas_cumprod = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
        # alphas_cumprod indexed by any step target: [0, T) the grid, T the point past the
        # noisiest one (0, where the reverse DDIM step ends: the original's alphas_cumprod_next),
        # and CLEAN = -1 the noise-free end (1: the original's alphas_cumprod_prev at t = 0).
        self._alpha_bar_targets = np.append(self.alphas_cumprod, [0.0, 1.0])
        self.nfe = 0  # network evaluations so far (the cost the quality table reports)

    # Schedule of the VP ODE at a grid index (CLEAN = the noise-free end), in float64.
    def alpha_bar(self, t: int) -> float:
        return 1.0 if t == CLEAN else float(self.alphas_cumprod[t])

    def alpha(self, t: int) -> float:
        return math.sqrt(self.alpha_bar(t))

    def sigma(self, t: int) -> float:
        return math.sqrt(1.0 - self.alpha_bar(t))

    def lam(self, t: int) -> float:
        """Half log-SNR lambda_t = log(alpha_t / sigma_t), DPM-Solver's time (Lu et al. 2022)."""
        if t == CLEAN:
            return math.inf
        a = self.alpha_bar(t)
        return 0.5 * (math.log(a) - math.log1p(-a))

    def sigma_tilde(self, t: int) -> float:
        """EDM's noise level of the VP ODE in x / alpha space: sigma / alpha = exp(-lambda)."""
        return 0.0 if t == CLEAN else self.sigma(t) / self.alpha(t)

    def alpha_bar_like(self, t: int | th.Tensor, x: th.Tensor) -> th.Tensor:
        """
        alphas_cumprod at step target(s) t as float32 [N x 1 x ...], rounded as the original's
        DDPM/DDIM steps round it (float64 lookup, then float32).

        :param t: an int or [N] tensor of grid indices, CLEAN, or len(grid) (beyond the noisiest).
        """
        return _extract_into_tensor(self._alpha_bar_targets, _batch_t(t, x), _per_example(x))

    def __call__(self, x: th.Tensor, t: int | th.Tensor, guide_score: bool = True) -> Prediction:
        """
        :param x: the [N x C x ...] sample at grid timestep `t`.
        :param t: an integer index into the diffusion's grid (not CLEAN), or an [N] tensor of them.
        :param guide_score: apply cond_fn to the score; False leaves guidance to the step (DDPM).
        :return: Prediction with eps and x0, both shaped like x.
        """
        tt = _batch_t(t, x)
        out = self.diffusion.p_mean_variance(
            self.model,
            x,
            tt,
            clip_denoised=self.clip_denoised,
            denoised_fn=self.denoised_fn,
            model_kwargs=self.model_kwargs,
        )
        self.nfe += 1
        if self.cond_fn is not None and guide_score:
            # Classifier guidance as a shift of the score (Dhariwal & Nichol 2021, Algorithm 2);
            # cond_fn sees the model's timesteps.
            out = self.diffusion.condition_score(
                self.cond_fn, out, x, tt, model_kwargs=self.model_kwargs
            )
        x0 = out["pred_xstart"]
        # eps consistent with the (clipped, guided) x0, as the original DDIM step computes it.
        eps = self.diffusion.predict_eps(x, tt, x0)
        return Prediction(t, eps, x0, out, x)


def _batch_t(t: int | th.Tensor, x: th.Tensor) -> th.Tensor:
    """Grid index t as the [N] long tensor the diffusion's methods take."""
    if th.is_tensor(t):
        return t
    return th.full((x.shape[0],), int(t), device=x.device, dtype=th.long)


# A step maps x at grid point t to x at t_next, given the predictions so far (newest last; the
# newest is at t). Every sampler below is one such function, run by `solve_progressive`.
StepFn = Callable[[Denoiser, th.Tensor, int, int, list], th.Tensor]


def _step_ddpm(den: Denoiser, x: th.Tensor, t, t_next, hist: list) -> th.Tensor:
    """
    Ancestral sampling, x_{t-1} ~ p(x_{t-1} | x_t) (Ho et al. 2020, Algorithm 2, one step), with
    the model's fixed or learned variance. Classifier guidance shifts the mean by
    variance * grad (Dhariwal & Nichol 2021, Algorithm 1). The last step (t = 0) returns the mean.
    The posterior is the diffusion's own step: t_next must be t - 1.
    """
    if not th.is_tensor(t) and t_next != t - 1:
        raise ValueError(f"a DDPM step goes to the previous grid point, not from {t} to {t_next}")
    p = hist[-1]
    tt = _batch_t(t, x)
    noise = den.noise_fn(x)  # drawn before cond_fn runs, in the original's order
    mean = p.out["mean"]
    if den.cond_fn is not None:
        mean = den.diffusion.condition_mean(
            den.cond_fn, p.out, x, tt, model_kwargs=den.model_kwargs
        )
    return mean + _nonzero_mask(tt, x) * th.exp(0.5 * p.out["log_variance"]) * noise


def ddim_update(
    den: Denoiser,
    x: th.Tensor,
    t,
    t_next,
    pred: Prediction,
    eta: float = 0.0,
    noise: th.Tensor | None = None,
) -> th.Tensor:
    """
    The DDIM update (Song et al. 2021, eq. 12) from grid point t to t_next, in either direction:
      x_next = sqrt(abar_next) x0 + sqrt(1 - abar_next - s^2) eps + s z,
      s = eta sqrt((1 - abar_next) / (1 - abar)) sqrt(1 - abar / abar_next)   (eq. 16).
    With eta = 0 it is the exact DDIM ODE step (= DPM-Solver++(1)); eta = 1 is the DDPM posterior.
    Coefficients are float32 per example, as the original rounds them.

    :param t, t_next: ints or [N] tensors of step targets (CLEAN, or len(grid) for the reverse
        step from the noisiest point).
    :param noise: the [N x C x ...] step noise z; needed when eta != 0.
    """
    alpha_bar_next = den.alpha_bar_like(t_next, x)
    x_next = pred.x0 * th.sqrt(alpha_bar_next)
    if eta == 0.0:
        # s = 0 exactly: skipping it leaves every value as the original computes it.
        return x_next + th.sqrt(1 - alpha_bar_next) * pred.eps
    alpha_bar = den.alpha_bar_like(t, x)
    s = (
        eta
        * th.sqrt((1 - alpha_bar_next) / (1 - alpha_bar))
        * th.sqrt(1 - alpha_bar / alpha_bar_next)
    )
    x_next = x_next + th.sqrt(1 - alpha_bar_next - s**2) * pred.eps
    # No noise into the last step's target (s is 0 there anyway), as the original masks it.
    return x_next + _nonzero_mask(_batch_t(t, x), x) * s * noise


def _step_ddim(den: Denoiser, x, t, t_next, hist: list, eta: float = 0.0) -> th.Tensor:
    """DDIM with eta (Song et al. 2021): `ddim_update` with step noise from den.noise_fn."""
    # The original draws the noise even at eta = 0: later draws of a seeded run depend on it.
    noise = den.noise_fn(x)
    return ddim_update(den, x, t, t_next, hist[-1], eta, noise)


def _step_dpmpp_2m(den: Denoiser, x: th.Tensor, t: int, t_next: int, hist: list) -> th.Tensor:
    """
    DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (multistep, data prediction):
      h_i = lambda_{t_i} - lambda_{t_{i-1}},  r_i = h_{i-1} / h_i,
      D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2},
      x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i.
    The first step has no history and the step to sigma = 0 has h = inf: both are first order
    (DPM-Solver++(1), which equals DDIM).
    """
    x0 = hist[-1].x0
    h = den.lam(t_next) - den.lam(t)
    if len(hist) >= 2 and t_next != CLEAN:
        r = (den.lam(t) - den.lam(hist[-2].t)) / h
        d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * hist[-2].x0
    else:
        d = x0
    return (den.sigma(t_next) / den.sigma(t)) * x + den.alpha(t_next) * (-math.expm1(-h)) * d


def _step_dpmpp_3m(den: Denoiser, x: th.Tensor, t: int, t_next: int, hist: list) -> th.Tensor:
    """
    DPM-Solver++(3M): the exact integral of the data-prediction exponential integrator
    (the solution formula of DPM-Solver++, Lu et al. 2022),
      x_next = (sigma_next / sigma) x + sigma_next * int_{lambda}^{lambda_next} e^l x0(l) dl,
    with x0(l) replaced by the quadratic through the last three predictions (Newton form in
    lambda). With u = l - lambda and h = lambda_next - lambda:
      x0(u) ~ x0_0 + d1 u + f012 u^2,  and  sigma_next int e^l u^k dl = alpha_next I_k,
      I_0 = 1 - e^-h,  I_1 = h - I_0,  I_2 = h^2 - 2 I_1.
    Lower order while the history is short, and first order into sigma = 0 (h = inf).
    """
    if len(hist) < 3 or t_next == CLEAN:
        return _step_dpmpp_2m(den, x, t, t_next, hist)
    p0, p1, p2 = hist[-1], hist[-2], hist[-3]
    lam0, lam1, lam2 = den.lam(p0.t), den.lam(p1.t), den.lam(p2.t)
    h, h0, h1 = den.lam(t_next) - lam0, lam0 - lam1, lam1 - lam2
    # Divided differences of x0 in lambda.
    f01 = (p0.x0 - p1.x0) / h0
    f12 = (p1.x0 - p2.x0) / h1
    f012 = (f01 - f12) / (h0 + h1)
    d1 = f01 + h0 * f012  # slope of the quadratic at lambda (Newton form expanded around p0)
    i0 = -math.expm1(-h)
    i1 = h - i0
    i2 = h * h - 2.0 * i1
    a_next = den.alpha(t_next)
    return (den.sigma(t_next) / den.sigma(t)) * x + a_next * (i0 * p0.x0 + i1 * d1 + i2 * f012)


def _step_dpmpp_2m_sde(den: Denoiser, x: th.Tensor, t: int, t_next: int, hist: list) -> th.Tensor:
    """
    SDE-DPM-Solver++(2M) (after Lu et al. 2022, DPM-Solver++): the reverse diffusion
    SDE integrated exactly in lambda with the data prediction x0 held (first order) or linear
    (second order) over the step:
      x_next = (sigma_next / sigma) e^-h x + 2 alpha_next int_0^h e^{-2(h-u)} x0(u) du
               + sigma_next sqrt(1 - e^-2h) z,
      2 int e^{-2(h-u)} du = 1 - e^-2h,   2 int e^{-2(h-u)} u du = h - (1 - e^-2h) / 2,
    with the slope x0' = (x0_i - x0_{i-1}) / h_{i-1}. The first-order step is exactly the DDPM
    posterior step q(x_next | x, x0) (DDIM with eta = 1). The noise z comes from the Denoiser's
    `noise_fn` (torch's global generator by default).
    """
    p = hist[-1]
    if t_next == CLEAN:
        return p.x0
    h = den.lam(t_next) - den.lam(t)
    phi = -math.expm1(-2.0 * h)  # 1 - e^-2h
    a_next = den.alpha(t_next)
    out = (den.sigma(t_next) / den.sigma(t)) * math.exp(-h) * x + a_next * phi * p.x0
    if len(hist) >= 2:
        h_last = den.lam(t) - den.lam(hist[-2].t)
        out = out + a_next * (h - 0.5 * phi) / h_last * (p.x0 - hist[-2].x0)
    return out + den.sigma(t_next) * math.sqrt(phi) * den.noise_fn(x)


# Adams-Bashforth weights (newest first) of PLMS: orders 1-3 start the method, order 4 is the
# pseudo linear multistep of Liu et al. 2022 (PNDM):
# eps' = (55 e_t - 59 e_{t-1} + 37 e_{t-2} - 9 e_{t-3}) / 24.
_PLMS_WEIGHTS = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def _step_plms(den: Denoiser, x: th.Tensor, t: int, t_next: int, hist: list) -> th.Tensor:
    """
    PLMS (Liu et al. 2022, "Pseudo numerical methods for diffusion models"): a linear
    multistep combination eps' of the last four eps, fed to their transfer step
    phi(x_t, eps', t, t_next), which is the DDIM step (`ddim_update` with eps', eta = 0):
    x_next / alpha_next = x / alpha + (sigma_next/alpha_next - sigma/alpha) eps'.
    The first three steps use Adams-Bashforth of order 1 (pseudo-Euler = DDIM), 2 and 3 instead of
    the paper's pseudo Runge-Kutta start, so every step costs one network evaluation. The weights
    assume equal steps, as in the paper.
    """
    weights = _PLMS_WEIGHTS[min(len(hist), 4) - 1]
    eps = sum(w * p.eps for w, p in zip(weights, reversed(hist)))
    x_tilde = x / den.alpha(t) + (den.sigma_tilde(t_next) - den.sigma_tilde(t)) * eps
    return den.alpha(t_next) * x_tilde


def _step_heun(den: Denoiser, x: th.Tensor, t: int, t_next: int, hist: list) -> th.Tensor:
    """
    Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, EDM, Algorithm 1,
    deterministic) for the VP schedule: in x~ = x / alpha and sigma~ = sigma / alpha the ODE reads
    dx~/dsigma~ = eps(alpha x~, t). Euler step, then the trapezoidal correction with a second
    evaluation at t_next, except into sigma~ = 0 and out of the grid's noisiest point (the entry
    step from x_T), where the Euler step is taken as is. The entry step spans sigma~ from ~2e4
    (cosine) to EDM's sigma_max = 80 or below, where D(x) is nearly the data mean and
    x~ - D moves in proportion to sigma~: Euler (= DDIM) is then exact, while the trapezoid averages
    two slopes over that range and, measured on closed-form data, ruins the sample.
    Takes ints, or [N] tensors of per-sample grid indices (one batched evaluation for all of
    them; distillation's teacher step), with float64 coefficients per sample.
    """
    if th.is_tensor(t):
        return _step_heun_batched(den, x, t, t_next, hist)
    s, s_next = den.sigma_tilde(t), den.sigma_tilde(t_next)
    d = hist[-1].eps
    x_tilde = x / den.alpha(t) + (s_next - s) * d  # Euler (= DDIM)
    if t_next != CLEAN and t != len(den.alphas_cumprod) - 1:
        a_next = den.alpha(t_next)
        d_next = den(a_next * x_tilde, t_next).eps
        x_tilde = x / den.alpha(t) + (s_next - s) * 0.5 * (d + d_next)
    return den.alpha(t_next) * x_tilde


def _step_heun_batched(den: Denoiser, x: th.Tensor, t: th.Tensor, t_next: th.Tensor,
                       hist: list) -> th.Tensor:
    """`_step_heun` with a timestep pair per sample: the whole batch's corrector in one call."""
    abar = th.as_tensor(den._alpha_bar_targets, dtype=th.float64, device=x.device)
    shape = (-1, *[1] * (x.dim() - 1))

    def coef(v: th.Tensor) -> th.Tensor:
        return v.view(shape).to(x.dtype)

    a, a_next = abar[t], abar[t_next]  # CLEAN = -1 indexes the appended 1.0
    alpha, alpha_next = a.sqrt(), a_next.sqrt()
    ds = ((1 - a_next) / a_next).sqrt() - ((1 - a) / a).sqrt()  # sigma~_next - sigma~ < 0
    x_base = x * coef(1 / alpha)
    d = hist[-1].eps
    x_tilde = x_base + coef(ds) * d
    correct = (t_next != CLEAN) & (t != len(den.alphas_cumprod) - 1)
    if bool(correct.any()):
        # Samples without a corrector are evaluated too (at t = 0 for CLEAN) and then ignored:
        # one batched pass costs less than splitting the batch.
        d_next = den(x_tilde * coef(alpha_next), t_next.clamp(min=0)).eps
        x_tilde = th.where(coef(correct) > 0, x_base + coef(ds) * 0.5 * (d + d_next), x_tilde)
    return x_tilde * coef(alpha_next)


def _unipc_update(den: Denoiser, hist: list, t_next: int, order: int, m_next=None) -> th.Tensor:
    """
    UniPC's update (Zhao et al. 2023, "UniPC", Algorithm 2, data prediction, B(h) = e^h - 1:
    the bh2 variant) from hist[-1] (at t, its sample `.x`, its x0 prediction m_0) to t_next:
      x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) m_0
               - alpha_next B(h) sum_k a_k D_k,   D_k = (m_k - m_0) / r_k,
    over the `order - 1` earlier predictions m_k at r_k = (lambda_k - lambda) / h (< 0) and, for
    the corrector UniC, the prediction `m_next` at t_next (r = 1). The weights a solve the order
    conditions sum_k a_k r_k^(j-1) = j! phi_(j+1)(-h) (-h) / B(h), j = 1..p (p = number of D_k),
    phi the exponential integrator's phi functions; in float64. The predictor of order 2 takes
    a = 1/2, which makes it DPM-Solver++(2M); a corrector with only m_next takes 1/2 (trapezoid).
    """
    p0 = hist[-1]
    lam0 = den.lam(p0.t)
    h = den.lam(t_next) - lam0
    prev = list(reversed(hist[-order:-1]))  # the order - 1 predictions before p0, newest first
    r = [(den.lam(p.t) - lam0) / h for p in prev]
    d = [(p.x0 - p0.x0) / rk for p, rk in zip(prev, r)]
    if m_next is not None:
        r.append(1.0)
        d.append(m_next - p0.x0)
    hh = -h
    h_phi_1 = math.expm1(hh)  # (-h) phi_1(-h) = e^-h - 1
    b_h = h_phi_1  # bh2: B(h) = e^h - 1 in the data-prediction time -h
    x_next = (den.sigma(t_next) / den.sigma(p0.t)) * p0.x - den.alpha(t_next) * h_phi_1 * p0.x0
    if not d:
        return x_next
    if len(d) == 1 and (m_next is not None or order == 2):
        a = np.array([0.5])
    else:
        # g_j = (-h) phi_(j+1)(-h) j!, by the recursion phi_(j+1)(z) = (phi_j(z) - 1/j!) / z.
        g, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1.0
        for j in range(1, len(d) + 1):
            g.append(h_phi_k * fact / b_h)
            fact *= j + 1
            h_phi_k = h_phi_k / hh - 1.0 / fact
        vander = np.array([[rk ** (j - 1) for rk in r] for j in range(1, len(d) + 1)])
        a = np.linalg.solve(vander, np.array(g))
    return x_next - den.alpha(t_next) * b_h * sum(float(ak) * dk for ak, dk in zip(a, d))


def _step_unipc(den: Denoiser, x: th.Tensor, t: int, t_next: int, hist: list,
                order: int = 2) -> th.Tensor:
    """
    UniPC-p, bh2 (Zhao et al. 2023): the corrector UniC of the previous step, then the predictor
    UniP of this one, both `_unipc_update`. UniC costs no evaluation: it reuses the prediction at
    t, which the model made at the predictor's x_t (hist[-1].x0), to correct x_t; the loop then
    steps on from the corrected x_t (stored in hist[-1].x). The predictor uses up to order - 1
    earlier predictions; the corrected step is of order p + 1. Into sigma = 0 (CLEAN) the step is
    the last prediction of x_0 (h = inf), as DPM-Solver++'s.
    """
    if len(hist) >= 2:
        # UniC for the step hist[-2] -> t, at the order its predictor had.
        p_prev = min(order, len(hist) - 1)
        hist[-1].x = _unipc_update(den, hist[:-1], t, p_prev, m_next=hist[-1].x0)
    if t_next == CLEAN:
        return hist[-1].x0
    return _unipc_update(den, hist, t_next, min(order, len(hist)))


STEPS: dict[str, StepFn] = {
    "ddpm": _step_ddpm,
    "ddim": _step_ddim,
    "plms": _step_plms,
    "dpm++2m": _step_dpmpp_2m,
    "dpm++3m": _step_dpmpp_3m,
    "dpm++2m-sde": _step_dpmpp_2m_sde,
    "heun": _step_heun,
    "unipc": _step_unipc,
}
SAMPLERS = tuple(STEPS)  # the samplers of the one loop (diffusion models)
# What `--sampler` accepts (besides "", the original's choice) is config.SAMPLER_NAMES, the one
# list: the loop's samplers and "consistency", K-step sampling of a consistency model
# (`consistency_sample`). A step added here without its name there fails at import.
if set(SAMPLER_NAMES) != {*STEPS, "consistency"}:
    raise ImportError(f"config.SAMPLER_NAMES {SAMPLER_NAMES} and samplers.STEPS {SAMPLERS} "
                      "disagree: add the sampler's name to config.SAMPLER_NAMES")
_MEAN_GUIDED = {"ddpm"}  # samplers that apply cond_fn to the mean themselves, not to the score
_HISTORY = 4  # no step looks further back than PLMS's four predictions


def _step_fn(sampler: str, eta: float) -> StepFn:
    if sampler not in STEPS:
        raise ValueError(
            f"--sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLER_NAMES)}")
    if eta == 0.0:
        return STEPS[sampler]
    if sampler != "ddim":
        raise ValueError(f"--eta {eta} applies to --sampler ddim only, not {sampler!r}")
    return functools.partial(_step_ddim, eta=eta)


def step_once(sampler: str, den: Denoiser, x: th.Tensor, t, t_next, eta: float = 0.0) -> dict:
    """
    One step of `sampler` without history (the original's `p_sample` / `ddim_sample`).

    :param t, t_next: ints or [N] tensors of grid indices (t_next may be CLEAN).
    :return: a dict with 'sample' (x at t_next) and 'pred_xstart'.
    """
    step = _step_fn(sampler, eta)
    pred = den(x, t, guide_score=sampler not in _MEAN_GUIDED)
    return {"sample": step(den, x, t, t_next, [pred]), "pred_xstart": pred.x0}


def solve_progressive(
    sampler: str,
    den: Denoiser,
    x: th.Tensor,
    timesteps: Sequence[int],
    progress: bool = False,
    eta: float = 0.0,
) -> Iterator[dict]:
    """
    The one sampling loop: step x from timesteps[0] to timesteps[-1], evaluating the model once
    per step at the current point (plus Heun's corrector), and yield every step's result.

    :param sampler: a key of STEPS.
    :param den: the Denoiser adapter.
    :param x: the [N x C x ...] starting sample at timesteps[0] (e.g. pure noise at the top).
    :param timesteps: decreasing grid indices; the last may be CLEAN (the noise-free end).
    :param progress: show a tqdm progress bar.
    :param eta: DDIM's eta (only for sampler "ddim").
    :return: an iterator of dicts with 'sample' (x at the next timestep) and 'pred_xstart' (the
        x_0 prediction at the current one).
    """
    step = _step_fn(sampler, eta)
    guide_score = sampler not in _MEAN_GUIDED
    ts = [int(t) for t in timesteps]
    if any(a <= b and b != CLEAN for a, b in zip(ts, ts[1:])) or CLEAN in ts[:-1]:
        raise ValueError(f"timesteps must decrease strictly and only end with CLEAN, got {ts}")
    indices = range(len(ts) - 1)
    if progress:
        # Imported lazily: tqdm is only needed for interactive runs.

        indices = tqdm(indices)
    hist: list[Prediction] = []
    for i in indices:
        # No graph, as in the original's loops (cond_fn enables grad for itself). Not around the
        # yield: the caller's code between steps must keep its own grad mode.
        with th.no_grad():
            hist.append(den(x, ts[i], guide_score=guide_score))
            x = step(den, x, ts[i], ts[i + 1], hist)
        del hist[:-_HISTORY]
        yield {"sample": x, "pred_xstart": hist[-1].x0}


def solve(
    sampler: str,
    den: Denoiser,
    x: th.Tensor,
    timesteps: Sequence[int],
    progress: bool = False,
    eta: float = 0.0,
) -> th.Tensor:
    """`solve_progressive` run to the end: the sample at timesteps[-1]."""
    return final_sample(solve_progressive(sampler, den, x, timesteps, progress, eta))


def final_sample(progressive: Iterator[dict]) -> th.Tensor:
    """Run a progressive loop to the end and return its last 'sample'."""
    final = None
    for out in progressive:
        final = out
    if final is None:
        raise ValueError("the sampling loop took no steps")
    return final["sample"]


def grid(diffusion) -> list[int]:
    """The loop's timesteps on a diffusion's whole grid: T-1 down to 0, then CLEAN."""
    return [*range(diffusion.num_timesteps - 1, -1, -1), CLEAN]


def sample_loop_progressive(
    sampler: str,
    diffusion,
    model,
    shape: Sequence[int],
    *,
    noise: th.Tensor | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable | None = None,
    cond_fn: Callable | None = None,
    model_kwargs: dict | None = None,
    device=None,
    progress: bool = False,
    noise_fn: Callable[[th.Tensor], th.Tensor] | None = None,
    eta: float = 0.0,
) -> Iterator[dict]:
    """
    Sample on the diffusion's whole grid with `sampler`, yielding every step's dict ('sample',
    'pred_xstart'): the loop behind `sample()` and the original's `*_sample_loop_progressive`.

    :param shape: the [N x C x ...] shape of the samples (a tuple or list).
    :param noise: the initial x_T; else standard normal noise on `device`, which defaults to
        the device of the model's parameters.
    """
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
    if noise is None:
        if device is None:
            device = next(model.parameters()).device
        noise = th.randn(*shape, device=device)
    den = Denoiser(
        diffusion,
        model,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        cond_fn=cond_fn,
        model_kwargs=model_kwargs,
        noise_fn=noise_fn,
    )
    yield from solve_progressive(sampler, den, noise, grid(diffusion), progress, eta)


# `--sampler_spacing auto`: each sampler's spacing, the lowest toy FID on the digits table at 4-20
# NFE (README, "Which spacing each sampler uses"; one run, 500 samples a cell): "edm" (all points
# between sigma~ 20 and 0.05) won all 24 cells of ddim, dpm++2m, dpm++3m and unipc, e.g. at 5 NFE
# unipc 0.23 vs 0.36 karras, 0.44 uniform, 1.42 logsnr; ddim 0.51 vs 0.95 uniform. Heun keeps
# uniform (its Euler entry); DDPM the original's uniform respacing; plms and dpm++2m-sde, not
# measured, the earlier logsnr.
AUTO_SPACING = {
    "ddpm": "uniform", "ddim": "edm", "heun": "uniform",
    "dpm++2m": "edm", "dpm++3m": "edm", "unipc": "edm",
}


def spacing_for(sampler: str, spacing: str) -> str:
    """The spacing `--sampler_spacing` means for `sampler` ('auto': AUTO_SPACING's, or logsnr)."""
    return AUTO_SPACING.get(sampler, "logsnr") if spacing == "auto" else spacing


_OPTS = SamplerOptions()  # the sampling flags' defaults: the library's defaults too


def sigma_tilde(alphas_cumprod) -> np.ndarray:
    """EDM's noise level sigma~ = sigma / alpha = sqrt((1 - abar) / abar) of each grid point."""
    acp = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - acp) / acp)


def select_timesteps(
    alphas_cumprod,
    steps: int,
    spacing: str = "logsnr",
    sigma_max: float = _OPTS.sigma_max,
    rho: float = _OPTS.rho,
    sigma_min: float = _OPTS.sigma_min,
) -> np.ndarray:
    """
    Choose `steps` integer grid indices, decreasing from the noisiest (len - 1) to the cleanest (0):
    the one rule behind `--steps` for every sampler.

    :param alphas_cumprod: the grid's [T] cumulative alphas.
    :param spacing: "logsnr": nearest to uniform in lambda = log(alpha / sigma) (Lu et al. 2022);
        "uniform": evenly spaced in t, exactly the original's `--timestep_respacing N`;
        "karras": EDM's rho-spacing in sigma~ = sigma / alpha (Karras et al. 2022, eq. 5),
        capped at `sigma_max` (`karras_sigmas`), entered from the grid's top;
        "edm": EDM's sampling grid itself: all `steps` points rho-spaced from `sigma_max` down to
        `sigma_min`, no point at the top and none at the clean end (`_snap_karras`).
    :param sigma_max, rho: the cap and the exponent of "karras" and "edm" (ignored by the others);
        the defaults are the flags' (`config.SamplerOptions`).
    :param sigma_min: "edm": the least noise level evaluated (0: the grid's least; "karras" always
        ends at the grid's least, as consistency distillation's t_min needs).
    :return: int64 array [steps], strictly decreasing (the grid's top first, except for "edm").
        Indices that would coincide near t = 0, where one grid step spans a large log-SNR interval,
        are pushed one grid step apart.
    """
    acp = np.asarray(alphas_cumprod, dtype=np.float64)
    n_grid = len(acp)
    if not 1 <= steps <= n_grid:
        raise ValueError(
            f"--steps must be between 1 and the grid's {n_grid} timesteps, got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"--sampler_spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    if spacing == "uniform":
        return np.array(sorted(space_timesteps(n_grid, [steps]), reverse=True), dtype=np.int64)
    if steps == 1:
        return np.array([n_grid - 1], dtype=np.int64)
    if spacing in ("karras", "edm"):
        if spacing == "karras":
            return _snap_karras(acp, steps, sigma_max, rho, 0.0, entry=True)
        return _snap_karras(acp, steps, sigma_max, rho, sigma_min, entry=False)
    lam = 0.5 * (np.log(acp) - np.log1p(-acp))
    targets = np.linspace(lam[-1], lam[0], steps)
    ts = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1).astype(np.int64)
    return _strictly_decreasing(ts, n_grid)


def _strictly_decreasing(ts: np.ndarray, n_grid: int) -> np.ndarray:
    """Push snapped indices apart: up from the clean end, then down from the top."""
    ts = ts.copy()
    for k in range(len(ts) - 2, -1, -1):
        ts[k] = max(ts[k], ts[k + 1] + 1)
    ts[0] = min(ts[0], n_grid - 1)
    for k in range(1, len(ts)):
        ts[k] = min(ts[k], ts[k - 1] - 1)
    return ts


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """
    EDM's n noise levels from sigma_max down to sigma_min (Karras et al. 2022, eq. 5):
      sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    rho = 7 shortens the steps near sigma_min, where the image's detail forms. n = 1 is
    [sigma_min]: the one point a sampler must evaluate is its clean end.
    """
    if n == 1:
        return np.array([sigma_min])
    i = np.arange(n) / (n - 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + i * (lo - hi)) ** rho


def _snap_karras(acp: np.ndarray, steps: int, sigma_max: float, rho: float,
                 sigma_min: float = 0.0, entry: bool = True) -> np.ndarray:
    """
    `select_timesteps(..., "karras" | "edm")`: points rho-spaced in sigma~ (`karras_sigmas`) from
    the cap, the noisiest grid point c with sigma~_c <= sigma_max (a cosine grid's top is at
    sigma~ ~ 2e4, where steps are wasted: EDM found sigma_max = 80 enough), down to the grid point
    nearest sigma_min (0: grid index 0), each snapped to the nearest grid point in log sigma~.

    "karras" (`entry`): the grid's top (T - 1) stays the entry point, where x_T is drawn and
    evaluated, and one step jumps from it down to the cap; the points end at grid index 0.
    "edm" (not `entry`): EDM's own grid. All `steps` points lie in [sigma_min, sigma_max]: the
    sampler starts at the cap, taking x_T ~ N(0, I) as the sample there, and the last step jumps
    from the point nearest sigma_min to the clean image with that point's x_0 prediction. In the
    VP variables x_c = alpha_c (x_0 + sigma~_c eps), so starting at the cap drops the data's share
    alpha_c x_0 <= |x_0| / sigma~_c of the sample: EDM's own approximation (x = sigma_max eps). Neither
    the top (x_0 predicted from pure noise) nor grid index 0 (sigma~ 0.006 on cosine, below one
    uint8 level) then costs an evaluation; at 4-6 NFE on the digits table those two evaluations
    were a third of the budget (README, "Which spacing each sampler uses").

    A grid that lies wholly at or below the cap is spaced from its top. Only when more points are
    asked than the grid has between the ends do the extra ones lie beyond them.
    """
    if not (sigma_max > 0 and rho > 0):
        raise ValueError(f"--sigma_max and --rho must be > 0, got {sigma_max} and {rho}")
    if not sigma_min >= 0:
        raise ValueError(f"--sigma_min must be >= 0, got {sigma_min}")
    sig = sigma_tilde(acp)
    n_grid = len(acp)
    below = np.flatnonzero(sig <= sigma_max)  # sigma~ increases with t: indices 0..c
    if len(below) == 0:
        raise ValueError(f"--sigma_max {sigma_max} is below the grid's least noise level "
                         f"sigma~ = {sig[0]:.4g}")
    top = int(below[-1])
    bottom = int(np.abs(np.log(sig[: top + 1]) - np.log(max(sigma_min, sig[0]))).argmin())
    if sigma_min >= sig[top]:
        raise ValueError(f"--sigma_min {sigma_min} must lie below --sigma_max's grid point "
                         f"sigma~ = {sig[top]:.4g}")
    with_entry = entry and top != n_grid - 1
    n_inner = steps - 1 if with_entry else steps
    targets = np.log(karras_sigmas(sig[bottom], sig[top], n_inner, rho))
    inner = bottom + np.abs(
        np.log(sig[bottom: top + 1])[None, :] - targets[:, None]).argmin(axis=1)
    # rho = 7 crowds the points at both ends, where grid points are sparse in sigma~; points that
    # snapped together move apart down from the cap first (never above it), and up from the
    # bottom only where that ran out of grid.
    for k in range(1, len(inner)):
        inner[k] = min(inner[k], inner[k - 1] - 1)
    inner[-1] = max(inner[-1], 0)
    for k in range(len(inner) - 2, -1, -1):
        inner[k] = max(inner[k], inner[k + 1] + 1)
    ts = np.concatenate([[n_grid - 1], inner]) if with_entry else inner
    return _strictly_decreasing(ts.astype(np.int64), n_grid)


def sample(
    diffusion,
    model,
    shape: Sequence[int],
    *,
    noise: th.Tensor | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable | None = None,
    cond_fn: Callable | None = None,
    model_kwargs: dict | None = None,
    device=None,
    progress: bool = False,
    use_ddim: bool = False,
    noise_fn: Callable[[th.Tensor], th.Tensor] | None = None,
    cm_grid: Sequence[int] | None = None,
    **options,
) -> th.Tensor:
    """
    Draw samples with the sampler chosen by the flags: the one function the sampling scripts call.

    :param diffusion: the diffusion built from the flags (possibly with --timestep_respacing).
    :param model: the network; wrapped here for classifier-free guidance when cfg_scale != 1.
    :param shape: the [N x C x H x W] shape of the samples.
    :param noise: optional starting noise x_T of that shape.
    :param clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress: as in the
        original's `p_sample_loop`.
    :param use_ddim: the original's --use_ddim; used when `sampler` is "".
    :param noise_fn: `randn_like` for the step noise of the stochastic samplers (DDPM, DDIM with
        eta > 0, dpm++2m-sde); default torch's global generator.
    :param cm_grid: `--sampler consistency`: the student's training grid (`cm_timesteps` of its
        run's --cm_steps and --cm_spacing); None: that of cm_distill's defaults.
    :param options: fields of SamplerOptions (sampler, steps, sampler_spacing, cfg_scale, eta).
        `steps` N > 0 samples on N timesteps of the diffusion's grid (`select_timesteps`).
    :return: the [N x C x H x W] samples.
    """
    name, opts, diffusion, guided = prepare(diffusion, model, use_ddim, cm_grid, **options)
    if name == "consistency":
        return _sample_consistency(
            diffusion, guided, shape, opts, noise=noise,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, noise_fn=noise_fn, cm_grid=cm_grid)
    if noise is None and device is None and not isinstance(model, th.nn.Module):
        device = "cpu"  # a plain function has no parameters to take the device from
    return final_sample(sample_loop_progressive(
        name, diffusion, guided, shape, noise=noise,
        clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
        model_kwargs=model_kwargs, device=device, progress=progress, noise_fn=noise_fn,
        eta=opts.eta,
    ))


def prepare(diffusion, model, use_ddim: bool = False, cm_grid: Sequence[int] | None = None,
            **options) -> tuple:
    """
    Check `sample()`'s options against the diffusion and the model, and resolve them, without
    sampling: the sampling scripts call it before they write anything (a shard manifest records
    the flags, so a command refused only after that would block its corrected rerun).

    :param cm_grid: as in `sample()`.
    :return: (sampler name, SamplerOptions, the diffusion on the --steps grid, the model wrapped
        for --cfg_scale).
    :raises ValueError: naming the flag (a bad --sampler/--eta pair, --steps outside the grid,
        --cfg_scale on a model without a null label).
    """
    try:
        opts = SamplerOptions(**options)
    except TypeError as err:
        raise TypeError(f"sample(): unknown option ({err}); known: {sorted(sampler_defaults())}")
    name = opts.sampler or ("ddim" if use_ddim else "ddpm")
    guided = cfg_model(model, opts.cfg_scale)
    if opts.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {opts.steps}")
    if name == "consistency":
        if opts.eta != 0.0:
            raise ValueError("--sampler consistency takes no --eta")
        sample_timesteps(diffusion.alphas_cumprod, opts.steps or 1, cm_grid)  # --steps' bounds
        return name, opts, diffusion, guided
    _step_fn(name, opts.eta)  # a bad --sampler / --eta
    if opts.steps == 1:
        # A one-point grid cannot be built (nor can the original's --timestep_respacing 1), and
        # its one evaluation would predict x_0 from pure noise.
        raise ValueError(f"--steps 1 is too few for --sampler {name}: use >= 2, or a "
                         f"consistency model (--sampler consistency) for one-step sampling")
    if opts.steps:
        diffusion = diffusion.respace(select_timesteps(
            diffusion.alphas_cumprod, opts.steps, spacing_for(name, opts.sampler_spacing),
            opts.sigma_max, opts.rho, opts.sigma_min))
    return name, opts, diffusion, guided


def _sample_consistency(diffusion, model, shape, opts: SamplerOptions, *, noise, clip_denoised,
                        denoised_fn, cond_fn, model_kwargs, device, noise_fn,
                        cm_grid) -> th.Tensor:
    """
    `--sampler consistency --steps K`: K-step sampling of a consistency model (Song et al. 2023,
    Algorithm 1; `--steps 0` = 1), on K levels of the student's training grid
    (`sample_timesteps`), K network evaluations.
    """
    if opts.eta != 0.0 or denoised_fn is not None:
        raise ValueError("--sampler consistency takes no --eta and no denoised_fn")
    if noise is None and device is None and not isinstance(model, th.nn.Module):
        device = "cpu"
    timesteps = sample_timesteps(diffusion.alphas_cumprod, opts.steps or 1, cm_grid)
    # t_min = the clean end of the student's discretisation (cm_timesteps: grid index 0).
    fn = ConsistencyFunction(diffusion, model, t_min=0 if cm_grid is None else int(cm_grid[0]))
    return consistency_sample(
        fn, shape, timesteps, noise=noise, noise_fn=noise_fn, model_kwargs=model_kwargs,
        cond_fn=cond_fn, clip_denoised=clip_denoised, device=device)


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations per sample of `sample()` with --steps `steps` (CFG doubles them)."""
    if sampler == "consistency":
        return max(steps, 1)
    # Heun: two evaluations per step, but one for the step into sigma = 0 and for the entry step.
    return max(2 * steps - 2, 1) if sampler == "heun" else steps


# ------------------------------------------------------------------------------------------------
# Consistency models: f(x_t, t) and K-step sampling (the student's sampler; its training is
# `consistency.py`'s)


class ConsistencyFunction:
    """
    The consistency function f(x_t, t) around a network of the teacher's format:

        f(x_t, t) = c_skip(t) x_t / alpha_t + (1 - c_skip(t)) D(x_t, t),
        c_skip(t) = sigma~_{t_min} / sigma~_t,

    where D is the network's x_0 prediction (the diffusion's eps/x_0/learned-sigma handling, no
    clipping). At t = t_min, c_skip = 1 and c_out = 1 - c_skip = 0 exactly, so
    f(x, t_min) = x / alpha_{t_min} (to float64 rounding) for any finite network output: the boundary
    condition of Song et al. 2023, eq. 5, built into the parameterisation (their eq. 5-6 form
    f = c_skip x + c_out F, with differentiable c_skip, c_out and c_skip(eps) = 1, c_out(eps) = 0).

    Why this c_skip and not App. C's sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2) with
    c_out = sigma_data (sigma - sigma_min) / sqrt(sigma_data^2 + sigma^2): those scale the output
    of a network trained from scratch; our student starts from the teacher, whose network outputs
    D itself. With c_out = 1 - c_skip and c_skip = sigma~_min / sigma~, the fresh student is
        f = D + sigma~_min (x~ - D) / sigma~ = D + sigma~_min eps_D,
    which is exactly one DDIM step of the teacher from t to t_min (Song et al. 2021, eq. 12 in
    x / alpha space): the best one-evaluation estimate of the ODE's endpoint that the teacher
    gives, and equal to the teacher's denoiser up to sigma~_min eps (sigma~_min = 0.01 for the
    linear 1000-step schedule). App. C's c_skip would instead keep f close to x~ (noisy) up to
    sigma~ ~ sigma_data = 0.5, far from what the teacher already knows.

    The output is an estimate of x~ at t_min (= x_0 + sigma~_min eps), the data for all purposes.

    :param diffusion: a GaussianDiffusion / SpacedDiffusion defining the grid and the network's
        output format.
    :param model: the network, called as `model(x, timesteps, **model_kwargs)`.
    :param t_min: the grid index of the clean end of the discretisation (`cm_timesteps(...)[0]`).
    """

    def __init__(self, diffusion, model: nn.Module, t_min: int = 0):
        self.diffusion = diffusion
        self.model = model
        sig = sigma_tilde(diffusion.alphas_cumprod)
        if not 0 <= t_min < len(sig):
            raise ValueError(f"t_min must be a grid index in [0, {len(sig)}), got {t_min}")
        self.t_min = int(t_min)
        c_skip = sig[self.t_min] / sig
        c_skip[self.t_min] = 1.0  # exact, whatever the rounding of the division
        self.c_skip = c_skip  # float64 [T]; only indices >= t_min are ever evaluated
        self.c_out = 1.0 - c_skip  # float64 [T], exactly 0 at t_min
        self.alpha = np.sqrt(np.asarray(diffusion.alphas_cumprod, dtype=np.float64))
        self.nfe = 0  # network evaluations so far

    def __call__(
        self,
        x: th.Tensor,
        t: th.Tensor | int,
        model_kwargs: dict | None = None,
        cond_fn: Callable | None = None,
    ) -> th.Tensor:
        """
        :param x: the [N x C x ...] sample x_t.
        :param t: [N] grid indices (one per sample) or one int for the whole batch.
        :param model_kwargs: extra model inputs, e.g. {'y': labels}.
        :param cond_fn: optional classifier-guidance gradient `cond_fn(x, t, **model_kwargs)`,
            applied to the score of D as `Diffusion.condition_score` does (sampling only).
        :return: the [N x C x ...] estimate of the trajectory's clean end, f(x_t, t).
        """
        if not th.is_tensor(t):
            t = th.full((x.shape[0],), int(t), device=x.device, dtype=th.long)
        out = self.diffusion.p_mean_variance(
            self.model, x, t, clip_denoised=False, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.diffusion.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        self.nfe += 1
        d = out["pred_xstart"]
        # c_skip x / alpha + c_out D in float64: in float32 the form x~ - c_out (x~ - D) cancels
        # at the top of a cosine grid (x~ = x / alpha ~ 2e4 x, c_out ~ 1 - 3e-7), losing ~1e-3
        # per value, more than the pseudo-Huber c the loss works at. At t_min, c_skip = 1 and
        # c_out = 0: f = x / alpha_min, the float64 quotient rounded once.
        shape = (-1, *[1] * (x.dim() - 1))
        c_skip = th.as_tensor(self.c_skip, device=x.device)[t].view(shape)
        alpha = th.as_tensor(self.alpha, device=x.device)[t].view(shape)
        c_out = th.as_tensor(self.c_out, device=x.device)[t].view(shape)
        return (x.double() * c_skip / alpha + c_out * d.double()).to(x.dtype)


# The cap of a distillation grid (EDM's sigma_max), fixed rather than --sigma_max's: a student's
# grid is rebuilt from its args.json (--cm_steps, --cm_spacing) when it samples, so it must not
# move with a sampling flag's default.
CM_SIGMA_MAX = 80.0


def cm_timesteps(alphas_cumprod, num_scales: int, spacing: str = "karras") -> np.ndarray:
    """
    The discretisation t_0 < t_1 < ... < t_{N-1} of the teacher's grid that CD walks along
    (Song et al. 2023, sec. 4: N points from eps to T; here grid indices from the cleanest to the
    noisiest), chosen as the ODE samplers choose theirs (`samplers.select_timesteps`).

    :param alphas_cumprod: the grid's [T] cumulative alphas.
    :param num_scales: N, the number of points (>= 2).
    :param spacing: as `select_timesteps`'s (default "karras": the top, then the rest at or
        below sigma~ 80, where the consistency map has something to learn).
    :return: int64 [N], increasing; [0] is t_min (grid index 0), [-1] the noisiest grid index.
    """
    if num_scales < 2:
        raise ValueError(f"--cm_steps must be >= 2 (t_min and at least one noisy point), "
                         f"got {num_scales}")
    if spacing not in CM_SPACINGS:
        raise ValueError(f"--cm_spacing must be one of {', '.join(CM_SPACINGS)} (a grid with both "
                         f"ends), got {spacing!r}")
    if num_scales > len(alphas_cumprod):
        raise ValueError(f"--cm_steps {num_scales} exceeds the teacher's grid of "
                         f"{len(alphas_cumprod)} timesteps")
    return select_timesteps(alphas_cumprod, num_scales, spacing, sigma_max=CM_SIGMA_MAX,
                            rho=7.0)[::-1].copy()


# K-step consistency sampling: sigma~ = sigma / alpha of the second level (snapped to the student's
# training grid); the levels after it are rho-spaced below it. Measured on the digits student at
# cm_distill's defaults (README, "Few-step sampling"): K = 2's second level swept over the 16
# inner points of its training grid, toy FID 0.258-0.264 for sigma~ 25-71 rising to 0.33 at 1;
# 50 sits in the flat part (0.260, judged accuracy 0.958).
CM_SECOND_SIGMA = 50.0


def sample_timesteps(alphas_cumprod, steps: int, grid: Sequence[int] | None = None,
                     second_sigma: float = CM_SECOND_SIGMA, rho: float = 7.0) -> np.ndarray:
    """
    The K = `steps` levels of K-step consistency sampling, all points of the student's training
    grid (the only points where it learned to be consistent): the grid's top, where x_T is drawn,
    then K - 1 levels rho-spaced in sigma~ from `second_sigma` down toward sigma~_{t_min}
    (EDM's eq. 5 with K points, the last, t_min, left out: f is the identity there), each snapped
    to the nearest unused grid point in log sigma~, strictly decreasing.

    :param alphas_cumprod: the diffusion's [T] cumulative alphas.
    :param grid: the training grid `cm_timesteps(...)` (increasing, grid[0] = t_min); None: the
        grid of cm_distill's default flags.
    :return: int64 [steps], strictly decreasing grid indices above t_min.
    """
    if steps < 1:
        raise ValueError(f"--steps must be >= 1 for consistency sampling, got {steps}")
    if grid is None:
        cm = defaults(ConsistencyConfig)
        grid = cm_timesteps(alphas_cumprod, min(cm["cm_steps"], len(alphas_cumprod)),
                            cm["cm_spacing"])
    grid = np.asarray(grid, dtype=np.int64)
    inner = grid[1:-1][::-1]  # candidates, noisiest first (neither the top nor t_min)
    if steps - 1 > len(inner):
        raise ValueError(f"--steps {steps} exceeds the student's training grid of {len(grid)} "
                         f"points (at most {len(inner) + 1} levels)")
    sig = sigma_tilde(alphas_cumprod)
    targets = np.log(karras_sigmas(sig[grid[0]], max(second_sigma, sig[grid[0]]), steps, rho))
    levels, pos = [int(grid[-1])], 0
    log_inner = np.log(sig[inner])
    for k, target in enumerate(targets[:steps - 1]):
        # Nearest unused candidate, leaving enough below it for the levels still to come.
        last = len(inner) - (steps - 2 - k)
        pick = pos + int(np.abs(log_inner[pos:last] - target).argmin())
        levels.append(int(inner[pick]))
        pos = pick + 1
    return np.array(levels, dtype=np.int64)


def consistency_sample(
    fn: ConsistencyFunction,
    shape: Sequence[int],
    timesteps: Sequence[int],
    *,
    noise: th.Tensor | None = None,
    noise_fn: Callable[[th.Tensor], th.Tensor] | None = None,
    model_kwargs: dict | None = None,
    cond_fn: Callable | None = None,
    clip_denoised: bool = True,
    device=None,
) -> th.Tensor:
    """
    K-step consistency sampling (Song et al. 2023, Algorithm 1) on the VP schedule:
    x_T = noise ~ N(0, I) at the top level (the VP marginal there), x_0 = f(x_T, T); then for
    each later level tau: x~_tau = x_0 + sqrt(sigma~_tau^2 - sigma~_min^2) z (the ODE's marginal
    from the point x_0 at t_min), x_tau = alpha_tau x~_tau, x_0 = f(x_tau, tau).
    Exactly K = len(timesteps) network evaluations.

    :param fn: the ConsistencyFunction of the (EMA) student.
    :param shape: the [N x C x ...] shape of the samples.
    :param timesteps: K strictly decreasing grid indices > t_min (`sample_timesteps`).
    :param noise: optional starting noise x_T of that shape.
    :param noise_fn: `randn_like` for the re-noising z (default torch's), for per-sample seeds.
    :param model_kwargs: extra model inputs, e.g. {'y': labels}.
    :param cond_fn: optional classifier guidance, a shift of the score at each evaluation.
    :param clip_denoised: clip each x_0 estimate to [-1, 1].
    :return: the [N x C x ...] samples.
    """
    ts = [int(t) for t in timesteps]
    if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] <= fn.t_min:
        raise ValueError(f"timesteps must be non-empty, strictly decreasing and above "
                         f"t_min = {fn.t_min}, got {ts}")
    if noise is None:
        if device is None and isinstance(fn.model, nn.Module):
            device = next(fn.model.parameters()).device
        noise = th.randn(*shape, device=device)
    noise_fn = noise_fn or th.randn_like
    acp = np.asarray(fn.diffusion.alphas_cumprod, dtype=np.float64)
    sig = sigma_tilde(acp)
    x = noise
    with th.no_grad():  # cond_fn enables grad for itself, as in the other loops
        for i, t in enumerate(ts):
            if i > 0:
                spread = math.sqrt(sig[t] ** 2 - sig[fn.t_min] ** 2)
                x = math.sqrt(acp[t]) * (x0 + spread * noise_fn(x0))
            x0 = fn(x, t, model_kwargs, cond_fn)
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
    return x0
