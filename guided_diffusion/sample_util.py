"""Sampling from flags and writing its output: the one module that makes sample files.

- `sample_generators` / `PerSampleNoise`: with seed S, the label, x_T and every step's noise of
  sample index i come from one generator seeded by (S, i), so a sample depends only on its index,
  not on the batch size or the number of ranks (STYLE 9).
- `sample_batch`: the one place that runs a sampling loop from flags, through `samplers.sample`
  (any of its samplers, per `--sampler`/`--steps`, else DDIM or DDPM per `--use_ddim`; CFG per
  `--cfg_scale`); `make_sample_fn` wraps it with seeds, labels and bf16 autocast.
- `sample_and_save`: what every sampling script ends with. Samples are written as they are made,
  in shards of `--shard_size` under `{output_dir}/samples_shards/` (`plan_shards`,
  `write_shards`); a rerun of the same command finishes the missing shards under any process
  count and batch size, and refuses other sample-affecting flags. Rank 0 then streams the shards
  into the original's `samples_{N}x{H}x{W}x3.npz` (`arr_0` uint8 NHWC, `arr_1` labels) and a PNG
  grid (`merge_shards`, `image_grid`), holding one shard in memory, never all samples.
- `save_samples`: the same .npz and grid from an array in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import sys
import time
import zipfile
from typing import Callable, Iterable, Sequence

import numpy as np
import torch as th
from PIL import Image
from tqdm.auto import tqdm

from evaluations import npz_io  # the one definition of the shard-folder format

from . import checkpoints, dist_util, fast, logger, samplers
from .consistency import training_grid
from .dist_util import world
from .errors import PeerLostError, ScriptError
from .fast import fast_config
from .image_util import image_grid, to_uint8_nhwc  # noqa: F401 -- re-exported
from .config import ConsistencyConfig, SamplerOptions, defaults, from_flags
from .fileio import atomic_write, file_sha256, remove_stale_temp_files


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
    return samplers.sample(
        diffusion, model, tuple(shape), noise=noise, clip_denoised=args.clip_denoised,
        model_kwargs=model_kwargs, cond_fn=cond_fn, device=dist_util.dev(),
        progress=progress, use_ddim=args.use_ddim, noise_fn=noise_fn,
        **sampler_options(args, diffusion),
    )


def sampler_options(args, diffusion) -> dict:
    """`samplers.sample`'s options from the flags: SamplerOptions' fields and, for
    `--sampler consistency`, the student's training grid (`cm_grid`)."""
    options = dataclasses.asdict(from_flags(SamplerOptions, args))
    options["cm_grid"] = None
    if options["sampler"] == "consistency":
        options["cm_grid"] = consistency_grid(getattr(args, "model_path", ""), diffusion)
    return options


def consistency_grid(model_path: str, diffusion) -> np.ndarray:
    """
    The training grid of the consistency student at `model_path` (`consistency.training_grid` of
    the flags in its run's args.json, --cm_steps, --cm_spacing and the curriculum's at the step in
    the file's name; cm_distill's defaults where absent), so that K-step sampling evaluates it
    only at levels it was trained on.
    """
    saved = checkpoints.read_run_flags(os.path.dirname(os.path.abspath(model_path))) \
        if model_path else None
    step = checkpoints.checkpoint_step(model_path) if model_path else None
    return training_grid(diffusion.alphas_cumprod, {**defaults(ConsistencyConfig), **(saved or {})},
                         step)


def make_sample_fn(
    model,
    diffusion,
    args,
    shape: Sequence[int],
    num_classes: int | None = None,
    cond_fn=None,
    kwargs_fn: Callable[[list[int]], dict] | None = None,
    decode: Callable[[th.Tensor], th.Tensor] | None = None,
) -> Callable[[list[int]], tuple[th.Tensor, th.Tensor | None]]:
    """
    Build the `sample_fn` of `sample_and_save`: (indices, seed=None) -> (uint8 NHWC samples,
    labels or None).

    With a seed S >= 0 (the argument, else `--seed`) sample i's label, x_T and step noise come
    from its own generator (`sample_generators`); with -1 from torch's global RNG as the original.

    :param shape: (C, H, W) of one sample.
    :param num_classes: if not None, draw labels uniformly as model_kwargs['y'].
    :param kwargs_fn: indices -> extra model_kwargs (e.g. 'low_res', or given labels 'y').
    :param decode: samples -> [N x 3 x H x W] images in [-1, 1] (a VAE decoder in latent space,
        `latent.LatentSpace.decode`); None: the samples are the images.
    """
    rank, _ = world()
    check_sampler_fits_model(args)
    try:  # every sampling flag against this model and diffusion, before anything is written
        samplers.prepare(diffusion, model, use_ddim=args.use_ddim,
                         **sampler_options(args, diffusion))
    except ValueError as e:
        raise ScriptError(str(e)) from e

    def sample_fn(indices: list[int], seed: int | None = None):
        n, device = len(indices), dist_util.dev()
        seed = args.seed if seed is None else seed
        noise_src = None
        if seed >= 0:
            noise_src = PerSampleNoise(sample_generators(seed, indices))
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
        require_finite_samples(sample, indices)  # not black images from NaN
        if decode is not None:
            sample = decode(sample)
        return to_uint8_nhwc(sample, getattr(args, "quantize", "truncate")), model_kwargs.get("y")

    return sample_fn


def check_sampler_fits_model(args) -> None:
    """Refuse `--sampler consistency` on a diffusion model's `--model_path` and the diffusion
    samplers on a consistency model's (`checkpoints.check_sampler_fits_model`)."""
    try:
        checkpoints.check_sampler_fits_model(
            getattr(args, "sampler", ""), getattr(args, "model_path", ""),
              getattr(args, "consistency_model", "auto"))
    except ValueError as e:
        raise ScriptError(str(e)) from e


def require_finite_samples(samples: th.Tensor, indices: Sequence[int]) -> None:
    """
    Raise `ScriptError` naming the samples that hold NaN/inf (instead of writing black images).

    Checked once per batch at the end, not per step: NaN and inf propagate through every later
    step of every sampler (each step reads the previous x), so the end sees them all, and a
    per-step check would add a device-to-host sync per step. With --seed, the indices named
    reproduce the samples.

    :param samples: [N x ...] the batch's final samples; `indices` their global indices.
    """
    bad = ~th.isfinite(samples.reshape(len(samples), -1)).all(dim=1)
    if bool(bad.any()):
        which = [int(indices[i]) for i in th.nonzero(bad).flatten().tolist()]
        shown = ", ".join(map(str, which[:10])) + (" ..." if len(which) > 10 else "")
        raise ScriptError(f"sampling produced non-finite values (NaN/inf) in {len(which)} of "
                          f"{len(samples)} samples (indices {shown}); nothing was written. Check "
                          "--cfg_scale / --classifier_scale and the checkpoint")


def labels_only_if(model, class_cond: bool):
    """Wrap `model` so that the labels in model_kwargs (cond_fn needs them) reach it only if
    class_cond."""

    if class_cond:
        return model  # labels pass through; the model keeps its attributes (CFG's null label)

    def model_fn(x: th.Tensor, t: th.Tensor, y: th.Tensor | None = None, **kwargs) -> th.Tensor:
        return model(x, t, None, **kwargs)

    return model_fn


# ------------------------------------------------------------------------------------------------
# Writing samples


def write_samples_npz(path: str, shape: Sequence[int], batches: Iterable[np.ndarray],
                      labels: np.ndarray | None = None) -> None:
    """
    Write the original's sample file, `arr_0` = samples and `arr_1` = labels when given, streaming
    `batches` into it (`npz_io.NpzArrayWriter`): memory holds one batch, not the file. Written
    atomically, with fixed zip dates, so the same samples always make the same bytes.

    :param shape: (N, H, W, C) of `arr_0`; `batches` must hold exactly N rows of uint8.
    :param labels: [N] class labels, stored as int64.
    """

    def fill(writer: npz_io.NpzArrayWriter) -> None:
        for batch in batches:
            writer.write_batch(batch)
        if labels is not None:
            writer.add_array(npz_io.LABEL_KEY, np.asarray(labels, dtype=np.int64))

    npz_io.write_npz_atomically(path, tuple(shape), fill)


def save_grid(npz_path: str, arr: np.ndarray, labels: np.ndarray | None, grid_size: int) -> None:
    """Write `image_grid` of the first `grid_size` samples as a PNG beside `npz_path` (0: none)."""

    if grid_size <= 0:
        return
    grid = image_grid(arr, labels, max_images=grid_size)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    atomic_write(npz_path[: -len(".npz")] + ".png", lambda f: img.save(f, format="PNG"))


def samples_file_name(shape: Sequence[int]) -> str:
    """:return: the original's `samples_{N}x{H}x{W}x{C}.npz` for samples of `shape`."""
    return f"samples_{'x'.join(str(int(x)) for x in shape)}.npz"


def save_samples(arr: np.ndarray, labels: np.ndarray | None = None, out_dir: str | None = None,
                 grid_size: int = 100) -> str:
    """
    Write samples held in memory as `samples_{N}x{H}x{W}x{C}.npz` (`arr_0` = samples, `arr_1` =
    labels when given) as the original does, and a PNG grid of the first `grid_size` beside it.

    :return: the path of the .npz.
    """
    out_path = os.path.join(out_dir or logger.get_dir(), samples_file_name(arr.shape))
    logger.log(f"saving to {out_path}")
    write_samples_npz(out_path, arr.shape, [arr], labels)
    save_grid(out_path, arr, labels, grid_size)
    return out_path


# ------------------------------------------------------------------------------------------------
# Sharded, resumable sampling
#
# The original keeps every sample in rank 0's memory and writes once at the end: a job killed at
# 49,000 of 50,000 loses everything. Here samples go to `{output_dir}/samples_shards/` as they are
# made, in the evaluator's shard-folder format (`evaluations.npz_io`): `manifest.json` and
# `samples_{start:08d}-{stop:08d}.npz` files of `--shard_size` samples each. Shard j covers
# [j K, (j + 1) K); rank 0 lists the shards still missing and the ranks take them round-robin,
# each computing its shards alone in batches of `--batch_size`. Since sample i depends on
# (seed, i) only, neither the process count nor the kill/resume history changes a shard, and a
# rerun of the same command only writes the missing ones. At the end rank 0 streams the shards
# into the original's single .npz, holding one shard at a time.

SHARD_FOLDER = "samples_shards"
# Flags that cut or report the work without changing any sample; every other flag is recorded in
# the manifest and must be the same when a run resumes.
NOT_SAMPLE_FLAGS = ("batch_size", "progress", "output_dir", "grid_size", "dist_timeout")
# Flags naming input files whose content decides the samples: the manifest records each file's
# sha256 (as `{flag}_sha256`) beside its path, so that another file put at the same path (a newer
# checkpoint) is refused instead of mixing two models' samples in one output.
CONTENT_FLAGS = ("model_path", "classifier_path", "base_samples")
_HASH_SUFFIX = "_sha256"


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """:return: the [start, stop) index ranges of the shards of `num_samples` samples."""
    return [(a, min(a + shard_size, num_samples)) for a in range(0, num_samples, shard_size)]


def sample_flags(args) -> dict:
    """The flags that decide the samples (all but NOT_SAMPLE_FLAGS), as JSON values."""
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SAMPLE_FLAGS}
    return json.loads(json.dumps(flags, default=str))


def content_hashes(args) -> dict:
    """`{flag}_sha256` of each local file named by a `CONTENT_FLAGS` flag of `args` (rank 0 reads
    it once: the sampling scripts call this on rank 0 only)."""
    hashes = {}
    for name in CONTENT_FLAGS:
        path = getattr(args, name, "")
        if path and "://" not in path and os.path.isfile(path):
            hashes[name + _HASH_SUFFIX] = file_sha256(path)
    return hashes


def shard_problem(path: str, start: int, stop: int, image_shape: Sequence[int],
                  with_labels: bool) -> str | None:
    """
    Check a shard file found on disk before trusting it as complete.

    :return: None when it holds `arr_0` uint8 [stop - start x H x W x C] (and `arr_1` [n] int64
             labels iff `with_labels`) with intact data (zip CRCs); else what is wrong.
    """
    n = stop - start
    try:
        with npz_io.NpzArrayReader(path, npz_io.IMAGE_KEY) as images:
            arrays = images.arrays
            if images.shape != (n, *image_shape) or images.dtype != np.uint8:
                return f"arr_0 is {images.dtype} {list(images.shape)}, expected uint8 " \
                       f"{[n, *image_shape]}"
        expected = [npz_io.IMAGE_KEY, npz_io.LABEL_KEY] if with_labels else [npz_io.IMAGE_KEY]
        if arrays != expected:
            return f"holds {arrays}, expected {expected}"
        if with_labels:
            with npz_io.NpzArrayReader(path, npz_io.LABEL_KEY) as labels:
                if labels.shape != (n,) or labels.dtype != np.int64:
                    return f"arr_1 is {labels.dtype} {list(labels.shape)}, expected int64 [{n}]"
        with zipfile.ZipFile(path) as z:  # reads every byte once: a damaged file fails its CRC
            bad = z.testzip()
        return None if bad is None else f"member {bad} fails its CRC check"
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        return str(e).replace(f"{path}: ", "")  # the caller names the file


def _read_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest.get("flags"), dict):
            raise ValueError("no 'flags' object")
        return manifest
    except (OSError, ValueError, AttributeError) as e:
        raise ScriptError(f"{path}: unreadable shard manifest ({e}); use another --output_dir "
                          f"or remove the folder") from e


def _check_same_flags(manifest_path: str, old: dict, new: dict) -> None:
    """Refuse, naming the first flag, a run whose samples would differ from the shards'."""
    folder = os.path.dirname(manifest_path)
    for name in sorted(set(old) | set(new)):
        if name == "seed" and new.get(name) == -1:
            continue  # no --seed given: continue with the recorded one
        if name.endswith(_HASH_SUFFIX) and (name not in old or name not in new):
            continue  # a manifest of an older version (or a remote file): nothing to compare
        if name.endswith(_HASH_SUFFIX) and old[name] != new[name]:
            flag = name[: -len(_HASH_SUFFIX)]
            raise ScriptError(
                f"--{flag} {new.get(flag)!r} is not the file the samples in {folder} were made "
                f"from (its sha256 is {new[name][:12]}..., theirs {old[name][:12]}...); put that "
                f"file back to finish them, or use another --output_dir")
        if old.get(name) != new.get(name):
            raise ScriptError(
                f"--{name} is {new.get(name)!r}, but the samples in {folder} were made with "
                f"{old.get(name)!r}; rerun with the same flags to finish them, or use another "
                f"--output_dir")


def _remove_partial_writes(folder: str, prefix: str = "") -> None:
    """Delete the temporaries of `atomic_write`s that a killed run left in `folder` (the one
    cleaner, `fileio.remove_stale_temp_files`), logging each."""
    for path in remove_stale_temp_files(folder, prefix):
        logger.log(f"removed {path}, a partial write of a killed run")


def plan_shards(folder: str, flags: dict, image_shape: Sequence[int],
                with_labels: bool) -> tuple[int, list[tuple[int, int]]]:
    """
    Rank 0's start of a sharded run: create or check `folder`'s manifest, remove partial writes
    of killed runs, and list the shards still to write (a damaged one is logged and redone).

    :param flags: `sample_flags(args)`; num_samples, shard_size and seed are read from it.
    :return: (the seed every sample uses, [(start, stop)] of the shards to write).
    :raises ScriptError: in one line when the folder's samples were made with other flags.
    """
    num_samples, shard_size = flags["num_samples"], flags["shard_size"]
    if num_samples < 1 or shard_size < 1:
        bad = "num_samples" if num_samples < 1 else "shard_size"
        raise ScriptError(f"--{bad} must be >= 1, got {flags[bad]}")
    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, npz_io.SHARD_MANIFEST)
    if os.path.exists(manifest_path):
        manifest = _read_manifest(manifest_path)
        _check_same_flags(manifest_path, manifest["flags"], flags)
        seed = manifest["flags"]["seed"]
    elif any(npz_io.SHARD_PATTERN.match(name) for name in os.listdir(folder)):
        raise ScriptError(f"{folder}: shards without {npz_io.SHARD_MANIFEST}, so their flags are "
                          f"unknown; remove them or use another --output_dir")
    else:
        seed = flags["seed"]
        if seed < 0:
            # Without --seed the run still needs one seed for all its samples and resumes: draw
            # it once and record it.
            seed = secrets.randbelow(2**31)
            logger.log(f"no --seed given: drew seed {seed} (recorded in {manifest_path})")
        manifest = dict(num_samples=num_samples, shard_size=shard_size,
                        image_shape=list(image_shape), labelled=with_labels,
                        flags=dict(flags, seed=seed))
        text = json.dumps(manifest, indent=2, sort_keys=True)
        atomic_write(manifest_path, lambda f: f.write(text.encode("utf-8")))
    _remove_partial_writes(folder)  # the folder is ours: any hidden .tmp is a partial write
    todo = []
    for start, stop in shard_ranges(num_samples, shard_size):
        path = os.path.join(folder, npz_io.shard_name(start, stop))
        if not os.path.exists(path):
            todo.append((start, stop))
        elif (problem := shard_problem(path, start, stop, image_shape, with_labels)) is not None:
            logger.log(f"{path}: damaged ({problem}); sampling it again")
            todo.append((start, stop))
    total = len(shard_ranges(num_samples, shard_size))
    logger.log(f"shards: {total - len(todo)} of {total} complete in {folder}, {len(todo)} to write")
    return seed, todo


def write_shards(sample_fn, todo: Sequence[tuple[int, int]], seed: int, folder: str,
                 batch_size: int, image_shape: Sequence[int], with_labels: bool,
                 progress: bool = False) -> int:
    """
    Write this rank's share of the shards `todo` (every world-size-th, from its rank), each
    computed in batches of `batch_size` and written atomically.

    :param sample_fn: (indices, seed) -> ([n x H x W x C] uint8 samples, [n] labels or None).
    :return: the number of shards this rank wrote.
    """
    rank, world_size = world()
    mine = list(todo)[rank::world_size]
    bar = None
    if progress and rank == 0:

        bar = tqdm(total=sum(b - a for a, b in mine), desc="samples (rank 0)", unit="img")
    for start, stop in mine:
        images = np.empty((stop - start, *image_shape), dtype=np.uint8)
        labels = np.empty((stop - start,), dtype=np.int64) if with_labels else None
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            sample, label = sample_fn(list(range(a, b)), seed)
            images[a - start:b - start] = sample.cpu().numpy()
            if labels is not None:
                labels[a - start:b - start] = label.cpu().numpy()
            if bar is not None:
                bar.update(b - a)
        path = os.path.join(folder, npz_io.shard_name(start, stop))
        write_samples_npz(path, images.shape, [images], labels)
        logger.log(f"wrote {path}")
    if bar is not None:
        bar.close()
    return len(mine)


def merge_shards(folder: str, out_dir: str, grid_size: int = 100) -> str:
    """
    Stream a complete shard folder into the original's `samples_{N}x{H}x{W}x{C}.npz` in
    `out_dir` (memory: one shard's rows, plus the [N] labels), and its PNG grid.

    :return: the path of the .npz.
    """
    with npz_io.ShardFolderReader(folder, npz_io.IMAGE_KEY) as images:  # checks the tiling
        labels = None
        with npz_io.NpzArrayReader(images.shards[0][2]) as first_shard:
            labelled = npz_io.LABEL_KEY in first_shard.arrays
        if labelled:  # 8 bytes a sample: kept whole, written after the images
            with npz_io.ShardFolderReader(folder, npz_io.LABEL_KEY) as reader:
                labels = reader.read_batch(len(reader))
        out_path = os.path.join(out_dir, samples_file_name(images.shape))
        _remove_partial_writes(out_dir, f"{os.path.basename(out_path)}.")
        logger.log(f"merging {len(images.shards)} shards into {out_path}")
        rows_per_read = max(stop - start for start, stop, _ in images.shards)
        write_samples_npz(out_path, images.shape, images.batches(rows_per_read), labels)
    if grid_size > 0:
        with npz_io.ShardFolderReader(folder, npz_io.IMAGE_KEY) as images:
            first = images.read_batch(grid_size)
        save_grid(out_path, first, None if labels is None else labels[:len(first)], grid_size)
    return out_path


def wait_for_shards(folder: str, shards: Sequence[tuple[int, int]], poll_s: float = 0.2,
                    timeout_s: float | None = None, shard_s: float = 0.0) -> None:
    """
    Rank 0: wait until every shard of `shards` exists (the other ranks write theirs). A poll of
    the folder, not a collective: a rank that is a whole shard behind may take longer than a
    barrier's timeout (minutes under NCCL), and the other ranks need not wait for the merge.

    Never unbounded: when no shard arrives for max(`timeout_s`, 2 x `shard_s`) seconds, a peer
    is taken for dead and `PeerLostError` names the ranks that owe shards (as training's
    collectives do). The shards written stay; a rerun of the same command finishes the rest.

    :param shards: the run's shards to write, in the order the ranks took them round-robin
        (shard k is rank k % world_size's).
    :param timeout_s: default: --dist_timeout (`dist_util.collective_timeout`).
    :param shard_s: how long one shard took on this rank (a slow shard is not a dead peer).
    """
    timeout_s = dist_util.collective_timeout() if timeout_s is None else timeout_s
    bound = max(timeout_s, 2.0 * shard_s)
    owner = {tuple(r): k % world()[1] for k, r in enumerate(shards)}
    missing = list(shards)
    last_log = last_arrival = time.monotonic()
    while True:
        still = [(a, b) for a, b in missing
                 if not os.path.exists(os.path.join(folder, npz_io.shard_name(a, b)))]
        if not still:
            return
        now = time.monotonic()
        if len(still) < len(missing):
            last_arrival = now
        missing = still
        if now - last_arrival > bound:
            ranks = sorted({owner[tuple(r)] for r in missing})
            raise PeerLostError(
                f"rank 0 of {world()[1]}: no shard arrived for {now - last_arrival:.0f}s "
                f"(--dist_timeout {timeout_s:g}s): rank(s) {', '.join(map(str, ranks))} still "
                f"owe {len(missing)} shard(s), e.g. {npz_io.shard_name(*missing[0])}; a peer "
                f"died or stalled. The {len(shards) - len(missing)} other shard(s) are kept: "
                "rerun the same command to finish")
        if now - last_log > 60:
            logger.log(f"waiting for {len(missing)} shards from the other ranks")
            last_log = now
        time.sleep(poll_s)


def sample_and_save(sample_fn, args, image_size: int, with_labels: bool) -> str | None:
    """
    What every sampling script ends with: write `--num_samples` samples of `sample_fn` (see
    `make_sample_fn`) as shards in `{output_dir}/samples_shards/` (only those still missing,
    when rerun), then merge them on rank 0 into `samples_{N}x{H}x{W}x3.npz` and its grid.

    :param image_size: H = W of the samples.
    :param with_labels: whether `sample_fn` returns labels to save as `arr_1`.
    :return: the .npz path on rank 0, None on the other ranks.
    """
    rank, _ = world()
    image_shape = (image_size, image_size, 3)
    plan: dict = {}
    if rank == 0:
        # Without --output_dir each rank's logger has a temporary folder of its own: rank 0's
        # is the run's.
        out_dir = args.output_dir or logger.get_dir()
        try:
            folder = os.path.join(out_dir, SHARD_FOLDER)
            flags = dict(sample_flags(args), **content_hashes(args))
            seed, todo = plan_shards(folder, flags, image_shape, with_labels)
            plan = dict(out_dir=out_dir, seed=seed, todo=todo)
        except (ScriptError, OSError) as e:
            plan = dict(error=f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e))
    # Every rank learns the plan (or the refusal) from rank 0: the ranks must agree on which
    # shards are missing, and a shard that another rank finishes meanwhile must not change that.
    plan = dist_util.broadcast_object(plan)
    if "error" in plan:
        if rank != 0:
            sys.exit(1)  # rank 0 says why, in one line
        raise ScriptError(plan["error"])
    folder = os.path.join(plan["out_dir"], SHARD_FOLDER)
    todo = [tuple(r) for r in plan["todo"]]
    started = time.monotonic()
    written = write_shards(sample_fn, todo, plan["seed"], folder, args.batch_size, image_shape,
                           with_labels, progress=bool(args.progress))
    out_path = None
    if rank == 0:
        shard_s = (time.monotonic() - started) / written if written else 0.0
        wait_for_shards(folder, todo, shard_s=shard_s)
        out_path = merge_shards(folder, plan["out_dir"], args.grid_size)
    logger.log("sampling complete")
    return out_path
