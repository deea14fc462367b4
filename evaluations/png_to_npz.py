"""
Pack a folder of images into an .npz batch (`arr_0`, [N x H x W x 3] uint8) for evaluator.py.

    python -m evaluations.png_to_npz IMAGE_DIR OUT.npz [--image_size 256]
"""

from __future__ import annotations

import argparse

from evaluations.npz_io import images_to_npz, run_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("image_dir",
                        help="folder of .png/.jpg images (searched recursively, sorted by path)")
    parser.add_argument("out", help="the .npz to write")
    parser.add_argument("--image_size", type=int, default=0,
                        help="resize and center-crop to this size as training data is (0: keep)")
    args = parser.parse_args(argv)
    n = images_to_npz(args.image_dir, args.out, image_size=args.image_size or None)
    print(f"wrote {n} images to {args.out}")


if __name__ == "__main__":
    run_main(main, "png_to_npz")
