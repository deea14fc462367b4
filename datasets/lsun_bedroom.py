"""Convert an LSUN category's LMDB export into a folder of PNG images for `image_train.py`.

The LSUN release stores each category as an LMDB database of encoded (webp/jpeg) images. This
reads them, resizes the shorter side to `--image-size` and center-crops (as the original's LSUN
models were trained at 256x256), and writes `{prefix}_{index:07d}.png`. Needs `pip install lmdb`.

    python datasets/lsun_bedroom.py bedroom_train_lmdb lsun_train_output_dir
"""

from __future__ import annotations

import argparse
import io
import os
from typing import Iterable, Iterator

from PIL import Image

try:  # allow importing the pure helpers without lmdb installed
    from image_folder import resize_center_crop
except ImportError:  # imported as datasets.lsun_bedroom
    from datasets.image_folder import resize_center_crop


def read_lmdb_values(lmdb_path: str) -> Iterator[bytes]:
    """Yield every value (an encoded image) of the LMDB database at `lmdb_path`, in key order."""
    try:
        import lmdb
    except ImportError:
        raise SystemExit("error: reading LSUN needs the lmdb package: pip install lmdb")
    env = lmdb.open(lmdb_path, max_readers=1, readonly=True, lock=False, readahead=False,
                    meminit=False)
    with env.begin(write=False) as txn:
        for _key, value in txn.cursor():
            yield value


def dump_images(encoded: Iterable[bytes], out_dir: str, image_size: int, prefix: str,
                limit: int = 0) -> int:
    """
    Decode, resize + center crop, and save images as `{out_dir}/{prefix}_{index:07d}.png`.

    :param limit: stop after this many images (0: all).
    :return: the number of images written.
    """
    os.makedirs(out_dir, exist_ok=True)
    count = 0
    for data in encoded:
        with Image.open(io.BytesIO(data)) as img:
            resize_center_crop(img, image_size).save(
                os.path.join(out_dir, f"{prefix}_{count:07d}.png"))
        count += 1
        if limit and count >= limit:
            break
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--prefix", type=str, default="bedroom")
    parser.add_argument("--limit", type=int, default=0, help="stop after N images (0: all)")
    parser.add_argument("lmdb_path", type=str)
    parser.add_argument("out_dir", type=str)
    args = parser.parse_args()
    n = dump_images(read_lmdb_values(args.lmdb_path), args.out_dir, args.image_size, args.prefix,
                    args.limit)
    print(f"wrote {n} images to {args.out_dir}")


if __name__ == "__main__":
    main()
