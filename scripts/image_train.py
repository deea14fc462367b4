"""
Train a diffusion model on images (a folder searched recursively; with `--class_cond True` an
image's label is its file-name prefix before the first '_'). Checkpoints
`model/ema_/opt{step:06d}.pt` and `args.json` go to `--output_dir` (default: $OPENAI_LOGDIR or a
new temp folder).
Trains forever unless `--lr_anneal_steps N` (then lr decays linearly to 0 over N steps and stops).
"""

import argparse
import os

from guided_diffusion import cli, latent, logger
from guided_diffusion.config import (
    CommonConfig,
    DataConfig,
    DiffusionConfig,
    DiTConfig,
    FastConfig,
    LatentConfig,
    TrainingConfig,
    UNetConfig,
    build_parser,
)
from guided_diffusion.image_datasets import load_data
from guided_diffusion.train_util import dry_run, save_run_flags


def main():
    args = create_argparser().parse_args()
    cli.setup(args, training=not args.dry_run)  # a dry run takes no lock, writes nothing
    if args.dry_run:
        dry_run(args, "unet")
        return
    save_run_flags(vars(args))

    logger.log("creating model and diffusion...")
    model, diffusion = cli.build_model_and_diffusion(args, "unet")  # or --model dit
    fast_cfg = cli.apply_fast_flags(args, model)

    logger.log("creating data loader...")
    cli.require_path(args.data_dir, "data_dir", kind="dir")
    space = latent.space_from_flags(args)
    data_kwargs = dict(data_dir=args.data_dir, batch_size=args.batch_size,
                       image_size=args.image_size, class_cond=args.class_cond,
                       random_flip=args.random_flip)
    if isinstance(space, latent.LatentSpace):  # the data set's encodings, cached once
        cache_dir = args.latent_cache or os.path.join(logger.get_dir(), "latent_cache")
        data = latent.load_latent_data(space=space, cache_dir=cache_dir, **data_kwargs)
    else:
        data = load_data(**data_kwargs, seed=cli.data_seed(args),  # resumable order
                         num_classes=args.num_classes, skip_bad_images=args.skip_bad_images)

    cli.train_diffusion(args, model, diffusion, data, use_bf16=fast_cfg.use_bf16)


def create_argparser() -> argparse.ArgumentParser:
    return build_parser(
        __doc__, DataConfig, TrainingConfig, UNetConfig, DiffusionConfig, CommonConfig, FastConfig,
        DiTConfig, LatentConfig,
    )

if __name__ == "__main__":
    cli.run_main(main)
