"""Files, read safely and written atomically: the one place for both (foundation layer).

* **Read** (`read_bytes`, `torch_load_bytes`, `file_sha256`): a checkpoint is parsed with
  `torch.load(weights_only=True)`, so a file from a stranger can never run code; every failure is
  one `CheckpointError` naming the file. `dist_util.load_file` adds the collective read (rank 0
  reads, every rank gets the bytes).
* **Write** (`atomic_write`, `save_atomic`): a file is complete or absent, never partial; the
  previous version stays until the new one is whole.
* **Clean** (`remove_stale_temp_files`): the temporaries of writes that a killed process left.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tempfile
from typing import IO, Any, Callable

import blobfile as bf
import torch as th

from .errors import CheckpointError, WriteError

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_LEGACY_MAGIC = b"\x80"  # the older format is a pickle stream (protocol >= 2)


# ------------------------------------------------------------------------------------------------
# Read


def read_bytes(path: str) -> bytes:
    """The bytes of a local, gs:// or az:// file (anything blobfile reads)."""
    with bf.BlobFile(path, "rb") as f:
        return f.read()


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file's bytes (read in chunks: a 2 GB checkpoint costs seconds,
    not 2 GB of memory). What a run records to know a file by its content, not its path."""
    digest = hashlib.sha256()
    with bf.BlobFile(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def torch_load_bytes(data: bytes, path: str, map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)` of a file's bytes; every failure a `CheckpointError`
    naming `path`."""
    if not data:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): an interrupted copy or "
                              "write? Use another checkpoint")
    if not data.startswith((_ZIP_MAGIC, _LEGACY_MAGIC)):
        raise CheckpointError(f"{path!r} is not a torch checkpoint: it starts with {data[:12]!r}, "
                              "not a torch.save archive")
    try:
        return th.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # Name the offending class, not torch's advice (which offers weights_only=False).
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        reason = [f"it holds a {found.group(1)}"] if found else []
        raise CheckpointError(
            f"refusing to load checkpoint {path!r}: it cannot be read with "
            "torch.load(weights_only=True) because it contains pickled Python objects besides "
            "tensors (e.g. a whole model saved with torch.save(model)), and unpickling those can "
            "run arbitrary code. If you trust the file, load it yourself and save only "
            "model.state_dict()."
            + (f" ({reason[0]})" if reason else "")
        ) from e
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        # torch's messages for a cut-off archive run on for lines: keep the first sentence.
        reason = (str(e).strip().split(". ")[0] or type(e).__name__).splitlines()[0]
        raise CheckpointError(f"cannot read checkpoint {path!r} ({len(data)} bytes): truncated or "
                              f"corrupt ({reason})") from e


# ------------------------------------------------------------------------------------------------
# Write

TEMP_SUFFIX = ".tmp"
# atomic_write's temporary names: "." + the file's name + "." + mkstemp's 8 random characters.
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """
    Call `write(f)` on a binary file so that `path` never holds a partial file: local paths are
    written to a temporary file in the same folder, then renamed over `path`. Object stores
    (gs://, az://) publish an object only once its upload completes, so those are written directly.

    :raises WriteError: naming `path` when the disk is full or the folder read-only; the previous
        version of `path`, if any, is untouched.
    """
    if "://" in path:
        with bf.BlobFile(path, "wb") as f:
            write(f)
        return
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                   suffix=TEMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        # Only our temporary file goes: the previous `path` (a good checkpoint) is never touched.
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            reason = e.strerror or str(e)
            raise WriteError(e.errno, f"cannot write {path!r}: {reason} (the previous version, "
                                      "if any, is kept)") from e
        raise


def save_atomic(obj: Any, path: str) -> None:
    """`torch.save` through `atomic_write`."""
    atomic_write(path, lambda f: th.save(obj, f))


def remove_stale_temp_files(folder: str, prefix: str = "") -> list[str]:
    """
    Remove the temporary files `atomic_write` leaves behind when a process is killed mid-write
    (the one cleaner: training folders, sample shard folders, sample output folders). Call it
    only while no other process writes those files (the run's lock is held, or the names are
    this process's own).

    :param prefix: only temporaries of files whose names start with it (e.g. "samples_").
    :return: the removed paths.
    """
    if "://" in folder or not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if _TEMP_RE.match(name) and name.startswith("." + prefix) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed
