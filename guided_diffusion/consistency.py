"""Consistency distillation and training of this project's diffusion models: the loss.

A consistency model f(x_t, t) maps every point of one probability-flow ODE trajectory to the
trajectory's clean end (Song et al. 2023, "Consistency Models"). Here f is built around a network
of the teacher's own format (eps, x_0 or learned-sigma output, through the diffusion's own
`p_mean_variance`), so the student starts from the teacher's weights and a released checkpoint can
be distilled as it is. The pieces, each a small function or class:

- `ConsistencyFunction(diffusion, model, t_min)`: f(x_t, t), exactly the identity at t_min
  (in `samplers`, beside the K-step sampler that evaluates it; re-exported here);
- `cm_timesteps(alphas_cumprod, num_scales, spacing)`: the N-point discretisation t_0 < ... <
  t_{N-1} of the teacher's grid (t_0 = t_min = the cleanest grid point);
- `ConsistencyDistillation(diffusion, teacher, target, ...)`: the per-sample CD loss (or CT, the
  consistency training loss, with `teacher=None`), with the `training_losses(model, x_start, t,
  model_kwargs)` signature and a `num_timesteps` (= N - 1) that the TrainLoop and its schedule
  samplers expect of a diffusion, so a `CMTrainLoop(TrainLoop)` passes it in the diffusion's place;
- `update_target(target, student, mu)`: the target network's EMA;
- `consistency_sample(fn, shape, timesteps, ...)` and `sample_timesteps(...)`: K-step sampling,
  exactly K network evaluations (Song et al. 2023, Algorithm 1), in `samplers`.

Training with the one loop (`cm_train.CMTrainLoop(TrainLoop)`, a job above this module) passes
the `ConsistencyDistillation` as the loop's diffusion (so the loop's `UniformSampler` draws the pair indices); the student is the
loop's model (built from the teacher's flags and weights, label dropout off); after each optimiser
step (its `after_update` hook) `update_target(target, master_params, target_ema)` runs beside the
usual `--ema_rate` EMAs; checkpoints add `target{step:06d}.pt` (scripts/cm_distill.py).
Sampling: `samplers.sample(..., sampler="consistency", steps=K)`; a run's `args.json` (its
`training_mode`) marks its checkpoints as consistency models, and
`checkpoints.check_sampler_fits_model` refuses a sampler that does not fit the model.

Notation. The VP schedule of the grid: alpha_t^2 = alphas_cumprod[t], sigma_t^2 = 1 - alpha_t^2.
In EDM's variables (Karras et al. 2022) x~ = x / alpha and sigma~ = sigma / alpha, the ODE is
dx~/dsigma~ = eps(x, t), and D(x_t, t) is the network's x_0 prediction. Timesteps are integer
indices of the diffusion's grid (of the respaced grid for a SpacedDiffusion), as in `samplers`.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch as th
import torch.nn as nn

from .config import (
    CM_DISTANCES,
    CM_TRAINING_MODES,
    CM_WEIGHTINGS,
    ODE_SAMPLERS,
    CM_SPACINGS,
    ConsistencyConfig,
    defaults,
)
from .guidance import cfg_model
from .losses import mean_flat
from .nn import update_ema
from .samplers import (  # noqa: F401 -- the consistency function and its sampler, re-exported
    STEPS,
    ConsistencyFunction,
    cm_timesteps,
    Denoiser,
    consistency_sample,
    ddim_update,
    sample_timesteps,
    select_timesteps,
    sigma_tilde,
)

# The flags (cm_distill.py's `--cm_steps`, `--teacher_solver`, `--cm_loss`, ...) and their allowed
# values live in the one config home; these are their names here.
CMOptions = ConsistencyConfig
TRAINING_MODES, DISTANCES, WEIGHTINGS = CM_TRAINING_MODES, CM_DISTANCES, CM_WEIGHTINGS
_CM = ConsistencyConfig()  # the flags' defaults: the library's defaults too


def cm_defaults() -> dict:
    """Defaults of the consistency-distillation flags (`config.ConsistencyConfig`), as a dict."""
    return defaults(ConsistencyConfig)


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
    :param spacing: a `select_timesteps` spacing ("karras", "logsnr", "uniform") of the N points.
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
        num_scales: int = _CM.cm_steps,
        spacing: str = _CM.cm_spacing,
        solver: str = _CM.teacher_solver,
        distance: str = _CM.cm_loss,
        huber_c: float | None = None,
        weighting: str = _CM.cm_weighting,
        cfg_scale: float = _CM.teacher_cfg_scale,
    ):
        # The stochastic steps (DDPM, the SDE) add fresh noise: CD needs the ODE's
        # deterministic neighbour. The flags are checked by config when parsed; these checks
        # guard the library call.
        if solver not in ODE_SAMPLERS:
            raise ValueError(f"--teacher_solver {solver!r} is not an ODE step; choose one of "
                             f"{list(ODE_SAMPLERS)}")
        if distance not in DISTANCES:
            raise ValueError(f"--cm_loss {distance!r} is unknown; choose one of {DISTANCES}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"--cm_weighting {weighting!r} is unknown; choose one of {WEIGHTINGS}")
        if spacing not in CM_SPACINGS:
            raise ValueError(f"--cm_spacing {spacing!r} is unknown; choose one of {CM_SPACINGS}")
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
        sig = sigma_tilde(diffusion.alphas_cumprod)[self.timesteps]
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
        timesteps = th.as_tensor(self.timesteps, device=n.device)
        t_next, t_n = timesteps[n + 1], timesteps[n]
        x_next = self.diffusion.q_sample(x_start, t_next, noise=noise)
        if self.teacher is None:
            return x_next, self.diffusion.q_sample(x_start, t_n, noise=noise)
        den = Denoiser(self.diffusion, self.teacher, clip_denoised=False, model_kwargs=model_kwargs)
        pred = den(x_next, t_next)
        if self.solver != "heun":
            # One step of every multistep solver from a single prediction is the DDIM step
            # (DPM-Solver++(1) = UniP-1 = PLMS's pseudo-Euler = DDIM), and `ddim_update` takes one
            # timestep per sample: the whole batch in one teacher pass.
            return x_next, ddim_update(den, x_next, t_next, t_n, pred)
        # Heun's step with one (t_{n+1}, t_n) per sample: two teacher passes of the whole batch.
        return x_next, self.step(den, x_next, t_next, t_n, [pred])

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
