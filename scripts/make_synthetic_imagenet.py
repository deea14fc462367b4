"""
Write a synthetic ImageNet-like folder: `--num_classes` class folders (`n00000000/`, ...) of
JPEGs about 500 x 375 px, named `{class}_{index}.JPEG` as ImageNet's training set, so that both
`--class_cond` label sources (file-name prefix, folder) work on it.

Content: a smooth random colour field (a 4 x 3 grid of random colours, bicubic upsampled) plus
pixel noise, so the JPEGs cost about what natural photos cost to decode. Every file is a function
of (--seed, class, index): a rerun writes the same bytes, and an interrupted run finishes by
writing only the files that are missing (each one written atomically).

    python scripts/make_synthetic_imagenet.py --out /tmp/imnet-synth --num_images 50000
    python scripts/data_benchmark.py --data_dir /tmp/imnet-synth
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from multiprocessing import get_context

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion.config import SyntheticImagesConfig, build_parser  # noqa: E402
from guided_diffusion.fileio import atomic_write  # noqa: E402

# ImageNet's common shapes (most photos are 500 px on the long side).
SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (400, 500))


def image_bytes(seed: int, label: int, index: int, quality: int) -> bytes:
    """One JPEG, a function of (seed, label, index) alone."""
    rng = np.random.default_rng([seed, label, index])
    w, h = SIZES[int(rng.integers(len(SIZES)))]
    coarse = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)  # 4 x 3 colours
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, (h, w, 1), dtype=np.int16)  # grain shared by the channels
    arr = np.clip(smooth + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_share(args: tuple) -> int:
    out, seed, num_classes, num_images, quality, share, shares = args
    written = 0
    for i in range(share, num_images, shares):
        label, index = i % num_classes, i // num_classes
        name = f"n{label:08d}"
        path = os.path.join(out, name, f"{name}_{index}.JPEG")
        if os.path.exists(path):
            continue  # a resumed generation writes only what is missing
        data = image_bytes(seed, label, index, quality)
        atomic_write(path, lambda f: f.write(data))
        written += 1
    return written


def create_argparser() -> argparse.ArgumentParser:
    return build_parser(__doc__.split("\n\n")[0], SyntheticImagesConfig)


def main(argv: list[str] | None = None) -> None:
    args = create_argparser().parse_args(argv)
    if not args.out:
        raise SystemExit("--out: name the folder to write")
    workers = args.workers or os.cpu_count() or 1
    for label in range(min(args.num_classes, args.num_images)):
        os.makedirs(os.path.join(args.out, f"n{label:08d}"), exist_ok=True)
    start = time.perf_counter()
    jobs = [(args.out, args.seed, args.num_classes, args.num_images, args.quality, k,
             workers) for k in range(workers)]
    if workers == 1:
        written = _write_share(jobs[0])
    else:
        with get_context("fork").Pool(workers) as pool:
            written = sum(pool.map(_write_share, jobs))
    print(f"wrote {written} of {args.num_images} images ({args.num_classes} classes) to "
          f"{args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
