"""Command-line plumbing: models from flags, one-line user errors, fast-path flags."""

from __future__ import annotations

import argparse

import pytest
import torch as th

from guided_diffusion import cli, fast
from guided_diffusion.config import DiffusionConfig, FastConfig, UNetConfig, defaults


def _args(**overrides) -> argparse.Namespace:
    flags = defaults(UNetConfig, DiffusionConfig, FastConfig)
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="4", num_head_channels=16, diffusion_steps=100,
                 timestep_respacing="10")
    flags.update(overrides)
    return argparse.Namespace(**flags)


def test_model_kinds_name_their_checkpoint_and_fp16_flags():
    assert {k: (s.path_flag, s.fp16_flag) for k, s in cli.MODEL_KINDS.items()} == {
        "unet": ("model_path", "use_fp16"),
        "dit": ("model_path", "use_fp16"),
        "superres": ("model_path", "use_fp16"),
        "classifier": ("classifier_path", "classifier_use_fp16"),
    }


def test_build_model_from_flags_and_bad_values_are_one_line_errors():
    model, diffusion = cli.build_model_and_diffusion(_args(), "unet")
    assert model.image_size == 8 and diffusion.num_timesteps == 10
    with pytest.raises(cli.ScriptError, match="unsupported image size 24"):
        cli.build_model_and_diffusion(_args(image_size=24, channel_mult=""), "unet")


def test_apply_fast_flags_resolves_the_preset_and_refuses_bf16_with_fp16(monkeypatch):
    model, _ = cli.build_model_and_diffusion(_args(), "unet")
    monkeypatch.setenv("GD_CPU_BF16", "1")  # the preset follows the CPU's bf16 instructions
    cfg = cli.apply_fast_flags(_args(fast=True), model)
    assert cfg == fast.FastPathConfig(use_bf16=True, use_sdpa=True, channels_last=True,
                                      fused_blocks=True, fused_adam=True)
    monkeypatch.setenv("GD_CPU_BF16", "0")
    assert not cli.fast_config(_args(fast=True)).use_bf16
    assert all(m.use_sdpa for m in model.modules() if hasattr(m, "use_sdpa"))
    with pytest.raises(cli.ScriptError, match="use_fp16"):
        cli.fast_config(_args(use_bf16=True, use_fp16=True))
    # A parser without the fast-path flags (e.g. an old script) gets the faithful path.
    assert cli.fast_config(argparse.Namespace()) == fast.FastPathConfig()


def test_load_checkpoint_names_the_flag(tmp_path):
    model, _ = cli.build_model_and_diffusion(_args(), "unet")
    with pytest.raises(cli.ScriptError, match="--model_path: no such file"):
        cli.load_checkpoint(model, str(tmp_path / "missing.pt"), "model_path")
    path = tmp_path / "m.pt"
    th.save({k: v * 0 + 1 for k, v in model.state_dict().items()}, path)
    cli.load_checkpoint(model, str(path), "model_path")
    assert all(th.all(v == 1) for v in model.state_dict().values())


def test_run_main_turns_user_errors_into_one_line(capsys):
    def bad():
        raise cli.ScriptError("--model_path is required\n(second line)")

    with pytest.raises(SystemExit) as info:
        cli.run_main(bad)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: --model_path is required; (second line)\n"


def test_run_main_lets_bugs_through():
    def bug():
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        cli.run_main(bug)


def test_require_path_names_the_flag(tmp_path):
    with pytest.raises(cli.ScriptError, match="--model_path is required"):
        cli.require_path("", "model_path")
    with pytest.raises(cli.ScriptError, match="--data_dir: no such dir"):
        cli.require_path(str(tmp_path / "nope"), "data_dir", kind="dir")
    cli.require_path(str(tmp_path), "data_dir", kind="dir")


