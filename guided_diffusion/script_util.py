"""Factories that turn command-line flags into models and diffusions, and the original's views.

Every flag, its default and its help line live in `config.py`; the original's
`model_and_diffusion_defaults()`, `classifier_defaults()`, ... are dict views of those dataclasses,
and `create_model_and_diffusion(**flags)`, ... build the dataclasses from their keyword arguments
(an unknown name is a TypeError naming it) and pass them on, exactly as the original's README
commands expect. `create_model`, `create_classifier`, `sr_create_model` and
`create_gaussian_diffusion` keep the original's signatures and defaults.
"""

from __future__ import annotations

import argparse
import dataclasses

from . import gaussian_diffusion as gd
from .config import (
    DIT_SHARED_FLAGS,
    NUM_CLASSES,
    ClassifierConfig,
    DiffusionConfig,
    DiTConfig,
    SuperResConfig,
    UNetConfig,
    add_flags,
    defaults,
    from_flags,
    parse_channel_mult,
    space_timesteps,
    split_flags,
    str2bool,
)
from .dit import DiT, DiT_models
from .respace import SpacedDiffusion
from .unet import EncoderUNetModel, SuperResModel, UNetModel

__all__ = [
    "NUM_CLASSES", "add_dict_to_argparser", "args_to_dict", "classifier_and_diffusion_defaults",
    "classifier_defaults", "create_classifier", "create_classifier_and_diffusion",
    "create_dit_and_diffusion", "create_gaussian_diffusion", "create_model", "create_model_and_diffusion",
    "diffusion_defaults", "diffusion_from_config", "dit_and_diffusion_defaults",
    "model_and_diffusion_defaults",
    "sr_create_model", "sr_create_model_and_diffusion", "sr_model_and_diffusion_defaults",
    "str2bool",
]


def diffusion_defaults() -> dict:
    """Defaults shared by every diffusion (image and super-res models, classifiers)."""
    return defaults(DiffusionConfig)


def classifier_defaults() -> dict:
    """Defaults for the noisy-image classifier of classifier guidance."""
    return defaults(ClassifierConfig)


def model_and_diffusion_defaults() -> dict:
    """Defaults for the image U-Net and its diffusion (image_train / image_sample flags)."""
    return defaults(UNetConfig, DiffusionConfig)


def classifier_and_diffusion_defaults() -> dict:
    """Defaults for the classifier and its diffusion (classifier_train flags)."""
    return defaults(ClassifierConfig, DiffusionConfig)


def sr_model_and_diffusion_defaults() -> dict:
    """Defaults for the super-resolution model (large/small size) and its diffusion."""
    return defaults(SuperResConfig, DiffusionConfig)


def diffusion_from_config(cfg: DiffusionConfig) -> SpacedDiffusion:
    """`create_gaussian_diffusion` from the diffusion flags (`diffusion_steps` is its `steps`)."""
    kwargs = dataclasses.asdict(cfg)
    kwargs["steps"] = kwargs.pop("diffusion_steps")
    return create_gaussian_diffusion(**kwargs)


def create_model_and_diffusion(
    in_channels: int = 3, **flags
) -> tuple[UNetModel, SpacedDiffusion]:
    """
    The image U-Net and its diffusion from the `model_and_diffusion_defaults()` flags (missing
    ones take their defaults).

    :param in_channels: image channels; a VAE's latent channels in latent space (beyond).
    """
    unet, diffusion = split_flags(flags, UNetConfig, DiffusionConfig)
    model = create_model(learn_sigma=diffusion.learn_sigma, in_channels=in_channels,
                         **dataclasses.asdict(unet))
    return model, diffusion_from_config(diffusion)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    num_classes=NUM_CLASSES,
    class_dropout_prob=0.0,
    in_channels=3,
) -> UNetModel:
    return UNetModel(
        **_unet_args(locals(), "unet"),
        use_new_attention_order=use_new_attention_order,
        class_dropout_prob=(class_dropout_prob if class_cond else 0.0),
    )


# The flags that reach UNetModel / SuperResModel unchanged.
_UNET_PASSED = ("num_res_blocks", "dropout", "use_checkpoint", "use_fp16", "num_heads",
                "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
                "resblock_updown")


def _unet_args(flags: dict, kind: str) -> dict:
    """The U-Net arguments both image factories derive from their flags as the original does:
    output channels (doubled to learn sigma), attention resolutions in pixels -> downsample
    rates, channel multipliers (defaults per image size), labels only if class-conditional."""
    size, channels = flags["image_size"], flags["in_channels"]
    return dict(
        {k: flags[k] for k in _UNET_PASSED},
        image_size=size,
        in_channels=channels,
        model_channels=flags["num_channels"],
        out_channels=channels * (2 if flags["learn_sigma"] else 1),
        attention_resolutions=_attention_ds(flags["attention_resolutions"], size),
        channel_mult=parse_channel_mult(flags["channel_mult"], size, kind),
        num_classes=(flags["num_classes"] if flags["class_cond"] else None),
    )


def create_classifier_and_diffusion(**flags) -> tuple[EncoderUNetModel, SpacedDiffusion]:
    """The classifier and its diffusion from the `classifier_and_diffusion_defaults()` flags."""
    classifier, diffusion = split_flags(flags, ClassifierConfig, DiffusionConfig)
    return create_classifier(**dataclasses.asdict(classifier)), diffusion_from_config(diffusion)


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    classifier_channel_mult="",
    num_classes=NUM_CLASSES,
) -> EncoderUNetModel:
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=_attention_ds(classifier_attention_resolutions, image_size),
        channel_mult=parse_channel_mult(classifier_channel_mult, image_size, "classifier"),
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def sr_create_model_and_diffusion(**flags) -> tuple[SuperResModel, SpacedDiffusion]:
    """The super-resolution model and its diffusion from `sr_model_and_diffusion_defaults()`."""
    sr, diffusion = split_flags(flags, SuperResConfig, DiffusionConfig)
    model = sr_create_model(learn_sigma=diffusion.learn_sigma, **dataclasses.asdict(sr))
    return model, diffusion_from_config(diffusion)


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
) -> SuperResModel:
    del small_size  # the low-res input is upsampled to large_size inside the model
    # The 256 px multipliers at 512 px, as the original's super-resolution model.
    return SuperResModel(**_unet_args(
        dict(locals(), image_size=large_size, in_channels=3, channel_mult=""), "superres"))


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
) -> SpacedDiffusion:
    """The one diffusion factory: a `SpacedDiffusion` over the full (or respaced) schedule."""
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=(gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON),
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def _attention_ds(attention_resolutions: str, image_size: int) -> tuple:
    """Attention resolutions in pixels ("32,16,8") -> downsample rates (2, 4, 8 at 64 px)."""
    if not attention_resolutions:
        return ()
    out = []
    for res in str(attention_resolutions).split(","):
        res = int(res)
        if res <= 0 or image_size % res:
            raise ValueError(
                f"--attention_resolutions entry {res} does not divide image size {image_size}"
            )
        out.append(image_size // res)
    return tuple(out)


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: dict) -> None:
    """Add one `--key` flag per entry, typed by its default (bools parse "True"/"False")."""
    add_flags(parser, {k: (v, "") for k, v in default_dict.items()})


def args_to_dict(args, keys) -> dict:
    """The values of `keys` in parsed `args`, e.g. for `create_model_and_diffusion(**...)`."""
    return {k: getattr(args, k) for k in keys}


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
