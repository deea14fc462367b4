"""Work is never lost or mixed: the second hostile probe's findings, through the real scripts.

Each misuse either continues the run it meets (and says so) or refuses in one line `error: ...`
that says how to go on, and the earlier run's files keep their bytes (sha256) after it:
- a fresh training command on a folder holding another run's checkpoints;
- `--resume_checkpoint auto` without a run folder;
- another checkpoint put at a sampled `--model_path` (the manifest records its content hash);
- DiT progress grids (`--sample_interval`) and resuming with another batch size run through.
Probes are forked from one interpreter that imported torch once (tests/helpers/probe_scripts.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from evaluations import evaluator as E
from evaluations import npz_io
from guided_diffusion import cli, run_lock, sample_util
from guided_diffusion.errors import PeerLostError, ScriptError
from test_evaluator_streaming import StubInception
from test_hardening import SAMPLE, UNET, assert_one_line_error, probe_all, write_images

TRAIN = ["--batch_size", "2", "--save_interval", "2", "--random_flip", "False",
         "--log_interval", "1"]
# A tiny DiT: 16 px, patch 4 (16 tokens), 1 block of width 32.
DIT = ["--model", "dit", "--dit_model", "DiT-S/4", "--dit_depth", "1", "--dit_hidden_size", "32",
       "--dit_num_heads", "2", "--image_size", "16", "--class_cond", "True", "--num_classes", "2",
       "--diffusion_steps", "40"]


def hashes(folder: pathlib.Path) -> dict:
    """sha256 of every file under `folder` (relative path -> digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def ok(result: dict) -> dict:
    assert result["rc"] == 0, f"{result['script']} {' '.join(result['argv'])}:\n" \
                              f"{result['stdout'][-2000:]}\n{result['stderr'][-3000:]}"
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Images, and a finished 2-step U-Net run `unet` (checkpoints at step 2) trained on them."""
    tmp = tmp_path_factory.mktemp("work_safety")
    write_images(tmp / "data")
    [result] = probe_all(tmp, [("image_train.py", [*UNET, "--data_dir", str(tmp / "data"), *TRAIN,
                                                   "--lr_anneal_steps", "2", "--output_dir",
                                                   str(tmp / "unet")])])
    ok(result)
    return tmp


def test_a_fresh_run_never_overwrites_another_runs_checkpoints(work):
    run_dir = work / "unet"
    before = hashes(run_dir)
    assert "model000002.pt" in before and "args.json" in before
    other = work / "other"
    shutil.copytree(run_dir, other)
    train = [*UNET, "--data_dir", str(work / "data"), *TRAIN, "--lr_anneal_steps", "4"]
    results = probe_all(work, [
        # The original's default command again, on the same folder.
        ("image_train.py", [*train, "--output_dir", str(run_dir)]),
        # Resuming another folder's checkpoint into this one.
        ("image_train.py", [*train, "--output_dir", str(run_dir), "--resume_checkpoint",
                            str(other / "model000002.pt")]),
        # Fine-tuning into a folder with checkpoints is a fresh run too.
        ("image_train.py", [*train, "--output_dir", str(run_dir), "--init_checkpoint",
                            str(other / "model000002.pt")]),
        # auto without a run folder would resume nothing in a new temp folder, every time.
        ("image_train.py", [*train, "--resume_checkpoint", "auto"]),
    ])
    for result in results[:3]:
        assert_one_line_error(result, str(run_dir), "model000002.pt",
                              "--resume_checkpoint auto", "another --output_dir")
    assert_one_line_error(results[3], "--resume_checkpoint auto", "--output_dir")
    assert hashes(run_dir) == before  # not one byte of the earlier run changed
    # The way out the message names works: auto continues the run from step 2 to 4.
    [result] = probe_all(work, [("image_train.py", [*train, "--output_dir", str(other),
                                                    "--resume_checkpoint", "auto"])])
    assert "model000004.pt" in hashes(other), ok(result)["stdout"]


def test_resume_with_another_batch_size_continues_statistically(work):
    run_dir = work / "batch"
    shutil.copytree(work / "unet", run_dir)
    # 8 images: 4 batches of 2 per epoch before, 8 of 1 now.
    [result] = probe_all(work, [("image_train.py", [
        *UNET, "--data_dir", str(work / "data"), *TRAIN, "--batch_size", "1",
        "--lr_anneal_steps", "3", "--output_dir", str(run_dir), "--resume_checkpoint", "auto"])])
    ok(result)
    assert "continues statistically" in result["stdout"]
    assert (run_dir / "model000003.pt").exists()


@pytest.fixture(scope="module")
def dit_run(work):
    """A tiny DiT trained 2 steps with a progress grid every step, then resumed to step 3."""
    run_dir = work / "dit"
    train = [*DIT, "--data_dir", str(work / "data"), *TRAIN, "--sample_interval", "1"]
    for result in probe_all(work, [
        ("image_train.py", [*train, "--lr_anneal_steps", "2", "--output_dir", str(run_dir)]),
        ("image_train.py", [*train, "--lr_anneal_steps", "3", "--output_dir", str(run_dir),
                            "--resume_checkpoint", "auto"]),
    ]):
        ok(result)
    return run_dir


def test_dit_writes_progress_grids_and_resumes(dit_run):
    # Before: 'DiT' object has no attribute 'image_size' at the first grid, and after a resume.
    for step in (1, 2, 3):
        assert (dit_run / f"samples_{step:06d}.png").stat().st_size > 0
    assert (dit_run / "model000003.pt").exists()


def test_dit_and_latent_flags_are_compared_with_the_run(work, dit_run):
    model = str(dit_run / "model000003.pt")
    out = work / "dit_samples"
    # --dit_num_heads changes no tensor shape: the checkpoint would load and sample garbage.
    [result] = probe_all(work, [("image_sample.py", [*DIT, *SAMPLE, "--dit_num_heads", "4",
                                                     "--model_path", model,
                                                     "--output_dir", str(out)])])
    assert_one_line_error(result, "--dit_num_heads 4", "args.json")
    assert not (out / "samples_shards").exists()
    # Latent runs: another VAE or scale reads the same latents as other images.
    run = json.loads((dit_run / "args.json").read_text())
    # A plain Namespace (its given flags unknown): only compared with the run, never filled.
    args = argparse.Namespace(**{**run, "model_path": model, "latent_vae": "other_vae",
                                 "latent_scale": 0.5})
    with pytest.raises(ScriptError, match="--latent_vae 'other_vae'.*--latent_scale 0.5"):
        cli.flags_from_run(args, "model_path")


def test_sampling_flags_are_checked_before_the_manifest_is_written(work):
    model = str(work / "unet" / "model000002.pt")
    out = work / "checked"
    base = [*UNET, *SAMPLE, "--model_path", model, "--seed", "0", "--output_dir", str(out)]
    results = probe_all(work, [
        ("image_sample.py", [*base, "--steps", "9"]),  # the respaced grid has 4 timesteps
        ("image_sample.py", [*base, "--sampler", "heun", "--eta", "0.5"]),
        ("image_sample.py", base),  # the corrected command is not refused
        ("image_sample.py", [*base, "--dist_timeout", "60"]),  # a free choice: not recorded
    ])
    assert_one_line_error(results[0], "--steps", "4 timesteps")
    assert_one_line_error(results[1], "--eta 0.5", "ddim")
    ok(results[2])
    ok(results[3])
    assert "2 of 2 complete" not in results[2]["stdout"]  # the refused ones wrote no shard


def test_wait_for_shards_is_bounded_by_dist_timeout(tmp_path):
    start = time.monotonic()
    with pytest.raises(PeerLostError, match=r"--dist_timeout 0.3s.*rank\(s\) 0 still owe 1 shard"):
        sample_util.wait_for_shards(str(tmp_path), [(0, 2)], poll_s=0.05, timeout_s=0.3)
    assert time.monotonic() - start < 5


def test_cm_distill_checks_its_teacher_and_its_resume(work):
    teacher = str(work / "unet" / "model000002.pt")
    out = work / "cm"
    cm = [*UNET, "--teacher_path", teacher, "--data_dir", str(work / "data"), "--batch_size", "2",
          "--cm_steps", "5", "--teacher_solver", "ddim", "--random_flip", "False",
          "--save_interval", "1", "--lr_anneal_steps", "1"]
    locked = work / "cm_locked"
    locked.mkdir()
    (locked / run_lock.LOCK_NAME).write_text(json.dumps({"pid": os.getpid(),
                                                         "host": socket.gethostname()}))
    results = probe_all(work, [
        ("cm_distill.py", [*cm, "--diffusion_steps", "50", "--output_dir", str(out)]),
        ("cm_distill.py", [*cm, "--predict_xstart", "True", "--output_dir", str(out)]),
        ("cm_distill.py", [*cm, "--output_dir", str(out)]),
        ("cm_distill.py", [*cm, "--output_dir", str(work / "cm2"), "--teacher_path",
                           str(out / "model000001.pt")]),
        ("cm_distill.py", [*UNET, *cm[len(UNET) + 2:], "--training_mode",
                           "consistency_training", "--noise_schedule", "cosine",
                           "--resume_checkpoint", "auto", "--lr_anneal_steps", "2",
                           "--output_dir", str(out)]),
        ("cm_distill.py", [*cm, "--output_dir", str(locked)]),
    ])
    assert_one_line_error(results[0], "--diffusion_steps 50", "--teacher_path")
    assert_one_line_error(results[1], "--predict_xstart True", "--teacher_path")
    ok(results[2])
    assert_one_line_error(results[3], "--teacher_path", "consistency model")
    assert not (work / "cm2").exists()  # refused before anything was written
    assert_one_line_error(results[4], "--noise_schedule 'cosine'", "--resume_checkpoint")
    assert not (out / "model000002.pt").exists()
    assert_one_line_error(results[5], "in use by another training run")


def test_another_checkpoint_at_the_sampled_path_is_refused(work):
    models = work / "models"
    models.mkdir()
    for name in ("model000002.pt", "args.json"):
        shutil.copy(work / "unet" / name, models / name)
    out = work / "samples"
    sample = ["image_sample.py", [*UNET, *SAMPLE, "--model_path", str(models / "model000002.pt"),
                                  "--shard_size", "2", "--seed", "0", "--output_dir", str(out)]]
    [result] = probe_all(work, [sample])
    ok(result)
    manifest = json.loads((out / "samples_shards" / "manifest.json").read_text())
    digest = hashlib.sha256((models / "model000002.pt").read_bytes()).hexdigest()
    assert manifest["flags"]["model_path_sha256"] == digest
    before = {k: v for k, v in hashes(out).items() if k != "log.txt"}  # the log grows
    assert "samples_shards/samples_00000000-00000002.npz" in before
    # Another model (the run's EMA weights: same tensors, other values) at the same path.
    shutil.copy(work / "unet" / "ema_0.9999_000002.pt", models / "model000002.pt")
    [result] = probe_all(work, [sample])
    assert_one_line_error(result, "--model_path", "sha256", "put that file back")
    assert {k: v for k, v in hashes(out).items() if k != "log.txt"} == before


def test_damaged_or_mismatched_evaluator_batches_are_one_line_naming_the_file(tmp_path,
                                                                                monkeypatch):
    monkeypatch.setattr(E, "load_fid_inception",
                        lambda *a, preprocessing, **k: StubInception(preprocessing))
    good = str(tmp_path / "good16.npz")
    np.savez(good, arr_0=np.zeros((8, 16, 16, 3), np.uint8))
    bad = {}
    bad["text"] = tmp_path / "text.npz"
    bad["text"].write_text("not an npz\n")
    bad["cut"] = tmp_path / "cut.npz"
    bad["cut"].write_bytes(pathlib.Path(good).read_bytes()[:200])
    bad["npy"] = tmp_path / "single.npz"
    with open(bad["npy"], "wb") as f:
        np.save(f, np.zeros((8, 16, 16, 3), np.uint8))
    bad["float"] = tmp_path / "float.npz"
    np.savez(bad["float"], arr_0=np.zeros((8, 16, 16, 3), np.float32))
    bad["big"] = tmp_path / "good32.npz"
    np.savez(bad["big"], arr_0=np.zeros((8, 32, 32, 3), np.uint8))
    for name, path in bad.items():
        for ref, sample in ((str(path), good), (good, str(path))):
            with pytest.raises(SystemExit) as err:
                npz_io.run_main(lambda: E.main([ref, sample, "--device", "cpu"]), "evaluator.py")
            message = str(err.value.code)
            assert message.startswith("evaluator.py: error: ") and "\n" not in message, message
            assert str(path) in message, (name, message)
    assert "16x16 px" in message and "32x32 px" in message


def test_a_lock_whose_pid_was_reused_is_stale(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)  # it has started
        for name, written, boot, live in (
                ("live", time.time(), run_lock._boot_id(), True),  # written after it started
                ("reused", time.time() - 3600, run_lock._boot_id(), False),  # PID reused since
                ("rebooted", time.time(), "another-boot", False)):
            folder = tmp_path / name
            folder.mkdir()
            (folder / run_lock.LOCK_NAME).write_text(json.dumps(
                {"pid": other.pid, "host": socket.gethostname(), "started": written,
                 "boot_id": boot}))
            if live:
                with pytest.raises(run_lock.LockedError, match=f"PID {other.pid}"):
                    run_lock.acquire(str(folder))
            else:
                path = run_lock.acquire(str(folder))
                assert json.loads(pathlib.Path(path).read_text())["pid"] == os.getpid()
                run_lock.release(path)
    finally:
        other.kill()
        other.wait()


def test_silent_oddities_are_refused_or_warned(work):
    plain = work / "no_prefix"
    plain.mkdir()
    for i in range(4):  # no '_': with --class_cond each file would be its own class
        shutil.copy(work / "data" / f"a_{i}.png", plain / f"img{i}.png")
    base = work / "two_base.npz"
    np.savez(base, arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    sr = ["--large_size", "32", "--small_size", "16", "--num_channels", "32",
          "--num_res_blocks", "1", "--diffusion_steps", "40"]
    results = probe_all(work, [
        ("image_train.py", [*UNET, "--data_dir", str(plain), *TRAIN, "--lr_anneal_steps", "1",
                            "--output_dir", str(work / "no_prefix_run")]),
        ("super_res_sample.py", [*sr, *SAMPLE, "--num_samples", "3", "--base_samples", str(base),
                                 "--model_path", str(work / "sr.pt"),
                                 "--output_dir", str(work / "sr_out")]),
        ("image_train.py", [*UNET, "--data_dir", str(work / "data"), *TRAIN,
                            "--lr_anneal_steps", "1", "--use_fp16", "True",
                            "--output_dir", str(work / "fp16_cpu")]),
    ])
    assert_one_line_error(results[0], "--class_cond True", "'_'", "img0.png")
    assert_one_line_error(results[1], "--num_samples 3", "2 images", "--base_samples")
    assert "WARNING: --use_fp16 True on the CPU" in ok(results[2])["stdout"]
