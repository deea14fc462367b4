"""Flatten an ImageFolder-style tree (one subdirectory per class) into a labelled image folder.

`image_datasets.load_data(..., class_cond=True)` reads an image's class from its file name: the
part before the first underscore, with labels numbered in the sorted order of those names. This
helper writes `in_dir/CLASS/any/depth/img.jpg` as `out_dir/CLASS_{index:07d}.jpg`, so the labels
come out in the sorted order of the class directories, the same order as torchvision's
`ImageFolder` (e.g. ImageNet's `n01440764` is label 0). Underscores in class names become '-'
(the loader would cut the name at the first one); `classes.txt` lists `label<TAB>class` lines.

    python datasets/image_folder.py /data/imagenet/train /data/imagenet_flat
    python datasets/image_folder.py in_dir out_dir --image_size 64   # also resize + center crop
"""

from __future__ import annotations

import argparse
import os
import shutil

from PIL import Image

# What image_datasets.load_data reads as is; other formats PIL opens are converted to PNG.
LOADER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif")
CONVERTED_EXTENSIONS = (".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def class_prefix(name: str) -> str:
    """The file-name prefix for a class directory: no '_' (the loader splits on the first one)."""
    return name.replace("_", "-")


def resize_center_crop(img: Image.Image, image_size: int) -> Image.Image:
    """Resize the shorter side to `image_size` (bicubic) and crop the center square."""
    img = img.convert("RGB")
    scale = image_size / min(img.size)
    new_size = (max(image_size, round(img.size[0] * scale)), max(image_size, round(img.size[1] * scale)))
    img = img.resize(new_size, resample=Image.BICUBIC)
    left = (img.size[0] - image_size) // 2
    top = (img.size[1] - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


def flatten_image_folder(in_dir: str, out_dir: str, image_size: int = 0) -> list[str]:
    """
    Write every image under `in_dir/CLASS/` as `out_dir/CLASS_{index:07d}{ext}`.

    :param image_size: if > 0, resize + center crop to this size and save as PNG; else copy bytes.
    :return: the class names in label order.
    """
    classes = sorted(d for d in os.listdir(in_dir) if os.path.isdir(os.path.join(in_dir, d)))
    if not classes:
        raise ValueError(f"{in_dir}: no class subdirectories found (expected in_dir/CLASS/*.jpg)")
    prefixes = [class_prefix(c) for c in classes]
    if sorted(prefixes) != prefixes or len(set(prefixes)) != len(prefixes):
        # Replacing '_' changed the sort order or merged two classes: labels would shift.
        raise ValueError(f"{in_dir}: class names differ only in '_' vs '-' or sort differently "
                         "once '_' becomes '-'; rename the class directories")
    os.makedirs(out_dir, exist_ok=True)
    index = 0
    for cls, prefix in zip(classes, prefixes):
        for root, dirs, files in os.walk(os.path.join(in_dir, cls)):
            dirs.sort()
            for name in sorted(files):
                ext = os.path.splitext(name)[1].lower()
                if ext not in LOADER_EXTENSIONS + CONVERTED_EXTENSIONS:
                    continue
                src = os.path.join(root, name)
                if image_size > 0 or ext in CONVERTED_EXTENSIONS:
                    with Image.open(src) as img:
                        img = resize_center_crop(img, image_size) if image_size > 0 else img.convert("RGB")
                        img.save(os.path.join(out_dir, f"{prefix}_{index:07d}.png"))
                else:
                    shutil.copyfile(src, os.path.join(out_dir, f"{prefix}_{index:07d}{ext}"))
                index += 1
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.writelines(f"{label}\t{cls}\n" for label, cls in enumerate(classes))
    return classes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("in_dir", help="a directory with one subdirectory of images per class")
    parser.add_argument("out_dir")
    parser.add_argument("--image_size", type=int, default=0,
                        help="resize + center crop to this size (0: copy files unchanged)")
    args = parser.parse_args()
    classes = flatten_image_folder(args.in_dir, args.out_dir, args.image_size)
    print(f"wrote {len(classes)} classes to {args.out_dir} (labels in classes.txt)")


if __name__ == "__main__":
    main()
