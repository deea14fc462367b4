"""Sharded, resumable sampling (sample_util.sample_and_save): samples go to
{output_dir}/samples_shards/ as they are made; a rerun finishes only the missing or damaged shards
under any process count and batch size, refuses sample-changing flags in one line, and the merged
npz is byte-identical whatever the kill/resume history, with memory bounded by a shard.

The first tests run in-process on a fake sampler whose pixels are a known function of (seed, i);
the last ones run scripts/image_sample.py on a tiny 8 px model (2 steps) under torchrun and kill it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch as th

from conftest import crc32_init_
from evaluations import npz_io
from guided_diffusion import logger, sample_util
from guided_diffusion.cli import ScriptError
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARDS = sample_util.SHARD_FOLDER


# ------------------------------------------------------------------------------------------------
# In-process, on a fake sampler


def _expected(indices, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The fake sampler's output, computed independently: pixel = (7 i + position + seed) % 256."""
    idx = np.asarray(indices, dtype=np.int64)
    pos = np.arange(size * size * 3).reshape(1, size, size, 3)
    return ((idx[:, None, None, None] * 7 + pos + seed) % 256).astype(np.uint8), idx % 10


class FakeSampler:
    """A sample_fn: (indices, seed) -> (uint8 NHWC, labels); records what it was asked for."""

    def __init__(self, size: int = 4):
        self.size, self.indices, self.seeds, self.batches = size, [], set(), []

    def __call__(self, indices, seed):
        self.indices += list(indices)
        self.seeds.add(seed)
        self.batches.append(len(indices))
        images, labels = _expected(indices, seed, self.size)
        return th.from_numpy(images), th.from_numpy(labels)


def _args(out, **overrides) -> argparse.Namespace:
    flags = dict(num_samples=23, shard_size=5, batch_size=3, seed=11, progress=False, grid_size=16,
                 output_dir=str(out), timestep_respacing="2", model_path="model.pt")
    flags.update(overrides)
    return argparse.Namespace(**flags)


def _run(out, fn=None, size=4, **overrides) -> tuple[FakeSampler, str]:
    fn = fn or FakeSampler(size)
    path = sample_util.sample_and_save(fn, _args(out, **overrides), size, with_labels=True)
    return fn, path


def _npz(path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_shards_tile_the_indices_and_merge_into_the_original_npz(tmp_path):
    fn, path = _run(tmp_path / "run")
    # Every index sampled once, in order, in batches of 3 cut at the shard ends.
    assert fn.indices == list(range(23)) and fn.seeds == {11}
    assert fn.batches == [3, 2] * 4 + [3]
    folder = tmp_path / "run" / SHARDS
    names = sorted(n for n in os.listdir(folder) if n.endswith(".npz"))
    assert names == [npz_io.shard_name(a, min(a + 5, 23)) for a in range(0, 23, 5)]
    shard = _npz(folder / "samples_00000010-00000015.npz")
    images, labels = _expected(range(10, 15), 11, 4)
    np.testing.assert_array_equal(shard["arr_0"], images)
    assert shard["arr_1"].dtype == np.int64 and shard["arr_1"].tolist() == labels.tolist()
    # The merged file is the original's: samples_{N}x{H}x{W}x3.npz, arr_0 and arr_1 ...
    assert os.path.basename(path) == "samples_23x4x4x3.npz"
    merged = _npz(path)
    images, labels = _expected(range(23), 11, 4)
    np.testing.assert_array_equal(merged["arr_0"], images)
    np.testing.assert_array_equal(merged["arr_1"], labels)
    assert (tmp_path / "run" / "samples_23x4x4x3.png").exists()
    # ... byte for byte what saving the whole array at once writes.
    whole = sample_util.save_samples(images, labels, out_dir=str(tmp_path / "whole"))
    assert pathlib.Path(whole).read_bytes() == pathlib.Path(path).read_bytes()
    # The evaluator reads the shard folder as the same batch.
    with npz_io.open_image_batch(str(folder)) as reader:
        np.testing.assert_array_equal(reader.read_batch(100), images)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["num_samples"] == 23 and manifest["flags"]["seed"] == 11


def test_rerun_writes_only_missing_and_damaged_shards(tmp_path):
    _, path = _run(tmp_path)
    first = pathlib.Path(path).read_bytes()
    folder = tmp_path / SHARDS
    os.remove(folder / "samples_00000005-00000010.npz")  # missing
    damaged = folder / "samples_00000010-00000015.npz"
    damaged.write_bytes(damaged.read_bytes()[:-40])  # truncated
    wrong = folder / "samples_00000015-00000020.npz"  # complete file, but 4 rows for 5 indices
    sample_util.write_samples_npz(str(wrong), (4, 4, 4, 3), [np.zeros((4, 4, 4, 3), np.uint8)],
                                  np.zeros(4))
    # atomic_write's temporary names: "." + name + "." + mkstemp's 8 characters + ".tmp".
    (folder / ".samples_00000020-00000023.npz.x1abcdef.tmp").write_bytes(b"partial")
    (tmp_path / ".samples_23x4x4x3.npz.x2abcdef.tmp").write_bytes(b"partial merge")
    kept = {n: os.stat(folder / n).st_mtime_ns for n in
            ("samples_00000000-00000005.npz", "samples_00000020-00000023.npz")}
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=["log"]):
        fn, path = _run(tmp_path, batch_size=4)  # another batch size is the same run
    log = (tmp_path / "log" / "log.txt").read_text()
    assert fn.indices == list(range(5, 20)), "only the missing and damaged shards are sampled"
    assert "shards: 2 of 5 complete" in log and "3 to write" in log
    assert len(re.findall(r"damaged \(.*\); sampling it again", log)) == 2, log
    assert kept == {n: os.stat(folder / n).st_mtime_ns for n in kept}
    assert not [n for n in os.listdir(folder) + os.listdir(tmp_path) if n.endswith(".tmp")]
    assert pathlib.Path(path).read_bytes() == first


def test_sample_changing_flags_are_refused_in_one_line(tmp_path):
    fn, _ = _run(tmp_path, seed=-1)
    manifest = json.loads((tmp_path / SHARDS / "manifest.json").read_text())
    seed = manifest["flags"]["seed"]
    assert seed >= 0 and fn.seeds == {seed}, "without --seed one seed is drawn and recorded"
    os.remove(tmp_path / SHARDS / "samples_00000000-00000005.npz")
    fn, _ = _run(tmp_path, seed=-1)  # a rerun without --seed resumes with the recorded one
    assert fn.seeds == {seed} and fn.indices == list(range(5))
    for flag, value, old in [("timestep_respacing", "3", "'2'"), ("seed", seed + 1, str(seed)),
                             ("num_samples", 24, "23"), ("shard_size", 6, "5"),
                             ("model_path", "other.pt", "'model.pt'")]:
        with pytest.raises(ScriptError) as err:
            _run(tmp_path, **{"seed": -1, flag: value})
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"--{flag} is {value!r}, but the samples in ") and \
            f"were made with {old};" in message, message
    # A flag this run has and the recorded one did not (another script's) is named too.
    with pytest.raises(ScriptError, match=r"^--classifier_scale is 1.0, but .* made with None"):
        _run(tmp_path, seed=-1, classifier_scale=1.0)
    # Shards whose flags are unknown are not trusted.
    os.remove(tmp_path / SHARDS / "manifest.json")
    with pytest.raises(ScriptError, match=r"shards without manifest.json"):
        _run(tmp_path, seed=-1)


def test_memory_is_bounded_by_a_shard_not_by_the_samples(tmp_path):
    """The numpy memory of sampling and merging 32 px samples in shards of 100 (300 KB) hardly
    grows from 1,000 to 4,000 samples (3 and 12 MB) and stays a few shards; the same run as one
    shard holds all samples (so the measure would see an implementation that keeps them)."""

    def peak(num_samples: int, shard_size: int) -> int:
        tracemalloc.start()
        try:
            _run(tmp_path / f"{num_samples}-{shard_size}", size=32, num_samples=num_samples,
                 shard_size=shard_size, batch_size=10, grid_size=0)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    sample_bytes = 32 * 32 * 3
    small, large, whole = peak(1000, 100), peak(4000, 100), peak(4000, 4000)
    print(f"peak numpy memory: {small} (1,000 samples), {large} (4,000) in shards of 100, "
          f"{whole} (4,000 in one shard)")
    assert whole >= 4000 * sample_bytes
    # 3,000 more samples (9 MB) add less than a tenth of their bytes (the [N] labels and the
    # fake's records); the peak is a few shards (the shard, a merge read, zip's byte copies).
    assert large - small < 0.1 * 3000 * sample_bytes and large < 6 * 100 * sample_bytes


# ------------------------------------------------------------------------------------------------
# The real script on a tiny model, under torchrun, killed and rerun

TINY = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult",
        "1", "--attention_resolutions", "", "--class_cond", "True", "--num_classes", "4",
        "--diffusion_steps", "50", "--timestep_respacing", "2", "--progress", "False",
        "--seed", "3", "--grid_size", "16"]
NUM_SAMPLES, SHARD_SIZE, BATCH = 2000, 50, 25
NPZ = f"samples_{NUM_SAMPLES}x8x8x3.npz"


def _command(model: str, out, nproc: int = 2, batch: int = BATCH) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, str(ROOT / "scripts" / "image_sample.py"), *TINY, "--model_path", model,
            "--num_samples", str(NUM_SAMPLES), "--shard_size", str(SHARD_SIZE),
            "--batch_size", str(batch), "--output_dir", str(out)]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for var in ("OPENAI_LOGDIR", "GD_TRACEBACK", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    return env


def _script(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr}")
    return proc


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (torchrun starts each rank in a session of its own, so killing
    the launcher's process group would leave the ranks running)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, as a preempted job, and wait until all died."""
    tree = _process_tree(proc.pid)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()

    def alive(pid: int) -> bool:  # a zombie (state Z) is dead, awaiting its new parent's reaping
        try:
            return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in tree):
        assert time.monotonic() < deadline, "a killed rank is still running"
        time.sleep(0.02)


def _shards(folder) -> dict[str, int]:
    """Complete shards (by name) and their mtimes."""
    if not os.path.isdir(folder):
        return {}
    return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)
            if npz_io.SHARD_PATTERN.match(n)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny checkpoint (8 px, 32 channels, 1 res block, 4 classes) and an uninterrupted 2-rank
    run of the command."""
    tmp = tmp_path_factory.mktemp("sharded")
    flags = model_and_diffusion_defaults()
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1",
                 attention_resolutions="", class_cond=True, num_classes=4, diffusion_steps=50)
    model, _ = create_model_and_diffusion(**flags)
    crc32_init_(model)  # non-zero weights: a fresh ADM model outputs zeros
    th.save(model.state_dict(), tmp / "tiny.pt")
    _script(_command(str(tmp / "tiny.pt"), tmp / "ref"))
    return tmp


def test_killed_two_rank_run_resumes_to_a_byte_identical_npz(reference, tmp_path):
    """SIGKILL the whole 2-rank job at three random moments (each after a random number of new
    shards plus a random delay, so mostly mid-shard); every rerun keeps the finished shards, the
    last one writes only what is missing, and the npz equals the uninterrupted run's bytes."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    cmd = _command(str(reference / "tiny.pt"), tmp_path)
    folder = tmp_path / SHARDS
    total = NUM_SAMPLES // SHARD_SIZE
    for kill in range(3):
        before = _shards(folder)
        # Leave work for the later runs: at most a quarter of what remains per run.
        target = len(before) + rng.randint(1, max(1, (total - len(before)) // 4))
        delay = rng.uniform(0.0, 0.1)
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while len(_shards(folder)) < target and proc.poll() is None:
                assert time.monotonic() < deadline, f"no progress (rng seed {seed})"
                time.sleep(0.01)
            time.sleep(delay)
        finally:
            _kill_all(proc)
        assert proc.returncode == -signal.SIGKILL, f"run {kill} ended before the kill ({seed})"
        after = _shards(folder)
        assert all(after[n] == t for n, t in before.items()), "a finished shard was rewritten"
        assert len(after) > len(before), f"run {kill} made no shard (rng seed {seed})"
    assert not (tmp_path / NPZ).exists() and len(_shards(folder)) < total, f"rng seed {seed}"
    before = _shards(folder)
    log = _script(cmd).stdout
    after = _shards(folder)
    assert len(after) == total
    assert f"shards: {len(before)} of {total} complete" in log, log
    assert f"{total - len(before)} to write" in log
    assert all(after[n] == t for n, t in before.items()), "the last run redid finished shards"
    assert (tmp_path / NPZ).read_bytes() == (reference / "ref" / NPZ).read_bytes(), \
        f"rng seed {seed}: the resumed npz differs from the uninterrupted run's"


def test_one_process_at_another_batch_size_differs_only_by_rounding(reference, tmp_path):
    _script(_command(str(reference / "tiny.pt"), tmp_path, nproc=1, batch=10))
    ours, ref = _npz(tmp_path / NPZ), _npz(reference / "ref" / NPZ)
    np.testing.assert_array_equal(ours["arr_1"], ref["arr_1"])
    diff = np.abs(ours["arr_0"].astype(int) - ref["arr_0"].astype(int))
    # Batched convolutions round differently at another batch size; nothing else differs.
    print(f"pixels differing: {(diff > 0).sum()} of {diff.size}, max {diff.max()}")
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_script_refuses_a_changed_flag_in_one_line(reference):
    cmd = _command(str(reference / "tiny.pt"), reference / "ref", nproc=1)
    cmd[cmd.index("--timestep_respacing") + 1] = "3"
    before = _shards(reference / "ref" / SHARDS)
    proc = _script(cmd, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: --timestep_respacing is '3', but the samples in "), lines
    assert "were made with '2'" in lines[0]
    assert _shards(reference / "ref" / SHARDS) == before
