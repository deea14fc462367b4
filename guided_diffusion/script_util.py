"""Flag defaults and factories that turn command-line flags into models and diffusions.

The defaults dicts below are the *one* place where every flag's default lives: the scripts build
their argparse parsers from them (`add_dict_to_argparser`) and pass the parsed values straight to
the `create_*` factories (`args_to_dict`), exactly as the original's README commands expect.
Flags beyond the original (`num_classes`, `class_dropout_prob`, `classifier_channel_mult`) default
to values that reproduce the original's behaviour and checkpoint layouts.
"""

from __future__ import annotations

import argparse
import inspect

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000


def diffusion_defaults() -> dict:
    """Defaults shared by every diffusion (image and super-res models, classifiers)."""
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def classifier_defaults() -> dict:
    """Defaults for the noisy-image classifier of classifier guidance."""
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",  # 16
        classifier_use_scale_shift_norm=True,  # False
        classifier_resblock_updown=True,  # False
        classifier_pool="attention",
        # Beyond the original: "" picks the per-resolution default of `_default_channel_mult`.
        classifier_channel_mult="",
        num_classes=NUM_CLASSES,
    )


def model_and_diffusion_defaults() -> dict:
    """Defaults for the image U-Net and its diffusion (image_train / image_sample flags)."""
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        # Beyond the original: number of labels, and the label-dropout rate of classifier-free
        # guidance (0 keeps the original's behaviour and its label_emb layout).
        num_classes=NUM_CLASSES,
        class_dropout_prob=0.0,
    )
    res.update(diffusion_defaults())
    return res


def classifier_and_diffusion_defaults() -> dict:
    res = classifier_defaults()
    res.update(diffusion_defaults())
    return res


def _default_channel_mult(image_size: int, kind: str) -> tuple:
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


def _parse_channel_mult(channel_mult, image_size: int, kind: str) -> tuple:
    if channel_mult in ("", None):
        return _default_channel_mult(image_size, kind)
    if isinstance(channel_mult, str):
        try:
            return tuple(int(m) for m in channel_mult.split(","))
        except ValueError:
            raise ValueError(f"--channel_mult must be comma-separated integers, got {channel_mult!r}")
    return tuple(channel_mult)


def _attention_ds(attention_resolutions: str, image_size: int) -> tuple:
    """Convert attention resolutions in pixels ("32,16,8") to downsample rates (2, 4, 8 at 64 px)."""
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


def _diffusion_from_flags(
    diffusion_steps, learn_sigma, noise_schedule, use_kl, predict_xstart,
    rescale_timesteps, rescale_learned_sigmas, timestep_respacing,
) -> SpacedDiffusion:
    """`create_gaussian_diffusion` from the `diffusion_defaults()` flags (their names differ)."""
    return create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    num_classes=NUM_CLASSES,
    class_dropout_prob=0.0,
):
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        num_classes=num_classes,
        class_dropout_prob=class_dropout_prob,
    )
    diffusion = _diffusion_from_flags(
        diffusion_steps, learn_sigma, noise_schedule, use_kl, predict_xstart,
        rescale_timesteps, rescale_learned_sigmas, timestep_respacing,
    )
    return model, diffusion


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
) -> UNetModel:
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=_parse_channel_mult(channel_mult, image_size, "unet"),
        num_classes=(num_classes if class_cond else None),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        class_dropout_prob=(class_dropout_prob if class_cond else 0.0),
    )


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    classifier_channel_mult="",
    num_classes=NUM_CLASSES,
):
    classifier = create_classifier(
        image_size,
        classifier_use_fp16,
        classifier_width,
        classifier_depth,
        classifier_attention_resolutions,
        classifier_use_scale_shift_norm,
        classifier_resblock_updown,
        classifier_pool,
        classifier_channel_mult=classifier_channel_mult,
        num_classes=num_classes,
    )
    diffusion = _diffusion_from_flags(
        diffusion_steps, learn_sigma, noise_schedule, use_kl, predict_xstart,
        rescale_timesteps, rescale_learned_sigmas, timestep_respacing,
    )
    return classifier, diffusion


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
        channel_mult=_parse_channel_mult(classifier_channel_mult, image_size, "classifier"),
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def sr_model_and_diffusion_defaults() -> dict:
    """Defaults for the super-resolution model: the image flags it uses, plus large/small size."""
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    arg_names = inspect.signature(sr_create_model_and_diffusion).parameters
    return {k: v for k, v in res.items() if k in arg_names}


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
):
    model = sr_create_model(
        large_size,
        small_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        num_classes=num_classes,
    )
    diffusion = _diffusion_from_flags(
        diffusion_steps, learn_sigma, noise_schedule, use_kl, predict_xstart,
        rescale_timesteps, rescale_learned_sigmas, timestep_respacing,
    )
    return model, diffusion


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
    return SuperResModel(
        image_size=large_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(attention_resolutions, large_size),
        dropout=dropout,
        channel_mult=_default_channel_mult(large_size, "superres"),
        num_classes=(num_classes if class_cond else None),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
    )


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


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: dict) -> None:
    """Add one `--key` flag per entry, typed by its default (bools parse "True"/"False")."""
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args, keys) -> dict:
    return {k: getattr(args, k) for k in keys}


def str2bool(v) -> bool:
    """Parse "yes/true/t/y/1" and "no/false/f/n/0" (any case) as argparse booleans."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")
