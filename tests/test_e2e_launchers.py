"""End to end as a user: the original README's flag strings, scaled down (32 px, 32 channels, a
few steps), through train -> resume -> sample -> classifier train -> guided sample, under a plain
process, under torchrun and under mpiexec (2 ranks each for the launchers)."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The original README's 64x64 flag strings, with sizes scaled down.
MODEL_FLAGS = ("--attention_resolutions 16,8 --class_cond True --diffusion_steps 100 "
               "--dropout 0.1 --image_size 32 --learn_sigma True --noise_schedule cosine "
               "--num_channels 32 --num_head_channels 16 --num_res_blocks 1 --resblock_updown True "
               "--use_new_attention_order True --use_fp16 False --use_scale_shift_norm True "
               "--num_classes 4").split()
CLASSIFIER_FLAGS = ("--image_size 32 --classifier_attention_resolutions 16,8 --classifier_depth 1 "
                    "--classifier_width 32 --classifier_pool attention "
                    "--classifier_resblock_updown True --classifier_use_scale_shift_norm True "
                    "--num_classes 4").split()
SAMPLE_FLAGS = "--batch_size 2 --num_samples 3 --timestep_respacing 4 --progress False".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(kind: str) -> list[str]:
    if kind == "python":
        return [sys.executable]
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={_free_port()}"]
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found (pip install mpi4py mpich)")
    return [mpiexec, "-n", "2", sys.executable]


def _run(kind: str, script: str, *flags: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for var in ("OPENAI_LOGDIR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [*_launcher(kind), str(ROOT / "scripts" / script), *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """8 labelled 32 px images, 4 classes, named as the original's loader expects."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(8):
        arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"c{i % 4}_{i:03d}.png")
    return folder


@pytest.mark.parametrize("kind", ["python", "torchrun", "mpiexec"])
def test_train_resume_sample_classifier_guided(kind, images, tmp_path):
    data = ["--data_dir", str(images)]
    train = [*MODEL_FLAGS, *data, "--batch_size", "2", "--save_interval", "1",
             "--output_dir", str(tmp_path / "unet")]
    _run(kind, "image_train.py", *train, "--lr_anneal_steps", "1")
    assert (tmp_path / "unet" / "model000001.pt").exists()
    # Resume the newest checkpoint without naming it, and train one more step.
    _run(kind, "image_train.py", *train, "--lr_anneal_steps", "2", "--resume_checkpoint", "auto")
    for name in ("model000002.pt", "ema_0.9999_000002.pt", "opt000002.pt"):
        assert (tmp_path / "unet" / name).exists(), name

    model = ["--model_path", str(tmp_path / "unet" / "ema_0.9999_000002.pt")]
    _run(kind, "image_sample.py", *MODEL_FLAGS, *SAMPLE_FLAGS, *model,
         "--output_dir", str(tmp_path / "samples"))
    _run(kind, "classifier_train.py", *CLASSIFIER_FLAGS, "--diffusion_steps", "100",
         "--noise_schedule", "cosine", *data, "--batch_size", "2", "--iterations", "1",
         "--save_interval", "1", "--output_dir", str(tmp_path / "clf"))
    _run(kind, "classifier_sample.py", *MODEL_FLAGS, *CLASSIFIER_FLAGS, *SAMPLE_FLAGS, *model,
         "--classifier_path", str(tmp_path / "clf" / "model000001.pt"), "--classifier_scale", "1.0",
         "--output_dir", str(tmp_path / "guided"))
    for out in ("samples", "guided"):
        with np.load(tmp_path / out / "samples_3x32x32x3.npz", allow_pickle=False) as f:
            assert f["arr_0"].shape == (3, 32, 32, 3) and f["arr_0"].dtype == np.uint8
            assert f["arr_1"].shape == (3,) and set(f["arr_1"].tolist()) <= {0, 1, 2, 3}
