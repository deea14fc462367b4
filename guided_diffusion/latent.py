"""Latent diffusion: train and sample a U-Net or DiT in the latent space of a pretrained VAE.

As in DiT (Peebles & Xie 2023) and Stable Diffusion (Rombach et al. 2022), images x in [-1, 1] are
encoded once by a frozen diffusers `AutoencoderKL`, z = scale * E(x) with scale 0.18215 for the SD
VAE (so that z has roughly unit variance), the diffusion runs on z, and samples are decoded,
x = D(z / scale), before they are written: sample files hold uint8 images as in pixel space, so the
evaluator needs no change.

- `space_from_flags(args)`: `PixelSpace` without --latent_vae, else a `LatentSpace` (geometry read
  from the VAE's config.json; the weights load on first use, from local files only).
- `load_latent_data(...)`: the training batches, from a cache of the data set's encodings written
  once (`ensure_latent_cache`) and reused by every later run with the same data, VAE and size.

The cache holds each image's posterior mean and standard deviation, so every step draws a fresh
z ~ N(mean, std^2) as DiT's training does (`latent_dist.sample()`), at the cost of one encoding.
Random flips: flipping a latent is not the latent of the flipped image, so with --random_flip True
the flipped image is encoded too (twice the cache) and each draw picks one of the two.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import numpy as np
import torch as th
from torch.utils.data import DataLoader, Dataset

from . import dist_util, logger
from .errors import ScriptError
from .fileio import atomic_write
from .image_datasets import (
    ImageDataset,
    ResumableLoader,
    _class_name,
    _list_image_files_recursively,
)

SD_VAE_SCALE = 0.18215  # Stable Diffusion's VAE latent multiplier (DiT's `.mul_(0.18215)`)
INSTALL_HINT = "pip install -e .[latent]"


class PixelSpace:
    """Pixel space: 3 image channels, models at the image size, nothing to decode."""

    channels = 3
    factor = 1
    decode = None

    def model_size(self, image_size: int) -> int:
        return image_size

    def shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, H, W) of one sample the model produces."""
        return (self.channels, image_size, image_size)


class LatentSpace(PixelSpace):
    """
    The latent space of a diffusers `AutoencoderKL`.

    :param vae_path: a local folder saved by `save_pretrained` (config.json + weights), or a hub
        id already in the local Hugging Face cache (loaded with local_files_only=True).
    :param scale: latent multiplier; 0: the config's `scaling_factor`, else SD_VAE_SCALE.
    """

    def __init__(self, vae_path: str, scale: float = 0.0):
        self.path = vae_path
        self.config = read_vae_config(vae_path)
        self.channels = int(self.config.get("latent_channels", 4))
        # Each encoder block but the last halves the resolution (diffusers' Encoder).
        self.factor = 2 ** (len(self.config.get("block_out_channels", (0,))) - 1)
        self.scale = float(scale or self.config.get("scaling_factor") or SD_VAE_SCALE)
        self._vae = None

    def model_size(self, image_size: int) -> int:
        """The latent side of an image_size image: the model's input size."""
        if image_size % self.factor:
            raise ScriptError(f"--image_size {image_size} is not divisible by the VAE's "
                              f"downsampling factor {self.factor} (--latent_vae {self.path!r})")
        return image_size // self.factor

    def shape(self, image_size: int) -> tuple[int, int, int]:
        side = self.model_size(image_size)
        return (self.channels, side, side)

    @property
    def vae(self):
        """The frozen AutoencoderKL on `dist_util.dev()`, loaded on first use."""
        if self._vae is None:
            autoencoder_kl = _require_diffusers()
            try:
                vae = autoencoder_kl.from_pretrained(self.path, local_files_only=True)
            except (OSError, ValueError) as e:
                raise ScriptError(f"--latent_vae {self.path!r}: cannot load the weights "
                                  f"(local files only): {str(e).splitlines()[0]}") from e
            vae.requires_grad_(False)
            self._vae = vae.to(dist_util.dev()).eval()  # frozen: the VAE is never trained here
        return self._vae

    @th.no_grad()
    def encode_moments(self, x: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """
        :param x: [N x 3 x H x W] images in [-1, 1].
        :return: the unscaled posterior's (mean, std), each [N x C x H/f x W/f] float32.
        """
        dist = self.vae.encode(x.to(dist_util.dev(), th.float32)).latent_dist
        return dist.mean.float(), dist.std.float()

    @th.no_grad()
    def decode(self, z: th.Tensor) -> th.Tensor:
        """:param z: [N x C x h x w] scaled latents. :return: [N x 3 x H x W] images in [-1, 1]."""
        x = self.vae.decode(z.to(dist_util.dev(), th.float32) / self.scale).sample
        return x.clamp(-1, 1)


def space_from_flags(args) -> PixelSpace:
    """`LatentSpace` for --latent_vae PATH, else `PixelSpace` (parsers without the flag too)."""
    path = getattr(args, "latent_vae", "")
    if not path:
        return PixelSpace()
    return LatentSpace(path, getattr(args, "latent_scale", 0.0))


def _require_diffusers():
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ScriptError(f"--latent_vae needs the diffusers package: {INSTALL_HINT}") from e
    return AutoencoderKL


def read_vae_config(path: str) -> dict:
    """The VAE's config as a dict; one-line `ScriptError`s for a missing folder or package."""
    autoencoder_kl = _require_diffusers()
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise ScriptError(f"--latent_vae {path!r}: no config.json (expected a folder written "
                              "by AutoencoderKL.save_pretrained)")
        with open(config_file) as f:
            return json.load(f)
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ScriptError(f"--latent_vae: no such folder: {path!r} (a diffusers AutoencoderKL "
                          "folder with config.json and weights)")
    try:  # a hub id: only from the local cache, never downloaded
        return dict(autoencoder_kl.load_config(path, local_files_only=True))
    except (OSError, ValueError) as e:
        raise ScriptError(
            f"--latent_vae {path!r}: not a local folder and not in the local Hugging Face cache "
            "(loaded with local_files_only=True, never downloaded; save it with "
            "AutoencoderKL.from_pretrained(id).save_pretrained(folder) where there is network, "
            "and pass the folder)") from e


# ------------------------------------------------------------------------------------------------
# The encoded data set


def _file_stamp(path: str) -> list:
    if "://" in path:  # object stores (blobfile paths): their names alone key the cache
        return []
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def cache_key(files: list[str], data_dir: str, space: LatentSpace, image_size: int,
              flips: bool) -> str:
    """
    A digest of everything the encodings depend on: the data folder and its files (names, sizes,
    modification times), the VAE (its config and weight files), the image size and the flips.
    """
    vae_files = []
    if os.path.isdir(space.path):
        vae_files = [[name, *_file_stamp(os.path.join(space.path, name))]
                     for name in sorted(os.listdir(space.path))]
    key = {
        "data_dir": os.path.abspath(data_dir),
        "files": [[os.path.relpath(p, data_dir), *_file_stamp(p)] for p in files],
        "vae": os.path.abspath(space.path) if os.path.isdir(space.path) else space.path,
        "vae_config": space.config,
        "vae_files": vae_files,
        "image_size": image_size,
        "flips": flips,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _data_files(data_dir: str) -> tuple[list[str], list[int]]:
    # The image list and labels exactly as `load_data` derives them (file-name prefixes); the
    # labels are cached whether or not a run uses them.
    files = _list_image_files_recursively(data_dir)
    if not files:
        raise ScriptError(f"--data_dir {data_dir!r}: no images found")
    names = [_class_name(p, data_dir, "filename") for p in files]
    index = {name: i for i, name in enumerate(sorted(set(names)))}
    return files, [index[n] for n in names]


def ensure_latent_cache(
    data_dir: str, space: LatentSpace, image_size: int, flips: bool, cache_dir: str,
    batch_size: int = 32,
) -> str:
    """
    Encode the data set once: rank 0 writes `{cache_dir}/latents_{key}.npz` (atomically) unless it
    exists; the other ranks wait for it.

    The file holds 'mean' and 'std', [N x F x C x h x w] float32 (F = 2 with flips: the image and
    its mirror, else 1), and 'labels', [N] int64 (the file-name prefixes' indices, as load_data
    numbers them), with N the images of the whole data set in `load_data`'s order.

    :return: the cache file's path.
    """
    files, classes = _data_files(data_dir)
    key = cache_key(files, data_dir, space, image_size, flips)
    path = os.path.join(cache_dir, f"latents_{key[:20]}.npz")
    if dist_util.get_rank() == 0 and not os.path.exists(path):
        logger.log(f"encoding {len(files)} images with {space.path!r} -> {path}")
        dataset = ImageDataset(image_size, files, random_flip=False)
        means, stds = [], []
        for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            views = [x, x.flip(3)] if flips else [x]
            moments = [space.encode_moments(v) for v in views]
            means.append(th.stack([m for m, _ in moments], dim=1).cpu())
            stds.append(th.stack([s for _, s in moments], dim=1).cpu())
        arrays = {"mean": th.cat(means).numpy(), "std": th.cat(stds).numpy(),
                  "labels": np.asarray(classes, dtype=np.int64)}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(path, lambda f: f.write(buf.getvalue()))
    elif dist_util.get_rank() == 0:
        logger.log(f"using the encoded data set {path}")
    dist_util.barrier()
    return path


def read_latent_cache(path: str) -> dict[str, np.ndarray]:
    """The arrays of a cache file (never unpickled); a one-line error naming a damaged file."""
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {k: f[k] for k in ("mean", "std", "labels")}
    except (OSError, ValueError, KeyError) as e:
        raise ScriptError(f"latent cache {path!r} is unreadable ({e}); delete it to re-encode")
    return out


def load_latent_data(
    *,
    data_dir: str,
    batch_size: int,
    image_size: int,
    class_cond: bool,
    random_flip: bool,
    space: LatentSpace,
    cache_dir: str,
    seed: int | None = None,
) -> ResumableLoader:
    """
    Yield (latents, kwargs) batches forever, like `image_datasets.load_data` in pixel space, and
    resumable like it: the order is the pixel loader's (`ResumableLoader`) and each item's draw
    a function of its own seed, so a loader restored with `load_state_dict` continues bit for bit.

    This rank draws from its shard of the encodings (every world_size-th image, as load_data),
    reshuffled each pass; each item is a fresh z = scale * (mean + std * noise) of the image or,
    with random_flip, of its mirror (probability 1/2).

    :param seed: the seed of the order and the draws (None: a random one, recorded in the
        loader's `state_dict()`).
    :return: a `ResumableLoader` of ([N x C x h x w] float32 latents, {"y": [N] int64} if
        class_cond).
    """
    path = ensure_latent_cache(data_dir, space, image_size, random_flip, cache_dir)
    arrays = read_latent_cache(path)
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    dataset = LatentDataset(arrays["mean"][rank::world], arrays["std"][rank::world],
                            arrays["labels"][rank::world] if class_cond else None, space.scale)
    if len(dataset) < batch_size:
        raise ScriptError(f"--data_dir {data_dir!r}: this rank's shard has {len(dataset)} images, "
                          f"fewer than --batch_size {batch_size}")
    # The latents are in memory and a draw costs microseconds: no worker processes.
    return ResumableLoader(dataset, batch_size, seed=seed, rank=rank, num_workers=0)


class LatentDataset(Dataset):
    """
    One rank's cached encodings; item (index, item_seed) is a draw from that image's posterior.

    :param mean: [N x F x C x h x w] posterior means (F views: the image, and its mirror).
    :param std: their standard deviations, same shape.
    :param labels: [N] int64 labels, or None (unconditional: an empty kwargs dict).
    :param scale: the latent multiplier.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, labels: np.ndarray | None,
                 scale: float):
        self.mean, self.std = th.from_numpy(np.ascontiguousarray(mean)), th.from_numpy(
            np.ascontiguousarray(std))
        self.labels = None if labels is None else th.from_numpy(np.ascontiguousarray(labels))
        self.scale = scale

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, item: tuple[int, int]) -> tuple[th.Tensor, dict[str, Any]]:
        idx, item_seed = item
        gen = th.Generator().manual_seed(item_seed)
        view = int(th.randint(0, self.mean.shape[1], (1,), generator=gen))  # image or mirror
        m, s = self.mean[idx, view], self.std[idx, view]
        z = self.scale * (m + s * th.randn(m.shape, generator=gen))
        return z, ({} if self.labels is None else {"y": self.labels[idx]})
