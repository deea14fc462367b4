"""
Train a diffusion model on images (a folder searched recursively; with `--class_cond True` an
image's label is its file-name prefix before the first '_'). Checkpoints
`model/ema_/opt{step:06d}.pt` and `args.json` go to `--output_dir` (default: $OPENAI_LOGDIR or a
new temp folder).
Trains forever unless `--lr_anneal_steps N` (then lr decays linearly to 0 over N steps and stops).
"""

import argparse

from guided_diffusion import cli, logger
from guided_diffusion.config import (
    CommonConfig,
    DataConfig,
    DiffusionConfig,
    FastConfig,
    TrainingConfig,
    UNetConfig,
    build_parser,
)
from guided_diffusion.image_datasets import load_data
from guided_diffusion.train_util import save_run_flags


def main():
    args = create_argparser().parse_args()
    cli.setup(args, training=True)
    save_run_flags(vars(args))

    logger.log("creating model and diffusion...")
    model, diffusion = cli.build_model_and_diffusion(args, "unet")
    fast_cfg = cli.apply_fast_flags(args, model)

    logger.log("creating data loader...")
    cli.require_path(args.data_dir, "data_dir", kind="dir")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
        num_classes=args.num_classes, skip_bad_images=args.skip_bad_images,
    )

    cli.train_diffusion(args, model, diffusion, data, use_bf16=fast_cfg.use_bf16)


def create_argparser() -> argparse.ArgumentParser:
    return build_parser(
        __doc__, DataConfig, TrainingConfig, UNetConfig, DiffusionConfig, CommonConfig, FastConfig,
    )

if __name__ == "__main__":
    cli.run_main(main)
