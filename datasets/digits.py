"""Write the bundled handwritten digits as a labelled image folder for the CPU quickstart.

`datasets/digits/digits.npz` holds the 1,797 8x8 digits of the UCI "Optical Recognition of
Handwritten Digits" test set (E. Alpaydin and C. Kaynak, 1998), as bundled with scikit-learn
(`sklearn/datasets/data/digits.csv.gz`): `images` uint8 [1797 x 8 x 8] with ink values 0..16 and
`labels` int64 [1797] in 0..9. See `datasets/digits/README.md` for the licence.

This script upsamples each digit (bicubic) to `--image_size` pixels and writes it as
`{label}_{index:04d}.png` (grayscale; `load_data` converts it to RGB). The class prefix before the
first underscore is what `image_datasets.load_data(..., class_cond=True)` reads as the label, so
the folders are ready for `image_train.py --class_cond True` and `classifier_train.py`.
Images whose index is a multiple of `--val_every` go to `val/` (a held-out split for the
classifier's evaluation), the rest to `train/`.

    python datasets/digits.py --out_dir runs/digits_data --image_size 16
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

DIGITS_NPZ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits", "digits.npz")


def load_digits(path: str = DIGITS_NPZ) -> tuple[np.ndarray, np.ndarray]:
    """
    Read the bundled digits.

    :return: (images, labels): uint8 [N x 8 x 8] with values 0..16, int64 [N].
    """
    with np.load(path, allow_pickle=False) as f:
        images, labels = f["images"], f["labels"]
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: expected images [N x 8 x 8] and labels [N], got "
                         f"{images.shape} and {labels.shape}")
    return images, labels


def digit_to_image(digit: np.ndarray, image_size: int) -> Image.Image:
    """
    Turn one 8x8 digit (ink 0..16) into a grayscale PIL image of side `image_size`.

    Bicubic upsampling keeps strokes smooth; nearest would give 2x2 blocks that the model then has
    to learn as well.
    """
    gray = np.round(digit.astype(np.float32) * (255.0 / 16.0)).astype(np.uint8)
    img = Image.fromarray(gray)  # 2-D uint8 -> mode "L"
    if image_size != gray.shape[0]:
        img = img.resize((image_size, image_size), resample=Image.BICUBIC)
    return img


def write_digits(out_dir: str, image_size: int = 16, val_every: int = 6) -> dict:
    """
    Write every digit as `{out_dir}/{train|val}/{label}_{index:04d}.png`.

    :param val_every: every `val_every`-th digit (index % val_every == 0) goes to `val/`;
        0 puts everything in `train/`.
    :return: a dict with the number of images written per split.
    """
    images, labels = load_digits()
    counts = {"train": 0, "val": 0}
    for split in counts:
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    for index, (digit, label) in enumerate(zip(images, labels)):
        split = "val" if val_every and index % val_every == 0 else "train"
        path = os.path.join(out_dir, split, f"{int(label)}_{index:04d}.png")
        digit_to_image(digit, image_size).save(path)
        counts[split] += 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True, help="gets train/ and val/ subfolders")
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--val_every", type=int, default=6,
                        help="every N-th digit is held out in val/ (0: none)")
    args = parser.parse_args()
    counts = write_digits(args.out_dir, args.image_size, args.val_every)
    print(f"wrote {counts['train']} train and {counts['val']} val digits "
          f"({args.image_size}x{args.image_size}) to {args.out_dir}")


if __name__ == "__main__":
    main()
