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
- iCT (Song & Dhariwal 2023): `ict_num_scales(k, K, s0, s1)`, the curriculum of N over training
  (`ConsistencyDistillation.set_step(k)` moves the loss to it), `lognormal_pair_probs(sigmas)`,
  the discrete lognormal over the pairs, and `PairSampler`, the loop's sampler of those pairs;
  `training_grid(alphas_cumprod, flags)`, the grid a run's student ends on (its sampling levels);
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

from . import logger
from .config import (
    CM_CURRICULA,
    CM_DISTANCES,
    CM_NOISE_DISTS,
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


# iCT's noise distribution (Song & Dhariwal 2023, sec. 3.5): ln sigma ~ N(P_mean, P_std^2), in EDM's
# sigma, i.e. sigma~ = sigma / alpha of the VP grid.
ICT_P_MEAN, ICT_P_STD = -1.1, 2.0


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


def ict_num_scales(step: int, total_steps: int, s0: int, s1: int) -> int:
    """
    iCT's exponential curriculum (Song & Dhariwal 2023, sec. 3.4): N at training iteration `step`
    (0-based) of K = `total_steps`,

        N(k) = min(s0 2^floor(k / K'), s1) + 1,   K' = floor(K / (log2 floor(s1 / s0) + 1)),

    so N - 1 doubles from s0 in log2(s1 / s0) + 1 equal stages of K' steps, then stays at s1.
    """
    return min(s0 * 2 ** (step // ict_stage_length(total_steps, s0, s1)), s1) + 1


def ict_stage_length(total_steps: int, s0: int, s1: int) -> int:
    """K' of `ict_num_scales`, the steps of each stage of the curriculum (the flags checked)."""
    if total_steps <= 0:
        raise ValueError("--cm_curriculum ict needs the run's length K: set --lr_anneal_steps > 0 "
                         f"(got {total_steps})")
    if not 1 <= s0 <= s1:
        raise ValueError(f"--cm_curriculum ict: --cm_steps (s0 = {s0}) must lie in "
                         f"[1, --cm_steps_max (s1 = {s1}, capped to the grid)]")
    stages = math.log2(s1 // s0) + 1
    k_prime = math.floor(total_steps / stages)
    if k_prime < 1:
        raise ValueError(f"--lr_anneal_steps {total_steps} is shorter than the curriculum's "
                         f"{stages:.3g} stages (s0 {s0} to s1 {s1}): K' = floor(K / stages) = 0")
    return k_prime


def curriculum_cap(num_scales_max: int, n_grid: int) -> int:
    """s1 on a grid of `n_grid` points: N = s1 + 1 distinct points at most (`cm_timesteps`)."""
    return min(num_scales_max, n_grid - 1)


def num_scales_at(step: int, n_grid: int, num_scales: int, curriculum: str = "none",
                  num_scales_max: int = _CM.cm_steps_max, total_steps: int = 0) -> int:
    """
    N at training iteration `step`: `num_scales` throughout without a curriculum; iCT's
    `ict_num_scales` with s0 = `num_scales` and s1 = `num_scales_max` capped to the grid.
    """
    if curriculum not in CM_CURRICULA:
        raise ValueError(f"--cm_curriculum {curriculum!r} is unknown; choose one of {CM_CURRICULA}")
    if curriculum == "none":
        return num_scales
    return ict_num_scales(step, total_steps, num_scales, curriculum_cap(num_scales_max, n_grid))


def lognormal_pair_probs(sigmas, p_mean: float = ICT_P_MEAN,
                         p_std: float = ICT_P_STD) -> np.ndarray:
    """
    iCT's discrete lognormal over the pairs (Song & Dhariwal 2023, sec. 3.5): for increasing
    noise levels sigma_0 < ... < sigma_{N-1},

        p(n) ∝ erf(z(sigma_{n+1})) - erf(z(sigma_n)),
        z(sigma) = (ln sigma - P_mean) / (sqrt(2) P_std),

    the probability that ln sigma ~ N(P_mean, P_std^2) falls between the pair's two levels.

    :param sigmas: [N] increasing, positive levels (sigma~ = sigma / alpha of the grid points).
    :return: float64 [N - 1] probabilities of n = 0 .. N - 2, summing to 1.
    """
    sig = np.asarray(sigmas, dtype=np.float64)
    if len(sig) < 2 or not sig[0] > 0 or not np.all(np.diff(sig) > 0):
        raise ValueError(f"the pair levels must be >= 2 positive, increasing values, got {sig}")
    if not p_std > 0:
        raise ValueError(f"the lognormal's P_std must be > 0, got {p_std}")
    cdf = np.array([math.erf((math.log(s) - p_mean) / (math.sqrt(2.0) * p_std)) for s in sig])
    mass = np.diff(cdf)
    if not mass.sum() > 0:
        raise ValueError(f"the levels {sig[0]:.3g}..{sig[-1]:.3g} hold none of the lognormal's "
                         f"mass (P_mean {p_mean}, P_std {p_std})")
    return mass / mass.sum()


def training_grid(alphas_cumprod, flags: dict, step: int | None = None) -> np.ndarray:
    """
    The grid a consistency run's student was last trained on (`cm_timesteps` of its N then:
    --cm_steps, or the curriculum's N at the checkpoint's last step), where K-step sampling takes
    its levels.

    :param flags: the run's flags (its args.json over `cm_defaults()`; an older run without the
        curriculum flags gets their defaults, a fixed N).
    :param step: the checkpoint's step (steps done); None: the run's end, --lr_anneal_steps.
    """
    n_grid = len(alphas_cumprod)
    curriculum = flags.get("cm_curriculum", _CM.cm_curriculum)
    if curriculum == "none":
        n = min(int(flags["cm_steps"]), n_grid)
    else:
        total = int(flags.get("lr_anneal_steps", 0))
        done = total if step is None else step
        n = num_scales_at(max(done - 1, 0), n_grid, int(flags["cm_steps"]), curriculum,
                          int(flags.get("cm_steps_max", _CM.cm_steps_max)), total)
    return cm_timesteps(alphas_cumprod, n, flags["cm_spacing"])


class ConsistencyDistillation:
    """
    The consistency distillation loss of one batch (Song et al. 2023, Algorithm 2 and eq. 7):

        n ~ p(n) on {0, ..., N - 2},   x_{n+1} = q_sample(x_0, t_{n+1}),
        x^_n = one teacher ODE step from t_{n+1} to t_n  (no grad),
        loss = lambda(t_n) d(f_student(x_{n+1}, t_{n+1}), f_target(x^_n, t_n)),

    with f_target under no_grad. With `teacher=None` it is consistency training instead
    (Song et al. 2023, Algorithm 3): x^_n = alpha_n x_0 + sigma_n z with the same x_0 and z as
    x_{n+1}, the one-sample estimate of the ODE step that needs no teacher.

    p(n) is uniform (Song et al. 2023) or iCT's discrete lognormal (`lognormal_pair_probs`); N is
    fixed or follows iCT's curriculum over the training steps (`set_step(k)`, `num_scales_at`).
    Without either the loop's UniformSampler draws n (`pair_sampler()` is None), else the loop
    takes `pair_sampler()`, which draws n from the current N's p(n) with weights 1.

    It stands in for the diffusion in the TrainLoop: `num_timesteps` is N - 1, so the schedule
    samplers (`resample.UniformSampler(cd)`) draw the indices n, and `training_losses` has the
    diffusion's signature and returns per-sample losses under 'loss'.

    :param diffusion: the teacher's GaussianDiffusion / SpacedDiffusion (grid and output format;
        the student has the same format).
    :param teacher: the teacher network, or None for consistency training. Put in eval mode here.
    :param target: the target network f_{theta^-}, an EMA of the student (see `update_target`);
        it starts as a copy of the student.
    :param num_scales: N, the number of discretisation points (`cm_timesteps`); with the
        curriculum s0, the first N being s0 + 1.
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
    :param curriculum: "none" (N = num_scales) or "ict" (`ict_num_scales`).
    :param num_scales_max: the curriculum's s1, capped to the grid (N <= its points).
    :param total_steps: the curriculum's K, the run's training iterations (--lr_anneal_steps).
    :param noise_dist: p(n), "uniform" or "lognormal" (`lognormal_pair_probs`).
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
        curriculum: str = _CM.cm_curriculum,
        num_scales_max: int = _CM.cm_steps_max,
        total_steps: int = 0,
        noise_dist: str = _CM.cm_noise_dist,
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
        if noise_dist not in CM_NOISE_DISTS:
            raise ValueError(f"--cm_noise_dist {noise_dist!r} is unknown; choose one of "
                             f"{CM_NOISE_DISTS}")
        self.diffusion = diffusion
        self.spacing, self.weighting, self.noise_dist = spacing, weighting, noise_dist
        self.curriculum, self.total_steps = curriculum, total_steps
        self.first_scales, self.num_scales_max = num_scales, num_scales_max
        self._grids: dict = {}  # N -> (timesteps, weights, pair probabilities)
        self.num_scales = None
        self.set_step(0)  # self.timesteps, num_timesteps (= N - 1 pair indices), weights, ...
        self.t_min = int(self.timesteps[0])
        if curriculum != "none":
            self._log_curriculum()
        self.solver = solver
        self.step = STEPS[solver]
        self.distance = distance
        self.huber_c = huber_c
        if teacher is not None:
            teacher.eval()  # the teacher is only evaluated: no dropout in its ODE step
            teacher = cfg_model(teacher, cfg_scale)
        elif cfg_scale != 1.0:
            raise ValueError("--teacher_cfg_scale needs a teacher; consistency training has none")
        self.teacher = teacher
        self.target = target
        self.target_fn = ConsistencyFunction(diffusion, target, self.t_min)

    def num_scales_at(self, step: int) -> int:
        """N at training iteration `step` (0-based)."""
        return num_scales_at(step, len(self.diffusion.alphas_cumprod), self.first_scales,
                             self.curriculum, self.num_scales_max, self.total_steps)

    def set_step(self, step: int) -> None:
        """
        Move to the N of training iteration `step`: `timesteps`, `num_timesteps` (N - 1),
        `weights` (lambda per pair) and `pair_probs` (p(n)) become those of that N. A function of
        the step alone, so a resumed run continues the curriculum where it was.
        """
        n = self.num_scales_at(step)
        if n == self.num_scales:
            return
        if n not in self._grids:
            acp = self.diffusion.alphas_cumprod
            timesteps = cm_timesteps(acp, n, self.spacing)
            sig = sigma_tilde(acp)[timesteps]
            weights = np.ones(n - 1) if self.weighting == "uniform" else 1.0 / np.diff(sig)
            probs = (lognormal_pair_probs(sig) if self.noise_dist == "lognormal"
                     else np.full(n - 1, 1.0 / (n - 1)))
            self._grids[n] = (timesteps, weights, probs)
        self.timesteps, self.weights, self.pair_probs = self._grids[n]
        self.num_scales, self.num_timesteps = n, n - 1  # indices n of the pairs (t_n, t_{n+1})
        if int(self.timesteps[0]) != getattr(self, "t_min", int(self.timesteps[0])):
            raise ValueError(f"the grid of N = {n} starts at {int(self.timesteps[0])}, not at "
                             f"t_min = {self.t_min}")

    def _log_curriculum(self) -> None:
        n_grid = len(self.diffusion.alphas_cumprod)
        s1 = curriculum_cap(self.num_scales_max, n_grid)
        if s1 < self.num_scales_max:
            logger.log(f"--cm_steps_max {self.num_scales_max} capped to {s1}: N = s1 + 1 is at "
                       f"most the grid's {n_grid} distinct points")
        k_prime = ict_stage_length(self.total_steps, self.first_scales, s1)
        stages, last = [], None
        for k in range(0, self.total_steps, k_prime):
            n = self.num_scales_at(k)
            if n != last:
                stages.append(f"N {n} from step {k}")
                last = n
        logger.log(f"iCT curriculum over {self.total_steps} steps (K' = {k_prime}): "
                   + ", ".join(stages))

    def pair_sampler(self) -> "PairSampler | None":
        """
        The loop's schedule sampler for this loss: None for a fixed N with uniform pairs (the
        loop's UniformSampler, as before the curriculum), else a `PairSampler`.
        """
        if self.curriculum == "none" and self.noise_dist == "uniform":
            return None
        return PairSampler(self)

    @classmethod
    def from_options(
        cls, diffusion, teacher: nn.Module | None, target: nn.Module, total_steps: int = 0,
        **flags
    ) -> "ConsistencyDistillation":
        """Build from the flags of `ConsistencyConfig` (unknown names are an error; target_ema
        is the caller's, for `update_target`; teacher_path and training_mode the script's) and
        the run's length `total_steps` (--lr_anneal_steps, the curriculum's K)."""
        try:
            opts = ConsistencyConfig(**flags)
        except TypeError as err:
            raise TypeError(f"consistency flags: {err}; known: {sorted(cm_defaults())}") from None
        return cls(
            diffusion, teacher, target,
            num_scales=opts.cm_steps, spacing=opts.cm_spacing, solver=opts.teacher_solver,
            distance=opts.cm_loss, huber_c=opts.cm_huber_c or None,
            weighting=opts.cm_weighting, cfg_scale=opts.teacher_cfg_scale,
            curriculum=opts.cm_curriculum, num_scales_max=opts.cm_steps_max,
            total_steps=total_steps, noise_dist=opts.cm_noise_dist,
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


class PairSampler:
    """
    The TrainLoop's schedule sampler (its `sample(batch_size, device)`) for a consistency loss
    whose N follows a curriculum or whose p(n) is not uniform: n ~ `loss.pair_probs` of the
    loss's current N, from NumPy's global RNG as the loop's UniformSampler (checkpoints restore
    it). The weights are 1: p(n) is part of iCT's objective, E_{n ~ p}[lambda(sigma_n) d], not an
    importance sampler of the uniform one (which `resample.ScheduleSampler`'s weights would undo).
    """

    def __init__(self, loss: ConsistencyDistillation):
        self.loss = loss

    def sample(self, batch_size: int, device) -> tuple[th.Tensor, th.Tensor]:
        p = self.loss.pair_probs
        n = np.random.choice(len(p), size=(batch_size,), p=p)
        return th.from_numpy(n).long().to(device), th.ones(batch_size, device=device)


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
