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
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NamedTuple

NUM_CLASSES = 1000  # ImageNet, as the original hard-codes

# A flag's domain: value -> None when allowed, else what is allowed ("must be > 0").
Check = Callable[[Any], "str | None"]


def flag(default: Any, help: str, check: Check | None = None) -> Any:  # noqa: A002
    """
    A dataclass field that is a command-line flag: its default, the line `--help` shows and
    optionally its domain `check` (run on every value given on the command line).
    """
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


# ------------------------------------------------------------------------------------------------
# Flag domains: each returns None for an allowed value, else the allowed values in words.


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 and v == v else "must be >= 0"


def non_negative_or_minus_one(v: int) -> str | None:
    return None if v >= -1 else "must be >= 0, or -1"


def positive_or_minus_one(v: int) -> str | None:
    return None if v > 0 or v == -1 else "must be > 0, or -1"


def finite(v: float) -> str | None:
    return None if math.isfinite(v) else "must be a finite number"


def finite_non_negative(v: float) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "must be a finite number >= 0"


def rate(v: float) -> str | None:
    """A probability or decay rate in [0, 1)."""
    return None if 0 <= v < 1 else "must be in [0, 1)"


def one_of(*allowed: str) -> Check:
    def check(v: str) -> str | None:
        return None if v in allowed else f"must be one of {', '.join(map(repr, allowed))}"
    return check


def int_list(allow_empty: bool = True, min_value: int = 1) -> Check:
    """Comma-separated integers >= min_value (e.g. '32,16,8')."""
    def check(v: str) -> str | None:
        if v == "" and allow_empty:
            return None
        try:
            values = [int(x) for x in v.split(",")]
        except ValueError:
            values = []
        if values and min(values) >= min_value:
            return None
        empty = " or ''" if allow_empty else ""
        return f"must be comma-separated integers >= {min_value}{empty}"
    return check


def subset_of(*allowed: str) -> Check:
    """Comma-separated names, each one of `allowed`."""
    def check(v: str) -> str | None:
        names = v.split(",")
        if v and all(n in allowed for n in names):
            return None
        return f"must be comma-separated names of {', '.join(map(repr, allowed))}"
    return check


def rate_list(v: str) -> str | None:
    """Comma-separated EMA rates, each in [0, 1)."""
    try:
        values = [float(x) for x in v.split(",")]
    except ValueError:
        values = []
    if values and all(0 <= x < 1 for x in values):
        return None
    return "must be comma-separated rates in [0, 1), e.g. '0.9999' or '0.999,0.9999'"


# The one list of sampler names: `samplers.STEPS` holds a step function for each but "consistency"
# (samplers checks that at import); --sampler also takes "" (the original's rule, per --use_ddim).
SAMPLER_NAMES = ("ddpm", "ddim", "plms", "heun", "dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc",
                 "consistency")
# The deterministic steps of the probability-flow ODE (a consistency teacher's step).
ODE_SAMPLERS = ("ddim", "plms", "heun", "dpm++2m", "dpm++3m", "unipc")
# How --steps picks timesteps from a diffusion's grid (samplers.select_timesteps), and those a
# consistency distillation grid may use: it needs both ends of the grid (the top, where x_T is
# drawn, and t_min = grid index 0, where f is the identity), which "edm" leaves out.
SPACINGS = ("logsnr", "uniform", "karras", "edm")
CM_SPACINGS = ("logsnr", "uniform", "karras")
# Consistency models: the two training modes, the distances and the loss weightings.
CM_TRAINING_MODES = ("consistency_distillation", "consistency_training")
CM_DISTANCES = ("pseudo_huber", "l2")
CM_WEIGHTINGS = ("uniform", "inverse_step")
# iCT (Song & Dhariwal 2023): the N curriculum over training, and the distribution of the pairs.
CM_CURRICULA = ("none", "ict")
CM_NOISE_DISTS = ("uniform", "lognormal")
# How samples in [-1, 1] become uint8 (image_util.to_uint8_nhwc).
QUANTIZE_MODES = ("truncate", "round")


def at_least(low: float) -> Check:
    def check(v: float) -> str | None:
        return None if v >= low else f"must be >= {low}"
    return check


def unit_interval(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must lie in [0, 1]"


# ------------------------------------------------------------------------------------------------
# Networks and diffusion


@dataclass(frozen=True)
class UNetConfig:
    """The image U-Net (image_* scripts); learn_sigma lives in DiffusionConfig."""

    image_size: int = flag(64, "height = width of the images in pixels", positive)
    num_channels: int = flag(128, "channels of the first resolution level", positive)
    num_res_blocks: int = flag(2, "residual blocks per resolution level", positive)
    num_heads: int = flag(4, "attention heads (ignored when num_head_channels is set)",
                          positive)
    num_heads_upsample: int = flag(-1, "attention heads in the decoder; -1: num_heads",
                                   positive_or_minus_one)
    num_head_channels: int = flag(-1, "channels per attention head; -1: use num_heads",
                                  positive_or_minus_one)
    attention_resolutions: str = flag("16,8", "resolutions in pixels with self-attention",
                                      int_list())
    channel_mult: str = flag("", "channel multiplier per level, e.g. '1,2,2,2'; '': by "
                                 "image_size", int_list())
    dropout: float = flag(0.0, "dropout rate in the residual blocks", rate)
    class_cond: bool = flag(False, "condition on class labels (label_emb)")
    use_checkpoint: bool = flag(False, "gradient checkpointing: less memory, more compute")
    use_scale_shift_norm: bool = flag(True, "FiLM-like timestep conditioning (AdaGN)")
    resblock_updown: bool = flag(False, "residual blocks (BigGAN style) for up/downsampling")
    use_fp16: bool = flag(False, "the original's fp16 weights and loss scaling (CUDA)")
    use_new_attention_order: bool = flag(False, "split heads before qkv (the 'new' order)")
    num_classes: int = flag(NUM_CLASSES, "number of class labels (beyond the original)",
                            positive)
    class_dropout_prob: float = flag(
        0.0, "label dropout for classifier-free guidance; 0: the original's model (beyond)", rate)


@dataclass(frozen=True)
class DiffusionConfig:
    """The Gaussian diffusion every network is trained and sampled with."""

    learn_sigma: bool = flag(False, "learn the variance (6 output channels, L_hybrid)")
    diffusion_steps: int = flag(1000, "T, the number of diffusion steps", positive)
    noise_schedule: str = flag("linear", "beta schedule: 'linear' or 'cosine'",
                               one_of("linear", "cosine"))
    timestep_respacing: str = flag("", "sample on fewer steps: '250', 'ddim50', '10,10,5'; '': all")
    use_kl: bool = flag(False, "train on the variational bound instead of the MSE")
    predict_xstart: bool = flag(False, "the model predicts x_0 instead of epsilon")
    rescale_timesteps: bool = flag(False, "feed the model timesteps scaled to [0, 1000)")
    rescale_learned_sigmas: bool = flag(False, "rescale the MSE when learning sigmas")


@dataclass(frozen=True)
class ClassifierConfig:
    """The noisy-image classifier of classifier guidance (the U-Net's encoder half)."""

    image_size: int = flag(64, "height = width of the images in pixels", positive)
    classifier_use_fp16: bool = flag(False, "the original's fp16 weights for the classifier")
    classifier_width: int = flag(128, "channels of the classifier's first level", positive)
    classifier_depth: int = flag(2, "residual blocks per level of the classifier", positive)
    classifier_attention_resolutions: str = flag("32,16,8", "classifier attention resolutions",
                                                 int_list())
    classifier_use_scale_shift_norm: bool = flag(True, "AdaGN timestep conditioning")
    classifier_resblock_updown: bool = flag(True, "residual blocks for downsampling")
    classifier_pool: str = flag("attention", "head: adaptive, attention, spatial, spatial_v2",
                                one_of("adaptive", "attention", "spatial", "spatial_v2"))
    classifier_channel_mult: str = flag("", "channel multipliers; '': by image_size (beyond)",
                                        int_list())
    num_classes: int = flag(NUM_CLASSES, "number of class labels (beyond the original)",
                            positive)


# The super-resolution model takes the image U-Net's flags except these (its size is large_size,
# its channel multipliers follow large_size, and it has no new attention order or label dropout).
_SR_UNUSED = ("image_size", "channel_mult", "use_new_attention_order", "class_dropout_prob")


def _sr_fields() -> list:
    fields = [
        ("large_size", int, flag(256, "output (high) resolution in pixels", positive)),
        ("small_size", int, flag(64, "input (low) resolution in pixels", positive)),
    ]
    for f in dataclasses.fields(UNetConfig):
        if f.name not in _SR_UNUSED:
            fields.append((f.name, f.type, dataclasses.field(default=f.default,
                                                             metadata=f.metadata)))
    return fields


SuperResConfig = dataclasses.make_dataclass("SuperResConfig", _sr_fields(), frozen=True)
SuperResConfig.__module__ = __name__
SuperResConfig.__doc__ = "The super-resolution U-Net: UNetConfig's flags sized by large/small."


@dataclass(frozen=True)
class DiTConfig:
    """Model choice: the ADM U-Net or DiT (image_train, image_sample; beyond the original).

    A DiT takes --image_size (its input_size: the latent side in latent space), --class_cond,
    --num_classes, --class_dropout_prob, --use_fp16 and --use_checkpoint from UNetConfig and
    --learn_sigma from DiffusionConfig (DIT_SHARED_FLAGS); the U-Net ignores the flags below.
    """

    model: str = flag("unet", "network: 'unet' (ADM's U-Net) or 'dit' (DiT, Peebles & Xie 2023)")
    dit_model: str = flag("DiT-S/2", "DiT size: DiT-{S,B,L,XL}/{2,4,8} (the /p: patch side)")
    dit_depth: int = flag(0, "transformer blocks; 0: those of --dit_model")
    dit_hidden_size: int = flag(0, "token width (divisible by 4 and the heads); 0: --dit_model's")
    dit_num_heads: int = flag(0, "attention heads; 0: those of --dit_model")
    dit_patch_size: int = flag(0, "patch side; 0: that of --dit_model (the '/2' in DiT-S/2)")
    cfg_channels: int = flag(
        0, "output channels that --cfg_scale guides; 0: all (the project's CFG); 3: DiT's "
           "forward_with_cfg, which guides only the first 3 (to reproduce DiT's samples)")


# The UNetConfig flags a DiT reads too (learn_sigma comes from DiffusionConfig).
DIT_SHARED_FLAGS = ("image_size", "class_cond", "num_classes", "class_dropout_prob", "use_fp16",
                    "use_checkpoint")
MODEL_CHOICES = ("unet", "dit")


@dataclass(frozen=True)
class LatentConfig:
    """Latent diffusion (beyond the original): train and sample in a pretrained VAE's latents."""

    latent_vae: str = flag("", "a local diffusers AutoencoderKL folder (config.json + weights), "
                               "or a hub id already in the local cache (never downloaded); "
                               "'': pixel space")
    latent_scale: float = flag(0.0, "latent multiplier; 0: the VAE config's scaling_factor, else "
                                    "0.18215 (the SD VAE's)")
    latent_cache: str = flag("", "folder of the encoded data set (one file per data folder, VAE "
                                 "and image size); '': {output_dir}/latent_cache")


@dataclass(frozen=True)
class DiffusersExportConfig:
    """Moving a model to diffusers (scripts/to_diffusers.py; the model's own flags as usual)."""

    model_path: str = flag("", "the checkpoint to export (.pt); its model and diffusion flags as "
                               "for image_sample.py")
    output_dir: str = flag("", "the diffusers folder to write (must not exist yet)")


@dataclass(frozen=True)
class DiffusersImportConfig:
    """Bringing a model back from diffusers (scripts/from_diffusers.py FOLDER)."""

    output: str = flag("", "the checkpoint to write (.pt); args.json with its flags goes beside it")


# ------------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class CommonConfig:
    """Flags that every script accepts (beyond the original)."""

    seed: int = flag(-1, ">= 0: reproducible runs (a sample's noise depends on seed and index)")
    output_dir: str = flag("", "where logs, checkpoints and samples go; '': $OPENAI_LOGDIR or /tmp")
    tf32: bool = flag(True, "CUDA: TF32 for float32 matmuls and convolutions (as PyTorch < 1.12 "
                            "did by default, and DiT sets); False: full float32")
    cudnn_benchmark: bool = flag(True, "CUDA: let cuDNN time its convolution algorithms once per "
                                       "shape; False: the same algorithms every run")
    dist_timeout: float = flag(1800.0, "seconds a rank waits for its peers before it fails "
                                       "(training's collectives, sampling's wait for shards)",
                               positive)


@dataclass(frozen=True)
class FastConfig:
    """Fast-path switches (beyond the original; all off = the faithful path, see fast.py)."""

    use_bf16: bool = flag(False, "bfloat16 autocast for forward and backward")
    use_sdpa: bool = flag(False, "fused scaled_dot_product_attention")
    channels_last: bool = flag(False, "NHWC memory format")
    compile_model: bool = flag(False, "torch.compile the model (eager if it cannot)")
    fused_blocks: bool = flag(False, "GroupNorm+SiLU(+AdaGN) in one pass, attention without "
                                     "layout copies")
    fused_adam: bool = flag(False, "AdamW's fused kernel (one pass per tensor; other rounding)")
    malloc_cache: bool = flag(False, "CPU: glibc's malloc keeps freed memory for reuse (no page "
                                     "faults per step; memory stays at its peak)")
    fast: bool = flag(False, "the preset for this device (hardware.choose_switches; logged)")


@dataclass(frozen=True)
class SamplerOptions:
    """How to sample (beyond the original); `samplers.sample(**options)` takes these fields."""

    sampler: str = flag("", " ".join(SAMPLER_NAMES) + "; '': per use_ddim",
                        one_of("", *SAMPLER_NAMES))
    steps: int = flag(0, "N grid timesteps for any sampler; 0: the grid of --timestep_respacing",
                      non_negative)
    sampler_spacing: str = flag(
        "auto", "how --steps picks timesteps: 'auto' (each sampler's measured best, README), "
                "'logsnr', 'uniform' (= --timestep_respacing N), 'karras' (rho-spaced in "
                "sigma/alpha up to --sigma_max, entered from the grid's top) or 'edm' (rho-spaced "
                "from --sigma_max to --sigma_min, no step at either end)", one_of("auto", *SPACINGS))
    sigma_max: float = flag(20.0, "karras/edm spacing: the noisiest sigma/alpha below the grid's "
                                  "top (EDM: 80; 20 measured best at 4-10 NFE)", positive)
    sigma_min: float = flag(0.05, "edm spacing: the least sigma/alpha evaluated (0: the grid's "
                                  "least); its x_0 prediction is the sample", finite_non_negative)
    rho: float = flag(7.0, "karras spacing: the exponent rho (EDM: 7)", positive)
    cfg_scale: float = flag(1.0, "classifier-free guidance weight; 1: conditional, 0: uncond.",
                            finite)
    eta: float = flag(0.0, "DDIM's eta; 0: deterministic DDIM as the original",
                      finite_non_negative)


@dataclass(frozen=True)
class SampleConfig:
    """What the sampling scripts produce and from which checkpoint."""

    clip_denoised: bool = flag(True, "clip the predicted x_0 to [-1, 1]")
    num_samples: int = flag(10000, "number of samples to write", positive)
    batch_size: int = flag(16, "samples per batch on each rank", positive)
    use_ddim: bool = flag(False, "DDIM instead of DDPM (the original's switch)")
    model_path: str = flag("", "the model checkpoint (.pt)")
    progress: bool = flag(True, "progress bars on rank 0 (beyond the original)")
    grid_size: int = flag(100, "samples in the PNG grid beside the .npz; 0: no grid (beyond)",
                          non_negative)
    shard_size: int = flag(1000, "samples per file of {output_dir}/samples_shards/ (beyond)",
                           positive)
    consistency_model: str = flag(
        "auto", "is --model_path a consistency model? auto: per the args.json beside it; yes; no",
        one_of("auto", "yes", "no"))
    quantize: str = flag(
        "truncate", "float samples -> uint8: 'truncate' ((x+1)*127.5, the original ADM's) or "
                    "'round' (to the nearest level, DiT's sample_ddp.py; DiT presets set it)",
        one_of(*QUANTIZE_MODES))


@dataclass(frozen=True)
class GuidanceConfig:
    """classifier_sample.py: the classifier that guides."""

    classifier_path: str = flag("", "the noisy classifier's checkpoint (.pt)")
    classifier_scale: float = flag(1.0, "multiplier of the classifier's gradient", finite)


@dataclass(frozen=True)
class SuperResSampleConfig:
    """super_res_sample.py: its low-resolution inputs."""

    base_samples: str = flag("", ".npz of low-res samples (arr_0 uint8 NHWC, arr_1 labels)")


@dataclass(frozen=True)
class DataConfig:
    """The training images."""

    data_dir: str = flag("", "folder of images (label = file-name prefix before '_')")
    random_flip: bool = flag(True, "random horizontal flips (the original always flips)")
    skip_bad_images: bool = flag(False, "leave out unreadable images (logged) instead of "
                                        "refusing the folder (beyond)")
    num_workers: int = flag(-1, "processes per rank that read images; 0: the rank itself; -1: "
                                "min(8, CPUs per rank on this node - 1)", non_negative_or_minus_one)
    data_index: str = flag("", "folder of the data index (listing and check verdicts, one file "
                               "per data folder, reused by later starts); '': {output_dir}/"
                               "data_index")
    data_check: str = flag("header", "how each new or changed image is checked before training: "
                                     "'header' (PIL verify, no decode) or 'full' (decode)",
                           one_of("header", "full"))


@dataclass(frozen=True)
class TrainingConfig:
    """The original's TrainLoop flags (image_train.py, super_res_train.py)."""

    schedule_sampler: str = flag("uniform", "timestep sampler: 'uniform' or "
                                            "'loss-second-moment'",
                                 one_of("uniform", "loss-second-moment"))
    lr: float = flag(1e-4, "AdamW learning rate", finite_non_negative)
    weight_decay: float = flag(0.0, "AdamW weight decay", finite_non_negative)
    lr_anneal_steps: int = flag(0, "> 0: decay lr linearly to 0 over this many steps, then stop",
                                non_negative)
    batch_size: int = flag(1, "images per step on each rank", positive)
    microbatch: int = flag(-1, "split batches into microbatches of this size; -1: off",
                           positive_or_minus_one)
    ema_rate: str = flag("0.9999", "comma-separated EMA rates", rate_list)
    log_interval: int = flag(10, "steps between log lines", positive)
    save_interval: int = flag(10000, "steps between checkpoints", positive)
    resume_checkpoint: str = flag("", "a model*.pt to resume, or 'auto': newest in --output_dir")
    fp16_scale_growth: float = flag(1e-3, "log2 growth of the fp16 loss scale per step",
                                    finite_non_negative)
    init_checkpoint: str = flag("", "fine-tune: these weights at step 0, fresh optimizer; the "
                                    "model flags come from the args.json beside it (or preset)")
    global_batch_size: int = flag(0, "> 0: images per step over all ranks, split evenly "
                                     "(sets --batch_size); 0: --batch_size is per rank",
                                  non_negative)
    grad_clip: float = flag(0.0, "clip the global gradient norm to this; 0: off (the original)",
                            finite_non_negative)
    lr_warmup_steps: int = flag(0, "raise the lr linearly over this many steps; 0: off",
                                non_negative)
    max_bad_steps: int = flag(10, "stop after this many non-finite steps in a row; 0: never",
                              non_negative)
    sample_interval: int = flag(0, "steps between sample grids beside the checkpoints; 0: off",
                                non_negative)
    dry_run: bool = flag(False, "print parameters, FLOPs and memory per step, then exit")


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """classifier_train.py's own flags (with TrainingConfig(lr=3e-4, batch_size=4))."""

    val_data_dir: str = flag("", "held-out images for evaluation; '': none")
    noised: bool = flag(True, "train on noisy x_t at random t (False: clean images)")
    iterations: int = flag(150000, "training steps", positive)
    anneal_lr: bool = flag(False, "decay lr linearly to 0 over --iterations")
    eval_interval: int = flag(5, "steps between evaluations on --val_data_dir", positive)
    random_crop: bool = flag(True, "random crops, as the original trains its classifiers")


@dataclass(frozen=True)
class ConsistencyConfig:
    """cm_distill.py: consistency distillation (Song et al. 2023) of a trained teacher."""

    teacher_path: str = flag("", "the teacher's checkpoint (.pt, the model flags' network); the "
                                 "student starts from its weights")
    training_mode: str = flag("consistency_distillation", "consistency_distillation (teacher) or "
                                                          "consistency_training (no teacher)",
                              one_of(*CM_TRAINING_MODES))
    cm_steps: int = flag(18, "N, points of the teacher's grid that CD walks along (paper: 18-40); "
                             "with --cm_curriculum ict: s0, the first N is s0 + 1 (iCT: 10)",
                         at_least(2))
    cm_curriculum: str = flag("none", "'none': N = --cm_steps throughout; 'ict': iCT's doubling "
                                      "N(k) = min(s0 2^floor(k/K'), s1) + 1 over --lr_anneal_steps",
                              one_of(*CM_CURRICULA))
    cm_steps_max: int = flag(1280, "s1, the curriculum's last N - 1 (iCT: 1280), capped to the "
                                   "grid",
                             at_least(2))
    cm_noise_dist: str = flag("uniform", "how the pair n is drawn: 'uniform' or iCT's discrete "
                                         "'lognormal' in sigma/alpha (P_mean -1.1, P_std 2)",
                              one_of(*CM_NOISE_DISTS))
    cm_spacing: str = flag("karras", "how the N points are picked, as --sampler_spacing (karras: "
                                     "capped at sigma/alpha 80)", one_of(*CM_SPACINGS))
    teacher_solver: str = flag("heun", "the teacher's ODE step: " + ", ".join(ODE_SAMPLERS)
                                       + " (heun: 2 NFE)", one_of(*ODE_SAMPLERS))
    cm_loss: str = flag("pseudo_huber", "the distance: 'pseudo_huber' or 'l2'",
                        one_of(*CM_DISTANCES))
    cm_huber_c: float = flag(0.0, "pseudo-Huber's c; 0: 0.00054 sqrt(values per sample)",
                             finite_non_negative)
    cm_weighting: str = flag("uniform", "lambda(t_n): 'uniform' or 'inverse_step' (iCT's "
                                        "1 / (sigma~_{n+1} - sigma~_n))",
                             one_of(*CM_WEIGHTINGS))
    target_ema: float = flag(0.95, "decay of the target network's EMA; 0: the student itself",
                             unit_interval)
    teacher_cfg_scale: float = flag(1.0, "CFG weight of the teacher (needs label dropout); 1: off",
                                    finite)
    cm_dropout: float = flag(0.0, "the student's dropout (Song et al. 2023: 0); the model flags' "
                                  "--dropout is the teacher's", rate)


@dataclass(frozen=True)
class NllConfig:
    """image_nll.py's own flags."""

    data_dir: str = flag("", "folder of images to evaluate")


# The quality table's rows, sampler:steps:cfg_scale:classifier_scale: unguided conditional samplers
# at several NFE, then CFG and classifier-guidance sweeps with DPM-Solver++(2M) at 20 steps.
# Classifier guidance steers the unconditional branch (cfg 0), as the paper's unconditional rows.
SAMPLER_TABLE_ROWS = (
    "ddpm:250:1:0,ddpm:50:1:0,ddpm:20:1:0,ddim:50:1:0,ddim:20:1:0,plms:20:1:0,heun:10:1:0,"
    "dpm++3m:20:1:0,dpm++2m:10:1:0,dpm++2m:20:1:0,unipc:5:1:0,unipc:10:1:0,dpm++2m-sde:20:1:0,"
    "dpm++2m-sde:50:1:0,"
    "dpm++2m:20:0:0,dpm++2m:20:2:0,dpm++2m:20:4:0,"
    "dpm++2m:20:0:1,dpm++2m:20:0:3"
)


@dataclass(frozen=True)
class SamplerTableConfig:
    """sampler_table.py's own flags."""

    out_dir: str = flag("runs/sampler_table/table", "where the table, grids and plot go")
    rows: str = flag(SAMPLER_TABLE_ROWS, "comma-separated sampler:steps:cfg_scale:classifier_scale")
    judge_path: str = flag("", "the judge MLP; '': {out_dir}/judge.pt, trained on first use")
    dit_path: str = flag("", "a second model (e.g. a --model dit run; flags from its args.json) "
                             "whose --dit_rows are added to the table; '': none")
    dit_rows: str = flag("dpm++2m:20:1:0,dpm++2m:20:2:0", "the rows of --dit_path")
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
    isolate: int = flag(0, "R > 0: every variant in its own process, R rounds alternating "
                           "(large working sets disturb each other in one process)",
                        non_negative)
    original_path: str = flag("", "a checkout of openai/guided-diffusion: the 'original' variant "
                                  "runs its code on the same weights; '': the faithful path with "
                                  "the original's always-checkpointed attention")


# How the evaluator resizes and scales images for Inception (evaluations/inception.py): 'tf' as the
# original's TF graph (which made the reference batches' statistics), or 'pytorch_fid'.
PREPROCESSING_MODES = ("pytorch_fid", "tf")
INCEPTION_WEIGHTS_ENV_VAR = "GD_INCEPTION_PATH"


@dataclass(frozen=True)
class EvaluatorConfig:
    """evaluations/evaluator.py's flags (and make_reference_batch.py's, but --output)."""

    inception_path: str = flag("", f"pt_inception-2015-12-05-6726825d.pth (default: "
                                   f"${INCEPTION_WEIGHTS_ENV_VAR}, then the cache)")
    batch_size: int = flag(64, "images per Inception forward pass", positive)
    device: str = flag("", "cuda, cuda:1, cpu... (default: cuda when available)")
    output: str = flag("", "also write the metrics to this JSON file")
    preprocessing: str = flag(
        "tf", "how images are resized to 299 and scaled: 'tf' (as the original's TF graph, which "
              "made the reference statistics) or 'pytorch_fid' (as pytorch-fid)",
        one_of(*PREPROCESSING_MODES))


@dataclass(frozen=True)
class ReferenceBatchConfig:
    """evaluations/make_reference_batch.py's own flag."""

    image_size: int = flag(0, "resize and center-crop to this size as training data is (0: keep)",
                           non_negative)


@dataclass(frozen=True)
class SyntheticImagesConfig:
    """make_synthetic_imagenet.py's flags: an ImageNet-like folder of JPEGs, no download."""

    out: str = flag("", "the folder to write (created; a rerun writes only missing files)")
    num_images: int = flag(50_000, "images in all", positive)
    num_classes: int = flag(100, "class folders (n00000000, ...)", positive)
    quality: int = flag(75, "JPEG quality (ImageNet's files: about 75-95)",
                        lambda v: None if 1 <= v <= 95 else "must be in 1..95")
    seed: int = flag(0, "the seed of every image", non_negative)
    workers: int = flag(0, "processes that write images; 0: one per CPU", non_negative)


@dataclass(frozen=True)
class DataBenchmarkConfig:
    """data_benchmark.py's flags: the data path's start-up cost and throughput."""

    data_dir: str = flag("", "a folder of full-size images (e.g. make_synthetic_imagenet.py's)")
    image_sizes: str = flag("64,256", "crop sizes to time the loader at", int_list(False))
    workers: str = flag("1,2", "loader worker counts to time (0: the rank itself)",
                        int_list(False, min_value=0))
    batch_size: int = flag(64, "images per batch (per rank)", positive)
    seconds: float = flag(20.0, "timed seconds per (size, workers), after the first batch",
                          positive)
    checks: str = flag("header", "start-up checks to time, fresh index then restart: "
                                 "'header', 'full' or 'header,full'", subset_of("header", "full"))
    step_configs: str = flag("64:adm64,256:adm256", "size:benchmark.py config whose training "
                                                    "step is timed beside the loader; '': none")
    step_batch: int = flag(0, "batch of the timed training step; 0: the config's", non_negative)
    device: str = flag("", "cpu or cuda for the training step; '': cuda when available")
    threads: int = flag(0, "torch threads of the training step; 0: torch's default (on a shared "
                           "CPU, 1 measures work instead of waiting)", non_negative)
    json: str = flag("", "also write the full report here")


# ------------------------------------------------------------------------------------------------
# Presets: the released checkpoints' commands by name (--preset), or by the checkpoint's file name


class Preset(NamedTuple):
    """
    The flags of one released checkpoint's command, as the original README (or DiT's scripts)
    spell them. `flags` are the network's and diffusion's (plus, for a sampling command that
    names a classifier, the classifier's; a script takes those it has); `sampling` only applies
    in the sampling scripts (those with --cfg_scale): steps, guidance weights, quantisation.
    """

    kind: str  # the network: unet, dit, superres or classifier (a key of cli.MODEL_KINDS)
    about: str  # one line for the README's table
    flags: Mapping[str, Any]
    sampling: Mapping[str, Any] = {}  # never mutated


# The original README's MODEL_FLAGS, shared by its 256/512 px ImageNet and LSUN models.
_ADM_BIG = dict(attention_resolutions="32,16,8", diffusion_steps=1000, learn_sigma=True,
                noise_schedule="linear", num_channels=256, num_head_channels=64,
                num_res_blocks=2, resblock_updown=True, use_fp16=True, use_scale_shift_norm=True)
# The README's SAMPLE_FLAGS: 250 steps for ImageNet, 1000 for LSUN ("the best samples").
_ADM_250, _ADM_1000 = {"timestep_respacing": "250"}, {"timestep_respacing": "1000"}
_LSUN = dict(_ADM_BIG, class_cond=False, dropout=0.1, image_size=256)
_UPSAMPLER = dict(class_cond=True, diffusion_steps=1000, learn_sigma=True, noise_schedule="linear",
                  num_channels=192, num_res_blocks=2, resblock_updown=True, use_fp16=True,
                  use_scale_shift_norm=True)
# DiT (Peebles & Xie 2023): DiT-XL/2 in the SD VAE's latents (8x smaller, 4 channels); DiT's
# train.py recipe (AdamW lr 1e-4, no weight decay, EMA 0.9999, global batch 256, label dropout
# 0.1) applies in the training scripts, sample_ddp.py's FID setting (250 DDPM steps, CFG 1.5 on
# the first 3 channels, rounding to uint8) in the sampling scripts.
_DIT_XL2 = dict(model="dit", dit_model="DiT-XL/2", class_cond=True, num_classes=1000,
                class_dropout_prob=0.1, learn_sigma=True, diffusion_steps=1000,
                noise_schedule="linear", latent_vae="stabilityai/sd-vae-ft-ema",
                lr=1e-4, weight_decay=0.0, ema_rate="0.9999", global_batch_size=256)
_DIT_SAMPLING = dict(timestep_respacing="250", cfg_scale=1.5, cfg_channels=3, quantize="round")

PRESETS: dict[str, Preset] = {
    "64x64_diffusion": Preset(
        "unet", "ImageNet 64, class-conditional (+ 64x64_classifier at scale 1.0)",
        dict(attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, dropout=0.1,
             image_size=64, learn_sigma=True, noise_schedule="cosine", num_channels=192,
             num_head_channels=64, num_res_blocks=3, resblock_updown=True,
             use_new_attention_order=True, use_fp16=True, use_scale_shift_norm=True,
             classifier_depth=4),
        dict(_ADM_250, classifier_scale=1.0)),
    "128x128_diffusion": Preset(
        "unet", "ImageNet 128, class-conditional (+ 128x128_classifier at scale 0.5)",
        dict(attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000,
             image_size=128, learn_sigma=True, noise_schedule="linear", num_channels=256,
             num_heads=4, num_res_blocks=2, resblock_updown=True, use_fp16=True,
             use_scale_shift_norm=True),
        dict(_ADM_250, classifier_scale=0.5)),
    "256x256_diffusion": Preset(
        "unet", "ImageNet 256, class-conditional (+ 256x256_classifier at scale 1.0)",
        dict(_ADM_BIG, class_cond=True, image_size=256), dict(_ADM_250, classifier_scale=1.0)),
    "256x256_diffusion_uncond": Preset(
        "unet", "ImageNet 256, unconditional (+ 256x256_classifier at scale 10.0)",
        dict(_ADM_BIG, class_cond=False, image_size=256), dict(_ADM_250, classifier_scale=10.0)),
    "512x512_diffusion": Preset(
        "unet", "ImageNet 512, class-conditional, fp32 (+ 512x512_classifier at scale 4.0)",
        dict(_ADM_BIG, class_cond=True, image_size=512, use_fp16=False),
        dict(_ADM_250, classifier_scale=4.0)),
    "64x64_classifier": Preset("classifier", "noisy ImageNet classifier, 64 px",
                               dict(image_size=64, classifier_depth=4)),
    "128x128_classifier": Preset("classifier", "noisy ImageNet classifier, 128 px",
                                 dict(image_size=128)),
    "256x256_classifier": Preset("classifier", "noisy ImageNet classifier, 256 px",
                                 dict(image_size=256)),
    "512x512_classifier": Preset("classifier", "noisy ImageNet classifier, 512 px",
                                 dict(image_size=512)),
    "64_256_upsampler": Preset(
        "superres", "ImageNet 64 -> 256 super-resolution, class-conditional",
        dict(_UPSAMPLER, attention_resolutions="32,16,8", large_size=256, small_size=64,
             num_heads=4), _ADM_250),
    "128_512_upsampler": Preset(
        "superres", "ImageNet 128 -> 512 super-resolution, class-conditional",
        dict(_UPSAMPLER, attention_resolutions="32,16", large_size=512, small_size=128,
             num_head_channels=64), _ADM_250),
    "lsun_bedroom": Preset("unet", "LSUN bedroom 256, unconditional", _LSUN, _ADM_1000),
    "lsun_cat": Preset("unet", "LSUN cat 256, unconditional", _LSUN, _ADM_1000),
    "lsun_horse": Preset("unet", "LSUN horse 256, unconditional", _LSUN, _ADM_1000),
    "lsun_horse_nodropout": Preset("unet", "LSUN horse 256, trained without dropout",
                                   dict(_LSUN, dropout=0.0), _ADM_1000),
    "DiT-XL-2-256x256": Preset(
        "dit", "DiT-XL/2, ImageNet 256 in SD-VAE latents (FID 2.27 at CFG 1.5); DiT's training "
               "recipe in image_train.py", dict(_DIT_XL2, image_size=256), _DIT_SAMPLING),
    "DiT-XL-2-512x512": Preset(
        "dit", "DiT-XL/2, ImageNet 512 in SD-VAE latents (FID 3.04 at CFG 1.5); DiT's training "
               "recipe in image_train.py", dict(_DIT_XL2, image_size=512), _DIT_SAMPLING),
}
# --preset's other values: '' finds the preset by --model_path's file name; 'none' never does.
PRESET_BY_FILE_NAME, NO_PRESET = "", "none"
# The flag that, present in a parser, shows that it builds the network of a preset's kind (the
# super-resolution model has the U-Net's flags too, but its size is --large_size).
_KIND_FLAG = {"unet": "use_new_attention_order", "dit": "dit_model", "superres": "large_size",
              "classifier": "classifier_width"}


def preset_for_file(path: str) -> str | None:
    """The preset whose released checkpoint has `path`'s file name (e.g. '.../64x64_diffusion.pt'
    -> '64x64_diffusion'), else None."""
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    stem = name[: -len(".pt")] if name.endswith(".pt") else None
    return stem if stem in PRESETS else None


def preset_flags(name: str, sampling: bool) -> dict[str, Any]:
    """The flags preset `name` sets: its model flags, and its sampling flags when `sampling`."""
    preset = PRESETS[name]
    return {**preset.flags, **(preset.sampling if sampling else {})}


@dataclass(frozen=True)
class PresetConfig:
    """Named presets: the flags of a released checkpoint's command (README: Presets)."""

    preset: str = flag(
        PRESET_BY_FILE_NAME, "set the flags of this released checkpoint's command (flags given "
        "also win over it): " + ", ".join(PRESETS) + "; '': by --model_path's (and "
        "--classifier_path's, --init_checkpoint's, --teacher_path's) file name when no args.json "
        "is beside it; 'none': never", one_of(PRESET_BY_FILE_NAME, NO_PRESET, *PRESETS))


def apply_preset(ns: argparse.Namespace, given: set[str]) -> None:
    """
    --preset NAME: set each of the preset's flags that `ns` has and the command line did not give
    (given flags win, as flags typed after the README's $MODEL_FLAGS do), and count them as given.
    Sampling flags apply where `ns` has --cfg_scale. A ValueError names a preset of a network
    the script does not build.
    """
    name = getattr(ns, "preset", PRESET_BY_FILE_NAME)
    if name not in PRESETS:
        return
    kind_flag = _KIND_FLAG[PRESETS[name].kind]
    if not hasattr(ns, kind_flag):
        raise ValueError(f"--preset {name}: a {PRESETS[name].kind} preset, and this script has "
                         f"no --{kind_flag} (a preset of another network?)")
    for key, value in preset_flags(name, sampling=hasattr(ns, "cfg_scale")).items():
        if hasattr(ns, key) and key not in given:
            setattr(ns, key, value)
            given.add(key)


@dataclass(frozen=True)
class GpuCheckConfig:
    """scripts/gpu_check.py's flags (besides --smoke, its mode switch)."""

    out: str = flag("gpu_check.json", "write the full report here (JSON)")
    device: str = flag("", "default: cuda when available, else cpu")
    layouts: str = flag("", "comma-separated benchmark.py configs (default adm64,adm256; "
                            "--smoke: tiny)")
    runs: int = flag(0, "timed runs per phase (default 5; smoke 1)", non_negative)
    train_batch: int = flag(0, "training batch (default: benchmark.py's, 32 at 64 px, 8 at 256 px)",
                            non_negative)
    sample_batch: int = flag(0, "sampling batch (default: benchmark.py's, 64 at 64 px, 16 at "
                                "256 px)", non_negative)
    allreduce: str = flag("auto", "auto: NCCL between GPUs 0 and 1 when two are present, else "
                                  "skip", one_of("auto", "nccl", "gloo", "off"))
    allreduce_mib: int = flag(0, "all-reduce buffer size (default 256 MiB; smoke 1 MiB)",
                              non_negative)


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


def flag_checks(*groups: Group) -> dict[str, Check]:
    """name -> the domain check of each flag of `groups` that has one."""
    out: dict[str, Check] = {}
    for group in groups:
        for f in dataclasses.fields(group):
            if f.metadata.get("check") is not None and f.name not in out:
                out[f.name] = f.metadata["check"]
    return out


# Checks across flags, per config class: namespace -> None, or raise ValueError("--flag ...").
# Each runs only when every flag it reads is in the parser (see `FlagParser.parse_known_args`).
CROSS_CHECKS: dict[str, list[Callable[[argparse.Namespace], None]]] = {}


def cross_check(*class_names: str) -> Callable:
    """Register a check across flags for the config classes named (by `__name__`)."""
    def register(fn: Callable[[argparse.Namespace], None]) -> Callable:
        for name in class_names:
            CROSS_CHECKS.setdefault(name, []).append(fn)
        return fn
    return register


class ParsedFlags(argparse.Namespace):
    """The parsed flags, and which of them the command line gave (`given_flags`); `given` is a
    slot, so `vars(args)` (what args.json stores) holds the flags only."""

    __slots__ = ("given",)


def given_flags(args: argparse.Namespace) -> set[str] | None:
    """The flags the command line gave (or --preset set), to be kept when flags are taken from a
    run's args.json; None when unknown (a Namespace not parsed by `FlagParser`)."""
    return getattr(args, "given", None)


_NOT_GIVEN = object()  # a flag's value before parsing: still there afterwards = not given


class FlagParser(argparse.ArgumentParser):
    """
    argparse with the scripts' error format: one line `error: ...` on stderr and exit status 2
    (no usage block); it records which flags were given (`given_flags`), applies --preset, then
    runs the cross-flag checks of its config groups.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cross_checks: list[Callable[[argparse.Namespace], None]] = []

    def parse_known_args(self, args=None, namespace=None):
        optionals = [a.dest for a in self._actions
                     if a.option_strings and a.dest is not argparse.SUPPRESS and a.dest != "help"]
        if namespace is None:
            # argparse sets a default only where the namespace lacks the attribute: a flag still
            # holding the marker afterwards was not on the command line.
            namespace = ParsedFlags(**{dest: _NOT_GIVEN for dest in optionals})
        ns, extra = super().parse_known_args(args, namespace)
        if isinstance(ns, ParsedFlags):
            ns.given = {d for d in optionals if getattr(ns, d) is not _NOT_GIVEN}
            for action in self._actions:
                if action.dest in optionals and action.dest not in ns.given:
                    if action.default is argparse.SUPPRESS:  # add_flags(suppress=True): absent
                        delattr(ns, action.dest)
                    else:
                        setattr(ns, action.dest, action.default)
            try:
                apply_preset(ns, ns.given)
            except ValueError as e:
                self.error(str(e))
        for check in self.cross_checks:
            try:
                check(ns)
            except AttributeError:  # a flag this check reads is not in this parser
                continue
            except ValueError as e:
                self.error(str(e))
        return ns, extra

    def error(self, message: str):  # noqa: D401 - argparse's hook
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        sys.exit(2)


def build_parser(description: str | None, *groups: Group,
                 drop: Iterable[str] = ()) -> argparse.ArgumentParser:
    """
    One argparse parser with a `--name` per field of `groups` (one `--help` section per group),
    typed by its default (booleans parse as the original's str2bool), the field's comment as its
    `--help` line. A name in several groups is taken from the first; `drop` leaves names out.
    Every value given is checked against its flag's domain, then the groups' cross-flag checks
    run; a failure is one line `error: --flag: ...` and exit status 2.
    """
    parser = FlagParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    seen = set(drop)
    for group in groups:
        cls = group if isinstance(group, type) else type(group)
        for check in CROSS_CHECKS.get(cls.__name__, []):
            if check not in parser.cross_checks:
                parser.cross_checks.append(check)
        fields = {k: v for k, v in flag_fields(group).items() if k not in seen}
        if not fields:
            continue
        seen.update(fields)
        title = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None
        add_flags(parser.add_argument_group(cls.__name__, title), fields,
                  checks=flag_checks(group))
    return parser


def add_flags(parser: argparse.ArgumentParser | Any, fields: Mapping[str, tuple[Any, str]],
              suppress: bool = False, checks: Mapping[str, Check] | None = None) -> None:
    """
    Add `--name` flags for name -> (default, help) to a parser or argument group. With
    `suppress`, a flag not given is absent from the parsed namespace (to tell given from default).
    `checks` (name -> domain check) refuse a given value outside the flag's domain.
    """
    checks = checks or {}
    for name, (default, help_text) in fields.items():
        if default is None:
            kind = str
        elif isinstance(default, bool):
            kind = str2bool
        else:
            kind = type(default)
        shown = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS if suppress else default,
                            type=_checked(name, kind, checks.get(name)),
                            help=shown.replace("%", "%%"))


def _checked(name: str, kind: Callable[[str], Any], check: Check | None) -> Callable[[str], Any]:
    """The argparse `type` of a flag: parse with `kind`, then refuse values outside its domain."""
    if check is None:
        return kind

    def parse(text: str) -> Any:
        value = kind(text)
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
        return value

    # argparse names the type in "invalid <type> value" messages.
    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


# ------------------------------------------------------------------------------------------------
# Flag values that need more than a type: channel multipliers, timestep respacing


def default_channel_mult(image_size: int, kind: str) -> tuple:
    """Channel multipliers per resolution level, as the original chooses them from image size.

    32 px is beyond the original: (1, 2, 2, 2) as improved-diffusion used for CIFAR-10.
    """
    table = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
        32: (1, 2, 2, 2),
    }
    if kind == "superres" and image_size == 512:
        # The original's super-resolution model uses the 256 px multipliers at 512 px.
        return (1, 1, 2, 2, 4, 4)
    if image_size not in table:
        raise ValueError(
            f"unsupported image size {image_size} for the {kind} model: pass --channel_mult "
            f"explicitly (e.g. '1,2,2,2'), or use one of {sorted(table)}"
        )
    return table[image_size]


def parse_channel_mult(channel_mult, image_size: int, kind: str) -> tuple:
    if channel_mult in ("", None):
        return default_channel_mult(image_size, kind)
    if isinstance(channel_mult, str):
        try:
            return tuple(int(m) for m in channel_mult.split(","))
        except ValueError:
            raise ValueError(
                f"--channel_mult must be comma-separated integers, got {channel_mult!r}")
    return tuple(channel_mult)


def space_timesteps(num_timesteps: int, section_counts) -> set:
    """
    Choose which timesteps of the original process to keep.

    The process is split into len(section_counts) equal sections (the first T % len sections are
    one step longer) and each section keeps its count of evenly strided steps, rounded to
    integers.  For example, T = 300 with [10, 15, 20] keeps 10 steps from the first 100,
    15 from the next 100 and 20 from the last 100.

    :param num_timesteps: T, the number of steps of the original process.
    :param section_counts: a list of step counts per section, or a string of comma-separated
                           counts ("10,15,20"; "250" is one section).  "ddimN" instead picks the
                           integer stride that gives exactly N steps, as the DDIM paper does.
    :return: the set of original timesteps to keep.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired_count = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(
                    f"timestep respacing {section_counts!r}: expected 'ddim' followed by a step "
                    f"count, e.g. 'ddim25'"
                ) from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep respacing {section_counts!r}: cannot take exactly {desired_count} "
                f"steps out of {num_timesteps} with an integer stride"
            )
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep respacing {section_counts!r}: expected comma-separated step counts "
                f"(e.g. '250' or '10,15,20') or 'ddimN'"
            ) from None
    section_counts = list(section_counts)
    if not section_counts:
        raise ValueError("timestep respacing needs at least one section count")
    if any(c < 0 for c in section_counts):
        raise ValueError(f"timestep respacing {section_counts}: counts must not be negative")

    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"timestep respacing {section_counts}: section {i} has {size} of the "
                f"{num_timesteps} steps, cannot take {section_count} from it"
            )
        # Stride that puts the first and last kept step on the section's ends.
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulate the float index (not i * stride): it rounds like the original.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


# ------------------------------------------------------------------------------------------------
# Checks across flags


def _check_halvable(size: int, size_flag: str, channel_mult: str, mult_flag: str,
                    kind: str) -> None:
    try:
        levels = len(parse_channel_mult(channel_mult, size, kind))
    except ValueError as e:  # no default multipliers for this size
        hint = (f"pass {mult_flag} explicitly, e.g. '1,2,2,2'" if mult_flag.startswith("--")
                else str(e).split("or use ")[-1])
        raise ValueError(f"--{size_flag} {size}: {str(e).split(':')[0]}: {hint}") from None
    # The U-Net halves the image once per level but the last; an odd size on the way breaks the
    # skip connections (shape error deep in the forward pass).
    if size % 2 ** (levels - 1):
        raise ValueError(
            f"--{size_flag} {size}: the network halves it {levels - 1} times ({mult_flag} has "
            f"{levels} levels), so it must be a multiple of {2 ** (levels - 1)}")


def _check_attention(resolutions: str, size: int, flag_name: str) -> None:
    for res in filter(None, resolutions.split(",")):
        if size % int(res):
            raise ValueError(f"--{flag_name}: {res} does not divide the image size {size}")


@cross_check("UNetConfig")
def _unet_sizes(ns: argparse.Namespace) -> None:
    # A DiT has no U-Net sizes; in latent space the U-Net's size is the VAE's latent size, known
    # only once the VAE's config is read (latent.space_from_flags checks it then).
    if getattr(ns, "model", "unet") != "unet" or getattr(ns, "latent_vae", ""):
        return
    _check_halvable(ns.image_size, "image_size", ns.channel_mult, "--channel_mult", "unet")
    _check_attention(ns.attention_resolutions, ns.image_size, "attention_resolutions")


@cross_check("SuperResConfig")
def _superres_sizes(ns: argparse.Namespace) -> None:
    if ns.small_size > ns.large_size:
        raise ValueError(f"--small_size {ns.small_size} is larger than --large_size "
                         f"{ns.large_size}: the model upsamples small to large")
    _check_halvable(ns.large_size, "large_size", "", "the defaults for --large_size", "superres")


@cross_check("ClassifierConfig")
def _classifier_sizes(ns: argparse.Namespace) -> None:
    _check_halvable(ns.image_size, "image_size", ns.classifier_channel_mult,
                    "--classifier_channel_mult", "classifier")
    _check_attention(ns.classifier_attention_resolutions, ns.image_size,
                     "classifier_attention_resolutions")


@cross_check("DiffusionConfig")
def _linear_betas(ns: argparse.Namespace) -> None:
    # The linear schedule scales beta_T = 0.02 * 1000 / T (Ho et al. 2020, rescaled as the
    # original does): at T <= 20 it reaches 1, alpha_bar_T = 0, and every 1/alpha_bar is inf.
    if ns.noise_schedule == "linear" and ns.diffusion_steps <= 20:
        raise ValueError(f"--diffusion_steps {ns.diffusion_steps} with --noise_schedule linear "
                         "makes beta_T = 20 / T >= 1; use more than 20 steps or 'cosine'")


@cross_check("DiffusionConfig")
def _respacing(ns: argparse.Namespace) -> None:
    if not ns.timestep_respacing:
        return
    try:
        kept = space_timesteps(ns.diffusion_steps, ns.timestep_respacing)
    except ValueError as e:
        raise ValueError(f"--timestep_respacing: {e}") from None
    if len(kept) < 2:
        # One step cannot go from x_T to x_0 through the posterior the respaced betas define.
        raise ValueError(f"--timestep_respacing {ns.timestep_respacing!r} keeps {len(kept)} "
                         "step(s); use at least 2")


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
