"""
Like image_sample.py, but guide the samples with a noisy classifier (Dhariwal & Nichol 2021,
Algorithm 1 for DDPM, Algorithm 2 for DDIM): every sample gets a random target label (`arr_1`), and
`--classifier_scale` multiplies the classifier's gradient. Output and resuming as image_sample.py.
"""

import argparse

from guided_diffusion import cli, config, logger, sample_util
from guided_diffusion.guidance import classifier_cond_fn


def main():
    args = create_argparser().parse_args()
    cli.setup(args)

    logger.log("creating model and diffusion...")
    model, diffusion = cli.load_model_and_diffusion(args, "unet")  # or --model dit
    logger.log("loading classifier...")
    classifier, _ = cli.load_model_and_diffusion(args, "classifier")

    logger.log("sampling...")
    sample_fn = sample_util.make_sample_fn(
        # The labels are the classifier's targets; the model sees them only if class-conditional.
        sample_util.labels_only_if(model, args.class_cond), diffusion, args,
        (3, args.image_size, args.image_size),
        num_classes=args.num_classes,
        cond_fn=classifier_cond_fn(classifier, args.classifier_scale),
    )
    sample_util.sample_and_save(sample_fn, args, args.image_size, with_labels=True)


def create_argparser() -> argparse.ArgumentParser:
    return config.build_parser(
        __doc__, config.SampleConfig, config.GuidanceConfig, config.UNetConfig,
        config.DiffusionConfig, config.ClassifierConfig, config.CommonConfig, config.SamplerOptions,
        config.FastConfig, config.DiTConfig,  # --model dit: a pixel-space DiT
        config.PresetConfig,
    )

if __name__ == "__main__":
    cli.run_main(main)
