"""
Train a super-resolution diffusion model: the images of `--data_dir` at `--large_size` are the
targets, the same images area-downsampled to `--small_size` the condition (`low_res`).
"""

import argparse
from typing import Iterator

import torch.nn.functional as F

from guided_diffusion import logger, run_util
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import add_dict_to_argparser, sr_model_and_diffusion_defaults
from guided_diffusion.train_util import save_run_flags


def main():
    args = create_argparser().parse_args()
    run_util.setup(args)
    save_run_flags(vars(args))

    logger.log("creating model...")
    model, diffusion = run_util.build_model_and_diffusion(args, "superres")
    fast_cfg = run_util.apply_fast_path(args, model)

    logger.log("creating data loader...")
    run_util.require_path(args.data_dir, "data_dir", kind="dir")
    data = load_superres_data(
        args.data_dir, args.batch_size, large_size=args.large_size, small_size=args.small_size,
        class_cond=args.class_cond, random_flip=args.random_flip,
    )

    run_util.train_diffusion(args, model, diffusion, data, use_bf16=fast_cfg.use_bf16)


def load_superres_data(data_dir: str, batch_size: int, large_size: int, small_size: int,
                       class_cond: bool = False, random_flip: bool = True) -> Iterator[tuple]:
    """
    Yield (large [N x 3 x large x large], kwargs) batches where kwargs['low_res'] is the same
    batch downsampled to small_size by area averaging (box filter), as the original trains.
    """
    data = load_data(data_dir=data_dir, batch_size=batch_size, image_size=large_size,
                     class_cond=class_cond, random_flip=random_flip)
    for large_batch, model_kwargs in data:
        model_kwargs["low_res"] = F.interpolate(large_batch, small_size, mode="area")
        yield large_batch, model_kwargs


def create_argparser() -> argparse.ArgumentParser:
    defaults = run_util.diffusion_training_defaults()
    defaults.update(sr_model_and_diffusion_defaults())
    defaults.update(run_util.training_defaults())
    parser = argparse.ArgumentParser(description=__doc__)
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_util.run_main(main)
