"""Checkpoints in one place: read, broadcast, check, load, find and write them.

* **Read** (`load_file`, `read_state_dict`): with `torch.load(weights_only=True)`, so a checkpoint
  can never run code, from any path blobfile reads (local, gs://, az://). In a process group rank 0
  reads the file and broadcasts its bytes: one read per job, not one per rank.
* **Check and load** (`check_state_dict_fits`, `load_model_checkpoint`): a state_dict only fits the
  model built from the flags it was trained with; when it does not, `CheckpointMismatchError` lists
  what differs and names the flag(s) that most likely explain it, e.g. `'label_emb.weight' ... was
  the checkpoint trained with --class_cond True?`. Sampling and resuming both go through it.
* **Find** (`find_resume_checkpoint`, `find_ema_checkpoint`, `parse_resume_step_from_filename`):
  the original's names `model{step:06d}.pt`, `ema_{rate}_{step:06d}.pt`, `opt{step:06d}.pt`.
* **Write** (`atomic_write`, `save_atomic`, `save_run_flags`): a file is complete or absent.

Released checkpoints (`256x256_diffusion.pt`, ...) are plain float32 state_dicts; ours are too, or
a dict holding one under "model" / "state_dict". An `opt*.pt` file is the optimizer's state_dict
plus one `RESUME_KEY` entry holding every other field a resume needs (see `TrainLoop.resume_state`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any, Iterable, Union

import blobfile as bf
import torch as th
import torch.nn as nn

from . import dist_util, logger
from .config import CM_TRAINING_MODES
# Re-exported: reading and writing files is the foundation's (fileio, dist_util); callers of
# this module (and of the original's names) import them from here too.
from .dist_util import load_file  # noqa: F401
from .errors import CheckpointError, CheckpointMismatchError, RunFlagsError, WriteError  # noqa: F401
from .fileio import (  # noqa: F401
    TEMP_SUFFIX, atomic_write, read_bytes, remove_stale_temp_files, save_atomic, torch_load_bytes,
)


StateDict = Mapping[str, th.Tensor]
PathOrStateDict = Union[str, os.PathLike, StateDict]

_WRAPPER_KEYS = ("model", "state_dict")  # where our own training checkpoints may nest the weights
_SHOWN = 5  # names listed per category in error messages
# The opt*.pt entry that holds the resume fields beside the optimizer's own state_dict.
RESUME_KEY = "resume"
# --resume_checkpoint value: the newest model*.pt in the log directory (or a fresh start).
AUTO_RESUME = "auto"
_MODEL_CKPT_RE = re.compile(r"^model(\d+)\.pt$")
# Any weights file of a training run: the model, an EMA of it, a consistency run's target network.
_TRAINED_CKPT_RE = re.compile(r"^(?:model|target|ema_[0-9.eE+-]+_)(\d+)\.pt$")


# ------------------------------------------------------------------------------------------------
# Read


def read_state_dict(path_or_state_dict: PathOrStateDict) -> dict[str, th.Tensor]:
    """Read a state_dict from a file (collective, see `load_file`) or unwrap a loaded dict.

    :param path_or_state_dict: a path, or an already loaded (possibly wrapped) state_dict.
    :return: a flat {name: tensor} dict on the CPU.
    :raises CheckpointError: if the file needs unsafe unpickling or holds no state_dict.
    """
    if isinstance(path_or_state_dict, Mapping):
        return check_finite(_unwrap(path_or_state_dict, "the given state_dict"),
                            "the given state_dict")
    path = str(path_or_state_dict)
    obj = load_file(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {path!r} holds a {type(obj).__name__}, "
            "not a state_dict (a dict of tensors)"
        )
    return check_finite(_unwrap(obj, repr(path)), repr(path))


def check_finite(state_dict: dict[str, th.Tensor], source: str) -> dict[str, th.Tensor]:
    """
    Return `state_dict` if every floating tensor is finite, else raise `CheckpointError` naming
    the tensors with NaN/inf: such weights (a diverged run) sample black images and train on NaN.
    """
    bad = [k for k, v in state_dict.items()
           if v.is_floating_point() and v.numel() and not v.is_meta  # meta: shapes only
           and not bool(th.isfinite(v).all())]
    if bad:
        shown = ", ".join(map(repr, bad[:_SHOWN])) + (
            f", ... ({len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else "")
        raise CheckpointError(f"checkpoint {source} has non-finite (NaN/inf) weights in "
                              f"{len(bad)} of {len(state_dict)} tensors: {shown} (the run "
                              "diverged before it was saved; use an earlier checkpoint)")
    return state_dict


def _unwrap(obj: Mapping, source: str) -> dict[str, th.Tensor]:
    """Return the flat state_dict inside `obj` (itself, or obj["model"] / obj["state_dict"])."""
    if not all(isinstance(v, th.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _unwrap(obj[key], f"{source}[{key!r}]")
    bad = [k for k, v in obj.items() if not isinstance(v, th.Tensor)]
    if bad:
        raise CheckpointError(
            f"{source} is not a state_dict: entry {bad[0]!r} holds a {type(obj[bad[0]]).__name__}, "
            f"not a tensor (and there is no {' or '.join(map(repr, _WRAPPER_KEYS))} entry "
            "holding one)"
        )
    return dict(obj)


def load_model_checkpoint(
    model: nn.Module,
    path_or_state_dict: PathOrStateDict,
    *,
    strict: bool = True,
    source: str | None = None,
) -> None:
    """Load a checkpoint into `model` in place, after checking that it fits.

    Parameters keep the model's dtype (a float32 checkpoint loads into a converted fp16 model).
    `num_heads`, `num_head_channels` and `use_new_attention_order` change no tensor shape, so a
    checkpoint loads under wrong values of these flags; they must still match the training flags.
    A collective when given a path in a process group (see `load_file`).

    :param model: the model built from the flags the checkpoint was trained with.
    :param path_or_state_dict: a file path / URL, or a (possibly wrapped) state_dict.
    :param strict: if False, missing and unexpected names are ignored (shapes must still fit).
    :param source: how error messages name the checkpoint (default: its path), e.g.
        "--model_path 'x.pt'".
    :raises CheckpointMismatchError: naming the differing tensors and the likely flag.
    :raises CheckpointError: if the file is unsafe or not a state_dict.
    """
    state_dict = read_state_dict(path_or_state_dict)
    if source is None:
        source = (
            "the given state_dict"
            if isinstance(path_or_state_dict, Mapping)
            else repr(str(path_or_state_dict))
        )
    check_state_dict_fits(model, state_dict, source=source, strict=strict)
    model.load_state_dict(state_dict, strict=strict)


def check_state_dict_fits(
    model: nn.Module, state_dict: StateDict, *, source: str = "checkpoint", strict: bool = True
) -> None:
    """Raise `CheckpointMismatchError` if `state_dict` does not fit `model`.

    See `load_model_checkpoint`; `source` names the checkpoint in the message.
    """
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    conflicts = [k for k in want if k in got and want[k] != got[k]]
    if not conflicts and (not strict or not (missing or unexpected)):
        return

    def names(keys):
        shown = ", ".join(repr(k) for k in keys[:_SHOWN])
        return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")

    lines = [
        f"checkpoint {source} does not fit {type(model).__name__}: "
        f"checkpoint has {len(got)} tensors, model {len(want)}"
    ]
    if missing and strict:
        lines.append(f"  missing from the checkpoint ({len(missing)}): {names(missing)}")
    if unexpected and strict:
        lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): {names(unexpected)}")
    if conflicts:
        shown = "; ".join(
            f"{k!r}: checkpoint {list(got[k])} vs model {list(want[k])}" for k in conflicts[:_SHOWN]
        )
        more = f"; ... ({len(conflicts) - _SHOWN} more)" if len(conflicts) > _SHOWN else ""
        lines.append(f"  shape mismatches ({len(conflicts)}): {shown}{more}")
    hints = _likely_flags(want, got, missing, unexpected, conflicts)
    if hints:
        lines.append("likely cause:")
        lines.extend(f"  - {h}" for h in hints)
    lines.append(
        "(flags must match the ones the checkpoint was trained with; num_heads, "
        "num_head_channels and use_new_attention_order must too, though they change no shape)"
    )
    raise CheckpointMismatchError("\n".join(lines))


def _block_count(shapes: Mapping[str, tuple], prefix: str) -> int:
    """Number of entries of a ModuleList such as `input_blocks` (0 if absent)."""
    idx = [int(m.group(1)) for k in shapes if (m := re.match(rf"{prefix}\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def _unet_levels(shapes: Mapping[str, tuple]) -> tuple[int, int] | None:
    """(resolution levels, res blocks per level) of a U-Net state_dict, from its decoder.

    Every level but the lowest ends with an upsampler, which sits after the first ResBlock in its
    output block: a `conv` (Upsample) or another ResBlock (`in_layers`, with --resblock_updown).
    """
    n_out = _block_count(shapes, "output_blocks")
    if not n_out:
        return None
    ups = {
        int(m.group(1))
        for k in shapes
        if (m := re.match(r"output_blocks\.(\d+)\.[1-9]\.(conv|in_layers)\.", k))
    }
    levels = len(ups) + 1
    return (levels, n_out // levels - 1) if n_out % levels == 0 else None


def _uses_scale_shift_norm(shapes: Mapping[str, tuple]) -> bool | None:
    """Whether the first ResBlock's embedding projection has 2x its channels (scale and shift)."""
    for key, shape in shapes.items():
        if key.endswith(".emb_layers.1.weight"):
            norm = key[: -len("emb_layers.1.weight")] + "out_layers.0.weight"
            if norm in shapes:
                return shape[0] == 2 * shapes[norm][0]
    return None


def _classifier_pool(shapes: Mapping[str, tuple]) -> str | None:
    """Guess --classifier_pool from the names and shapes of an encoder's `out` head."""
    if "out.2.positional_embedding" in shapes:
        return "attention"
    if len(shapes.get("out.3.weight", ())) > 2:
        return "adaptive"
    if len(shapes.get("out.1.weight", ())) == 1:
        return "spatial_v2"
    if len(shapes.get("out.2.weight", ())) == 2:
        return "spatial"
    return None


def _likely_flags(want, got, missing, unexpected, conflicts) -> list[str]:
    """Name the flags that most likely explain the differences (checkpoint `got`, model `want`)."""
    hints = []
    is_unet = {"unet": "output_blocks.0.0.in_layers.0.weight" in want,
               "ckpt": "output_blocks.0.0.in_layers.0.weight" in got}

    if unexpected and all(k.startswith("module.") for k in got):
        hints.append("every checkpoint name starts with 'module.': it was saved from a "
                     "DistributedDataParallel wrapper; save model.module.state_dict() instead")
        return hints
    if is_unet["unet"] != is_unet["ckpt"]:
        what = {True: "a diffusion U-Net", False: "a classifier (encoder only)"}
        hints.append(f"the checkpoint is {what[is_unet['ckpt']]} but the model is "
                     f"{what[is_unet['unet']]}: use the matching script / flags")
        return hints

    # Class conditioning (--class_cond, --num_classes, --class_dropout_prob).
    if "label_emb.weight" in unexpected:
        hints.append("the checkpoint has 'label_emb.weight', the model has none: was the "
                     "checkpoint trained with --class_cond True?")
    if "label_emb.weight" in missing:
        hints.append("the model expects 'label_emb.weight', the checkpoint has none: was the "
                     "checkpoint trained with --class_cond False?")
    if "label_emb.weight" in conflicts:
        rows, model_rows = got["label_emb.weight"][0], want["label_emb.weight"][0]
        if abs(rows - model_rows) == 1:
            trained = "> 0" if rows > model_rows else "0"
            hints.append(f"'label_emb.weight' has {rows} rows in the checkpoint, {model_rows} in "
                         f"the model: was it trained with --class_dropout_prob {trained}? "
                         "(classifier-free guidance adds one row for the null label)")
        else:
            hints.append(f"'label_emb.weight' has {rows} rows in the checkpoint, {model_rows} in "
                         f"the model: set --num_classes to match")

    # Output channels (--learn_sigma) and input channels (super-resolution).
    head = "out.2.weight"
    if is_unet["unet"] and head in conflicts and got[head][0] != want[head][0]:
        c = got[head][0]
        flag = "True" if c > want[head][0] else "False"
        hints.append(f"'{head}' has {c} output channels in the checkpoint, {want[head][0]} in the "
                     f"model: was the checkpoint trained with --learn_sigma {flag}?")
    first = "input_blocks.0.0.weight"
    if first in conflicts:
        (c_ckpt, in_ckpt), (c_model, in_model) = got[first][:2], want[first][:2]
        if in_ckpt != in_model:
            kind = "a super-resolution model (low-res image concatenated)" if in_ckpt > in_model \
                else "a plain model, not a super-resolution one"
            hints.append(f"'{first}' takes {in_ckpt} input channels in the checkpoint, {in_model} "
                         f"in the model: the checkpoint is {kind}")
        if c_ckpt != c_model:
            width = "--num_channels" if is_unet["unet"] else "--classifier_width"
            hints.append(f"'{first}' has {c_ckpt} channels in the checkpoint, {c_model} in the "
                         f"model: check {width} (and the first --channel_mult entry)")

    # Depth: levels and res blocks per level.
    if is_unet["unet"]:
        lv_ckpt, lv_model = _unet_levels(got), _unet_levels(want)
        if lv_ckpt and lv_model and lv_ckpt != lv_model:
            if lv_ckpt[1] != lv_model[1]:
                hints.append(f"the checkpoint has {lv_ckpt[1]} res blocks per level, the model "
                             f"{lv_model[1]}: set --num_res_blocks {lv_ckpt[1]}")
            if lv_ckpt[0] != lv_model[0]:
                hints.append(f"the checkpoint has {lv_ckpt[0]} resolution levels, the model "
                             f"{lv_model[0]}: check --image_size / --channel_mult")
    else:
        n_ckpt, n_model = _block_count(got, "input_blocks"), _block_count(want, "input_blocks")
        if n_ckpt != n_model:
            hints.append(f"the checkpoint has {n_ckpt} input blocks, the model {n_model}: check "
                         "--classifier_depth and --image_size / --classifier_channel_mult")

    # AdaGN (--use_scale_shift_norm) doubles the embedding projection of every ResBlock.
    ssn_ckpt, ssn_model = _uses_scale_shift_norm(got), _uses_scale_shift_norm(want)
    if None not in (ssn_ckpt, ssn_model) and ssn_ckpt != ssn_model:
        prefix = "" if is_unet["unet"] else "classifier_"
        hints.append(f"the checkpoint's ResBlocks project the embedding to "
                     f"{'2x' if ssn_ckpt else '1x'} their channels, the model's to "
                     f"{'2x' if ssn_model else '1x'}: was it trained with "
                     f"--{prefix}use_scale_shift_norm {ssn_ckpt}?")

    # Up/downsampling by ResBlocks (--resblock_updown) vs. a conv (`op` / `conv`).
    resample_conv = re.compile(
        r"(input_blocks\.\d+\.0\.op|output_blocks\.\d+\.[1-9]\.conv)\.weight"
    )
    ckpt_convs = any(resample_conv.match(k) for k in got)
    model_convs = any(resample_conv.match(k) for k in want)
    if ckpt_convs != model_convs and (missing or unexpected):
        flag = "False" if ckpt_convs else "True"
        prefix = "" if is_unet["unet"] else "classifier_"
        how = "resamples with convolutions" if ckpt_convs else "resamples inside ResBlocks"
        hints.append(f"the checkpoint {how}: "
                     f"was it trained with --{prefix}resblock_updown {flag}?")

    # Attention blocks at other resolutions (only meaningful when the block indices line up).
    same_depth = not any("res blocks per level" in h or "levels" in h for h in hints)
    qkv_extra = [k for k in unexpected if k.endswith(".qkv.weight")]
    qkv_missing = [k for k in missing if k.endswith(".qkv.weight")]
    if (qkv_extra or qkv_missing) and same_depth:
        flag = ("--attention_resolutions" if is_unet["unet"]
                else "--classifier_attention_resolutions")
        where = []
        if qkv_extra:
            where.append(f"only the checkpoint has attention in {qkv_extra[0].rsplit('.', 3)[0]!r}")
        if qkv_missing:
            where.append(f"only the model has attention in {qkv_missing[0].rsplit('.', 3)[0]!r}")
        hints.append(f"{'; '.join(where)}: check {flag}")

    # Channel widths deeper in the network.
    if conflicts and not hints:
        hints.append(f"channel widths differ from {conflicts[0]!r} on: check --channel_mult and "
                     "--image_size (which picks the default channel_mult)")

    # Classifier heads (--classifier_pool) and the attention pool's size (--image_size).
    if not is_unet["unet"]:
        pool_ckpt, pool_model = _classifier_pool(got), _classifier_pool(want)
        if pool_ckpt != pool_model and pool_ckpt:
            hints.append(f"the checkpoint's head looks like --classifier_pool {pool_ckpt}, the "
                         f"model's like {pool_model}")
        pe = "out.2.positional_embedding"
        if pe in conflicts:
            hints.append(f"'{pe}' covers {got[pe][1] - 1} positions in the checkpoint, "
                         f"{want[pe][1] - 1} in the model: check --image_size")
    return hints


# ------------------------------------------------------------------------------------------------
# Find (the original's public names; train_util re-exports them)


def checkpoint_name(kind: str, step: int, rate: float | None = None) -> str:
    """
    The one spelling of a checkpoint file's name (the original's): `model{step:06d}.pt`,
    `opt{step:06d}.pt`, `ema_{rate}_{step:06d}.pt`; other kinds (e.g. "target", a consistency
    run's target network) follow the model's pattern, `{kind}{step:06d}.pt`.
    """
    if kind == "ema":
        if rate is None:
            raise ValueError("an EMA checkpoint's name needs its rate")
        return f"ema_{rate}_{step:06d}.pt"
    return f"{kind}{step:06d}.pt"


def companion_path(main_checkpoint: str, kind: str, step: int, rate: float | None = None) -> str:
    """The `kind` file of `step` beside `main_checkpoint` (it may not exist)."""
    return bf.join(bf.dirname(main_checkpoint), checkpoint_name(kind, step, rate))


def get_blob_logdir() -> str:
    """Where checkpoints go: the log directory."""
    directory = logger.get_dir()
    if directory is None:
        raise RuntimeError("no log directory: call logger.configure() before training")
    return directory


def parse_resume_step_from_filename(filename: str) -> int:
    """
    The step in a checkpoint name "path/to/modelNNNNNN.pt"; 0 for any other name (e.g. a
    released checkpoint, from which training starts at step 0).
    """
    match = _MODEL_CKPT_RE.match(bf.basename(filename))
    return int(match.group(1)) if match else 0


def checkpoint_step(filename: str) -> int | None:
    """The step in the name of a training run's weights file (`model`, `ema_{rate}_` or `target`
    + NNNNNN.pt); None for any other name."""
    match = _TRAINED_CKPT_RE.match(bf.basename(filename))
    return int(match.group(1)) if match else None


def find_model_checkpoints(log_dir: str) -> list[str]:
    """The `model*.pt` files in `log_dir`, newest (highest step) first."""
    if not bf.isdir(log_dir):
        return []
    found = [(int(m.group(1)), name) for name in bf.listdir(log_dir)
             if (m := _MODEL_CKPT_RE.match(name))]
    return [bf.join(log_dir, name) for _, name in sorted(found, reverse=True)]


def find_resume_checkpoint(log_dir: str | None = None) -> str | None:
    """The `model*.pt` with the highest step in `log_dir` (default: the log directory), or None."""
    found = find_model_checkpoints(log_dir or get_blob_logdir())
    return found[0] if found else None


def checkpoint_problem(model_checkpoint: str) -> str | None:
    """
    Why the checkpoint `model_checkpoint` cannot be resumed from (None when it can): its model
    file and the `opt*.pt` beside it must both load, with finite weights. Reads both files.
    """
    step = parse_resume_step_from_filename(model_checkpoint)
    for path in (model_checkpoint, opt_checkpoint_path(model_checkpoint, step)):
        try:
            obj = _load_local(path)
            if path == model_checkpoint:
                check_finite(_unwrap(obj, repr(path)), repr(path))
        except (CheckpointError, OSError) as e:
            return str(e)
    return None


def _load_local(path: str) -> Any:
    """`load_file` on this rank only (no broadcast)."""
    return torch_load_bytes(read_bytes(path), path, "cpu")


def find_complete_checkpoint(log_dir: str | None = None) -> str | None:
    """
    The newest `model*.pt` in `log_dir` that can be resumed from (`checkpoint_problem`), logging
    each newer one it skips and why (a run killed while writing, a full disk, a diverged run).
    """
    for path in find_model_checkpoints(log_dir or get_blob_logdir()):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.log(f"--resume_checkpoint auto: skipping {path}: {problem}")
    return None


def find_ema_checkpoint(main_checkpoint: str, step: int, rate: float) -> str | None:
    """The `ema_{rate}_{step:06d}.pt` beside `main_checkpoint`, or None when there is none."""
    if not main_checkpoint:
        return None
    path = companion_path(main_checkpoint, "ema", step, rate)
    return path if bf.exists(path) else None


def resolve_resume_checkpoint(resume_checkpoint: str) -> str:
    """
    The checkpoint to resume from: `resume_checkpoint` itself, or for "auto" the newest
    `model*.pt` in the log directory ("" when there is none: a fresh start). A collective: rank
    0's answer is broadcast, so every rank resumes the same file.
    """
    if resume_checkpoint != AUTO_RESUME:
        return resume_checkpoint or ""
    found = None
    if dist_util.get_rank() == 0:
        found = find_complete_checkpoint()
        newest = find_resume_checkpoint()
        if found is not None and found != newest:
            logger.log(f"--resume_checkpoint auto: the newest checkpoint {newest} is incomplete "
                       f"or unreadable; resuming from {found}, the newest complete one")
        if found is None and newest is not None:
            logger.log(f"--resume_checkpoint auto: no complete, loadable model*.pt in "
                       f"{get_blob_logdir()}; starting fresh (the files are left in place)")
        elif found is None:
            logger.log(f"--resume_checkpoint auto: no model*.pt in {get_blob_logdir()}; "
                       "starting fresh")
    return dist_util.broadcast_object(found) or ""


def opt_checkpoint_path(main_checkpoint: str, step: int) -> str:
    """The `opt{step:06d}.pt` beside `main_checkpoint` (it may not exist)."""
    return companion_path(main_checkpoint, "opt", step)


# ------------------------------------------------------------------------------------------------
# Write


def read_run_flags(run_dir: str, filename: str = "args.json") -> dict | None:
    """The flags a run saved (`save_run_flags`) in `run_dir`; None when there is no such file or
    it is not a JSON object (an older run)."""
    path = bf.join(run_dir, filename)
    if not bf.exists(path):
        return None
    try:
        with bf.BlobFile(path, "r") as f:
            old = json.load(f)
    except (ValueError, OSError):
        return None
    return old if isinstance(old, dict) else None


def compare_run_flags(flags: Mapping[str, Any], run_dir: str, refuse: Iterable[str],
                      warn: Iterable[str], source: str, run: Mapping[str, Any] | None = None,
                      run_source: str | None = None) -> list[str]:
    """
    Compare this command's flags with the run's `args.json` in `run_dir` (resuming it, or sampling
    from one of its checkpoints): a differing flag in `refuse` (it changes what the weights mean:
    --predict_xstart, --noise_schedule, ... change no tensor shape, so the checkpoint would load)
    raises `RunFlagsError` naming each; one in `warn` is logged. Flags that only one side has are
    skipped (runs of older versions).

    :param source: how the message names the run, e.g. "--model_path 'run/model000100.pt'".
    :param run: the run's flags when already known (e.g. a released checkpoint's preset), instead
        of reading args.json; `run_source` names them in the message.
    :return: the names of the differing flags in `warn`.
    """
    old = read_run_flags(run_dir) if run is None else run
    if old is None:
        return []
    run_source = run_source or f"the run's args.json in {run_dir}"

    def differs(k):
        return k in old and k in flags and old[k] != flags[k]

    bad = [k for k in refuse if differs(k)]
    if bad:
        shown = ", ".join(f"--{k} {flags[k]!r} (the run: {old[k]!r})" for k in bad)
        raise RunFlagsError(f"{source}: flags differ from {run_source}: {shown}; pass the "
                            "run's values")
    changed = [k for k in warn if differs(k)]
    if changed:
        shown = ", ".join(f"--{k} {flags[k]!r} (the run: {old[k]!r})" for k in changed)
        logger.log(f"warning: {source}: flags differ from {run_source}: {shown}")
    return changed


def save_run_flags(flags: dict, log_dir: str | None = None, filename: str = "args.json") -> str:
    """
    Write the run's flags as JSON beside its checkpoints (rank 0, atomically), and log the flags
    that differ from an earlier run's file in the same folder (e.g. when resuming with other
    settings).

    :return: the file's path.
    """
    log_dir = log_dir or get_blob_logdir()
    path = bf.join(log_dir, filename)
    if dist_util.get_rank() != 0:
        return path
    if bf.exists(path):
        with bf.BlobFile(path, "r") as f:
            try:
                old = json.load(f)
            except ValueError:
                old = {}
        changed = {k: (old.get(k), v) for k, v in flags.items() if k in old and old[k] != v}
        if changed:
            logger.log(f"flags changed since the previous run in {log_dir}: {changed}")
    text = json.dumps(dict(flags), indent=2, sort_keys=True, default=str)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


# ------------------------------------------------------------------------------------------------
# Which checkpoints are consistency models


def is_consistency_checkpoint(model_path: str) -> bool | None:
    """
    Whether `model_path` was written by cm_distill.py, read from the `args.json` beside it (its
    `training_mode`). :return: True / False, or None when there is no readable args.json.
    """
    flags = read_run_flags(os.path.dirname(os.path.abspath(model_path)))
    if flags is None:
        return None
    return flags.get("training_mode") in CM_TRAINING_MODES


def check_sampler_fits_model(
    sampler: str, model_path: str, consistency_model: str = "auto"
) -> None:
    """
    Refuse `--sampler consistency` on a diffusion model and the diffusion samplers on a
    consistency model: the student's network no longer predicts the diffusion's x_0 (only
    f = c_skip x + c_out D does), and a diffusion model's one-step f is a blur.

    :param consistency_model: "auto" (the args.json beside `model_path`; a file without one is
        taken as a diffusion model), "yes" or "no" (force, e.g. a converted checkpoint).
    :raises ValueError: naming the flags on a mismatch.
    """
    if consistency_model not in ("auto", "yes", "no"):
        raise ValueError(f"--consistency_model must be auto, yes or no, got {consistency_model!r}")
    if consistency_model == "auto":
        is_cm = bool(is_consistency_checkpoint(model_path)) if model_path else False
    else:
        is_cm = consistency_model == "yes"
    wants_cm = sampler == "consistency"
    if wants_cm and not is_cm:
        raise ValueError(f"--sampler consistency needs a consistency model (cm_distill.py), but "
                         f"--model_path {model_path!r} has no args.json with a consistency "
                         "training_mode beside it; pass --consistency_model yes to force")
    if is_cm and not wants_cm:
        raise ValueError(f"--model_path {model_path!r} is a consistency model (args.json beside "
                         "it): sample it with --sampler consistency --steps K, or pass "
                         "--consistency_model no to force the diffusion samplers")
