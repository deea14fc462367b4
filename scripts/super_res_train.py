"""
Train a super-resolution diffusion model: the images of `--data_dir` at `--large_size` are the
targets, the same images area-downsampled to `--small_size` the condition (`low_res`).
"""

import argparse
from typing import Iterator

import torch.nn.functional as F

from guided_diffusion import cli, config, logger
from guided_diffusion.image_datasets import load_data


def main():
    args = create_argparser().parse_args()
    if not cli.start_training(args, "superres"):  # --dry_run: the cost printed, nothing written
        return

    logger.log("creating model...")
    model, diffusion = cli.build_model_and_diffusion(args, "superres")

    logger.log("creating data loader...")
    data = _WithLowRes(cli.training_data(args, image_size=args.large_size), args.small_size)

    cli.train_diffusion(args, model, diffusion, data)


def load_superres_data(data_dir: str, batch_size: int, large_size: int, small_size: int,
                       class_cond: bool = False, random_flip: bool = True,
                       seed: int | None = None, **scan) -> Iterator[tuple]:
    """
    Yield (large [N x 3 x large x large], kwargs) batches where kwargs['low_res'] is the same
    batch downsampled to small_size by area averaging (box filter), as the original trains.
    The iterator's `state_dict` is the image loader's, so checkpoints record its position.
    """
    data = load_data(data_dir=data_dir, batch_size=batch_size, image_size=large_size,
                     class_cond=class_cond, random_flip=random_flip, seed=seed, **scan)
    return _WithLowRes(data, small_size)


class _WithLowRes:
    """The batches of a resumable image loader with their low-resolution copies added."""

    def __init__(self, data, small_size: int):
        self.data, self.small_size = data, small_size
        self.state_dict, self.load_state_dict = data.state_dict, data.load_state_dict

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        large_batch, model_kwargs = next(self.data)
        model_kwargs["low_res"] = F.interpolate(large_batch, self.small_size, mode="area")
        return large_batch, model_kwargs


def create_argparser() -> argparse.ArgumentParser:
    return config.build_parser(
        __doc__, config.DataConfig, config.TrainingConfig, config.SuperResConfig,
        config.DiffusionConfig, config.CommonConfig, config.FastConfig, config.PresetConfig,
    )

if __name__ == "__main__":
    cli.run_main(main)
