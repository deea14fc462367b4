"""Move models between this project and diffusers, both ways, tensor for tensor.

- The ADM U-Net (`unet.UNetModel`) <-> diffusers' `UNet2DModel`: the same network under other
  names. ADM's ResBlock is diffusers' `ResnetBlock2D` (AdaGN = `resnet_time_scale_shift=
  "scale_shift"`, BigGAN up/down blocks = `ResnetDownsampleBlock2D` / `downsample_type="resnet"`),
  its attention block is diffusers' `Attention` with separate q, k, v projections, `label_emb` is
  `class_embedding`, and the sinusoidal timestep features are `Timesteps(flip_sin_to_cos=True,
  freq_shift=0)` (cos half first, frequencies 10000^(-i / half)).
- DiT (`dit.DiT`, facebookresearch/DiT's names) <-> `DiTTransformer2DModel`. diffusers keeps a
  copy of the timestep and label embedders in every block (block 0's also feeds the final
  layer); DiT has one of each.
- The diffusion <-> a `DDPMScheduler` config: our betas (`trained_betas`, so cosine and linear
  are exact), T, the variance and prediction types.

A layout UNet2DModel cannot express is refused with one line naming the flag (see
`unet_diffusers_config`). Nothing here downloads; diffusers is an optional extra, imported only
by the functions that need it.

Attention orders: `QKVAttentionLegacy` reads the packed qkv rows as [heads x (q, k, v) x ch],
`QKVAttention` (`--use_new_attention_order`) as [(q, k, v) x heads x ch]; diffusers' q, k, v
projections are each [heads x ch]. Export picks the rows of each by the model's order, so a
legacy checkpoint computes the same attention in diffusers.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch as th

from . import gaussian_diffusion as gd
from .config import DiffusionConfig, from_flags
from .dit import DiT, DiT_models, get_2d_sincos_pos_embed
from .errors import BridgeError
from .fileio import atomic_write
from .unet import AttentionBlock, Downsample, QKVAttention, ResBlock, UNetModel

INSTALL_HINT = "pip install -e .[diffusers]"
FLAGS_FILE = "guided_diffusion_args.json"  # our flags, beside diffusers' folders (export)
MODEL_FOLDERS = {"unet": "unet", "dit": "transformer"}  # our model kind -> diffusers' subfolder
# The diffusers classes each kind reads (older diffusers saved DiTs as Transformer2DModel).
MODEL_CLASSES = {"unet": ("UNet2DModel",), "dit": ("DiTTransformer2DModel", "Transformer2DModel")}

Tensors = list  # a list of tensors, in a rule's name order


def require_diffusers():
    """The diffusers module, or a one-line BridgeError saying how to install it."""
    try:
        import diffusers  # the optional extra: only the bridge's entry points need it
    except ImportError as e:
        raise BridgeError(f"moving models to and from diffusers needs the diffusers package: "
                          f"{INSTALL_HINT} ({e})") from None
    return diffusers


# ------------------------------------------------------------------------------------------------
# Rules: each maps some of our tensors to some of diffusers' tensors and back.


@dataclass(frozen=True)
class _Rule:
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_theirs: Callable[[Tensors], Tensors]
    to_ours: Callable[[Tensors], Tensors]


def _same(ours: str, theirs: str) -> _Rule:
    return _Rule((ours,), (theirs,), list, list)


def _conv1d_as_linear(ours: str, theirs: str) -> _Rule:
    """A 1x1 Conv1d weight [O x I x 1] is a Linear weight [O x I]."""
    return _Rule((ours,), (theirs,), lambda t: [t[0].squeeze(-1)], lambda t: [t[0].unsqueeze(-1)])


def _params(ours: str, theirs: str, names: Sequence[str] = ("weight", "bias")) -> list[_Rule]:
    return [_same(f"{ours}.{n}", f"{theirs}.{n}") for n in names]


def _split_qkv(packed: th.Tensor, heads: int, legacy: bool) -> Tensors:
    """[3C x ...] packed rows -> q, k, v, each [C x ...] with heads outermost (diffusers')."""
    c = packed.shape[0] // 3
    rest = packed.shape[1:]
    if legacy:  # rows are [heads x 3 x ch]
        parts = packed.reshape(heads, 3, c // heads, *rest).unbind(1)
        return [p.reshape(c, *rest).contiguous() for p in parts]
    return [p.contiguous() for p in packed.reshape(3, c, *rest).unbind(0)]  # [3 x heads x ch]


def _merge_qkv(q: th.Tensor, k: th.Tensor, v: th.Tensor, heads: int, legacy: bool) -> th.Tensor:
    """The inverse of `_split_qkv`."""
    c, rest = q.shape[0], q.shape[1:]
    if legacy:
        parts = [p.reshape(heads, c // heads, *rest) for p in (q, k, v)]
        return th.stack(parts, dim=1).reshape(3 * c, *rest)
    return th.cat([q, k, v], dim=0)


def _qkv_rules(ours: str, theirs: str, heads: int, legacy: bool, conv: bool) -> list[_Rule]:
    """Our packed qkv (a 1x1 Conv1d for the U-Net, a Linear for DiT) <-> to_q, to_k, to_v."""
    out = []
    for n in ("weight", "bias"):
        names = tuple(f"{theirs}.to_{x}.{n}" for x in "qkv")
        squeeze = conv and n == "weight"

        def split(t, squeeze=squeeze):
            w = t[0].squeeze(-1) if squeeze else t[0]
            return _split_qkv(w, heads, legacy)

        def merge(t, squeeze=squeeze):
            w = _merge_qkv(*t, heads=heads, legacy=legacy)
            return [w.unsqueeze(-1) if squeeze else w]

        out.append(_Rule((f"{ours}.qkv.{n}",), names, split, merge))
    return out


def convert(rules: Sequence[_Rule], state_dict: Mapping[str, th.Tensor], to_diffusers: bool,
            source: str) -> dict[str, th.Tensor]:
    """
    Apply `rules` to a whole state_dict: every tensor must be covered by exactly one rule.

    :param to_diffusers: ours -> diffusers' names (else back).
    :param source: how errors name the state_dict, e.g. "the checkpoint".
    """
    out: dict[str, th.Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        src, dst, fn = ((rule.ours, rule.theirs, rule.to_theirs) if to_diffusers
                        else (rule.theirs, rule.ours, rule.to_ours))
        missing = [k for k in src if k not in state_dict]
        if missing:
            raise BridgeError(f"{source} has no tensor {missing[0]!r} (expected for this layout; "
                              f"{len(missing)} missing in this group)")
        values = fn([state_dict[k] for k in src])
        out.update(zip(dst, values))
        used.update(src)
    extra = sorted(set(state_dict) - used)
    if extra:
        shown = ", ".join(map(repr, extra[:5])) + (" ..." if len(extra) > 5 else "")
        raise BridgeError(f"{source} has {len(extra)} tensor(s) this layout has no place for: "
                          f"{shown}")
    return out


# ------------------------------------------------------------------------------------------------
# The ADM U-Net <-> UNet2DModel


def _resblock_rules(ours: str, theirs: str, block: ResBlock) -> list[_Rule]:
    rules = (_params(f"{ours}.in_layers.0", f"{theirs}.norm1")
             + _params(f"{ours}.in_layers.2", f"{theirs}.conv1")
             + _params(f"{ours}.emb_layers.1", f"{theirs}.time_emb_proj")
             + _params(f"{ours}.out_layers.0", f"{theirs}.norm2")
             + _params(f"{ours}.out_layers.3", f"{theirs}.conv2"))
    if not isinstance(block.skip_connection, th.nn.Identity):
        if block.skip_connection.kernel_size[0] != 1:  # ResBlock(use_conv=True): never built
            raise BridgeError(f"{ours}: a 3x3 skip convolution has no place in diffusers' "
                              "ResnetBlock2D (1x1 conv_shortcut)")
        rules += _params(f"{ours}.skip_connection", f"{theirs}.conv_shortcut")
    return rules


def _attention_rules(ours: str, theirs: str, block: AttentionBlock) -> list[_Rule]:
    legacy = not isinstance(block.attention, QKVAttention)
    return (_params(f"{ours}.norm", f"{theirs}.group_norm")
            + _qkv_rules(ours, theirs, block.num_heads, legacy, conv=True)
            + [_conv1d_as_linear(f"{ours}.proj_out.weight", f"{theirs}.to_out.0.weight"),
               _same(f"{ours}.proj_out.bias", f"{theirs}.to_out.0.bias")])


def _resample_rules(ours: str, theirs: str, module: th.nn.Module) -> list[_Rule]:
    """A level's down/upsampler: a ResBlock (--resblock_updown) or a strided / 3x3 conv."""
    if isinstance(module, ResBlock):
        return _resblock_rules(ours, theirs, module)
    if not module.use_conv:  # conv_resample=False: average pool / plain nearest upsampling
        raise BridgeError(f"{ours}: resampling without a convolution (conv_resample=False) has "
                          "no UNet2DModel block; use --resblock_updown True or the default")
    name = "op" if isinstance(module, Downsample) else "conv"
    return _params(f"{ours}.{name}", f"{theirs}.conv")


def _unet_levels(model: UNetModel) -> list[bool]:
    """Whether each resolution level of `model` has attention (ADM: all its blocks or none)."""
    levels, nrb = len(model.channel_mult), model.num_res_blocks
    out = []
    for level in range(levels):
        first = 1 + level * (nrb + 1)
        out.append(len(model.input_blocks[first]) > 1)
    return out


def unet_rules(model: UNetModel) -> list[_Rule]:
    """The tensor rules between `model`'s state_dict and its UNet2DModel's."""
    levels, nrb = len(model.channel_mult), model.num_res_blocks
    rules = (_params("input_blocks.0.0", "conv_in")
             + _params("time_embed.0", "time_embedding.linear_1")
             + _params("time_embed.2", "time_embedding.linear_2")
             + _params("out.0", "conv_norm_out") + _params("out.2", "conv_out"))
    if model.num_classes is not None:
        rules.append(_same("label_emb.weight", "class_embedding.weight"))

    def block_rules(ours: str, theirs: str, module: th.nn.Module) -> list[_Rule]:
        if isinstance(module, AttentionBlock):
            return _attention_rules(ours, theirs, module)
        return _resblock_rules(ours, theirs, module)

    idx = 1
    for level in range(levels):
        for i in range(nrb):
            seq = model.input_blocks[idx]
            rules += _resblock_rules(f"input_blocks.{idx}.0", f"down_blocks.{level}.resnets.{i}",
                                     seq[0])
            if len(seq) > 1:
                rules += _attention_rules(f"input_blocks.{idx}.1",
                                          f"down_blocks.{level}.attentions.{i}", seq[1])
            idx += 1
        if level != levels - 1:
            rules += _resample_rules(f"input_blocks.{idx}.0", f"down_blocks.{level}.downsamplers.0",
                                     model.input_blocks[idx][0])
            idx += 1
    mid = model.middle_block
    rules += (_resblock_rules("middle_block.0", "mid_block.resnets.0", mid[0])
              + block_rules("middle_block.1", "mid_block.attentions.0", mid[1])
              + _resblock_rules("middle_block.2", "mid_block.resnets.1", mid[2]))
    idx = 0
    for j, level in enumerate(reversed(range(levels))):
        for i in range(nrb + 1):
            seq = model.output_blocks[idx]
            rules += _resblock_rules(f"output_blocks.{idx}.0", f"up_blocks.{j}.resnets.{i}", seq[0])
            k = 1
            if k < len(seq) and isinstance(seq[k], AttentionBlock):
                rules += _attention_rules(f"output_blocks.{idx}.{k}",
                                          f"up_blocks.{j}.attentions.{i}", seq[k])
                k += 1
            if k < len(seq):  # the level's upsampler, after its last block
                rules += _resample_rules(f"output_blocks.{idx}.{k}", f"up_blocks.{j}.upsamplers.0",
                                         seq[k])
            idx += 1
    return rules


def _head_width(model: UNetModel) -> int | None:
    """UNet2DModel's one `attention_head_dim` for every attention block of `model` (None: one
    head per block, as wide as its channels); refuses layouts whose head widths differ."""
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    widths = sorted({b.channels // b.num_heads for b in blocks})
    if len(widths) == 1:
        return widths[0]
    if all(b.num_heads == 1 for b in blocks):
        return None
    heads = sorted({b.num_heads for b in blocks})
    raise BridgeError(
        f"--num_heads {','.join(map(str, heads))} gives attention heads of {widths} channels "
        "across levels; diffusers' UNet2DModel has one head width for every level "
        "(attention_head_dim): only --num_head_channels layouts (or one head) convert")


def unet_diffusers_config(model: UNetModel) -> dict:
    """The `UNet2DModel` config that computes what `model` computes; refuses, naming the flag,
    a layout it cannot express."""
    if model.channel_mult[0] != 1:
        raise BridgeError(
            f"--channel_mult {','.join(map(str, model.channel_mult))}: diffusers' UNet2DModel "
            "sizes its timestep features by the first level's channels, so the first multiplier "
            "must be 1 (the released 512x512 model's 0.5 does not convert)")
    if model.num_heads_upsample != model.num_heads and model.num_head_channels == -1:
        raise BridgeError(f"--num_heads_upsample {model.num_heads_upsample}: UNet2DModel uses "
                          "the same heads in both halves")
    ch = model.model_channels
    widths = [int(m * ch) for m in model.channel_mult]
    attention = _unet_levels(model)
    updown = any(isinstance(seq[0], ResBlock) and seq[0].updown for seq in model.input_blocks)
    down_plain = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
    up_plain = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
    # Converting the tensors checks what the config cannot show (e.g. conv_resample=False).
    unet_rules(model)
    return dict(
        sample_size=model.image_size,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        center_input_sample=False,
        time_embedding_type="positional",
        flip_sin_to_cos=True,  # ADM's features are [cos, sin]
        freq_shift=0,  # frequencies 10000^(-i / half), as ADM's timestep_embedding
        down_block_types=[("AttnDownBlock2D" if a else down_plain) for a in attention],
        up_block_types=[("AttnUpBlock2D" if a else up_plain) for a in reversed(attention)],
        block_out_channels=widths,
        layers_per_block=model.num_res_blocks,
        mid_block_scale_factor=1,
        downsample_padding=1,
        downsample_type="resnet" if updown else "conv",
        upsample_type="resnet" if updown else "conv",
        dropout=float(model.dropout),
        act_fn="silu",
        attention_head_dim=_head_width(model),
        norm_num_groups=32,
        # Without this UNet2DModel leaves the middle attention unnormalised for scale_shift.
        attn_norm_num_groups=32,
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if model.middle_block[0].use_scale_shift_norm
        else "default",
        add_attention=True,
        class_embed_type=None,
        num_class_embeds=(None if model.num_classes is None else model.label_emb.num_embeddings),
    )


# The UNet2DModel settings that ADM's U-Net has, with the defaults diffusers gives them.
_UNET_FIXED = {
    "center_input_sample": (False, False), "time_embedding_type": ("positional", "positional"),
    "flip_sin_to_cos": (True, True), "freq_shift": (0, 0), "act_fn": ("silu", "silu"),
    "norm_num_groups": (32, 32), "norm_eps": (1e-5, 1e-5), "mid_block_scale_factor": (1, 1),
    "downsample_padding": (1, 1), "add_attention": (True, True), "class_embed_type": (None, None),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
}


def unet_flags_from_diffusers(config: Mapping) -> dict:
    """
    Our U-Net flags (`UNetConfig`'s, plus learn_sigma and in_channels) for a UNet2DModel config,
    refusing a config the ADM U-Net cannot express (one line naming its key).
    """
    def refuse(key: str, why: str):
        raise BridgeError(f"unet/config.json {key}={config.get(key)!r}: {why}")

    for key, (want, default) in _UNET_FIXED.items():
        if config.get(key, default) != want:
            refuse(key, f"the ADM U-Net has {want!r}")
    widths = list(config["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        refuse("block_out_channels", f"every level must be a multiple of the first ({ch})")
    if config.get("time_embedding_dim") not in (None, 4 * ch):
        refuse("time_embedding_dim", f"ADM's is 4 x {ch}")
    size = config.get("sample_size")
    if not isinstance(size, int):
        refuse("sample_size", "must be one integer (square images)")
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        refuse("resnet_time_scale_shift", "ADM's blocks are 'default' or 'scale_shift'")
    if config.get("attn_norm_num_groups") not in (32, None if shift == "default" else 32):
        refuse("attn_norm_num_groups", "ADM's attention blocks normalise with 32 groups")
    updown = config.get("downsample_type", "conv") == "resnet"
    if config.get("upsample_type", "conv") != config.get("downsample_type", "conv"):
        refuse("upsample_type", "ADM resamples both halves alike (--resblock_updown)")
    down_plain = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
    up_plain = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    attention = [t == "AttnDownBlock2D" for t in down]
    if any(t not in ("AttnDownBlock2D", down_plain) for t in down[:-1]):
        refuse("down_block_types", f"ADM's levels are AttnDownBlock2D or {down_plain} with "
                                   f"downsample_type={config.get('downsample_type', 'conv')!r}")
    if down[-1] not in ("AttnDownBlock2D", "DownBlock2D", "ResnetDownsampleBlock2D"):
        refuse("down_block_types", "unknown last level")
    want_up = [("AttnUpBlock2D" if a else up_plain) for a in reversed(attention)]
    plain = ("UpBlock2D", "ResnetUpsampleBlock2D")  # alike at the last level: no upsampler
    if up[:-1] != want_up[:-1] or not (
            up[-1] == want_up[-1] or (up[-1] in plain and want_up[-1] in plain)):
        refuse("up_block_types", "must mirror down_block_types (ADM's decoder mirrors its encoder)")
    head = config.get("attention_head_dim")
    in_ch, out_ch = config.get("in_channels", 3), config.get("out_channels", 3)
    if out_ch not in (in_ch, 2 * in_ch):
        refuse("out_channels", f"must be in_channels ({in_ch}) or twice it (learned sigma)")
    classes = config.get("num_class_embeds")
    return dict(
        image_size=size,
        num_channels=ch,
        num_res_blocks=config.get("layers_per_block", 2),
        num_heads=1 if head is None else 4,
        num_heads_upsample=-1,
        num_head_channels=-1 if head is None else head,
        attention_resolutions=",".join(str(size // 2**i) for i, a in enumerate(attention) if a),
        channel_mult=",".join(str(w // ch) for w in widths),
        dropout=float(config.get("dropout", 0.0)),
        class_cond=classes is not None,
        num_classes=classes if classes is not None else 1000,
        use_scale_shift_norm=shift == "scale_shift",
        resblock_updown=updown,
        use_new_attention_order=True,  # either order computes the same; the flags file keeps it
        learn_sigma=out_ch == 2 * in_ch,
        in_channels=in_ch,
    )


# ------------------------------------------------------------------------------------------------
# DiT <-> DiTTransformer2DModel


def dit_rules(model: DiT) -> list[_Rule]:
    """The tensor rules between `model`'s state_dict and its DiTTransformer2DModel's."""
    depth = len(model.blocks)
    emb = [f"transformer_blocks.{i}.norm1.emb" for i in range(depth)]
    table = get_2d_sincos_pos_embed(model.hidden_size, model.x_embedder.grid_size)[None]

    def fixed_pos_embed(t: Tensors) -> Tensors:
        if t[0].device.type != "meta" and not th.allclose(t[0].float().cpu(), table, atol=1e-6):
            raise BridgeError("pos_embed is not DiT's fixed sin-cos table, and diffusers "
                              "recomputes that table instead of loading it")
        return []

    def shared(ours: str, theirs: Sequence[str]) -> _Rule:
        """One tensor of ours <-> a copy in every block of diffusers'."""
        def back(t: Tensors) -> Tensors:
            if any(x.device.type != "meta" and not th.equal(x, t[0]) for x in t[1:]):
                raise BridgeError(f"{theirs[0].split('.', 2)[-1]} differs between diffusers' "
                                  "blocks; DiT has one shared timestep/label embedder")
            return [t[0]]
        return _Rule((ours,), tuple(theirs), lambda t: [t[0].clone() for _ in theirs], back)

    rules = _params("x_embedder.proj", "pos_embed.proj") + [
        _Rule(("pos_embed",), (), fixed_pos_embed, lambda t: [table.clone()])]
    for ours, theirs in (("t_embedder.mlp.0", "timestep_embedder.linear_1"),
                         ("t_embedder.mlp.2", "timestep_embedder.linear_2")):
        for n in ("weight", "bias"):
            rules.append(shared(f"{ours}.{n}", [f"{e}.{theirs}.{n}" for e in emb]))
    rules.append(shared("y_embedder.embedding_table.weight",
                        [f"{e}.class_embedder.embedding_table.weight" for e in emb]))
    for i in range(depth):
        ours, theirs = f"blocks.{i}", f"transformer_blocks.{i}"
        # DiT's qkv rows are [3 x heads x head_dim]: the "new" order.
        rules += (_qkv_rules(f"{ours}.attn", f"{theirs}.attn1", model.num_heads, False, False)
                  + _params(f"{ours}.attn.proj", f"{theirs}.attn1.to_out.0")
                  + _params(f"{ours}.mlp.fc1", f"{theirs}.ff.net.0.proj")
                  + _params(f"{ours}.mlp.fc2", f"{theirs}.ff.net.2")
                  + _params(f"{ours}.adaLN_modulation.1", f"{theirs}.norm1.linear"))
    rules += (_params("final_layer.linear", "proj_out_2")
              + _params("final_layer.adaLN_modulation.1", "proj_out_1"))
    return rules


def _pad_null_label(rules: list[_Rule], model: DiT) -> list[_Rule]:
    """diffusers' DiT always has the null label's row; a DiT trained without label dropout gets
    a zero row there (never used by its conditional samples) and loses it again on import."""
    if model.class_dropout_prob > 0:
        return rules
    name = "y_embedder.embedding_table.weight"
    out = []
    for r in rules:
        if r.ours == (name,):
            def pad(t, r=r):
                return r.to_theirs([th.cat([t[0], t[0].new_zeros(1, t[0].shape[1])])])

            def unpad(t, r=r):
                return [r.to_ours(t)[0][:-1]]

            r = _Rule(r.ours, r.theirs, pad, unpad)
        out.append(r)
    return out


def dit_diffusers_config(model: DiT) -> dict:
    """The `DiTTransformer2DModel` config that computes what `model` computes."""
    hidden, heads = model.hidden_size, model.num_heads
    if model.blocks[0].mlp.fc1.out_features != 4 * hidden:
        raise BridgeError("DiT mlp_ratio != 4: diffusers' DiT feed-forward is 4 x hidden_size")
    return dict(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        num_layers=len(model.blocks),
        dropout=0.0,
        attention_bias=True,
        sample_size=model.input_size,
        patch_size=model.patch_size,
        activation_fn="gelu-approximate",  # DiT's GELU(approximate="tanh")
        num_embeds_ada_norm=model.num_classes,
        upcast_attention=False,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,  # DiT's LayerNorms
    )


def dit_flags_from_diffusers(config: Mapping) -> dict:
    """Our DiT flags (`--model dit`, the size flags, learn_sigma, in_channels) for a
    DiTTransformer2DModel config; refuses settings DiT does not have."""
    def refuse(key: str, why: str):
        raise BridgeError(f"transformer/config.json {key}={config.get(key)!r}: {why}")

    for key, want in (("activation_fn", "gelu-approximate"), ("norm_type", "ada_norm_zero"),
                      ("norm_elementwise_affine", False), ("attention_bias", True),
                      ("upcast_attention", False), ("norm_eps", 1e-6)):
        if config.get(key, want if key != "norm_eps" else 1e-5) != want:
            refuse(key, f"DiT has {want!r}")
    heads, hidden = config["num_attention_heads"], config["num_attention_heads"] * config[
        "attention_head_dim"]
    in_ch = config.get("in_channels", 4)
    out_ch = config.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        refuse("out_channels", f"must be in_channels ({in_ch}) or twice it (learned sigma)")
    depth, patch = config.get("num_layers", 28), config.get("patch_size", 2)
    # Name DiT's size with these widths and patch (a depth that differs is an override); else
    # DiT-S/2 with every size overridden.
    sizes = dict(hidden_size=hidden, num_heads=heads, patch_size=patch)
    name = next((n for n, f in DiT_models.items() if _family_sizes(f)[1] == sizes), None)
    flags = dict(model="dit", dit_model=name or "DiT-S/2",
                 dit_depth=0 if name and _family_sizes(DiT_models[name])[0] == depth else depth,
                 **{f"dit_{k}": 0 if name else v for k, v in sizes.items()})
    return dict(flags, image_size=config.get("sample_size", 32), class_cond=True,
                num_classes=config.get("num_embeds_ada_norm", 1000), class_dropout_prob=0.1,
                learn_sigma=out_ch == 2 * in_ch, in_channels=in_ch)


@functools.lru_cache(maxsize=None)
def _family_sizes(family: Callable[..., DiT]) -> tuple[int, dict]:
    """(depth, {hidden_size, num_heads, patch_size}) of a `DiT_models` entry, built on meta."""
    with th.device("meta"):
        m = family(input_size=64)
    return len(m.blocks), dict(hidden_size=m.hidden_size, num_heads=m.num_heads,
                               patch_size=m.patch_size)


# ------------------------------------------------------------------------------------------------
# The diffusion <-> DDPMScheduler


def scheduler_config(flags: Mapping) -> dict:
    """
    A DDPMScheduler config for the diffusion of `flags` (`DiffusionConfig`'s): the same betas
    (listed: cosine and linear are exact), variance and prediction types. clip_sample follows our
    --clip_denoised default (True).
    """
    cfg = from_flags(DiffusionConfig, flags)
    if cfg.rescale_timesteps and cfg.diffusion_steps != 1000:
        raise BridgeError(f"--rescale_timesteps True: the model was trained on t * 1000 / "
                          f"{cfg.diffusion_steps}, and diffusers' schedulers feed it t")
    betas = gd.get_named_beta_schedule(cfg.noise_schedule, cfg.diffusion_steps)
    return dict(
        num_train_timesteps=cfg.diffusion_steps,
        trained_betas=[float(b) for b in betas],
        beta_schedule="linear",  # unused: trained_betas given
        variance_type="learned_range" if cfg.learn_sigma else "fixed_large",
        prediction_type="sample" if cfg.predict_xstart else "epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
        thresholding=False,
        timestep_spacing="leading",  # DDIM's "ddimN" grid: 0, T/N, 2T/N, ...
        steps_offset=0,
    )


def diffusion_flags_from_scheduler(config: Mapping) -> dict:
    """Our diffusion flags for a DDPMScheduler config; refuses one they cannot express."""
    diffusers = require_diffusers()

    def refuse(key: str, why: str):
        raise BridgeError(f"scheduler/scheduler_config.json {key}={config.get(key)!r}: {why}")

    if config.get("_class_name", "DDPMScheduler") != "DDPMScheduler":
        refuse("_class_name", "only a DDPMScheduler config says the diffusion's variance type "
                              "(other schedulers, e.g. a consistency model's, are not DDPM's)")
    steps = int(config.get("num_train_timesteps", 1000))
    known = set(diffusers.DDPMScheduler.from_config({}).config)
    betas = diffusers.DDPMScheduler.from_config(
        {k: v for k, v in config.items() if k in known}).betas.double().numpy()
    schedule = next((n for n in ("linear", "cosine") if np.allclose(
        betas, gd.get_named_beta_schedule(n, steps), rtol=1e-5, atol=1e-9)), None)
    if schedule is None:
        refuse("trained_betas" if config.get("trained_betas") else "beta_schedule",
               f"the betas match neither --noise_schedule linear nor cosine over {steps} steps")
    variance = config.get("variance_type", "fixed_small")
    if variance not in ("learned_range", "fixed_large"):
        refuse("variance_type", "this project samples with 'fixed_large' (beta_t) or, with "
                                "--learn_sigma True, 'learned_range'")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "sample"):
        refuse("prediction_type", "'epsilon', or 'sample' (--predict_xstart True)")
    return dict(diffusion_steps=steps, noise_schedule=schedule,
                learn_sigma=variance == "learned_range", predict_xstart=prediction == "sample")


# ------------------------------------------------------------------------------------------------
# Whole models and folders


def model_rules(model: th.nn.Module) -> list[_Rule]:
    """The tensor rules of a U-Net (incl. the super-resolution one) or a DiT."""
    if isinstance(model, DiT):
        return _pad_null_label(dit_rules(model), model)
    if isinstance(model, UNetModel):
        return unet_rules(model)
    raise BridgeError(f"{type(model).__name__} has no diffusers counterpart here (the U-Net "
                      "and DiT convert; the noisy-image classifier does not)")


def diffusers_config(model: th.nn.Module) -> dict:
    """The config of the diffusers model that computes what `model` computes."""
    if isinstance(model, DiT):
        return dit_diffusers_config(model)
    if isinstance(model, UNetModel):
        return unet_diffusers_config(model)
    model_rules(model)  # refuses, naming the class
    return {}


def to_diffusers_state_dict(model: th.nn.Module,
                            state_dict: Mapping[str, th.Tensor] | None = None) -> dict:
    """`model`'s tensors (or `state_dict`, with `model`'s layout) under diffusers' names."""
    sd = model.state_dict() if state_dict is None else state_dict
    return convert(model_rules(model), sd, True, "the model")


def from_diffusers_state_dict(model: th.nn.Module, state_dict: Mapping[str, th.Tensor],
                              source: str = "the diffusers weights") -> dict:
    """diffusers' tensors for `model`'s layout under our names (load with `strict=True`)."""
    return convert(model_rules(model), state_dict, False, source)


def match_dit_timestep_features(transformer: th.nn.Module) -> th.nn.Module:
    """
    Make a loaded `DiTTransformer2DModel` compute DiT's timestep features exactly.

    DiT's frequencies are 10000^(-i / 128), i < 128; diffusers' DiT embedder divides by 127
    instead (`Timesteps(downscale_freq_shift=1)`), so out of the box its outputs differ slightly
    from DiT's for the same weights. This sets the shift to 0 in every block; the model is
    returned for chaining.
    """
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer


def export_to_diffusers(model: th.nn.Module, flags: Mapping, output_dir: str) -> str:
    """
    Write `model` and its diffusion (`flags`: the model's and diffusion's flags) as a folder
    diffusers loads with `from_pretrained`: `unet/` (UNet2DModel) or `transformer/`
    (DiTTransformer2DModel), `scheduler/` (DDPMScheduler), `model_index.json` for an
    unconditional U-Net (a DDPMPipeline), and our flags in `guided_diffusion_args.json`.
    The folder is built beside `output_dir` under a temporary name and renamed at the end, so
    `output_dir` is complete or absent.

    :return: `output_dir`.
    """
    diffusers = require_diffusers()
    if os.path.exists(output_dir):
        raise BridgeError(f"--output_dir {output_dir!r} exists; give a new folder (nothing is "
                          "overwritten)")
    is_dit = isinstance(model, DiT)
    config = diffusers_config(model)
    weights = to_diffusers_state_dict(model)
    sched = diffusers.DDPMScheduler(**scheduler_config(flags))
    net_cls = diffusers.DiTTransformer2DModel if is_dit else diffusers.UNet2DModel
    with th.device("meta"):
        net = net_cls(**config)
    net.load_state_dict({k: v.detach().float().cpu().contiguous() for k, v in weights.items()},
                        strict=True, assign=True)
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output_dir)}.", suffix=".tmp")
    try:
        sub = MODEL_FOLDERS["dit" if is_dit else "unet"]
        net.save_pretrained(os.path.join(tmp, sub), safe_serialization=True)
        sched.save_pretrained(os.path.join(tmp, "scheduler"))
        if not is_dit and model.num_classes is None:
            index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
                     "scheduler": ["diffusers", "DDPMScheduler"],
                     "unet": ["diffusers", "UNet2DModel"]}
            _write_json(os.path.join(tmp, "model_index.json"), index)
        _write_json(os.path.join(tmp, FLAGS_FILE), {**flags, **_model_facts(model)})
        os.rename(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _model_facts(model: th.nn.Module) -> dict:
    """The flags the configs cannot show, read from the model itself (so that partial `flags`
    still bring it back exactly)."""
    facts = {"class_dropout_prob": float(model.class_dropout_prob)}
    if model.num_classes is not None:  # the label table may hold the null label's row too
        facts.update(class_cond=True, num_classes=model.num_classes)
    if isinstance(model, UNetModel):
        blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
        facts["use_new_attention_order"] = isinstance(blocks[0].attention, QKVAttention)
    return facts


def _write_json(path: str, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise BridgeError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BridgeError(f"{path}: not a JSON object")
    return obj


def _read_safetensors(folder: str) -> dict[str, th.Tensor]:
    """The weights of a diffusers model folder, from safetensors only (never a pickle)."""
    from safetensors.torch import load_file  # comes with diffusers

    single = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        out: dict[str, th.Tensor] = {}
        for shard in shards:
            out.update(load_file(os.path.join(folder, shard)))
        return out
    pickled = os.path.isfile(os.path.join(folder, "diffusion_pytorch_model.bin"))
    raise BridgeError(f"{folder}: no diffusion_pytorch_model.safetensors"
                      + (" (only a .bin, a pickle, which is never loaded: re-save it with "
                         "safe_serialization=True)" if pickled else ""))


@dataclass
class DiffusersFolder:
    """A diffusers folder read back: our model kind, the flags that rebuild the model and its
    diffusion (`flags`, plus `in_channels`), and diffusers' tensors."""

    kind: str  # "unet" or "dit"
    flags: dict
    in_channels: int
    state_dict: dict[str, th.Tensor]
    config: dict  # the model's config.json


def read_diffusers_folder(folder: str) -> DiffusersFolder:
    """Read a folder `export_to_diffusers` wrote (or any diffusers folder with a UNet2DModel or
    DiTTransformer2DModel and a DDPM-style scheduler) into flags and tensors."""
    if not os.path.isdir(folder):
        raise BridgeError(f"{folder!r}: no such folder")
    kind = next((k for k, sub in MODEL_FOLDERS.items()
                 if os.path.isfile(os.path.join(folder, sub, "config.json"))), None)
    if kind is None:
        raise BridgeError(f"{folder}: neither unet/config.json nor transformer/config.json")
    sub = os.path.join(folder, MODEL_FOLDERS[kind])
    config = _read_json(os.path.join(sub, "config.json"))
    if config.get("_class_name", MODEL_CLASSES[kind][0]) not in MODEL_CLASSES[kind]:
        raise BridgeError(f"{sub}/config.json _class_name={config['_class_name']!r}: "
                          f"expected {' or '.join(MODEL_CLASSES[kind])}")
    flags = (dit_flags_from_diffusers if kind == "dit" else unet_flags_from_diffusers)(config)
    in_channels = flags.pop("in_channels")
    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(sched_path):
        raise BridgeError(f"{folder}: no scheduler/scheduler_config.json (the diffusion's betas)")
    diffusion = diffusion_flags_from_scheduler(_read_json(sched_path))
    if diffusion["learn_sigma"] != flags["learn_sigma"]:
        raise BridgeError(f"{folder}: the scheduler's variance_type says learn_sigma="
                          f"{diffusion['learn_sigma']} but the model has "
                          f"{'twice' if flags['learn_sigma'] else 'as many'} output channels")
    flags.update(diffusion)
    ours_path = os.path.join(folder, FLAGS_FILE)
    if os.path.isfile(ours_path):
        # Our own export: its flags say what the configs cannot (the attention order, label
        # dropout, fp16, ...) and how the run spelled the layout. The diffusion flags must agree
        # here; the model flags are checked against config.json once the model is built
        # (`check_config`).
        saved = _read_json(ours_path)
        for key, value in diffusion.items():
            if key in saved and saved[key] != value:
                raise BridgeError(f"{ours_path}: --{key} {saved[key]!r} disagrees with "
                                  f"scheduler/scheduler_config.json ({value!r}); was the folder "
                                  "edited?")
        flags.update(saved)
    return DiffusersFolder(kind, flags, in_channels, _read_safetensors(sub), config)


def check_config(model: th.nn.Module, config: Mapping, source: str) -> None:
    """Refuse, naming the key, when `model` (built from a folder's flags) is not the network
    that `config` (the folder's config.json) describes."""
    for key, want in diffusers_config(model).items():
        got = config.get(key, want)
        if key == "attn_norm_num_groups" and got is None and config.get(
                "resnet_time_scale_shift", "default") == "default":
            got = config.get("norm_num_groups", 32)  # UNet2DModel's default for 'default'
        if key == "out_channels" and got is None:
            got = config.get("in_channels")  # DiT's default: as many as in
        if isinstance(got, (list, tuple)):
            got, want = list(got), list(want)
        if got != want:
            raise BridgeError(f"{source}/config.json {key}={got!r}, but the flags build "
                              f"{want!r}; was the folder edited?")


__all__ = [
    "BridgeError", "DiffusersFolder", "FLAGS_FILE", "MODEL_FOLDERS", "check_config", "convert",
    "diffusers_config", "diffusion_flags_from_scheduler", "dit_diffusers_config",
    "dit_flags_from_diffusers", "dit_rules", "export_to_diffusers", "from_diffusers_state_dict",
    "match_dit_timestep_features", "model_rules", "read_diffusers_folder", "require_diffusers",
    "scheduler_config", "to_diffusers_state_dict", "unet_diffusers_config",
    "unet_flags_from_diffusers", "unet_rules",
]
