"""The diffusion training loop: microbatches, mixed precision, EMA, DDP, logging, checkpoints.

Checkpoints keep the original's names and formats, in the log directory (`logger.get_dir()`):

* `model{step:06d}.pt`: the float32 state_dict of the trained weights (the original's format, also
  what its released checkpoints are);
* `ema_{rate}_{step:06d}.pt`: the same for each EMA rate;
* `opt{step:06d}.pt`: the optimizer's state_dict plus a "resume" entry (step, loss scale,
  precision), all plain tensors and Python values, so `torch.load(weights_only=True)` reads it.

`step` counts the training steps done: `model000006.pt` holds the weights after 6 steps, and
resuming from it continues with the 7th (the original named the file after the index of the last
step and then repeated that step on resume). Files are written atomically, `model*.pt` last, so
the newest `model*.pt` always has its companions; `resume_checkpoint="auto"` resumes from it.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import tempfile
from typing import Callable, Iterator

import blobfile as bf
import numpy as np
import torch as th
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from torch.optim import AdamW

from . import dist_util, logger
from .fp16_util import MixedPrecisionTrainer
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler

# Resume the newest model*.pt in the log directory (or start fresh when there is none).
AUTO_RESUME = "auto"
_MODEL_CKPT_RE = re.compile(r"^model(\d+)\.pt$")


class TrainLoop:
    """
    Train `model` on the diffusion loss with the original's hyperparameters.

    :param model: the network (on `dist_util.dev()`).
    :param diffusion: a GaussianDiffusion providing `training_losses(model, x_start, t, model_kwargs)`.
    :param data: an iterator of (images [N x C x H x W], kwargs dict) batches, e.g. `load_data`.
    :param batch_size: images per rank per step (the global batch is batch_size * world size).
    :param microbatch: split each batch into pieces of this size for memory (-1 / 0: no split);
        gradients are accumulated so the result equals one pass over the whole batch.
    :param lr: AdamW learning rate.
    :param ema_rate: one EMA decay or a comma-separated list ("0.9999,0.99").
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
    """

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

        self.step = 0  # steps done in this run
        self.resume_step = 0  # steps done before it (from the checkpoint's name)
        self.global_batch = self.batch_size * dist_util.get_world_size()

        # The checkpoint to resume: every rank must agree, so rank 0's choice is broadcast.
        self.resume_path = dist_util.broadcast_object(self._resolve_resume_checkpoint())
        if self.resume_path:
            self.resume_step = parse_resume_step_from_filename(self.resume_path)
        self._load_and_sync_parameters()

        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model,
            use_fp16=self.use_fp16,
            fp16_scale_growth=fp16_scale_growth,
            use_bf16=use_bf16,
        )
        self.opt = AdamW(self.mp_trainer.master_params, lr=self.lr, weight_decay=self.weight_decay)
        if self.resume_path:
            self._load_optimizer_state()
            self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
        else:
            self.ema_params = [self._copy_master_params() for _ in self.ema_rate]

        if dist_util.is_distributed():
            self.use_ddp = True
            on_cuda = dist_util.dev().type == "cuda"
            self.ddp_model = DDP(
                self.model,
                device_ids=[dist_util.dev()] if on_cuda else None,
                output_device=dist_util.dev() if on_cuda else None,
                bucket_cap_mb=128,
                find_unused_parameters=False,
                **_no_buffer_broadcast_kwargs(),
            )
        else:
            self.use_ddp = False
            self.ddp_model = self.model

    # ------------------------------------------------------------------ resume

    def _resolve_resume_checkpoint(self) -> str:
        if self.resume_checkpoint != AUTO_RESUME:
            return self.resume_checkpoint or ""
        if dist_util.get_rank() != 0:
            return ""  # replaced by rank 0's answer
        found = find_resume_checkpoint()
        if found is None:
            logger.log(f"--resume_checkpoint auto: no model*.pt in {get_blob_logdir()}; starting fresh")
            return ""
        return found

    def _copy_master_params(self) -> list:
        return [p.detach().clone() for p in self.mp_trainer.master_params]

    def _load_and_sync_parameters(self) -> None:
        if self.resume_path:
            logger.log(f"loading model from checkpoint: {self.resume_path}...")
            # Every rank loads (a collective read): the original loaded on rank 0 only, which
            # deadlocked its MPI broadcast.
            state_dict = dist_util.load_state_dict(self.resume_path, map_location=dist_util.dev())
            self.model.load_state_dict(state_dict)
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
        state_dict = dist_util.load_state_dict(ema_checkpoint, map_location=dist_util.dev())
        return self.mp_trainer.state_dict_to_master_params(state_dict)

    def _load_optimizer_state(self) -> None:
        opt_checkpoint = bf.join(bf.dirname(self.resume_path), f"opt{self.resume_step:06d}.pt")
        exists = bf.exists(opt_checkpoint) if dist_util.get_rank() == 0 else None
        if not dist_util.broadcast_object(exists):  # rank 0's view, as for the EMA files
            logger.log(
                f"no optimizer checkpoint {opt_checkpoint}: AdamW moments and the loss scale "
                "start fresh"
            )
            return
        logger.log(f"loading optimizer state from checkpoint: {opt_checkpoint}")
        state_dict = dist_util.load_state_dict(opt_checkpoint, map_location=dist_util.dev())
        resume_state = state_dict.pop("resume", {})
        try:
            self.opt.load_state_dict(state_dict)
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"{opt_checkpoint}: the optimizer state does not fit this model ({e}). Was it "
                "written for other model flags, or by the original's fp16 trainer (which "
                "flattened the parameters)? Move it away to restart the optimizer."
            ) from e
        self.mp_trainer.load_state_dict(resume_state)
        for group in self.opt.param_groups:
            # The flags of this run win over the saved ones (the lr is re-annealed anyway).
            group["lr"] = self.lr
            group["weight_decay"] = self.weight_decay

    # ------------------------------------------------------------------ training

    def run_loop(self) -> None:
        """Train until `lr_anneal_steps` (forever when 0), logging and saving on the way."""
        while not self.lr_anneal_steps or self.step + self.resume_step < self.lr_anneal_steps:
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            self.step += 1
            done = self.step + self.resume_step
            if done % self.log_interval == 0:
                logger.dumpkvs()
            if done % self.save_interval == 0:
                self.save()
                # Run for a limited time (tests, smoke runs): stop after the first save.
                if os.environ.get("DIFFUSION_TRAINING_TEST", ""):
                    return
        if logger.getkvs():  # values logged since the last dump (every rank has the same keys)
            logger.dumpkvs()
        # Save the last checkpoint if it wasn't already saved.
        if self.step > 0 and (self.step + self.resume_step) % self.save_interval != 0:
            self.save()

    def run_step(self, batch: th.Tensor, cond: dict) -> None:
        self._anneal_lr()
        self.forward_backward(batch, cond)
        took_step = self.mp_trainer.optimize(self.opt)
        if took_step:
            self._update_ema()
        self.log_step()

    def forward_backward(self, batch: th.Tensor, cond: dict) -> None:
        """Accumulate the gradient of the batch's weighted mean loss, one microbatch at a time."""
        self.mp_trainer.zero_grad()
        n = batch.shape[0]
        for i in range(0, n, self.microbatch):
            micro = batch[i : i + self.microbatch].to(dist_util.dev())
            micro_cond = {k: v[i : i + self.microbatch].to(dist_util.dev()) for k, v in cond.items()}
            last_batch = (i + self.microbatch) >= n
            t, weights = self.schedule_sampler.sample(micro.shape[0], dist_util.dev())
            compute_losses = functools.partial(
                self.diffusion.training_losses, self.ddp_model, micro, t, model_kwargs=micro_cond
            )
            # DDP all-reduces gradients in backward; skip that for all but the last microbatch.
            sync = last_batch or not self.use_ddp
            with (th.enable_grad() if sync else self.ddp_model.no_sync()):
                with self.mp_trainer.autocast():
                    losses = compute_losses()
                if isinstance(self.schedule_sampler, LossAwareSampler):
                    self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
                # Weight each microbatch by its share of the batch: the accumulated gradient is
                # that of the batch mean (the original summed microbatch means instead).
                loss = (losses["loss"].float() * weights).mean() * (micro.shape[0] / n)
                log_loss_dict(
                    self.diffusion, t, {k: v.detach().float() * weights for k, v in losses.items()}
                )
                self.mp_trainer.backward(loss)

    def _update_ema(self) -> None:
        with th.no_grad():
            for rate, params in zip(self.ema_rate, self.ema_params):
                update_ema(params, self.mp_trainer.master_params, rate=rate)

    def _anneal_lr(self) -> None:
        """Linear decay to 0 over lr_anneal_steps: step k (0-based) uses lr * (1 - k / total)."""
        if not self.lr_anneal_steps:
            return
        frac_done = (self.step + self.resume_step) / self.lr_anneal_steps
        lr = self.lr * (1 - frac_done)
        for param_group in self.opt.param_groups:
            param_group["lr"] = lr

    def log_step(self) -> None:
        done = self.step + self.resume_step + 1  # counting the step just taken
        logger.logkv("step", done)
        logger.logkv("samples", done * self.global_batch)
        logger.logkv("lr", self.opt.param_groups[0]["lr"])

    # ------------------------------------------------------------------ saving

    def save(self) -> None:
        """Write the EMA, optimizer and model checkpoints for the current step (rank 0)."""
        step = self.step + self.resume_step
        # Every rank builds the state dicts (cheap); only rank 0 writes.
        for rate, params in zip(self.ema_rate, self.ema_params):
            self._save_file(f"ema_{rate}_{step:06d}.pt", self.mp_trainer.master_params_to_state_dict(params))
        opt_state = self.opt.state_dict()
        opt_state["resume"] = dict(self.mp_trainer.state_dict(), step=step, train_flags=self.train_flags())
        self._save_file(f"opt{step:06d}.pt", opt_state)
        # The model file last: it marks the checkpoint as complete for auto-resume.
        self._save_file(
            f"model{step:06d}.pt", self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params)
        )
        dist_util.barrier()

    def train_flags(self) -> dict:
        """The loop's hyperparameters, stored in opt*.pt so a checkpoint describes its run."""
        return dict(
            batch_size=self.batch_size, microbatch=self.microbatch, lr=self.lr,
            ema_rate=",".join(str(r) for r in self.ema_rate), weight_decay=self.weight_decay,
            lr_anneal_steps=self.lr_anneal_steps, fp16_scale_growth=self.fp16_scale_growth,
            world_size=dist_util.get_world_size(),
            schedule_sampler=type(self.schedule_sampler).__name__,
        )

    def _save_file(self, filename: str, obj: dict) -> None:
        if dist_util.get_rank() != 0:
            return
        path = bf.join(get_blob_logdir(), filename)
        logger.log(f"saving {path}...")
        save_atomic(obj, path)


def _no_buffer_broadcast_kwargs() -> dict:
    # The original passes broadcast_buffers=False (buffers are synced once at start, not at every
    # forward); newer torch spells it forward_sync_buffers=False and warns about the old name.
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def parse_ema_rates(ema_rate: float | str) -> list:
    """0.9999 or "0.9999,0.99" -> [0.9999, 0.99]."""
    if isinstance(ema_rate, (int, float)):
        return [float(ema_rate)]
    try:
        return [float(x) for x in str(ema_rate).split(",")]
    except ValueError:
        raise ValueError(f"--ema_rate must be comma-separated floats, got {ema_rate!r}") from None


def atomic_write(path: str, write: Callable) -> None:
    """
    Call `write(f)` on a binary file so that `path` never holds a partial file: local paths are
    written to a temporary file in the same folder, then renamed over `path`. Object stores
    (gs://, az://) publish an object only once its upload completes, so those are written directly.
    """
    if "://" in path:
        with bf.BlobFile(path, "wb") as f:
            write(f)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(obj, path: str) -> None:
    """`torch.save` through `atomic_write`."""
    atomic_write(path, lambda f: th.save(obj, f))


def parse_resume_step_from_filename(filename: str) -> int:
    """
    The step in a checkpoint name "path/to/modelNNNNNN.pt"; 0 for any other name (e.g. a
    released checkpoint, from which training starts at step 0).
    """
    match = _MODEL_CKPT_RE.match(bf.basename(filename))
    return int(match.group(1)) if match else 0


def get_blob_logdir() -> str:
    """Where checkpoints go: the log directory."""
    directory = logger.get_dir()
    if directory is None:
        raise RuntimeError("no log directory: call logger.configure() before training")
    return directory


def find_resume_checkpoint(log_dir: str | None = None) -> str | None:
    """The `model*.pt` with the highest step in `log_dir` (default: the log directory), or None."""
    log_dir = log_dir or get_blob_logdir()
    if not bf.isdir(log_dir):
        return None
    best = None
    for name in bf.listdir(log_dir):
        match = _MODEL_CKPT_RE.match(name)
        if match and (best is None or int(match.group(1)) > best[0]):
            best = (int(match.group(1)), name)
    return bf.join(log_dir, best[1]) if best else None


def find_ema_checkpoint(main_checkpoint: str, step: int, rate: float) -> str | None:
    """The `ema_{rate}_{step:06d}.pt` beside `main_checkpoint`, or None when there is none."""
    if not main_checkpoint:
        return None
    path = bf.join(bf.dirname(main_checkpoint), f"ema_{rate}_{step:06d}.pt")
    return path if bf.exists(path) else None


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


def save_run_flags(flags: dict, log_dir: str | None = None, filename: str = "args.json") -> str:
    """
    Write the run's flags as JSON beside its checkpoints (rank 0), and log the flags that differ
    from an earlier run's file in the same folder (e.g. when resuming with other settings).

    :return: the file's path.
    """
    log_dir = log_dir or get_blob_logdir()
    path = bf.join(log_dir, filename)
    if dist_util.get_rank() != 0:
        return path
    flags = {k: v for k, v in flags.items()}
    if bf.exists(path):
        with bf.BlobFile(path, "r") as f:
            try:
                old = json.load(f)
            except ValueError:
                old = {}
        changed = {k: (old.get(k), v) for k, v in flags.items() if k in old and old[k] != v}
        if changed:
            logger.log(f"flags changed since the previous run in {log_dir}: {changed}")
    text = json.dumps(flags, indent=2, sort_keys=True, default=str)
    if "://" in path:
        with bf.BlobFile(path, "w") as f:
            f.write(text)
    else:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return path
