"""DiT (Peebles & Xie 2023): DiT's own forward and CFG on golden weights, the released layouts,
the paper's FLOP counts, label dropout, the project's conventions (y keyword, null label, SDPA,
bf16/fp16, checkpointing), and one training step plus a short sampling run through the diffusion."""

import json
import math

import pytest
import torch as th
from conftest import GOLDEN_DIR, crc32_init_, load_golden
from torch.utils.flop_counter import FlopCounterMode

from guided_diffusion import fast
from guided_diffusion.dit import DiT, DiT_models, LabelEmbedder, get_2d_sincos_pos_embed
from guided_diffusion.fp16_util import MixedPrecisionTrainer
from guided_diffusion.guidance import cfg_model
from guided_diffusion.script_util import create_gaussian_diffusion

LAYOUTS = json.loads((GOLDEN_DIR / "dit_released_layouts.json").read_text())
NUM_CLASSES = 3


# Tiny models run fastest on one thread of a busy CPU (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dit(**overrides) -> DiT:
    """A 16 px, 32-wide, 2-block DiT, crc32 weights (DiT's zero init would hide every branch)."""
    kwargs = dict(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2,
                  num_heads=2, num_classes=NUM_CLASSES, class_dropout_prob=0.1, learn_sigma=True)
    kwargs.update(overrides)
    th.manual_seed(0)
    return crc32_init_(DiT(**kwargs))


def inputs(n=4, c=3, size=16, seed=0):
    g = th.Generator().manual_seed(seed)
    x = th.randn(n, c, size, size, generator=g)
    t = th.randint(0, 1000, (n,), generator=g)
    y = th.randint(0, NUM_CLASSES, (n,), generator=g)
    return x, t, y


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_golden_s2_forward_and_forward_with_cfg_match_dit(use_sdpa):
    c = load_golden("dit_s2_8.pt")
    model = crc32_init_(DiT_models[c["model"]](**c["kwargs"]))
    fast.set_sdpa(model, use_sdpa)
    assert sum(p.numel() for p in model.parameters()) == c["num_params"]
    with th.no_grad():
        out = model(c["x"], c["t"], y=c["y"])
        cfg_out = model.forward_with_cfg(c["cfg_x"], c["cfg_t"], c["cfg_y"], c["cfg_scale"])
    # The contract is 1e-4 (dit_check.py); we hold 1e-5 (measured: 5e-7 / 3e-6 explicit, 0 SDPA)
    # because near-misses such as exact GELU (1.4e-4) or LayerNorm eps 1e-5 (1.5e-5) land close.
    assert rel_err(out, c["out"]) <= 1e-5
    assert rel_err(cfg_out, c["cfg_out"]) <= 1e-5


@pytest.mark.parametrize("checkpoint_name", sorted(LAYOUTS))
def test_released_layout_matches(checkpoint_name):
    want = LAYOUTS[checkpoint_name]
    with th.device("meta"):  # shapes only: a 675M-parameter model costs nothing here
        model = DiT_models[want["model"]](**want["kwargs"])
    got = [[name, list(v.shape)] for name, v in model.state_dict().items()]
    assert got == want["tensors"]  # names, shapes and order
    # DiT counts the fixed pos_embed: it is a Parameter with requires_grad=False.
    assert sum(p.numel() for p in model.parameters()) == want["num_params"]
    assert not model.pos_embed.requires_grad


# Forward GFLOPs of table 4 of the DiT paper (one 256 px image, 32 x 32 x 4 latent); the paper
# counts a multiply-add as one FLOP, FlopCounterMode as two.
PAPER_GFLOPS = {"DiT-S/2": 6.06, "DiT-S/8": 0.36, "DiT-B/4": 5.56, "DiT-L/2": 80.71,
                "DiT-XL/2": 118.64, "DiT-XL/4": 29.05, "DiT-XL/8": 7.39}


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS))
def test_forward_flops_match_paper(name):
    with th.device("meta"):
        model = DiT_models[name](input_size=32).eval()
        x, t, y = th.zeros(1, 4, 32, 32), th.zeros(1, dtype=th.long), th.zeros(1, dtype=th.long)
    counter = FlopCounterMode(display=False)
    with counter, th.no_grad():
        model(x, t, y=y)
    assert counter.get_total_flops() / 2 / 1e9 == pytest.approx(PAPER_GFLOPS[name], rel=0.01)


def test_registry_has_dits_twelve_models_with_their_sizes():
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert sorted(DiT_models) == sorted(f"DiT-{s}/{p}" for s in sizes for p in (2, 4, 8))
    with th.device("meta"):
        for name, build in DiT_models.items():
            size, patch = name[4:].split("/")
            model = build(input_size=32, num_classes=10)
            depth, hidden, heads = sizes[size]
            assert (len(model.blocks), model.hidden_size, model.num_heads, model.patch_size) == (
                depth, hidden, heads, int(patch))


@pytest.mark.parametrize("learn_sigma,in_channels", [(True, 3), (False, 3), (True, 1)])
def test_output_channels_follow_learn_sigma(learn_sigma, in_channels):
    model = tiny_dit(learn_sigma=learn_sigma, in_channels=in_channels)
    x, t, y = inputs(c=in_channels)
    with th.no_grad():
        out = model(x, t, y=y)
    assert out.shape == (4, in_channels * (2 if learn_sigma else 1), 16, 16)
    assert th.isfinite(out).all()


def test_unpatchify_inverts_patch_order():
    # A model whose tokens carry their own patch values back (identity patch embedding, zero
    # blocks and final layer = identity) must return its input: checks patch and channel order.
    p, c = 4, 3
    model = DiT(input_size=16, patch_size=p, in_channels=c, hidden_size=p * p * c, depth=0,
                num_heads=1, num_classes=NUM_CLASSES, learn_sigma=False)
    x = th.randn(2, c, 16, 16)
    tokens = x.reshape(2, c, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * c)
    assert th.equal(model.unpatchify(tokens), x)


def test_fresh_model_is_adaln_zero():
    # Zero adaLN regressions and final linear: every block is the identity, the output is zero.
    th.manual_seed(0)
    model = DiT(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                num_classes=NUM_CLASSES)
    x, t, y = inputs()
    assert th.equal(model(x, t, y=y), th.zeros(4, 6, 16, 16))
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_pos_embed_is_2d_sincos_column_half_first():
    dim, grid = 16, 3
    pe = get_2d_sincos_pos_embed(dim, grid)
    assert pe.shape == (grid * grid, dim) and pe.dtype == th.float32
    quarter = dim // 4
    for row in range(grid):
        for col in range(grid):
            token = pe[row * grid + col]
            for i in range(quarter):
                omega = 10000 ** (-i / quarter)
                want = [math.sin(col * omega), math.cos(col * omega),
                        math.sin(row * omega), math.cos(row * omega)]
                got = [token[i], token[quarter + i], token[2 * quarter + i], token[3 * quarter + i]]
                assert [float(v) for v in got] == pytest.approx(want, abs=1e-6)
    model = DiT(input_size=12, patch_size=4, hidden_size=dim, depth=1, num_heads=2, num_classes=2)
    assert th.equal(model.pos_embed[0], pe)


def test_label_embedder_drops_to_null_label_only_when_asked():
    emb = LabelEmbedder(NUM_CLASSES, 8, dropout_prob=0.5)
    table = emb.embedding_table.weight
    assert table.shape == (NUM_CLASSES + 1, 8)  # the extra row is the null label NUM_CLASSES
    labels = th.tensor([0, 1, 2, 1])
    assert th.equal(emb(labels, train=False), table[labels])
    forced = th.tensor([1, 0, 1, 0])
    for train in (False, True):
        assert th.equal(emb(labels, train=train, force_drop_ids=forced),
                        table[th.tensor([NUM_CLASSES, 1, NUM_CLASSES, 1])])
    th.manual_seed(0)
    many = th.arange(400) % NUM_CLASSES
    dropped = (emb.token_drop(many) == NUM_CLASSES).float().mean().item()
    assert dropped == pytest.approx(0.5, abs=0.1)
    no_null = LabelEmbedder(NUM_CLASSES, 8, dropout_prob=0.0)
    assert no_null.embedding_table.weight.shape == (NUM_CLASSES, 8)
    assert th.equal(no_null(labels, train=True), no_null.embedding_table.weight[labels])


def test_training_mode_replaces_labels_by_the_null_label_at_random():
    model = tiny_dit(class_dropout_prob=0.5)
    x, t, y = inputs(n=32)
    with th.no_grad():
        cond = model(x, t, y=y)
        uncond = model(x, t, y=th.full_like(y, NUM_CLASSES))
        th.manual_seed(1)
        model.train()  # DiT has no dropout layers: label dropout is the only randomness
        trained = model(x, t, y=y)
    is_cond = (trained - cond).flatten(1).abs().amax(1) < 1e-5
    is_uncond = (trained - uncond).flatten(1).abs().amax(1) < 1e-5
    assert (is_cond | is_uncond).all() and is_cond.any() and is_uncond.any()


def test_forward_with_cfg_guides_three_channels_where_cfg_model_guides_all():
    # 4 latent channels, as DiT's: channels 0-2 are guided by both, channel 3 only by the
    # project's CFG, the variance channels 4-7 come from the conditional branch in both.
    model = tiny_dit(in_channels=4)
    x, _, y = inputs(n=2, c=4)
    t = th.tensor([500, 500])
    scale = 3.0
    with th.no_grad():
        dit_out = model.forward_with_cfg(
            th.cat([x, x]), th.cat([t, t]), th.cat([y, th.full_like(y, NUM_CLASSES)]), scale)
        ours = cfg_model(model, scale)(x, t, y=y)  # the project's CFG: null label num_classes
        cond = model(x, t, y=y)
    assert th.allclose(dit_out[:2, :3], ours[:, :3], atol=1e-5)  # the same guided channels
    assert th.equal(dit_out[:2, :3], dit_out[2:, :3])  # both halves get the guided values
    assert th.allclose(dit_out[:2, 3:], cond[:, 3:], atol=1e-5)  # DiT leaves channel 3 alone
    assert not th.allclose(ours[:, 3], cond[:, 3], atol=1e-3)  # the project guides it
    assert th.allclose(ours[:, 4:], cond[:, 4:], atol=1e-5)


def test_fast_path_sdpa_equals_explicit_attention_forward_and_backward():
    results = []
    for use_sdpa in (False, True):
        model = tiny_dit()
        if use_sdpa:
            fast.apply_fast_path(model, use_sdpa=True, channels_last=True)  # the fast preset
            assert fast.set_sdpa(model, True) == len(model.blocks)
        x, t, y = inputs()
        out = model(x, t, y=y)
        out.square().mean().backward()
        results.append((out.detach(), model.blocks[0].attn.qkv.weight.grad))
    (out0, grad0), (out1, grad1) = results
    assert rel_err(out1, out0) < 1e-5 and rel_err(grad1, grad0) < 1e-5


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for use_checkpoint in (False, True):
        model = tiny_dit(use_checkpoint=use_checkpoint).train()
        x, t, y = inputs()
        th.manual_seed(3)  # same label dropout in both runs
        model(x, t, y=y).square().mean().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert th.allclose(a, b, atol=1e-6)


def test_reduced_precision_stays_close_and_fp32_is_restored():
    model = tiny_dit()
    x, t, y = inputs()
    with th.no_grad():
        ref = model(x, t, y=y)
        with fast.autocast_context("cpu", True):
            bf16 = model(x, t, y=y)
        model.convert_to_fp16()
        assert model.blocks[0].mlp.fc1.weight.dtype == th.float16
        assert model.final_layer.linear.weight.dtype == th.float32
        fp16 = model(x, t, y=y)
        model.convert_to_fp32()
        back = model(x, t, y=y)
    assert fp16.dtype == th.float32 and rel_err(fp16, ref) < 1e-2
    assert rel_err(bf16.float(), ref) < 5e-2
    # fp32 again (weights keep their float16 rounding, as the U-Net's do)
    assert model.blocks[0].mlp.fc1.weight.dtype == th.float32 and model.dtype == th.float32
    assert rel_err(back, ref) < 1e-2 and rel_err(back, fp16) < 1e-3


def test_bad_inputs_name_the_problem():
    model = tiny_dit()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="input_size=16"):
        model(x[:, :, :8, :8], t, y=y)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x[:3], t[:3], y[:3], 4.0)
    with pytest.raises(ValueError, match="num_heads"):
        DiT(input_size=16, patch_size=4, hidden_size=30, num_heads=4, depth=1)
    with pytest.raises(ValueError, match="patch_size"):
        DiT(input_size=15, patch_size=4, hidden_size=32, num_heads=2, depth=1)


def test_trains_one_step_and_samples_through_the_diffusion():
    model = tiny_dit().train()
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True)
    x, _, y = inputs()
    t = th.tensor([0, 10, 500, 999])
    opt = th.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = diffusion.training_losses(model, x, t, model_kwargs={"y": y})
    assert set(losses) >= {"loss", "mse", "vb"} and th.isfinite(losses["loss"]).all()
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    losses["loss"].mean().backward()
    opt.step()
    assert not th.equal(model.blocks[0].attn.qkv.weight, before)
    assert model.pos_embed.grad is None  # fixed embeddings are not trained

    model.eval()
    spaced = create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="3")
    noise = th.randn(2, 3, 16, 16, generator=th.Generator().manual_seed(0))
    with th.no_grad():
        for sampler_model in (model, cfg_model(model, 2.0)):
            sample = spaced.p_sample_loop(sampler_model, (2, 3, 16, 16), noise=noise,
                                          model_kwargs={"y": th.tensor([0, 2])})
            assert sample.shape == (2, 3, 16, 16) and th.isfinite(sample).all()
        # DiT's own sampling: forward_with_cfg as the model, [labels; null] and cfg_scale as kwargs.
        y = th.tensor([0, 2, NUM_CLASSES, NUM_CLASSES])
        sample = spaced.p_sample_loop(model.forward_with_cfg, (4, 3, 16, 16), clip_denoised=False,
                                      noise=th.cat([noise, noise]),
                                      model_kwargs={"y": y, "cfg_scale": 4.0})
        assert sample.shape == (4, 3, 16, 16) and th.isfinite(sample).all()


@pytest.mark.parametrize("precision", ["use_fp16", "use_bf16"])
def test_mixed_precision_trainer_takes_a_step(precision):
    model = tiny_dit().train()
    trainer = MixedPrecisionTrainer(model=model, **{precision: True})
    opt = th.optim.AdamW(trainer.master_params, lr=1e-3)
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True)
    x, t, y = inputs()
    before = model.blocks[0].attn.qkv.weight.detach().float().clone()
    with trainer.autocast():
        loss = diffusion.training_losses(model, x, t, model_kwargs={"y": y})["loss"].mean()
    trainer.backward(loss)
    assert th.isfinite(loss) and trainer.optimize(opt)
    assert not th.equal(model.blocks[0].attn.qkv.weight.float(), before)
    assert model.pos_embed.dtype == th.float32  # fp16 changes only the blocks' linear layers
