"""Sampling from flags and writing its output: the one module that makes sample files.

- `sample_generators` / `PerSampleNoise`: with `--seed S`, the label, x_T and every step's noise of
  sample index i come from one generator seeded by (S, i), so a sample depends only on its index,
  not on the batch size or the number of ranks (STYLE 9).
- `sample_batch`: the one place that runs a sampling loop from flags, through `samplers.sample`
  (any of its samplers, per `--sampler`/`--steps`, else DDIM or DDPM per `--use_ddim`; CFG per
  `--cfg_scale`); `make_sample_fn` wraps it with seeds, labels and bf16 autocast.
- `generate_samples`: splits sample indices over ranks and gathers the batches on rank 0 in index
  order (the original's `all_gather` layout); `save_samples` writes `samples_{N}x{H}x{W}x3.npz`
  (`arr_0` uint8 NHWC, `arr_1` labels) and a PNG grid (`image_grid`) beside it, atomically.
- `sample_and_save`: what every sampling script ends with.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Iterable, Sequence

import numpy as np
import torch as th
import torch.distributed as dist

from . import dist_util, fast, logger, samplers
from .cli import ScriptError, fast_config, world
from .config import SamplerOptions, from_flags
from .checkpoints import atomic_write


# ------------------------------------------------------------------------------------------------
# Seeded noise


def sample_generators(seed: int, indices: Iterable[int]) -> list[th.Generator]:
    """
    One CPU generator per sample index, seeded by (seed, index): everything random about sample
    i (its label, x_T, every step's noise) is drawn from its own generator, in that order.
    """
    return [th.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]


def seeded_labels(generators: Sequence[th.Generator], num_classes: int, device=None) -> th.Tensor:
    """:return: an [N] int64 tensor, label i uniform in [0, num_classes) from generator i."""
    labels = [th.randint(num_classes, (1,), generator=g) for g in generators]
    return th.cat(labels).to(device)


class PerSampleNoise:
    """
    `randn_like` for a batch whose rows have their own generators: row i of every draw comes from
    generator i. Drawn on the CPU so that the numbers are the same on every device.
    """

    def __init__(self, generators: Sequence[th.Generator]):
        self.generators = list(generators)

    def randn(self, shape: Sequence[int], device=None, dtype=th.float32) -> th.Tensor:
        """:param shape: (N, ...) with N == number of generators."""
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} samples, but {len(self.generators)} generators")
        rows = [th.randn(tuple(shape[1:]), generator=g) for g in self.generators]
        return th.stack(rows).to(device=device, dtype=dtype)

    def __call__(self, like: th.Tensor) -> th.Tensor:
        return self.randn(like.shape, device=like.device, dtype=like.dtype)


# ------------------------------------------------------------------------------------------------
# Sampling


def sample_batch(
    model,
    diffusion,
    args,
    shape: Sequence[int],
    model_kwargs: dict | None = None,
    cond_fn=None,
    noise: th.Tensor | None = None,
    noise_fn: Callable[[th.Tensor], th.Tensor] | None = None,
    progress: bool = False,
) -> th.Tensor:
    """
    Run the sampling loop chosen by the flags (`samplers.sample`): `--sampler`/`--steps` pick any
    of its samplers; by default DDIM (`--use_ddim True`) or DDPM ancestral sampling over the
    diffusion's (possibly respaced, `--timestep_respacing`) steps, as the original.

    :param shape: (N, C, H, W).
    :param model_kwargs: e.g. {'y': labels} or {'low_res': images}.
    :param cond_fn: classifier guidance gradient, cond_fn(x, t, **model_kwargs).
    :param noise: the initial x_T, [N x C x H x W] (else drawn by the diffusion).
    :param noise_fn: randn_like replacement for the per-step noise (seeded sampling).
    :return: the [N x C x H x W] float samples in [-1, 1].
    """
    # samplers.sample picks the loop: the original's (--use_ddim, --timestep_respacing) unless
    # --sampler/--steps ask for another; --cfg_scale wraps the model for classifier-free guidance.
    options = dataclasses.asdict(from_flags(SamplerOptions, args))
    return samplers.sample(
        diffusion, model, tuple(shape), noise=noise, clip_denoised=args.clip_denoised,
        model_kwargs=model_kwargs, cond_fn=cond_fn, device=dist_util.dev(),
        progress=progress, use_ddim=args.use_ddim, noise_fn=noise_fn, **options,
    )


def sample_and_save(sample_fn, args, image_size: int, with_labels: bool) -> None:
    """
    What every sampling script ends with: generate `--num_samples` samples across ranks with
    `sample_fn` (see `make_sample_fn`), write them on rank 0 (`save_samples`), wait for all ranks.

    :param image_size: H = W of the samples.
    :param with_labels: whether `sample_fn` returns labels to save as `arr_1`.
    """
    result = generate_samples(
        sample_fn, args.num_samples, args.batch_size, (image_size, image_size, 3),
        with_labels=with_labels, progress=args.progress,
    )
    if result is not None:
        save_samples(*result, out_dir=args.output_dir, grid_size=args.grid_size)
    dist_util.barrier()
    logger.log("sampling complete")


def make_sample_fn(
    model,
    diffusion,
    args,
    shape: Sequence[int],
    num_classes: int | None = None,
    cond_fn=None,
    kwargs_fn: Callable[[list[int]], dict] | None = None,
) -> Callable[[list[int]], tuple[th.Tensor, th.Tensor | None]]:
    """
    Build the `sample_fn` of `generate_samples`: indices -> (uint8 NHWC samples, labels or None).

    With `--seed S` (>= 0) sample i's label, x_T and step noise come from its own generator
    (`sample_generators`); with -1 they come from torch's global RNG as in the original.

    :param shape: (C, H, W) of one sample.
    :param num_classes: if not None, draw labels uniformly as model_kwargs['y'].
    :param kwargs_fn: indices -> extra model_kwargs (e.g. 'low_res', or given labels 'y').
    """
    rank, _ = world()
    check_sampler_fits_model(args)

    def sample_fn(indices: list[int]):
        n, device = len(indices), dist_util.dev()
        noise_src = None
        if args.seed >= 0:
            noise_src = PerSampleNoise(sample_generators(args.seed, indices))
        model_kwargs = {}
        if num_classes is not None:
            if noise_src is not None:
                model_kwargs["y"] = seeded_labels(noise_src.generators, num_classes, device)
            else:
                model_kwargs["y"] = th.randint(0, num_classes, (n,), device=device)
        if kwargs_fn is not None:
            model_kwargs.update({k: v.to(device) for k, v in kwargs_fn(indices).items()})
        noise = noise_src.randn((n, *shape), device=device) if noise_src is not None else None
        # bf16 autocast (--use_bf16 / --fast) around the whole loop: it changes only the
        # networks' convolutions and matmuls; the diffusion's arithmetic stays float32.
        with fast.autocast_context(device, fast_config(args).use_bf16):
            sample = sample_batch(
                model, diffusion, args, (n, *shape), model_kwargs=model_kwargs, cond_fn=cond_fn,
                noise=noise, noise_fn=noise_src, progress=bool(args.progress) and rank == 0,
            )
        return to_uint8_nhwc(sample), model_kwargs.get("y")

    return sample_fn


def check_sampler_fits_model(args) -> None:
    """Refuse `--sampler consistency` on a diffusion model's `--model_path` and the diffusion
    samplers on a consistency model's (`consistency.check_sampler_fits_model`)."""
    from .consistency import check_sampler_fits_model as check  # heavy: train_util et al.

    try:
        check(getattr(args, "sampler", ""), getattr(args, "model_path", ""),
              getattr(args, "consistency_model", "auto"))
    except ValueError as e:
        raise ScriptError(str(e)) from e


def to_uint8_nhwc(sample: th.Tensor) -> th.Tensor:
    """[N x C x H x W] floats in [-1, 1] -> [N x H x W x C] uint8, rounding as the original."""
    return ((sample + 1) * 127.5).clamp(0, 255).to(th.uint8).permute(0, 2, 3, 1).contiguous()


def labels_only_if(model, class_cond: bool):
    """Wrap `model` so that labels in model_kwargs (cond_fn needs them) reach it only if class_cond."""

    if class_cond:
        return model  # labels pass through; the model keeps its attributes (CFG's null label)

    def model_fn(x: th.Tensor, t: th.Tensor, y: th.Tensor | None = None, **kwargs) -> th.Tensor:
        return model(x, t, None, **kwargs)

    return model_fn


def generate_samples(
    sample_fn: Callable[[list[int]], tuple[th.Tensor, th.Tensor | None]],
    num_samples: int,
    batch_size: int,
    image_shape: Sequence[int],
    with_labels: bool,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """
    Produce exactly `num_samples` samples spread over all ranks and gather them on rank 0.

    Round k gives rank r the indices [(k * W + r) * B, (k * W + r + 1) * B), so one round's
    `all_gather` lists the batches in index order, as the original's output does; the last round
    is cut at `num_samples` (a rank with nothing left still joins the gather).

    :param sample_fn: indices -> ([n x H x W x C] uint8 samples, [n] int64 labels or None).
    :param image_shape: (H, W, C) of one sample.
    :return: on rank 0, (arr [num_samples x H x W x C] uint8, labels [num_samples] or None);
             None on the other ranks.
    """
    rank, world_size = world()
    device = dist_util.dev()
    per_round = batch_size * world_size
    rounds = math.ceil(num_samples / per_round)
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_samples, desc="samples", unit="img")
    for k in range(rounds):
        start = (k * world_size + rank) * batch_size
        indices = list(range(start, min(start + batch_size, num_samples)))
        # Pad to the batch size: every rank sends equally shaped tensors.
        batch = th.zeros((batch_size, *image_shape), dtype=th.uint8, device=device)
        batch_labels = th.zeros((batch_size,), dtype=th.int64, device=device)
        if indices:
            sample, label = sample_fn(indices)
            batch[: len(indices)] = sample.to(device)
            if with_labels:
                batch_labels[: len(indices)] = label.to(device)
        if world_size > 1:
            gathered = [th.zeros_like(batch) for _ in range(world_size)]
            gathered_labels = [th.zeros_like(batch_labels) for _ in range(world_size)]
            dist.all_gather(gathered, batch)
            dist.all_gather(gathered_labels, batch_labels)
        else:
            gathered, gathered_labels = [batch], [batch_labels]
        if rank == 0:
            for r, (b, bl) in enumerate(zip(gathered, gathered_labels)):
                r_start = (k * world_size + r) * batch_size
                n = max(0, min(batch_size, num_samples - r_start))
                images.append(b[:n].cpu().numpy())
                labels.append(bl[:n].cpu().numpy())
            done = min(num_samples, (k + 1) * per_round)
            logger.log(f"created {done} samples")
            if bar is not None:
                bar.update(done - bar.n)
    if bar is not None:
        bar.close()
    if rank != 0:
        return None
    arr = np.concatenate(images, axis=0)
    assert arr.shape[0] == num_samples, (arr.shape, num_samples)
    return arr, (np.concatenate(labels, axis=0) if with_labels else None)


# ------------------------------------------------------------------------------------------------
# Writing samples


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


def save_samples(arr: np.ndarray, labels: np.ndarray | None = None, out_dir: str | None = None,
                 grid_size: int = 100) -> str:
    """
    Write `samples_{N}x{H}x{W}x{C}.npz` (`arr_0` = samples, `arr_1` = labels when given) as the
    original does, and a PNG grid of the first `grid_size` samples beside it.

    :return: the path of the .npz.
    """
    from PIL import Image

    shape_str = "x".join(str(x) for x in arr.shape)
    out_path = os.path.join(out_dir or logger.get_dir(), f"samples_{shape_str}.npz")
    logger.log(f"saving to {out_path}")
    arrays = (arr,) if labels is None else (arr, labels)
    atomic_write(out_path, lambda f: np.savez(f, *arrays))
    if grid_size > 0:
        grid = image_grid(arr, labels, max_images=grid_size)
        img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        atomic_write(out_path[: -len(".npz")] + ".png", lambda f: img.save(f, format="PNG"))
    return out_path
