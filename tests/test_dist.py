"""dist_util: two-rank training under torchrun and under mpiexec ends with identical parameters on
every rank; a plain process is a group of one; checkpoint loading refuses pickles and names
files."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch as th
import torch.distributed as dist

from guided_diffusion import dist_util
from guided_diffusion.checkpoints import CheckpointError

ROOT = pathlib.Path(__file__).resolve().parent.parent
HELPER = ROOT / "tests" / "helpers" / "train_ranks.py"
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # A launcher's variables in the test's own environment would confuse the children.
    for var in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE",
                "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"]:
        env.pop(var, None)
    return env


def _run(cmd, out_dir):
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [th.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _assert_ranks_agree(results):
    r0, r1 = results
    assert r0["world"] == r1["world"] == 2
    # Different init seeds and different data on each rank, yet the same weights: sync_params at
    # start and DDP's gradient all-reduce at every step.
    assert r0["moved"] > 0 and r1["moved"] > 0
    assert all(th.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    # Rank 0 wrote the checkpoint; every rank read it back through the collective loader.
    for r in results:
        assert all(th.equal(a, b) for a, b in zip(r["saved"], r0["params"]))
    # logkv_mean is averaged over ranks: rank r logged r.
    assert r0["rank_mean"] == r1["rank_mean"] == 0.5
    # resume_checkpoint="auto" found model000002.pt on both ranks and trained one more step.
    assert r0["resume_step"] == r1["resume_step"] == 2
    assert all(th.equal(a, b) for a, b in zip(r0["resumed_params"], r1["resumed_params"]))
    assert all(th.equal(a, b) for a, b in zip(r0["resumed_ema"], r1["resumed_ema"]))


def test_torchrun_two_ranks_end_with_identical_parameters(tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={_free_port()}", str(HELPER), str(tmp_path),
    ]
    _assert_ranks_agree(_run(cmd, tmp_path))
    assert (tmp_path / "log" / "model000003.pt").exists()


def test_mpiexec_two_ranks_end_with_identical_parameters(tmp_path):
    # The mpich wheel puts mpiexec beside the interpreter (do not resolve the venv's symlink).
    mpiexec = pathlib.Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}: pip install mpich mpi4py")
    pytest.importorskip("mpi4py", reason="pip install mpi4py (the mpi extra)")
    cmd = [str(mpiexec), "-n", "2", sys.executable, str(HELPER), str(tmp_path)]
    _assert_ranks_agree(_run(cmd, tmp_path))


@pytest.fixture
def plain_group():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this test process")
    dist_util.setup_dist()
    yield
    dist_util.cleanup()


def test_plain_process_is_a_group_of_one(plain_group, tmp_path):
    assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    dist.barrier()  # torch.distributed calls written for many ranks still work
    dist_util.setup_dist()  # idempotent
    assert dist_util.get_rank() == 0 and dist_util.get_world_size() == 1
    assert not dist_util.is_distributed()
    x = th.arange(3.0)
    dist_util.sync_params([x])
    assert th.equal(x, th.arange(3.0))
    th.save({"w": th.ones(2)}, tmp_path / "c.pt")
    assert th.equal(dist_util.load_state_dict(str(tmp_path / "c.pt"))["w"], th.ones(2))


class NotATensor:
    pass


def test_load_state_dict_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    th.save({"w": th.ones(1), "obj": NotATensor()}, path)
    # The same error as every other checkpoint read (checkpoints.load_file does the work).
    with pytest.raises(CheckpointError, match="evil.pt.*pickled Python objects"):
        dist_util.load_state_dict(str(path))
    with pytest.raises(ValueError, match="weights_only=False is refused"):
        dist_util.load_state_dict(str(path), weights_only=False)


def test_load_state_dict_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        dist_util.load_state_dict(str(tmp_path / "nope.pt"))


def test_dev_follows_local_rank_within_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(th.cuda, "is_available", lambda: False)
    assert dist_util.dev() == th.device("cpu")
    monkeypatch.setattr(th.cuda, "is_available", lambda: True)
    monkeypatch.setattr(th.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dist_util.dev() == th.device("cuda", 1)
    monkeypatch.setattr(th.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES shows one
    assert dist_util.dev() == th.device("cuda", 0)
