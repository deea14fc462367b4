"""
Upsample low-resolution samples (`--base_samples`: an .npz from image_sample.py, `arr_0` uint8
[N x small x small x 3], `arr_1` labels when class-conditional) with a super-resolution model.
Sample i upsamples base sample i (so --num_samples <= N); the output is
`samples_{num_samples}x{large}x{large}x3.npz` (written in shards first and resumable, as
image_sample.py's).
"""

import argparse
import zipfile

import numpy as np
import torch as th

from guided_diffusion import cli, config, logger, sample_util


def load_base_samples(path: str, small_size: int,
                      class_cond: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """
    Read the low-resolution inputs; never unpickles.

    :return: (images [N x small x small x 3] uint8, labels [N] or None).
    """
    import blobfile as bf

    cli.require_path(path, "base_samples")
    try:
        with bf.BlobFile(path, "rb") as f, np.load(f, allow_pickle=False) as obj:
            if "arr_0" not in obj:
                raise cli.ScriptError(f"--base_samples {path}: no 'arr_0' array of images")
            images = obj["arr_0"]
            labels = obj["arr_1"] if class_cond and "arr_1" in obj else None
    except (OSError, ValueError, EOFError, TypeError, zipfile.BadZipFile) as e:
        # Not an .npz (np.load of a .npy gives a bare array), truncated, or object arrays.
        raise cli.ScriptError(f"--base_samples {path}: not a readable .npz of arrays "
                              f"({type(e).__name__}: {e})") from e
    if len(images) == 0 or (labels is not None and labels.shape != (len(images),)):
        raise cli.ScriptError(f"--base_samples {path}: {len(images)} images and labels of shape "
                              f"{None if labels is None else list(labels.shape)}")
    expected = (small_size, small_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8:
        raise cli.ScriptError(
            f"--base_samples {path}: arr_0 is {images.dtype} {list(images.shape)}, expected uint8 "
            f"[N, {small_size}, {small_size}, 3] (see --small_size)"
        )
    if class_cond and labels is None:
        raise cli.ScriptError(
            f"--base_samples {path}: no 'arr_1' labels, needed by --class_cond True")
    return images, labels


def main():
    args = create_argparser().parse_args()
    cli.setup(args)

    logger.log("loading data...")
    cli.flags_from_run(args, "model_path", "superres")  # --small_size, --class_cond of the model
    images, labels = load_base_samples(args.base_samples, args.small_size, args.class_cond)
    if args.num_samples > len(images):
        raise cli.ScriptError(
            f"--num_samples {args.num_samples} is more than the {len(images)} images in "
            f"--base_samples {args.base_samples}: each upsamples one base image; pass "
            f"--num_samples {len(images)} or fewer")

    logger.log("creating model...")
    model, diffusion = cli.load_model_and_diffusion(args, "superres")

    def base_kwargs(indices):
        rows = list(indices)
        low_res = th.from_numpy(images[rows]).float() / 127.5 - 1.0
        kwargs = dict(low_res=low_res.permute(0, 3, 1, 2))
        if labels is not None:
            kwargs["y"] = th.from_numpy(labels[rows]).long()
        return kwargs

    logger.log("creating samples...")
    sample_fn = sample_util.make_sample_fn(
        model, diffusion, args, (3, args.large_size, args.large_size), kwargs_fn=base_kwargs
    )
    sample_util.sample_and_save(sample_fn, args, args.large_size, with_labels=args.class_cond)


def create_argparser() -> argparse.ArgumentParser:
    return config.build_parser(
        __doc__, config.SampleConfig, config.SuperResSampleConfig, config.SuperResConfig,
        config.DiffusionConfig, config.CommonConfig, config.SamplerOptions, config.FastConfig,
        config.PresetConfig,
    )

if __name__ == "__main__":
    cli.run_main(main)
