"""
Train a noisy-image classifier for classifier guidance (Dhariwal & Nichol 2021, sec. 4): the
classifier sees x_t = q_sample(x_0, t) at a random timestep t and learns p(y | x_t, t). Labels are
file-name prefixes (as `image_train.py --class_cond True` reads them). Checkpoints
`model{step:06d}.pt` / `opt{step:06d}.pt` go to `--output_dir`; `--classifier_path` of
classifier_sample.py takes the model file.
"""

import argparse

from guided_diffusion import cli, logger
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
from guided_diffusion.train_util import ClassifierTrainLoop, dry_run, save_run_flags


def main():
    args = create_argparser().parse_args()
    cli.setup(args, training=not args.dry_run)  # a dry run takes no lock, writes nothing
    if args.dry_run:
        dry_run(args, "classifier")
        return
    save_run_flags(vars(args))

    logger.log("creating model and diffusion...")
    model, diffusion = cli.build_model_and_diffusion(args, "classifier")
    fast_cfg = cli.apply_fast_flags(args, model, "classifier_use_fp16")

    logger.log("creating data loader...")
    cli.require_path(args.data_dir, "data_dir", kind="dir")
    data = load_data(
        data_dir=args.data_dir, batch_size=args.batch_size, image_size=args.image_size,
        class_cond=True, random_crop=args.random_crop, random_flip=args.random_flip,
        seed=cli.data_seed(args),
        num_classes=args.num_classes, skip_bad_images=args.skip_bad_images,
    )
    val_data = None
    if args.val_data_dir:
        cli.require_path(args.val_data_dir, "val_data_dir", kind="dir")
        val_data = load_data(
            data_dir=args.val_data_dir, batch_size=args.batch_size, image_size=args.image_size,
            class_cond=True, seed=cli.data_seed(args, stream=1),
            num_classes=args.num_classes, skip_bad_images=args.skip_bad_images,
        )

    logger.log("training classifier...")
    ClassifierTrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        iterations=args.iterations,
        anneal_lr=args.anneal_lr,
        noised=args.noised,
        val_data=val_data,
        eval_interval=args.eval_interval,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.classifier_use_fp16,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        weight_decay=args.weight_decay,
        use_bf16=fast_cfg.use_bf16,
        **cli.resilience_kwargs(args),
    ).run_loop()


def create_argparser() -> argparse.ArgumentParser:
    # TrainingConfig's flags with the original classifier_train defaults, without the diffusion
    # model's EMA, lr annealing and fp16 loss scale (the classifier has --anneal_lr, --iterations).
    return build_parser(
        __doc__, DataConfig, ClassifierTrainConfig, TrainingConfig(lr=3e-4, batch_size=4),
        ClassifierConfig, DiffusionConfig, CommonConfig, FastConfig,
        drop=("ema_rate", "lr_anneal_steps", "fp16_scale_growth", "sample_interval"),
    )

if __name__ == "__main__":
    cli.run_main(main)
