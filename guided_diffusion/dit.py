"""DiT, the diffusion transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers").

A latent image [N x C x H x W] is cut into p x p patches, each patch becomes a token, and a stack of
transformer blocks conditioned by adaptive layer norm with zero-initialised gates ("adaLN-Zero",
sec. 3.2) maps the tokens back to patches of the noise prediction (and of the variance
interpolation when `learn_sigma`). Module names fix the state_dict names, so they are DiT's own:
the released `DiT-XL-2-256x256.pt` / `DiT-XL-2-512x512.pt` load strictly into
`DiT_models["DiT-XL/2"](input_size=32 / 64)`.

Conventions shared with the U-Net (`unet.UNetModel`), so the project's diffusion, guidance and fast
path drive a DiT as they drive a U-Net:
- `model(x, t, y=labels)`: the diffusion passes labels as the keyword `y`.
- `num_classes` is the null label and `class_dropout_prob` says whether it exists: the label table
  has `num_classes + 1` rows when `class_dropout_prob > 0` (`guidance.cfg_model` reads both).
- every attention module has `use_sdpa` (False: the explicit softmax(q k^T / sqrt(d)) v; True:
  `F.scaled_dot_product_attention`), switched by `fast.set_sdpa`; bf16 runs under
  `fast.autocast_context` with no model change.
- `use_checkpoint` recomputes each block's activations in the backward pass;
  `convert_to_fp16()` / `convert_to_fp32()` cast the transformer blocks' linear layers.
"""

from __future__ import annotations

from typing import Callable

import torch as th
import torch.nn as nn
import torch.nn.functional as F

from .nn import checkpoint, timestep_embedding


def modulate(x: th.Tensor, shift: th.Tensor, scale: th.Tensor) -> th.Tensor:
    """adaLN's affine map x * (1 + scale) + shift, per sample (DiT sec. 3.2).

    :param x: [N x T x D] normalized tokens.
    :param shift: [N x D] shifts.
    :param scale: [N x D] scales, around 1: a zero-initialised regression starts as the identity.
    """
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> th.Tensor:
    """Fixed 2-D sine-cosine position embeddings of a grid_size x grid_size token grid (as in MAE).

    The first embed_dim / 2 channels encode the token's column, the last embed_dim / 2 its row
    (MAE builds the grid with `meshgrid(w, h)` and names the column half "h"; checkpoints carry
    the values, so only freshly built models depend on this order). Each half is
    [sin(pos * omega), cos(pos * omega)] with omega_i = 10000^(-i / (embed_dim / 4)). Computed in
    float64, as DiT does with numpy, then rounded to float32.

    :return: a [grid_size**2 x embed_dim] float32 tensor, tokens in row-major order.
    """
    if embed_dim % 4:
        raise ValueError(
            f"hidden_size {embed_dim} must be divisible by 4 for 2-D sin-cos position embeddings")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (th.arange(quarter, dtype=th.float64) / quarter)
    coords = th.arange(grid_size, dtype=th.float64)
    row, col = th.meshgrid(coords, coords, indexing="ij")  # token i = row * grid_size + col

    def one_axis(pos: th.Tensor) -> th.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return th.cat([th.sin(angles), th.cos(angles)], dim=1)

    return th.cat([one_axis(col), one_axis(row)], dim=1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, one strided convolution (ViT; DiT sec. 3.2).

    :param input_size: the latent's side H = W (must be divisible by patch_size).
    :param patch_size: the patch side p; the sequence has (H / p)^2 tokens.
    """

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x: th.Tensor) -> th.Tensor:
        """:param x: [N x C x H x W]. :return: [N x T x D] tokens, T = (H / p) * (W / p)."""
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"DiT built with input_size={self.input_size} got a {tuple(x.shape[-2:])} input "
                "(its position embeddings are fixed to that size)"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Timesteps -> [N x D] vectors: sinusoidal features, then a 2-layer SiLU MLP (DiT sec. 3.2)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: th.Tensor) -> th.Tensor:
        """:param t: [N] timesteps (may be fractional). :return: [N x D]."""
        # DiT's frequency features are ADM's (cos half first, max_period 10000): one function.
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class labels -> [N x D] vectors, with label dropout for classifier-free guidance.

    With `dropout_prob > 0` the table has an extra last row, index `num_classes`: the null label
    that training substitutes for dropped labels and that guidance feeds to the unconditional
    branch.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: th.Tensor, force_drop_ids: th.Tensor | None = None) -> th.Tensor:
        """Replace labels by the null label at random (`dropout_prob`) or where force_drop_ids == 1.

        :param labels: [N] class indices.
        :param force_drop_ids: optional [N] tensor; entries equal to 1 are dropped, others kept.
        """
        if force_drop_ids is None:
            drop_ids = th.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return th.where(drop_ids, th.full_like(labels, self.num_classes), labels)

    def forward(
        self, labels: th.Tensor, train: bool, force_drop_ids: th.Tensor | None = None
    ) -> th.Tensor:
        """
        :param labels: [N] class indices (`num_classes` = null label when dropout_prob > 0).
        :param train: drop labels at random (only if dropout_prob > 0).
        :param force_drop_ids: drop exactly these (train or not), as DiT allows.
        :return: [N x D] embeddings.
        """
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention over tokens (timm's ViT attention: one qkv linear, one proj).

    `use_sdpa` switches from the explicit softmax(q k^T / sqrt(d)) v to
    `F.scaled_dot_product_attention`, the same function through fused kernels (`fast.set_sdpa`).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_sdpa = False

    def forward(self, x: th.Tensor) -> th.Tensor:
        """:param x: [N x T x D] tokens. :return: [N x T x D]."""
        n, length, dim = x.shape
        # qkv's output channels are laid out as [3 x heads x head_dim] (the checkpoints' order).
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N x heads x T x head_dim]
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v)  # default scale: 1 / sqrt(head_dim)
        else:
            weight = (q @ k.transpose(-2, -1)) * self.scale
            # Softmax in float32 so that float16 blocks (convert_to_fp16) do not overflow; a
            # no-op for float32.
            weight = weight.float().softmax(dim=-1).type(v.dtype)
            out = weight @ v
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    """The transformer's feed-forward layer: Linear, GELU (tanh approximation), Linear."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: th.Tensor) -> th.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _LayerNorm(nn.LayerNorm):
    """LayerNorm without affine parameters (adaLN supplies them), computed in float32."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, elementwise_affine=False, eps=1e-6)

    def forward(self, x: th.Tensor) -> th.Tensor:
        return super().forward(x.float()).type(x.dtype)


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (DiT sec. 3.2, fig. 3).

    From the conditioning c = emb(t) + emb(y), one SiLU + Linear regresses six [N x D] vectors:
    shift, scale and gate for the attention branch and for the MLP branch. Each branch computes
    gate * f(modulate(LayerNorm(x), shift, scale)) and is added to x; zero-initialised gates make
    every block start as the identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = _LayerNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = _LayerNorm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: th.Tensor, c: th.Tensor) -> th.Tensor:
        """:param x: [N x T x D] tokens. :param c: [N x D] conditioning. :return: [N x T x D]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1)
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a Linear from D to the p * p * C_out values of a patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: th.Tensor, c: th.Tensor) -> th.Tensor:
        """:param x: [N x T x D]. :param c: [N x D]. :return: [N x T x (p * p * C_out)]."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """The diffusion transformer (Peebles & Xie 2023), class-conditional, adaLN-Zero blocks.

    :param input_size: side of the (latent) input, H = W; 32 for 256 px images through the SD VAE.
    :param patch_size: patch side p (2, 4 or 8 in DiT's names "DiT-XL/2" ...).
    :param in_channels: input channels C (4 for SD-VAE latents).
    :param hidden_size: token width D.
    :param depth: number of transformer blocks.
    :param num_heads: attention heads per block.
    :param mlp_ratio: MLP hidden width / D.
    :param class_dropout_prob: training probability of replacing a label by the null label
                               `num_classes`; > 0 adds the null label's row (needed for CFG).
    :param num_classes: number of classes (the null label is this index).
    :param learn_sigma: also output the variance interpolation v (Nichol & Dhariwal 2021): the
                        output has 2C channels, else C.
    :param use_checkpoint: recompute each block's activations in the backward pass (not DiT's;
                           saves memory at the cost of one extra forward).

    A released checkpoint is a plain float32 state_dict:
    `DiT_models["DiT-XL/2"](input_size=32).load_state_dict(th.load(path, weights_only=True))`.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.learn_sigma = learn_sigma
        self.use_checkpoint = use_checkpoint
        self.dtype = th.float32  # the blocks' dtype; float16 after convert_to_fp16()

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed, not trained; still a Parameter (requires_grad=False) as in DiT, so it is in the
        # state_dict and counted in the released models' 675,129,632 parameters.
        self.pos_embed = nn.Parameter(th.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @th.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation (sec. 3.2 and its released code's facts).

        Linear layers Xavier-uniform with zero bias; the patch projection Xavier-uniform as if it
        were a Linear; label and timestep embeddings N(0, 0.02^2); every adaLN regression and the
        final linear zero, so each block starts as the identity and the output starts at zero.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.pos_embed.copy_(
            get_2d_sincos_pos_embed(self.hidden_size, self.x_embedder.grid_size).unsqueeze(0)
        )
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks),
                      self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: th.Tensor) -> th.Tensor:
        """[N x T x (p * p * C_out)] patch values -> the [N x C_out x H x W] image."""
        c, p = self.out_channels, self.patch_size
        g = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = th.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: th.Tensor, t: th.Tensor, y: th.Tensor | None = None) -> th.Tensor:
        """Predict noise (and the variance interpolation) for a batch.

        :param x: the [N x C x H x W] noisy latents.
        :param t: [N] timesteps.
        :param y: [N] class labels (`num_classes` = null label); required, a keyword for the
                  project's diffusion (`model_kwargs={"y": labels}`).
        :return: an [N x C_out x H x W] tensor in the dtype of x (C_out = 2C if learn_sigma).
        """
        if y is None:
            raise ValueError("DiT is class-conditional: pass labels y (model_kwargs={'y': labels}; "
                             f"the null label {self.num_classes} means unconditional)")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        h, c = h.type(self.dtype), c.type(self.dtype)
        for block in self.blocks:
            h = checkpoint(block, (h, c), block.parameters(), self.use_checkpoint)
        h = self.final_layer(h.type(x.dtype), c.type(x.dtype))
        return self.unpatchify(h)

    def forward_with_cfg(
        self, x: th.Tensor, t: th.Tensor, y: th.Tensor, cfg_scale: float
    ) -> th.Tensor:
        """DiT's classifier-free guidance, kept exactly for reproducing its samples.

        The batch is [cond; uncond]: the second half's labels are the null label, and the second
        half of x is ignored (the first half is used twice). Only channels 0-2 are guided,
        eps = eps_u + s (eps_c - eps_u), and both halves get the same guided values; the other
        channels (the 4th latent channel and the variance channels) pass through unguided,
        each half its own. (DiT's choice, "DiT's 3-channel CFG"; `guidance.cfg_model` guides
        all C channels instead.)

        :param x: [2M x C x H x W]; :param t: [2M]; :param y: [2M] labels.
        :param cfg_scale: the guidance scale s (1 = conditional).
        :return: [2M x C_out x H x W].
        """
        if len(x) % 2:
            raise ValueError(f"forward_with_cfg needs an even batch [cond; uncond], got {len(x)}")
        half = x[: len(x) // 2]
        out = self.forward(th.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = th.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return th.cat([th.cat([half_eps, half_eps], dim=0), rest], dim=1)

    def _block_linears(self) -> list[nn.Linear]:
        return [m for m in self.blocks.modules() if isinstance(m, nn.Linear)]

    def convert_to_fp16(self) -> None:
        """Run the transformer blocks in float16 (like `UNetModel.convert_to_fp16`).

        Only the blocks' linear layers change; the embeddings, position embedding and final
        layer stay float32, and LayerNorm and softmax compute in float32.
        """
        for layer in self._block_linears():
            layer.half()
        self.dtype = th.float16

    def convert_to_fp32(self) -> None:
        """Undo `convert_to_fp16()`."""
        for layer in self._block_linears():
            layer.float()
        self.dtype = th.float32


def _family(name: str, depth: int, hidden_size: int, num_heads: int, patch_size: int
            ) -> Callable[..., DiT]:
    size = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)

    def build(**kwargs) -> DiT:
        return DiT(**{**size, **kwargs})  # a keyword overrides the size (e.g. depth for a toy)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name}: depth {depth}, hidden size {hidden_size}, {num_heads} heads, " \
        f"patch {patch_size}; other DiT arguments (and overrides of these) as keywords."
    return build


# DiT's model sizes (Peebles & Xie 2023, table 1): depth, hidden size, heads.
DiT_XL_2 = _family("DiT_XL_2", 28, 1152, 16, 2)
DiT_XL_4 = _family("DiT_XL_4", 28, 1152, 16, 4)
DiT_XL_8 = _family("DiT_XL_8", 28, 1152, 16, 8)
DiT_L_2 = _family("DiT_L_2", 24, 1024, 16, 2)
DiT_L_4 = _family("DiT_L_4", 24, 1024, 16, 4)
DiT_L_8 = _family("DiT_L_8", 24, 1024, 16, 8)
DiT_B_2 = _family("DiT_B_2", 12, 768, 12, 2)
DiT_B_4 = _family("DiT_B_4", 12, 768, 12, 4)
DiT_B_8 = _family("DiT_B_8", 12, 768, 12, 8)
DiT_S_2 = _family("DiT_S_2", 12, 384, 6, 2)
DiT_S_4 = _family("DiT_S_4", 12, 384, 6, 4)
DiT_S_8 = _family("DiT_S_8", 12, 384, 6, 8)

# Registry by DiT's names, called as DiT_models["DiT-XL/2"](input_size=32, num_classes=1000).
DiT_models: dict[str, Callable[..., DiT]] = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
}
