"""Flags that come with the model, named presets of the released checkpoints, CUDA settings and
sample quantisation (issue 21, items 1-3).

- A run's args.json beside --model_path (--classifier_path, --init_checkpoint, --teacher_path)
  fills the model flags not given; a given flag that changes what the weights mean and differs is
  one line naming it; `image_sample.py --model_path RUN/ema_*.pt` writes the same samples as the
  fully spelled command (end to end, subprocesses).
- Each preset sets the flags of the original README's command (spelled out here as facts) and
  builds exactly the released layout (tensor names and shapes on the meta device against the
  golden layouts); a released file name selects its preset.
- --tf32 / --cudnn_benchmark reach torch; --quantize truncates or rounds as the original / DiT.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch as th

from guided_diffusion import cli, config, dist_util, logger
from guided_diffusion.checkpoints import save_run_flags
from guided_diffusion.image_util import to_uint8_nhwc

from conftest import GOLDEN_DIR

ROOT = pathlib.Path(__file__).resolve().parents[1]
ADM_LAYOUTS = json.loads((GOLDEN_DIR / "released_checkpoint_layouts.json").read_text())
DIT_LAYOUTS = json.loads((GOLDEN_DIR / "dit_released_layouts.json").read_text())


def load_script(name: str):
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_presets_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PARSERS = {}


def parse(script: str, argv: list[str] | str):
    if script not in PARSERS:
        PARSERS[script] = load_script(script).create_argparser()
    return PARSERS[script].parse_args(shlex.split(argv) if isinstance(argv, str) else argv)


# ------------------------------------------------------------------------------------------------
# The original README's commands (openai/guided-diffusion README.md), its MODEL_FLAGS and the
# flags after them, and DiT's (facebookresearch/DiT sample_ddp.py / train.py) as our flags.

_M256 = ("--attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 "
         "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
         "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True")
_LSUN = f"{_M256} --class_cond False --timestep_respacing 1000"
_DIT = ("--model dit --dit_model DiT-XL/2 --class_cond True --num_classes 1000 "
        "--class_dropout_prob 0.1 --learn_sigma True --diffusion_steps 1000 "
        "--noise_schedule linear --latent_vae stabilityai/sd-vae-ft-ema")
_DIT_SAMPLE = "--timestep_respacing 250 --cfg_scale 1.5 --cfg_channels 3 --quantize round"
README = {
    "64x64_diffusion": ("classifier_sample",
                        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
                        "--dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine "
                        "--num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
                        "--resblock_updown True --use_new_attention_order True --use_fp16 True "
                        "--use_scale_shift_norm True --classifier_scale 1.0 --classifier_depth 4 "
                        "--timestep_respacing 250"),
    "128x128_diffusion": ("classifier_sample",
                          "--attention_resolutions 32,16,8 --class_cond True "
                          "--diffusion_steps 1000 --image_size 128 --learn_sigma True "
                          "--noise_schedule linear --num_channels 256 --num_heads 4 "
                          "--num_res_blocks 2 --resblock_updown True --use_fp16 True "
                          "--use_scale_shift_norm True --classifier_scale 0.5 "
                          "--timestep_respacing 250"),
    "256x256_diffusion": ("classifier_sample", f"{_M256} --class_cond True --classifier_scale 1.0 "
                                               "--timestep_respacing 250"),
    "256x256_diffusion_uncond": ("classifier_sample",
                                 f"{_M256} --class_cond False --classifier_scale 10.0 "
                                 "--timestep_respacing 250"),
    "512x512_diffusion": ("classifier_sample",
                          _M256.replace("256 --learn", "512 --learn").replace(
                              "fp16 True", "fp16 False")
                          + " --class_cond True --classifier_scale 4.0 --timestep_respacing 250"),
    "64x64_classifier": ("classifier_train", "--image_size 64 --classifier_depth 4"),
    "128x128_classifier": ("classifier_train", "--image_size 128"),
    "256x256_classifier": ("classifier_train", "--image_size 256"),
    "512x512_classifier": ("classifier_train", "--image_size 512"),
    "64_256_upsampler": ("super_res_sample",
                         "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
                         "--large_size 256  --small_size 64 --learn_sigma True "
                         "--noise_schedule linear --num_channels 192 --num_heads 4 "
                         "--num_res_blocks 2 --resblock_updown True --use_fp16 True "
                         "--use_scale_shift_norm True --timestep_respacing 250"),
    "128_512_upsampler": ("super_res_sample",
                          "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 "
                          "--large_size 512 --small_size 128 --learn_sigma True "
                          "--noise_schedule linear --num_channels 192 --num_head_channels 64 "
                          "--num_res_blocks 2 --resblock_updown True --use_fp16 True "
                          "--use_scale_shift_norm True --timestep_respacing 250"),
    "lsun_bedroom": ("image_sample", f"{_LSUN} --dropout 0.1"),
    "lsun_cat": ("image_sample", f"{_LSUN} --dropout 0.1"),
    "lsun_horse": ("image_sample", f"{_LSUN} --dropout 0.1"),
    "lsun_horse_nodropout": ("image_sample", f"{_LSUN} --dropout 0.0"),
    "DiT-XL-2-256x256": ("image_sample", f"{_DIT} --image_size 256 {_DIT_SAMPLE}"),
    "DiT-XL-2-512x512": ("image_sample", f"{_DIT} --image_size 512 {_DIT_SAMPLE}"),
}
# DiT's train.py: AdamW lr 1e-4, no weight decay, EMA 0.9999, global batch 256.
DIT_TRAIN = f"{_DIT} --image_size 256 --lr 1e-4 --weight_decay 0 --ema_rate 0.9999 " \
            "--global_batch_size 256"


def test_every_released_checkpoint_has_a_preset_and_the_readme_command():
    assert set(README) == set(config.PRESETS)
    assert {f"{name}.pt" for name in config.PRESETS} >= set(ADM_LAYOUTS) | set(DIT_LAYOUTS)


@pytest.mark.parametrize("name", sorted(README))
def test_preset_sets_exactly_the_flags_of_the_readme_command(name):
    script, command = README[name]
    spelled = vars(parse(script, command))
    preset = vars(parse(script, ["--preset", name]))
    assert preset.pop("preset") == name and spelled.pop("preset") == ""
    assert preset == spelled


def test_dit_training_preset_is_dits_recipe():
    spelled = vars(parse("image_train", DIT_TRAIN))
    preset = vars(parse("image_train", ["--preset", "DiT-XL-2-256x256"]))
    assert preset.pop("preset") == "DiT-XL-2-256x256" and spelled.pop("preset") == ""
    assert preset == spelled
    # Sampling-only flags do not reach training (no 250-step respacing of the training diffusion).
    assert preset["timestep_respacing"] == ""


def test_preset_model_flags_are_the_golden_layouts_flags():
    for file, spec in ADM_LAYOUTS.items():
        preset = config.PRESETS[file[: -len(".pt")]]
        names = cli.MODEL_KINDS[spec["kind"]].defaults()
        assert {k: v for k, v in preset.flags.items() if k in names} == spec["flags"], file


def _meta_model(args, kind: str):
    """The network of `kind` from parsed flags on the meta device (shapes only)."""
    kind = cli.model_kind(args, kind)
    spec = cli.MODEL_KINDS[kind]
    flags = {k: getattr(args, k) for k in spec.defaults()}
    extra = {}
    if kind == "dit":  # the SD VAE's latents: 4 channels, 8x smaller (its config's facts)
        assert args.latent_vae == "stabilityai/sd-vae-ft-ema"
        flags["image_size"] //= 8
        extra["in_channels"] = 4
    with th.device("meta"):
        return spec.factory(**flags, **extra)[0]


def _layout_name(name: str) -> str:
    return "lsun_bedroom.pt" if name.startswith("lsun_") else f"{name}.pt"


@pytest.mark.parametrize("name", sorted(README))
def test_preset_builds_exactly_the_released_layout(name):
    script, _ = README[name]
    kind = config.PRESETS[name].kind
    model = _meta_model(parse(script, ["--preset", name]), "unet" if kind == "dit" else kind)
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    layouts = DIT_LAYOUTS if kind == "dit" else ADM_LAYOUTS
    spec = layouts[_layout_name(name)]
    assert got == [[k, list(s)] for k, s in spec["tensors"]]  # same names, shapes and order
    assert sum(p.numel() for p in model.parameters()) == spec["num_params"]


def test_help_lists_every_preset():
    # (argparse wraps lines at hyphens: compare without white space)
    text = "".join(load_script("image_sample").create_argparser().format_help().split())
    for name in config.PRESETS:
        assert name in text


def test_readme_has_a_row_for_every_preset():
    rows = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("| `")]
    for name in config.PRESETS:
        assert any(ln.startswith(f"| `{name}`") for ln in rows), name


def test_given_flags_win_over_the_preset_and_a_wrong_kind_is_one_line(capsys):
    args = parse("image_sample", "--dropout 0.0 --preset lsun_horse --use_fp16 False")
    assert args.dropout == 0.0 and args.use_fp16 is False and args.num_channels == 256
    with pytest.raises(SystemExit) as e:
        parse("super_res_sample", "--preset 64x64_diffusion")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--preset 64x64_diffusion" in err


# ------------------------------------------------------------------------------------------------
# Flags from the checkpoint's run folder, or from a released file's name


@pytest.fixture
def log_dir(tmp_path):
    logger.configure(dir=str(tmp_path / "log"), format_strs=["log"])
    yield tmp_path
    logger.configure(dir=str(tmp_path / "log2"), format_strs=[])


def test_released_file_name_selects_its_preset_and_conflicts_name_the_flag(log_dir):
    path = str(log_dir / "models" / "64x64_diffusion.pt")  # flags only: no file needed
    args = parse("classifier_sample", ["--model_path", path, "--batch_size", "4"])
    taken = cli.flags_from_run(args, "model_path", "unet")
    want = parse("classifier_sample", README["64x64_diffusion"][1] + " --batch_size 4")
    assert {k: getattr(args, k) for k in taken} == {k: getattr(want, k) for k in taken}
    assert vars(args) == {**vars(want), "model_path": path}
    # The classifier's file: its flags must agree with those already taken (image_size 64).
    args.classifier_path = str(log_dir / "models" / "128x128_classifier.pt")
    with pytest.raises(cli.ScriptError, match="128x128_classifier.pt.*--image_size 64"):
        cli.flags_from_run(args, "classifier_path", "classifier")
    args.classifier_path = str(log_dir / "models" / "64x64_classifier.pt")
    cli.flags_from_run(args, "classifier_path", "classifier")
    assert args.classifier_depth == 4 and args.classifier_width == 128
    # A given flag that changes what the weights mean is one line naming it.
    args = parse("image_sample", ["--model_path", path, "--noise_schedule", "linear"])
    with pytest.raises(cli.ScriptError) as e:
        cli.flags_from_run(args, "model_path", "unet")
    assert "--noise_schedule 'linear'" in str(e.value) and "\n" not in str(e.value)
    # --preset none: only the flags given.
    args = parse("image_sample", ["--model_path", path, "--preset", "none"])
    assert cli.flags_from_run(args, "model_path", "unet") == [] and args.num_channels == 128


TINY_TRAIN = ("--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
              "--attention_resolutions 8 --num_head_channels 16 --class_cond True "
              "--num_classes 3 --learn_sigma True --noise_schedule cosine --diffusion_steps 50 "
              "--use_new_attention_order True --resblock_updown True --dropout 0.1")


def make_run(folder: pathlib.Path, extra: str = "") -> str:
    """A run folder as image_train.py leaves it: args.json and a (random) EMA checkpoint."""
    folder.mkdir(parents=True)
    args = parse("image_train", f"{TINY_TRAIN} {extra} --output_dir {folder}")
    save_run_flags(vars(args), str(folder))
    th.manual_seed(0)
    model, _ = cli.build_model_and_diffusion(args, "unet")
    with th.no_grad():
        for p in model.parameters():  # the zero-initialised output layer too
            p.add_(0.05 * th.randn_like(p))
    path = folder / "ema_0.9999_000000.pt"
    th.save(model.state_dict(), path)
    return str(path)


def test_run_flags_fill_in_and_given_meaning_flags_are_refused(log_dir):
    path = make_run(log_dir / "run")
    args = parse("image_sample", ["--model_path", path, "--dropout", "0.0", "--batch_size", "2"])
    taken = cli.flags_from_run(args, "model_path", "unet")
    want = parse("image_sample", f"{TINY_TRAIN} --dropout 0.0 --batch_size 2")
    assert vars(args) == {**vars(want), "model_path": path}
    assert "dropout" not in taken and "timestep_respacing" not in taken
    model, _ = cli.load_model_and_diffusion(
        parse("image_sample", ["--model_path", path]), "unet")
    assert model.num_classes == 3 and not model.training
    for flag, value in (("predict_xstart", "True"), ("image_size", "32")):
        args = parse("image_sample", ["--model_path", path, f"--{flag}", value])
        with pytest.raises(cli.ScriptError, match=f"args.json.*--{flag} "):
            cli.flags_from_run(args, "model_path", "unet")


def test_diffusers_export_takes_the_runs_flags(log_dir):
    path = make_run(log_dir / "run")
    args = parse("to_diffusers", ["--model_path", path, "--output_dir", str(log_dir / "out")])
    cli.flags_from_run(args, "model_path")
    assert (args.num_channels, args.noise_schedule, args.num_classes) == (32, "cosine", 3)


def test_init_checkpoint_and_teacher_take_the_runs_flags(log_dir):
    path = make_run(log_dir / "run")
    data = ["--data_dir", str(log_dir)]
    args = parse("image_train", ["--init_checkpoint", path, *data])
    cli.training_flags(args, "unet")
    assert args.num_channels == 32 and args.noise_schedule == "cosine"
    # Fine-tuning may change a meaning flag on purpose: kept (and logged), not refused.
    args = parse("image_train", ["--init_checkpoint", path, "--noise_schedule", "linear", *data])
    cli.training_flags(args, "unet")
    assert args.noise_schedule == "linear" and args.num_channels == 32
    # A consistency student must learn its teacher's ODE: a differing schedule is refused.
    args = parse("cm_distill", ["--teacher_path", path, "--noise_schedule", "linear", *data])
    with pytest.raises(cli.ScriptError, match="--teacher_path .*--noise_schedule"):
        cli.training_flags(args, "unet")
    args = parse("cm_distill", ["--teacher_path", path, *data])
    cli.training_flags(args, "unet")
    assert args.learn_sigma is True and args.image_size == 16
    # A released file fine-tuned: its model flags, not DiT's training recipe (the flags given).
    released = str(log_dir / "models" / "DiT-XL-2-256x256.pt")
    args = parse("image_train", ["--init_checkpoint", released, "--batch_size", "8", *data])
    cli.training_flags(args, "unet")
    assert (args.model, args.dit_model, args.image_size) == ("dit", "DiT-XL/2", 256)
    assert (args.batch_size, args.global_batch_size, args.lr) == (8, 0, 1e-4)
    assert args.timestep_respacing == ""  # and no sampling flags in training


def test_global_batch_is_split_over_the_ranks(log_dir):
    args = parse("image_train", "--preset DiT-XL-2-256x256")
    cli.training_flags(args, "unet")  # one rank here
    assert args.batch_size == 256 // dist_util.get_world_size()
    args = parse("image_train", "--preset DiT-XL-2-256x256 --batch_size 32")
    with pytest.raises(cli.ScriptError, match="--batch_size 32 and --global_batch_size 256"):
        cli.training_flags(args, "unet")


def run_script(script: str, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for var in ("OPENAI_LOGDIR", "GD_TRACEBACK", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *flags], env=env,
                          capture_output=True, text=True, timeout=300)


def test_sampling_with_only_model_path_writes_the_spelled_commands_samples(tmp_path):
    path = make_run(tmp_path / "run")
    sampling = ["--num_samples", "3", "--batch_size", "2", "--timestep_respacing", "4",
                "--seed", "0", "--progress", "False", "--grid_size", "0", "--model_path", path]
    npz = {}
    for name, model_flags in (("spelled", shlex.split(TINY_TRAIN)), ("short", [])):
        out = tmp_path / name
        proc = run_script("image_sample.py", *model_flags, *sampling, "--output_dir", str(out))
        assert proc.returncode == 0, proc.stderr
        npz[name] = (out / "samples_3x16x16x3.npz").read_bytes()
    assert npz["short"] == npz["spelled"]  # byte for byte
    with np.load(tmp_path / "short" / "samples_3x16x16x3.npz") as f:
        assert f["arr_0"].shape == (3, 16, 16, 3) and f["arr_1"].max() < 3
    proc = run_script("image_sample.py", *sampling, "--noise_schedule", "linear",
                      "--output_dir", str(tmp_path / "bad"))
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "--noise_schedule 'linear' (the run: 'cosine')" in proc.stderr


# ------------------------------------------------------------------------------------------------
# CUDA settings and quantisation


def test_tf32_and_cudnn_benchmark_flags_reach_torch(monkeypatch):
    saved = (th.backends.cuda.matmul.allow_tf32, th.backends.cudnn.allow_tf32,
             th.backends.cudnn.benchmark)
    try:
        dist_util.cuda_settings(tf32=True, benchmark=True)
        assert th.backends.cuda.matmul.allow_tf32 and th.backends.cudnn.allow_tf32
        assert th.backends.cudnn.benchmark
        dist_util.cuda_settings(tf32=False, benchmark=False)
        assert not th.backends.cuda.matmul.allow_tf32 and not th.backends.cudnn.allow_tf32
        assert not th.backends.cudnn.benchmark
    finally:
        (th.backends.cuda.matmul.allow_tf32, th.backends.cudnn.allow_tf32,
         th.backends.cudnn.benchmark) = saved
    calls = []
    monkeypatch.setattr(dist_util, "cuda_settings", lambda **kw: calls.append(kw))
    monkeypatch.setattr(logger, "configure", lambda **kw: None)
    monkeypatch.setattr(dist_util, "setup_dist", lambda **kw: None)
    for argv, want in (([], dict(tf32=True, benchmark=True)),
                       (["--tf32", "False", "--cudnn_benchmark", "False"],
                        dict(tf32=False, benchmark=False))):
        cli.setup(parse("image_sample", argv))
        assert calls.pop() == want


def test_quantize_truncates_as_the_original_and_rounds_as_dit():
    # Levels L = (x + 1) * 127.5: 0, 0.4, 1.4, 1.6, 127.5 (x = 0), 254.6, 255; and beyond [-1, 1].
    levels = th.tensor([0.0, 0.4, 1.4, 1.6, 127.5, 254.6, 255.0, -3.0, 300.0])
    x = (levels / 127.5 - 1).reshape(1, 1, 1, -1)
    truncate = to_uint8_nhwc(x, "truncate").flatten().tolist()
    rounded = to_uint8_nhwc(x, "round").flatten().tolist()
    assert truncate == [0, 0, 1, 1, 127, 254, 255, 0, 255]
    assert rounded == [0, 0, 1, 2, 128, 255, 255, 0, 255]  # a half rounds up, as DiT's +128
    assert to_uint8_nhwc(x).flatten().tolist() == truncate  # the original's stays the default
    with pytest.raises(ValueError, match="quantize"):
        to_uint8_nhwc(x, "floor")
    assert parse("image_sample", "--preset DiT-XL-2-256x256").quantize == "round"
    assert parse("image_sample", "--preset 256x256_diffusion").quantize == "truncate"
