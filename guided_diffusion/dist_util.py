"""Process-group setup that hides how the job was launched.

The original ran every job under MPI (`mpiexec -n 8 python scripts/...`) and derived the GPU from
`rank % 8`. Here three launches work the same way for the code above this module:

* `torchrun --nproc_per_node=N scripts/...`: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR come from
  the environment (`init_method="env://"`).
* `mpiexec -n N python scripts/...`: rank and world size come from mpi4py (imported only in this
  case, so mpi4py stays optional); rank 0 picks a free TCP port and broadcasts its address over MPI.
  The local rank is the rank within the node's shared-memory communicator, so nodes may hold any
  number of processes.
* `python scripts/...`: a one-rank group on an in-memory store, so `torch.distributed` calls
  (`get_rank`, `barrier`, `all_gather`, ...) work unchanged in a single process.

Across nodes, torchrun's rendezvous (`--nnodes 2 --rdzv_backend c10d --rdzv_endpoint HOST:PORT`)
and mpiexec (rank 0's host name, or MASTER_ADDR, is the meeting point) both work.

Every collective has a timeout (`setup_dist(timeout=...)`, the scripts' `--dist_timeout`): a rank
whose peer died or stopped answering gets an error instead of waiting forever.

NCCL is used when CUDA is available, gloo otherwise. Every helper below also works when
`setup_dist()` was never called (as in unit tests): it then behaves as a single process.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any, Iterable

import torch as th
import torch.distributed as dist

from .fileio import read_bytes, torch_load_bytes

# Environment variables that MPI launchers set in each process (MPICH/Hydra, Open MPI, PMIx,
# MVAPICH, Intel MPI). Their presence means "launched by mpiexec"; we never import mpi4py otherwise.
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def _int_from_env(names: Iterable[str], default: int) -> int:
    """The first of the environment variables `names` that holds an integer, else `default`."""
    for var in names:
        try:
            return int(os.environ[var])
        except (KeyError, ValueError):
            pass
    return default


def env_rank() -> int:
    """This process's rank from the launcher's variables (torchrun's RANK or MPI's), also before
    the process group exists; 0 when launched plainly."""
    return _int_from_env(("RANK", *_MPI_RANK_VARS), 0)


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _mpi_world_size_from_env() -> int:
    return _int_from_env(_MPI_SIZE_VARS, 1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# The process group's timeout in seconds (torch's own default for gloo: 30 minutes).
DEFAULT_TIMEOUT_S = 1800.0
_timeout_s = DEFAULT_TIMEOUT_S


def collective_timeout() -> float:
    """The seconds a collective waits for its peers before it fails."""
    return _timeout_s


def _backend() -> str:
    return "nccl" if th.cuda.is_available() else "gloo"


def setup_dist(timeout: float | None = None) -> None:
    """
    Join (or create) the default process group; safe to call more than once.

    :param timeout: seconds a collective waits for the other ranks before it raises (None: 30
        minutes). Under NCCL the error also needs torch's async error handling, on by default.

    Under torchrun the environment describes the group; under mpiexec mpi4py does; a plain process
    becomes a group of one. Sets `LOCAL_RANK` in the environment when it was not set, so `dev()`
    picks this process's GPU.
    """
    global _timeout_s
    if dist.is_initialized():
        return
    if timeout is not None:
        if timeout <= 0:
            raise ValueError(f"--dist_timeout must be > 0 seconds, got {timeout}")
        _timeout_s = float(timeout)
    pg_timeout = datetime.timedelta(seconds=_timeout_s)
    backend = _backend()
    if _launched_by_torchrun():
        os.environ.setdefault("LOCAL_RANK", "0")
        _set_cuda_device()
        _init_from_torchrun(backend, pg_timeout)
    elif _mpi_world_size_from_env() > 1:
        _init_from_mpi(backend, pg_timeout)
    else:
        os.environ.setdefault("LOCAL_RANK", "0")
        _set_cuda_device()
        # An in-memory store: no port to pick, nothing for other processes to find.
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=pg_timeout
        )


def _init_from_torchrun(backend: str, timeout: datetime.timedelta) -> None:
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        return
    # After an elastic restart (--max-restarts) the workers meet again in the agent's store,
    # which still holds the dead group's gloo/NCCL addresses under the same keys: a fast rank
    # may read them and fail with "connection refused". A prefix per restart keeps the groups
    # apart.
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend=backend, store=dist.PrefixStore(f"guided_diffusion/attempt{attempt}", store),
        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout,
    )


def _init_from_mpi(backend: str, timeout: datetime.timedelta) -> None:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(
            "this process was started by mpiexec (found "
            f"{[v for v in _MPI_SIZE_VARS if v in os.environ]} in the environment) but mpi4py is "
            "not installed: `pip install mpi4py mpich`, or launch with torchrun instead"
        ) from e
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    # The rank among the processes that share this node's memory: no fixed GPUs-per-node.
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    os.environ.setdefault("LOCAL_RANK", str(node.Get_rank()))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(node.Get_size()))
    if rank == 0:
        host = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.getfqdn())
        port = int(os.environ.get("MASTER_PORT") or _free_port())
        address = (host, port)
    else:
        address = None
    host, port = comm.bcast(address, root=0)
    _set_cuda_device()
    dist.init_process_group(
        backend=backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world,
        timeout=timeout,
    )


def _set_cuda_device() -> None:
    if th.cuda.is_available():
        th.cuda.set_device(dev())


def cuda_settings(tf32: bool = True, benchmark: bool = True) -> None:
    """
    The CUDA math settings of a training or sampling job (they change nothing on the CPU).

    :param tf32: float32 matmuls and convolutions in TF32 (10-bit mantissa) on Ampere and later:
        several times faster. PyTorch < 1.12, which the original ran on, did so for matmuls by
        default; DiT's scripts set it. Off: full float32. (The legacy `allow_tf32` switches: the
        evaluator reads them, and torch refuses to mix them with `fp32_precision`.)
    :param benchmark: cuDNN times its convolution algorithms on the first call of each shape and
        keeps the fastest; worth it where shapes are fixed (a job's batches), at the price of
        run-to-run differences in the last bits.
    """
    th.backends.cuda.matmul.allow_tf32 = bool(tf32)
    th.backends.cudnn.allow_tf32 = bool(tf32)
    th.backends.cudnn.benchmark = bool(benchmark)


def dev() -> th.device:
    """
    The device for this process: `cuda:LOCAL_RANK` (modulo the visible GPUs, so a user's
    `CUDA_VISIBLE_DEVICES` that shows each process one GPU also works), else the CPU.
    """
    if th.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return th.device("cuda", local_rank % th.cuda.device_count())
    return th.device("cpu")


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    return get_rank(), get_world_size()


def get_local_world_size() -> int:
    """The ranks on this node (torchrun's LOCAL_WORLD_SIZE, or mpiexec's node communicator)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def comm_device() -> th.device:
    """Where tensors must be for a collective: the GPU under NCCL, the CPU under gloo."""
    # NCCL only moves CUDA tensors; gloo moves CPU tensors.
    return dev() if dist.get_backend() == "nccl" else th.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank `src`'s `obj` on every rank (a collective: every rank must call it)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def all_gather_objects(obj: Any) -> list:
    """Return the list of every rank's `obj`, in rank order (a collective)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def load_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """
    Load a checkpoint file (a dict of tensors and plain values) with `weights_only=True`.

    A collective in a process group: every rank must call it; rank 0 reads the file once and
    broadcasts its bytes, so every rank gets the same object. If rank 0 cannot read the file,
    every rank raises the same error instead of waiting forever.

    :param path: a local, gs:// or az:// path (anything blobfile reads).
    :param map_location: passed to `torch.load`.
    :raises FileNotFoundError: if there is no such file.
    :raises CheckpointError: if the file needs unsafe unpickling or is not a torch file.
    """
    path = str(path)
    data = _broadcast_bytes(path) if is_distributed() else read_bytes(path)
    return torch_load_bytes(data, path, map_location)


# Checkpoints are broadcast in pieces: NCCL and gloo both handle large messages, but a bounded
# piece keeps the extra device memory on every rank small.
_BROADCAST_CHUNK_BYTES = 1 << 28


def _broadcast_bytes(path: str) -> bytes:
    # Rank 0 reads; the size (or the error) goes out first so no rank waits on bytes that never
    # come.
    header: Any
    data = b""
    rank = dist.get_rank()
    if rank == 0:
        try:
            data = read_bytes(path)
            header = len(data)
        except Exception as e:  # noqa: BLE001 -- sent to every rank, raised there
            header = (type(e).__name__, str(e))
    else:
        header = None
    header = broadcast_object(header)
    if isinstance(header, tuple):
        kind, message = header
        error = FileNotFoundError if kind == "FileNotFoundError" else OSError
        raise error(f"rank 0 could not read checkpoint {path!r}: {kind}: {message}")
    size = header
    device = comm_device()
    out = bytearray(size) if rank != 0 else None
    for start in range(0, size, _BROADCAST_CHUNK_BYTES):
        stop = min(start + _BROADCAST_CHUNK_BYTES, size)
        if rank == 0:
            chunk = th.frombuffer(bytearray(data[start:stop]), dtype=th.uint8).to(device)
        else:
            chunk = th.empty(stop - start, dtype=th.uint8, device=device)
        dist.broadcast(chunk, src=0)
        if out is not None:
            out[start:stop] = chunk.cpu().numpy().tobytes()
    return data if rank == 0 else bytes(out)


def load_state_dict(path: str, **kwargs) -> Any:
    """
    Load a checkpoint read once by rank 0 and broadcast to every rank (the original's name and
    signature; `load_file` does the work).

    This is a collective: every rank must call it, and every rank gets the same tensors. Only
    tensors and plain Python containers are accepted (`torch.load(weights_only=True)`).

    :param path: a local, gs:// or az:// path (anything blobfile reads).
    :param kwargs: `map_location=...` is passed to `torch.load`; `weights_only=False` is refused.
    :return: the loaded object, typically a state_dict.
    """
    if kwargs.pop("weights_only", True) is not True:
        raise ValueError(
            f"load_state_dict({path!r}): weights_only=False is refused; checkpoints must be "
            "plain tensor dicts (unpickling arbitrary objects can run code)"
        )
    return load_file(path, **kwargs)


def sync_params(params: Iterable[th.Tensor]) -> None:
    """Overwrite every rank's tensors with rank 0's (a collective; no-op in a single process)."""
    if not is_distributed():
        return
    with th.no_grad():
        for p in params:
            dist.broadcast(p.data if isinstance(p, th.nn.Parameter) else p, src=0)


def finish_barrier(timeout_s: float = 60.0) -> None:
    """Wait (at most `timeout_s`) until every rank has finished, before the group is torn down.
    A peer that already left (e.g. it reported an error) ends the wait at once; never raises."""
    if not is_distributed():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except Exception:  # noqa: BLE001 -- the work is done; only the tear-down is left
        pass


def cleanup() -> None:
    """Leave the process group (call at the end of a script to exit without warnings)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
