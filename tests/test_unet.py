"""U-Net, classifier and building blocks: golden forwards from the original plus behaviour checks."""

from __future__ import annotations

import math

import pytest
import torch as th
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.nn import GroupNorm32, checkpoint, timestep_embedding, update_ema
from guided_diffusion.unet import (
    AttentionBlock,
    EncoderUNetModel,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    SuperResModel,
    TimestepEmbedSequential,
    UNetModel,
)

from conftest import crc32_init_, load_golden

# A tiny class-conditional U-Net: two levels, attention at 2x downsampling, 4 labels.
TINY = dict(
    image_size=16,
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
    num_head_channels=16,
    use_scale_shift_norm=True,
    resblock_updown=True,
)


def _inputs(n=2, size=16, seed=0):
    g = th.Generator().manual_seed(seed)
    return th.randn(n, 3, size, size, generator=g), th.tensor([3, 700])[:n]


# ---- golden forwards (original code, crc32 init) -------------------------------------------------


def test_unet_adm32_forward_matches_original():
    from guided_diffusion import script_util

    case = load_golden("unet_adm32.pt")
    model = crc32_init_(script_util.create_model(**case["flags"]))
    with th.no_grad():
        out = model(case["x"], case["t"], **case["kwargs"])
    th.testing.assert_close(out, case["out"], rtol=1e-4, atol=1e-5)


def test_classifier_attention32_forward_matches_original():
    case = load_golden("classifier_attention32.pt")
    model = crc32_init_(EncoderUNetModel(**case["flags"]))
    with th.no_grad():
        out = model(case["x"], case["t"])
    th.testing.assert_close(out, case["out"], rtol=1e-4, atol=1e-5)


# ---- nn.py closed forms --------------------------------------------------------------------------


def test_timestep_embedding_is_cos_then_sin_and_pads_odd_dims():
    t = th.tensor([0.0, 5.0])
    emb = timestep_embedding(t, 7, max_period=100)
    freqs = th.tensor([100 ** (-i / 3) for i in range(3)])
    th.testing.assert_close(emb[:, :3], th.cos(t[:, None] * freqs))
    th.testing.assert_close(emb[:, 3:6], th.sin(t[:, None] * freqs))
    assert emb.shape == (2, 7) and bool((emb[:, 6] == 0).all())


def test_update_ema_moves_towards_source():
    targ, src = [th.zeros(3)], [th.ones(3)]
    update_ema(targ, src, rate=0.9)
    th.testing.assert_close(targ[0], th.full((3,), 0.1))


def test_groupnorm32_computes_in_float32_and_keeps_dtype():
    norm = GroupNorm32(2, 4)
    x = th.randn(2, 4, 3) * 100
    out = norm(x.half())
    assert out.dtype == th.float16
    th.testing.assert_close(out.float(), norm(x.half().float()), rtol=1e-3, atol=1e-3)


# ---- gradient checkpointing ----------------------------------------------------------------------


def _block_stack(use_checkpoint: bool) -> nn.Module:
    th.manual_seed(0)
    stack = TimestepEmbedSequential(
        ResBlock(32, 16, dropout=0.3, out_channels=64, use_scale_shift_norm=True,
                 use_checkpoint=use_checkpoint, down=True),
        AttentionBlock(64, num_heads=2, use_checkpoint=use_checkpoint),
    )
    return crc32_init_(stack).train()  # train: dropout on, so the recompute must replay its mask


def _grads(stack, x, emb):
    th.manual_seed(1)
    stack.zero_grad()
    x = x.clone().requires_grad_(True)
    out = stack(x, emb)
    (out**2).sum().backward()
    grads = {n: p.grad.clone() for n, p in stack.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


def test_checkpointing_gives_the_same_outputs_and_gradients():
    x, emb = th.randn(2, 32, 8, 8), th.randn(2, 16)
    plain, ckpt = _block_stack(False), _block_stack(True)
    out0, gx0, g0 = _grads(plain, x, emb)
    out1, gx1, g1 = _grads(ckpt, x, emb)
    th.testing.assert_close(out1, out0)
    th.testing.assert_close(gx1, gx0)
    assert g0.keys() == g1.keys() and len(g0) == len(list(plain.parameters()))
    for name in g0:
        th.testing.assert_close(g1[name], g0[name], msg=name)

    # Frozen parameters get no gradient; the rest still match the plain run.
    for stack in (plain, ckpt):
        for name, p in stack.named_parameters():
            p.requires_grad_("in_layers" not in name)
    _, gx0, g0 = _grads(plain, x, emb)
    _, gx1, g1 = _grads(ckpt, x, emb)
    assert not any("in_layers" in n for n in g1) and g0.keys() == g1.keys()
    th.testing.assert_close(gx1, gx0)

    with th.no_grad():  # no graph, no recompute: plain evaluation
        th.manual_seed(2)
        a = ckpt(x, emb)
        th.manual_seed(2)
        b = plain(x, emb)
    th.testing.assert_close(a, b)


def test_checkpoint_flag_false_is_a_plain_call():
    f = lambda a, b: a * b  # noqa: E731
    assert checkpoint(f, (th.tensor(2.0), th.tensor(3.0)), [], False) == 6.0


# ---- attention -----------------------------------------------------------------------------------


def test_legacy_and_new_attention_read_qkv_in_their_own_layouts():
    # Legacy reads qkv as [N, H, 3, C, T]; the new order as [N, 3, H, C, T]. Same math otherwise.
    n, heads, ch, t = 2, 3, 4, 5
    qkv = th.randn(n, heads, 3, ch, t)
    legacy = QKVAttentionLegacy(heads)(qkv.reshape(n, -1, t))
    new = QKVAttention(heads)(qkv.transpose(1, 2).reshape(n, -1, t))
    th.testing.assert_close(legacy, new)
    # And both are softmax(q^T k / sqrt(C)) v per head.
    q, k, v = qkv[:, 0].unbind(1)
    ref = v @ th.softmax(q.transpose(-1, -2) @ k / math.sqrt(ch), dim=-1).transpose(-1, -2)
    th.testing.assert_close(new[:, :ch], ref)


@pytest.mark.parametrize("new_order", [False, True])
def test_sdpa_path_matches_faithful_attention(new_order):
    block = crc32_init_(AttentionBlock(64, num_heads=4, use_new_attention_order=new_order))
    x = th.randn(2, 64, 6, 6)
    with th.no_grad():
        faithful = block(x)
        block.attention.use_sdpa = True
        fast = block(x)
    assert not th.equal(faithful, x)  # proj_out is not zero after the crc32 init
    th.testing.assert_close(fast, faithful, rtol=1e-5, atol=1e-5)


# ---- fp16 ----------------------------------------------------------------------------------------


def test_convert_to_fp16_casts_exactly_the_original_blocks():
    model = crc32_init_(UNetModel(num_classes=1000, **TINY))
    x, t = _inputs()
    y = th.tensor([1, 2])
    with th.no_grad():
        ref = model(x, t, y=y)
    model.convert_to_fp16()
    assert model.dtype == th.float16
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    for name, module in model.named_modules():
        if not list(module.parameters(recurse=False)):
            continue
        in_blocks = name.split(".")[0] in ("input_blocks", "middle_block", "output_blocks")
        want = th.float16 if in_blocks and isinstance(module, convs) else th.float32
        for pname, p in module.named_parameters(recurse=False):
            assert p.dtype == want, f"{name}.{pname}: {p.dtype}, want {want}"
    with th.no_grad():
        out = model(x, t, y=y)
    assert out.dtype == th.float32
    th.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
    model.convert_to_fp32()
    assert all(p.dtype == th.float32 for p in model.parameters())
    with th.no_grad():
        th.testing.assert_close(model(x, t, y=y), ref, rtol=1e-2, atol=1e-2)


def test_encoder_convert_to_fp16_leaves_time_embed_and_head_float32():
    model = EncoderUNetModel(pool="adaptive", **{k: v for k, v in TINY.items() if k != "out_channels"},
                             out_channels=10)
    model.convert_to_fp16()
    halves = {n for n, p in model.named_parameters() if p.dtype == th.float16}
    assert halves and all(n.startswith(("input_blocks", "middle_block")) for n in halves)
    assert "input_blocks.0.0.weight" in halves and "out.3.weight" not in halves
    x, t = _inputs()
    with th.no_grad():
        assert model(x, t).dtype == th.float32


# ---- model variants ------------------------------------------------------------------------------


def test_superres_model_upsamples_low_res_bilinearly_and_concatenates():
    sr = crc32_init_(SuperResModel(**{**TINY, "out_channels": 3}))
    plain = UNetModel(**{**TINY, "in_channels": 6, "out_channels": 3})
    plain.load_state_dict(sr.state_dict())
    plain.eval()
    x, t = _inputs()
    low = th.randn(2, 3, 8, 8)
    with th.no_grad():
        out = sr(x, t, low_res=low)
        ref = plain(th.cat([x, F.interpolate(low, (16, 16), mode="bilinear")], 1), t)
    assert out.shape == (2, 3, 16, 16)
    th.testing.assert_close(out, ref)


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_encoder_pools_give_logits(pool):
    flags = {**TINY, "out_channels": 10}
    model = crc32_init_(EncoderUNetModel(pool=pool, **flags))
    x, t = _inputs()
    with th.no_grad():
        out = model(x, t)
    assert out.shape == (2, 10) and th.isfinite(out).all()
    if pool.startswith("spatial"):
        # First conv 32 + input block 32 + downsample 32 + input block 64 + middle 64.
        assert model._feature_size == 224 == model.out[0].in_features


def test_unet_requires_labels_iff_class_conditional():
    x, t = _inputs()
    with pytest.raises(ValueError, match="class-conditional"):
        UNetModel(**TINY)(x, t, y=th.tensor([0, 1]))
    with pytest.raises(ValueError, match="class-conditional"):
        UNetModel(num_classes=10, **TINY)(x, t)


def test_class_dropout_adds_a_null_label_row_only_when_enabled():
    assert UNetModel(num_classes=10, **TINY).label_emb.weight.shape[0] == 10
    model = UNetModel(num_classes=10, class_dropout_prob=0.2, **TINY)
    assert model.label_emb.weight.shape[0] == 11
    assert model.num_classes == 10 and model.class_dropout_prob == 0.2


def test_class_dropout_replaces_labels_by_the_null_label_in_training():
    model = crc32_init_(UNetModel(num_classes=10, class_dropout_prob=1.0, **TINY))
    x, t = _inputs()
    y, null = th.tensor([1, 2]), th.tensor([10, 10])
    with th.no_grad():
        cond = model(x, t, y=y)  # eval: labels kept
        uncond = model(x, t, y=null)
        model.train()  # dropout=0, so train mode differs only by the label dropping
        dropped = model(x, t, y=y)
    th.testing.assert_close(dropped, uncond)
    assert not th.allclose(cond, uncond)


def test_class_dropout_draws_per_label():
    model = UNetModel(num_classes=10, class_dropout_prob=0.5, **TINY).train()
    th.manual_seed(0)
    dropped = model._drop_labels(th.zeros(1000, dtype=th.long))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert 400 < int((dropped == 10).sum()) < 600


def test_image_size_32_builds_all_three_model_kinds_via_script_util():
    from guided_diffusion import script_util as su

    x, t = th.randn(1, 3, 32, 32), th.tensor([10])
    unet = su.create_model(32, 32, 1, learn_sigma=True, class_cond=True, attention_resolutions="16")
    clf = su.create_classifier(32, False, 32, 1, "16", True, True, "attention")
    sr = su.sr_create_model(32, 16, 32, 1, learn_sigma=False, class_cond=False,
                            use_checkpoint=False, attention_resolutions="16", num_heads=1,
                            num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True,
                            dropout=0.0, resblock_updown=False, use_fp16=False)
    with th.no_grad():
        assert unet(x, t, y=th.tensor([5])).shape == (1, 6, 32, 32)
        assert clf(x, t).shape == (1, 1000)
        assert sr(x, t, low_res=th.randn(1, 3, 16, 16)).shape == (1, 3, 32, 32)
