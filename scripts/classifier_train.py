"""
Train a noisy-image classifier for classifier guidance (Dhariwal & Nichol 2021, sec. 4): the
classifier sees x_t = q_sample(x_0, t) at a random timestep t and learns p(y | x_t, t). Labels are
file-name prefixes (as `image_train.py --class_cond True` reads them). Checkpoints
`model{step:06d}.pt` / `opt{step:06d}.pt` go to `--output_dir`; `--classifier_path` of
classifier_sample.py takes the model file.
"""

import argparse
import contextlib

import blobfile as bf
import torch as th
import torch.nn.functional as F
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from torch.optim import AdamW

from guided_diffusion import dist_util, logger, run_util
from guided_diffusion.fp16_util import MixedPrecisionTrainer
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.config import (
    ClassifierConfig,
    ClassifierTrainConfig,
    CommonConfig,
    DataConfig,
    DiffusionConfig,
    FastConfig,
    TrainingConfig,
    build_parser,
)
from guided_diffusion.train_util import (
    AUTO_RESUME,
    find_resume_checkpoint,
    log_loss_dict,
    parse_resume_step_from_filename,
    save_atomic,
    save_run_flags,
)


def main():
    args = create_argparser().parse_args()
    run_util.setup(args)
    save_run_flags(vars(args))

    logger.log("creating model and diffusion...")
    model, diffusion = run_util.build_model_and_diffusion(args, "classifier")
    fast_cfg = run_util.apply_fast_path(args, model, "classifier_use_fp16")
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    resume_path = args.resume_checkpoint
    if resume_path == AUTO_RESUME:
        found = find_resume_checkpoint() if dist_util.get_rank() == 0 else None
        resume_path = dist_util.broadcast_object(found) or ""
    resume_step = parse_resume_step_from_filename(resume_path) if resume_path else 0
    if resume_path:
        logger.log(f"loading model from checkpoint: {resume_path}... at {resume_step} step")
        run_util.load_checkpoint(model, resume_path, "resume_checkpoint")
    dist_util.sync_params(model.parameters())

    mp_trainer = MixedPrecisionTrainer(
        model=model, use_fp16=args.classifier_use_fp16, initial_lg_loss_scale=16.0,
        use_bf16=fast_cfg.use_bf16,
    )
    if dist_util.is_distributed():
        on_cuda = dist_util.dev().type == "cuda"
        model = DDP(
            model,
            device_ids=[dist_util.dev()] if on_cuda else None,
            output_device=dist_util.dev() if on_cuda else None,
            broadcast_buffers=False,
            bucket_cap_mb=128,
            find_unused_parameters=False,
        )

    logger.log("creating data loader...")
    run_util.require_path(args.data_dir, "data_dir", kind="dir")
    data = load_data(
        data_dir=args.data_dir, batch_size=args.batch_size, image_size=args.image_size,
        class_cond=True, random_crop=args.random_crop, random_flip=args.random_flip,
    )
    val_data = None
    if args.val_data_dir:
        run_util.require_path(args.val_data_dir, "val_data_dir", kind="dir")
        val_data = load_data(
            data_dir=args.val_data_dir, batch_size=args.batch_size, image_size=args.image_size,
            class_cond=True,
        )

    logger.log("creating optimizer...")
    opt = AdamW(mp_trainer.master_params, lr=args.lr, weight_decay=args.weight_decay)
    if resume_path:
        opt_checkpoint = bf.join(bf.dirname(resume_path), f"opt{resume_step:06d}.pt")
        logger.log(f"loading optimizer state from checkpoint: {opt_checkpoint}")
        run_util.require_path(opt_checkpoint, "resume_checkpoint (its opt file)")
        opt.load_state_dict(dist_util.load_state_dict(opt_checkpoint, map_location=dist_util.dev()))

    def forward_backward_log(data_loader, prefix: str = "train") -> None:
        batch, extra = next(data_loader)
        labels = extra["y"].to(dist_util.dev())
        batch = batch.to(dist_util.dev())
        # Noisy images: the classifier must work at every t the sampler will ask it about.
        if args.noised:
            t, _ = schedule_sampler.sample(batch.shape[0], dist_util.dev())
            batch = diffusion.q_sample(batch, t)
        else:
            t = th.zeros(batch.shape[0], dtype=th.long, device=dist_util.dev())

        for i, (sub_batch, sub_labels, sub_t) in enumerate(
            split_microbatches(args.microbatch, batch, labels, t)
        ):
            with mp_trainer.autocast():
                logits = model(sub_batch, timesteps=sub_t)
            loss = F.cross_entropy(logits.float(), sub_labels, reduction="none")
            losses = {
                f"{prefix}_loss": loss.detach(),
                f"{prefix}_acc@1": compute_top_k(logits, sub_labels, k=1),
                f"{prefix}_acc@5": compute_top_k(logits, sub_labels, k=5),
            }
            log_loss_dict(diffusion, sub_t, losses)
            loss = loss.mean()
            if loss.requires_grad:
                if i == 0:
                    mp_trainer.zero_grad()
                # Microbatch means weighted by their share: the gradient of the batch mean.
                mp_trainer.backward(loss * len(sub_batch) / len(batch))

    step = resume_step
    for step in range(resume_step, args.iterations):
        logger.logkv("step", step + 1)
        logger.logkv("samples", (step + 1) * args.batch_size * dist_util.get_world_size())
        if args.anneal_lr:
            set_annealed_lr(opt, args.lr, step / args.iterations)
        forward_backward_log(data)
        mp_trainer.optimize(opt)
        if val_data is not None and not step % args.eval_interval:
            with th.no_grad():
                with (model.no_sync() if isinstance(model, DDP) else contextlib.nullcontext()):
                    model.eval()
                    forward_backward_log(val_data, prefix="val")
                    model.train()
        if not step % args.log_interval:
            logger.dumpkvs()
        # Like train_util: model{N}.pt holds the weights after N steps (resume continues at N+1).
        if (step + 1) % args.save_interval == 0:
            save_model(mp_trainer, opt, step + 1)
    if step + 1 > resume_step and (step + 1) % args.save_interval != 0:
        save_model(mp_trainer, opt, step + 1)
    dist_util.barrier()


def set_annealed_lr(opt, base_lr: float, frac_done: float) -> None:
    """Linear decay of the learning rate to 0 over the run."""
    lr = base_lr * (1 - frac_done)
    for param_group in opt.param_groups:
        param_group["lr"] = lr


def save_model(mp_trainer, opt, step: int) -> None:
    """Write the float32 weights and the optimizer state (rank 0, atomically, original names)."""
    if dist_util.get_rank() == 0:
        logger.log("saving model...")
        save_atomic(opt.state_dict(), bf.join(logger.get_dir(), f"opt{step:06d}.pt"))
        # The model file last: with it present, its opt file is complete (auto-resume).
        save_atomic(
            mp_trainer.master_params_to_state_dict(mp_trainer.master_params),
            bf.join(logger.get_dir(), f"model{step:06d}.pt"),
        )


def compute_top_k(logits: th.Tensor, labels: th.Tensor, k: int) -> th.Tensor:
    """:return: an [N] float tensor, 1 where the label is among the top min(k, classes) logits."""
    _, top_ks = th.topk(logits, min(k, logits.shape[-1]), dim=-1)
    return (top_ks == labels[:, None]).any(dim=-1).float()


def split_microbatches(microbatch: int, *args):
    """Yield aligned slices of `args` of length `microbatch` (all of it when microbatch <= 0)."""
    bs = len(args[0])
    if microbatch <= 0 or microbatch >= bs:
        yield tuple(args)
    else:
        for i in range(0, bs, microbatch):
            yield tuple(x[i : i + microbatch] if x is not None else None for x in args)


def create_argparser() -> argparse.ArgumentParser:
    # TrainingConfig's flags with the original classifier_train defaults, without the diffusion
    # model's EMA, lr annealing and fp16 loss scale (the classifier has --anneal_lr, --iterations).
    return build_parser(
        __doc__, DataConfig, ClassifierTrainConfig, TrainingConfig(lr=3e-4, batch_size=4),
        ClassifierConfig, DiffusionConfig, CommonConfig, FastConfig,
        drop=("ema_rate", "lr_anneal_steps", "fp16_scale_growth"),
    )

if __name__ == "__main__":
    run_util.run_main(main)
