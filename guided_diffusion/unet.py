"""The ADM U-Net (Dhariwal & Nichol 2021, sec. 3) and its encoder-only classifier.

Every module name below fixes a state_dict name (`input_blocks.3.0.in_layers.2.weight`, ...), and
those names are what the released checkpoints contain, so the module structure mirrors the
original exactly. What differs is how it is built: the time embedding, the downsampling half
(`input_blocks`) and the bottleneck (`middle_block`) are constructed once in `_EncoderHalf` and
shared by `UNetModel` and `EncoderUNetModel` (the noisy-image classifier of classifier guidance).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Callable, Sequence

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    group_norm_act,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """Any module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: th.Tensor, emb: th.Tensor) -> th.Tensor:
        """Apply the module to `x` given the [N x emb_channels] timestep embedding `emb`."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that passes the timestep embedding to the children that take it."""

    def forward(self, x: th.Tensor, emb: th.Tensor) -> th.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution.

    :param channels: channels in the inputs and outputs.
    :param use_conv: whether to apply a convolution after upsampling.
    :param dims: 1, 2 or 3 (for 3D signals only the inner two dimensions are upsampled).
    :param out_channels: output channels (default: `channels`; needs `use_conv` to differ).
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x: th.Tensor) -> th.Tensor:
        """:param x: an [N x channels x ...] tensor. :return: [N x out_channels x 2*...]."""
        assert x.shape[1] == self.channels, f"expected {self.channels} channels, got {x.shape[1]}"
        if self.dims == 3:
            size = (x.shape[2], x.shape[3] * 2, x.shape[4] * 2)
            x = F.interpolate(x, size, mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling by a stride-2 3x3 convolution, or by average pooling.

    :param channels: channels in the inputs and outputs.
    :param use_conv: convolve (True) or average-pool (False).
    :param dims: 1, 2 or 3 (for 3D signals only the inner two dimensions are downsampled).
    :param out_channels: output channels (default: `channels`; needs `use_conv` to differ).
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without a convolution cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: th.Tensor) -> th.Tensor:
        """:param x: an [N x channels x ...] tensor. :return: [N x out_channels x .../2]."""
        assert x.shape[1] == self.channels, f"expected {self.channels} channels, got {x.shape[1]}"
        return self.op(x)


class ResBlock(TimestepBlock):
    """A residual block conditioned on the timestep embedding (ADM sec. 3; BigGAN up/down blocks).

    :param channels: the number of input channels.
    :param emb_channels: the number of timestep embedding channels.
    :param dropout: the dropout rate before the last convolution.
    :param out_channels: output channels (default: `channels`).
    :param use_conv: if `out_channels` differs, use a 3x3 (True) instead of a 1x1 convolution on
                     the skip connection.
    :param use_scale_shift_norm: condition by adaptive group normalization (AdaGN, ADM sec. 3):
                                 GroupNorm(h) * (1 + scale) + shift, instead of adding the embedding.
    :param dims: 1, 2 or 3.
    :param use_checkpoint: recompute activations in the backward pass to save memory.
    :param up: upsample inside the block (BigGAN-style `resblock_updown`).
    :param down: downsample inside the block.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.fused = False  # --fused_blocks: `_forward_fused` (same weights, one pass per norm)

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        # The resampling happens between the input activation and the first convolution, on the
        # residual branch and the skip branch alike.
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: th.Tensor, emb: th.Tensor) -> th.Tensor:
        """
        :param x: an [N x C x ...] tensor of features.
        :param emb: an [N x emb_channels] tensor of timestep embeddings.
        :return: an [N x out_channels x ...] tensor (spatial size doubled/halved for up/down).
        """
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: th.Tensor, emb: th.Tensor) -> th.Tensor:
        if self.fused:
            return self._forward_fused(x, emb)
        if self.updown:
            *in_rest, in_conv = self.in_layers
            h = x
            for layer in in_rest:
                h = layer(h)
            h = in_conv(self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))  # broadcast over space
        if self.use_scale_shift_norm:
            out_norm, *out_rest = self.out_layers
            scale, shift = th.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            for layer in out_rest:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h

    def _forward_fused(self, x: th.Tensor, emb: th.Tensor) -> th.Tensor:
        """`_forward` with each norm, its AdaGN and its SiLU as one `group_norm_act`."""
        in_norm, _, in_conv = self.in_layers
        out_norm, _, dropout, out_conv = self.out_layers
        h = group_norm_act(in_norm, x)
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = in_conv(h)
        emb_out = self.emb_layers(emb)
        if self.use_scale_shift_norm:
            scale, shift = th.chunk(emb_out, 2, dim=1)
            h = group_norm_act(out_norm, h, scale, shift)
        else:
            emb_out = emb_out.type(h.dtype)
            h = group_norm_act(out_norm, h + emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2))))
        return self.skip_connection(x) + out_conv(dropout(h))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions (ADM sec. 3; Vaswani et al. 2017).

    :param channels: the number of channels.
    :param num_heads: the number of heads (used when `num_head_channels` is -1).
    :param num_head_channels: if not -1, use `channels // num_head_channels` heads instead.
    :param use_checkpoint: recompute activations in the backward pass. (The original always
                           checkpoints attention blocks; here it follows the flag like ResBlock.)
    :param use_new_attention_order: split q, k, v before the heads (`QKVAttention`) instead of
                                    after (`QKVAttentionLegacy`); the two read `qkv` differently,
                                    so a checkpoint only works with the order it was trained with.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"{channels} channels are not divisible by num_head_channels={num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.fused = False  # --fused_blocks: `_forward_fused` when attention uses SDPA
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        attention_cls = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attention_cls(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: th.Tensor) -> th.Tensor:
        """:param x: an [N x C x ...] tensor. :return: a tensor of the same shape."""
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: th.Tensor) -> th.Tensor:
        if self.fused and self.attention.use_sdpa:
            return self._forward_fused(x)
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)

    def _forward_fused(self, x: th.Tensor) -> th.Tensor:
        """
        `_forward` on [N x T x C] (channels-last) views: the 1x1 convolutions become linear
        layers on the channel dimension, and q, k, v are strided views of the qkv output that
        SDPA reads as they are. For a channels_last input every reshape here is free; the
        faithful [N x C x T] route copies the activations around the attention three times.
        """
        b, c, *spatial = x.shape
        tokens = x.movedim(1, -1).reshape(b, -1, c)  # [N x T x C]; a view when channels_last
        h = group_norm_act(self.norm, x, act=False).movedim(1, -1).reshape(b, -1, c)
        qkv = F.linear(h, self.qkv.weight.squeeze(-1), self.qkv.bias)  # [N x T x 3C]
        a = self.attention.forward_tokens(qkv)  # [N x T x C]
        h = F.linear(a, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return (tokens + h).reshape(b, *spatial, c).movedim(-1, 1)  # channels_last strides


class _QKVAttentionBase(nn.Module):
    """Scaled dot-product attention over [N x (3 * H * C) x T] packed queries, keys and values.

    Subclasses only decide how `qkv` is split into per-head q, k, v of shape [N*H x C x T].
    `use_sdpa` (default False) switches from the faithful einsum computation to
    `F.scaled_dot_product_attention`, which computes the same function with fused kernels.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.use_sdpa = False

    def _split_heads(self, qkv: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        raise NotImplementedError

    def _qkv_token_layout(self, qkv: th.Tensor) -> th.Tensor:
        """[N x T x 3*H*C] -> a [N x T x 3 x H x C] view: how the order packs q, k, v per token."""
        raise NotImplementedError

    def forward_tokens(self, qkv: th.Tensor) -> th.Tensor:
        """
        SDPA on token-major packed queries, keys and values (the fused blocks' layout).

        :param qkv: an [N x T x (3 * H * C)] tensor (the qkv projection applied per token).
        :return: an [N x T x (H * C)] tensor after attention.
        """
        bs, length, width = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} is not divisible by 3 * {self.n_heads} heads")
        # Strided [N x H x T x C] views with contiguous channels: SDPA's fused kernel reads them.
        q, k, v = self._qkv_token_layout(qkv).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # [N x H x T x C]
        return a.transpose(1, 2).reshape(bs, length, -1)

    @staticmethod
    def count_flops(model, _x, y):
        return count_flops_attn(model, _x, y)

    def forward(self, qkv: th.Tensor) -> th.Tensor:
        """
        :param qkv: an [N x (3 * H * C) x T] tensor of packed queries, keys and values.
        :return: an [N x (H * C) x T] tensor after attention.
        """
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} is not divisible by 3 * {self.n_heads} heads")
        q, k, v = self._split_heads(qkv)  # each [N*H x C x T]
        ch = q.shape[1]
        if self.use_sdpa:
            # SDPA's default scale 1/sqrt(C) equals the two 1/C**0.25 factors below. The fused
            # (flash) kernels need 4-D [N x H x T x C] inputs with contiguous channels; any other
            # layout silently runs the unfused math kernel, slower than the einsums below.
            q, k, v = (
                z.reshape(bs, self.n_heads, ch, length).transpose(2, 3).contiguous()
                for z in (q, k, v)
            )
            a = F.scaled_dot_product_attention(q, k, v).transpose(2, 3)  # [N x H x C x T]
        else:
            # softmax(q^T k / sqrt(C)), scaling q and k separately by C**-0.25 so that fp16
            # products stay in range; softmax in float32 for the same reason.
            scale = 1 / math.sqrt(math.sqrt(ch))
            weight = th.einsum("bct,bcs->bts", q * scale, k * scale)
            weight = th.softmax(weight.float(), dim=-1).type(weight.dtype)
            a = th.einsum("bts,bcs->bct", weight, v)
        return a.reshape(bs, -1, length)


class QKVAttentionLegacy(_QKVAttentionBase):
    """Attention that splits the heads first, then q, k, v: qkv is read as [N*H x 3*C x T]."""

    def _split_heads(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        return qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)

    def _qkv_token_layout(self, qkv):
        bs, length, width = qkv.shape  # channels ordered (head, q/k/v, c)
        return qkv.view(bs, length, self.n_heads, 3, -1).transpose(2, 3)


class QKVAttention(_QKVAttentionBase):
    """Attention that splits q, k, v first, then the heads: qkv is read as [N x 3 x H*C x T]."""

    def _split_heads(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        return tuple(
            part.reshape(bs * self.n_heads, ch, length) for part in qkv.chunk(3, dim=1)
        )

    def _qkv_token_layout(self, qkv):
        bs, length, width = qkv.shape  # channels ordered (q/k/v, head, c)
        return qkv.view(bs, length, 3, self.n_heads, -1)


class AttentionPool2d(nn.Module):
    """Pool a feature map to a vector by attending from its mean (CLIP's attention pooling).

    :param spacial_dim: the height (= width) of the input feature map.
    :param embed_dim: input channels.
    :param num_heads_channels: channels per attention head.
    :param output_dim: output channels (default: `embed_dim`).
    """

    def __init__(
        self,
        spacial_dim: int,
        embed_dim: int,
        num_heads_channels: int,
        output_dim: int | None = None,
    ):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            th.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x: th.Tensor) -> th.Tensor:
        """:param x: an [N x C x H x W] tensor. :return: an [N x output_dim] tensor."""
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)
        # Prepend the spatial mean as an extra token; its attention output is the pooled vector.
        x = th.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


class _EncoderHalf(nn.Module):
    """The part the U-Net and the classifier share: time embedding, input blocks, middle block.

    Subclasses call `_build_time_embed`, register anything that sits between it and the input
    blocks in the state_dict (the U-Net's `label_emb`), then call `_build_encoder`.
    """

    # The constructor arguments both networks store and build their shared half from.
    _SHARED_ARGS = ("in_channels", "model_channels", "out_channels", "num_res_blocks",
                    "attention_resolutions", "dropout", "channel_mult", "conv_resample", "dims",
                    "use_checkpoint", "use_fp16", "num_heads", "num_head_channels",
                    "num_heads_upsample", "use_scale_shift_norm", "resblock_updown",
                    "use_new_attention_order")

    def _build_trunk(self, args: dict, between: Callable[[int], None] | None = None):
        """
        Store the shared constructor arguments as attributes (the original's names), then
        register `time_embed`, whatever `between(time_embed_dim)` adds (the U-Net's label
        embedding, which sits between the two in the state_dict), and the encoder.

        :param args: the constructor's arguments (at least `_SHARED_ARGS`).
        :return: (time_embed_dim, block_chans, ch, ds) as `_build_encoder` returns them.
        """
        a = {k: args[k] for k in self._SHARED_ARGS}
        if a["num_heads_upsample"] == -1:
            a["num_heads_upsample"] = a["num_heads"]
        for k in ("in_channels", "model_channels", "out_channels", "num_res_blocks",
                  "attention_resolutions", "dropout", "channel_mult", "conv_resample",
                  "use_checkpoint", "num_heads", "num_head_channels", "num_heads_upsample"):
            setattr(self, k, a[k])
        self.dtype = th.float16 if a["use_fp16"] else th.float32
        time_embed_dim = self._build_time_embed(a["model_channels"])
        if between is not None:
            between(time_embed_dim)
        encoder = {k: v for k, v in a.items()
                   if k not in ("out_channels", "use_fp16", "num_heads_upsample")}
        return (time_embed_dim, *self._build_encoder(time_embed_dim=time_embed_dim, **encoder))

    def _build_time_embed(self, model_channels: int) -> int:
        """Register `time_embed`, the MLP on the sinusoidal embedding; return its width."""
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        return time_embed_dim

    def _build_encoder(
        self,
        *,
        in_channels: int,
        model_channels: int,
        time_embed_dim: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float,
        channel_mult: Sequence[float],
        conv_resample: bool,
        dims: int,
        use_checkpoint: bool,
        num_heads: int,
        num_head_channels: int,
        use_scale_shift_norm: bool,
        resblock_updown: bool,
        use_new_attention_order: bool,
    ) -> tuple[list[int], int, int]:
        """Register `input_blocks` and `middle_block`.

        :return: (channels of every input block's output, in order -- the U-Net's skip
                  connections; channels at the bottleneck; total downsampling factor there).
        """
        # Every ResBlock and AttentionBlock in both halves is built from these shared settings.
        self._res_kwargs = dict(
            emb_channels=time_embed_dim,
            dropout=dropout,
            dims=dims,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
        )
        self._attn_kwargs = dict(
            num_head_channels=num_head_channels,
            use_checkpoint=use_checkpoint,
            use_new_attention_order=use_new_attention_order,
        )
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
        )
        block_chans = [ch]
        ds = 1  # downsampling factor so far; attention_resolutions are given in these units
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out_ch = int(mult * model_channels)
                layers = [ResBlock(ch, out_channels=out_ch, **self._res_kwargs)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads, **self._attn_kwargs))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                block_chans.append(ch)
            if level != len(channel_mult) - 1:
                if resblock_updown:
                    down = ResBlock(ch, out_channels=ch, down=True, **self._res_kwargs)
                else:
                    down = Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, **self._res_kwargs),
            AttentionBlock(ch, num_heads=num_heads, **self._attn_kwargs),
            ResBlock(ch, **self._res_kwargs),
        )
        return block_chans, ch, ds

    def _fp16_blocks(self) -> tuple[nn.Module, ...]:
        """The blocks `convert_to_fp16` casts; the U-Net adds its output blocks."""
        return (self.input_blocks, self.middle_block)

    def convert_to_fp16(self) -> None:
        """Cast the convolutions of the blocks to float16 and run them in float16.

        As in the original, only conv weights/biases inside the input, middle (and, for the
        U-Net, output) blocks change: time/label embeddings, norms and the head stay float32.
        """
        for blocks in self._fp16_blocks():
            blocks.apply(convert_module_to_f16)
        self.dtype = th.float16

    def convert_to_fp32(self) -> None:
        """Undo `convert_to_fp16()`."""
        for blocks in self._fp16_blocks():
            blocks.apply(convert_module_to_f32)
        self.dtype = th.float32

    def _encode(self, h: th.Tensor, emb: th.Tensor, features: list[th.Tensor]) -> th.Tensor:
        """Run the input blocks and the middle block.

        :param h: the [N x C x ...] input, already cast to the model's dtype.
        :param emb: the [N x time_embed_dim] conditioning embedding.
        :param features: receives every input block's output, in order.
        :return: the middle block's output.
        """
        for module in self.input_blocks:
            h = module(h, emb)
            features.append(h)
        return self.middle_block(h, emb)


class UNetModel(_EncoderHalf):
    """The full U-Net with attention and timestep embedding (ADM, Dhariwal & Nichol 2021).

    :param image_size: the input resolution (kept as an attribute; the layout does not depend on it).
    :param in_channels: channels in the input tensor.
    :param model_channels: base channel count of the model.
    :param out_channels: channels in the output tensor (2x the image channels with learned sigma).
    :param num_res_blocks: number of residual blocks per resolution level.
    :param attention_resolutions: downsampling factors (1, 2, 4, ...) at which to use attention;
                                  e.g. containing 4 puts attention at 4x downsampling.
    :param dropout: the dropout probability.
    :param channel_mult: channel multiplier for each level of the U-Net.
    :param conv_resample: use learned convolutions for up/downsampling.
    :param dims: whether the signal is 1D, 2D, or 3D.
    :param num_classes: if given, the model is class-conditional with this many classes.
    :param use_checkpoint: use gradient checkpointing to reduce memory usage.
    :param use_fp16: the blocks run in float16 (call `convert_to_fp16()` to cast their weights).
    :param num_heads: the number of attention heads in each attention layer.
    :param num_head_channels: if not -1, a fixed channel width per head instead of `num_heads`.
    :param num_heads_upsample: heads in the upsampling half (-1: same as `num_heads`; deprecated).
    :param use_scale_shift_norm: use AdaGN-style conditioning in the residual blocks.
    :param resblock_updown: use residual blocks for up/downsampling (BigGAN).
    :param use_new_attention_order: use `QKVAttention` instead of `QKVAttentionLegacy`.
    :param class_dropout_prob: beyond the original: label dropout for classifier-free guidance
                               (Ho & Salimans 2022). If > 0, `label_emb` gets one extra row,
                               index `num_classes`, for the "null" label, and in training mode each
                               label is replaced by it with this probability. Pass
                               y == num_classes at sampling time for the unconditional prediction.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        class_dropout_prob: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob}")
        if class_dropout_prob > 0 and num_classes is None:
            raise ValueError("class_dropout_prob > 0 needs a class-conditional model (num_classes)")
        self.image_size = image_size
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob

        def label_embedding(time_embed_dim: int) -> None:
            if num_classes is not None:
                # The extra row is the learned "null" label of classifier-free guidance.
                self.label_emb = nn.Embedding(num_classes + (class_dropout_prob > 0),
                                              time_embed_dim)

        time_embed_dim, block_chans, ch, ds = self._build_trunk(locals(), label_embedding)
        num_heads_upsample = self.num_heads_upsample

        # The decoder mirrors the encoder level by level; each block first concatenates the
        # matching encoder output (the skip connection), so it has one more ResBlock per level.
        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out_ch = int(model_channels * mult)
                layers = [ResBlock(ch + block_chans.pop(), out_channels=out_ch, **self._res_kwargs)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(
                        AttentionBlock(ch, num_heads=num_heads_upsample, **self._attn_kwargs)
                    )
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(ResBlock(ch, out_channels=ch, up=True, **self._res_kwargs))
                    else:
                        layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    def _fp16_blocks(self) -> tuple[nn.Module, ...]:
        return (self.input_blocks, self.middle_block, self.output_blocks)

    def _drop_labels(self, y: th.Tensor) -> th.Tensor:
        """Replace each label by the null label with probability `class_dropout_prob` (training)."""
        drop = th.rand(y.shape, device=y.device) < self.class_dropout_prob
        return th.where(drop, th.full_like(y, self.num_classes), y)

    def forward(self, x: th.Tensor, timesteps: th.Tensor, y: th.Tensor | None = None) -> th.Tensor:
        """Apply the model to an input batch.

        :param x: an [N x C x ...] tensor of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :param y: an [N] tensor of labels, if class-conditional (`num_classes` = the null label
                  when the model was built with `class_dropout_prob` > 0).
        :return: an [N x out_channels x ...] tensor of outputs, in the dtype of `x`.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "y (class labels) must be given if and only if the model is class-conditional "
                f"(this model has num_classes={self.num_classes}; see --class_cond)"
            )
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            if self.training and self.class_dropout_prob > 0:
                y = self._drop_labels(y)
            emb = emb + self.label_emb(y)

        skips: list[th.Tensor] = []
        h = self._encode(x.type(self.dtype), emb, skips)
        for module in self.output_blocks:
            h = module(th.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


class SuperResModel(UNetModel):
    """A U-Net that also sees a low-resolution image, upsampled bilinearly and concatenated.

    Takes the same arguments as `UNetModel`; `in_channels` counts the image channels only.
    """

    def __init__(self, image_size: int, in_channels: int, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(
        self, x: th.Tensor, timesteps: th.Tensor, low_res: th.Tensor | None = None, **kwargs
    ) -> th.Tensor:
        """
        :param x: the [N x C x H x W] noisy high-resolution input.
        :param low_res: the [N x C x h x w] conditioning image.
        :return: an [N x out_channels x H x W] tensor.
        """
        if low_res is None:
            raise ValueError("SuperResModel needs the low-resolution image: pass low_res=...")
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(th.cat([x, upsampled], dim=1), timesteps, **kwargs)


class EncoderUNetModel(_EncoderHalf):
    """The U-Net's encoder half with a pooling head: the noisy-image classifier (ADM sec. 4.1).

    Arguments are as for `UNetModel` (no class conditioning), plus:

    :param pool: how to turn the bottleneck into `out_channels` logits:
                 "adaptive" (global average pool + 1x1 conv), "attention" (`AttentionPool2d`),
                 "spatial" / "spatial_v2" (MLP on the spatial means of every block's output).
    """

    POOLS = ("adaptive", "attention", "spatial", "spatial_v2")

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ):
        super().__init__()
        if pool not in self.POOLS:
            raise ValueError(f"unknown pool {pool!r} (--classifier_pool): expected one of {self.POOLS}")
        self.pool = pool
        time_embed_dim, block_chans, ch, ds = self._build_trunk(locals())
        # The spatial pools see the mean of every input block's output and of the middle block.
        self._feature_size = sum(block_chans) + ch

        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels (channels per head)")
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, out_channels),
            )
        else:  # spatial_v2
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                normalization(2048),
                nn.SiLU(),
                nn.Linear(2048, out_channels),
            )

    def forward(self, x: th.Tensor, timesteps: th.Tensor) -> th.Tensor:
        """Apply the classifier to a batch of noisy images.

        :param x: an [N x C x ...] tensor of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :return: an [N x out_channels] tensor of logits, in the dtype of `x`.
        """
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        features: list[th.Tensor] = []
        h = self._encode(x.type(self.dtype), emb, features)
        if self.pool.startswith("spatial"):
            features.append(h)
            spatial_dims = tuple(range(2, h.ndim))
            h = th.cat([f.type(x.dtype).mean(dim=spatial_dims) for f in features], dim=-1)
            return self.out(h)
        return self.out(h.type(x.dtype))


def count_flops_attn(model: nn.Module, _x, y) -> None:
    """A counter for the `thop` package: the two attention matmuls of a `QKVAttention*` module.

    Usage: `thop.profile(model, inputs=(x, t), custom_ops={QKVAttention: QKVAttention.count_flops})`.
    """
    b, c, *spatial = y[0].shape
    num_spatial = math.prod(spatial)
    # q^T k and weight @ v: each N*T*T*C multiply-adds over all heads together.
    matmul_ops = 2 * b * (num_spatial**2) * c
    model.total_ops += th.DoubleTensor([matmul_ops])
