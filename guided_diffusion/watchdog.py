"""A rank that dies or stops answering is named, never waited on forever (foundation layer).

* `guard_collectives()`: a context that turns a failed collective (gloo/NCCL error, or no answer
  within `--dist_timeout`) into `PeerLostError`, one line naming this rank and the ranks that
  never came;
* `checkpoint(step, phase)`: the one seam a long-running loop calls before each part of a step
  that holds collectives: a heartbeat in the process group's store (so a waiting rank can name
  the one that never came) and the test suite's fault injection (`GD_FAULT`), which does nothing
  unless that variable is set.
"""

from __future__ import annotations

import os
import signal

import torch as th

from . import dist_util
from .errors import PeerLostError


class guard_collectives:
    """
    A context that turns a failed collective into `PeerLostError`. gloo and NCCL raise (gloo: at
    once when the peer's socket closes, after the process group's timeout when it just stops
    answering); without this the rank would print a long traceback, or, when the error hits
    inside DDP, sometimes only a backend message without the rank or the timeout.
    """

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not dist_util.is_distributed():
            return False
        errors = tuple(
            getattr(th.distributed, name)
            for name in ("DistError", "DistBackendError", "DistNetworkError")
            if hasattr(th.distributed, name)
        )
        text = str(exc)
        looks_like_comm = isinstance(exc, errors) or any(
            word in text for word in ("Gloo", "gloo", "NCCL", "Connection", "timed out",
                                      "Timed out", "timeout")
        )
        if not isinstance(exc, RuntimeError) or not looks_like_comm:
            return False
        first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
        raise PeerLostError(
            f"rank {dist_util.get_rank()} of {dist_util.get_world_size()}: a collective failed, "
            f"a peer died or did not answer within --dist_timeout "
            f"{dist_util.collective_timeout():g}s{_laggards()}: {first[:300]}"
        ) from exc


_HEARTBEAT = "guided_diffusion/heartbeat/"
_PHASES = ("training", "logging", "saving")


def checkpoint(step: int, phase: str) -> None:
    """
    The loop is about to do `phase` of step `step` (1-based; "training", "logging", "saving"):
    leave a heartbeat, and let a test kill or stop this process here (`inject_fault`).
    """
    # GD_FAULT's "step" point: right after step N, before its logging. Before the heartbeat, so a
    # process stopped there is last seen at the step it finished, behind the ranks that go on.
    inject_fault("step" if phase == "logging" else phase, step)
    _heartbeat(step, phase)


def _heartbeat(step: int, phase: str) -> None:
    """
    Note in the process group's store where this rank is going next (one small write before each
    part of a step that holds collectives), so that a rank left waiting can name the one that
    never came.
    """
    if not dist_util.is_distributed():
        return
    try:
        point = step * len(_PHASES) + _PHASES.index(phase)
        store = th.distributed.distributed_c10d._get_default_store()
        store.set(f"{_HEARTBEAT}{dist_util.get_rank()}", str(point))
    except Exception:  # noqa: BLE001 -- a diagnostic only; the collectives report the failure
        pass


def _laggards() -> str:
    """
    Which ranks stopped answering, from the heartbeats (gloo and NCCL name only this rank): the
    ranks that never reached the point where the others wait. '' when the store cannot tell.
    """
    try:
        store = th.distributed.distributed_c10d._get_default_store()
        points = {}
        for r in range(dist_util.get_world_size()):
            key = f"{_HEARTBEAT}{r}"
            points[r] = int(store.get(key)) if store.check([key]) else -1
    except Exception:  # noqa: BLE001 -- the store may have died with rank 0
        return ""

    def where(point: int) -> str:
        if point < 0:
            return "before the first step"
        step, phase = divmod(point, len(_PHASES))
        return f"step {step}, {_PHASES[phase]}"

    newest = max(points.values())
    behind = sorted(r for r, p in points.items() if p < newest)
    if not behind:
        return ""
    named = ", ".join(f"rank {r} (last at {where(points[r])})" for r in behind)
    return f"; stopped answering: {named}, while the others wait at {where(newest)}"


def inject_fault(where: str, step: int) -> None:
    """
    Test hook: GD_FAULT="kill@save:N" makes this process SIGKILL itself while it writes a
    checkpoint file of step N (bytes written, not yet renamed); "kill@step:N" right after step N
    (before logging it); "stop@step:N" SIGSTOPs it instead (a peer that hangs). "kill@step:N/R" only on rank R; several
    specs are comma-separated. With GD_FAULT_ONCE=FOLDER each fault happens once (a file there
    marks it), so an elastic restart does not die at the same place again.
    """
    specs = os.environ.get("GD_FAULT", "")
    if not specs:
        return
    for spec in filter(None, specs.split(",")):
        action, _, point = spec.partition("@")
        point_where, _, point_step = point.partition(":")
        point_step, _, rank = point_step.partition("/")
        if point_where != where or int(point_step) != step:
            continue
        if rank and int(rank) != dist_util.get_rank():
            continue
        once = os.environ.get("GD_FAULT_ONCE")
        if once:
            os.makedirs(once, exist_ok=True)
            marker = os.path.join(once, spec.replace("@", "_").replace(":", "_").replace("/", "_"))
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
        os.kill(os.getpid(), {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}[action])
