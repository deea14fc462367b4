"""The one home of every command-line flag: its name, default and one-line help, written once.

Each concern is a frozen dataclass whose fields are flags (`flag(default, help)`); a script's
parser is `build_parser(__doc__, GroupA, GroupB, ...)`, and `--help` prints the help lines.
The factories of `script_util` take these dataclasses whole, and the original's dict views
(`model_and_diffusion_defaults()`, ...) are `defaults(UNetConfig, DiffusionConfig)`.

To add a flag, add one line to the right dataclass here; every script that uses the group gets it.
Flags beyond the original default to values that reproduce the original's behaviour and layouts.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

NUM_CLASSES = 1000  # ImageNet, as the original hard-codes


def flag(default: Any, help: str) -> Any:  # noqa: A002 - argparse's own name for it
    """A dataclass field that is a command-line flag: its default and the line `--help` shows."""
    return dataclasses.field(default=default, metadata={"help": help})


# ------------------------------------------------------------------------------------------------
# Networks and diffusion


@dataclass(frozen=True)
class UNetConfig:
    """The image U-Net (image_* scripts); learn_sigma lives in DiffusionConfig."""

    image_size: int = flag(64, "height = width of the images in pixels")
    num_channels: int = flag(128, "channels of the first resolution level")
    num_res_blocks: int = flag(2, "residual blocks per resolution level")
    num_heads: int = flag(4, "attention heads (ignored when num_head_channels is set)")
    num_heads_upsample: int = flag(-1, "attention heads in the decoder; -1: num_heads")
    num_head_channels: int = flag(-1, "channels per attention head; -1: use num_heads")
    attention_resolutions: str = flag("16,8", "resolutions in pixels with self-attention")
    channel_mult: str = flag("", "channel multiplier per level, e.g. '1,2,2,2'; '': by image_size")
    dropout: float = flag(0.0, "dropout rate in the residual blocks")
    class_cond: bool = flag(False, "condition on class labels (label_emb)")
    use_checkpoint: bool = flag(False, "gradient checkpointing: less memory, more compute")
    use_scale_shift_norm: bool = flag(True, "FiLM-like timestep conditioning (AdaGN)")
    resblock_updown: bool = flag(False, "residual blocks (BigGAN style) for up/downsampling")
    use_fp16: bool = flag(False, "the original's fp16 weights and loss scaling (CUDA)")
    use_new_attention_order: bool = flag(False, "split heads before qkv (the 'new' order)")
    num_classes: int = flag(NUM_CLASSES, "number of class labels (beyond the original)")
    class_dropout_prob: float = flag(
        0.0, "label dropout for classifier-free guidance; 0: the original's model (beyond)")


@dataclass(frozen=True)
class DiffusionConfig:
    """The Gaussian diffusion every network is trained and sampled with."""

    learn_sigma: bool = flag(False, "learn the variance (6 output channels, L_hybrid)")
    diffusion_steps: int = flag(1000, "T, the number of diffusion steps")
    noise_schedule: str = flag("linear", "beta schedule: 'linear' or 'cosine'")
    timestep_respacing: str = flag("", "sample on fewer steps: '250', 'ddim50', '10,10,5'; '': all")
    use_kl: bool = flag(False, "train on the variational bound instead of the MSE")
    predict_xstart: bool = flag(False, "the model predicts x_0 instead of epsilon")
    rescale_timesteps: bool = flag(False, "feed the model timesteps scaled to [0, 1000)")
    rescale_learned_sigmas: bool = flag(False, "rescale the MSE when learning sigmas")


@dataclass(frozen=True)
class ClassifierConfig:
    """The noisy-image classifier of classifier guidance (the U-Net's encoder half)."""

    image_size: int = flag(64, "height = width of the images in pixels")
    classifier_use_fp16: bool = flag(False, "the original's fp16 weights for the classifier")
    classifier_width: int = flag(128, "channels of the classifier's first level")
    classifier_depth: int = flag(2, "residual blocks per level of the classifier")
    classifier_attention_resolutions: str = flag("32,16,8", "classifier attention resolutions")
    classifier_use_scale_shift_norm: bool = flag(True, "AdaGN timestep conditioning")
    classifier_resblock_updown: bool = flag(True, "residual blocks for downsampling")
    classifier_pool: str = flag("attention", "head: adaptive, attention, spatial, spatial_v2")
    classifier_channel_mult: str = flag("", "channel multipliers; '': by image_size (beyond)")
    num_classes: int = flag(NUM_CLASSES, "number of class labels (beyond the original)")


# The super-resolution model takes the image U-Net's flags except these (its size is large_size,
# its channel multipliers follow large_size, and it has no new attention order or label dropout).
_SR_UNUSED = ("image_size", "channel_mult", "use_new_attention_order", "class_dropout_prob")


def _sr_fields() -> list:
    fields = [
        ("large_size", int, flag(256, "output (high) resolution in pixels")),
        ("small_size", int, flag(64, "input (low) resolution in pixels")),
    ]
    for f in dataclasses.fields(UNetConfig):
        if f.name not in _SR_UNUSED:
            fields.append((f.name, f.type, dataclasses.field(default=f.default,
                                                             metadata=f.metadata)))
    return fields


SuperResConfig = dataclasses.make_dataclass("SuperResConfig", _sr_fields(), frozen=True)
SuperResConfig.__module__ = __name__
SuperResConfig.__doc__ = "The super-resolution U-Net: UNetConfig's flags sized by large/small."


# ------------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class CommonConfig:
    """Flags that every script accepts (beyond the original)."""

    seed: int = flag(-1, ">= 0: reproducible runs (a sample's noise depends on seed and index)")
    output_dir: str = flag("", "where logs, checkpoints and samples go; '': $OPENAI_LOGDIR or /tmp")


@dataclass(frozen=True)
class FastConfig:
    """Fast-path switches (beyond the original; all off = the faithful path, see fast.py)."""

    use_bf16: bool = flag(False, "bfloat16 autocast for forward and backward")
    use_sdpa: bool = flag(False, "fused scaled_dot_product_attention")
    channels_last: bool = flag(False, "NHWC memory format")
    compile_model: bool = flag(False, "torch.compile the model (eager if it cannot)")
    fast: bool = flag(False, "the measured preset: bf16 + SDPA + channels_last")


@dataclass(frozen=True)
class SamplerOptions:
    """How to sample (beyond the original); `samplers.sample(**options)` takes these fields."""

    sampler: str = flag("", "ddpm ddim plms heun dpm++2m dpm++3m dpm++2m-sde consistency; '': "
                            "per use_ddim")
    steps: int = flag(0, "number of sampling steps; 0: the grid of --timestep_respacing")
    sampler_spacing: str = flag("logsnr", "ODE solvers' step spacing: 'logsnr' or 'uniform' (in t)")
    cfg_scale: float = flag(1.0, "classifier-free guidance weight; 1: conditional, 0: uncond.")
    eta: float = flag(0.0, "DDIM's eta; 0: deterministic DDIM as the original")


@dataclass(frozen=True)
class SampleConfig:
    """What the sampling scripts produce and from which checkpoint."""

    clip_denoised: bool = flag(True, "clip the predicted x_0 to [-1, 1]")
    num_samples: int = flag(10000, "number of samples to write")
    batch_size: int = flag(16, "samples per batch on each rank")
    use_ddim: bool = flag(False, "DDIM instead of DDPM (the original's switch)")
    model_path: str = flag("", "the model checkpoint (.pt)")
    progress: bool = flag(True, "progress bars on rank 0 (beyond the original)")
    grid_size: int = flag(100, "samples in the PNG grid beside the .npz; 0: no grid (beyond)")
    consistency_model: str = flag(
        "auto", "is --model_path a consistency model? auto: per the args.json beside it; yes; no")


@dataclass(frozen=True)
class GuidanceConfig:
    """classifier_sample.py: the classifier that guides."""

    classifier_path: str = flag("", "the noisy classifier's checkpoint (.pt)")
    classifier_scale: float = flag(1.0, "multiplier of the classifier's gradient")


@dataclass(frozen=True)
class SuperResSampleConfig:
    """super_res_sample.py: its low-resolution inputs."""

    base_samples: str = flag("", ".npz of low-res samples (arr_0 uint8 NHWC, arr_1 labels)")


@dataclass(frozen=True)
class DataConfig:
    """The training images."""

    data_dir: str = flag("", "folder of images (label = file-name prefix before '_')")
    random_flip: bool = flag(True, "random horizontal flips (the original always flips)")


@dataclass(frozen=True)
class TrainingConfig:
    """The original's TrainLoop flags (image_train.py, super_res_train.py)."""

    schedule_sampler: str = flag("uniform", "timestep sampler: 'uniform' or 'loss-second-moment'")
    lr: float = flag(1e-4, "AdamW learning rate")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    lr_anneal_steps: int = flag(0, "> 0: decay lr linearly to 0 over this many steps, then stop")
    batch_size: int = flag(1, "images per step on each rank")
    microbatch: int = flag(-1, "split batches into microbatches of this size; -1: off")
    ema_rate: str = flag("0.9999", "comma-separated EMA rates")
    log_interval: int = flag(10, "steps between log lines")
    save_interval: int = flag(10000, "steps between checkpoints")
    resume_checkpoint: str = flag("", "a model*.pt to resume, or 'auto': newest in --output_dir")
    fp16_scale_growth: float = flag(1e-3, "log2 growth of the fp16 loss scale per step")


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """classifier_train.py's own flags (with TrainingConfig(lr=3e-4, batch_size=4))."""

    val_data_dir: str = flag("", "held-out images for evaluation; '': none")
    noised: bool = flag(True, "train on noisy x_t at random t (False: clean images)")
    iterations: int = flag(150000, "training steps")
    anneal_lr: bool = flag(False, "decay lr linearly to 0 over --iterations")
    eval_interval: int = flag(5, "steps between evaluations on --val_data_dir")
    random_crop: bool = flag(True, "random crops, as the original trains its classifiers")


@dataclass(frozen=True)
class ConsistencyConfig:
    """cm_distill.py: consistency distillation (Song et al. 2023) of a trained teacher."""

    teacher_path: str = flag("", "the teacher's checkpoint (.pt, the model flags' network); the "
                                 "student starts from its weights")
    training_mode: str = flag("consistency_distillation", "consistency_distillation (teacher) or "
                                                          "consistency_training (no teacher)")
    cm_steps: int = flag(40, "N, points of the teacher's grid that CD walks along (paper: 18-40)")
    cm_spacing: str = flag("logsnr", "how the N points are picked: 'logsnr' or 'uniform' (in t)")
    teacher_solver: str = flag("heun", "the teacher's ODE step: ddim, heun (2 NFE), dpm++2m, ...")
    cm_loss: str = flag("pseudo_huber", "the distance: 'pseudo_huber' or 'l2'")
    cm_huber_c: float = flag(0.0, "pseudo-Huber's c; 0: 0.00054 sqrt(values per sample)")
    cm_weighting: str = flag("uniform", "lambda(t_n): 'uniform' or 'inverse_step'")
    target_ema: float = flag(0.95, "decay of the target network's EMA; 0: the student itself")
    teacher_cfg_scale: float = flag(1.0, "CFG weight of the teacher (needs label dropout); 1: off")


@dataclass(frozen=True)
class NllConfig:
    """image_nll.py's own flags."""

    data_dir: str = flag("", "folder of images to evaluate")


# The quality table's rows, sampler:steps:cfg_scale:classifier_scale: unguided conditional samplers
# at several NFE, then CFG and classifier-guidance sweeps with DPM-Solver++(2M) at 20 steps.
# Classifier guidance steers the unconditional branch (cfg 0), as the paper's unconditional rows.
SAMPLER_TABLE_ROWS = (
    "ddpm:250:1:0,ddpm:50:1:0,ddpm:20:1:0,ddim:50:1:0,ddim:20:1:0,plms:20:1:0,heun:10:1:0,"
    "dpm++3m:20:1:0,dpm++2m:10:1:0,dpm++2m:20:1:0,dpm++2m-sde:20:1:0,dpm++2m-sde:50:1:0,"
    "dpm++2m:20:0:0,dpm++2m:20:2:0,dpm++2m:20:4:0,"
    "dpm++2m:20:0:1,dpm++2m:20:0:3"
)


@dataclass(frozen=True)
class SamplerTableConfig:
    """sampler_table.py's own flags."""

    out_dir: str = flag("runs/sampler_table/table", "where the table, grids and plot go")
    rows: str = flag(SAMPLER_TABLE_ROWS, "comma-separated sampler:steps:cfg_scale:classifier_scale")
    judge_path: str = flag("", "the judge MLP; '': {out_dir}/judge.pt, trained on first use")
    threads: int = flag(1, "torch threads: tiny models run fastest on one thread of a busy CPU")
    cm_model_path: str = flag("", "the consistency student of the 'consistency' rows (cm_distill)")


@dataclass(frozen=True)
class BenchmarkConfig:
    """benchmark.py's flags: what to time and how."""

    config: str = flag("bench64", "named model config: tiny, bench64, adm64, adm256")
    variants: str = flag("", "comma-separated variants, switches joined by '+' (faithful, fp16, "
                             "bf16, sdpa, channels_last, compile, fast); the first is the ratios' "
                             "baseline; '': faithful,fast (CPU) or faithful,fp16,fast (CUDA)")
    phases: str = flag("train,sample", "train, sample or both")
    runs: int = flag(5, "timed runs per variant and phase")
    warmup: int = flag(1, "untimed calls before timing (>= 1)")
    device: str = flag("", "cpu or cuda; '': cuda when available")
    timer: str = flag("wall", "wall: elapsed seconds; cpu: this process's CPU seconds (use with "
                              "--threads 1 on a shared machine: they measure work, not waiting)")
    threads: int = flag(0, "torch threads; 0: torch's default")
    train_batch: int = flag(0, "training batch; 0: the config's")
    sample_batch: int = flag(0, "sampling batch; 0: the config's")
    json: str = flag("", "also write the full report (every time) here")


# ------------------------------------------------------------------------------------------------
# Building parsers and reading them back


Group = Any  # a config dataclass (its defaults) or an instance of one (its values as defaults)


def flag_fields(*groups: Group, drop: Iterable[str] = ()) -> dict[str, tuple[Any, str]]:
    """
    name -> (default, help) over `groups`, in order. A name in several groups is taken from the
    first (e.g. image_size of UNetConfig and ClassifierConfig); `drop` leaves names out.
    """
    out: dict[str, tuple[Any, str]] = {}
    dropped = set(drop)
    for group in groups:
        for f in dataclasses.fields(group):
            if f.name in out or f.name in dropped:
                continue
            default = f.default if isinstance(group, type) else getattr(group, f.name)
            out[f.name] = (default, f.metadata.get("help", ""))
    return out


def defaults(*groups: Group, drop: Iterable[str] = ()) -> dict[str, Any]:
    """The flags' defaults as one dict (what the original's `*_defaults()` return)."""
    return {k: v for k, (v, _) in flag_fields(*groups, drop=drop).items()}


def build_parser(description: str | None, *groups: Group,
                 drop: Iterable[str] = ()) -> argparse.ArgumentParser:
    """
    One argparse parser with a `--name` per field of `groups` (one `--help` section per group),
    typed by its default (booleans parse as the original's str2bool), the field's comment as its
    `--help` line. A name in several groups is taken from the first; `drop` leaves names out.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    seen = set(drop)
    for group in groups:
        fields = {k: v for k, v in flag_fields(group).items() if k not in seen}
        if not fields:
            continue
        seen.update(fields)
        cls = group if isinstance(group, type) else type(group)
        title = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None
        add_flags(parser.add_argument_group(cls.__name__, title), fields)
    return parser


def add_flags(parser: argparse.ArgumentParser | Any, fields: Mapping[str, tuple[Any, str]],
              suppress: bool = False) -> None:
    """
    Add `--name` flags for name -> (default, help) to a parser or argument group. With
    `suppress`, a flag not given is absent from the parsed namespace (to tell given from default).
    """
    for name, (default, help_text) in fields.items():
        if default is None:
            kind = str
        elif isinstance(default, bool):
            kind = str2bool
        else:
            kind = type(default)
        shown = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS if suppress else default,
                            type=kind, help=shown.replace("%", "%%"))


def from_flags(cls: type, flags: Mapping[str, Any] | argparse.Namespace) -> Any:
    """Build the dataclass `cls` from parsed flags (a Namespace or dict), taking only its fields;
    fields missing from `flags` keep their defaults."""
    if not isinstance(flags, Mapping):
        flags = vars(flags)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in flags.items() if k in names})


def split_flags(flags: Mapping[str, Any], *classes: type) -> list:
    """One dataclass per class from `flags`; a name that none of them has is a TypeError naming
    it (so a mistyped keyword of `create_model_and_diffusion(**flags)` is not silently dropped)."""
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(flags) - known)
    if unknown:
        names = "/".join(cls.__name__ for cls in classes)
        raise TypeError(f"unknown flag(s) {unknown} for {names}")
    return [from_flags(cls, flags) for cls in classes]


def str2bool(v: Any) -> bool:
    """Parse "yes/true/t/y/1" and "no/false/f/n/0" (any case) as argparse booleans."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")
