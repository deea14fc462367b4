"""Consistency distillation trains through the one training step: gradient clipping, the NaN
guard and the per-rank RNG states of a bit-exact resume are the TrainLoop's (cm_train.py)."""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import json
import os
import subprocess

import pytest
import torch as th

from guided_diffusion import cli, logger
from guided_diffusion.cm_train import CMTrainLoop
from guided_diffusion.config import ConsistencyConfig
from guided_diffusion.errors import TrainingStopped
from guided_diffusion.script_util import create_gaussian_diffusion, create_model

from conftest import assert_same_values
from test_resilience import _env, _load, _torchrun
from test_scripts import ROOT, UNET, run, write_digits


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """Digits and a released-style teacher file (a plain state_dict, no args.json)."""
    tmp = tmp_path_factory.mktemp("cm_train")
    write_digits(str(tmp / "digits"), image_size=16, val_every=6)
    th.manual_seed(0)
    teacher = create_model(16, 32, 1, channel_mult="1,2", class_cond=True, num_classes=10,
                           attention_resolutions="8", num_head_channels=32,
                           use_scale_shift_norm=True)
    (tmp / "teacher").mkdir()
    th.save(teacher.state_dict(), tmp / "teacher" / "model.pt")
    return tmp


def _distil(tmp, out, *extra):
    return [*UNET, "--teacher_path", str(tmp / "teacher" / "model.pt"), "--data_dir",
            str(tmp / "digits" / "train"), "--batch_size", "2", "--cm_steps", "5",
            "--teacher_solver", "ddim", "--random_flip", "False", "--seed", "0",
            "--output_dir", str(out), *extra]


def test_cm_distill_honours_grad_clip(teacher_file):
    """One step with --grad_clip 1e-12: AdamW then moves the weights by ~lr * 1e-12 / eps, a
    thousand times less than the unclipped step; the unclipped norm is logged. (The copied step
    of CMTrainLoop ignored --grad_clip: both runs moved the weights alike.)"""
    tmp = teacher_file
    teacher = _load(tmp / "teacher" / "model.pt")
    moved = {}
    for name, extra in [("free", []), ("clipped", ["--grad_clip", "1e-12"])]:
        run("cm_distill.py", *_distil(tmp, tmp / name, "--lr_anneal_steps", "1",
                                      "--lr", "1e-3", *extra))
        student = _load(tmp / name / "model000001.pt")
        moved[name] = max(float((student[k] - teacher[k]).abs().max()) for k in teacher)
    assert moved["free"] > 1e-5
    assert moved["clipped"] < 1e-3 * moved["free"], moved
    with open(tmp / "clipped" / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["grad_norm_unclipped"]) > 1e-12


def _cm_loop(log_dir, data, **kwargs):
    logger.configure(dir=str(log_dir), format_strs=["csv"])
    th.manual_seed(0)
    teacher = create_model(16, 32, 1, channel_mult="1,2", attention_resolutions="8")
    diffusion = create_gaussian_diffusion(steps=40, noise_schedule="cosine")
    cm = ConsistencyConfig(cm_steps=6, teacher_solver="ddim", target_ema=0.9)
    return CMTrainLoop(
        model=copy.deepcopy(teacher), diffusion=diffusion, teacher=teacher.eval(), cm=cm,
        data=iter(data), batch_size=2, microbatch=-1, lr=1e-3, ema_rate="0.9", log_interval=1,
        save_interval=100, resume_checkpoint="", **kwargs)


def test_a_non_finite_step_is_skipped_for_student_emas_and_target(tmp_path):
    """A NaN batch: no update of the student, its EMA or the target network (the copied step
    applied the NaN update to all three), and --max_bad_steps stops the run."""
    nan_batch = (th.full((2, 3, 16, 16), float("nan")), {})
    try:
        loop = _cm_loop(tmp_path / "a", [nan_batch], lr_anneal_steps=1, max_bad_steps=0)
        before = [copy.deepcopy(m.state_dict()) for m in (loop.model, loop.target)]
        ema_before = [p.clone() for p in loop.ema_params[0]]
        loop.run_loop()
        assert loop.bad_steps == 1
        for module, old in zip((loop.model, loop.target), before):
            for k, v in module.state_dict().items():
                assert th.equal(v, old[k]), k
        assert all(th.equal(p, q) for p, q in zip(loop.ema_params[0], ema_before))
        stopper = _cm_loop(tmp_path / "b", [nan_batch], lr_anneal_steps=1, max_bad_steps=1)
        with pytest.raises(TrainingStopped, match="max_bad_steps 1"):
            stopper.run_loop()
    finally:
        logger.reset()


def test_two_process_cm_run_killed_and_resumed_equals_the_uninterrupted_run(teacher_file,
                                                                             tmp_path):
    """Two ranks (torchrun), rank 1 SIGKILLed after step 3: torchrun restarts both, they resume
    from step 2 and end with the student, target, EMA and optimizer of an uninterrupted run,
    bit for bit (each rank's RNG state restored as its own, not rank 0's)."""
    tmp = teacher_file
    names = ["model000004.pt", "target000004.pt", "ema_0.9999_000004.pt", "opt000004.pt"]

    def launch(out, *env):
        cmd = _torchrun("--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
                        str(ROOT / "scripts" / "cm_distill.py"),
                        *_distil(tmp, out, "--lr_anneal_steps", "4", "--save_interval", "2",
                                 "--resume_checkpoint", "auto", "--dropout", "0.1"))
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(**dict(env)), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    launch(tmp_path / "whole")
    launch(tmp_path / "cut", ("GD_FAULT", "kill@step:3/1"),
           ("GD_FAULT_ONCE", str(tmp_path / "faults")))
    assert os.listdir(tmp_path / "faults") == ["kill_step_3_1"]
    assert "model000002.pt..." in (tmp_path / "cut" / "log.txt").read_text()
    for name in names:
        assert_same_values(_load(tmp_path / "whole" / name), _load(tmp_path / "cut" / name),
                           name)
    resume = _load(tmp_path / "whole" / "opt000004.pt")["resume"]
    assert resume["train_flags"]["world_size"] == 2
    assert "cm_rng_torch" not in resume  # one RNG record: the TrainLoop's, per rank



@pytest.mark.parametrize("flag,value,match", [
    ("--teacher_solver", "ddpm", "--teacher_solver"),  # stochastic: not an ODE step
    ("--cm_steps", "1", "--cm_steps"),
    ("--target_ema", "1.5", "--target_ema"),
    ("--cm_loss", "l1", "--cm_loss"),
    ("--cm_curriculum", "linear", "--cm_curriculum"),
    ("--cm_noise_dist", "normal", "--cm_noise_dist"),
    ("--cm_steps_max", "1", "--cm_steps_max"),
])
def test_consistency_flags_are_refused_when_parsed(flag, value, match, capsys):
    """Checked by config before any model is built: exit 2, one line naming the flag."""
    spec = importlib.util.spec_from_file_location("cm_distill", ROOT / "scripts" / "cm_distill.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_:
        script.create_argparser().parse_args([flag, value])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], lines


def test_resume_refuses_another_consistency_grid(tmp_path):
    """A student's checkpoints share one grid (sampling rebuilds it from args.json): resuming with
    another --cm_steps / --cm_curriculum is refused in one line naming the flag."""
    (tmp_path / "args.json").write_text(json.dumps(
        {"cm_steps": 18, "cm_curriculum": "none", "cm_spacing": "karras"}))
    resume = str(tmp_path / "model000002.pt")
    same = argparse.Namespace(resume_checkpoint=resume, cm_steps=18, cm_curriculum="none",
                              cm_spacing="karras")
    cli.check_resume_flags(same)
    for key, value in (("cm_steps", 40), ("cm_curriculum", "ict")):
        other = argparse.Namespace(**dict(vars(same), **{key: value}))
        with pytest.raises(cli.ScriptError, match=f"--{key} "):
            cli.check_resume_flags(other)
