"""The diffusion training loop: microbatches, mixed precision, EMA, DDP, logging, checkpoints.

Checkpoints keep the original's names and formats, in the log directory (`logger.get_dir()`):

* `model{step:06d}.pt`: the float32 state_dict of the trained weights (the original's format, also
  what its released checkpoints are);
* `ema_{rate}_{step:06d}.pt`: the same for each EMA rate;
* `opt{step:06d}.pt`: the optimizer's state_dict plus a "resume" entry, `TrainLoop.resume_state()`
  (step, loss scale, precision, train flags), all plain tensors and Python values, so
  `torch.load(weights_only=True)` reads it.

`step` counts the training steps done: `model000006.pt` holds the weights after 6 steps, and
resuming from it continues with the 7th (the original named the file after the index of the last
step and then repeated that step on resume). Files are written atomically, `model*.pt` last, so
the newest `model*.pt` always has its companions; `resume_checkpoint="auto"` resumes from it.
Reading, checking, finding and writing them is `checkpoints`' job; its public names that the
original kept here (`find_resume_checkpoint`, `parse_resume_step_from_filename`, ...) still import
from this module.

Resume is bit-exact: opt*.pt's "resume" entry also holds every rank's RNG states (torch CPU and
CUDA, NumPy, Python `random`), every data stream's position (`image_datasets.ResumableLoader`),
the schedule sampler's loss history and the count of skipped steps, so a run killed at any moment
and restarted with `resume_checkpoint="auto"` ends with the weights, EMAs and optimizer state of an
uninterrupted run (same number of ranks).

A step whose loss or gradient is not finite is skipped (no optimizer or EMA update) and counted;
`max_bad_steps` of them in a row stop training with `TrainingStopped`. A collective that fails (a
peer died, or did not answer within the process group's timeout, `--dist_timeout`) raises
`PeerLostError` on every surviving rank instead of waiting forever.

One loop serves every training mode: a mode is a subclass that overrides `microbatch_loss` (and,
if it has more to restore, `resume_state` / `load_resume_state`), as `ClassifierTrainLoop` does.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import random
import time
from typing import Iterator

import blobfile as bf
import numpy as np
import torch as th
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from torch.optim import AdamW

from . import dist_util, logger, watchdog
from .checkpoints import (  # noqa: F401 -- the original's public names, re-exported
    AUTO_RESUME,
    RESUME_KEY,
    atomic_write,
    check_state_dict_fits,
    checkpoint_name,
    find_ema_checkpoint,
    check_finite,
    find_resume_checkpoint,
    get_blob_logdir,
    load_file,
    load_model_checkpoint,
    opt_checkpoint_path,
    parse_resume_step_from_filename,
    read_state_dict,
    resolve_resume_checkpoint,
    save_atomic,
    save_run_flags,
)
from .config import TrainingConfig
from .costs import training_cost  # noqa: F401 -- re-exported (--dry_run's numbers)
from .errors import PeerLostError, ScriptError, TrainingStopped  # noqa: F401 -- re-exported
from .fp16_util import INITIAL_LOG_LOSS_SCALE, MixedPrecisionTrainer, _norm
from .image_util import image_grid, to_uint8_nhwc
from .nn import update_ema
from .plots import plot_losses
from .resample import LossAwareSampler, UniformSampler
from .rng import get_rng_state, set_rng_state
from .samplers import sample

_DEFAULTS = TrainingConfig()  # the flags' defaults are the loop's defaults: written once


class TrainLoop:
    """
    Train `model` on the diffusion loss with the original's hyperparameters.

    :param model: the network (on `dist_util.dev()`).
    :param diffusion: a GaussianDiffusion (`training_losses(model, x_start, t, model_kwargs)`).
    :param data: an iterator of (images [N x C x H x W], kwargs dict) batches, e.g. `load_data`.
    :param batch_size: images per rank per step (the global batch is batch_size * world size).
    :param microbatch: split each batch into pieces of this size for memory (-1 / 0: no split);
        gradients are accumulated so the result equals one pass over the whole batch.
    :param lr: AdamW learning rate.
    :param ema_rate: one EMA decay or a comma-separated list ("0.9999,0.99"); "" keeps no EMA.
    :param log_interval: write the logged values every this many steps.
    :param save_interval: write checkpoints every this many steps (and at the end).
    :param resume_checkpoint: "" (fresh start), a `model*.pt` path (its `opt` and `ema_` files are
        looked up beside it), or "auto" (the newest `model*.pt` in the log directory, if any).
    :param use_fp16: fp16 weights with loss scaling (see `MixedPrecisionTrainer`).
    :param fp16_scale_growth: the loss scale's log2 grows by this after every good fp16 step.
    :param schedule_sampler: draws timesteps and importance weights (default: uniform).
    :param weight_decay: AdamW weight decay.
    :param lr_anneal_steps: if > 0, decay the lr linearly to 0 and stop after this many steps.
    :param use_bf16: bf16 autocast for the forward pass (exclusive with use_fp16).
    :param grad_clip: clip the global gradient norm to this (0: off, as the original).
    :param lr_warmup_steps: raise the lr linearly from lr / n to lr over the first n steps (0: off).
    :param max_bad_steps: stop after this many non-finite steps in a row (0: never stop).
    :param init_checkpoint: a model state_dict (e.g. a released checkpoint) to start from at step
        0 with a fresh optimizer (fine-tuning); ignored when a resume checkpoint is found.
    :param sample_interval: write `samples_{step:06d}.png`, a grid from the current weights, every
        this many steps (0: off), on rank 0, without touching the training RNGs.
    :param fused_adam: PyTorch's fused AdamW kernel (the fast path's `--fused_adam`; other
        rounding than the original's AdamW, which runs when False).
    """

    # log2 of the first fp16 loss scale (subclasses may start elsewhere).
    initial_lg_loss_scale = INITIAL_LOG_LOSS_SCALE

    def __init__(
        self,
        *,
        model: th.nn.Module,
        diffusion,
        data: Iterator,
        batch_size: int,
        microbatch: int,
        lr: float,
        ema_rate: float | str,
        log_interval: int,
        save_interval: int,
        resume_checkpoint: str,
        use_fp16: bool = False,
        fp16_scale_growth: float = 1e-3,
        schedule_sampler=None,
        weight_decay: float = 0.0,
        lr_anneal_steps: int = 0,
        use_bf16: bool = False,
        grad_clip: float = _DEFAULTS.grad_clip,
        lr_warmup_steps: int = _DEFAULTS.lr_warmup_steps,
        max_bad_steps: int = _DEFAULTS.max_bad_steps,
        init_checkpoint: str = _DEFAULTS.init_checkpoint,
        sample_interval: int = _DEFAULTS.sample_interval,
        fused_adam: bool = False,
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.grad_clip = grad_clip
        self.lr_warmup_steps = lr_warmup_steps
        self.max_bad_steps = max_bad_steps
        self.init_checkpoint = init_checkpoint
        self.sample_interval = sample_interval
        self._started = time.time()  # wall time at the start of this run (for the ETA)
        self.bad_steps = 0  # non-finite steps skipped, in all
        self.bad_in_a_row = 0
        # Stop after this many steps in all (None: train until stopped). Subclasses may decouple
        # it from annealing (ClassifierTrainLoop: --iterations).
        self.total_steps: int | None = lr_anneal_steps or None

        self.step = 0  # steps done in this run
        self.resume_step = 0  # steps done before it (from the checkpoint's name)
        self.global_batch = self.batch_size * dist_util.get_world_size()

        self.resume_path = resolve_resume_checkpoint(resume_checkpoint)
        if self.resume_path:
            self.resume_step = parse_resume_step_from_filename(self.resume_path)
            if dist_util.get_rank() == 0:  # the killed run's rows of the steps redone now
                logger.drop_rows_after("step", self.resume_step)
        self._load_and_sync_parameters()

        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model,
            use_fp16=self.use_fp16,
            fp16_scale_growth=fp16_scale_growth,
            initial_lg_loss_scale=self.initial_lg_loss_scale,
            use_bf16=use_bf16,
        )
        # fused_adam (fast path): PyTorch's fused AdamW kernel; None = its default, the original's.
        self.fused_adam = fused_adam or None
        self.opt = AdamW(self.mp_trainer.master_params, lr=self.lr, weight_decay=self.weight_decay,
                         fused=self.fused_adam)
        if self.resume_path:
            self._load_optimizer_state()
            self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
        else:
            self.ema_params = [self._copy_master_params() for _ in self.ema_rate]

        self.ddp_model = wrap_ddp(self.model)
        self.use_ddp = self.ddp_model is not self.model

    # ------------------------------------------------------------------ resume

    def resume_state(self) -> dict:
        """
        Every field a resume needs beyond the model, EMA and optimizer tensors: saved as the
        `RESUME_KEY` entry of opt*.pt (plain Python values and tensors only). The one place to add
        a checkpoint field (RNG states, data position, ...): add it here and read it back in
        `load_resume_state`; subclasses extend both with `super()`.
        """
        return dict(
            self.mp_trainer.state_dict(),  # lg_loss_scale, use_fp16, use_bf16
            step=self.step + self.resume_step,
            train_flags=self.train_flags(),
            bad_steps=self.bad_steps,
            # Identical on every rank (the losses are all-gathered before the update).
            # (A duck-typed sampler without state_dict has nothing to restore.)
            schedule_sampler=getattr(self.schedule_sampler, "state_dict", dict)(),
            # Each rank draws its own noise and reads its own shard: rank r resumes from ranks[r].
            ranks=dist_util.all_gather_objects(self._rank_state()),
        )

    def load_resume_state(self, state: dict) -> None:
        """Restore what `resume_state` saved (called while the optimizer state is loaded)."""
        self.mp_trainer.load_state_dict(state)
        self.bad_steps = int(state.get("bad_steps", 0))
        if hasattr(self.schedule_sampler, "load_state_dict"):
            self.schedule_sampler.load_state_dict(state.get("schedule_sampler", {}))
        ranks = state.get("ranks")
        if ranks is None:
            return  # written before RNG states were saved, or by the original
        if len(ranks) != dist_util.get_world_size():
            logger.log(
                f"the checkpoint was written by {len(ranks)} ranks, this run has "
                f"{dist_util.get_world_size()}: RNG states and data positions start afresh "
                "(training goes on, but not bit for bit as the earlier run would have)"
            )
            return
        mine = ranks[dist_util.get_rank()]
        for name, stream in self.data_streams().items():
            if name in mine["data"] and hasattr(stream, "load_state_dict"):
                stream.load_state_dict(mine["data"][name])
        set_rng_state(mine["rng"])

    def data_streams(self) -> dict:
        """The data iterators whose positions a checkpoint records (name -> iterator)."""
        return {"train": self.data}

    def _rank_state(self) -> dict:
        data = {
            name: stream.state_dict()
            for name, stream in self.data_streams().items()
            if hasattr(stream, "state_dict")
        }
        return {"rng": get_rng_state(), "data": data}

    def _copy_master_params(self) -> list:
        return [p.detach().clone() for p in self.mp_trainer.master_params]

    def _load_and_sync_parameters(self) -> None:
        if self.resume_path:
            logger.log(f"loading model from checkpoint: {self.resume_path}...")
            # Every rank takes part (rank 0 reads and broadcasts): the original loaded on rank 0
            # only, which deadlocked its MPI broadcast. The fit check turns other model flags
            # into one message naming the flag instead of load_state_dict's list of every tensor.
            load_model_checkpoint(
                self.model, self.resume_path, source=f"--resume_checkpoint {self.resume_path!r}"
            )
        elif self.init_checkpoint:
            # Fine-tuning: the weights only; step, optimizer and EMAs start fresh (the EMAs
            # from these weights). A resume checkpoint of the run itself wins, so a restarted
            # fine-tuning run continues instead of starting over.
            logger.log(f"initializing the model from {self.init_checkpoint} (step 0)...")
            load_model_checkpoint(
                self.model, self.init_checkpoint,
                source=f"--init_checkpoint {self.init_checkpoint!r}",
            )
        dist_util.sync_params(self.model.parameters())
        dist_util.sync_params(self.model.buffers())

    def _load_ema_parameters(self, rate: float) -> list:
        ema_checkpoint = None
        if dist_util.get_rank() == 0:
            ema_checkpoint = find_ema_checkpoint(self.resume_path, self.resume_step, rate)
        # Rank 0's view decides, so that all ranks take part in the same collective loads even
        # when only rank 0 sees the log directory.
        ema_checkpoint = dist_util.broadcast_object(ema_checkpoint)
        if ema_checkpoint is None:
            logger.log(
                f"no EMA checkpoint ema_{rate}_{self.resume_step:06d}.pt beside "
                f"{self.resume_path}: the EMA at rate {rate} restarts from the model's weights"
            )
            return self._copy_master_params()
        logger.log(f"loading EMA from checkpoint: {ema_checkpoint}...")
        state_dict = read_state_dict(ema_checkpoint)
        check_state_dict_fits(self.model, state_dict, source=f"{ema_checkpoint!r} (EMA)")
        return [
            p.to(dist_util.dev()) for p in self.mp_trainer.state_dict_to_master_params(state_dict)
        ]

    def _load_optimizer_state(self) -> None:
        opt_checkpoint = opt_checkpoint_path(self.resume_path, self.resume_step)
        exists = bf.exists(opt_checkpoint) if dist_util.get_rank() == 0 else None
        if not dist_util.broadcast_object(exists):  # rank 0's view, as for the EMA files
            logger.log(
                f"no optimizer checkpoint {opt_checkpoint}: AdamW moments and the loss scale "
                "start fresh"
            )
            return
        logger.log(f"loading optimizer state from checkpoint: {opt_checkpoint}")
        state_dict = load_file(opt_checkpoint, map_location=dist_util.dev())
        resume_state = state_dict.pop(RESUME_KEY, {})
        try:
            self.opt.load_state_dict(state_dict)
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"{opt_checkpoint}: the optimizer state does not fit this model ({e}). Was it "
                "written for other model flags, or by the original's fp16 trainer (which "
                "flattened the parameters)? Move it away to restart the optimizer."
            ) from e
        self.load_resume_state(resume_state)
        for group in self.opt.param_groups:
            # The flags of this run win over the saved ones (the lr is re-annealed anyway).
            group["lr"] = self.lr
            group["weight_decay"] = self.weight_decay
            group["fused"] = self.fused_adam  # a checkpoint's kernel choice is not this run's

    # ------------------------------------------------------------------ training

    def run_loop(self) -> None:
        """Train until `total_steps` (forever when None), logging and saving on the way."""
        if self.total_steps is not None and self.resume_step >= self.total_steps:
            # A requeued job of a finished run: nothing to do, and nothing is written.
            logger.log(f"the run is already finished: {self.resume_path} is step "
                       f"{self.resume_step} of {self.total_steps}; nothing to do")
            return
        while self.total_steps is None or self.step + self.resume_step < self.total_steps:
            with self._collectives_guarded():
                batch, cond = next(self.data)
                watchdog.checkpoint(self.step + self.resume_step + 1, "training")
                self.run_step(batch, cond)
                self.step += 1
                done = self.step + self.resume_step
                watchdog.checkpoint(done, "logging")
                if done % self.log_interval == 0:
                    logger.dumpkvs()
                    self._log_progress(done)
                if self.sample_interval and done % self.sample_interval == 0:
                    self.write_sample_grid(done)
                if done % self.save_interval == 0:
                    watchdog.checkpoint(done, "saving")
                    self.save()
                    # Run for a limited time (tests, smoke runs): stop after the first save.
                    if os.environ.get("DIFFUSION_TRAINING_TEST", ""):
                        return
        if logger.getkvs():  # values logged since the last dump (every rank has the same keys)
            logger.dumpkvs()
        # Save the last checkpoint if it wasn't already saved.
        if self.step > 0 and (self.step + self.resume_step) % self.save_interval != 0:
            with self._collectives_guarded():
                self.save()

    def _collectives_guarded(self):
        """Turn a failed collective (dead or silent peer) into `PeerLostError` on this rank."""
        return watchdog.guard_collectives()

    def run_step(self, batch: th.Tensor, cond: dict) -> None:
        self._anneal_lr()
        loss_finite = self.forward_backward(batch, cond)
        if self._step_is_finite(loss_finite):
            self._clip_gradients()
            took_step = self.mp_trainer.optimize(self.opt)
            self.bad_in_a_row = 0
        else:
            took_step = False
            self._skip_bad_step()
        if took_step:
            self._update_ema()
            self.after_update()
        self.log_step()

    def after_update(self) -> None:
        """
        A hook after each optimiser step that was taken (not after a skipped non-finite one), once
        the EMAs are updated: a training mode with more to update (a consistency model's target
        network) overrides this, so the step itself, its NaN guard and clipping stay here.
        """

    def _step_is_finite(self, loss_finite: bool | None) -> bool:
        """
        False when a rank's loss or (outside fp16) the gradient is not finite. All ranks agree:
        the flags are all-reduced, so no rank steps while another skips.
        """
        bad = loss_finite is False
        if not self.use_fp16:
            # fp16 has its own remedy for non-finite gradients: a smaller loss scale.
            grads = [p.grad for p in self.mp_trainer.master_params if p.grad is not None]
            bad = bad or (bool(grads) and not math.isfinite(_norm(grads).item()))
        if dist_util.is_distributed():
            flag = th.tensor([float(bad)], device=dist_util.comm_device())
            th.distributed.all_reduce(flag, op=th.distributed.ReduceOp.MAX)
            bad = bool(flag.item())
        return not bad

    def _skip_bad_step(self) -> None:
        self.mp_trainer.zero_grad()
        self.bad_steps += 1
        self.bad_in_a_row += 1
        done = self.step + self.resume_step + 1
        logger.log(
            f"step {done}: non-finite loss or gradient, step skipped "
            f"({self.bad_in_a_row} in a row, {self.bad_steps} in all)"
        )
        if self.max_bad_steps and self.bad_in_a_row >= self.max_bad_steps:
            newest = find_resume_checkpoint(get_blob_logdir())
            raise TrainingStopped(
                f"{self.bad_in_a_row} non-finite steps in a row (--max_bad_steps "
                f"{self.max_bad_steps}), the last at step {done}; newest good checkpoint: "
                f"{newest or 'none'} (lower --lr, set --grad_clip, or check the data)"
            )

    def _clip_gradients(self) -> None:
        """Scale the gradients so that their global norm is at most `grad_clip` (0: off)."""
        if not self.grad_clip:
            return
        params = self.mp_trainer.model_params
        grads = [p.grad for p in params if p.grad is not None]
        # fp16 gradients are still multiplied by the loss scale here: compare like with like.
        scale = 2**self.mp_trainer.lg_loss_scale if self.use_fp16 else 1.0
        norm = _norm(grads).item() / scale
        if math.isfinite(norm) and norm > self.grad_clip:
            with th.no_grad():
                for g in grads:
                    g.mul_(self.grad_clip / norm)
        logger.logkv_mean("grad_norm_unclipped", norm)

    def forward_backward(self, batch: th.Tensor, cond: dict) -> bool:
        """
        Accumulate the gradient of the batch's mean loss, one microbatch at a time.

        :return: True when every microbatch's loss was finite.
        """
        self.mp_trainer.zero_grad()
        finite = th.tensor(True)
        n = batch.shape[0]
        for i in range(0, n, self.microbatch):
            micro = batch[i : i + self.microbatch].to(dist_util.dev())
            micro_cond = {
                k: v[i : i + self.microbatch].to(dist_util.dev()) for k, v in cond.items()
            }
            last_batch = (i + self.microbatch) >= n
            # DDP all-reduces gradients in backward; skip that for all but the last microbatch.
            sync = last_batch or not self.use_ddp
            with (th.enable_grad() if sync else self.ddp_model.no_sync()):
                loss = self.microbatch_loss(micro, micro_cond)
                finite &= th.isfinite(loss.detach()).all().cpu()
                # Weight each microbatch by its share of the batch: the accumulated gradient is
                # that of the batch mean (the original summed microbatch means instead).
                self.mp_trainer.backward(loss * (micro.shape[0] / n))
        return bool(finite)

    def microbatch_loss(self, micro: th.Tensor, micro_cond: dict) -> th.Tensor:
        """
        The scalar loss of one microbatch, logging its parts (the one method a new training mode
        overrides). Here: the diffusion loss at timesteps from the schedule sampler.

        :param micro: the [n x C x H x W] images, on the device.
        :param micro_cond: the model's keyword arguments (e.g. 'y': [n] labels), on the device.
        """
        t, weights = self.schedule_sampler.sample(micro.shape[0], dist_util.dev())
        compute_losses = functools.partial(
            self.diffusion.training_losses, self.ddp_model, micro, t, model_kwargs=micro_cond
        )
        with self.mp_trainer.autocast():
            losses = compute_losses()
        if isinstance(self.schedule_sampler, LossAwareSampler):
            self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
        log_loss_dict(
            self.diffusion, t, {k: v.detach().float() * weights for k, v in losses.items()}
        )
        return (losses["loss"].float() * weights).mean()

    def _update_ema(self) -> None:
        with th.no_grad():
            for rate, params in zip(self.ema_rate, self.ema_params):
                update_ema(params, self.mp_trainer.master_params, rate=rate)

    def _anneal_lr(self) -> None:
        """
        Set the lr of step k (0-based): lr * (1 - k / lr_anneal_steps) with annealing (the
        original), times min(1, (k + 1) / lr_warmup_steps) with warm-up.
        """
        if not self.lr_anneal_steps and not self.lr_warmup_steps:
            return
        k = self.step + self.resume_step
        lr = self.lr
        if self.lr_anneal_steps:
            lr *= 1 - k / self.lr_anneal_steps
        if self.lr_warmup_steps:
            lr *= min(1.0, (k + 1) / self.lr_warmup_steps)
        for param_group in self.opt.param_groups:
            param_group["lr"] = lr

    def _log_progress(self, done: int) -> None:
        """One line a person can follow: steps done, speed and, with a known end, the ETA."""
        if self.step == 0:
            return
        rate = self.step / max(time.time() - self._started, 1e-9)
        line = f"step {done}" + (f"/{self.total_steps}" if self.total_steps else "")
        line += f" ({rate:.2f} steps/s"
        if self.total_steps:
            eta = int((self.total_steps - done) / rate)
            line += f", ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        logger.log(line + ")")

    def write_sample_grid(self, step: int, n: int = 16, steps: int = 20) -> str | None:
        """
        Sample `n` images from the current weights with DDIM over `steps` steps (the project's
        sampler and grid writer) into `samples_{step:06d}.png` beside the checkpoints (rank 0).
        The training RNGs are forked, so a run with samples trains exactly as one without.

        :return: the PNG's path (None on other ranks).
        """
        if dist_util.get_rank() != 0:
            return None
        if "low_res" in inspect.signature(self.model.forward).parameters:
            logger.log("--sample_interval: no grids for super-resolution models (they need "
                       "low-resolution inputs); use super_res_sample.py on a checkpoint")
            return None
        model_kwargs = {}
        num_classes = getattr(self.model, "num_classes", None)
        if num_classes:
            model_kwargs["y"] = th.arange(n, device=dist_util.dev()) % num_classes
        # The U-Net's side is `image_size`, the DiT's `input_size` (DiT's own name).
        side = getattr(self.model, "image_size", None) or self.model.input_size
        shape = (n, self.model.in_channels, side, side)
        path = bf.join(get_blob_logdir(), f"samples_{step:06d}.png")
        np_state, py_state = np.random.get_state(), random.getstate()
        devices = [dist_util.dev()] if dist_util.dev().type == "cuda" else []
        self.model.eval()  # dropout off while sampling
        try:
            with th.random.fork_rng(devices=devices), th.no_grad():
                th.manual_seed(step)
                x = sample(self.diffusion, self.model, shape, model_kwargs=model_kwargs,
                           device=dist_util.dev(), sampler="ddim",
                           steps=min(steps, self.diffusion.num_timesteps))
        finally:
            self.model.train()
            np.random.set_state(np_state)
            random.setstate(py_state)
        labels = model_kwargs["y"].cpu().numpy() if model_kwargs else None
        grid = image_grid(to_uint8_nhwc(x).cpu().numpy(), labels)
        img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        atomic_write(path, lambda f: img.save(f, format="PNG"))
        logger.log(f"wrote {path}")
        return path

    def log_step(self) -> None:
        done = self.step + self.resume_step + 1  # counting the step just taken
        logger.logkv("step", done)
        logger.logkv("samples", done * self.global_batch)
        logger.logkv("lr", self.opt.param_groups[0]["lr"])
        logger.logkv("skipped_steps", self.bad_steps)

    # ------------------------------------------------------------------ saving

    def save(self) -> None:
        """Write the EMA, optimizer and model checkpoints for the current step (rank 0)."""
        step = self.step + self.resume_step
        # Diverged (NaN) weights are refused before any file is written: the last good
        # checkpoint stays the newest.
        model_state = self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params)
        check_finite(model_state, f"of step {step} (training diverged; not saved)")
        # Every rank builds the state dicts (cheap); only rank 0 writes.
        for rate, params in zip(self.ema_rate, self.ema_params):
            self._save_file(checkpoint_name("ema", step, rate),
                            self.mp_trainer.master_params_to_state_dict(params))
        opt_state = self.opt.state_dict()
        opt_state[RESUME_KEY] = self.resume_state()
        self._save_file(checkpoint_name("opt", step), opt_state)
        # The model file last: it marks the checkpoint as complete for auto-resume.
        self._save_file(checkpoint_name("model", step), model_state)
        if dist_util.get_rank() == 0:
            plot_losses(get_blob_logdir())
        dist_util.barrier()

    def train_flags(self) -> dict:
        """The loop's hyperparameters, stored in opt*.pt so a checkpoint describes its run."""
        return dict(
            batch_size=self.batch_size, microbatch=self.microbatch, lr=self.lr,
            ema_rate=",".join(str(r) for r in self.ema_rate), weight_decay=self.weight_decay,
            lr_anneal_steps=self.lr_anneal_steps, fp16_scale_growth=self.fp16_scale_growth,
            grad_clip=self.grad_clip, lr_warmup_steps=self.lr_warmup_steps,
            world_size=dist_util.get_world_size(),
            schedule_sampler=type(self.schedule_sampler).__name__,
        )

    def _save_file(self, filename: str, obj: dict) -> None:
        if dist_util.get_rank() != 0:
            return
        path = bf.join(get_blob_logdir(), filename)
        logger.log(f"saving {path}...")

        def write(f) -> None:
            th.save(obj, f)
            # Tests kill the process here: the bytes are written, the file not yet renamed.
            watchdog.inject_fault("save", self.step + self.resume_step)

        atomic_write(path, write)


class ClassifierTrainLoop(TrainLoop):
    """
    Train a noisy-image classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021,
    sec. 4) on the one loop: cross-entropy at x_t = q_sample(x_0, t) for uniform t (x_0 itself
    when `noised` is False), logging `train_loss`, `train_acc@1`, `train_acc@5` and their per-
    quartile means, and the same with `val_` on a validation batch every `eval_interval` steps.
    Files are `model{step:06d}.pt` and `opt{step:06d}.pt`: no EMA unless `ema_rate` asks for one.

    :param data: an iterator of (images [N x C x H x W], {'y': [N] labels}) batches.
    :param iterations: stop after this many steps in all (resumed steps included).
    :param anneal_lr: decay the lr linearly to 0 over `iterations`.
    :param noised: train on noisy images x_t (the guidance classifier) rather than on x_0.
    :param val_data: like `data`, for validation (None: no validation).
    :param eval_interval: validate after step 1, 1 + eval_interval, ... (0-based step % it == 0).
    Other parameters are TrainLoop's.
    """

    # The original's classifier_train.py starts its fp16 loss scale at 2**16, not 2**20.
    initial_lg_loss_scale = 16.0

    def __init__(
        self,
        *,
        iterations: int,
        anneal_lr: bool = False,
        noised: bool = True,
        val_data: Iterator | None = None,
        eval_interval: int = 5,
        **kwargs,
    ):
        self.iterations = iterations
        self.anneal_lr = anneal_lr
        self.noised = noised
        self.val_data = val_data
        self.eval_interval = eval_interval
        kwargs.setdefault("ema_rate", "")  # the original keeps no EMA of a classifier
        kwargs.setdefault("log_interval", 10)
        kwargs.setdefault("save_interval", 10000)
        kwargs.setdefault("resume_checkpoint", "")
        super().__init__(lr_anneal_steps=iterations if anneal_lr else 0, **kwargs)
        self.total_steps = iterations

    def microbatch_loss(self, micro: th.Tensor, micro_cond: dict) -> th.Tensor:
        return self._classifier_loss(micro, micro_cond["y"], prefix="train")

    def _classifier_loss(self, x: th.Tensor, labels: th.Tensor, prefix: str) -> th.Tensor:
        """Mean cross-entropy of [n] `labels` given images `x` (noised here if asked); logs."""
        if self.noised:
            # The classifier must work at every t the sampler will ask it about. Uniform t: the
            # importance weights are ignored, as in the original.
            t, _ = self.schedule_sampler.sample(x.shape[0], dist_util.dev())
            x = self.diffusion.q_sample(x, t)
        else:
            t = th.zeros(x.shape[0], dtype=th.long, device=dist_util.dev())
        with self.mp_trainer.autocast():
            logits = self.ddp_model(x, timesteps=t)
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        losses = {
            f"{prefix}_loss": loss.detach(),
            f"{prefix}_acc@1": compute_top_k(logits, labels, k=1),
            f"{prefix}_acc@5": compute_top_k(logits, labels, k=5),
        }
        log_loss_dict(self.diffusion, t, losses)
        return loss.mean()

    def run_step(self, batch: th.Tensor, cond: dict) -> None:
        super().run_step(batch, cond)
        if self.val_data is not None and (self.step + self.resume_step) % self.eval_interval == 0:
            self.evaluate(*next(self.val_data))

    def data_streams(self) -> dict:
        streams = super().data_streams()
        if self.val_data is not None:
            streams["val"] = self.val_data
        return streams

    def evaluate(self, batch: th.Tensor, cond: dict) -> None:
        """Log the `val_` losses and accuracies of one batch (no gradients, eval mode)."""
        self.model.eval()
        try:
            with th.no_grad():
                for i in range(0, batch.shape[0], self.microbatch):
                    micro = batch[i : i + self.microbatch].to(dist_util.dev())
                    labels = cond["y"][i : i + self.microbatch].to(dist_util.dev())
                    self._classifier_loss(micro, labels, prefix="val")
        finally:
            self.model.train()

    def train_flags(self) -> dict:
        return dict(
            super().train_flags(), iterations=self.iterations, anneal_lr=self.anneal_lr,
            noised=self.noised, eval_interval=self.eval_interval,
        )


def wrap_ddp(model: th.nn.Module) -> th.nn.Module:
    """`model` in DistributedDataParallel when several ranks train, else `model` itself."""
    if not dist_util.is_distributed():
        return model
    on_cuda = dist_util.dev().type == "cuda"
    return DDP(
        model,
        device_ids=[dist_util.dev()] if on_cuda else None,
        output_device=dist_util.dev() if on_cuda else None,
        bucket_cap_mb=128,
        find_unused_parameters=False,
        **_no_buffer_broadcast_kwargs(),
    )


def _no_buffer_broadcast_kwargs() -> dict:
    # The original passes broadcast_buffers=False (buffers are synced once at start, not at every
    # forward); newer torch spells it forward_sync_buffers=False and warns about the old name.
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def parse_ema_rates(ema_rate: float | str) -> list:
    """0.9999 or "0.9999,0.99" -> [0.9999, 0.99]; "" -> [] (no EMA)."""
    if isinstance(ema_rate, (int, float)):
        return [float(ema_rate)]
    try:
        return [float(x) for x in str(ema_rate).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--ema_rate must be comma-separated floats, got {ema_rate!r}") from None


def compute_top_k(logits: th.Tensor, labels: th.Tensor, k: int) -> th.Tensor:
    """:return: an [N] float tensor, 1 where the label is among the top min(k, classes) logits."""
    _, top_ks = th.topk(logits, min(k, logits.shape[-1]), dim=-1)
    return (top_ks == labels[:, None]).any(dim=-1).float()


def log_loss_dict(diffusion, ts: th.Tensor, losses: dict) -> None:
    """
    Log each loss's mean, and its mean per quarter of the diffusion process as `{key}_q0..q3`
    (q0 = the least noisy timesteps), which shows where the model struggles.

    :param ts: the [N] timesteps of the batch.
    :param losses: name -> [N] per-sample losses.
    """
    quartile = (4 * ts.cpu().numpy() // diffusion.num_timesteps).astype(np.int64)
    for key, values in losses.items():
        values = values.detach().float().cpu().numpy()
        logger.logkv_mean(key, values.mean(), count=values.size)
        for q in np.unique(quartile):
            sub = values[quartile == q]
            logger.logkv_mean(f"{key}_q{q}", sub.mean(), count=sub.size)
