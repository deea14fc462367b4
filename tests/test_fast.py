"""The fast path keeps each switch within its stated tolerance of the faithful path.

Stated tolerances (relative L2 error of the tiny U-Net's output against the faithful float32 path):
SDPA and channels_last 1e-5 (same float32 arithmetic, different kernels and summation order);
bf16 autocast 2e-2 (bfloat16 keeps 8 mantissa bits, ~4e-3 per rounding).
"""

import copy

import pytest
import torch as th
import torch._dynamo  # noqa: F401  (th._dynamo is not loaded by `import torch` alone)

from conftest import crc32_init_
from guided_diffusion import fast
from guided_diffusion.fp16_util import MixedPrecisionTrainer
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.unet import AttentionBlock

FP32_TOL = 1e-5
BF16_TOL = 2e-2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: a second thread only adds synchronisation (and, on a busy machine, spinning).
    threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(threads)


def tiny_flags(**overrides):
    flags = dict(
        model_and_diffusion_defaults(),
        image_size=16,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="16,8",
        num_head_channels=16,
        class_cond=True,
        num_classes=10,
        learn_sigma=True,
        resblock_updown=True,
        use_scale_shift_norm=True,
        use_new_attention_order=True,
        diffusion_steps=100,
    )
    flags.update(overrides)
    return flags


def tiny_model(**overrides):
    model, diffusion = create_model_and_diffusion(**tiny_flags(**overrides))
    return crc32_init_(model), diffusion  # non-zero weights: a fresh ADM model outputs zeros


def inputs(n=2, size=16, seed=0):
    g = th.Generator().manual_seed(seed)
    return (
        th.randn(n, 3, size, size, generator=g),
        th.randint(0, 100, (n,), generator=g),
        {"y": th.randint(0, 10, (n,), generator=g)},
    )


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def forward(model, use_bf16=False):
    x, t, kw = inputs()
    with th.no_grad(), fast.autocast_context("cpu", use_bf16):
        return model(x, t, **kw)


def grads(model, diffusion, use_bf16=False):
    """Parameter gradients of the training loss on a fixed batch, as one flat vector."""
    model.train()
    x, t, kw = inputs(seed=1)
    noise = th.randn(x.shape, generator=th.Generator().manual_seed(2))
    model.zero_grad()
    with fast.autocast_context("cpu", use_bf16):
        loss = diffusion.training_losses(model, x, t, model_kwargs=kw, noise=noise)["loss"].mean()
    loss.backward()
    return th.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("new_order", [True, False])
def test_sdpa_model_matches_faithful_forward_and_gradients(new_order):
    ref_model, diffusion = tiny_model(use_new_attention_order=new_order)
    model = copy.deepcopy(ref_model)
    assert fast.apply_fast_path(model, use_sdpa=True) is model
    n_attention = sum(isinstance(m, AttentionBlock) for m in model.modules())
    assert n_attention > 0
    assert sum(m.use_sdpa for m in model.modules() if hasattr(m, "use_sdpa")) == n_attention
    ref = forward(ref_model)
    assert ref.abs().mean() > 0.01  # seeded weights: a non-trivial output
    assert rel_err(forward(model), ref) < FP32_TOL
    assert rel_err(grads(model, diffusion), grads(ref_model, diffusion)) < FP32_TOL


def test_channels_last_matches_faithful_and_keeps_the_state_dict():
    ref_model, diffusion = tiny_model()
    model = fast.apply_fast_path(copy.deepcopy(ref_model), channels_last=True)
    conv = model.input_blocks[0][0]
    assert conv.weight.is_contiguous(memory_format=th.channels_last)
    # Checkpoints written from a fast model load into a faithful one: same names, same values.
    ref_sd, sd = ref_model.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(th.equal(sd[k], ref_sd[k]) for k in sd)
    assert rel_err(forward(model), forward(ref_model)) < FP32_TOL
    assert rel_err(grads(model, diffusion), grads(ref_model, diffusion)) < FP32_TOL


def test_bf16_autocast_within_stated_error_and_really_bf16():
    ref_model, diffusion = tiny_model()
    model = fast.apply_fast_path(copy.deepcopy(ref_model), use_bf16=True)
    assert sum(isinstance(m, fast.AutocastGroupNorm32) for m in model.modules()) > 0
    ref = forward(ref_model)
    out = forward(model, use_bf16=True)  # bfloat16: autocast runs the last convolution in bf16
    err = rel_err(out, ref)
    assert 1e-4 < err < BF16_TOL  # bf16 really ran (not bit-exact), yet within tolerance
    # The bf16-native norm is a no-op for float32 inputs: without autocast, output is faithful.
    assert rel_err(forward(model), ref) < FP32_TOL
    g_err = rel_err(grads(model, diffusion, use_bf16=True), grads(ref_model, diffusion))
    assert g_err < 5 * BF16_TOL


def test_fast_preset_within_bf16_tolerance_and_trains_through_the_trainer():
    ref_model, diffusion = tiny_model()
    cfg = fast.resolve_fast_flags(dict(fast.fast_defaults(), fast=True), "cpu")
    assert cfg == fast.FastPathConfig(use_bf16=True, use_sdpa=True, channels_last=True)
    model = fast.apply_fast_path(copy.deepcopy(ref_model), **cfg.model_kwargs())
    assert rel_err(forward(model, cfg.use_bf16), forward(ref_model)) < BF16_TOL
    # One step through the project's trainer in bf16 mode moves the float32 weights.
    model.train()
    trainer = MixedPrecisionTrainer(model=model, use_bf16=cfg.use_bf16)
    opt = th.optim.AdamW(trainer.master_params, lr=1e-3)
    before = [p.detach().clone() for p in trainer.master_params]
    x, t, kw = inputs()
    trainer.zero_grad()
    with trainer.autocast():
        loss = diffusion.training_losses(model, x, t, model_kwargs=kw)["loss"].mean()
    trainer.backward(loss)
    assert trainer.optimize(opt)
    assert all(p.dtype == th.float32 for p in trainer.master_params)
    assert any(not th.equal(a, b) for a, b in zip(before, trainer.master_params))


def test_resolve_fast_flags_rules():
    base = fast.fast_defaults()
    assert fast.resolve_fast_flags(base) == fast.FastPathConfig()
    assert fast.resolve_fast_flags(base).describe() == "faithful"
    only = fast.resolve_fast_flags(dict(base, use_sdpa=True))
    assert only.describe() == "use_sdpa"
    # With the original's fp16 the preset keeps fp16 and adds only the other switches.
    with_fp16 = fast.resolve_fast_flags(dict(base, fast=True, use_fp16=True))
    assert not with_fp16.use_bf16 and with_fp16.use_sdpa
    with pytest.raises(ValueError, match="use_fp16"):
        fast.resolve_fast_flags(dict(base, use_bf16=True, use_fp16=True))
    with pytest.raises(KeyError, match="compile_model"):
        fast.resolve_fast_flags({"use_bf16": True})


def test_compile_falls_back_when_torch_compile_raises(monkeypatch):
    ref_model, _ = tiny_model()

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no backend")

    monkeypatch.setattr(th, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed.*running eagerly"):
        model = fast.apply_fast_path(copy.deepcopy(ref_model), compile_model=True)
    assert not fast.is_compiled(model)
    assert th.equal(forward(model), forward(ref_model))


def test_compile_falls_back_when_the_compiler_fails_at_the_first_call(monkeypatch):
    """torch.compile is lazy: a backend failure at the first forward must run eagerly instead."""
    ref_model, _ = tiny_model()
    real_compile = th.compile

    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("C++ compile error")

    monkeypatch.setattr(th, "compile", lambda fn, **kw: real_compile(fn, backend=failing_backend))
    monkeypatch.setattr(th._dynamo.config, "suppress_errors", False, raising=False)  # apply_fast_path sets it
    model = fast.apply_fast_path(copy.deepcopy(ref_model), compile_model=True)
    assert fast.is_compiled(model) and th._dynamo.config.suppress_errors
    assert th.equal(forward(model), forward(ref_model))
    # An error of the inputs is still raised, not swallowed.
    with pytest.raises(ValueError, match="class labels"):
        model(*inputs()[:2])
    th._dynamo.reset()


def test_compile_missing_compiler_is_named(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(fast.shutil, "which", lambda name: None)
    assert "C++ compiler" in fast.compiler_problem("cpu")
    ref_model, _ = tiny_model()
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        model = fast.apply_fast_path(copy.deepcopy(ref_model), compile_model=True)
    assert not fast.is_compiled(model)


def test_deepcopy_of_a_compiled_model_uses_its_own_weights(monkeypatch):
    # Stand-in for torch.compile that just calls the function: enough to check the wiring.
    monkeypatch.setattr(th, "compile", lambda fn, **kwargs: (lambda *a, **k: fn(*a, **k)))
    monkeypatch.setattr(th._dynamo.config, "suppress_errors", False, raising=False)  # restored after the test
    model = fast.apply_fast_path(tiny_model()[0], compile_model=True)
    ema = copy.deepcopy(model)
    with th.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    assert not th.allclose(forward(ema), forward(model))
