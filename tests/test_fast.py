"""The fast path keeps each switch within its stated tolerance of the faithful path, and its
preset follows the hardware rule.

Stated tolerances (relative L2 error of the tiny U-Net's output against the faithful float32 path):
SDPA, channels_last and the fused blocks 1e-5 (same float32 arithmetic, different kernels and
summation order); bf16 autocast 2e-2 (bfloat16 keeps 8 mantissa bits, ~4e-3 per rounding).
"""

import copy
import os
import pathlib
import platform
import subprocess
import sys

import pytest
import torch as th
import torch._dynamo  # noqa: F401  (th._dynamo is not loaded by `import torch` alone)

from conftest import crc32_init_
import torch.nn.functional as F

from guided_diffusion import fast, hardware
from guided_diffusion.config import FastConfig, UNetConfig, build_parser
from guided_diffusion.fp16_util import MixedPrecisionTrainer
from guided_diffusion.nn import GroupNorm32, group_norm_act
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.unet import AttentionBlock, ResBlock

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "datasets"))
from digits import write_digits  # noqa: E402

CPU_BF16 = hardware.DeviceFacts("cpu", cpu_bf16=("avx512_bf16",))
CPU_NO_BF16 = hardware.DeviceFacts("cpu")

FP32_TOL = 1e-5
BF16_TOL = 2e-2


# Tiny models run fastest on one thread of a busy CPU (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


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
    cfg = fast.resolve_fast_flags(dict(fast.fast_defaults(), fast=True), "cpu", facts=CPU_BF16)
    assert cfg == fast.FastPathConfig(use_bf16=True, use_sdpa=True, channels_last=True,
                                      fused_blocks=True, fused_adam=True)
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
    with_fp16 = fast.resolve_fast_flags(dict(base, fast=True, use_fp16=True), facts=CPU_BF16)
    assert not with_fp16.use_bf16 and with_fp16.use_fp16 and with_fp16.use_sdpa
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


# ------------------------------------------------------------------------------------------------
# The preset per device, from faked hardware facts


def cuda(major, minor):
    return hardware.DeviceFacts("cuda", cuda_capability=(major, minor))


LAYOUT = dict(use_sdpa=True, channels_last=True, fused_blocks=True, fused_adam=True)


@pytest.mark.parametrize("facts, expected", [
    (CPU_BF16, dict(LAYOUT, use_bf16=True)),
    (CPU_NO_BF16, LAYOUT),  # bf16 would be emulated: float32
    (cuda(7, 0), dict(LAYOUT, use_fp16=True)),  # V100: the original's fp16, loss scaling
    (cuda(7, 5), dict(LAYOUT, use_fp16=True)),  # T4
    (cuda(8, 0), dict(LAYOUT, use_bf16=True)),  # A100 (TF32 for float32: --tf32, default on)
    (cuda(9, 0), dict(LAYOUT, use_bf16=True)),  # H100
    (hardware.DeviceFacts("mps"), dict(use_sdpa=True)),
])
def test_fast_preset_follows_the_hardware_rule(facts, expected):
    cfg = fast.resolve_fast_flags(dict(fast.fast_defaults(), fast=True), facts=facts)
    assert cfg == fast.FastPathConfig(**expected)
    assert not cfg.compile_model  # never in the preset
    assert cfg.log_line().startswith(f"fast path: {cfg.describe()} (")
    # Without --fast the facts change nothing: the faithful path.
    assert fast.resolve_fast_flags(fast.fast_defaults(), facts=facts) == fast.FastPathConfig()


def test_explicit_switches_override_the_preset():
    base = dict(fast.fast_defaults(), fast=True)
    # bf16 forced on a CPU without bf16 instructions: on, and the log line says it was asked for.
    forced = fast.resolve_fast_flags(dict(base, use_bf16=True), facts=CPU_NO_BF16)
    assert forced.use_bf16 and "--use_bf16 True given" in forced.reason
    # bf16 asked for on a V100: no fp16 added; fp16 asked for on an H100: no bf16 added.
    assert fast.resolve_fast_flags(dict(base, use_bf16=True), facts=cuda(7, 0)) == \
        fast.FastPathConfig(**LAYOUT, use_bf16=True)
    on_h100 = fast.resolve_fast_flags(dict(base, use_fp16=True), facts=cuda(9, 0))
    assert on_h100 == fast.FastPathConfig(**LAYOUT, use_fp16=True)
    # A switch the preset leaves off can be added.
    assert fast.resolve_fast_flags(dict(base, compile_model=True), facts=CPU_BF16).compile_model


@pytest.mark.parametrize("facts, off, expected", [
    # float32 on a bf16 CPU: the preset's other switches stay.
    (CPU_BF16, {"use_bf16"}, LAYOUT),
    (CPU_NO_BF16, {"channels_last", "malloc_cache"}, dict(LAYOUT, channels_last=False)),
    (cuda(9, 0), {"use_bf16", "fused_adam"}, dict(LAYOUT, fused_adam=False)),
    # use_fp16 is a model flag (sampling takes it from args.json): its False keeps the preset.
    (cuda(7, 0), {"use_fp16", "use_sdpa"}, dict(LAYOUT, use_sdpa=False, use_fp16=True)),
    # Given, but to the preset's own value: nothing to override.
    (CPU_NO_BF16, {"use_bf16", "compile_model"}, LAYOUT),
])
def test_switches_given_false_stay_off_under_the_preset(facts, off, expected):
    flags = dict(fast.fast_defaults(), fast=True, use_fp16=False)
    cfg = fast.resolve_fast_flags(flags, facts=facts, given={"fast", *off})
    assert cfg == fast.FastPathConfig(**expected)
    vetoed = sorted(k for k in off if k != "use_fp16" and hardware.choose_switches(facts)[0].get(k))
    for key in vetoed:
        assert f"--{key} False" in cfg.reason
    assert ("given" in cfg.reason) == bool(vetoed)
    # Unknown given flags (a plain dict or Namespace): False is a default, the preset applies.
    assert fast.resolve_fast_flags(flags, facts=facts) == fast.resolve_fast_flags(
        flags, facts=facts, given={"fast"})


def test_a_command_line_turns_one_preset_switch_off(monkeypatch):
    parser = build_parser(None, FastConfig, UNetConfig)
    monkeypatch.setenv("GD_CPU_BF16", "1")
    on = fast.fast_config(parser.parse_args(["--fast", "True"]))
    assert on.use_bf16 and on.channels_last
    off = fast.fast_config(parser.parse_args(["--fast", "True", "--use_bf16", "False",
                                             "--channels_last", "False"]))
    assert off == fast.FastPathConfig(use_sdpa=True, fused_blocks=True, fused_adam=True)
    assert off.log_line().endswith("; --use_bf16 False --channels_last False given)")


@pytest.mark.parametrize("flags, environ, expected", [
    ({"avx512f", "avx512_bf16"}, {}, ("avx512_bf16",)),
    ({"avx512f", "amx_bf16", "avx512_bf16"}, {}, ("avx512_bf16", "amx_bf16")),
    ({"fp", "asimd", "bf16"}, {}, ("bf16",)),  # aarch64 'Features'
    ({"avx512f", "avx2"}, {}, ()),  # AVX512 Xeon without AVX512-BF16
    ({"avx512_bf16"}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, ()),  # oneDNN told not to use them
    ({"avx512_bf16"}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, ("avx512_bf16",)),
    ({"avx512_bf16"}, {"GD_CPU_BF16": "0"}, ()),
    (set(), {"GD_CPU_BF16": "1"}, ("GD_CPU_BF16=1",)),
])
def test_cpu_bf16_detection_and_overrides(flags, environ, expected):
    assert hardware.cpu_bf16_instructions(flags, environ)[0] == expected


def test_cpu_flags_parse_proc_cpuinfo_and_bad_override_is_named(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx512_bf16 sse\n")
    assert hardware.cpu_flags(str(info)) == {"fpu", "avx512_bf16", "sse"}
    assert hardware.cpu_name(str(info)) == "Some CPU"
    assert hardware.cpu_flags(str(tmp_path / "missing")) == set()
    with pytest.raises(ValueError, match="GD_CPU_BF16='yes'"):
        hardware.cpu_bf16_instructions(set(), {"GD_CPU_BF16": "yes"})


# ------------------------------------------------------------------------------------------------
# Fused blocks


def reference_norm_act(x, weight, bias, groups, scale=None, shift=None, eps=1e-5):
    """GroupNorm -> AdaGN -> SiLU written out from the definitions (float64)."""
    x = x.double()
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    shape = (1, c) + (1,) * (x.ndim - 2)
    y = g.reshape(x.shape) * weight.double().view(shape) + bias.double().view(shape)
    if scale is not None:
        sshape = (n, c) + (1,) * (x.ndim - 2)
        y = y * (1 + scale.double().view(sshape)) + shift.double().view(sshape)
    return y * th.sigmoid(y)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("adagn", [False, True])
def test_group_norm_act_matches_the_definition(layout, adagn):
    g = th.Generator().manual_seed(0)
    norm = GroupNorm32(4, 8)
    with th.no_grad():
        norm.weight.copy_(1 + 0.3 * th.randn(8, generator=g))
        norm.bias.copy_(0.3 * th.randn(8, generator=g))
    x = 2 + 3 * th.randn(3, 8, 5, 6, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=th.channels_last)
    scale, shift = (0.5 * th.randn(3, 8, generator=g), th.randn(3, 8, generator=g)) if adagn \
        else (None, None)
    want = reference_norm_act(x, norm.weight, norm.bias, 4, scale, shift)
    with th.no_grad():
        got = group_norm_act(norm, x, scale, shift)
    assert got.dtype == th.float32
    assert rel_err(got, want) < 1e-6
    # bfloat16 in: bfloat16 out, within bf16 rounding.
    with th.no_grad():
        got16 = group_norm_act(norm, x.bfloat16(), scale, shift)
    assert got16.dtype == th.bfloat16 and 1e-4 < rel_err(got16, want) < 2e-2
    # Gradients flow (no in-place SiLU when autograd needs its input).
    x_req = x.clone().requires_grad_(True)
    group_norm_act(norm, x_req, scale, shift).square().sum().backward()
    x64 = x.double().requires_grad_(True)
    reference_norm_act(x64, norm.weight, norm.bias, 4, scale, shift).square().sum().backward()
    assert rel_err(x_req.grad, x64.grad) < 1e-5


@pytest.mark.parametrize("scale_shift", [True, False])
@pytest.mark.parametrize("new_order", [True, False])
def test_fused_blocks_match_the_unfused_model(scale_shift, new_order):
    ref_model, diffusion = tiny_model(use_scale_shift_norm=scale_shift,
                                      use_new_attention_order=new_order)
    ref, ref_grads = forward(ref_model), grads(ref_model, diffusion)
    for kwargs in (dict(use_sdpa=True, fused_blocks=True),
                   dict(use_sdpa=True, fused_blocks=True, channels_last=True),
                   dict(fused_blocks=True)):  # without SDPA attention keeps its faithful route
        model = fast.apply_fast_path(copy.deepcopy(ref_model), **kwargs)
        blocks = [m for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock))]
        assert blocks and all(m.fused for m in blocks)
        assert list(model.state_dict()) == list(ref_model.state_dict())
        assert rel_err(forward(model), ref) < FP32_TOL, kwargs
        assert rel_err(grads(model, diffusion), ref_grads) < FP32_TOL, kwargs
    # bf16: the preset on a CPU with bf16, within bf16's tolerance of the float32 model.
    model = fast.apply_fast_path(copy.deepcopy(ref_model), use_bf16=True, use_sdpa=True,
                                 channels_last=True, fused_blocks=True)
    assert 1e-4 < rel_err(forward(model, use_bf16=True), ref) < BF16_TOL
    assert rel_err(grads(model, diffusion, use_bf16=True), ref_grads) < 5 * BF16_TOL


def test_fused_attention_keeps_channels_last_without_copies():
    block = AttentionBlock(64, num_head_channels=32, use_new_attention_order=True)
    fast.apply_fast_path(block, use_sdpa=True, fused_blocks=True)
    x = th.randn(2, 64, 8, 8).contiguous(memory_format=th.channels_last)
    with th.no_grad():
        out = block(x)
    assert out.is_contiguous(memory_format=th.channels_last)
    block.fused = False
    with th.no_grad():
        assert rel_err(out, block(x)) < FP32_TOL


def test_fast_preset_runs_image_train_end_to_end(tmp_path):
    """--fast True through the real training script: logs its choice, writes checkpoints."""
    write_digits(str(tmp_path / "digits"), image_size=16, val_every=6)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GD_CPU_BF16="0")
    env.pop("OPENAI_LOGDIR", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "image_train.py"), "--image_size", "16",
         "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
         "--attention_resolutions", "8", "--num_head_channels", "32", "--class_cond", "True",
         "--num_classes", "10", "--diffusion_steps", "100", "--use_scale_shift_norm", "True",
         "--data_dir", str(tmp_path / "digits" / "train"), "--batch_size", "2",
         "--lr_anneal_steps", "1", "--save_interval", "1", "--random_flip", "False",
         "--output_dir", str(tmp_path / "run"), "--seed", "0", "--fast", "True"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = proc.stdout + proc.stderr
    assert "fast path: use_sdpa+channels_last+fused_blocks+fused_adam (CPU bf16 instructions: none" in log
    assert (tmp_path / "run" / "model000001.pt").exists()


FAULTS_SCRIPT = """
import resource, sys, torch
from guided_diffusion import fast
if sys.argv[1] == "cache":
    assert fast.apply_fast_path(torch.nn.Linear(2, 2), malloc_cache=True) is not None
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(12 << 20)  # 48 MiB: above the 32 MiB where glibc's own threshold stops
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults[4:]))  # the heap settles within a few rounds (measured: 1-3)
"""


def _thp_always() -> bool:
    try:
        return "[always]" in pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc"
                    or tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 35),
                    reason="malloc_cache raises the mmap threshold past 48 MiB on glibc >= 2.35")
def test_malloc_cache_reuses_freed_pages_instead_of_faulting_them_in_again():
    pages = (48 << 20) // 4096
    run = lambda mode: int(subprocess.run(  # noqa: E731
        [sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True,
        cwd=ROOT).stdout)
    cached = run("cache")
    assert cached < pages // 100  # the freed 48 MiB came back without zero-filled new pages
    if not _thp_always():  # 4 KiB pages: by default every allocation faults each page in again
        assert run("default") > pages // 2


def test_malloc_cache_is_cpu_only_and_says_why_it_cannot_apply(monkeypatch):
    assert hardware.keep_freed_memory() is None  # idempotent (also called by other tests' presets)
    monkeypatch.setattr(hardware, "keep_freed_memory", lambda: "no mallopt in this C library")
    with pytest.warns(UserWarning, match="--malloc_cache True: no mallopt"):
        fast.apply_fast_path(th.nn.Linear(2, 2), malloc_cache=True)
    calls = []
    monkeypatch.setattr(hardware, "keep_freed_memory", lambda: calls.append(1))
    fast.apply_fast_path(th.nn.Linear(2, 2).to("meta"), malloc_cache=True)
    assert not calls  # a model off the CPU keeps its activations elsewhere
