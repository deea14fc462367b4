"""DiT as a model choice (--model dit): built from flags, every sampler with CFG (NFE counted),
DiT's 3-channel CFG (--cfg_channels 3) equal to its forward_with_cfg, classifier guidance, the fast
path, strict checkpoint loading, TrainLoop resume, and the scripts end to end (seeded samples that
do not depend on the batch size)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys

import numpy as np
import pytest
import torch as th
from conftest import crc32_init_

from guided_diffusion import cli, dist_util, logger, samplers
from guided_diffusion.checkpoints import CheckpointMismatchError
from guided_diffusion.config import (
    CommonConfig,
    DiffusionConfig,
    DiTConfig,
    FastConfig,
    LatentConfig,
    SampleConfig,
    UNetConfig,
    build_parser,
)
from guided_diffusion.dit import DiT
from guided_diffusion.guidance import ClassifierFreeGuidance, cfg_model
from guided_diffusion.train_util import TrainLoop

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A 16 px DiT: 2 blocks of width 32, patch 4 (16 tokens), 3 classes + the null label.
TINY_DIT = ["--model", "dit", "--dit_model", "DiT-S/4", "--dit_depth", "2",
            "--dit_hidden_size", "32", "--dit_num_heads", "2", "--image_size", "16",
            "--class_cond", "True", "--num_classes", "3", "--class_dropout_prob", "0.1",
            "--learn_sigma", "True", "--diffusion_steps", "100"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(n)
    logger.reset()


def parse(*argv: str) -> argparse.Namespace:
    parser = build_parser(None, SampleConfig, UNetConfig, DiffusionConfig, CommonConfig,
                          FastConfig, DiTConfig, LatentConfig)
    return parser.parse_args([*TINY_DIT, *argv])


def tiny(*argv: str, init: bool = True):
    """The tiny DiT from flags, crc32 weights (DiT's zero init would make every output 0)."""
    model, diffusion = cli.build_model_and_diffusion(parse(*argv), "unet")
    return (crc32_init_(model) if init else model).eval(), diffusion


def test_model_dit_builds_the_named_size_with_overrides_and_shared_flags():
    model, diffusion = tiny(init=False)
    assert isinstance(model, DiT)
    assert (model.patch_size, model.hidden_size, model.num_heads, len(model.blocks)) == \
        (4, 32, 2, 2)
    assert (model.input_size, model.in_channels, model.out_channels) == (16, 3, 6)
    assert model.y_embedder.embedding_table.num_embeddings == 4  # 3 classes + null label
    assert diffusion.num_timesteps == 100
    full, _ = cli.build_model_and_diffusion(
        parse("--dit_model", "DiT-S/2", "--dit_depth", "0", "--dit_hidden_size", "0",
              "--dit_num_heads", "0"), "unet")
    assert (full.patch_size, full.hidden_size, full.num_heads, len(full.blocks)) == (2, 384, 6, 12)


@pytest.mark.parametrize("argv, match", [
    (["--dit_model", "DiT-Q/2"], "--dit_model 'DiT-Q/2'"),
    (["--class_cond", "False"], "--class_cond True"),
    (["--model", "vit"], "--model 'vit'"),
])
def test_bad_model_flags_are_one_line_script_errors(argv, match):
    with pytest.raises(cli.ScriptError, match=match):
        cli.build_model_and_diffusion(parse(*argv), "unet")


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_every_sampler_with_cfg_runs_dit_at_the_stated_nfe(sampler):
    model, diffusion = tiny()
    seen = []
    model.register_forward_hook(lambda m, inp, out: seen.append(len(inp[0])))
    n, steps = 2, 3
    x_T = th.randn(n, 3, 16, 16, generator=th.Generator().manual_seed(0))
    out = samplers.sample(diffusion, model, (n, 3, 16, 16), noise=x_T,
                          model_kwargs={"y": th.tensor([0, 2])}, sampler=sampler, steps=steps,
                          cfg_scale=2.0)
    assert out.shape == (n, 3, 16, 16) and th.isfinite(out).all()
    # CFG evaluates the doubled batch [cond; uncond] once per network evaluation.
    assert sum(seen) == 2 * n * samplers.nfe(sampler, steps)


def test_cfg_channels_3_is_dits_forward_with_cfg_and_the_default_guides_all_channels():
    # 4 input channels (a latent), learned sigma: DiT guides channels 0-2 only.
    model = crc32_init_(DiT(input_size=16, patch_size=4, in_channels=4, hidden_size=32, depth=2,
                            num_heads=2, num_classes=3, class_dropout_prob=0.1)).eval()
    g = th.Generator().manual_seed(1)
    x, t, y = th.randn(2, 4, 16, 16, generator=g), th.tensor([10, 500]), th.tensor([0, 1])
    with th.no_grad():
        null = th.full_like(y, 3)
        dit = model.forward_with_cfg(th.cat([x, x]), th.cat([t, t]), th.cat([y, null]), 3.0)[:2]
        model.cfg_channels = 3  # what --cfg_channels 3 sets (cli.build_model_and_diffusion)
        three = cfg_model(model, 3.0)(x, t, y=y)
        del model.cfg_channels
        every = cfg_model(model, 3.0)(x, t, y=y)
    assert isinstance(cfg_model(model, 3.0), ClassifierFreeGuidance)
    assert th.allclose(three, dit, atol=1e-5, rtol=0)
    assert th.allclose(every[:, :3], dit[:, :3], atol=1e-5, rtol=0)
    assert not th.allclose(every[:, 3], dit[:, 3], atol=1e-3)  # the 4th channel is guided too
    assert th.allclose(every[:, 4:], dit[:, 4:], atol=1e-5, rtol=0)  # variance: conditional


def test_cfg_channels_flag_reaches_the_model():
    model, _ = tiny("--cfg_channels", "3")
    assert cfg_model(model, 2.0).channels == 3
    assert cfg_model(tiny()[0], 2.0).channels is None


def test_classifier_guidance_moves_dit_samples_along_the_gradient():
    model, diffusion = tiny()
    x_T = th.randn(2, 3, 16, 16, generator=th.Generator().manual_seed(0))
    kwargs = dict(noise=x_T, model_kwargs={"y": th.tensor([0, 1])}, sampler="ddim", steps=3,
                  clip_denoised=False)
    plain = samplers.sample(diffusion, model, (2, 3, 16, 16), **kwargs)
    push = samplers.sample(diffusion, model, (2, 3, 16, 16),
                           cond_fn=lambda x, t, y=None, **kw: th.full_like(x, 0.5), **kwargs)
    # A constant positive score pushes every pixel of every sample up.
    assert (push - plain).mean() > 0.01 and (push - plain).min() > -1e-6


def test_fast_path_switches_dit_without_changing_its_output():
    ref, _ = tiny()
    args = parse("--use_sdpa", "True", "--channels_last", "True")
    fast_model, _ = cli.build_model_and_diffusion(args, "unet")
    fast_model.load_state_dict(ref.state_dict())
    cfg = cli.apply_fast_flags(args, fast_model.eval())
    assert cfg.use_sdpa and all(b.attn.use_sdpa for b in fast_model.blocks)
    x, t, y = th.randn(2, 3, 16, 16), th.tensor([3, 60]), th.tensor([0, 2])
    with th.no_grad():
        assert th.allclose(fast_model(x, t, y=y), ref(x, t, y=y), atol=1e-5)
        with th.autocast("cpu", dtype=th.bfloat16):  # --use_bf16's autocast
            bf16 = fast_model(x, t, y=y)
    assert th.allclose(bf16.float(), ref(x, t, y=y), atol=0.1)


def test_dit_checkpoint_loads_strictly_and_a_mismatch_names_the_flag(tmp_path):
    # A DiT checkpoint as DiT releases them: a plain dict of float32 tensors.
    model, _ = tiny()
    path = tmp_path / "dit.pt"
    th.save(model.state_dict(), path)
    loaded, _ = cli.load_model_and_diffusion(parse("--model_path", str(path)), "unet")
    for (k, v), (k2, v2) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert k == k2 and th.equal(v, v2)
    assert not loaded.training
    with pytest.raises(CheckpointMismatchError, match="y_embedder.embedding_table.weight"):
        cli.load_model_and_diffusion(
            parse("--model_path", str(path), "--class_dropout_prob", "0"), "unet")


def test_dit_trainloop_resume_restores_model_ema_and_optimizer(tmp_path):
    def loop(steps, resume=""):
        logger.configure(dir=str(tmp_path), format_strs=["csv"])
        th.manual_seed(0)
        model, diffusion = cli.build_model_and_diffusion(parse(), "unet")
        g = th.Generator().manual_seed(0)
        data = iter(lambda: (th.randn(2, 3, 16, 16, generator=g),
                             {"y": th.randint(0, 3, (2,), generator=g)}), None)
        return TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=2,
                         microbatch=-1, lr=1e-3, ema_rate="0.9", log_interval=1,
                         save_interval=2, resume_checkpoint=resume, lr_anneal_steps=steps)

    first = loop(2)
    first.run_loop()
    assert {"model000002.pt", "ema_0.9_000002.pt", "opt000002.pt"} <= set(os.listdir(tmp_path))
    resumed = loop(3, resume="auto")
    assert resumed.resume_step == 2
    for p, q in zip(resumed.model.parameters(), first.model.parameters()):
        assert th.equal(p, q)
    assert all(th.equal(a, b) for a, b in zip(resumed.ema_params[0], first.ema_params[0]))
    assert not all(th.equal(a, b) for a, b in zip(resumed.ema_params[0],
                                                   resumed.mp_trainer.master_params))
    want = first.opt.state_dict()["state"]
    got = resumed.opt.state_dict()["state"]
    assert want and all(th.equal(got[i]["exp_avg"], s["exp_avg"]) for i, s in want.items())
    resumed.run_loop()
    assert (tmp_path / "model000003.pt").exists()


def _main(name: str, argv: list[str], monkeypatch) -> None:
    """Run scripts/`name`'s main() in this process (a subprocess would pay torch's import)."""
    spec = importlib.util.spec_from_file_location(f"_dit_{name}", ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [name, *argv])
    try:
        module.main()
    finally:
        dist_util.cleanup()


def test_scripts_train_and_sample_dit_with_seeded_samples_independent_of_batch_size(
        tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "datasets"))
    from digits import write_digits

    write_digits(str(tmp_path / "digits"), image_size=16, val_every=6)
    flags = [*TINY_DIT, "--num_classes", "10"]
    _main("image_train.py", [*flags, "--data_dir", str(tmp_path / "digits" / "train"),
                             "--batch_size", "4", "--lr_anneal_steps", "2", "--save_interval", "2",
                             "--output_dir", str(tmp_path / "run"), "--seed", "0"], monkeypatch)
    outs = []
    for batch in ("3", "4"):
        _main("image_sample.py", [
            *flags, "--model_path", str(tmp_path / "run" / "model000002.pt"), "--sampler",
            "dpm++2m", "--steps", "2", "--cfg_scale", "2", "--num_samples", "4", "--batch_size",
            batch, "--seed", "0", "--progress", "False",
            "--output_dir", str(tmp_path / f"s{batch}"),
        ], monkeypatch)
        with np.load(tmp_path / f"s{batch}" / "samples_4x16x16x3.npz", allow_pickle=False) as f:
            outs.append((f["arr_0"], f["arr_1"]))
    assert outs[0][0].dtype == np.uint8 and outs[0][0].shape == (4, 16, 16, 3)
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])
