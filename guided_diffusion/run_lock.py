"""One training run per output folder: a lock file that names its holder.

Two runs writing one folder overwrite each other's checkpoints and interleave `progress.csv`.
`acquire(folder)` creates `folder/run.lock` exclusively (O_EXCL: of two racing runs exactly one
wins) holding the owner's PID, host, boot id and the time it was taken; a second run is refused
with a message naming them. A lock whose owner is gone on this host (a killed run: its PID is dead, was
reused by a process started after the lock, or the host rebooted) is taken over with a log line;
a lock from another host cannot be checked from here, so it is refused and named (delete it by
hand once that run is gone). The lock is removed when the process exits normally.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import time

from . import logger

LOCK_NAME = "run.lock"


class LockedError(RuntimeError):
    """The folder is in use by another live run."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _boot_id() -> str | None:
    """This boot's id (Linux): a lock written before a reboot names no live process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, Linux /proc), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may
        with open("/proc/stat") as f:                     # hold spaces and parentheses
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(owner: dict) -> bool:
    """
    Whether the process a lock names (on this host) still runs: its PID is alive, this is the
    boot it was written in, and that PID's process started before the lock was written (else
    the PID was reused by another process after the owner was killed).
    """
    pid = owner.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid):
        return False
    boot = owner.get("boot_id")
    if boot is not None and _boot_id() is not None and boot != _boot_id():
        return False
    started, written = _process_start(pid), owner.get("started")
    if started is not None and isinstance(written, (int, float)) and started > written + 2.0:
        return False  # 2 s: the start time's clock-tick rounding and btime's whole seconds
    return True


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}  # a lock cut short while being written: no live owner to name


def acquire(folder: str) -> str:
    """
    Take the lock of `folder` for this process (call on rank 0 only), released at exit.

    :return: the lock file's path.
    :raises LockedError: naming the PID and host of the live run that holds it.
    """
    path = os.path.join(folder, LOCK_NAME)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
          "boot_id": _boot_id()}
    for _ in range(2):  # the second try follows the removal of a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            pid, host = owner.get("pid"), owner.get("host")
            if pid == me["pid"] and host == me["host"]:
                return path  # this process already holds it (a second run in one process)
            if host == me["host"] and isinstance(pid, int) and pid != me["pid"] \
                    and _owner_alive(owner):
                raise LockedError(
                    f"--output_dir {folder!r} is in use by another training run (PID {pid} on "
                    f"{host}, lock {path}); wait for it or pick another --output_dir") from None
            if host not in (None, me["host"]):
                raise LockedError(
                    f"--output_dir {folder!r} is locked by a run on host {host} (PID {pid}); "
                    f"if that run is gone, remove {path}") from None
            logger.log(f"taking over the stale lock {path} of PID {pid} on {host} "
                       "(that process is gone, or the PID now belongs to a later process)")
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release, path, me["pid"])
        return path
    raise LockedError(f"--output_dir {folder!r}: cannot take the lock {path} (another run "
                      "took it at the same moment)")


def release(path: str, pid: int | None = None) -> None:
    """Remove the lock file if this process (`pid`, default: this one) still holds it."""
    owner = _read(path)
    if owner.get("pid") == (pid or os.getpid()) and owner.get("host") == socket.gethostname():
        try:
            os.remove(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
