"""The data index and the loader at scale: a restart checks no image again, finds what was added,
changed or removed, rebuilds an index that is damaged or of another folder, refuses an unwritable
index folder in one line; images that fail only at load time are named or skipped; the batches do
not depend on the number of loader workers, also across a resume; the automatic worker count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch as th
from PIL import Image

from guided_diffusion import data_index, image_datasets, logger
from guided_diffusion.image_datasets import DataError, ImageDataset, ResumableLoader, load_data


def write_images(folder, n=6, size=(20, 14)):
    """n noise PNGs of two classes in class folders, ImageNet style (n0/n0_3.png)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = f"n{i % 2}"
        (folder / cls).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / cls / f"{cls}_{i}.png")
    return folder


@pytest.fixture
def data(tmp_path):
    return write_images(tmp_path / "data")


@pytest.fixture
def checks(monkeypatch):
    """Every image the scan opens to check it (workers off, so they are counted here)."""
    seen = []
    real = data_index.check_image
    monkeypatch.setattr(data_index, "check_image",
                        lambda path, check: seen.append((os.path.basename(path), check))
                        or real(path, check))
    return seen


@pytest.fixture
def log(tmp_path):
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=["log"]):
        yield lambda: (tmp_path / "log" / "log.txt").read_text()


def _load(data, index, **kw):
    kw = {"batch_size": 2, "image_size": 8, "deterministic": True, "num_workers": 0, "seed": 0,
          **kw}
    return load_data(data_dir=str(data), index_dir=str(index), **kw)


def test_restart_checks_no_image_again_and_reads_no_image(data, tmp_path, checks, log,
                                                         monkeypatch):
    index = tmp_path / "index"
    first = next(_load(data, index, class_cond=True))
    assert len(checks) == 6 and {c for _, c in checks} == {"header"}
    (path,) = index.iterdir()
    stored = json.loads(path.read_text())
    assert stored["data_dir"] == str(data) and len(stored["files"]) == 6
    assert stored["files"][:2] == ["n0/n0_0.png", "n0/n0_2.png"]  # sorted, depth first
    checks.clear()
    before = path.stat().st_mtime_ns
    # No image is opened before the first batch: not checked, not decoded.
    opened = []
    monkeypatch.setattr(data_index, "open_image", lambda *a: opened.append(a) or pytest.fail())
    monkeypatch.setattr(image_datasets, "open_image", lambda *a: opened.append(a) or pytest.fail())
    loader = _load(data, index, class_cond=True)
    assert checks == [] and opened == []
    assert path.stat().st_mtime_ns == before  # nothing changed: not rewritten
    assert "6 images, none changed" in log()
    monkeypatch.undo()
    again = next(loader)
    assert th.equal(again[0], first[0]) and th.equal(again[1]["y"], first[1]["y"])


def test_restart_finds_an_added_and_a_corrupted_file_and_drops_a_removed_one(
        data, tmp_path, checks, log):
    index = tmp_path / "index"
    _load(data, index)
    checks.clear()
    write_images(tmp_path / "more", n=1)
    os.replace(tmp_path / "more" / "n0" / "n0_0.png", data / "n1" / "n1_9.png")  # added
    (data / "n0" / "n0_2.png").write_bytes(b"\x89PNG\r\n\x1a\n damaged")  # corrupted
    os.remove(data / "n1" / "n1_5.png")  # removed
    with pytest.raises(DataError, match=r"1 of 6 images cannot be read: .*n0/n0_2.png"):
        _load(data, index)
    assert sorted(checks) == [("n0_2.png", "header"), ("n1_9.png", "header")]
    assert "checked 2 of 6 images (header), 1 removed" in log()
    # The verdicts were written before the refusal: the next start checks nothing again ...
    checks.clear()
    loader = _load(data, index, skip_bad_images=True)
    assert checks == [] and "leaving out 1 of 6 images" in log()
    # ... and trains on the 5 readable ones, the added one among them.
    assert [os.path.basename(p) for p in loader.dataset.local_images] == [
        "n0_0.png", "n0_4.png", "n1_1.png", "n1_3.png", "n1_9.png"]


def test_a_file_changed_in_place_is_checked_again(data, tmp_path, checks):
    index = tmp_path / "index"
    _load(data, index)
    checks.clear()
    target = data / "n1" / "n1_3.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size, newer
    _load(data, index)
    assert checks == [("n1_3.png", "header")]


def test_full_check_reopens_header_verdicts_once(data, tmp_path, checks):
    index = tmp_path / "index"
    _load(data, index)
    checks.clear()
    _load(data, index, check="full")
    assert len(checks) == 6 and {c for _, c in checks} == {"full"}
    checks.clear()
    _load(data, index, check="header")  # a full verdict answers a header check too
    _load(data, index, check="full")
    assert checks == []


def test_an_index_of_another_folder_is_rebuilt(data, tmp_path, checks, log):
    index = tmp_path / "index"
    other = write_images(tmp_path / "other", n=4)
    _load(other, index)
    # Another folder's index under this folder's name (e.g. a copied cache folder).
    os.replace(data_index.index_path(str(index), str(other)),
               data_index.index_path(str(index), str(data)))
    checks.clear()
    loader = _load(data, index)
    assert len(checks) == 6 and len(loader.dataset) == 6
    assert f"belongs to the folder '{other}'" in log() and "rebuilding it" in log()
    stored = json.loads(open(data_index.index_path(str(index), str(data))).read())
    assert stored["data_dir"] == str(data)


@pytest.mark.parametrize("damage", [
    b"",  # empty (a crash before the atomic writer existed)
    b'{"format": 1, "data_dir": "x", "files": ["a.png"',  # truncated
    b"\x00\xff binary",
    b'{"format": 99}',  # another version
    b'[1, 2, 3]',  # not an object
    b'{"format": 1, "data_dir": "D", "files": ["a.png"], "sizes": [1], "mtimes": [2], '
    b'"checks": ["header"], "errors": []}',  # columns of different lengths
    b'{"format": 1, "data_dir": "D", "files": ["a.png"], "sizes": ["1"], "mtimes": [2], '
    b'"checks": ["header"], "errors": [""]}',  # a size that is not a number
])
def test_an_unreadable_index_is_rebuilt_with_one_log_line(data, tmp_path, checks, log, damage):
    index = tmp_path / "index"
    _load(data, index)
    path = data_index.index_path(str(index), str(data))
    with open(path, "wb") as f:
        f.write(damage.replace(b'"D"', json.dumps(str(data)).encode()))
    checks.clear()
    loader = _load(data, index)
    assert len(checks) == 6 and len(loader.dataset) == 6
    lines = [line for line in log().splitlines() if "is unreadable" in line]
    assert len(lines) == 1 and path in lines[0] and "rebuilding it" in lines[0]
    assert len(json.loads(open(path).read())["files"]) == 6  # rewritten whole


def test_an_unwritable_index_folder_is_one_line_naming_it(data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="a_file") as e:
        _load(data, blocker / "index")
    assert "\n" not in str(e.value)


def test_without_an_index_every_start_checks_every_image(data, checks):
    for _ in range(2):
        load_data(data_dir=str(data), batch_size=2, image_size=8, num_workers=0)
    assert len(checks) == 12


# ------------------------------------------------------------------------------------------------
# Images that fail only at load time (a damaged body behind a good header)


@pytest.fixture
def body_damaged(tmp_path):
    """Four JPEGs; b_1.jpg keeps its headers but loses its body: it passes the header check."""
    folder = tmp_path / "jpegs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a_0.jpg", "b_1.jpg", "c_2.jpg", "d_3.jpg"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / name)
    full = (folder / "b_1.jpg").read_bytes()
    (folder / "b_1.jpg").write_bytes(full[: len(full) // 2])
    assert data_index.check_image(str(folder / "b_1.jpg"), "header") == ""
    assert data_index.check_image(str(folder / "b_1.jpg"), "full") != ""
    return folder


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_failing_at_load_time_is_one_line_naming_it(body_damaged, tmp_path, workers):
    loader = _load(body_damaged, tmp_path / "index", batch_size=4, num_workers=workers)
    with pytest.raises(DataError) as e:
        next(loader)
    message = str(e.value)
    assert "\n" not in message and "b_1.jpg" in message and "--skip_bad_images" in message
    assert "Traceback" not in message


def test_an_image_failing_at_load_time_is_replaced_and_logged_under_skip_bad(
        body_damaged, tmp_path, log):
    loader = _load(body_damaged, tmp_path / "index", batch_size=4, skip_bad_images=True,
                   random_flip=False)
    x, _ = next(loader)
    assert th.equal(x[1], x[2])  # b_1.jpg's place holds the next image, c_2.jpg
    assert "b_1.jpg" in log() and "using the next image instead" in log()


def test_full_check_finds_a_damaged_body_at_the_start(body_damaged, tmp_path):
    with pytest.raises(DataError, match=r"1 of 4 images cannot be read: .*b_1.jpg"):
        _load(body_damaged, tmp_path / "index", check="full")


# ------------------------------------------------------------------------------------------------
# Workers: the same batches for any number, also across a resume


def test_batches_are_the_same_for_0_1_and_2_workers_and_across_a_resume(tmp_path):
    data = write_images(tmp_path / "data", n=10, size=(21, 17))
    paths = image_datasets._list_image_files_recursively(str(data))
    dataset = ImageDataset(12, paths, classes=list(range(10)), random_crop=True)
    runs = {}
    for workers in (0, 1, 2):
        loader = ResumableLoader(dataset, batch_size=3, seed=11, num_workers=workers)
        runs[workers] = [next(loader) for _ in range(7)]  # 3 per epoch: crosses 2 epochs
    for workers in (1, 2):
        for (x, c), (x0, c0) in zip(runs[workers], runs[0]):
            assert th.equal(x, x0) and th.equal(c["y"], c0["y"]), workers
    assert not th.equal(runs[0][0][0], runs[0][3][0])  # epochs differ (shuffled, new crops)
    # Stopped after 4 batches with 2 workers, resumed with 1: the uninterrupted stream.
    first = ResumableLoader(dataset, batch_size=3, seed=11, num_workers=2)
    for _ in range(4):
        next(first)
    resumed = ResumableLoader(dataset, batch_size=3, seed=0, num_workers=1)
    resumed.load_state_dict(first.state_dict())
    for k in range(4, 7):
        x, c = next(resumed)
        assert th.equal(x, runs[0][k][0]) and th.equal(c["y"], runs[0][k][1]["y"]), k


def test_the_scan_in_worker_processes_gives_the_same_verdicts(body_damaged):
    paths = sorted(str(p) for p in body_damaged.iterdir()) * 40  # 160: three chunks
    inline = data_index.check_images(paths, "full", num_workers=0)
    assert data_index.check_images(paths, "full", num_workers=2) == inline
    assert [bool(v) for v in inline[:4]] == [False, True, False, False]


def test_the_scan_in_worker_processes_leaves_the_global_rngs_alone(body_damaged):
    """The training run's noise comes from torch's global RNG: scanning with worker processes
    must not draw from it (it did, so 0 and 1 workers trained to different weights)."""
    paths = sorted(str(p) for p in body_damaged.iterdir()) * 40
    th.manual_seed(0)
    before = th.get_rng_state()
    data_index.check_images(paths, "header", num_workers=2)
    assert th.equal(th.get_rng_state(), before)


@pytest.mark.parametrize("cpus,local_ranks,expected", [
    (2, 1, 1),  # this machine: one worker beside the rank
    (1, 1, 0),  # the rank reads itself
    (2, 2, 0),
    (16, 1, 8),  # at most 8
    (96, 8, 8),  # 12 CPUs per GPU: 8 workers
    (32, 8, 3),
])
def test_default_workers_follow_cpus_and_ranks_per_node(monkeypatch, cpus, local_ranks, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert image_datasets.default_num_workers() == expected


def test_num_workers_flag_is_refused_below_minus_one():
    proc = subprocess.run(
        [sys.executable, "scripts/image_train.py", "--num_workers", "-2"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode != 0 and "--num_workers" in proc.stderr and ">= 0, or -1" in proc.stderr


# ------------------------------------------------------------------------------------------------
# Two ranks (torchrun, gloo): each checks a disjoint share, all get the same listing


RANK_SCRIPT = """
import json, os, sys
from guided_diffusion import data_index, dist_util
dist_util.setup_dist()
rank = dist_util.get_rank()
seen = []
real = data_index.check_image
data_index.check_image = lambda path, check: seen.append(os.path.basename(path)) or real(path, check)
try:
    listing = data_index.build_listing(sys.argv[1], sys.argv[2], "header", num_workers=0)
    out = {"seen": seen, "files": listing.files, "bad": listing.bad,
           "world": dist_util.get_world_size()}
except OSError as e:
    out = {"error": str(e)}
with open(os.path.join(sys.argv[3], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
dist_util.cleanup()
"""


def _two_ranks(data, index, out) -> list[dict]:
    script = out / "ranks.py"
    script.write_text(RANK_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE",
                "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", str(script), str(data),
         str(index), str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_check_disjoint_shares_and_agree(data, tmp_path):
    (data / "n0" / "n0_2.png").write_bytes(b"not a png")
    r0, r1 = _two_ranks(data, tmp_path / "index", tmp_path)
    assert r0["world"] == r1["world"] == 2
    assert len(r0["seen"]) == len(r1["seen"]) == 3 and not set(r0["seen"]) & set(r1["seen"])
    assert r0["files"] == r1["files"] and len(r0["files"]) == 6
    assert r0["bad"] == r1["bad"] and list(r0["bad"]) == ["n0/n0_2.png"]
    assert len(os.listdir(tmp_path / "index")) == 1  # rank 0 wrote it, nothing else


def test_listing_in_threads_keeps_the_order_and_each_files_stamp(tmp_path):
    """Above 1000 files the stats run in threads: each file still gets its own size and time."""
    for d in ("b", "a"):
        (tmp_path / d).mkdir()
        for i in range(700):
            (tmp_path / d / f"{i:04d}.PNG").write_bytes(b"x" * (i % 13))  # names only: no image
    (tmp_path / "a" / "notes.txt").write_text("not listed")
    listed = data_index.list_images(str(tmp_path), threads=3)
    expected = [f"{d}/{i:04d}.PNG" for d in ("a", "b") for i in range(700)]
    assert [rel for rel, _, _ in listed] == expected
    for rel, size, mtime in listed:
        st = os.stat(tmp_path / rel)
        assert (size, mtime) == (st.st_size, st.st_mtime_ns)


def test_an_error_on_rank_zero_reaches_the_other_rank_at_once(data, tmp_path):
    """An unwritable index folder fails on rank 0; rank 1 gets the message, it does not wait."""
    (tmp_path / "a_file").write_text("x")
    r0, r1 = _two_ranks(data, tmp_path / "a_file" / "index", tmp_path)
    assert "a_file" in r0["error"] and r1["error"].startswith("rank 0: ")
    assert "a_file" in r1["error"] and "\n" not in r1["error"]
