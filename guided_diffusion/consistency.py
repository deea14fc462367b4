"""Consistency distillation and training of this project's diffusion models (few-step sampling).

A consistency model f(x_t, t) maps every point of one probability-flow ODE trajectory to the
trajectory's clean end (Song et al. 2023, "Consistency Models"). Here f is built around a network
of the teacher's own format (eps, x_0 or learned-sigma output, through the diffusion's own
`p_mean_variance`), so the student starts from the teacher's weights and a released checkpoint can
be distilled as it is. The pieces, each a small function or class:

- `ConsistencyFunction(diffusion, model, t_min)`: f(x_t, t), exactly the identity at t_min;
- `cm_timesteps(alphas_cumprod, num_scales, spacing)`: the N-point discretisation t_0 < ... <
  t_{N-1} of the teacher's grid (t_0 = t_min = the cleanest grid point);
- `ConsistencyDistillation(diffusion, teacher, target, ...)`: the per-sample CD loss (or CT, the
  consistency training loss, with `teacher=None`), with the `training_losses(model, x_start, t,
  model_kwargs)` signature and a `num_timesteps` (= N - 1) that the TrainLoop and its schedule
  samplers expect of a diffusion, so a `CMTrainLoop(TrainLoop)` passes it in the diffusion's place;
- `update_target(target, student, mu)`: the target network's EMA;
- `consistency_sample(fn, shape, timesteps, ...)` and `sample_timesteps(...)`: K-step sampling,
  exactly K network evaluations (Song et al. 2023, Algorithm 1).

Training with the one loop: `CMTrainLoop(TrainLoop)` passes the `ConsistencyDistillation` as
the loop's diffusion (so the loop's `UniformSampler` draws the pair indices); the student is the
loop's model (built from the teacher's flags and weights, label dropout off); after each optimiser
step `update_target(target, master_params, target_ema)` runs beside the usual `--ema_rate` EMAs;
checkpoints add `target{step:06d}.pt` and the RNG states, for a bit-exact resume
(scripts/cm_distill.py). Sampling: `samplers.sample(..., sampler="consistency", steps=K)`; a
run's `args.json` (its `training_mode`) marks its checkpoints as consistency models, and
`check_sampler_fits_model` refuses a sampler that does not fit the model.

Notation. The VP schedule of the grid: alpha_t^2 = alphas_cumprod[t], sigma_t^2 = 1 - alpha_t^2.
In EDM's variables (Karras et al. 2022) x~ = x / alpha and sigma~ = sigma / alpha, the ODE is
dx~/dsigma~ = eps(x, t), and D(x_t, t) is the network's x_0 prediction. Timesteps are integer
indices of the diffusion's grid (of the respaced grid for a SpacedDiffusion), as in `samplers`.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Callable, Iterable, Sequence

import numpy as np
import torch as th
import torch.nn as nn

from . import dist_util, logger
from .checkpoints import CheckpointError, get_blob_logdir, read_state_dict, check_state_dict_fits
from .config import ConsistencyConfig, defaults
from .gaussian_diffusion import _extract_into_tensor
from .guidance import cfg_model
from .nn import mean_flat, update_ema
from .samplers import STEPS, Denoiser, ddim_update, select_timesteps
from .train_util import TrainLoop

DISTANCES = ("pseudo_huber", "l2")
WEIGHTINGS = ("uniform", "inverse_step")
SPACINGS = ("logsnr", "uniform")


# The flags (cm_distill.py's `--cm_steps`, `--teacher_solver`, `--cm_loss`, ...) live in the one
# config home; CMOptions is their name here.
CMOptions = ConsistencyConfig
TRAINING_MODES = ("consistency_distillation", "consistency_training")


def cm_defaults() -> dict:
    """Defaults of the consistency-distillation flags (`config.ConsistencyConfig`), as a dict."""
    return defaults(ConsistencyConfig)


def _sigma_tilde(alphas_cumprod) -> np.ndarray:
    """EDM's noise level of the VP ODE in x / alpha space, sigma~ = sigma / alpha, float64 [T]."""
    acp = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - acp) / acp)


class ConsistencyFunction:
    """
    The consistency function f(x_t, t) around a network of the teacher's format:

        f(x_t, t) = c_skip(t) x_t / alpha_t + (1 - c_skip(t)) D(x_t, t),
        c_skip(t) = sigma~_{t_min} / sigma~_t,

    where D is the network's x_0 prediction (the diffusion's eps/x_0/learned-sigma handling, no
    clipping). At t = t_min, c_skip = 1 and c_out = 1 - c_skip = 0 exactly, so
    f(x, t_min) = x / alpha_{t_min} bit for bit for any finite network output: the boundary
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
        sig = _sigma_tilde(diffusion.alphas_cumprod)
        if not 0 <= t_min < len(sig):
            raise ValueError(f"t_min must be a grid index in [0, {len(sig)}), got {t_min}")
        self.t_min = int(t_min)
        c_skip = sig[self.t_min] / sig
        c_skip[self.t_min] = 1.0  # exact, whatever the rounding of the division
        self.c_skip = c_skip  # float64 [T]; only indices >= t_min are ever evaluated
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
        x_tilde = x / _extract_into_tensor(self.diffusion.sqrt_alphas_cumprod, t, x.shape)
        c_out = 1.0 - _extract_into_tensor(self.c_skip, t, x.shape)
        # Written as x~ - c_out (x~ - D) so that c_out = 0 returns x~ itself, bit for bit.
        return x_tilde - c_out * (x_tilde - d)


def cm_timesteps(alphas_cumprod, num_scales: int, spacing: str = "logsnr") -> np.ndarray:
    """
    The discretisation t_0 < t_1 < ... < t_{N-1} of the teacher's grid that CD walks along
    (Song et al. 2023, sec. 4: N points from eps to T; here grid indices from the cleanest to the
    noisiest), chosen as the ODE samplers choose theirs (`samplers.select_timesteps`).

    :param alphas_cumprod: the grid's [T] cumulative alphas.
    :param num_scales: N, the number of points (>= 2).
    :param spacing: "logsnr" (uniform in log-SNR) or "uniform" (in t).
    :return: int64 [N], increasing; [0] is t_min (grid index 0), [-1] the noisiest grid index.
    """
    if num_scales < 2:
        raise ValueError(f"--cm_steps must be >= 2 (t_min and at least one noisy point), "
                         f"got {num_scales}")
    if num_scales > len(alphas_cumprod):
        raise ValueError(f"--cm_steps {num_scales} exceeds the teacher's grid of "
                         f"{len(alphas_cumprod)} timesteps")
    return select_timesteps(alphas_cumprod, num_scales, spacing)[::-1].copy()


def sample_timesteps(alphas_cumprod, steps: int, spacing: str = "logsnr") -> np.ndarray:
    """
    The K = `steps` levels of K-step consistency sampling, decreasing from the noisiest grid
    index: K + 1 points as the ODE samplers choose them, without the cleanest, where f is the
    identity and an evaluation would be wasted.

    :return: int64 [steps], strictly decreasing grid indices.
    """
    if steps < 1:
        raise ValueError(f"--steps must be >= 1 for consistency sampling, got {steps}")
    return select_timesteps(alphas_cumprod, steps + 1, spacing)[:-1].copy()


def pseudo_huber(a: th.Tensor, b: th.Tensor, c: float | None = None) -> th.Tensor:
    """
    Pseudo-Huber distance per sample (Song & Dhariwal 2023, "Improved Techniques for Training
    Consistency Models", sec. 3.3): d(a, b) = sqrt(||a - b||^2 + c^2) - c, with the norm over
    all non-batch dimensions and c = 0.00054 sqrt(dim) by default. It is ~ ||a - b||^2 / (2c)
    for ||a - b|| << c and ~ ||a - b|| - c for ||a - b|| >> c.

    :param a, b: [N x ...] tensors of one shape.
    :param c: the scale c > 0; None for 0.00054 sqrt(dim), dim = the number of values per sample.
    :return: [N] distances.
    """
    if c is None:
        c = 0.00054 * math.sqrt(a[0].numel())
    sq = ((a - b) ** 2).flatten(1).sum(dim=1)
    # sq / (sqrt(sq + c^2) + c) is the same number without the cancellation of the
    # difference form for ||a - b|| << c (where the loss spends most of training).
    return sq / (th.sqrt(sq + c * c) + c)


class ConsistencyDistillation:
    """
    The consistency distillation loss of one batch (Song et al. 2023, Algorithm 2 and eq. 7):

        n ~ U{0, ..., N - 2},   x_{n+1} = q_sample(x_0, t_{n+1}),
        x^_n = one teacher ODE step from t_{n+1} to t_n  (no grad),
        loss = lambda(t_n) d(f_student(x_{n+1}, t_{n+1}), f_target(x^_n, t_n)),

    with f_target under no_grad. With `teacher=None` it is consistency training instead
    (Song et al. 2023, Algorithm 3): x^_n = alpha_n x_0 + sigma_n z with the same x_0 and z as
    x_{n+1}, the one-sample estimate of the ODE step that needs no teacher.

    It stands in for the diffusion in the TrainLoop: `num_timesteps` is N - 1, so the schedule
    samplers (`resample.UniformSampler(cd)`) draw the indices n, and `training_losses` has the
    diffusion's signature and returns per-sample losses under 'loss'.

    :param diffusion: the teacher's GaussianDiffusion / SpacedDiffusion (grid and output format;
        the student has the same format).
    :param teacher: the teacher network, or None for consistency training. Put in eval mode here.
    :param target: the target network f_{theta^-}, an EMA of the student (see `update_target`);
        it starts as a copy of the student.
    :param num_scales: N, the number of discretisation points (`cm_timesteps`).
    :param spacing: "logsnr" or "uniform", how the N points are picked from the grid.
    :param solver: the teacher's ODE step, a key of `samplers.STEPS`: "heun" (Song et al. 2023's
        choice, 2 evaluations) or "ddim" (1 evaluation); the multistep solvers take their first
        step, which is DDIM.
    :param distance: "pseudo_huber" (Song & Dhariwal 2023) or "l2" (mean squared error).
    :param huber_c: pseudo-Huber's c; None for 0.00054 sqrt(dim).
    :param weighting: lambda(t_n): "uniform" (1, Song et al. 2023) or "inverse_step"
        (1 / (sigma~_{n+1} - sigma~_n), Song & Dhariwal 2023).
    :param cfg_scale: classifier-free guidance weight of the teacher (1 = plain); the student then
        distils the guided ODE of the labels in model_kwargs['y'].
    """

    def __init__(
        self,
        diffusion,
        teacher: nn.Module | None,
        target: nn.Module,
        *,
        num_scales: int = 40,
        spacing: str = "logsnr",
        solver: str = "heun",
        distance: str = "pseudo_huber",
        huber_c: float | None = None,
        weighting: str = "uniform",
        cfg_scale: float = 1.0,
    ):
        # The SDE step adds fresh noise: CD needs the ODE's deterministic neighbour.
        ode_steps = sorted(k for k in STEPS if not k.endswith("-sde"))
        if solver not in ode_steps:
            raise ValueError(f"--teacher_solver {solver!r} is not an ODE step; choose one of "
                             f"{ode_steps}")
        if distance not in DISTANCES:
            raise ValueError(f"--cm_loss {distance!r} is unknown; choose one of {DISTANCES}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"--cm_weighting {weighting!r} is unknown; choose one of {WEIGHTINGS}")
        if spacing not in SPACINGS:
            raise ValueError(f"--cm_spacing {spacing!r} is unknown; choose one of {SPACINGS}")
        if huber_c is not None and not huber_c > 0:
            raise ValueError(f"--cm_huber_c must be > 0 (or 0 for the default), got {huber_c}")
        self.diffusion = diffusion
        self.timesteps = cm_timesteps(diffusion.alphas_cumprod, num_scales, spacing)
        self.num_timesteps = num_scales - 1  # indices n of the pairs (t_n, t_{n+1})
        self.t_min = int(self.timesteps[0])
        self.solver = solver
        self.step = STEPS[solver]
        self.distance = distance
        self.huber_c = huber_c
        sig = _sigma_tilde(diffusion.alphas_cumprod)[self.timesteps]
        self.weights = np.ones(self.num_timesteps) if weighting == "uniform" else 1.0 / np.diff(sig)
        if teacher is not None:
            teacher.eval()  # the teacher is only evaluated: no dropout in its ODE step
            teacher = cfg_model(teacher, cfg_scale)
        elif cfg_scale != 1.0:
            raise ValueError("--teacher_cfg_scale needs a teacher; consistency training has none")
        self.teacher = teacher
        self.target = target
        self.target_fn = ConsistencyFunction(diffusion, target, self.t_min)

    @classmethod
    def from_options(
        cls, diffusion, teacher: nn.Module | None, target: nn.Module, **flags
    ) -> "ConsistencyDistillation":
        """Build from the flags of `ConsistencyConfig` (unknown names are an error; target_ema
        is the caller's, for `update_target`; teacher_path and training_mode the script's)."""
        try:
            opts = ConsistencyConfig(**flags)
        except TypeError as err:
            raise TypeError(f"consistency flags: {err}; known: {sorted(cm_defaults())}") from None
        return cls(
            diffusion, teacher, target,
            num_scales=opts.cm_steps, spacing=opts.cm_spacing, solver=opts.teacher_solver,
            distance=opts.cm_loss, huber_c=opts.cm_huber_c or None,
            weighting=opts.cm_weighting, cfg_scale=opts.teacher_cfg_scale,
        )

    def _pair(self, x_start: th.Tensor, n: th.Tensor, noise: th.Tensor, model_kwargs: dict):
        """x_{n+1} and x^_n, the sample and its neighbour one step nearer the clean end."""
        t_next = th.as_tensor(self.timesteps, device=n.device)[n + 1]
        x_next = self.diffusion.q_sample(x_start, t_next, noise=noise)
        if self.teacher is None:
            t_n = th.as_tensor(self.timesteps, device=n.device)[n]
            return x_next, self.diffusion.q_sample(x_start, t_n, noise=noise)
        if self.solver != "heun":
            # One step of every multistep solver from a single prediction is the DDIM step
            # (DPM-Solver++(1) = PLMS's pseudo-Euler = DDIM), and `ddim_update` takes one
            # timestep per sample: the whole batch in one teacher pass.
            t_n = th.as_tensor(self.timesteps, device=n.device)[n]
            den = Denoiser(self.diffusion, self.teacher, clip_denoised=False,
                           model_kwargs=model_kwargs)
            return x_next, ddim_update(den, x_next, t_next, t_n, den(x_next, t_next))
        x_hat = th.empty_like(x_next)
        batch = x_start.shape[0]
        # Heun's step takes one int timestep per call, so the batch goes through it one distinct
        # n at a time: at most N - 1 pairs of teacher passes of sub-batches.
        for k in th.unique(n).tolist():
            idx = (n == k).nonzero(as_tuple=True)[0]
            kwargs = {key: v[idx] if th.is_tensor(v) and v.shape[:1] == (batch,) else v
                      for key, v in model_kwargs.items()}
            den = Denoiser(self.diffusion, self.teacher, clip_denoised=False, model_kwargs=kwargs)
            t_from, t_to = int(self.timesteps[k + 1]), int(self.timesteps[k])
            x = x_next[idx]
            x_hat[idx] = self.step(den, x, t_from, t_to, [den(x, t_from)])
        return x_next, x_hat

    def training_losses(
        self,
        model: nn.Module,
        x_start: th.Tensor,
        t: th.Tensor,
        model_kwargs: dict | None = None,
        noise: th.Tensor | None = None,
    ) -> dict:
        """
        :param model: the student network (possibly DDP-wrapped), same format as the teacher.
        :param x_start: the [N x C x ...] data batch x_0.
        :param t: [N] pair indices n in [0, num_timesteps): the loss compares t_{n+1} with t_n.
        :param model_kwargs: extra model inputs, e.g. {'y': labels}.
        :param noise: optional [N x C x ...] Gaussian noise of x_{n+1}.
        :return: a dict of [N] tensors: 'loss' (lambda(t_n) d) and 'distance' (d).
        """
        model_kwargs = model_kwargs or {}
        n = t.long()
        if n.numel() and not (0 <= int(n.min()) and int(n.max()) < self.num_timesteps):
            raise ValueError(f"pair indices t must lie in [0, {self.num_timesteps}), got "
                             f"[{int(n.min())}, {int(n.max())}]")
        if noise is None:
            noise = th.randn_like(x_start)
        with th.no_grad():
            x_next, x_hat = self._pair(x_start, n, noise, model_kwargs)
        t_all = th.as_tensor(self.timesteps, device=n.device)
        student = ConsistencyFunction(self.diffusion, model, self.t_min)
        # The target sees the student's dropout masks (as in Song et al.'s code): fork the RNG
        # around the student so that the target's forward pass draws the same numbers;
        # otherwise two independent dropout draws add noise to the loss that never vanishes.
        devices = [x_start.device.index] if x_start.device.type == "cuda" else []
        with th.random.fork_rng(devices=devices):
            pred = student(x_next, t_all[n + 1], model_kwargs)
        self.target.train(model.training)
        with th.no_grad():
            target = self.target_fn(x_hat, t_all[n], model_kwargs)
        if self.distance == "pseudo_huber":
            dist = pseudo_huber(pred, target, self.huber_c)
        else:
            dist = mean_flat((pred - target) ** 2)
        weight = th.as_tensor(self.weights, device=n.device, dtype=dist.dtype)[n]
        return {"loss": weight * dist, "distance": dist}


def update_target(
    target: nn.Module | Iterable[th.Tensor], student: nn.Module | Iterable[th.Tensor], mu: float
) -> None:
    """
    The target network's EMA after each optimiser step (Song et al. 2023, Algorithm 2):
    theta^- <- mu theta^- + (1 - mu) theta. mu = 0 makes the target the student itself
    (Song & Dhariwal 2023). Separate from the TrainLoop's `--ema_rate` EMAs, which are for
    evaluation.

    :param target, student: modules or matching iterables of parameters (e.g. the TrainLoop's
        fp32 master parameters).
    :param mu: the decay in [0, 1].
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"--target_ema must lie in [0, 1], got {mu}")
    t_params = list(target.parameters() if isinstance(target, nn.Module) else target)
    s_params = list(student.parameters() if isinstance(student, nn.Module) else student)
    if len(t_params) != len(s_params):
        raise ValueError(f"target has {len(t_params)} parameters, student {len(s_params)}")
    with th.no_grad():
        update_ema(t_params, s_params, rate=mu)


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
    sig = _sigma_tilde(acp)
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


# ------------------------------------------------------------------------------------------------
# Training with the one loop


def _numpy_rng_state() -> dict:
    """numpy's global RNG state as plain tensors and ints (`torch.load(weights_only=True)` reads
    it; the schedule sampler draws the pair indices n from it)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(name=name, keys=th.from_numpy(keys.astype(np.int64)), pos=int(pos),
                has_gauss=int(has_gauss), gauss=float(gauss))


def _set_numpy_rng_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["gauss"]))


class CMTrainLoop(TrainLoop):
    """
    Consistency distillation (or training) with the one training loop: the loop's model is the
    student (built from the teacher's flags, starting from its weights), and the loop's
    "diffusion" is the `ConsistencyDistillation` loss, whose `num_timesteps` = N - 1 pair indices
    the uniform schedule sampler draws. After each optimiser step the target network follows the
    student by `update_target` (beside the `--ema_rate` EMAs, which are for sampling).

    Checkpoints: the TrainLoop's `model/ema_*/opt{step:06d}.pt` (the student and its EMAs load in
    the sampling scripts with `--model_path`), plus `target{step:06d}.pt`, the target's float32
    state_dict, written before `model*.pt` (which marks a checkpoint complete). The opt file's
    resume state adds the global torch and numpy RNG states, so that a resumed run draws the same
    noise, pair indices and dropout masks as an uninterrupted one (given the same batches).

    :param model: the student, already holding the teacher's weights (on the device).
    :param diffusion: the teacher's diffusion (grid and output format).
    :param teacher: the teacher network, or None for consistency training.
    :param cm: the consistency flags.
    :param kwargs: the TrainLoop's other arguments (data, batch_size, lr, ema_rate, ...).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        diffusion,
        teacher: nn.Module | None,
        cm: ConsistencyConfig,
        **kwargs,
    ):
        if cm.training_mode not in TRAINING_MODES:
            raise ValueError(f"--training_mode {cm.training_mode!r} is unknown; choose one of "
                             f"{TRAINING_MODES}")
        if (teacher is None) != (cm.training_mode == "consistency_training"):
            raise ValueError(f"--training_mode {cm.training_mode} "
                             + ("needs a teacher" if teacher is None else "takes no teacher"))
        update_target([], [], cm.target_ema)  # checks the rate before any work
        # The student learns f for the labels it is given (the teacher's guided ODE when
        # --teacher_cfg_scale != 1): no label dropout, or it would be asked to map the null
        # label's inputs onto the targets of real labels.
        if getattr(model, "class_dropout_prob", 0.0):
            model.class_dropout_prob = 0.0
        # Taken before TrainLoop converts the model to fp16: the target stays float32.
        self.target = copy.deepcopy(model).requires_grad_(False)
        self.target_ema = cm.target_ema
        cd = ConsistencyDistillation.from_options(
            diffusion, teacher, self.target,
            **{k: v for k, v in vars(cm).items() if k not in ("teacher_path", "training_mode")},
        )
        self.cm = cm
        # The TrainLoop's default schedule sampler, UniformSampler(cd), draws the pair indices.
        super().__init__(model=model, diffusion=cd, **kwargs)
        if self.resume_path:
            self._load_target()  # else it starts as the copy of the student (= the teacher)

    def _target_path(self, step: int) -> str:
        return os.path.join(os.path.dirname(self.resume_path), f"target{step:06d}.pt")

    def _load_target(self) -> None:
        path = self._target_path(self.resume_step)
        exists = os.path.exists(path) if dist_util.get_rank() == 0 else None
        if not dist_util.broadcast_object(exists):
            raise CheckpointError(f"--resume_checkpoint {self.resume_path!r}: no target network "
                                  f"{path!r} beside it (written by cm_distill.py with every "
                                  "checkpoint); a consistency run cannot resume without it")
        logger.log(f"loading target network from checkpoint: {path}...")
        state_dict = read_state_dict(path)
        check_state_dict_fits(self.target, state_dict, source=f"{path!r} (target)")
        self.target.load_state_dict(state_dict)

    def run_step(self, batch: th.Tensor, cond: dict) -> None:
        self._anneal_lr()
        self.forward_backward(batch, cond)
        if self.mp_trainer.optimize(self.opt):
            self._update_ema()
            update_target(self.target, self.mp_trainer.master_params, self.target_ema)
        self.log_step()

    def resume_state(self) -> dict:
        return dict(super().resume_state(), cm_rng_torch=th.get_rng_state(),
                    cm_rng_numpy=_numpy_rng_state())

    def load_resume_state(self, state: dict) -> None:
        super().load_resume_state(state)
        if "cm_rng_torch" in state:
            th.set_rng_state(state["cm_rng_torch"].cpu())
            _set_numpy_rng_state(state["cm_rng_numpy"])
            rank = dist_util.get_rank()
            if rank:  # rank 0's saved state, then a distinct stream per other rank
                seed = int(th.randint(2**62, (1,))) + rank
                th.manual_seed(seed)
                np.random.seed(seed % 2**32)

    def save(self) -> None:
        step = self.step + self.resume_step
        # Before super().save(): its model*.pt, written last, marks the checkpoint complete.
        self._save_file(f"target{step:06d}.pt", {
            k: (v.float() if v.is_floating_point() else v)
            for k, v in self.target.state_dict().items()})
        super().save()

    def train_flags(self) -> dict:
        return dict(super().train_flags(), **vars(self.cm))


# ------------------------------------------------------------------------------------------------
# Which checkpoints are consistency models


def is_consistency_checkpoint(model_path: str) -> bool | None:
    """
    Whether `model_path` was written by cm_distill.py, read from the `args.json` beside it (its
    `training_mode`). :return: True / False, or None when there is no readable args.json.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "args.json")
    try:
        with open(path) as f:
            flags = json.load(f)
    except (OSError, ValueError):
        return None
    return flags.get("training_mode") in TRAINING_MODES


def check_sampler_fits_model(
    sampler: str, model_path: str, consistency_model: str = "auto"
) -> None:
    """
    Refuse `--sampler consistency` on a diffusion model and the diffusion samplers on a
    consistency model: the student's network no longer predicts the diffusion's x_0 (only
    f = c_skip x + c_out D does), and a diffusion model's one-step f is a blur.

    :param consistency_model: "auto" (the args.json beside `model_path`; a file without one is
        taken as a diffusion model), "yes" or "no" (force, e.g. a converted checkpoint).
    :raises ValueError: naming the flags on a mismatch.
    """
    if consistency_model not in ("auto", "yes", "no"):
        raise ValueError(f"--consistency_model must be auto, yes or no, got {consistency_model!r}")
    if consistency_model == "auto":
        is_cm = bool(is_consistency_checkpoint(model_path)) if model_path else False
    else:
        is_cm = consistency_model == "yes"
    wants_cm = sampler == "consistency"
    if wants_cm and not is_cm:
        raise ValueError(f"--sampler consistency needs a consistency model (cm_distill.py), but "
                         f"--model_path {model_path!r} has no args.json with a consistency "
                         "training_mode beside it; pass --consistency_model yes to force")
    if is_cm and not wants_cm:
        raise ValueError(f"--model_path {model_path!r} is a consistency model (args.json beside "
                         "it): sample it with --sampler consistency --steps K, or pass "
                         "--consistency_model no to force the diffusion samplers")
