"""What every script does with its command line: set up, build or load models from flags, exit.

- `setup`: process group, logger directory and seeding from the common flags.
- `build_model_and_diffusion` / `load_model_and_diffusion`: flags -> model (+ checkpoint) ->
  device, fp16, eval mode, fast path, for each `MODEL_KINDS` entry (U-Net, super-res, classifier).
- `apply_fast_flags`: the fast-path flags of a script applied to a model (`fast.apply_fast_path`
  does the work; this resolves the flags first).
- `train_diffusion`: the original's TrainLoop run from the `config.TrainingConfig` flags.
- `run_main`: turns user errors (flag/checkpoint mismatch, missing files) into one line on stderr
  and exit status 1 instead of a traceback (set GD_TRACEBACK=1 to get the traceback).

Sampling and its output (seeded noise, ranks, gathering, .npz and grids) live in `sample_util`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch as th

from . import dist_util, fast, logger
from .checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    load_model_checkpoint,
)
from .script_util import (
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
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


def setup(args) -> None:
    """Start the process group, point the logger at `--output_dir`, and seed torch if asked."""
    dist_util.setup_dist()
    output_dir = getattr(args, "output_dir", "") or None
    logger.configure(dir=output_dir)
    seed = getattr(args, "seed", -1)
    if seed is not None and seed >= 0:
        th.manual_seed(seed + world()[0])
        np.random.seed((seed + world()[0]) % 2**32)


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


MODEL_KINDS = {
    "unet": ModelKind(model_and_diffusion_defaults, create_model_and_diffusion,
                      "model_path", "use_fp16"),
    "superres": ModelKind(sr_model_and_diffusion_defaults, sr_create_model_and_diffusion,
                          "model_path", "use_fp16"),
    "classifier": ModelKind(classifier_and_diffusion_defaults, create_classifier_and_diffusion,
                            "classifier_path", "classifier_use_fp16"),
}


def build_model_and_diffusion(args, kind: str = "unet"):
    """
    Build a fresh network and its diffusion from the flags of `kind`, on `dist_util.dev()`.

    :param kind: a key of MODEL_KINDS: "unet" (image_*), "superres" (super_res_*), "classifier".
    :return: (model, diffusion); the model is float32 and in training mode.
    """
    spec = MODEL_KINDS[kind]
    try:
        model, diffusion = spec.factory(**args_to_dict(args, spec.defaults().keys()))
    except ValueError as e:  # bad flag values (e.g. an image size without a default channel_mult)
        raise ScriptError(str(e)) from e
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
    spec = MODEL_KINDS[kind]
    model, diffusion = build_model_and_diffusion(args, kind)
    load_checkpoint(model, getattr(args, spec.path_flag), spec.path_flag)
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
    ).run_loop()


# ------------------------------------------------------------------------------------------------
# Entry point


def run_main(main: Callable[[], None]) -> None:
    """
    Call a script's `main()`, turning user errors into one line `error: ...` on stderr and exit
    status 1 (GD_TRACEBACK=1 re-raises them with the traceback).
    """
    try:
        main()
    except (ScriptError, CheckpointError, CheckpointMismatchError, FileNotFoundError) as e:
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
