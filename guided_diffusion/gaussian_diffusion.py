"""Gaussian diffusion: the forward process, the learned reverse process, its samplers and losses.

Follows Ho et al. 2020 ("DDPM"), with the learned variances, cosine schedule and hybrid loss of
Nichol & Dhariwal 2021 ("improved DDPM"), DDIM sampling of Song et al. 2021, and the classifier
guidance of Dhariwal & Nichol 2021 ("ADM").  Schedule arrays are float64 NumPy arrays; a value is
looked up per timestep and cast to float32 only when it meets a tensor (`_extract_into_tensor`),
which keeps the numbers identical to the original implementation.
"""

from __future__ import annotations

import enum
import inspect
import math
from typing import Callable, Iterator

import numpy as np
import torch as th

from . import samplers
from .losses import (  # noqa: F401 -- the per-timestep helpers keep their original home's names
    _extract_into_tensor,
    _nonzero_mask,
    _per_example,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)

# model(x [N x C x ...], t [N], **model_kwargs) -> [N x C x ...] or [N x 2C x ...]
Model = Callable[..., th.Tensor]
# cond_fn(x, t, **model_kwargs) -> gradient of log p(y | x_t) w.r.t. x_t (times a guidance scale)
CondFn = Callable[..., th.Tensor]


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """
    Get a pre-defined beta schedule by name.

    "linear" is Ho et al.'s schedule (1e-4 to 0.02 over 1000 steps), scaled by 1000/T so that any
    step count T spans the same noise levels.  "cosine" is Nichol & Dhariwal 2021, eq. 17.

    :param schedule_name: "linear" or "cosine".
    :param num_diffusion_timesteps: T, the number of diffusion steps.
    :return: a float64 array of T betas.
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        beta_start = scale * 0.0001
        beta_end = scale * 0.02
        return np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        # s = 0.008 offsets t so that beta_0 is not vanishingly small (Nichol & Dhariwal, sec 3.2).
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(f"unknown noise schedule {schedule_name!r}: expected 'linear' or 'cosine'")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """
    Discretize a continuous alpha_bar(t), t in [0, 1], into betas:
    beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T).

    :param num_diffusion_timesteps: T, the number of betas.
    :param alpha_bar: the cumulative product of (1 - beta) as a function of t in [0, 1].
    :param max_beta: upper clip; keeps the last steps away from beta = 1, where alpha_bar -> 0
                     would make the reverse process singular (Nichol & Dhariwal, sec 3.2).
    :return: a float64 array of T betas.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


class ModelMeanType(enum.Enum):
    """What the model's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # the posterior mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise epsilon of x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps


class ModelVarType(enum.Enum):
    """
    How the reverse-process variance is chosen.  LEARNED_RANGE (Nichol & Dhariwal, eq. 15) lets
    the model interpolate, in log space, between the two fixed choices of Ho et al.
    """

    LEARNED = enum.auto()  # the model outputs log-variance directly
    FIXED_SMALL = enum.auto()  # the posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (with beta~_1 at t = 0, for a better decoder)
    LEARNED_RANGE = enum.auto()  # model output v in [-1, 1] picks between beta~_t and beta_t


class LossType(enum.Enum):
    MSE = enum.auto()  # L_simple (plus the one-term vb loss L_t when variances are learned)
    RESCALED_MSE = enum.auto()  # L_simple + (T / 1000) L_t: L_hybrid, lambda = 0.001
    KL = enum.auto()  # the variational lower bound L_vlb
    RESCALED_KL = enum.auto()  # L_vlb times T, the scale of the sum over all terms

    def is_vb(self) -> bool:
        return self == LossType.KL or self == LossType.RESCALED_KL


class GaussianDiffusion:
    """
    Utilities for training and sampling diffusion models.

    :param betas: a 1-D array of betas, one per diffusion step; betas[0] belongs to the first
                  (least noisy) forward step.
    :param model_mean_type: a ModelMeanType, what the model outputs.
    :param model_var_type: a ModelVarType, how variances are chosen.
    :param loss_type: a LossType, the training objective.
    :param rescale_timesteps: if True, pass timesteps scaled to [0, 1000) to the model, as if the
                              process had 1000 steps (improved-DDPM style).
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        # Float64 throughout: the cumulative products lose precision fast in float32.
        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(
                f"betas must lie in (0, 1], got min {betas.min()} and max {betas.max()}"
            )
        self.num_timesteps = int(betas.shape[0])
        # What `respace` rebuilds from: this process's own constructor settings (SpacedDiffusion
        # replaces them with its base process's).
        self.base_kwargs = dict(
            betas=betas,
            model_mean_type=model_mean_type,
            model_var_type=model_var_type,
            loss_type=loss_type,
            rescale_timesteps=rescale_timesteps,
        )

        # Forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): Ho et al., eq. 4.
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # Posterior q(x_{t-1} | x_t, x_0): Ho et al. 2020, eqs. 6-7.
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # The posterior variance is 0 at t = 0; its log is clipped by repeating the t = 1 value.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

    # ----------------------------------------------------------------------------------------
    # Forward process and posterior

    def q_mean_variance(self, x_start: th.Tensor, t: th.Tensor):
        """
        Get the distribution q(x_t | x_0).

        :param x_start: the [N x C x ...] tensor of noiseless inputs.
        :param t: the number of diffusion steps (minus 1), [N]; here, 0 means one step.
        :return: a tuple (mean, variance, log_variance), all of x_start's shape.
        """
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: th.Tensor, t: th.Tensor, noise: th.Tensor | None = None
    ) -> th.Tensor:
        """
        Diffuse the data for a given number of steps: sample from q(x_t | x_0).

        :param x_start: the [N x C x ...] initial data batch.
        :param t: the number of diffusion steps (minus 1), [N]; here, 0 means one step.
        :param noise: if given, the standard normal noise to use, like x_start.
        :return: a noisy version of x_start.
        """
        if noise is None:
            noise = th.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(
                f"noise {tuple(noise.shape)} must have x_start's shape {tuple(x_start.shape)}"
            )
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start: th.Tensor, x_t: th.Tensor, t: th.Tensor):
        """
        Mean and variance of the diffusion posterior q(x_{t-1} | x_t, x_0) (Ho et al., eqs. 6-7).

        :return: a tuple (mean, variance, log_variance_clipped), all of x_t's shape.
        """
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ")
        posterior_mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        posterior_variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = _extract_into_tensor(
            self.posterior_log_variance_clipped, t, x_t.shape
        )
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # ----------------------------------------------------------------------------------------
    # Reverse process p(x_{t-1} | x_t)

    def p_mean_variance(
        self,
        model: Model,
        x: th.Tensor,
        t: th.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[th.Tensor], th.Tensor] | None = None,
        model_kwargs: dict | None = None,
    ) -> dict:
        """
        Apply the model to get p(x_{t-1} | x_t), and a prediction of the initial x, x_0.

        :param model: the model, which takes a signal and a batch of timesteps as input.
        :param x: the [N x C x ...] tensor at time t.
        :param t: a 1-D tensor of timesteps, [N].
        :param clip_denoised: if True, clip the x_0 prediction to [-1, 1].
        :param denoised_fn: if not None, applied to the x_0 prediction before it is used (and
                            before clipping) to compute the mean.
        :param model_kwargs: extra keyword arguments for the model (e.g. class labels 'y').
        :return: a dict with 'mean', 'variance', 'log_variance' and 'pred_xstart', each like x.
        """
        if model_kwargs is None:
            model_kwargs = {}
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},) for a batch of {B}, got {tuple(t.shape)}")
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            # The model outputs 2C channels: the mean parameterization, then the variance values.
            if model_output.shape != (B, C * 2, *x.shape[2:]):
                raise ValueError(
                    f"a learned-variance model must output {2 * C} channels for {C}-channel "
                    f"inputs, got output {tuple(model_output.shape)}"
                )
            model_output, model_var_values = th.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                # Interpolate log-variance between beta~_t and beta_t: Nichol & Dhariwal, eq. 15.
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
                frac = (model_var_values + 1) / 2  # the model outputs v in [-1, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = th.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # sigma_t^2 = beta_t, but beta~_1 at t = 0 so that the decoder term gets a
                # sensible variance (beta_0 is tiny).
                variance = np.append(self.posterior_variance[1], self.betas[1:])
                log_variance = np.log(variance)
            elif self.model_var_type == ModelVarType.FIXED_SMALL:
                variance = self.posterior_variance
                log_variance = self.posterior_log_variance_clipped
            else:
                raise ValueError(f"unknown model_var_type {self.model_var_type!r}")
            model_variance = _extract_into_tensor(variance, t, x.shape)
            model_log_variance = _extract_into_tensor(log_variance, t, x.shape)

        def process_xstart(x0: th.Tensor) -> th.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            if clip_denoised:
                return x0.clamp(-1, 1)
            return x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(
                self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output)
            )
            model_mean = model_output
        elif self.model_mean_type in (ModelMeanType.START_X, ModelMeanType.EPSILON):
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(
                    self.predict_xstart(x_t=x, t=t, eps=model_output)
                )
            # The reverse mean is the posterior mean at the predicted x_0 (Ho et al., eq. 7).
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        else:
            raise ValueError(f"unknown model_mean_type {self.model_mean_type!r}")

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def predict_xstart(self, x_t: th.Tensor, t: th.Tensor, eps: th.Tensor) -> th.Tensor:
        """
        x_0 from a noise prediction: invert x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps (Ho et al.,
        eq. 4).

        :param x_t: the [N x C x ...] tensor at time t; `eps` is like it.
        :param t: the timesteps, [N].
        :return: the [N x C x ...] x_0.
        """
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def predict_eps(self, x_t: th.Tensor, t: th.Tensor, pred_xstart: th.Tensor) -> th.Tensor:
        """
        The noise from an x_0 prediction: invert x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps.

        :param x_t: the [N x C x ...] tensor at time t; `pred_xstart` is like it.
        :param t: the timesteps, [N].
        :return: the [N x C x ...] eps.
        """
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    # The original's private names, which user code calls.
    _predict_xstart_from_eps = predict_xstart
    _predict_eps_from_xstart = predict_eps

    def _predict_xstart_from_xprev(
        self, x_t: th.Tensor, t: th.Tensor, xprev: th.Tensor
    ) -> th.Tensor:
        # Invert the posterior mean coef1 * x_0 + coef2 * x_t for x_0.
        return (
            _extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(
                self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape
            )
            * x_t
        )

    def _scale_timesteps(self, t: th.Tensor) -> th.Tensor:
        """The timesteps the model sees: t itself, or t * 1000 / T (float) if rescaling."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # ----------------------------------------------------------------------------------------
    # Classifier guidance (Dhariwal & Nichol 2021)

    def condition_mean(
        self, cond_fn: CondFn, p_mean_var: dict, x: th.Tensor, t: th.Tensor, model_kwargs=None
    ) -> th.Tensor:
        """
        Shift the reverse-process mean by the classifier gradient: mu + Sigma * grad log p(y|x_t)
        (Dhariwal & Nichol 2021, Algorithm 1; Sohl-Dickstein et al. 2015).

        :param cond_fn: computes grad_x log p(y | x, t) (times the guidance scale).
        :param p_mean_var: the dict p_mean_variance returned for x, t.
        :return: the guided [N x C x ...] mean, in float32.
        """
        if model_kwargs is None:
            model_kwargs = {}
        gradient = cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(
        self, cond_fn: CondFn, p_mean_var: dict, x: th.Tensor, t: th.Tensor, model_kwargs=None
    ) -> dict:
        """
        Guide the score instead of the mean, for DDIM (Dhariwal & Nichol 2021, Algorithm 2,
        after Song et al. 2021): eps' = eps - sqrt(1 - abar_t) * grad log p(y | x_t), then
        recompute pred_xstart and the posterior mean from eps'.

        :param cond_fn: computes grad_x log p(y | x, t) (times the guidance scale).
        :param p_mean_var: the dict p_mean_variance returned for x, t.
        :return: a copy of p_mean_var with 'pred_xstart' and 'mean' replaced.
        """
        if model_kwargs is None:
            model_kwargs = {}
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, _per_example(x))
        eps = self.predict_eps(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        out = p_mean_var.copy()
        out["pred_xstart"] = self.predict_xstart(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ----------------------------------------------------------------------------------------
    # Respacing

    def respace(self, use_timesteps) -> "GaussianDiffusion":
        """
        This process on a subset of its grid, built as the diffusion factory builds one: a
        `SpacedDiffusion` over the base schedule and constructor settings this one was made from.

        :param use_timesteps: indices into this diffusion's grid (for a SpacedDiffusion, into its
                              respaced grid) to keep.
        :return: a SpacedDiffusion whose model calls see the base process's timesteps.
        """
        base_t = getattr(self, "timestep_map", range(self.num_timesteps))
        keep = [int(i) for i in use_timesteps]
        bad = [i for i in keep if not 0 <= i < self.num_timesteps]
        if bad:
            raise ValueError(f"timesteps {bad[:5]} are outside the {self.num_timesteps}-step grid")
        return SpacedDiffusion(use_timesteps={base_t[i] for i in keep}, **self.base_kwargs)

    # ----------------------------------------------------------------------------------------
    # Sampling: the original's entry points, thin shims over the one loop of `samplers`.

    def _denoiser(self, model, clip_denoised, denoised_fn, cond_fn, model_kwargs, noise_fn=None):
        return samplers.Denoiser(
            self, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, noise_fn=noise_fn,
        )

    def p_sample(
        self,
        model: Model,
        x: th.Tensor,
        t: th.Tensor,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn: CondFn | None = None,
        model_kwargs: dict | None = None,
        noise_fn: Callable[[th.Tensor], th.Tensor] | None = None,
    ) -> dict:
        """
        Sample x_{t-1} from the model at the given timestep (Ho et al., Algorithm 2, one step).

        :param x: the current [N x C x ...] tensor x_t.
        :param t: the timesteps, [N]; 0 is the last step and adds no noise.
        :param cond_fn: if not None, a gradient function for classifier guidance of the mean.
        :param noise_fn: draws the step's noise like `th.randn_like(x)` (the default); seeded
                         sampling passes one that gives every sample its own generator.
        :return: a dict with 'sample' (x_{t-1}) and 'pred_xstart'.
        """
        den = self._denoiser(model, clip_denoised, denoised_fn, cond_fn, model_kwargs, noise_fn)
        return samplers.step_once("ddpm", den, x, t, t - 1)

    def ddim_sample(
        self,
        model: Model,
        x: th.Tensor,
        t: th.Tensor,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn: CondFn | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        noise_fn: Callable[[th.Tensor], th.Tensor] | None = None,
    ) -> dict:
        """
        Sample x_{t-1} with DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1
        matches the DDPM posterior variance. cond_fn guides the score.

        :return: a dict with 'sample' (x_{t-1}) and 'pred_xstart'.
        """
        den = self._denoiser(model, clip_denoised, denoised_fn, cond_fn, model_kwargs, noise_fn)
        return samplers.step_once("ddim", den, x, t, t - 1, eta=eta)

    def ddim_reverse_sample(
        self,
        model: Model,
        x: th.Tensor,
        t: th.Tensor,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
    ) -> dict:
        """
        Step the deterministic DDIM ODE forward, x_t -> x_{t+1} (encoding an image to noise).

        :return: a dict with 'sample' (x_{t+1}) and 'pred_xstart'.
        """
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample is only deterministic with eta=0, got {eta}")
        den = self._denoiser(model, clip_denoised, denoised_fn, None, model_kwargs)
        pred = den(x, t)
        # DDIM eq. 12 with sigma = 0 towards the next, noisier step (alphas_cumprod 0 past T-1).
        return {"sample": samplers.ddim_update(den, x, t, t + 1, pred), "pred_xstart": pred.x0}

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape,
        noise: th.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn: CondFn | None = None,
        model_kwargs: dict | None = None,
        device=None,
        progress: bool = False,
        noise_fn: Callable[[th.Tensor], th.Tensor] | None = None,
    ) -> Iterator[dict]:
        """
        Generate samples with DDPM ancestral sampling, yielding the p_sample dict of every step.

        :param shape: the shape of the samples, (N, C, H, W).
        :param noise: if given, the initial x_T (else standard normal noise on `device`).
        :param device: where to create x_T; defaults to the device of the model's parameters.
        :param progress: if True, show a tqdm progress bar.
        :param noise_fn: draws each step's noise (default `th.randn_like`), see p_sample.
        """
        yield from samplers.sample_loop_progressive(
            "ddpm", self, model, shape, noise=noise, clip_denoised=clip_denoised,
            denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs, device=device,
            progress=progress, noise_fn=noise_fn,
        )

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape,
        noise: th.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn: CondFn | None = None,
        model_kwargs: dict | None = None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
        noise_fn: Callable[[th.Tensor], th.Tensor] | None = None,
    ) -> Iterator[dict]:
        """Like p_sample_loop_progressive, with DDIM steps (see ddim_sample)."""
        yield from samplers.sample_loop_progressive(
            "ddim", self, model, shape, noise=noise, clip_denoised=clip_denoised,
            denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs, device=device,
            progress=progress, noise_fn=noise_fn, eta=eta,
        )

    def p_sample_loop(self, model: Model, shape, *args, **kwargs) -> th.Tensor:
        """
        Generate samples with DDPM ancestral sampling; the arguments (positional or keyword) are
        p_sample_loop_progressive's, as in the original.

        :return: the final [N x C x ...] batch of samples x_0.
        """
        return samplers.final_sample(
            self.p_sample_loop_progressive(model, shape, *args, **kwargs))

    def ddim_sample_loop(self, model: Model, shape, *args, **kwargs) -> th.Tensor:
        """
        Generate samples with DDIM; the arguments (positional or keyword, `eta` included) are
        ddim_sample_loop_progressive's, as in the original.

        :return: the final [N x C x ...] batch of samples x_0.
        """
        return samplers.final_sample(
            self.ddim_sample_loop_progressive(model, shape, *args, **kwargs))

    # The signatures `help()` and `inspect` show: the progressive loops' (same order, same
    # defaults), which the original's p_sample_loop / ddim_sample_loop spell out again.
    p_sample_loop.__signature__ = inspect.signature(p_sample_loop_progressive).replace(
        return_annotation="th.Tensor")
    ddim_sample_loop.__signature__ = inspect.signature(ddim_sample_loop_progressive).replace(
        return_annotation="th.Tensor")

    # ----------------------------------------------------------------------------------------
    # Losses and likelihood

    def _vb_terms_bpd(
        self,
        model: Model,
        x_start: th.Tensor,
        x_t: th.Tensor,
        t: th.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict:
        """
        One term of the variational bound, in bits per dimension (Ho et al., eq. 5):
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the discretized decoder
        NLL -log p(x_0 | x_1) for t == 0.

        :return: a dict with 'output' ([N] bits per dim) and 'pred_xstart'.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        out = self.p_mean_variance(
            model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)

        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)

        # At the first timestep return the decoder NLL, otherwise KL(q(x_{t-1}|x_t,x_0) || p).
        output = th.where((t == 0), decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Model,
        x_start: th.Tensor,
        t: th.Tensor,
        model_kwargs: dict | None = None,
        noise: th.Tensor | None = None,
    ) -> dict:
        """
        Compute training losses for a single timestep per example.

        :param model: the model to evaluate loss on.
        :param x_start: the [N x C x ...] tensor of inputs.
        :param t: a batch of timestep indices, [N].
        :param model_kwargs: extra keyword arguments for the model (e.g. class labels 'y').
        :param noise: if given, the Gaussian noise to diffuse with, like x_start.
        :return: a dict of [N] tensors: 'loss' always; for MSE losses also 'mse', and 'vb' when
                 the variance is learned.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False,
                model_kwargs=model_kwargs,
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                # The bound sums T terms; one uniformly drawn term times T estimates it.
                terms["loss"] = terms["loss"] * self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)

            if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
                B, C = x_t.shape[:2]
                if model_output.shape != (B, C * 2, *x_t.shape[2:]):
                    raise ValueError(
                        f"a learned-variance model must output {2 * C} channels for {C}-channel "
                        f"inputs, got output {tuple(model_output.shape)}"
                    )
                model_output, model_var_values = th.split(model_output, C, dim=1)
                # L_hybrid (Nichol & Dhariwal, sec 3.1): the vb term only trains the variance;
                # the mean is frozen so that L_simple alone drives it.
                frozen_out = th.cat([model_output.detach(), model_var_values], dim=1)
                terms["vb"] = self._vb_terms_bpd(
                    model=lambda *args, r=frozen_out: r,
                    x_start=x_start, x_t=x_t, t=t, clip_denoised=False,
                )["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # L_hybrid = L_simple + lambda L_vlb with lambda = 0.001 (Nichol & Dhariwal,
                    # sec 3.1), and L_vlb ~ T * L_t, so the vb term is (T / 1000) L_t.
                    terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

            if self.model_mean_type == ModelMeanType.PREVIOUS_X:
                target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
            elif self.model_mean_type == ModelMeanType.START_X:
                target = x_start
            elif self.model_mean_type == ModelMeanType.EPSILON:
                target = noise
            else:
                raise ValueError(f"unknown model_mean_type {self.model_mean_type!r}")
            if model_output.shape != target.shape:
                raise ValueError(
                    f"model output {tuple(model_output.shape)} does not match the "
                    f"{self.model_mean_type.name} target {tuple(target.shape)}"
                )
            terms["mse"] = mean_flat((target - model_output) ** 2)
            if "vb" in terms:
                terms["loss"] = terms["mse"] + terms["vb"]
            else:
                terms["loss"] = terms["mse"]
        else:
            raise ValueError(f"unknown loss_type {self.loss_type!r}")
        return terms

    def _prior_bpd(self, x_start: th.Tensor) -> th.Tensor:
        """
        The prior term KL(q(x_T | x_0) || N(0, I)) of the bound, in bits per dim.  It cannot be
        optimized (no parameters), but it is part of the reported likelihood.

        :param x_start: the [N x C x ...] tensor of inputs.
        :return: a batch of [N] KL values (in bits), one per batch element.
        """
        batch_size = x_start.shape[0]
        t = th.tensor([self.num_timesteps - 1] * batch_size, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / math.log(2.0)

    def calc_bpd_loop(
        self,
        model: Model,
        x_start: th.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict:
        """
        Compute the entire variational lower bound in bits per dim, plus related quantities.

        :param x_start: the [N x C x ...] tensor of inputs.
        :return: a dict with 'total_bpd' [N] (the full bound), 'prior_bpd' [N], and per-step
                 [N x T] terms 'vb', 'xstart_mse' and 'mse' (of eps), with column t for step t.
        """
        device = x_start.device
        batch_size = x_start.shape[0]

        vb, xstart_mse, mse = [], [], []
        for t in list(range(self.num_timesteps))[::-1]:
            t_batch = th.tensor([t] * batch_size, device=device)
            noise = th.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t_batch, clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self.predict_eps(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        # Stacked in loop order, i.e. from t = T-1 down to 0, as the original does.
        vb = th.stack(vb, dim=1)
        xstart_mse = th.stack(xstart_mse, dim=1)
        mse = th.stack(mse, dim=1)

        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }


# ------------------------------------------------------------------------------------------------
# Timestep respacing (the original's respace.py, which re-exports these names): run a diffusion
# trained with T steps on a subset of its timesteps. Keeping steps S = {s_1 < ... < s_K} and
# setting beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}} gives a K-step process with the same marginals
# q(x_{s_k} | x_0) (Nichol & Dhariwal 2021, sec 4), so a model trained on T steps samples in K.


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
