"""
Build a reference batch for evaluator.py from a folder of images.

    python -m evaluations.make_reference_batch IMAGE_DIR OUT.npz [--image_size 256]

Writes `arr_0` ([N x H x W x 3] uint8, streamed, never all in memory) and the FID statistics
`mu`, `sigma` (pool features) and `mu_s`, `sigma_s` (spatial features) computed on the way, the
same keys the original's released reference batches carry.
"""

from __future__ import annotations

import argparse

import numpy as np

from evaluations.evaluator import FAST_FLAGS_LEFT_OUT, Evaluator, RunningStatistics
from evaluations.inception import load_fid_inception
from evaluations.npz_io import images_to_npz, run_main
from guided_diffusion.config import (
    EvaluatorConfig,
    FastConfig,
    ReferenceBatchConfig,
    build_parser,
    defaults,
)

DEFAULTS = defaults(ReferenceBatchConfig, EvaluatorConfig, drop=("output",))


def make_reference_batch(image_dir: str, out_path: str, evaluator: Evaluator,
                         image_size: int | None = None) -> int:
    """
    Write the images of image_dir and their statistics to out_path, through a temporary file:
    a failed or killed run leaves a good batch already at out_path untouched.

    :return: the number of images written to out_path with their statistics.
    """
    def with_statistics(batches):
        pool, spatial = RunningStatistics(), RunningStatistics()  # features are not kept
        for feats in evaluator.iter_features(batches, desc="reference images"):
            pool.add(feats["pool"])
            spatial.add(feats["spatial"])
        pool_stats, spatial_stats = pool.statistics(), spatial.statistics()
        return dict(mu=pool_stats.mu, sigma=pool_stats.sigma,
                    mu_s=spatial_stats.mu, sigma_s=spatial_stats.sigma,
                    preprocessing=np.array(evaluator.preprocessing))  # a str array, no pickle

    return images_to_npz(image_dir, out_path, image_size=image_size,
                         batch_size=evaluator.batch_size,
                         consume=with_statistics)


def create_argparser() -> argparse.ArgumentParser:
    parser = build_parser(__doc__.split("\n\n")[0].strip(), ReferenceBatchConfig,
                          EvaluatorConfig, FastConfig, drop=("output",) + FAST_FLAGS_LEFT_OUT)
    parser.add_argument("image_dir",
                        help="folder of .png/.jpg images (searched recursively, sorted by path)")
    parser.add_argument("out", help="the .npz to write")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = create_argparser().parse_args(argv)
    model = load_fid_inception(args.inception_path or None, preprocessing=args.preprocessing)
    evaluator = Evaluator(model, batch_size=args.batch_size,
                          device=args.device or None, fast=args.fast)
    if evaluator.fast_line:
        print(evaluator.fast_line)
    n = make_reference_batch(args.image_dir, args.out, evaluator,
                             image_size=args.image_size or None)
    print(f"wrote {n} images and their statistics to {args.out}")


if __name__ == "__main__":
    run_main(main, "make_reference_batch")
