"""
Generate a large batch of image samples from a model and save them as a large numpy array
(`samples_{N}x{H}x{W}x3.npz`: `arr_0` uint8 NHWC, `arr_1` labels if class-conditional), with a PNG
grid beside it. Run on several processes with `torchrun --nproc_per_node=K` or `mpiexec -n K`.
Samples are written as they are made, in shards under `{output_dir}/samples_shards/`; rerun the
same command to finish a killed run (see `sample_util.sample_and_save`).
"""

import argparse

from guided_diffusion import cli, config, latent, logger, sample_util


def main():
    args = create_argparser().parse_args()
    cli.setup(args)

    logger.log("creating model and diffusion...")
    model, diffusion = cli.load_model_and_diffusion(args, "unet")  # or --model dit
    space = latent.space_from_flags(args)  # pixels, or --latent_vae's latents (decoded at the end)
    if space.decode is not None and args.clip_denoised:
        logger.log("latent space: --clip_denoised off (latents are not confined to [-1, 1])")
        args.clip_denoised = False

    logger.log("sampling...")
    sample_fn = sample_util.make_sample_fn(
        model, diffusion, args, space.shape(args.image_size),
        num_classes=args.num_classes if args.class_cond else None, decode=space.decode,
    )
    sample_util.sample_and_save(sample_fn, args, args.image_size, with_labels=args.class_cond)


def create_argparser() -> argparse.ArgumentParser:
    return config.build_parser(
        __doc__, config.SampleConfig, config.UNetConfig, config.DiffusionConfig,
        config.CommonConfig, config.SamplerOptions, config.FastConfig, config.DiTConfig,
        config.LatentConfig, config.PresetConfig,
    )

if __name__ == "__main__":
    cli.run_main(main)
