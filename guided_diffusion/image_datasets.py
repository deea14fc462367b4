"""Image folders as an endless stream of training batches, as the original loads them.

Images are found recursively under `data_dir` (jpg, jpeg, png, gif; local, gs:// or az:// paths
through blobfile). With `class_cond`, an image's class is the part of its file name before the
first "_" (`n01440764_10026.JPEG` -> "n01440764"), or with `label_from="folder"` the name of its
first subfolder under `data_dir`; classes are numbered in sorted order. Each rank reads a disjoint
shard (`paths[rank::world_size]`). Pixels are scaled to [-1, 1] and returned as C x H x W float32.

The stream is resumable (`ResumableLoader`): the order of an epoch is a function of (seed, epoch,
rank) and each image's random crop and flip of (seed, epoch, index), so a loader restored with
`load_state_dict` yields the batches an uninterrupted one would have, without reading the images
it skips; the batches do not depend on the number of worker processes. The training loop stores
that state in its checkpoints.

Before the first batch every image is checked once (`data_index`: header-only by default), and
the listing and verdicts are kept in an index file that later starts reuse.
"""

from __future__ import annotations

import os
import random
from typing import Iterator

import torch as th
import blobfile as bf
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import data_index, dist_util, logger
from .data_index import CHECKS, IMAGE_EXTENSIONS, open_image
from .errors import DataError
# The resize-and-crop helpers live in image_util (numpy + PIL only) so that evaluations/ can use
# them without importing training code; these names are the original's public API here.
from .image_util import center_crop_arr, random_crop_arr  # noqa: F401

LABEL_SOURCES = ("filename", "folder")
_SHOWN = 10  # unreadable files named per message
MAX_WORKERS = 8  # the automatic --num_workers' ceiling per rank
PREFETCH = 2  # batches each worker prepares ahead (a 256 px batch of 64 is 50 MB)


def load_data(
    *,
    data_dir: str,
    batch_size: int,
    image_size: int,
    class_cond: bool = False,
    deterministic: bool = False,
    random_crop: bool = False,
    random_flip: bool = True,
    label_from: str = "filename",
    seed: int | None = None,
    num_workers: int = 1,
    num_classes: int | None = None,
    skip_bad_images: bool = False,
    index_dir: str | None = None,
    check: str = "header",
) -> "ResumableLoader":
    """
    Yield (images, kwargs) batches forever.

    :param data_dir: the folder searched recursively for images.
    :param batch_size: images per batch (per rank); each epoch's incomplete last batch is dropped.
    :param image_size: the side of the square crops.
    :param class_cond: if True, kwargs holds "y", the [N] int64 class labels.
    :param deterministic: if True, the order is fixed (no shuffling), e.g. for evaluation.
    :param random_crop: if True, a random crop of 80-100% of the shorter side instead of the center.
    :param random_flip: if True, flip each image left-right with probability 1/2.
    :param label_from: "filename" (the original: prefix before the first "_") or "folder" (the
        first subfolder under data_dir, for ImageFolder-style trees).
    :param num_classes: with class_cond, the model's --num_classes: more classes in the data is
        an error (their labels would index past the label embedding, or be read as the
        classifier-free null label).
    :param skip_bad_images: leave out unreadable images (logged) instead of refusing the folder;
        one that fails only at load time is replaced by the next readable one (logged).
    :param seed: the seed of the order and the augmentations (None: a random one, which the
        loader's `state_dict()` records so that a resume continues the same stream).
    :param num_workers: processes per rank that read images (0: this process; -1: 
        `default_num_workers()`); the batches are the same for any number.
    :param index_dir: the folder of the data index (`data_index`), reused by later starts;
        None: no index, every image is checked at every start.
    :param check: how each image is checked before training, "header" or "full" (decode).
    :return: a `ResumableLoader`, an iterator of ([N x 3 x image_size x image_size] float32
        tensor in [-1, 1], dict).
    """
    if not data_dir:
        raise DataError("unspecified data directory (--data_dir)")
    if label_from not in LABEL_SOURCES:
        raise ValueError(f"label_from must be one of {LABEL_SOURCES}, got {label_from!r}")
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if not bf.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir!r}: no such folder")
    if num_workers < 0:
        num_workers = default_num_workers()
    listing = data_index.build_listing(data_dir, index_dir, check, num_workers)
    if not listing.files:
        raise DataError(
            f"--data_dir {data_dir!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in it"
        )
    all_files = scan_images(listing, skip_bad_images)
    classes = None
    if class_cond:
        if label_from == "filename":  # before the names: each bare name would be a class
            check_label_prefixes(all_files, data_dir)
        names = [_class_name(path, data_dir, label_from) for path in all_files]
        sorted_classes = {name: i for i, name in enumerate(sorted(set(names)))}
        check_num_classes(sorted(sorted_classes), num_classes, data_dir)
        classes = [sorted_classes[name] for name in names]
    dataset = ImageDataset(
        image_size,
        all_files,
        classes=classes,
        shard=dist_util.get_rank(),
        num_shards=dist_util.get_world_size(),
        random_crop=random_crop,
        random_flip=random_flip,
        skip_bad=skip_bad_images,
    )
    if len(dataset) < batch_size:
        # drop_last would leave no batch at all and the loop below would spin forever.
        raise DataError(
            f"--data_dir {data_dir!r}: this rank's shard has {len(dataset)} images "
            f"({len(all_files)} in total over {dist_util.get_world_size()} ranks), fewer than "
            f"the batch size {batch_size}"
        )
    return ResumableLoader(
        dataset, batch_size, seed=seed, shuffle=not deterministic, rank=dist_util.get_rank(),
        num_workers=num_workers,
    )


def default_num_workers() -> int:
    """
    Loader processes per rank when --num_workers is -1: the CPUs this process may use, shared by
    the ranks of this node, less one for the rank itself, at most MAX_WORKERS (0 on a machine
    with one CPU per rank: the rank reads the images itself).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(MAX_WORKERS, cpus // dist_util.get_local_world_size() - 1))


def _item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentations: independent of workers, batch size and rank."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class _ResumableBatches:
    """
    Batches of (index, item seed) pairs, forever, from batch `start` (counted from epoch 0).

    Epoch e visits the indices in the order `default_rng([seed, e, rank]).permutation(n)` (or in
    order without shuffling) and drops the incomplete last batch, as `drop_last=True` did. Skipped
    batches cost an index permutation, not image reads.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool, rank: int, start: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.rank, self.start = shuffle, rank, start
        self.per_epoch = n // batch_size

    def __iter__(self) -> Iterator[list]:
        epoch, position = divmod(self.start, self.per_epoch)
        while True:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(self.n)
            else:
                order = np.arange(self.n)
            for b in range(position, self.per_epoch):
                indices = order[b * self.batch_size : (b + 1) * self.batch_size]
                yield [(int(i), _item_seed(self.seed, epoch, int(i))) for i in indices]
            epoch, position = epoch + 1, 0


class ResumableLoader:
    """
    An endless iterator of (images, kwargs) batches whose position can be saved and restored.

    :param dataset: an `ImageDataset` (items are read as `dataset[(index, item_seed)]`).
    :param batch_size: images per batch.
    :param seed: the seed of the order and the augmentations (None: a random one).
    :param shuffle: a new order every epoch (False: file order).
    :param rank: this process's rank (each rank shuffles its own shard differently).
    :param num_workers: DataLoader worker processes (0: read in this process).
    """

    def __init__(
        self,
        dataset: "ImageDataset",
        batch_size: int,
        seed: int | None = None,
        shuffle: bool = True,
        rank: int = 0,
        num_workers: int = 1,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed) if seed is not None else random.SystemRandom().randrange(2**31)
        self.shuffle = shuffle
        self.rank = rank
        self.num_workers = num_workers
        self.batches_done = 0  # batches handed out, counted over all epochs
        self._it = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def __iter__(self) -> "ResumableLoader":
        return self

    def __next__(self) -> tuple:
        if self._it is None:
            batches = _ResumableBatches(
                len(self.dataset), self.batch_size, self.seed, self.shuffle, self.rank,
                start=self.batches_done,
            )
            # A private generator: creating the iterator draws the workers' base seed from it,
            # which would otherwise consume the global torch RNG that the checkpoint restores.
            # The sampler never ends, so the workers live as long as this iterator (persistent);
            # each prepares PREFETCH batches ahead. Batches come back in sampler order whatever
            # the number of workers, and each item's augmentations depend on its own seed only.
            workers = self.num_workers
            loader = DataLoader(
                self.dataset, batch_sampler=batches, num_workers=workers,
                generator=th.Generator().manual_seed(self.seed),
                pin_memory=th.cuda.is_available(),  # faster, asynchronous copies to the GPU
                prefetch_factor=PREFETCH if workers else None, persistent_workers=workers > 0,
            )
            self._it = iter(loader)
        try:
            batch = next(self._it)
        except DataError as e:
            # From a worker, the message is "Caught DataError in DataLoader worker process k"
            # followed by the worker's traceback; its last line is ours.
            lines = str(e).strip().splitlines()
            raise DataError(lines[-1].split("DataError: ", 1)[-1]) from None
        self.batches_done += 1
        return batch

    def state_dict(self) -> dict:
        """Where the stream stands: plain ints (saved in the training checkpoints)."""
        return {
            "seed": self.seed, "batches_done": self.batches_done,
            "batches_per_epoch": self.batches_per_epoch, "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """
        Continue the stream that `state` describes (the next batch is the one it would give).

        When the data no longer gives the same batches per epoch (--batch_size, the images in
        --data_dir or the number of ranks changed), the exact stream cannot go on: the run
        continues statistically instead, from the start of the next epoch in the same seeded
        order of epochs, and says so in the log.
        """
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.batches_done = int(state["batches_done"])
        self._it = None
        old_per_epoch = state.get("batches_per_epoch")
        if old_per_epoch != self.batches_per_epoch:
            epochs = -(-self.batches_done // old_per_epoch) if old_per_epoch else 0  # ceil
            self.batches_done = epochs * self.batches_per_epoch
            logger.log(
                f"the data loader state is for {old_per_epoch} batches per epoch, this data "
                f"gives {self.batches_per_epoch} (--batch_size, --data_dir or the number of "
                f"ranks changed): the run continues statistically, from the start of epoch "
                f"{epochs} (not the exact stream the earlier run would have read)")


def check_label_prefixes(paths: list[str], data_dir: str) -> None:
    """
    With labels from file names, refuse files whose names have no '_': the whole name would be
    the label, so each such file would become a class of its own.
    """
    bare = [p for p in paths if "_" not in bf.basename(p)]
    if bare:
        raise DataError(
            f"--data_dir {data_dir!r}: --class_cond True takes each image's label from its "
            f"file-name prefix before the first '_', but {len(bare)} of {len(paths)} file names "
            f"have no '_' (e.g. {bf.basename(bare[0])!r}): name them LABEL_*.png, or pass "
            "--class_cond False")


def check_num_classes(class_names: list[str], num_classes: int | None, data_dir: str) -> None:
    """Refuse data with more classes than the model's `--num_classes` (labels 0..K-1 sorted)."""
    if num_classes is not None and len(class_names) > num_classes:
        first = class_names[num_classes]
        raise DataError(
            f"--data_dir {data_dir!r} has {len(class_names)} classes but --num_classes is "
            f"{num_classes}: class {first!r} (label {num_classes}) and later ones are out of "
            f"range; pass --num_classes {len(class_names)} or fewer classes")


def scan_images(listing: "data_index.Listing", skip_bad: bool = False) -> list[str]:
    """
    The images of a checked listing (`data_index.build_listing`), so that a corrupt file is
    found now, not hours in when the loader reaches it.

    :return: the full paths, without the unreadable ones when `skip_bad` (they are logged).
    :raises DataError: naming the unreadable files (all of them counted) unless `skip_bad`.
    """
    paths, bad, data_dir = listing.files, listing.bad, listing.data_dir
    if not bad:
        return listing.paths()
    shown = "; ".join(f"{data_dir.rstrip('/')}/{p} ({why})" for p, why in sorted(bad.items())[:_SHOWN])
    more = f"; ... ({len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""
    if not skip_bad:
        raise DataError(f"--data_dir {data_dir!r}: {len(bad)} of {len(paths)} images cannot be "
                        f"read: {shown}{more} (remove them, or pass --skip_bad_images True)")
    logger.log(f"--skip_bad_images: leaving out {len(bad)} of {len(paths)} images: "
               f"{shown}{more}")
    kept = listing.paths(skip_bad=True)
    if not kept:
        raise DataError(f"--data_dir {data_dir!r}: none of its {len(paths)} images can be read")
    return kept


def _class_name(path: str, data_dir: str, label_from: str) -> str:
    if label_from == "filename":
        return bf.basename(path).split("_")[0]
    rel = path[len(data_dir.rstrip("/")) :].lstrip("/")
    parts = rel.split("/")
    if len(parts) < 2:
        raise ValueError(
            f"label_from='folder' needs every image inside a class subfolder of {data_dir!r}, "
            f"but {path!r} is directly in it"
        )
    return parts[0]


def _list_image_files_recursively(data_dir: str) -> list[str]:
    """Every image path under `data_dir`, in sorted order within each folder (depth first)."""
    base = data_dir.rstrip("/")
    return [f"{base}/{rel}" for rel, _, _ in data_index.list_images(data_dir)]


class ImageDataset(Dataset):
    """
    One rank's shard of an image list.

    :param resolution: the side of the square crops.
    :param image_paths: every image (all ranks); this dataset keeps
        `image_paths[shard::num_shards]`.
    :param classes: the class index of each path, or None.
    :param skip_bad: an image that cannot be read is replaced by the next readable one of the
        shard (logged; the same one for any number of workers), instead of a `DataError`.
    """

    def __init__(
        self,
        resolution: int,
        image_paths: list[str],
        classes: list[int] | None = None,
        shard: int = 0,
        num_shards: int = 1,
        random_crop: bool = False,
        random_flip: bool = True,
        skip_bad: bool = False,
    ):
        super().__init__()
        self.resolution = resolution
        self.local_images = image_paths[shard:][::num_shards]
        self.local_classes = None if classes is None else classes[shard:][::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.local_images)

    def __getitem__(self, idx: int | tuple) -> tuple:
        """
        :param idx: an index, or (index, seed): the seed makes the crop and flip reproducible
            (the plain index uses the global `random` state, as the original).
        """
        rng = random
        if isinstance(idx, tuple):
            idx, item_seed = idx
            rng = random.Random(item_seed)
        pil_image = self._read(idx)
        if self.random_crop:
            arr = random_crop_arr(pil_image, self.resolution, rng=rng)
        else:
            arr = center_crop_arr(pil_image, self.resolution)
        if self.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr.astype(np.float32) / 127.5 - 1
        out_dict = {}
        if self.local_classes is not None:
            out_dict["y"] = np.array(self.local_classes[idx], dtype=np.int64)
        return np.transpose(arr, [2, 0, 1]), out_dict

    def _read(self, idx: int) -> Image.Image:
        """The image at `idx`; a file that passed the start's check but fails now (a damaged
        body behind a good header, or changed since) is named, or replaced under skip_bad."""
        for k in range(len(self.local_images)):
            path = self.local_images[(idx + k) % len(self.local_images)]
            try:
                return read_image(path)
            except OSError as e:
                if not self.skip_bad:
                    raise DataError(f"{e} (found while training; pass --skip_bad_images True to "
                                    "train on without it)") from None
                logger.log(f"--skip_bad_images: {e}; using the next image instead")
        raise DataError(f"none of this rank's {len(self.local_images)} images can be read")


def read_image(path: str) -> Image.Image:
    """
    Read an image as RGB (grayscale is replicated, an alpha channel dropped, as in the original).

    :raises OSError: naming the file, when it is missing, truncated or not an image.
    """
    pil_image = open_image(path, "full")
    if pil_image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit PNGs open as 32-bit integer images; convert("RGB") would clip every value
        # above 255 to white. Scale the 16-bit range to 8 bits (65535 -> 255).
        arr = np.asarray(pil_image, dtype=np.float64)
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        pil_image = Image.fromarray(arr)  # 2-D uint8: mode "L"
    return pil_image.convert("RGB")
