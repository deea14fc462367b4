"""
Resize-and-crop of single images, as the original prepares training data.

numpy and PIL only: training (image_datasets) and the evaluator's image tools (evaluations/npz_io)
both import these without importing each other.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch as th
from PIL import Image


def _downsample_by_box(pil_image: Image.Image, target_short_side: int) -> Image.Image:
    # Halve with a box filter while the image is at least twice the target: cheap, and it
    # anti-aliases before the final bicubic resize (which alone would alias on large reductions).
    while min(*pil_image.size) >= 2 * target_short_side:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    return pil_image


def _resize_short_side(pil_image: Image.Image, short_side: int) -> np.ndarray:
    pil_image = _downsample_by_box(pil_image, short_side)
    scale = short_side / min(*pil_image.size)
    new_size = tuple(round(x * scale) for x in pil_image.size)
    return np.array(pil_image.resize(new_size, resample=Image.BICUBIC))


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Resize the shorter side to `image_size` and cut the central square: [H x W x 3] uint8."""
    arr = _resize_short_side(pil_image, image_size)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def random_crop_arr(
    pil_image: Image.Image,
    image_size: int,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
    rng: random.Random | None = None,
) -> np.ndarray:
    """
    Resize the shorter side to a random length so that the crop covers `min_crop_frac` to
    `max_crop_frac` of it, then cut a square at a random position: [H x W x 3] uint8.

    :param rng: the random source (default: the `random` module's global one).
    """
    rng = rng or random
    min_smaller_dim_size = math.ceil(image_size / max_crop_frac)
    max_smaller_dim_size = math.ceil(image_size / min_crop_frac)
    smaller_dim_size = rng.randrange(min_smaller_dim_size, max_smaller_dim_size + 1)
    arr = _resize_short_side(pil_image, smaller_dim_size)
    crop_y = rng.randrange(arr.shape[0] - image_size + 1)
    crop_x = rng.randrange(arr.shape[1] - image_size + 1)
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def to_uint8_nhwc(sample: th.Tensor, quantize: str = "truncate") -> th.Tensor:
    """
    [N x C x H x W] floats in [-1, 1] -> [N x H x W x C] uint8: the one place samples are
    quantised (--quantize).

    :param quantize: "truncate": (x + 1) * 127.5 cut towards zero, as the original ADM writes its
        samples (every level is on average half a level darker than the float); "round": to the
        nearest level, as DiT's sample_ddp.py (127.5 x + 128, then cut) writes the samples of its
        FID. Both clamp to [0, 255] first.
    """
    if quantize == "truncate":
        levels = (sample + 1) * 127.5
    elif quantize == "round":
        levels = sample * 127.5 + 128.0
    else:
        raise ValueError(f"quantize must be 'truncate' or 'round', got {quantize!r}")
    return levels.clamp(0, 255).to(th.uint8).permute(0, 2, 3, 1).contiguous()


def image_grid(arr: np.ndarray, labels: np.ndarray | None = None, max_images: int = 100,
               min_tile: int = 64, pad: int = 2) -> np.ndarray:
    """
    Tile the first `max_images` samples into a square grid (sorted by label when labels are
    given, so a class-conditional grid reads 0 0 0 1 1 1 ...).

    :param arr: [N x H x W x C] uint8.
    :param min_tile: small images are enlarged (nearest neighbour, integer factor) to at least this.
    :return: [H' x W' x C] uint8.
    """
    n = min(len(arr), max_images)
    images = arr[:n]
    if labels is not None:
        images = images[np.argsort(labels[:n], kind="stable")]
    scale = max(1, math.ceil(min_tile / max(arr.shape[1], arr.shape[2])))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w, c = images.shape[1:]
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid
