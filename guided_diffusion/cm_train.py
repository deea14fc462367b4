"""Consistency distillation (or training) as a mode of the one training loop.

`CMTrainLoop(TrainLoop)` changes two things and nothing else (Song et al. 2023, Algorithm 2): the
loss (the loop's "diffusion" is `consistency.ConsistencyDistillation`) and one more update after
each optimiser step (the target network's EMA, in the `after_update` hook). With iCT's curriculum
each step first moves the loss to its N (`run_step`, then the TrainLoop's own step).
scripts/cm_distill.py runs it through `cli.train_diffusion`, the entry point of every training
script.
"""

from __future__ import annotations

import copy
import os

import torch.nn as nn

from . import dist_util, logger
from .checkpoints import check_state_dict_fits, checkpoint_name, companion_path, read_state_dict
from .config import CM_TRAINING_MODES, ConsistencyConfig
from .consistency import ConsistencyDistillation, update_target
from .errors import CheckpointError
from .train_util import TrainLoop


class CMTrainLoop(TrainLoop):
    """
    Consistency distillation (or training) with the one training loop: the loop's model is the
    student (built from the teacher's flags, starting from its weights), and the loop's
    "diffusion" is the `ConsistencyDistillation` loss, whose `num_timesteps` = N - 1 pair indices
    the uniform schedule sampler draws (or, with iCT's curriculum or lognormal pairs, the loss's
    own `PairSampler`; each step then starts by moving the loss to that step's N, a function of
    the step alone, so a resume continues the curriculum and its draws bit for bit). After each
    optimiser step the target network follows the student by `update_target` (the loop's
    `after_update` hook, beside the `--ema_rate` EMAs, which are for sampling), so the NaN guard,
    gradient clipping and the per-rank RNG states of a bit-exact resume are the TrainLoop's own.

    Checkpoints: the TrainLoop's `model/ema_*/opt{step:06d}.pt` (the student and its EMAs load in
    the sampling scripts with `--model_path`), plus `target{step:06d}.pt`, the target's float32
    state_dict, written before `model*.pt` (which marks a checkpoint complete).

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
        if cm.training_mode not in CM_TRAINING_MODES:
            raise ValueError(f"--training_mode {cm.training_mode!r} is unknown; choose one of "
                             f"{CM_TRAINING_MODES}")
        if (teacher is None) != (cm.training_mode == "consistency_training"):
            raise ValueError(f"--training_mode {cm.training_mode} "
                             + ("needs a teacher" if teacher is None else "takes no teacher"))
        update_target([], [], cm.target_ema)  # checks the rate before any work
        # The student learns f for the labels it is given (the teacher's guided ODE when
        # --teacher_cfg_scale != 1): no label dropout, or it would be asked to map the null
        # label's inputs onto the targets of real labels.
        if getattr(model, "class_dropout_prob", 0.0):
            model.class_dropout_prob = 0.0
        # The student's dropout is --cm_dropout (Song et al. 2023 distil with 0), not the
        # teacher's --dropout that its flags carry; the target copies it (and the student's masks).
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = cm.cm_dropout
        # Taken before TrainLoop converts the model to fp16: the target stays float32.
        self.target = copy.deepcopy(model).requires_grad_(False)
        self.target_ema = cm.target_ema
        cd = ConsistencyDistillation.from_options(
            diffusion, teacher, self.target, total_steps=kwargs.get("lr_anneal_steps", 0),
            **{k: v for k, v in vars(cm).items() if k not in ("teacher_path", "training_mode")},
        )
        self.cm = cm
        # The TrainLoop's default schedule sampler, UniformSampler(cd), draws the pair indices,
        # unless the loss draws its own (a curriculum's N, lognormal pairs).
        sampler = cd.pair_sampler()
        if sampler is not None:
            if kwargs.get("schedule_sampler") is not None:
                raise ValueError("--cm_curriculum / --cm_noise_dist draw the pairs themselves: "
                                 "no other schedule sampler")
            kwargs["schedule_sampler"] = sampler
        super().__init__(model=model, diffusion=cd, **kwargs)
        if self.resume_path:
            self._load_target()  # else it starts as the copy of the student (= the teacher)

    def _load_target(self) -> None:
        path = companion_path(self.resume_path, "target", self.resume_step)
        exists = os.path.exists(path) if dist_util.get_rank() == 0 else None
        if not dist_util.broadcast_object(exists):
            raise CheckpointError(f"--resume_checkpoint {self.resume_path!r}: no target network "
                                  f"{path!r} beside it (written by cm_distill.py with every "
                                  "checkpoint); a consistency run cannot resume without it")
        logger.log(f"loading target network from checkpoint: {path}...")
        state_dict = read_state_dict(path)
        check_state_dict_fits(self.target, state_dict, source=f"{path!r} (target)")
        self.target.load_state_dict(state_dict)

    def run_step(self, batch, cond) -> None:
        """The TrainLoop's step at this step's N (the curriculum's; fixed without one)."""
        self.diffusion.set_step(self.step + self.resume_step)
        if self.cm.cm_curriculum != "none":
            logger.logkv("cm_scales", self.diffusion.num_scales)
        super().run_step(batch, cond)

    def after_update(self) -> None:
        """The target network follows the student after each optimiser step that was taken."""
        update_target(self.target, self.mp_trainer.master_params, self.target_ema)

    def save(self) -> None:
        step = self.step + self.resume_step
        # Before super().save(): its model*.pt, written last, marks the checkpoint complete.
        self._save_file(checkpoint_name("target", step), {
            k: (v.float() if v.is_floating_point() else v)
            for k, v in self.target.state_dict().items()})
        super().save()

    def train_flags(self) -> dict:
        return dict(super().train_flags(), **vars(self.cm))
