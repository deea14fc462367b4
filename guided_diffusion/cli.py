"""What every script does with its command line: set up, build or load models from flags, exit.

- `setup`: process group, logger directory and seeding from the common flags.
- `build_model_and_diffusion` / `load_model_and_diffusion`: flags -> model (+ checkpoint) ->
  device, fp16, eval mode, fast path, for each `MODEL_KINDS` entry (U-Net, DiT, super-res,
  classifier); `--model dit` picks the DiT for the image model, `--latent_vae` sizes it for
  latents (`latent.py`).
- `flags_from_run`: the model flags not given, from the args.json beside a checkpoint (or the
  preset of a released file's name); `training_flags` does it for --init_checkpoint and
  --teacher_path and splits --global_batch_size.
- `apply_fast_flags`: the fast-path flags of a script applied to a model (`fast.apply_fast_path`
  does the work; this resolves the flags first).
- `train_diffusion`: the original's TrainLoop run from the `config.TrainingConfig` flags.
- `run_main`: turns user errors (flag/checkpoint mismatch, missing files) into one line on stderr
  and exit status 1 instead of a traceback (set GD_TRACEBACK=1 to get the traceback).

Sampling and its output (seeded noise, ranks, gathering, .npz and grids) live in `sample_util`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch as th

from . import dist_util, logger, run_lock
from .dist_util import world
from .checkpoints import (
    AUTO_RESUME,
    compare_run_flags,
    find_model_checkpoints,
    load_model_checkpoint,
    read_run_flags,
    save_run_flags,
)
from .config import (
    MODEL_CHOICES,
    PRESET_BY_FILE_NAME,
    PRESETS,
    ClassifierConfig,
    DiffusionConfig,
    DiTConfig,
    LatentConfig,
    SuperResConfig,
    UNetConfig,
    defaults,
    given_flags,
    preset_flags,
    preset_for_file,
)
from .errors import USER_ERRORS, CheckpointError, RunFlagsError, ScriptError
from .fast import apply_fast_flags, fast_config  # noqa: F401 -- the scripts' names, re-exported
from .fileio import remove_stale_temp_files
from .costs import training_cost
from .image_datasets import load_data
from .latent import LatentSpace, load_latent_data, space_from_flags
from .resample import create_named_schedule_sampler
from .sample_util import require_finite_samples  # noqa: F401 -- re-exported
from .script_util import (
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    create_dit_and_diffusion,
    create_model_and_diffusion,
    dit_and_diffusion_defaults,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from .train_util import TrainLoop, parse_ema_rates


# ------------------------------------------------------------------------------------------------
# Process setup


def setup(args, training: bool = False, kind: str | None = None) -> None:
    """
    Start the process group, set the CUDA math flags (--tf32, --cudnn_benchmark), point the logger
    at `--output_dir`, and seed torch if asked.

    With `kind` (a training script's network), take the flags of --init_checkpoint's or
    --teacher_path's run (`training_flags`). With `training`, also: take the output folder's lock
    (one training run per folder, see `run_lock`), remove the temporary files of killed writes
    there, and when resuming compare the flags with the run's `args.json` (`check_resume_flags`).
    """
    output_dir = getattr(args, "output_dir", "") or None
    folder = output_dir or os.getenv("OPENAI_LOGDIR")  # None: logger makes a new temp folder
    resume = getattr(args, "resume_checkpoint", "") if training else ""
    if resume == AUTO_RESUME and not folder:
        raise ScriptError("--resume_checkpoint auto continues the run in --output_dir, but there "
                          "is none (nor $OPENAI_LOGDIR): each run would start afresh in a new "
                          "temporary folder; pass the run's --output_dir")
    dist_util.setup_dist(timeout=getattr(args, "dist_timeout", None))
    if hasattr(args, "tf32"):  # every training and sampling script: fixed shapes, fp32 on CUDA
        dist_util.cuda_settings(tf32=args.tf32, benchmark=args.cudnn_benchmark)
    if folder:
        check_output_dir(folder)
    if training and folder:
        _lock_run_folder(folder)  # before the logger opens (and appends to) its files there
        refuse_foreign_checkpoints(folder, resume)  # before any file there is opened
    logger.configure(dir=output_dir)
    seed = getattr(args, "seed", -1)
    if seed is not None and seed >= 0:
        th.manual_seed(seed + world()[0])
        np.random.seed((seed + world()[0]) % 2**32)
        random.seed(seed + world()[0])  # all three global generators: checkpoints save them
    if kind is not None:
        training_flags(args, kind)
    if training:
        if not folder:
            _lock_run_folder(logger.get_dir())
        if world()[0] == 0:
            # Safe: we hold the lock, no one else writes here.
            removed = remove_stale_temp_files(logger.get_dir())
            if removed:
                logger.log(f"removed {len(removed)} stale temporary file(s) of killed writes in "
                           f"{logger.get_dir()}")
        check_resume_flags(args)


def _lock_run_folder(folder: str) -> None:
    if world()[0] != 0 or "://" in folder:
        return
    try:
        run_lock.acquire(os.path.expanduser(folder))
    except run_lock.LockedError as e:
        raise ScriptError(str(e)) from e


def refuse_foreign_checkpoints(folder: str, resume: str) -> None:
    """
    An output folder belongs to one run: refuse (in one line, on every rank, before anything is
    written there) a training command that would overwrite the checkpoints `folder` already
    holds, i.e. one that does not continue them: no --resume_checkpoint, or a checkpoint in
    another folder. `--resume_checkpoint auto` (or a model*.pt of `folder`) continues them.
    """
    problem = None
    if world()[0] == 0 and "://" not in folder:
        here = os.path.realpath(os.path.expanduser(folder))
        continues = resume == AUTO_RESUME or (
            resume and os.path.realpath(os.path.dirname(os.path.abspath(resume))) == here)
        found = [] if continues else find_model_checkpoints(folder)
        if found:
            problem = (
                f"--output_dir {folder!r} holds another run's checkpoints (newest "
                f"{os.path.basename(found[0])}); a fresh run would overwrite them: continue that "
                "run with --resume_checkpoint auto, or pick another --output_dir (nothing was "
                "written)")
    problem = dist_util.broadcast_object(problem)
    if problem:
        raise ScriptError(problem)


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


# Flags that change what a checkpoint's weights mean (many change no tensor shape, so the
# checkpoint loads under other values): a run's args.json must agree on them when sampling or
# resuming, for every model kind (U-Net, DiT, latent, classifier, consistency student, teacher).
# Other flags that change shapes are refused by the checkpoint's fit check, which names the flag.
MEANING_FLAGS = (
    "image_size", "large_size", "small_size", "num_heads", "num_head_channels",
    "num_heads_upsample", "use_new_attention_order", "diffusion_steps", "noise_schedule",
    "predict_xstart", "rescale_timesteps", "learn_sigma",
    # DiT: its size (dit_num_heads changes no shape), and the model choice itself.
    "model", "dit_model", "dit_depth", "dit_hidden_size", "dit_num_heads", "dit_patch_size",
    # Latent space: another VAE (or scale) reads the same latents as other images.
    "latent_vae", "latent_scale",
)
# Flags a run cannot change when it resumes: what the weights mean, and a consistency run's grid
# and its schedule (sampling rebuilds a student's grid from args.json, so all its checkpoints
# must share one; the iCT curriculum's N at a step follows from these).
RESUME_FLAGS = MEANING_FLAGS + ("training_mode", "cm_steps", "cm_spacing", "cm_curriculum",
                                "cm_steps_max", "cm_noise_dist")
# Model/diffusion flags that are free choices at sampling time (not compared).
SAMPLING_CHOICES = ("timestep_respacing", "use_fp16", "classifier_use_fp16", "use_checkpoint",
                    "dropout", "use_kl", "rescale_learned_sigmas")


# The flag groups that describe a checkpoint of each kind: what `flags_from_run` takes from the
# run's args.json. A classifier's run also trained with diffusion flags, which guidance ignores.
RUN_FLAG_GROUPS = {
    "unet": (UNetConfig, DiffusionConfig, DiTConfig, LatentConfig),
    "superres": (SuperResConfig, DiffusionConfig),
    "classifier": (ClassifierConfig,),
}
# Of those, the choices of each job rather than facts of the network: never taken from a run.
NOT_FROM_RUN = ("timestep_respacing", "cfg_channels", "latent_cache")
# The presets a checkpoint of each kind may be (a released file under another kind's flag is not
# identified, and then refused by the checkpoint's fit check).
_PRESET_KINDS = {"unet": ("unet", "dit"), "superres": ("superres",),
                 "classifier": ("classifier",)}
_ANY_MODEL_FLAG = {f.name for groups in RUN_FLAG_GROUPS.values() for group in groups
                   for f in dataclasses.fields(group)}


def flags_from_run(args, path_flag: str, kind: str = "unet", refuse: bool = True) -> list[str]:
    """
    Flags come with the model: the model and diffusion flags (`RUN_FLAG_GROUPS[kind]`) that the
    command line did not give are taken from the run's args.json beside `--path_flag`'s file;
    with no args.json there and no --preset, from the preset whose released file has that name
    (e.g. 64x64_diffusion.pt, its sampling flags too; `--preset none` turns this off). Given flags
    win; one that changes what the weights mean (`MEANING_FLAGS`) and differs is refused in one
    line naming it (with `refuse`; else logged, as the other differing model flags are). Taken
    flags count as given afterwards, so a second checkpoint (the classifier) must agree with them.

    Call it before building the network. A Namespace not parsed by `config.FlagParser` (its given
    flags unknown) is only compared, never filled.

    :param kind: "unet" (the image model, U-Net or DiT), "superres" or "classifier".
    :return: the names of the flags taken.
    """
    path = getattr(args, path_flag, "")
    if not path or "://" in path:
        return []
    run_dir = os.path.dirname(os.path.abspath(path))
    groups = RUN_FLAG_GROUPS[kind]
    names = list(dict.fromkeys(  # image_size is in several groups
        f.name for group in groups for f in dataclasses.fields(group)
        if f.name not in NOT_FROM_RUN and hasattr(args, f.name)))
    run, source, fill = read_run_flags(run_dir), f"the run's args.json in {run_dir}", names
    preset = getattr(args, "preset", PRESET_BY_FILE_NAME)
    if run is None and preset == PRESET_BY_FILE_NAME:
        name = preset_for_file(path)
        if name is None or PRESETS[name].kind not in _PRESET_KINDS[kind]:
            return []
        # A released checkpoint's flags: its command's, the rest at their defaults.
        run = {**defaults(*groups), **preset_flags(name, sampling=hasattr(args, "cfg_scale"))}
        source = (f"the released {os.path.basename(path)}'s (preset {name}, by its file name; "
                  "--preset none: only the flags given)")
        # and the command's other networks' (classifier_sample's --classifier_depth) and sampling
        # flags; not a training recipe (--init_checkpoint fine-tunes with the flags given).
        fill = names + [k for k in run if k not in names and hasattr(args, k) and (
            k in _ANY_MODEL_FLAG or k in PRESETS[name].sampling)]
    if run is None:
        return []
    given = given_flags(args)
    taken = [] if given is None else [k for k in fill if k in run and k not in given]
    for k in taken:
        setattr(args, k, run[k])
    if given is not None:
        given.update(taken)
    if taken:
        logger.log(f"--{path_flag}: {', '.join(taken)} from {source}")
    compared = [k for k in names if k not in SAMPLING_CHOICES]
    meaning = [k for k in compared if refuse and k in MEANING_FLAGS]
    try:
        compare_run_flags(vars(args), run_dir, meaning, [k for k in compared if k not in meaning],
                          f"--{path_flag} {path!r}", run=run, run_source=source)
    except RunFlagsError as e:
        raise ScriptError(str(e)) from e
    return taken


def training_flags(args, kind: str) -> None:
    """
    The flags a training script takes before it builds its network: those of --teacher_path's
    run (refused where they differ in meaning: the student must learn the teacher's ODE) and of
    --init_checkpoint's (fine-tuning may change a flag's meaning on purpose: logged, not refused),
    then --global_batch_size split over the ranks into --batch_size.
    """
    for path_flag, refuse in (("teacher_path", True), ("init_checkpoint", False)):
        flags_from_run(args, path_flag, kind, refuse=refuse)
    total = getattr(args, "global_batch_size", 0)
    if total:
        ranks = world()[1]
        if total % ranks:
            raise ScriptError(f"--global_batch_size {total} does not split evenly over {ranks} "
                              "ranks")
        given = given_flags(args) or set()
        if "batch_size" in given and args.batch_size != total // ranks:
            raise ScriptError(f"--batch_size {args.batch_size} and --global_batch_size {total} "
                              f"over {ranks} rank(s) ({total // ranks} each) disagree: give one")
        args.batch_size = total // ranks


def check_resume_flags(args) -> None:
    """Resuming: refuse flags in `RESUME_FLAGS` that differ from the run's args.json."""
    resume = getattr(args, "resume_checkpoint", "")
    if not resume:
        return
    run_dir = logger.get_dir() if resume == AUTO_RESUME else os.path.dirname(resume)
    if "://" in run_dir:
        return
    try:
        compare_run_flags(vars(args), run_dir, RESUME_FLAGS, (),
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
        space = space_from_flags(args)
        flags.update(in_channels=space.channels, image_size=space.model_size(args.image_size))
    try:
        model, diffusion = spec.factory(**flags)
    except ValueError as e:  # bad flag values (e.g. an image size without a default channel_mult)
        raise ScriptError(str(e)) from e
    fp16_flag = MODEL_KINDS[kind].fp16_flag
    if getattr(args, fp16_flag, False) and dist_util.dev().type == "cpu":
        logger.log(f"WARNING: --{fp16_flag} True on the CPU: float16 arithmetic is emulated "
                   "here and runs many times slower than float32 (float16 is for GPUs); drop "
                   "the flag, or use --use_bf16 True on a CPU with bfloat16 support")
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
    Build the network of `kind` from flags (those not given taken from the checkpoint's run,
    `flags_from_run`), load its checkpoint (`--model_path`, or `--classifier_path` for the
    classifier), move it to the device, convert it to fp16 when its
    fp16 flag is set (after loading: released checkpoints hold float32 weights), switch it to
    eval mode and apply the fast-path flags.

    :return: (model, diffusion).
    """
    path_flag = MODEL_KINDS[kind].path_flag
    flags_from_run(args, path_flag, kind)  # the run's args.json (or released preset) fills in
    spec = MODEL_KINDS[model_kind(args, kind)]
    model, diffusion = build_model_and_diffusion(args, kind)
    load_checkpoint(model, getattr(args, path_flag), path_flag)
    model.to(dist_util.dev())
    if fast_config(args, spec.fp16_flag).use_fp16:  # the flag, or --fast on CUDA < 8.0
        model.convert_to_fp16()
    model.eval()  # sampling and evaluation only: dropout stays off
    apply_fast_flags(args, model, spec.fp16_flag)
    return model, diffusion


def dry_run(args, kind: str) -> dict:
    """
    --dry_run: build the network of `kind` from the flags on the meta device, print its parameters,
    FLOPs per step and estimated memory per rank for those flags, and train nothing.

    :return: `training_cost`'s dict.
    """
    spec = MODEL_KINDS[kind]
    with th.device("meta"):
        model, _ = spec.factory(**args_to_dict(args, spec.defaults().keys()))
        micro = args.microbatch if 0 < args.microbatch < args.batch_size else args.batch_size
        size = args.large_size if kind == "superres" else args.image_size
        channels = getattr(model, "in_channels", 3)
        if kind == "superres":
            channels = 3  # the low-res image is concatenated inside the model
        inputs = {"x": th.zeros(micro, channels, size, size), "timesteps": th.zeros(micro).long()}
        if kind == "superres":
            inputs["low_res"] = th.zeros(micro, 3, args.small_size, args.small_size)
        if getattr(model, "num_classes", None) and kind != "classifier":
            inputs["y"] = th.zeros(micro).long()
    cfg = fast_config(args, spec.fp16_flag)  # --fast resolved for this device, as training does
    precision = "fp16" if cfg.use_fp16 else ("bf16" if cfg.use_bf16 else "fp32")
    if precision == "fp16" and hasattr(model, "convert_to_fp16"):
        model.convert_to_fp16()  # as MixedPrecisionTrainer does before training
    n_ema = len(parse_ema_rates(getattr(args, "ema_rate", "")))
    cost = training_cost(model, inputs, args.batch_size, args.microbatch, n_ema, precision)
    gib = 2.0**30
    lines = [
        f"dry run ({type(model).__name__}, {precision}): {cost['params']:,} parameters "
        f"({cost['params'] / 1e6:.1f} M)",
        f"per step on each rank: {cost['flops_per_step'] / 1e9:,.2f} GFLOPs forward + backward "
        f"(batch {args.batch_size} in {cost['passes']} pass(es) of {micro})",
        f"memory per rank: {cost['state_bytes'] / gib:.2f} GiB weights, grads, AdamW and "
        f"{n_ema} EMA; {cost['activation_bytes'] / gib:.2f} GiB activations per pass; "
        f"about {cost['total_bytes'] / gib:.2f} GiB in all, plus the CUDA context (~1 GiB)",
    ]
    for line in lines:
        logger.log(line)
    return cost


# ------------------------------------------------------------------------------------------------
# Fast path and training from flags


def start_training(args, kind: str) -> bool:
    """
    The start of every training script: the process group, the logger in --output_dir, the run
    lock, stale-temp cleanup and the resume-flag check (`setup(training=True)`), then the run's
    args.json. With --dry_run: print the step's cost for the network of `kind`, take no lock,
    write nothing.

    :return: False for a dry run (the script stops), else True.
    """
    dry = bool(getattr(args, "dry_run", False))
    setup(args, training=not dry, kind=kind)
    if dry:
        dry_run(args, kind)
        return False
    save_run_flags(vars(args))
    return True


def training_data(args, **overrides):
    """
    The training batches of the data flags: --data_dir (required), --batch_size, --image_size,
    --class_cond, --random_flip, --num_classes, --skip_bad_images, --num_workers, --data_index
    (default {output_dir}/data_index), --data_check and the seeded, resumable order of --seed;
    in latent space (--latent_vae) the data set's cached encodings, in the same resumable order.
    `overrides` replace or add `load_data` arguments (e.g. random_crop, a validation folder's
    data_dir and seed).
    """
    require_path(overrides.get("data_dir", args.data_dir), "data_dir", kind="dir")
    kwargs = dict(data_dir=args.data_dir, batch_size=args.batch_size,
                  image_size=getattr(args, "image_size", None),
                  class_cond=getattr(args, "class_cond", False), random_flip=args.random_flip)
    kwargs.update(overrides)
    kwargs.setdefault("seed", data_seed(args))
    space = space_from_flags(args)
    if isinstance(space, LatentSpace):  # the data set's encodings, cached once
        cache_dir = args.latent_cache or os.path.join(logger.get_dir(), "latent_cache")
        return load_latent_data(space=space, cache_dir=cache_dir, **kwargs)
    index_dir = args.data_index or os.path.join(logger.get_dir(), "data_index")
    return load_data(num_classes=args.num_classes, skip_bad_images=args.skip_bad_images,
                     num_workers=args.num_workers, index_dir=index_dir, check=args.data_check,
                     **kwargs)


def train_loop_kwargs(args, fp16_flag: str = "use_fp16") -> dict:
    """The TrainLoop arguments of the `config.TrainingConfig` flags a script has (the one
    builder: every training mode gets them from here)."""
    names = ("batch_size", "microbatch", "lr", "ema_rate", "log_interval", "save_interval",
             "resume_checkpoint", "fp16_scale_growth", "weight_decay", "lr_anneal_steps",
             "grad_clip", "lr_warmup_steps", "max_bad_steps", "init_checkpoint",
             "sample_interval")
    kwargs = {k: getattr(args, k) for k in names if hasattr(args, k)}
    kwargs["use_fp16"] = fast_config(args, fp16_flag).use_fp16  # the flag, or --fast on CUDA < 8.0
    return kwargs


def train_diffusion(args, model, diffusion, data, loop: Callable | None = None,
                    fp16_flag: str = "use_fp16", **loop_kwargs) -> None:
    """Run the original's TrainLoop from the `config.TrainingConfig` flags (and `fp16_flag`,
    --use_fp16 by default) on `model`, after applying the fast-path flags to it (bf16 autocast
    goes to the loop); `loop` is a training mode to run instead (ClassifierTrainLoop,
    CMTrainLoop), given `loop_kwargs` besides. A diffusion loop gets --schedule_sampler's
    sampler; other modes draw their own indices (uniform)."""
    fast_cfg = apply_fast_flags(args, model, fp16_flag)
    logger.log("training...")
    sampler = getattr(args, "schedule_sampler", "uniform")
    if loop is not None and loop_kwargs.get("schedule_sampler") is None and sampler != "uniform":
        raise ScriptError(f"--schedule_sampler {sampler} applies to diffusion "
                          f"training only, not to {loop.__name__}")
    if loop is None:
        loop_kwargs["schedule_sampler"] = create_named_schedule_sampler(sampler, diffusion)
    kwargs = train_loop_kwargs(args, fp16_flag)
    if kwargs.get("sample_interval") and getattr(args, "latent_vae", ""):
        # A grid of latents shows nothing, and decoding would hold the VAE beside the training
        # run: latent runs are looked at through image_sample.py on a checkpoint instead.
        logger.log("--sample_interval: no grids in latent space (--latent_vae); sample a "
                   "checkpoint with image_sample.py to see images")
        kwargs["sample_interval"] = 0
    (loop or TrainLoop)(
        model=model, diffusion=diffusion, data=data, use_bf16=fast_cfg.use_bf16,
        fused_adam=fast_cfg.fused_adam, **kwargs, **loop_kwargs,
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


# ------------------------------------------------------------------------------------------------
# Entry point


def run_main(main: Callable[[], None]) -> None:
    """
    Call a script's `main()`, turning user errors into one line `error: ...` on stderr and exit
    status 1 (GD_TRACEBACK=1 re-raises them with the traceback).
    """
    try:
        main()
        # Every rank done before any rank tears the group down: a rank still in its last
        # collective when a peer exits can abort at exit (gloo's threads), after its work is
        # saved but with a failing exit status.
        dist_util.finish_barrier()
    except USER_ERRORS as e:
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
