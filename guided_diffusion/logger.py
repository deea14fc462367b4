"""Key-value and text logging with the original's API (`configure`, `logkv`, `logkv_mean`,
`dumpkvs`, `log`, `get_dir`, ...).

Output formats are chosen by name: "stdout" (a table), "log" (`log.txt`), "csv" (`progress.csv`),
"json" (`progress.json`, one object per line) and "tensorboard" (needs the `tensorboard` package).
`configure()` reads the directory from `OPENAI_LOGDIR` and the formats from `OPENAI_LOG_FORMAT`
(rank 0, default "stdout,log,csv") or `OPENAI_LOG_FORMAT_MPI` (other ranks, default "log"), as the
original did; other ranks write to files with a `-rank001` style suffix.

`dumpkvs()` averages the values across ranks (weighted by how many values each rank averaged
with `logkv_mean`) when a process group with several ranks is running: it is then a collective,
so every rank must call it at the same points, as `TrainLoop` does.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import functools
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable

from . import dist_util
from .fileio import atomic_write

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50


class KVWriter:
    def writekvs(self, kvs: dict) -> None:
        raise NotImplementedError


class SeqWriter:
    def writeseq(self, seq: Iterable[str]) -> None:
        raise NotImplementedError


def _format_value(v: Any) -> str:
    if isinstance(v, float) or (hasattr(v, "dtype") and getattr(v, "ndim", 1) == 0):
        return f"{float(v):<8.3g}"
    return str(v)


def _truncate(s: str, width: int = 30) -> str:
    return s if len(s) <= width else s[: width - 3] + "..."


class HumanOutputFormat(KVWriter, SeqWriter):
    """A two-column table of keys and values, plus plain text lines; to a file or a stream."""

    def __init__(self, filename_or_file):
        # sys.stdout is looked up at each write, not kept: a redirection made after the logger
        # was configured (contextlib.redirect_stdout, a test's capture) is followed, and a
        # stream replaced and closed since is never written to.
        self._stdout = filename_or_file is sys.stdout
        if isinstance(filename_or_file, str):
            self._file = open(filename_or_file, "a")
            self.own_file = True
        else:
            self._file = filename_or_file
            self.own_file = False

    @property
    def file(self):
        return sys.stdout if self._stdout else self._file

    def writekvs(self, kvs: dict) -> None:
        rows = [(_truncate(str(k)), _truncate(_format_value(v))) for k, v in kvs.items()]
        if not rows:
            warnings.warn("tried to write an empty key-value dict")
            return
        rows.sort(key=lambda kv: kv[0].lower())
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        rule = "-" * (kw + vw + 7)
        lines = [rule] + [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in rows] + [rule]
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    def writeseq(self, seq: Iterable[str]) -> None:
        self.file.write(" ".join(str(s) for s in seq) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.own_file:
            self.file.close()


def _json_value(v: Any) -> Any:
    if hasattr(v, "dtype"):  # numpy or torch scalars
        return float(v)
    return v


class JSONOutputFormat(KVWriter):
    def __init__(self, filename: str):
        self.file = open(filename, "a")

    def writekvs(self, kvs: dict) -> None:
        self.file.write(json.dumps({k: _json_value(v) for k, v in kvs.items()}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class CSVOutputFormat(KVWriter):
    """One row per dump; a key seen for the first time adds a column (the file is rewritten)."""

    def __init__(self, filename: str):
        self.filename = filename
        self.keys: list[str] = []
        if os.path.exists(filename) and os.path.getsize(filename) > 0:
            # Appending to a resumed run's file: keep its columns.
            with open(filename, newline="") as f:
                self.keys = next(csv.reader(f), [])

    def writekvs(self, kvs: dict) -> None:
        new_keys = sorted(k for k in kvs if k not in self.keys)
        if new_keys or not os.path.exists(self.filename):
            old_rows: list[list[str]] = []
            if os.path.exists(self.filename):
                with open(self.filename, newline="") as f:
                    old_rows = list(csv.reader(f))[1:]
            self.keys.extend(new_keys)
            with open(self.filename, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(self.keys)
                for row in old_rows:
                    w.writerow(row + [""] * (len(self.keys) - len(row)))
        with open(self.filename, "a", newline="") as f:
            csv.writer(f).writerow(
                ["" if kvs.get(k) is None else _json_value(kvs[k]) for k in self.keys]
            )

    def close(self) -> None:
        pass


class TensorBoardOutputFormat(KVWriter):
    """Scalars to a TensorBoard event file; the step is a running count of dumps."""

    def __init__(self, dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "the 'tensorboard' log format needs the tensorboard package: pip install tensorboard"
            ) from e
        os.makedirs(dir, exist_ok=True)
        self.writer = SummaryWriter(dir)
        self.step = 1

    def writekvs(self, kvs: dict) -> None:
        for k, v in kvs.items():
            try:
                self.writer.add_scalar(k, float(v), self.step)
            except (TypeError, ValueError):
                pass  # only scalars go to TensorBoard
        self.writer.flush()
        self.step += 1

    def close(self) -> None:
        self.writer.close()


def make_output_format(format: str, ev_dir: str, log_suffix: str = "") -> KVWriter:
    """Build the writer named `format` ("stdout", "log", "json", "csv" or "tensorboard")."""
    os.makedirs(ev_dir, exist_ok=True)
    if format == "stdout":
        return HumanOutputFormat(sys.stdout)
    if format == "log":
        return HumanOutputFormat(os.path.join(ev_dir, f"log{log_suffix}.txt"))
    if format == "json":
        return JSONOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.json"))
    if format == "csv":
        return CSVOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.csv"))
    if format == "tensorboard":
        return TensorBoardOutputFormat(os.path.join(ev_dir, f"tb{log_suffix}"))
    raise ValueError(
        f"unknown log format {format!r} (OPENAI_LOG_FORMAT?): use stdout, log, json, csv, tensorboard"
    )


# ================================================================
# The module-level API: everything goes to Logger.CURRENT.
# ================================================================


def logkv(key: str, val: Any) -> None:
    """Record a value for this iteration; a later call with the same key overwrites it."""
    get_current().logkv(key, val)


def logkv_mean(key: str, val: Any, count: int = 1) -> None:
    """Add a value to the running mean of `key` (weighted by `count`) since the last dump."""
    get_current().logkv_mean(key, val, count)


def logkvs(d: dict) -> None:
    for k, v in d.items():
        logkv(k, v)


def dumpkvs() -> dict:
    """Write the recorded values to every output format and clear them; returns what was written."""
    return get_current().dumpkvs()


def getkvs() -> dict:
    return get_current().name2val


def log(*args, level: int = INFO) -> None:
    """Write a line of text to every text output (stdout, log.txt) when `level` is enabled."""
    get_current().log(*args, level=level)


def debug(*args) -> None:
    log(*args, level=DEBUG)


def info(*args) -> None:
    log(*args, level=INFO)


def warn(*args) -> None:
    log(*args, level=WARN)


def error(*args) -> None:
    log(*args, level=ERROR)


def set_level(level: int) -> None:
    get_current().set_level(level)


def set_comm(comm) -> None:
    get_current().set_comm(comm)


def get_dir() -> str | None:
    """The log directory (checkpoints are saved here too)."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextlib.contextmanager
def profile_kv(scopename: str):
    """Add the time spent in the block to the value `wait_{scopename}`."""
    key = "wait_" + scopename
    tstart = time.time()
    try:
        yield
    finally:
        get_current().name2val[key] += time.time() - tstart


def profile(n: str) -> Callable:
    """Decorator: time every call of the function under `wait_{n}`."""

    def decorator(func):
        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            with profile_kv(n):
                return func(*args, **kwargs)

        return wrapped

    return decorator


def get_current() -> "Logger":
    if Logger.CURRENT is None:
        _configure_default_logger()
    return Logger.CURRENT


class Logger:
    DEFAULT = None  # the logger used before configure() is called: stdout only
    CURRENT = None  # the logger the module-level functions write to

    def __init__(self, dir: str | None, output_formats: list, comm=None):
        self.name2val: dict[str, Any] = defaultdict(float)
        self.name2cnt: dict[str, float] = defaultdict(int)
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key: str, val: Any) -> None:
        self.name2val[key] = val

    def logkv_mean(self, key: str, val: Any, count: int = 1) -> None:
        old, cnt = self.name2val[key], self.name2cnt[key]
        self.name2val[key] = old * cnt / (cnt + count) + float(val) * count / (cnt + count)
        self.name2cnt[key] = cnt + count

    def dumpkvs(self) -> dict:
        local = {k: (v, self.name2cnt.get(k, 1)) for k, v in self.name2val.items()}
        gathered = self._gather(local)
        d = _weighted_mean(gathered) if gathered is not None else dict(self.name2val)
        for fmt in self.output_formats:
            if isinstance(fmt, KVWriter) and d:
                fmt.writekvs(d)
        self.name2val.clear()
        self.name2cnt.clear()
        return d

    def _gather(self, local: dict) -> list | None:
        """Every rank's (value, count) dicts, or None when running alone."""
        if self.comm is not None:  # an mpi4py communicator passed by the caller
            return self.comm.allgather(local) if self.comm.Get_size() > 1 else None
        if not dist_util.is_distributed():
            return None
        return dist_util.all_gather_objects(local)

    def log(self, *args, level: int = INFO) -> None:
        if self.level <= level:
            for fmt in self.output_formats:
                if isinstance(fmt, SeqWriter):
                    fmt.writeseq(map(str, args))

    def set_level(self, level: int) -> None:
        self.level = level

    def set_comm(self, comm) -> None:
        self.comm = comm

    def get_dir(self) -> str | None:
        return self.dir

    def close(self) -> None:
        for fmt in self.output_formats:
            fmt.close()


def _weighted_mean(per_rank: list) -> dict:
    """Combine every rank's {key: (value, count)} into {key: mean weighted by count}."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, float] = defaultdict(float)
    other: dict[str, Any] = {}
    for d in per_rank:
        for k, (v, c) in d.items():
            try:
                sums[k] += float(v) * c
                counts[k] += c
            except (TypeError, ValueError):
                other.setdefault(k, v)  # strings etc. cannot be averaged: keep rank 0's
    out = {k: sums[k] / counts[k] for k in sums if counts[k] > 0}
    for k, v in other.items():
        out.setdefault(k, v)
    return out


def _rank_from_env() -> int:
    """This process's rank, also before the process group exists (torchrun or MPI variables)."""
    if dist_util.get_world_size() > 1:
        return dist_util.get_rank()
    return dist_util.env_rank()


def configure(
    dir: str | None = None, format_strs: list[str] | None = None, comm=None, log_suffix: str = ""
) -> None:
    """
    Start logging to `dir` (default: `$OPENAI_LOGDIR`, else a new `openai-<time>` temp folder).

    :param format_strs: output formats; default from `$OPENAI_LOG_FORMAT` (rank 0) or
        `$OPENAI_LOG_FORMAT_MPI` (other ranks).
    :param comm: an optional mpi4py communicator to average over instead of torch.distributed.
    :param log_suffix: appended to the file names (other ranks add `-rank00N`).
    """
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR")
    if dir is None:
        stamp = datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        dir = os.path.join(tempfile.gettempdir(), stamp)
    dir = os.path.expanduser(dir)
    os.makedirs(dir, exist_ok=True)

    rank = _rank_from_env()
    if rank > 0:
        log_suffix = f"{log_suffix}-rank{rank:03d}"
    if format_strs is None:
        if rank == 0:
            format_strs = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
        else:
            format_strs = os.getenv("OPENAI_LOG_FORMAT_MPI", "log").split(",")
    format_strs = [f for f in format_strs if f]
    output_formats = [make_output_format(f, dir, log_suffix) for f in format_strs]

    if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
    Logger.CURRENT = Logger(dir=dir, output_formats=output_formats, comm=comm)
    if output_formats:
        log(f"Logging to {dir}")


def drop_rows_after(key: str, value: float) -> int:
    """
    Drop the rows of the current logger's CSV file (progress.csv) whose `key` column exceeds
    `value`, atomically: on resume from step S the rows of steps after S were logged by the killed
    run and are logged again. Rows without the key are kept.

    :return: the number of rows dropped.
    """
    dropped = 0
    for fmt in get_current().output_formats:
        if not isinstance(fmt, CSVOutputFormat) or not os.path.exists(fmt.filename):
            continue
        with open(fmt.filename, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or key not in rows[0]:
            continue
        col = rows[0].index(key)

        def keep(row: list[str]) -> bool:
            try:
                return float(row[col]) <= value
            except (IndexError, ValueError):
                return True

        kept = [rows[0]] + [r for r in rows[1:] if keep(r)]
        if len(kept) == len(rows):
            continue
        dropped += len(rows) - len(kept)
        text = io.StringIO()
        csv.writer(text).writerows(kept)
        atomic_write(fmt.filename, lambda f, t=text.getvalue(): f.write(t.encode("utf-8")))
    if dropped:
        log(f"dropped {dropped} row(s) with {key} > {value} from progress.csv: those steps are "
            "redone from the checkpoint")
    return dropped


def _configure_default_logger() -> None:
    Logger.DEFAULT = Logger(dir=None, output_formats=[HumanOutputFormat(sys.stdout)])
    Logger.CURRENT = Logger.DEFAULT


def reset() -> None:
    """Go back to the stdout-only default logger."""
    if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
    Logger.CURRENT = None
    _configure_default_logger()
    log("Reset logger")


@contextlib.contextmanager
def scoped_configure(dir: str | None = None, format_strs: list[str] | None = None, comm=None):
    """Log to `dir` inside the block, then return to the previous logger."""
    prev = Logger.CURRENT
    configure(dir=dir, format_strs=format_strs, comm=comm)
    try:
        yield
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = prev
