"""
Train a noisy-image classifier for classifier guidance (Dhariwal & Nichol 2021, sec. 4): the
classifier sees x_t = q_sample(x_0, t) at a random timestep t and learns p(y | x_t, t). Labels are
file-name prefixes (as `image_train.py --class_cond True` reads them). Checkpoints
`model{step:06d}.pt` / `opt{step:06d}.pt` go to `--output_dir`; `--classifier_path` of
classifier_sample.py takes the model file.
"""

import argparse

from guided_diffusion import cli, config, logger
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.train_util import ClassifierTrainLoop


def main():
    args = create_argparser().parse_args()
    if not cli.start_training(args, "classifier"):  # --dry_run: the cost printed, nothing written
        return

    logger.log("creating model and diffusion...")
    model, diffusion = cli.build_model_and_diffusion(args, "classifier")

    logger.log("creating data loader...")
    data = cli.training_data(args, class_cond=True, random_crop=args.random_crop)
    val_data = None
    if args.val_data_dir:
        val_data = cli.training_data(args, data_dir=args.val_data_dir, class_cond=True,
                                     random_flip=True, seed=cli.data_seed(args, stream=1))

    cli.train_diffusion(
        args, model, diffusion, data, loop=ClassifierTrainLoop,
        fp16_flag="classifier_use_fp16", iterations=args.iterations, anneal_lr=args.anneal_lr,
        noised=args.noised, val_data=val_data, eval_interval=args.eval_interval,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
    )


def create_argparser() -> argparse.ArgumentParser:
    # TrainingConfig's flags with the original classifier_train defaults, without the diffusion
    # model's EMA, lr annealing and fp16 loss scale (the classifier has --anneal_lr, --iterations).
    return config.build_parser(
        __doc__, config.DataConfig, config.ClassifierTrainConfig,
        config.TrainingConfig(lr=3e-4, batch_size=4), config.ClassifierConfig,
        config.DiffusionConfig, config.CommonConfig, config.FastConfig,
        config.PresetConfig,
        drop=("ema_rate", "lr_anneal_steps", "fp16_scale_growth", "sample_interval"),
    )

if __name__ == "__main__":
    cli.run_main(main)
