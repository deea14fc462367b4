"""End to end through the real scripts, as subprocesses, on a tiny model and the bundled digits.

Training writes the original's checkpoint files; sampling in one process and in two (torchrun,
gloo) writes exactly --num_samples samples with labels; with --seed the samples do not depend on
the batch size or the number of processes; a flag/checkpoint mismatch ends in a one-line error.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "datasets"))
from digits import write_digits  # noqa: E402

# A tiny 16 px class-conditional U-Net and classifier (10 digit classes), 100 diffusion steps.
DIFFUSION = ["--diffusion_steps", "100", "--noise_schedule", "linear"]
UNET = ["--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1",
        "--channel_mult", "1,2", "--attention_resolutions", "8", "--num_head_channels", "32",
        "--class_cond", "True", "--num_classes", "10", *DIFFUSION]
CLASSIFIER = ["--classifier_width", "32", "--classifier_depth", "1",
              "--classifier_channel_mult", "1,2", "--classifier_attention_resolutions", "8"]
SAMPLE = ["--timestep_respacing", "10", "--progress", "False"]


def run(script: str, *flags: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for var in ("OPENAI_LOGDIR", "GD_TRACEBACK", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, str(ROOT / "scripts" / script), *flags], env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Digits on disk and a 2-step class-conditional diffusion model trained on them."""
    tmp = tmp_path_factory.mktemp("scripts")
    write_digits(str(tmp / "digits"), image_size=16, val_every=6)
    run("image_train.py", *UNET, "--data_dir", str(tmp / "digits" / "train"), "--batch_size", "4",
        "--lr_anneal_steps", "2", "--save_interval", "2", "--random_flip", "False",
        "--output_dir", str(tmp / "unet"), "--seed", "0")
    return tmp


def test_image_train_writes_the_original_checkpoint_files(work):
    files = set(os.listdir(work / "unet"))
    assert {"model000002.pt", "ema_0.9999_000002.pt", "opt000002.pt", "args.json"} <= files


def test_image_sample_exact_count_labels_and_seed_across_batch_sizes_and_ranks(work):
    model = str(work / "unet" / "model000002.pt")
    common = [*UNET, *SAMPLE, "--model_path", model, "--num_samples", "5", "--seed", "1"]
    outs = {}
    for name, batch, nproc in [("b2", "2", 1), ("b4", "4", 1), ("r2", "2", 2)]:
        run("image_sample.py", *common, "--batch_size", batch, "--output_dir", str(work / name),
            nproc=nproc)
        outs[name] = load_npz(work / name / "samples_5x16x16x3.npz")
        assert (work / name / "samples_5x16x16x3.png").exists()
    for name, out in outs.items():
        assert out["arr_0"].shape == (5, 16, 16, 3) and out["arr_0"].dtype == np.uint8, name
        assert out["arr_1"].shape == (5,) and out["arr_1"].dtype == np.int64, name
        assert ((0 <= out["arr_1"]) & (out["arr_1"] < 10)).all()
    ref = outs["b2"]
    for name in ("b4", "r2"):
        np.testing.assert_array_equal(outs[name]["arr_1"], ref["arr_1"])
        diff = np.abs(outs[name]["arr_0"].astype(int) - ref["arr_0"].astype(int)).max()
        assert diff <= 1, f"{name}: seeded samples differ by {diff}"


def test_flag_checkpoint_mismatch_is_one_line(work):
    model = str(work / "unet" / "model000002.pt")
    flags = [f if f != "True" or UNET[i - 1] != "--class_cond" else "False"
             for i, f in enumerate(UNET)]
    proc = run("image_sample.py", *flags, *SAMPLE, "--model_path", model, "--num_samples", "1",
               "--output_dir", str(work / "mismatch"), check=False)
    assert proc.returncode == 1
    err_lines = proc.stderr.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "label_emb.weight" in err_lines[0] and "--class_cond" in err_lines[0]
    assert not (work / "mismatch" / "samples_1x16x16x3.npz").exists()


def test_classifier_train_then_guided_sampling(work):
    run("classifier_train.py", "--image_size", "16", *CLASSIFIER, "--num_classes", "10",
        *DIFFUSION, "--data_dir", str(work / "digits" / "train"),
        "--val_data_dir", str(work / "digits" / "val"), "--batch_size", "4", "--iterations", "2",
        "--eval_interval", "1", "--random_flip", "False", "--output_dir", str(work / "cls"))
    assert {"model000002.pt", "opt000002.pt"} <= set(os.listdir(work / "cls"))
    progress = (work / "cls" / "progress.csv").read_text()
    assert "train_acc@1" in progress and "val_loss" in progress
    run("classifier_sample.py", *UNET, *CLASSIFIER, *SAMPLE, "--use_ddim", "True",
        "--model_path", str(work / "unet" / "model000002.pt"),
        "--classifier_path", str(work / "cls" / "model000002.pt"), "--classifier_scale", "4",
        "--num_samples", "3", "--batch_size", "3", "--output_dir", str(work / "guided"))
    out = load_npz(work / "guided" / "samples_3x16x16x3.npz")
    assert out["arr_0"].shape == (3, 16, 16, 3) and out["arr_1"].shape == (3,)


def test_super_res_and_nll_scripts_run(work):
    sr = ["--large_size", "32", "--small_size", "16", "--num_channels", "32", "--num_res_blocks",
          "1", "--attention_resolutions", "8", "--num_head_channels", "32", *DIFFUSION]
    run("super_res_train.py", *sr, "--data_dir", str(work / "digits" / "val"), "--batch_size", "2",
        "--lr_anneal_steps", "1", "--output_dir", str(work / "sr"))
    # Any uint8 [N x 16 x 16 x 3] npz is a valid --base_samples (e.g. image_sample.py output).
    base = work / "base.npz"
    np.savez(base, np.random.RandomState(0).randint(0, 256, (4, 16, 16, 3)).astype(np.uint8))
    run("super_res_sample.py", *sr, *SAMPLE, "--model_path", str(work / "sr" / "model000001.pt"),
        "--base_samples", str(base), "--num_samples", "4", "--batch_size", "4",
        "--output_dir", str(work / "sr_samples"))
    assert load_npz(work / "sr_samples" / "samples_4x32x32x3.npz")["arr_0"].shape == (4, 32, 32, 3)
    proc = run("image_nll.py", *UNET, *SAMPLE, "--model_path", str(work / "unet" / "model000002.pt"),
               "--data_dir", str(work / "digits" / "val"), "--num_samples", "2",
               "--batch_size", "2", "--output_dir", str(work / "nll"))
    assert "bpd=" in proc.stdout
    vb = load_npz(work / "nll" / "vb_terms.npz")["arr_0"]
    assert vb.shape == (10,) and np.isfinite(vb).all()


def test_image_folder_helper_keeps_imagefolder_label_order(tmp_path):
    """Class directories become file-name prefixes whose sorted order is the ImageFolder order."""
    from PIL import Image

    sys.path.insert(0, str(ROOT / "datasets"))
    from image_folder import flatten_image_folder

    from guided_diffusion.image_datasets import load_data

    for cls, color in [("b_cat", 200), ("a_dog", 10)]:
        (tmp_path / "in" / cls / "sub").mkdir(parents=True)
        Image.new("RGB", (12, 10), (color,) * 3).save(tmp_path / "in" / cls / "sub" / "x.bmp")
    classes = flatten_image_folder(str(tmp_path / "in"), str(tmp_path / "out"))
    assert classes == ["a_dog", "b_cat"]
    assert sorted(os.listdir(tmp_path / "out")) == [
        "a-dog_0000000.png", "b-cat_0000001.png", "classes.txt"]
    images, kwargs = next(load_data(data_dir=str(tmp_path / "out"), batch_size=2, image_size=8,
                                    class_cond=True, deterministic=True, random_flip=False))
    # Label 0 is the dark "a_dog" image, label 1 the bright "b_cat" one.
    assert kwargs["y"].tolist() == [0, 1]
    assert images[0].mean() < 0 < images[1].mean()


def test_sampler_table_plot_is_an_optional_extra(tmp_path, monkeypatch, capsys):
    """With matplotlib: a PNG of FID against NFE. Without: one line saying how to get it."""
    import builtins
    import importlib.util

    spec = importlib.util.spec_from_file_location("sampler_table",
                                                  ROOT / "scripts" / "sampler_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    rows = [dict(sampler=s, nfe=n, fid=f, cfg_scale=1.0, classifier_scale=0.0)
            for s, n, f in [("ddim", 10, 3.0), ("ddim", 20, 2.0), ("dpm++2m", 10, 1.5)]]
    path = tmp_path / "fid.png"
    assert table.plot_fid(rows, 0.5, str(path))
    from PIL import Image

    assert Image.open(path).size[0] > 300
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert not table.plot_fid(rows, 0.5, str(tmp_path / "none.png"))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "pip install -e .[plot]" in out[0]
    assert not (tmp_path / "none.png").exists()


def test_sampler_table_model_flags_not_given_are_absent():
    """Model flags not on the command line must be absent (so args.json supplies them), not the
    string '==SUPPRESS==' that once reached the args.json comparison and refused every run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sampler_table",
                                                  ROOT / "scripts" / "sampler_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    args = table.create_argparser().parse_args(["--model_path", "m.pt", "--image_size", "16"])
    assert args.image_size == 16 and args.model_path == "m.pt"
    assert not hasattr(args, "num_channels") and not hasattr(args, "noise_schedule")


def test_sampler_table_rows_take_an_optional_spacing():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sampler_table",
                                                  ROOT / "scripts" / "sampler_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert table.parse_rows("ddim:10:1:0", "auto")[0][4] == "edm"  # resolved per sampler
    rows = table.parse_rows("ddpm:250:1:0,unipc:6:1:0:karras", "logsnr")
    assert rows == [("ddpm", 250, 1.0, 0.0, "logsnr"), ("unipc", 6, 1.0, 0.0, "karras")]
    for bad in ("unipc:6:1:0:edm2", "unipc:6:1", "euler:6:1:0"):
        with pytest.raises(table.cli.ScriptError, match="--rows entry"):
            table.parse_rows(bad, "logsnr")
