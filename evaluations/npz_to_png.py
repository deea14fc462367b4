"""
Unpack `arr_0` of an .npz batch or shard folder (image_sample.py's output) into numbered PNGs.

    python -m evaluations.npz_to_png BATCH.npz OUT_DIR
"""

from __future__ import annotations

import argparse

from evaluations.npz_io import npz_to_images, run_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("npz", help="an .npz whose arr_0 is [N x H x W x 3] uint8, or a shard "
                                    "folder")
    parser.add_argument("out_dir", help="folder for 000000.png, 000001.png, ...")
    args = parser.parse_args(argv)
    n = npz_to_images(args.npz, args.out_dir)
    print(f"wrote {n} images to {args.out_dir}")


if __name__ == "__main__":
    run_main(main, "npz_to_png")
