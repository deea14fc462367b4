"""
Like image_sample.py, but guide the samples with a noisy classifier (Dhariwal & Nichol 2021,
Algorithm 1 for DDPM, Algorithm 2 for DDIM): every sample gets a random target label (`arr_1`), and
`--classifier_scale` multiplies the classifier's gradient.
"""

import argparse

from guided_diffusion import logger, run_util
from guided_diffusion.guidance import classifier_cond_fn
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    classifier_defaults,
    model_and_diffusion_defaults,
)


def main():
    args = create_argparser().parse_args()
    run_util.setup(args)

    logger.log("creating model and diffusion...")
    model, diffusion = run_util.load_model_and_diffusion(args, "unet")
    logger.log("loading classifier...")
    classifier, _ = run_util.load_model_and_diffusion(args, "classifier")

    logger.log("sampling...")
    sample_fn = run_util.make_sample_fn(
        # The labels are the classifier's targets; the model sees them only if class-conditional.
        run_util.labels_only_if(model, args.class_cond), diffusion, args,
        (3, args.image_size, args.image_size),
        num_classes=args.num_classes,
        cond_fn=classifier_cond_fn(classifier, args.classifier_scale),
    )
    run_util.sample_and_save(sample_fn, args, args.image_size, with_labels=True)


def create_argparser() -> argparse.ArgumentParser:
    defaults = dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        model_path="",
        classifier_path="",
        classifier_scale=1.0,
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    defaults.update(run_util.sampling_defaults())
    parser = argparse.ArgumentParser(description=__doc__)
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_util.run_main(main)
