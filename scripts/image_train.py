"""
Train a diffusion model on images (a folder searched recursively; with `--class_cond True` an
image's label is its file-name prefix before the first '_'). Checkpoints
`model/ema_/opt{step:06d}.pt` and `args.json` go to `--output_dir` (default: $OPENAI_LOGDIR or a
new temp folder).
Trains forever unless `--lr_anneal_steps N` (then lr decays linearly to 0 over N steps and stops).
"""

import argparse

from guided_diffusion import cli, config, logger


def main():
    args = create_argparser().parse_args()
    if not cli.start_training(args, "unet"):  # --dry_run: the cost printed, nothing written
        return

    logger.log("creating model and diffusion...")
    model, diffusion = cli.build_model_and_diffusion(args, "unet")  # or --model dit

    logger.log("creating data loader...")
    data = cli.training_data(args)  # pixels, or --latent_vae's cached encodings
    cli.train_diffusion(args, model, diffusion, data)


def create_argparser() -> argparse.ArgumentParser:
    return config.build_parser(
        __doc__, config.DataConfig, config.TrainingConfig, config.UNetConfig,
        config.DiffusionConfig, config.CommonConfig, config.FastConfig, config.DiTConfig,
        config.LatentConfig, config.PresetConfig,
    )

if __name__ == "__main__":
    cli.run_main(main)
