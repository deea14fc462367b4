"""Bad input and misuse of the real scripts end in one line `error: ...` naming the flag or file.

Each probe is `python scripts/X.py ...` (forked from one interpreter that imported torch once,
tests/helpers/probe_scripts.py, so that ~50 probes take seconds): exit status != 0, exactly one
stderr line, starting `error:`, naming what is wrong, no traceback. Also: the output-folder lock,
auto-resume falling back past a corrupt checkpoint, a finished run doing nothing, a full disk
removing no good file, and the silent oddities (16-bit PNGs, NaN samples, progress.csv rows).
"""

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch as th
from PIL import Image

from guided_diffusion import checkpoints, cli, logger, run_lock
from guided_diffusion.image_datasets import read_image

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A tiny 16 px class-conditional U-Net (2 classes, label dropout for CFG), 40 diffusion steps.
UNET = ["--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1",
        "--channel_mult", "1,2", "--attention_resolutions", "8", "--num_head_channels", "32",
        "--class_cond", "True", "--num_classes", "2", "--class_dropout_prob", "0.1",
        "--diffusion_steps", "40"]
CLASSIFIER = ["--image_size", "16", "--classifier_width", "32", "--classifier_depth", "1",
              "--classifier_channel_mult", "1,2", "--classifier_attention_resolutions", "8",
              "--num_classes", "2", "--diffusion_steps", "40"]
SAMPLE = ["--timestep_respacing", "4", "--progress", "False", "--num_samples", "2",
          "--batch_size", "2", "--grid_size", "0"]


def env() -> dict:
    out = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for var in ("OPENAI_LOGDIR", "GD_TRACEBACK", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        out.pop(var, None)
    return out


def run(script: str, *flags: str, prelude: str = "") -> subprocess.CompletedProcess:
    """`python scripts/<script> flags...`; `prelude` (Python) runs first in the same process."""
    path = str(ROOT / "scripts" / script)
    if prelude:
        code = (f"{prelude}\nimport runpy, sys\nsys.argv = {[path, *flags]!r}\n"
                f"runpy.run_path({path!r}, run_name='__main__')")
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, path, *flags]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)


def probe_all(tmp: pathlib.Path, probes: list) -> list:
    """Run [(script, argv), ...] through the fork helper; return each result dict."""
    spec, out = tmp / "probes.json", tmp / "results.json"
    spec.write_text(json.dumps([{"script": s, "argv": list(a)} for s, a in probes]))
    subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "probe_scripts.py"),
                    str(spec), str(out)], env=env(), check=True, timeout=300)
    return json.loads(out.read_text())


def assert_one_line_error(result: dict, *needles: str) -> str:
    what = f"{result['script']} {' '.join(result['argv'])}"
    lines = result["stderr"].strip().splitlines()
    assert result["rc"] != 0, f"{what}: exit 0\n{result['stdout']}"
    assert "Traceback" not in result["stderr"], f"{what}:\n{result['stderr']}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{what}:\n{result['stderr']}"
    for needle in needles:
        assert needle in lines[0], f"{what}: {needle!r} not in {lines[0]!r}"
    assert "weights_only=False" not in lines[0]  # never the unsafe way out
    return lines[0]


def check_probes(tmp: pathlib.Path, table: list) -> None:
    """table: [(script, argv, needles...)]; every probe must refuse in one line naming them."""
    results = probe_all(tmp, [(row[0], row[1]) for row in table])
    for row, result in zip(table, results):
        assert_one_line_error(result, *row[2:])


def write_images(folder: pathlib.Path, classes=("a", "b"), per_class: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for c in classes:
        for i in range(per_class):
            arr = rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{c}_{i}.png")


def snapshot(folder: pathlib.Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


TRAIN = ["--batch_size", "2", "--save_interval", "2", "--random_flip", "False"]
FULL_DISK = ("import errno, os\n"
             "def _full(fd):\n"
             "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
             "os.fsync = _full  # every atomic write fails as on a full disk")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Images on disk, a 2-step tiny diffusion model and classifier trained on them, bad files."""
    tmp = tmp_path_factory.mktemp("hardening")
    write_images(tmp / "data")
    train = ["--data_dir", str(tmp / "data"), *TRAIN]
    for result in probe_all(tmp, [
        ("image_train.py", [*UNET, *train, "--lr_anneal_steps", "2", "--output_dir",
                            str(tmp / "unet")]),
        ("classifier_train.py", [*CLASSIFIER, *train, "--iterations", "2", "--output_dir",
                                 str(tmp / "cls")]),
    ]):
        assert result["rc"] == 0, result["stderr"]
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "text.pt").write_text("this is not a checkpoint\n")
    th.save([th.zeros(2)], tmp / "list.pt")
    subprocess.run([sys.executable, "-c", "import torch\nclass Net: pass\n"
                    f"torch.save({{'w': Net()}}, {str(tmp / 'pickled.pt')!r})"], check=True)
    state = th.load(tmp / "unet" / "model000002.pt", weights_only=True)
    state["out.2.weight"][0, 0, 0, 0] = float("nan")
    (tmp / "nan").mkdir()
    th.save(state, tmp / "nan" / "model000002.pt")
    (tmp / "a_file").write_text("x")
    (tmp / "empty_data").mkdir()
    write_images(tmp / "bad_data")
    (tmp / "bad_data" / "a_9.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp / "bad_data" / "b_9.jpg").write_text("not a jpeg")
    write_images(tmp / "three_classes", classes=("a", "b", "c"))
    return tmp


@pytest.fixture(scope="module")
def scenarios(work):
    """
    The runs that must succeed or fail in a stated way, prepared and then run in one batch:
    name -> (result, snapshot of the run folder before the run).
    """
    import socket

    model = str(work / "unet" / "model000002.pt")
    runs, before = {}, {}

    def copy_run(name: str, src: str) -> pathlib.Path:
        shutil.copytree(work / src, work / name)
        return work / name

    # A live run holds the folder (this test process stands in for it); a killed run's lock.
    for name, pid in (("lock_live", os.getpid()), ("lock_stale", _dead_pid())):
        (work / name).mkdir()
        (work / name / run_lock.LOCK_NAME).write_text(
            json.dumps({"pid": pid, "host": socket.gethostname()}))
        runs[name] = ("image_train.py", [*UNET, "--data_dir", str(work / "data"), *TRAIN,
                                         "--lr_anneal_steps", "1", "--output_dir",
                                         str(work / name)], "")
    (work / "lock_stale" / ".model000001.pt.abcd1234.tmp").write_bytes(b"half a checkpoint")

    # Auto-resume past a cut-off newest checkpoint and an incomplete one (no opt file); a row of
    # step 3 the killed run had logged (step 3 is redone from step 2).
    fallback = copy_run("fallback", "unet")
    good = (fallback / "model000002.pt").read_bytes()
    (fallback / "model000004.pt").write_bytes(good[: len(good) // 2])
    (fallback / "model000003.pt").write_bytes(good)
    header = (fallback / "progress.csv").read_text().splitlines()[0].split(",")
    with open(fallback / "progress.csv", "a") as f:
        f.write(",".join("3" if k == "step" else "-9.25" for k in header) + "\n")
    resume = ["--data_dir", str(work / "data"), *TRAIN, "--resume_checkpoint", "auto"]
    runs["fallback"] = ("image_train.py", [*UNET, *resume, "--lr_anneal_steps", "4",
                                           "--output_dir", str(fallback)], "")
    runs["finished"] = ("classifier_train.py", [*CLASSIFIER, *resume, "--iterations", "2",
                                                "--output_dir", str(copy_run("finished", "cls"))],
                        "")
    runs["full_disk"] = ("image_train.py", [*UNET, *resume, "--lr_anneal_steps", "4",
                                            "--output_dir", str(copy_run("full_disk", "unet"))],
                         FULL_DISK)
    runs["skip_bad"] = ("image_train.py", [*UNET, "--data_dir", str(work / "bad_data"), *TRAIN,
                                           "--lr_anneal_steps", "1", "--skip_bad_images", "True",
                                           "--output_dir", str(work / "skip_bad")], "")
    # A finite but huge CFG scale overflows to inf/NaN once x_0 is not clipped.
    runs["nan_samples"] = ("image_sample.py", [*UNET, *SAMPLE, "--model_path", model,
                                               "--cfg_scale", "1e38", "--clip_denoised", "False",
                                               "--seed", "0", "--output_dir",
                                               str(work / "nan_samples")], "")
    runs["warn_only"] = ("image_sample.py", [*UNET, *SAMPLE, "--model_path", model,
                                             "--use_kl", "True", "--output_dir",
                                             str(work / "warn_only")], "")
    for name in runs:
        before[name] = snapshot(work / name) if (work / name).is_dir() else {}
    spec = work / "scenarios.json"
    spec.write_text(json.dumps([{"script": sc, "argv": argv, "prelude": pre}
                                for sc, argv, pre in runs.values()]))
    out = work / "scenario_results.json"
    subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "probe_scripts.py"),
                    str(spec), str(out)], env=env(), check=True, timeout=300)
    results = json.loads(out.read_text())
    return {name: (result, before[name]) for name, result in zip(runs, results)}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------
# Refusals at parse time: every flag against its domain


def test_flag_domains_are_refused_at_parse_time_naming_the_flag(work):
    t, s, c, sr = "image_train.py", "image_sample.py", "classifier_train.py", "super_res_train.py"
    check_probes(work, [
        (t, ["--batch_size", "0"], "--batch_size", "> 0"),
        (t, ["--save_interval", "0"], "--save_interval"),
        (t, ["--log_interval", "0"], "--log_interval"),
        (t, ["--microbatch", "0"], "--microbatch", "-1"),
        (t, ["--lr", "nan"], "--lr", "finite"),
        (t, ["--ema_rate", "0.99,1.0"], "--ema_rate", "[0, 1)"),
        (t, ["--class_dropout_prob", "1"], "--class_dropout_prob", "[0, 1)"),
        (t, ["--dropout", "-0.1"], "--dropout"),
        (t, ["--num_classes", "0"], "--num_classes"),
        (t, ["--diffusion_steps", "0"], "--diffusion_steps"),
        (t, ["--noise_schedule", "cosin"], "--noise_schedule", "'cosine'"),
        (t, ["--schedule_sampler", "x"], "--schedule_sampler", "'uniform'"),
        (t, ["--image_size", "20", "--channel_mult", "1,2,2,2"], "--image_size 20",
         "multiple of 8"),
        (t, ["--image_size", "48"], "--image_size 48", "unsupported", "--channel_mult"),
        (c, ["--image_size", "16"], "--image_size 16", "--classifier_channel_mult"),
        (t, ["--image_size", "16", "--channel_mult", "1,2", "--attention_resolutions", "5"],
         "--attention_resolutions", "5"),
        (t, ["--channel_mult", "1,x"], "--channel_mult"),
        (t, ["--use_fp16", "maybe"], "--use_fp16", "boolean"),
        (t, ["--no_such_flag", "1"], "unrecognized arguments"),
        (s, ["--num_samples", "0"], "--num_samples"),
        (s, ["--batch_size", "-1"], "--batch_size"),
        (s, ["--timestep_respacing", "1"], "--timestep_respacing", "at least 2"),
        (s, ["--timestep_respacing", "ddimx"], "--timestep_respacing"),
        (s, ["--diffusion_steps", "30", "--timestep_respacing", "40"], "--timestep_respacing"),
        (s, ["--cfg_scale", "nan"], "--cfg_scale", "finite"),
        (s, ["--cfg_scale", "inf"], "--cfg_scale", "finite"),
        (s, ["--eta", "-1"], "--eta"),
        (s, ["--steps", "-3"], "--steps"),
        (s, ["--sampler", "euler"], "--sampler", "'dpm++2m'"),
        (s, ["--sampler_spacing", "log"], "--sampler_spacing"),
        (s, ["--grid_size", "-1"], "--grid_size"),
        ("classifier_sample.py", ["--classifier_scale", "nan"], "--classifier_scale", "finite"),
        ("classifier_sample.py", ["--classifier_scale", "-inf"], "--classifier_scale"),
        (c, ["--iterations", "0"], "--iterations"),
        (c, ["--eval_interval", "0"], "--eval_interval"),
        (c, ["--classifier_pool", "max"], "--classifier_pool", "'attention'"),
        (c, ["--image_size", "20", "--classifier_channel_mult", "1,2,2,2",
             "--classifier_attention_resolutions", ""], "--image_size 20"),
        (s, ["--diffusion_steps", "20"], "--diffusion_steps 20", "linear"),
        (sr, ["--small_size", "64", "--large_size", "32"], "--small_size 64", "--large_size 32"),
        ("super_res_sample.py", ["--large_size", "40"], "--large_size"),
        ("image_nll.py", ["--num_samples", "0"], "--num_samples"),
    ])


# ------------------------------------------------------------------------------------------------
# Refusals of files, folders and data


def test_bad_files_folders_and_data_are_one_line_errors(work):
    np.save(work / "base.npy", np.zeros((2, 8, 8, 3), np.uint8))
    (work / "base_text.npz").write_text("not an npz")
    model = str(work / "unet" / "model000002.pt")
    out = ["--output_dir", str(work / "probe_out")]
    t, s = "image_train.py", "image_sample.py"
    train = [*UNET, "--batch_size", "2", *out]
    sample = [*UNET, *SAMPLE, *out]
    check_probes(work, [
        # Checkpoints: missing, empty, text, not a dict of tensors, NaN weights.
        (s, [*sample, "--model_path", str(work / "nope.pt")], "--model_path", "nope.pt"),
        (s, [*sample, "--model_path", str(work / "empty.pt")], "empty.pt", "empty (0 bytes)"),
        (s, [*sample, "--model_path", str(work / "text.pt")], "text.pt", "not a torch checkpoint"),
        (s, [*sample, "--model_path", str(work / "list.pt")], "list.pt", "holds a list"),
        (s, [*sample, "--model_path", str(work / "pickled.pt")], "pickled Python objects",
         "it holds a __main__.Net"),
        (s, [*sample, "--model_path", str(work / "nan" / "model000002.pt")],
         "non-finite", "'out.2.weight'"),
        ("image_nll.py", [*UNET, "--model_path", str(work / "nan" / "model000002.pt"),
                          "--data_dir", str(work / "data"), *out], "non-finite"),
        # Sampling flags that change what the weights mean, against the run's args.json.
        (s, [*sample, "--model_path", model, "--predict_xstart", "True"],
         "--predict_xstart True", "args.json"),
        (s, [*sample, "--model_path", model, "--noise_schedule", "cosine"], "--noise_schedule"),
        # Resuming: other model flags, a NaN checkpoint.
        (t, [*train, "--data_dir", str(work / "data"), "--resume_checkpoint", model,
             "--predict_xstart", "True"], "--resume_checkpoint", "--predict_xstart"),
        (t, [*train, "--data_dir", str(work / "data"), "--resume_checkpoint", model,
             "--num_channels", "64"], "--resume_checkpoint", "shape"),
        (t, [*train, "--data_dir", str(work / "data"),
             "--resume_checkpoint", str(work / "nan" / "model000002.pt")], "non-finite"),
        # Data: missing, empty, corrupt images (all named at once), labels beyond --num_classes.
        (t, [*train, "--data_dir", str(work / "missing")], "--data_dir", "missing"),
        (t, [*train, "--data_dir", str(work / "empty_data")], "--data_dir", "no images"),
        (t, [*train, "--data_dir", str(work / "bad_data")], "2 of 10 images", "a_9.png",
         "b_9.jpg", "--skip_bad_images"),
        (t, [*train, "--data_dir", str(work / "three_classes")], "3 classes",
         "--num_classes is 2", "'c'"),
        (t, [*UNET, "--batch_size", "9", "--data_dir", str(work / "data"), *out],
         "fewer than the batch size 9"),
        ("classifier_train.py", [*CLASSIFIER, "--data_dir", str(work / "three_classes"), *out],
         "--num_classes is 2"),
        # Output folders: a file, a read-only place.
        (s, [*sample, "--model_path", model, "--output_dir", str(work / "a_file")],
         "--output_dir", "is a file"),
        (t, [*train, "--data_dir", str(work / "data"), "--output_dir", "/proc/gd_hardening"],
         "--output_dir", "/proc/gd_hardening"),
        # Super-resolution inputs.
        ("super_res_sample.py", ["--base_samples", str(work / "base.npy")], "--base_samples"),
        ("super_res_sample.py", ["--base_samples", str(work / "base_text.npz")],
         "--base_samples", "not a readable .npz"),
    ])
    assert not (work / "probe_out" / "samples_2x16x16x3.npz").exists()


def test_skip_bad_images_trains_on_the_readable_ones(work, scenarios):
    result, _ = scenarios["skip_bad"]
    assert result["rc"] == 0, result["stderr"]
    assert "leaving out 2 of 10 images" in result["stdout"] and "a_9.png" in result["stdout"]
    assert (work / "skip_bad" / "model000001.pt").exists()


# ------------------------------------------------------------------------------------------------
# Non-finite values


def test_nonfinite_samples_are_an_error_naming_the_samples(work, scenarios):
    result, _ = scenarios["nan_samples"]
    err = assert_one_line_error(result, "non-finite", "indices 0, 1", "nothing was written")
    assert "--cfg_scale" in err
    assert not list((work / "nan_samples").rglob("samples_*.npz"))  # no shard, no npz


def test_require_finite_samples_names_the_bad_indices():
    x = th.zeros(4, 3, 2, 2)
    cli.require_finite_samples(x, [10, 11, 12, 13])
    x[1, 0, 0, 0], x[3, 2, 1, 1] = float("nan"), float("inf")
    with pytest.raises(cli.ScriptError, match=r"2 of 4 samples \(indices 11, 13\)"):
        cli.require_finite_samples(x, [10, 11, 12, 13])


def test_training_refuses_to_save_diverged_weights(tmp_path):
    state = {"w": th.tensor([1.0, float("inf")]), "n": th.tensor([1])}
    with pytest.raises(checkpoints.CheckpointError, match=r"1 of 2 tensors: 'w'"):
        checkpoints.check_finite(state, "of step 7")


# ------------------------------------------------------------------------------------------------
# The output-folder lock


def test_second_run_on_one_folder_is_refused_and_a_stale_lock_taken_over(work, scenarios):
    import socket

    result, before = scenarios["lock_live"]
    assert_one_line_error(result, f"PID {os.getpid()}", socket.gethostname(), "in use")
    assert snapshot(work / "lock_live") == before  # nothing written, the lock left to its owner

    # A dead process's lock (a killed run) is taken over with a log line, released at exit.
    result, _ = scenarios["lock_stale"]
    assert result["rc"] == 0, result["stderr"]
    assert "taking over the stale lock" in result["stdout"]
    folder = work / "lock_stale"
    assert (folder / "model000001.pt").exists() and not (folder / run_lock.LOCK_NAME).exists()
    assert not (folder / ".model000001.pt.abcd1234.tmp").exists()  # stale temp file cleaned


def test_lock_is_exclusive_within_a_host(tmp_path):
    path = run_lock.acquire(str(tmp_path))
    assert json.loads(pathlib.Path(path).read_text())["pid"] == os.getpid()
    assert run_lock.acquire(str(tmp_path)) == path  # this process holds it already
    other = {"pid": os.getppid(), "host": "elsewhere"}
    pathlib.Path(path).write_text(json.dumps(other))
    with pytest.raises(run_lock.LockedError, match="host elsewhere"):
        run_lock.acquire(str(tmp_path))
    run_lock.release(path)  # not ours any more: left alone
    assert os.path.exists(path)


# ------------------------------------------------------------------------------------------------
# Resuming: fall-back, finished runs, progress.csv, no good file removed


def test_auto_resume_falls_back_to_the_newest_complete_checkpoint(work, scenarios):
    result, before = scenarios["fallback"]
    out, run_dir = result["stdout"], work / "fallback"
    assert result["rc"] == 0, result["stderr"]
    assert "skipping" in out and "model000004.pt" in out and "truncated or corrupt" in out
    assert "resuming from" in out and "model000002.pt" in out
    after = snapshot(run_dir)
    for name in ("model000002.pt", "opt000002.pt", "ema_0.9999_000002.pt", "model000003.pt"):
        assert after[name] == before[name], f"{name} was changed"
    # Steps 3-4 were redone and saved: the cut-off model000004.pt is replaced by a complete one.
    assert checkpoints.checkpoint_problem(str(run_dir / "model000004.pt")) is None
    assert "-9.25" not in (run_dir / "progress.csv").read_text()
    assert "dropped 1 row(s) with step > 2" in out


def test_finished_classifier_run_exits_zero_without_writing(work, scenarios):
    result, before = scenarios["finished"]
    assert result["rc"] == 0, result["stderr"]
    assert "already finished" in result["stdout"]
    after = snapshot(work / "finished")
    assert {k: v for k, v in after.items() if k.endswith(".pt")} == \
        {k: v for k, v in before.items() if k.endswith(".pt")}


def test_full_disk_removes_no_good_file(work, scenarios):
    result, before = scenarios["full_disk"]
    err = assert_one_line_error(result, "cannot write", "No space left on device")
    assert str(work / "full_disk") in err
    after = snapshot(work / "full_disk")
    for name, data in before.items():
        if name.endswith(".pt"):
            assert after.get(name) == data, f"{name} was changed or removed"
    assert not [n for n in after if n.endswith(".tmp")]


def test_atomic_write_failure_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model000001.pt"
    path.write_bytes(b"good")

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(checkpoints.WriteError, match="cannot write .*model000001.pt.*No space"):
        checkpoints.atomic_write(str(path), full)
    assert path.read_bytes() == b"good" and os.listdir(tmp_path) == ["model000001.pt"]


def test_stale_temp_files_of_our_writer_only_are_removed(tmp_path):
    names = [".model000002.pt.k3j_x9az.tmp", ".args.json.abcdefgh.tmp", "notes.tmp",
             ".hidden.tmp", "model000002.pt"]
    for name in names:
        (tmp_path / name).write_text("x")
    removed = checkpoints.remove_stale_temp_files(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == sorted(names[:2])
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])


def test_progress_rows_of_redone_steps_are_dropped(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    try:
        for step in (1, 2, 3, 4):
            logger.logkv("step", step)
            logger.logkv("loss", step / 10)
            logger.dumpkvs()
        assert logger.drop_rows_after("step", 2) == 2
        logger.logkv("step", 3)
        logger.logkv("loss", 0.5)
        logger.dumpkvs()
    finally:
        logger.reset()
    rows = (tmp_path / "progress.csv").read_text().splitlines()
    assert rows[0].split(",") == ["loss", "step"]
    assert [r.split(",")[1] for r in rows[1:]] == ["1", "2", "3"]
    assert rows[-1] == "0.5,3"


# ------------------------------------------------------------------------------------------------
# Silent oddities


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    arr = np.array([[0, 257 * 128, 65535, 257]], dtype=np.uint16).repeat(2, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")  # PIL reads it as a 16/32-bit integer image
    rgb = np.asarray(read_image(str(path)))
    assert rgb.shape == (2, 4, 3)
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 128, 255, 1])
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_sampling_choices_are_not_compared_with_the_run_flags(work, scenarios):
    result, _ = scenarios["warn_only"]
    assert result["rc"] == 0, result["stderr"]
    assert "differ from the run's args.json" not in result["stdout"]
    assert (work / "warn_only" / "samples_2x16x16x3.npz").exists()
