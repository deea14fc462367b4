"""The data index: a data folder's image listing and each image's check verdict, written once.

Checking every image before training finds a corrupt file at the start instead of hours in, but
decoding ImageNet's 1.28M JPEGs costs about an hour of one process at every start. So the
listing and the verdicts go to one file per data folder,

    {index_dir}/data_index_{digest of the folder's absolute path}.json

keyed by each image's (path relative to the folder, size, modification time): a later start
lists the folder (names and `stat`s, no image reads), checks only the images that are new or
changed since the index was written, drops the removed ones, and rewrites the file (atomically)
only when something changed. An index that is unreadable, of another format or of another folder
is rebuilt, with one logged line.

Checks: "header" (the default) opens the image and runs PIL's `verify()`, which parses the
headers (PNG: every chunk's CRC) without decoding pixels, about 10x cheaper than a decode; "full"
decodes every pixel. An image with a damaged body can pass the header check: the loader then
meets it at load time (`image_datasets.ImageDataset`), where `--skip_bad_images` replaces it, or
the run stops with one line naming it.

The check is spread over the ranks (each a disjoint share of the images to check, the verdicts
gathered on every rank) and over each rank's worker processes.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import attrgetter

import blobfile as bf
from PIL import Image
import torch
from torch.utils.data import DataLoader, Dataset

from . import dist_util, logger
from .fileio import atomic_write

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")
CHECKS = ("header", "full")  # cheapest first: a "full" verdict also answers "header"
FORMAT = 1  # the index file's layout version
_CHUNK = 64  # images per task handed to a check worker


def is_image_name(name: str) -> bool:
    return name.lower().endswith(_SUFFIXES)


def list_images(data_dir: str, threads: int = 8) -> list[tuple[str, int, int]]:
    """
    Every image under `data_dir`, depth first with each folder's entries in sorted name order
    (the original's `_list_image_files_recursively` order). No image is opened: the names come
    from the folders, sizes and times from `stat` (in `threads` threads: a network file system
    answers many at once).

    :return: [(path relative to data_dir, size in bytes, modification time in ns)]; object
        stores (gs://, az://) report their modification times in microseconds.
    """
    rels: list[str] = []
    paths: list[str] = []
    remote = "://" in data_dir

    def walk(folder: str, prefix: str) -> None:
        if remote:
            entries = sorted(bf.scandir(folder), key=_by_name)
        else:
            with os.scandir(folder) as it:
                entries = sorted(it, key=_by_name)
        for entry in entries:
            name = entry.name
            if is_image_name(name) and not entry.is_dir():
                rels.append(prefix + name)
                paths.append(entry.path)
            elif entry.is_dir():
                walk(entry.path, prefix + name + "/")

    walk(data_dir, "")
    stamp = _remote_stamp if remote else _local_stamp
    shares = [paths[k::threads] for k in range(threads)] if len(paths) > 1000 else [paths]
    with ThreadPoolExecutor(len(shares)) as pool:
        parts = list(pool.map(lambda share: [stamp(p) for p in share], shares))
    stamps = [None] * len(paths)
    for k, part in enumerate(parts):
        stamps[k::len(shares)] = part
    return [(rel, size, mtime) for rel, (size, mtime) in zip(rels, stamps)]


_SUFFIXES = tuple("." + ext for ext in IMAGE_EXTENSIONS)
_by_name = attrgetter("name")


def _local_stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _remote_stamp(path: str) -> tuple[int, int]:
    st = bf.stat(path)
    return int(st.size), int(st.mtime * 1e6)


def _open(path: str):
    return bf.BlobFile(path, "rb") if "://" in path else open(path, "rb")


def open_image(path: str, check: str = "full") -> Image.Image:
    """
    Open an image and check it: "header" runs PIL's `verify()` (headers and, for PNG, chunk
    CRCs; the image is not usable afterwards), "full" decodes every pixel (`load()`).

    :raises OSError: naming the file, when it is missing, truncated or not an image.
    """
    try:
        with _open(path) as f:
            image = Image.open(f)
            if check == "header":
                image.verify()
            else:
                image.load()
    except Exception as e:  # noqa: BLE001 -- PIL raises several types; name the file in one
        raise OSError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e
    return image


def check_image(path: str, check: str) -> str:
    """'' when `path` passes `check`, else why not (one short line)."""
    try:
        open_image(path, check)
    except OSError as e:
        return str(e.__cause__ or e).splitlines()[0][:120] or type(e).__name__
    return ""


class _CheckTasks(Dataset):
    """Chunks of images to check, as DataLoader tasks: item k is the verdicts of chunk k."""

    def __init__(self, paths: list[str], check: str):
        self.paths, self.check = paths, check

    def __len__(self) -> int:
        return (len(self.paths) + _CHUNK - 1) // _CHUNK

    def __getitem__(self, k: int) -> list[str]:
        return [check_image(p, self.check) for p in self.paths[k * _CHUNK:(k + 1) * _CHUNK]]


def check_images(paths: list[str], check: str, num_workers: int = 0) -> list[str]:
    """The verdict of each path ('' = readable), in `num_workers` processes (0: this one)."""
    if not paths:
        return []
    tasks = _CheckTasks(paths, check)
    if num_workers == 0:
        chunks = (tasks[k] for k in range(len(tasks)))
    else:
        # A private generator: the workers' base seed is drawn from it, not from torch's global
        # RNG, which the training run's noise comes from (a bit-exact resume depends on it).
        chunks = DataLoader(tasks, batch_size=None, num_workers=min(num_workers, len(tasks)),
                            generator=torch.Generator())
    return [verdict for chunk in chunks for verdict in chunk]


@dataclass
class Listing:
    """A data folder as the index describes it: `files` in listing order (relative paths) and
    `bad`, the unreadable ones with the reason; `checked`: how many were checked this time."""

    data_dir: str
    files: list[str]
    bad: dict[str, str]
    checked: int = 0

    def paths(self, skip_bad: bool = False) -> list[str]:
        """Full paths (without the unreadable ones when `skip_bad`)."""
        base = self.data_dir.rstrip("/")
        return [f"{base}/{rel}" for rel in self.files if not (skip_bad and rel in self.bad)]


def index_path(index_dir: str, data_dir: str) -> str:
    digest = hashlib.sha256(_folder_id(data_dir).encode()).hexdigest()[:16]
    return os.path.join(index_dir, f"data_index_{digest}.json")


def _folder_id(data_dir: str) -> str:
    return data_dir.rstrip("/") if "://" in data_dir else os.path.abspath(data_dir)


def read_index(path: str, data_dir: str) -> dict[str, tuple[int, int, str, str]]:
    """
    The entries of an index file: relative path -> (size, mtime, check, verdict); {} when there
    is none, or (logged) when it is unreadable or belongs to another folder, so it is rebuilt.
    """
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        files, sizes, mtimes, checks, errors = columns = [
            data[k] for k in ("files", "sizes", "mtimes", "checks", "errors")]
        if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) != 1:
            raise ValueError("columns of different lengths")
        # Whole columns at once (an ImageNet index has 1.28M entries; no per-entry loop).
        if not (all(type(v) is str for v in files) and all(type(v) is int for v in sizes)
                and all(type(v) is int for v in mtimes) and set(checks) <= set(CHECKS)
                and all(type(v) is str for v in errors)):
            raise ValueError("an entry of the wrong type")
        entries = dict(zip(files, zip(sizes, mtimes, checks, errors)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        # json.JSONDecodeError is a ValueError; a truncated or hand-edited file lands here.
        logger.log(f"data index {path} is unreadable ({type(e).__name__}: "
                   f"{str(e).splitlines()[0][:100] if str(e) else ''}): rebuilding it")
        return {}
    if data.get("data_dir") != _folder_id(data_dir):
        logger.log(f"data index {path} belongs to the folder {data.get('data_dir')!r}, not "
                   f"{_folder_id(data_dir)!r}: rebuilding it")
        return {}
    return entries


def write_index(path: str, data_dir: str, entries: list[tuple[str, int, int, str, str]]) -> None:
    """Write (atomically) the index of `data_dir`: [(relative path, size, mtime, check, error)]."""
    columns = list(zip(*entries)) if entries else [(), (), (), (), ()]
    data = {"format": FORMAT, "data_dir": _folder_id(data_dir)}
    data.update({k: list(c) for k, c in zip(("files", "sizes", "mtimes", "checks", "errors"),
                                            columns)})
    text = json.dumps(data, separators=(",", ":")).encode()
    atomic_write(path, lambda f: f.write(text))


def build_listing(data_dir: str, index_dir: str | None = None, check: str = "header",
                  num_workers: int = 0) -> Listing:
    """
    The images of `data_dir` and their verdicts, from the index in `index_dir` where it is
    current, checking (spread over ranks and `num_workers` processes per rank) only the images
    that are new or changed since; `index_dir` None: no index, every image is checked.

    Rank 0 lists the folder and reads and writes the index; every rank returns the same Listing.
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    # Without a process group every process is its own rank 0 (tests fake ranks that way).
    rank, world = ((dist_util.get_rank(), dist_util.get_world_size())
                   if dist_util.is_distributed() else (0, 1))
    base = data_dir.rstrip("/")
    path = index_path(index_dir, data_dir) if index_dir else None
    listed, old = [], {}

    def plan() -> list[str]:
        nonlocal listed, old
        listed = list_images(data_dir)
        old = read_index(path, data_dir) if path else {}
        full = check == "full"
        todo = []
        for rel, size, mtime in listed:
            entry = old.get(rel)
            # New, changed (size or time), or checked by headers only when a decode is asked.
            if entry is None or entry[0] != size or entry[1] != mtime or (
                    full and entry[2] != "full"):
                todo.append(rel)
        return todo

    todo = _on_rank_zero(plan)
    mine = todo[rank::world]
    verdicts = dict(zip(mine, check_images([f"{base}/{rel}" for rel in mine], check, num_workers)))
    if world > 1:  # every rank's verdicts, on rank 0
        verdicts = {k: v for part in dist_util.all_gather_objects(verdicts) for k, v in part.items()}

    def merge() -> tuple[list[str], dict[str, str]]:
        if not todo and len(old) == len(listed) and path and os.path.exists(path):
            # Every image is in the index as it was (so none was removed): nothing to write.
            logger.log(f"data index: {len(listed)} images, none changed since {path}")
            return [rel for rel, _, _ in listed], {r: e[3] for r, e in old.items() if e[3]}
        entries = [(rel, size, mtime, check, verdicts[rel]) if rel in verdicts
                   else (rel, size, mtime, *old[rel][2:]) for rel, size, mtime in listed]
        if path:
            removed = len(old) - sum(1 for rel, _, _ in listed if rel in old)
            logger.log(f"data index: checked {len(todo)} of {len(listed)} images ({check}), "
                       f"{removed} removed since the index; writing {path}")
            write_index(path, data_dir, entries)
        return [e[0] for e in entries], {e[0]: e[4] for e in entries if e[4]}

    # The other ranks go on once the index is written (the broadcast waits for it).
    return Listing(data_dir, *_on_rank_zero(merge), checked=len(todo))


def _on_rank_zero(fn):
    """
    `fn()` run on rank 0, its result on every rank. An error there (an unreadable folder, an
    unwritable index folder) is raised on every rank, so no rank waits for rank 0 until the
    collective timeout.
    """
    if not dist_util.is_distributed():
        return fn()
    out = None
    if dist_util.get_rank() == 0:
        try:
            out = ("ok", fn())
        except Exception as e:  # noqa: BLE001 -- whatever it is, the other ranks must not wait
            out = ("error", f"{type(e).__name__}: {e}")
            dist_util.broadcast_object(out)
            raise
    out = dist_util.broadcast_object(out)
    if out[0] == "error":
        raise OSError(f"rank 0: {out[1]}")
    return out[1]
