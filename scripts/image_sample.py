"""
Generate a large batch of image samples from a model and save them as a large numpy array
(`samples_{N}x{H}x{W}x3.npz`: `arr_0` uint8 NHWC, `arr_1` labels if class-conditional), with a PNG
grid beside it. Run on several processes with `torchrun --nproc_per_node=K` or `mpiexec -n K`.
"""

import argparse

from guided_diffusion import logger, run_util
from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults


def main():
    args = create_argparser().parse_args()
    run_util.setup(args)

    logger.log("creating model and diffusion...")
    model, diffusion = run_util.load_model_and_diffusion(args, "unet")

    logger.log("sampling...")
    sample_fn = run_util.make_sample_fn(
        model, diffusion, args, (3, args.image_size, args.image_size),
        num_classes=args.num_classes if args.class_cond else None,
    )
    run_util.sample_and_save(sample_fn, args, args.image_size, with_labels=args.class_cond)


def create_argparser() -> argparse.ArgumentParser:
    defaults = dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        model_path="",
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(run_util.sampling_defaults())
    parser = argparse.ArgumentParser(description=__doc__)
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_util.run_main(main)
