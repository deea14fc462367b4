"""Samplers behind one interface: the original's DDPM/DDIM loops and fast ODE/SDE solvers.

`sample(diffusion, model, shape, sampler=..., steps=..., ...)` is the one entry point the sampling
scripts call. It dispatches:

- `"ddpm"` / `"ddim"` (and `""`, which means "DDIM if --use_ddim else DDPM", the original's rule) to
  the diffusion's own `p_sample_loop` / `ddim_sample_loop`. `--steps N` respaces the full schedule
  the way the original's README does (`--timestep_respacing N` for DDPM, `ddimN` for DDIM);
  `--steps 0` samples on the diffusion's grid as built from `--timestep_respacing`.
- `"plms"`, `"dpm++2m"`, `"dpm++3m"`, `"heun"` to solvers of the probability-flow ODE of the
  model's own VP schedule (alpha_t^2 = alphas_cumprod[t], sigma_t^2 = 1 - alphas_cumprod[t]),
  and `"dpm++2m-sde"` to the second-order multistep solver of the reverse SDE (stochastic, like
  DDPM, which corrects model errors that a deterministic ODE solver carries to the end).

Every ODE/SDE solver is one step function with the same signature,
`step(denoiser, x, t, t_next, history) -> x_next`, run by the single loop
`solve(name, denoiser, x, timesteps)` (one sampler signature, as in k-diffusion). The
`Denoiser` adapter is the only place that talks to the model: it turns
`diffusion.p_mean_variance` (which already handles respaced timesteps, eps/x0/learned-variance
outputs, `clip_denoised` and `denoised_fn`) plus `diffusion.condition_score` (classifier guidance,
score form) into the pair (eps, x0) at a grid point. Classifier-free guidance wraps the model itself
(`guidance.cfg_model`), so it works the same in every loop.

Time steps. Solvers only ever evaluate the model at *integer* timesteps of the diffusion's grid,
the timesteps it was trained on. `--steps N` picks N of them with log-SNR
lambda_t = log(alpha_t / sigma_t) as close as possible to uniform between the noisiest and the
cleanest grid point (the spacing DPM-Solver recommends for pixel-space models, Lu et al. 2022),
collisions pushed one grid step apart; `--sampler_spacing uniform` spaces them evenly in t instead.
After the last (cleanest) grid point, every solver takes one final step to the noise-free end of the
ODE (alpha = 1, sigma = 0), like the original DDIM, whose last step returns the predicted x_0. So a
multistep solver with `--steps N` costs N network evaluations (NFE); Heun costs 2N - 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch as th

from .config import SamplerOptions, defaults
from .guidance import cfg_model

CLEAN = -1  # grid index of the noise-free end of the ODE: alphas_cumprod = 1, sigma = 0


def sampler_defaults() -> dict:
    """Defaults of the sampling flags (`config.SamplerOptions`), as a dict."""
    return defaults(SamplerOptions)


@dataclass
class Prediction:
    """The model's prediction at one grid point: timestep `t` (grid index), `eps` and `x0`."""

    t: int
    eps: th.Tensor
    x0: th.Tensor


class Denoiser:
    """
    Adapter between a diffusion + model and the ODE solvers: (eps, x0) at an integer grid timestep.

    :param diffusion: a GaussianDiffusion / SpacedDiffusion; its `alphas_cumprod` define the grid
        (for a SpacedDiffusion, the respaced grid; it maps grid indices to the model's timesteps).
    :param model: the network (possibly wrapped for classifier-free guidance).
    :param clip_denoised: clip the predicted x_0 to [-1, 1] (eps is recomputed from it, as in
        DDIM).
    :param denoised_fn: optional function applied to the predicted x_0 before clipping.
    :param cond_fn: optional classifier-guidance gradient function `cond_fn(x, t, **model_kwargs)`;
        applied in score form (`diffusion.condition_score`):
        eps <- eps - sqrt(1 - alpha_bar) * grad.
    :param model_kwargs: extra model inputs, e.g. {'y': labels}.
    :param noise_fn: `randn_like` for the step noise of stochastic solvers (default torch's), so
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

    def __call__(self, x: th.Tensor, t: int) -> Prediction:
        """
        :param x: the [N x C x ...] sample at grid timestep `t`.
        :param t: an integer index into the diffusion's grid (not CLEAN).
        :return: Prediction with eps and x0, both shaped like x.
        """
        tt = th.full((x.shape[0],), int(t), device=x.device, dtype=th.long)
        out = self.diffusion.p_mean_variance(
            self.model,
            x,
            tt,
            clip_denoised=self.clip_denoised,
            denoised_fn=self.denoised_fn,
            model_kwargs=self.model_kwargs,
        )
        if self.cond_fn is not None:
            # Classifier guidance as a shift of the score (Dhariwal & Nichol 2021, Algorithm 2):
            # the same correction the original DDIM applies; cond_fn sees the model's timesteps.
            out = self.diffusion.condition_score(
                self.cond_fn, out, x, tt, model_kwargs=self.model_kwargs
            )
        x0 = out["pred_xstart"]
        # eps consistent with the (clipped, guided) x0, as the original DDIM step computes it.
        eps = self.diffusion._predict_eps_from_xstart(x, tt, x0)
        self.nfe += 1
        return Prediction(int(t), eps, x0)


# A step maps x at grid point t to x at t_next, given the predictions so far (newest last; the
# newest is at t). Every solver below is one such function, run by `solve`.
StepFn = Callable[[Denoiser, th.Tensor, int, int, list], th.Tensor]


def _step_ddim(den: Denoiser, x: th.Tensor, t: int, t_next: int, hist: list) -> th.Tensor:
    """
    DDIM with eta = 0 (Song et al. 2021, eq. 12) = DPM-Solver++(1) = Euler in sigma/alpha space:
    x_next = alpha_next * x0 + sigma_next * eps.
    """
    p = hist[-1]
    return den.alpha(t_next) * p.x0 + den.sigma(t_next) * p.eps


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
    phi(x_t, eps', t, t_next), which is the DDIM step (our `_step_ddim` with eps'):
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
    evaluation at t_next, except into sigma~ = 0 where the Euler step is taken as is.
    """
    s, s_next = den.sigma_tilde(t), den.sigma_tilde(t_next)
    d = hist[-1].eps
    x_tilde = x / den.alpha(t) + (s_next - s) * d  # Euler (= DDIM)
    if t_next != CLEAN:
        a_next = den.alpha(t_next)
        d_next = den(a_next * x_tilde, t_next).eps
        x_tilde = x / den.alpha(t) + (s_next - s) * 0.5 * (d + d_next)
    return den.alpha(t_next) * x_tilde


STEPS: dict[str, StepFn] = {
    "ddim": _step_ddim,
    "plms": _step_plms,
    "dpm++2m": _step_dpmpp_2m,
    "dpm++3m": _step_dpmpp_3m,
    "dpm++2m-sde": _step_dpmpp_2m_sde,
    "heun": _step_heun,
}
# Samplers that `sample()` accepts: the original's two loops and the solvers ("ddim" there is the
# original's loop, which also honours --eta; STEPS["ddim"] is its eta = 0 step, used by the others).
SAMPLERS = ("ddpm", "ddim", "plms", "dpm++2m", "dpm++3m", "dpm++2m-sde", "heun")
_HISTORY = 4  # no step looks further back than PLMS's four predictions


def solve(
    sampler: str,
    den: Denoiser,
    x: th.Tensor,
    timesteps: Sequence[int],
    progress: bool = False,
) -> th.Tensor:
    """
    Integrate the probability-flow ODE from timesteps[0] to timesteps[-1]: the one loop of every
    ODE solver. The model is evaluated once per step at the current point (plus Heun's corrector).

    :param sampler: a key of STEPS.
    :param den: the Denoiser adapter.
    :param x: the [N x C x ...] starting sample at timesteps[0] (e.g. pure noise at the top).
    :param timesteps: decreasing grid indices; the last may be CLEAN (the noise-free end).
    :return: the sample at timesteps[-1].
    """
    if sampler not in STEPS:
        raise ValueError(f"unknown ODE sampler {sampler!r}; choose one of {sorted(STEPS)}")
    ts = [int(t) for t in timesteps]
    if any(a <= b and b != CLEAN for a, b in zip(ts, ts[1:])) or CLEAN in ts[:-1]:
        raise ValueError(f"timesteps must decrease strictly and only end with CLEAN, got {ts}")
    step = STEPS[sampler]
    indices = range(len(ts) - 1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices)
    hist: list[Prediction] = []
    with th.no_grad():  # as the original's loops; cond_fn enables grad for itself
        for i in indices:
            hist.append(den(x, ts[i]))
            x = step(den, x, ts[i], ts[i + 1], hist)
            del hist[:-_HISTORY]
    return x


def select_timesteps(alphas_cumprod, steps: int, spacing: str = "logsnr") -> np.ndarray:
    """
    Choose `steps` integer grid indices, decreasing from the noisiest (len - 1) to the cleanest (0).

    :param alphas_cumprod: the grid's [T] cumulative alphas.
    :param spacing: "logsnr": nearest to uniform in lambda = log(alpha / sigma) (Lu et al. 2022);
        "uniform": evenly spaced in t (the original's respacing within one section).
    :return: int64 array [steps], strictly decreasing. Indices that would coincide near t = 0, where
        one grid step spans a large log-SNR interval, are pushed one grid step apart.
    """
    acp = np.asarray(alphas_cumprod, dtype=np.float64)
    n_grid = len(acp)
    if not 1 <= steps <= n_grid:
        raise ValueError(
            f"--steps must be between 1 and the grid's {n_grid} timesteps, got {steps}")
    if steps == 1:
        return np.array([n_grid - 1], dtype=np.int64)
    if spacing == "uniform":
        ts = np.round(np.linspace(n_grid - 1, 0, steps))
    elif spacing == "logsnr":
        lam = 0.5 * (np.log(acp) - np.log1p(-acp))
        targets = np.linspace(lam[-1], lam[0], steps)
        ts = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)
    else:
        raise ValueError(f"--sampler_spacing must be 'logsnr' or 'uniform', got {spacing!r}")
    ts = ts.astype(np.int64)
    # Make the indices strictly decreasing: push up from the clean end, then down from the top.
    for k in range(steps - 2, -1, -1):
        ts[k] = max(ts[k], ts[k + 1] + 1)
    ts[0] = min(ts[0], n_grid - 1)
    for k in range(1, steps):
        ts[k] = min(ts[k], ts[k - 1] - 1)
    return ts


def _full_grid(diffusion) -> bool:
    tmap = getattr(diffusion, "timestep_map", None)
    if tmap is None:
        return True
    tmap = [int(t) for t in tmap]
    return tmap == list(range(getattr(diffusion, "original_num_steps", len(tmap))))


def respaced(diffusion, steps: int, ddim: bool):
    """
    The diffusion the original's loops use for `--steps N`: the full schedule respaced to N steps
    as the original's README does it (`--timestep_respacing N` for DDPM, `ddimN` for DDIM).

    :param diffusion: a diffusion over the full schedule (no --timestep_respacing).
    :return: a SpacedDiffusion (or `diffusion` itself when steps == 0).
    """
    if steps <= 0:
        return diffusion
    if not _full_grid(diffusion):
        raise ValueError(
            "--steps respaces the full schedule, but the diffusion was already built with "
            "--timestep_respacing: pass one of them (or --steps 0 to sample on the respaced grid)"
        )
    from .respace import SpacedDiffusion, space_timesteps

    n_grid = diffusion.num_timesteps
    return SpacedDiffusion(
        use_timesteps=space_timesteps(n_grid, f"ddim{steps}" if ddim else str(steps)),
        betas=np.asarray(diffusion.betas, dtype=np.float64),
        model_mean_type=diffusion.model_mean_type,
        model_var_type=diffusion.model_var_type,
        loss_type=diffusion.loss_type,
        rescale_timesteps=diffusion.rescale_timesteps,
    )


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
    :param options: fields of SamplerOptions (sampler, steps, sampler_spacing, cfg_scale, eta).
    :return: the [N x C x H x W] samples.
    """
    try:
        opts = SamplerOptions(**options)
    except TypeError as err:
        raise TypeError(f"sample(): unknown option ({err}); known: {sorted(sampler_defaults())}")
    name = opts.sampler or ("ddim" if use_ddim else "ddpm")
    if name not in SAMPLERS:
        raise ValueError(f"--sampler {name!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    if opts.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {opts.steps}")
    model = cfg_model(model, opts.cfg_scale)
    loop_kwargs = dict(
        noise=noise,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        cond_fn=cond_fn,
        model_kwargs=model_kwargs,
        device=device,
        progress=progress,
        noise_fn=noise_fn,
    )
    if name == "ddpm":
        spaced = respaced(diffusion, opts.steps, ddim=False)
        return spaced.p_sample_loop(model, shape, **loop_kwargs)
    if name == "ddim":
        spaced = respaced(diffusion, opts.steps, ddim=True)
        return spaced.ddim_sample_loop(model, shape, eta=opts.eta, **loop_kwargs)

    den = Denoiser(
        diffusion,
        model,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        cond_fn=cond_fn,
        model_kwargs=model_kwargs,
        noise_fn=noise_fn,
    )
    n_grid = len(den.alphas_cumprod)
    if opts.steps:
        ts = select_timesteps(den.alphas_cumprod, opts.steps, opts.sampler_spacing)
    else:
        ts = np.arange(n_grid - 1, -1, -1)
    if noise is None:
        if device is None and isinstance(model, th.nn.Module):
            device = next(model.parameters()).device
        noise = th.randn(*shape, device=device)
    return solve(name, den, noise, [*ts.tolist(), CLEAN], progress=progress)


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations per sample of `sample()` with --steps `steps` (CFG doubles them)."""
    return 2 * steps - 1 if sampler == "heun" else steps
