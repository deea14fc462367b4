"""What every script does with its command line: set up, build or load models from flags, exit.

- `setup`: process group, logger directory and seeding from the common flags.
- `build_model_and_diffusion` / `load_model_and_diffusion`: flags -> model (+ checkpoint) ->
  device, fp16, eval mode, fast path, for each `MODEL_KINDS` entry (U-Net, DiT, super-res,
  classifier); `--model dit` picks the DiT for the image model, `--latent_vae` sizes it for
  latents (`latent.py`).
- `apply_fast_flags`: the fast-path flags of a script applied to a model (`fast.apply_fast_path`
  does the work; this resolves the flags first).
- `train_diffusion`: the original's TrainLoop run from the `config.TrainingConfig` flags.
- `run_main`: turns user errors (flag/checkpoint mismatch, missing files) into one line on stderr
  and exit status 1 instead of a traceback (set GD_TRACEBACK=1 to get the traceback).

Sampling and its output (seeded noise, ranks, gathering, .npz and grids) live in `sample_util`.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch as th

from . import dist_util, fast, logger, run_lock
from .checkpoints import (
    AUTO_RESUME,
    CheckpointError,
    CheckpointMismatchError,
    RunFlagsError,
    compare_run_flags,
    load_model_checkpoint,
    remove_stale_temp_files,
)
from .config import (
    DIT_SHARED_FLAGS,
    MODEL_CHOICES,
    DiffusionConfig,
    DiTConfig,
    UNetConfig,
    defaults,
    from_flags,
)
from .dit import DiT, DiT_models
from .respace import SpacedDiffusion
from .image_datasets import DataError
from .script_util import (
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
    diffusion_from_config,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)


class ScriptError(Exception):
    """A mistake in the command line or its files: reported as one line, without a traceback."""


# ------------------------------------------------------------------------------------------------
# Process setup


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    return dist_util.get_rank(), dist_util.get_world_size()


def setup(args, training: bool = False) -> None:
    """
    Start the process group, point the logger at `--output_dir`, and seed torch if asked.

    With `training`, also: take the output folder's lock (one training run per folder, see
    `run_lock`), remove the temporary files of killed writes there, and when resuming compare the
    flags with the run's `args.json` (`check_resume_flags`).
    """
    dist_util.setup_dist(timeout=getattr(args, "dist_timeout", None))
    output_dir = getattr(args, "output_dir", "") or None
    folder = output_dir or os.getenv("OPENAI_LOGDIR")  # None: logger makes a new temp folder
    if folder:
        check_output_dir(folder)
    if training and folder:
        _lock_run_folder(folder)  # before the logger opens (and appends to) its files there
    logger.configure(dir=output_dir)
    seed = getattr(args, "seed", -1)
    if seed is not None and seed >= 0:
        th.manual_seed(seed + world()[0])
        np.random.seed((seed + world()[0]) % 2**32)
        random.seed(seed + world()[0])  # all three global generators: checkpoints save them
    if training:
        if not folder:
            _lock_run_folder(logger.get_dir())
        if world()[0] == 0:
            # Safe: we hold the lock, no one else writes here.
            remove_stale_temp_files(logger.get_dir())
        check_resume_flags(args)


def _lock_run_folder(folder: str) -> None:
    if world()[0] != 0 or "://" in folder:
        return
    try:
        run_lock.acquire(os.path.expanduser(folder))
    except run_lock.LockedError as e:
        raise ScriptError(str(e)) from e


def check_output_dir(path: str) -> None:
    """Refuse an `--output_dir` that is a file, cannot be created or is not writable."""
    if "://" in path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ScriptError(f"--output_dir {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ScriptError(f"--output_dir {path!r}: cannot create it: {e.strerror}") from e
    try:  # a real write: os.access says yes to root on read-only folders
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ScriptError(f"--output_dir {path!r} is not writable: {e.strerror}") from e


# Flags that change what a checkpoint's weights mean but no tensor shape (so the checkpoint
# loads under other values): a run's args.json must agree on them when sampling or resuming.
# Flags that change shapes are refused by the checkpoint's fit check, which names the flag.
MEANING_FLAGS = (
    "image_size", "large_size", "small_size", "num_heads", "num_head_channels",
    "num_heads_upsample", "use_new_attention_order", "diffusion_steps", "noise_schedule",
    "predict_xstart", "rescale_timesteps",
)
# Model/diffusion flags that are free choices at sampling time (not compared).
SAMPLING_CHOICES = ("timestep_respacing", "use_fp16", "classifier_use_fp16", "use_checkpoint",
                    "dropout", "use_kl", "rescale_learned_sigmas")


def check_resume_flags(args) -> None:
    """Resuming: refuse flags in `MEANING_FLAGS` that differ from the run's args.json."""
    resume = getattr(args, "resume_checkpoint", "")
    if not resume:
        return
    run_dir = logger.get_dir() if resume == AUTO_RESUME else os.path.dirname(resume)
    if "://" in run_dir:
        return
    try:
        compare_run_flags(vars(args), run_dir, MEANING_FLAGS, (),
                          f"--resume_checkpoint {resume!r}")
    except RunFlagsError as e:
        raise ScriptError(str(e)) from e


def require_path(path: str, flag: str, kind: str = "file") -> None:
    """Fail with a line naming `--flag` when a local path is empty or missing (remote URLs pass)."""
    if not path:
        raise ScriptError(f"--{flag} is required")
    if "://" in path:
        return
    ok = os.path.isdir(path) if kind == "dir" else os.path.isfile(path)
    if not ok:
        raise ScriptError(f"--{flag}: no such {kind}: {path!r}")


# ------------------------------------------------------------------------------------------------
# Models from flags


@dataclass(frozen=True)
class ModelKind:
    """How to build one kind of network from flags, and which flags name its file and fp16."""

    defaults: Callable[[], dict]  # the flags the factory takes (script_util's *_defaults)
    factory: Callable  # **flags -> (model, diffusion)
    path_flag: str  # the checkpoint flag, e.g. "model_path"
    fp16_flag: str  # the original's fp16 switch of this network


def dit_and_diffusion_defaults() -> dict:
    """The flags of a DiT and its diffusion: DiTConfig's, the shared UNetConfig ones, diffusion."""
    shared = {k: v for k, v in defaults(UNetConfig).items() if k in DIT_SHARED_FLAGS}
    return {**shared, **defaults(DiTConfig, drop=("model", "cfg_channels")),
            **defaults(DiffusionConfig)}


def create_dit_and_diffusion(in_channels: int = 3, **flags) -> tuple[DiT, SpacedDiffusion]:
    """
    A DiT and its diffusion from the `dit_and_diffusion_defaults()` flags: --dit_model's size with
    the --dit_* overrides, input_size = --image_size (the latent side in latent space).

    :param in_channels: 3 in pixel space, the VAE's latent channels in latent space.
    """
    known = dit_and_diffusion_defaults()
    unknown = sorted(set(flags) - set(known))
    if unknown:
        raise TypeError(f"unknown flag(s) {unknown} for a DiT")
    f = {**known, **flags}
    if f["dit_model"] not in DiT_models:
        raise ValueError(f"--dit_model {f['dit_model']!r}: one of {', '.join(DiT_models)}")
    if not f["class_cond"]:
        raise ValueError("--model dit is class-conditional (its label embedding): use "
                         "--class_cond True (for unlabelled data: one file-name prefix, e.g. "
                         "0_*.png, and --num_classes 1)")
    sizes = {k: f[f"dit_{k}"] for k in ("depth", "hidden_size", "num_heads", "patch_size")}
    model = DiT_models[f["dit_model"]](
        input_size=f["image_size"], in_channels=in_channels, num_classes=f["num_classes"],
        class_dropout_prob=f["class_dropout_prob"], learn_sigma=f["learn_sigma"],
        use_checkpoint=f["use_checkpoint"], **{k: v for k, v in sizes.items() if v},
    )
    return model, diffusion_from_config(from_flags(DiffusionConfig, f))


MODEL_KINDS = {
    "unet": ModelKind(model_and_diffusion_defaults, create_model_and_diffusion,
                      "model_path", "use_fp16"),
    "dit": ModelKind(dit_and_diffusion_defaults, create_dit_and_diffusion,
                     "model_path", "use_fp16"),
    "superres": ModelKind(sr_model_and_diffusion_defaults, sr_create_model_and_diffusion,
                          "model_path", "use_fp16"),
    "classifier": ModelKind(classifier_and_diffusion_defaults, create_classifier_and_diffusion,
                            "classifier_path", "classifier_use_fp16"),
}


def model_kind(args, kind: str = "unet") -> str:
    """The image model's kind from --model ("unet" or "dit"); other kinds are returned as is."""
    if kind != "unet":
        return kind
    choice = getattr(args, "model", "unet")
    if choice not in MODEL_CHOICES:
        raise ScriptError(f"--model {choice!r}: one of {', '.join(MODEL_CHOICES)}")
    return choice


def build_model_and_diffusion(args, kind: str = "unet"):
    """
    Build a fresh network and its diffusion from the flags of `kind`, on `dist_util.dev()`.

    For the image model ("unet"), --model dit builds a DiT instead, and --latent_vae sizes either
    for the VAE's latents (its channels; --image_size / its downsampling factor).

    :param kind: a key of MODEL_KINDS: "unet" (image_*), "superres" (super_res_*), "classifier".
    :return: (model, diffusion); the model is float32 and in training mode.
    """
    kind = model_kind(args, kind)
    spec = MODEL_KINDS[kind]
    flags = args_to_dict(args, spec.defaults().keys())
    if kind in ("unet", "dit"):
        from .latent import space_from_flags  # imports this module: not at the top

        space = space_from_flags(args)
        flags.update(in_channels=space.channels, image_size=space.model_size(args.image_size))
    try:
        model, diffusion = spec.factory(**flags)
    except ValueError as e:  # bad flag values (e.g. an image size without a default channel_mult)
        raise ScriptError(str(e)) from e
    cfg_channels = getattr(args, "cfg_channels", 0)
    if cfg_channels:
        model.cfg_channels = cfg_channels  # read by guidance.cfg_model
    model.to(dist_util.dev())
    return model, diffusion


def load_checkpoint(model: th.nn.Module, path: str, flag: str) -> None:
    """
    Load `path` (named by `--flag`) into `model`: read once by rank 0 and broadcast, then checked
    against the model (`CheckpointMismatchError` names the differing tensors and the likely flag).
    """
    require_path(path, flag)
    try:
        load_model_checkpoint(model, path, source=f"--{flag} {path!r}")
    except (CheckpointError, OSError) as e:  # unreadable or unsafe (pickled objects) file
        raise ScriptError(f"--{flag}: {e}") from e


def load_model_and_diffusion(args, kind: str = "unet"):
    """
    Build the network of `kind` from flags, load its checkpoint (`--model_path`, or
    `--classifier_path` for the classifier), move it to the device, convert it to fp16 when its
    fp16 flag is set (after loading: released checkpoints hold float32 weights), switch it to
    eval mode and apply the fast-path flags.

    :return: (model, diffusion).
    """
    spec = MODEL_KINDS[model_kind(args, kind)]
    model, diffusion = build_model_and_diffusion(args, kind)
    path = getattr(args, spec.path_flag)
    load_checkpoint(model, path, spec.path_flag)
    if "://" not in path:  # sampling from a run folder: its args.json must agree
        names = [k for k in spec.defaults() if k not in SAMPLING_CHOICES]
        if kind == "classifier":  # its diffusion flags were for training it only
            names = [k for k in names if k.startswith("classifier_") or k == "image_size"]
        try:
            compare_run_flags(vars(args), os.path.dirname(os.path.abspath(path)),
                              [k for k in names if k in MEANING_FLAGS],
                              [k for k in names if k not in MEANING_FLAGS],
                              f"--{spec.path_flag} {path!r}")
        except RunFlagsError as e:
            raise ScriptError(str(e)) from e
    model.to(dist_util.dev())
    if getattr(args, spec.fp16_flag):
        model.convert_to_fp16()
    model.eval()  # sampling and evaluation only: dropout stays off
    apply_fast_flags(args, model, spec.fp16_flag)
    return model, diffusion


# ------------------------------------------------------------------------------------------------
# Fast path and training from flags


def fast_config(args, fp16_flag: str = "use_fp16") -> fast.FastPathConfig:
    """The fast-path switches of the flags; all off for a parser without them."""
    if not all(hasattr(args, k) for k in fast.fast_defaults()):
        return fast.FastPathConfig()
    flags = dict(vars(args), use_fp16=bool(getattr(args, fp16_flag, False)))
    try:
        return fast.resolve_fast_flags(flags, dist_util.dev())
    except ValueError as e:
        raise ScriptError(str(e)) from e


def apply_fast_flags(args, model: th.nn.Module, fp16_flag: str = "use_fp16") -> fast.FastPathConfig:
    """
    Resolve the script's fast-path flags, apply them to `model` (in place, `fast.apply_fast_path`)
    and return the resolved switches.

    Call it after loading weights and converting to fp16; wrap forwards in
    `fast.autocast_context(dist_util.dev(), cfg.use_bf16)` (TrainLoop does so given use_bf16).
    """
    cfg = fast_config(args, fp16_flag)
    fast.apply_fast_path(model, **cfg.model_kwargs())
    return cfg


def train_diffusion(args, model, diffusion, data, use_bf16: bool, loop: Callable | None = None,
                    **loop_kwargs) -> None:
    """Run the original's TrainLoop from the `config.TrainingConfig` flags (and --use_fp16);
    `loop` is a subclass to run instead, given `loop_kwargs` besides (e.g. CMTrainLoop)."""
    from .resample import create_named_schedule_sampler
    from .train_util import TrainLoop

    logger.log("training...")
    if loop is not None and args.schedule_sampler != "uniform":
        raise ScriptError(f"--schedule_sampler {args.schedule_sampler} applies to diffusion "
                          f"training only, not to {loop.__name__}")
    (loop or TrainLoop)(
        **loop_kwargs,
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=(None if loop is not None
                          else create_named_schedule_sampler(args.schedule_sampler, diffusion)),
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        use_bf16=use_bf16,
        sample_interval=args.sample_interval,
        **resilience_kwargs(args),
    ).run_loop()


def data_seed(args, stream: int = 0) -> int | None:
    """
    The seed of a training data stream (order, crops, flips): from --seed when it is >= 0, else
    None (a random one, which checkpoints record so that a resume continues the same stream).
    `stream` tells the streams of one run apart (1: validation data).
    """
    seed = getattr(args, "seed", -1)
    if seed is None or seed < 0:
        return None
    return seed + 1_000_003 * stream


def resilience_kwargs(args) -> dict:
    """TrainLoop's guard flags (grad clip, warm-up, NaN stop, fine-tuning start) from `args`."""
    return dict(
        grad_clip=args.grad_clip, lr_warmup_steps=args.lr_warmup_steps,
        max_bad_steps=args.max_bad_steps, init_checkpoint=args.init_checkpoint,
    )


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


# ------------------------------------------------------------------------------------------------
# Entry point


def run_main(main: Callable[[], None]) -> None:
    """
    Call a script's `main()`, turning user errors into one line `error: ...` on stderr and exit
    status 1 (GD_TRACEBACK=1 re-raises them with the traceback).
    """
    try:
        main()
    except (ScriptError, CheckpointError, CheckpointMismatchError, DataError, OSError) as e:
        # OSError: files and devices (missing, unreadable, full disk, read-only), never our bugs.
        if os.environ.get("GD_TRACEBACK"):
            raise
        # Multi-line messages (e.g. a mismatch's list of causes) become one "; "-joined line.
        lines = [" ".join(line.split()) for line in str(e).splitlines() if line.strip()]
        message = "; ".join(lines).replace(":; - ", ": ").replace("; - ", "; ")
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        # Leave the process group before the interpreter exits: tearing gloo down during exit
        # can abort a rank ("terminate called without an active exception") after its work is done.
        dist_util.cleanup()
