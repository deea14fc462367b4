"""
Reading and writing the evaluator's .npz batches a slice at a time.

A batch of 50,000 256x256 images is ~10 GB, so, like the original evaluator, we never hold
`arr_0` whole: the .npy member inside the zip is opened, its header parsed, and rows are read from
the member's stream on demand. Writing works the same way in reverse, into a temporary file that
is renamed over the output only once complete.

A batch is either one .npz or a *shard folder*, as the sampling scripts write it: `manifest.json`
(`{"num_samples": N, ...}`) and shards `samples_{start:08d}-{stop:08d}.npz` (stop exclusive),
each with `arr_0` = [n x H x W x 3] uint8 and, when labelled, `arr_1` = [n] int64, tiling [0, N).
Hidden files (`.*.tmp`) are partial writes and are ignored. `open_image_batch()` reads both kinds
as one stream of rows.
"""

from __future__ import annotations

import json
import os
import re
import sys
import zipfile
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image

from guided_diffusion.fileio import atomic_write
from guided_diffusion.image_util import center_crop_arr

IMAGE_KEY = "arr_0"
LABEL_KEY = "arr_1"
SHARD_MANIFEST = "manifest.json"
SHARD_PATTERN = re.compile(r"^samples_(\d{8})-(\d{8})\.npz$")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
# make_reference_batch records how its statistics' features were made; the original's batches
# carry no such key and were made by the TF graph ('tf').
PREPROCESSING_KEY = "preprocessing"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class _RowReader:
    """What both readers share: read_batch() counts rows and refuses past the end (a subclass
    reads `_read(count)` rows), batches() iterates, and `with` closes."""

    rows_read = 0
    max_batch_rows = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, count: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def read_batch(self, n: int) -> np.ndarray | None:
        """:return: the next [min(n, rows left) x ...] rows, or None when all were read."""
        count = min(n, len(self) - self.rows_read)
        if count <= 0:
            return None
        out = self._read(count)
        self.rows_read += count
        self.max_batch_rows = max(self.max_batch_rows, count)
        return out

    def batches(self, n: int) -> Iterator[np.ndarray]:
        while (batch := self.read_batch(n)) is not None:
            yield batch

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NpzArrayReader(_RowReader):
    """
    Stream the rows of one array of an .npz file.

    :param path: the .npz file.
    :param name: the array in it ('arr_0' for images).

    `shape` and `dtype` are known once opened; `read_batch(n)` returns the next <= n rows, None
    at the end. `max_batch_rows` records the most rows ever held at once (tests use it to show
    that the array is never materialised).
    """

    def __init__(self, path: str, name: str = IMAGE_KEY):
        self.path, self.name = path, name
        self.rows_read = 0
        self.max_batch_rows = 0
        self._memory: np.ndarray | None = None
        self._zip = self._member = None
        try:
            self._zip = zipfile.ZipFile(path, "r")
        except (OSError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e})") from e
        member = f"{name}.npy"
        # The names of all arrays in the file.
        self.arrays: list[str] = sorted(n[:-4] for n in self._zip.namelist() if n.endswith(".npy"))
        if member not in self._zip.namelist():
            self.close()
            raise ValueError(f"{path}: no array '{name}' in the npz (it has {self.arrays})")
        self._member = self._zip.open(member, "r")
        version = np.lib.format.read_magic(self._member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._member)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._member)
        else:
            shape, fortran, dtype = None, True, None  # unusual header: fall back to a whole read
        if dtype is not None and dtype.hasobject:
            self.close()
            raise ValueError(f"{path}: '{name}' holds Python objects; refusing to unpickle it")
        if fortran:
            # Column-major data cannot be read row by row; np.savez of normal arrays never
            # writes it, so loading whole here is rare (the original does the same).
            with np.load(path, allow_pickle=False) as z:
                self._memory = z[name]
            shape, dtype = self._memory.shape, self._memory.dtype
        self.shape: tuple = tuple(shape)
        self.dtype: np.dtype = dtype
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def _read(self, count: int) -> np.ndarray:
        if self._memory is not None:
            out = self._memory[self.rows_read:self.rows_read + count]
        else:
            out = np.empty((count,) + self.shape[1:], dtype=self.dtype)
            buffer, filled = memoryview(out.reshape(-1).view(np.uint8)), 0
            while filled < len(buffer):  # a zip stream may return less than asked
                got = self._member.readinto(buffer[filled:])
                if not got:
                    raise ValueError(f"{self.path}: '{self.name}' is truncated after row "
                                     f"{self.rows_read + filled // max(self._row_bytes, 1)}")
                filled += got
        return out

    def close(self) -> None:
        for f in (self._member, self._zip):
            if f is not None:
                f.close()


def shard_name(start: int, stop: int) -> str:
    """:return: the file name of the shard holding samples [start, stop)."""
    return f"samples_{start:08d}-{stop:08d}.npz"


def list_shards(folder: str) -> tuple[int, list[tuple[int, int, str]]]:
    """
    Read a shard folder's manifest and check that its shards tile [0, num_samples).

    :return: (num_samples, [(start, stop, path)] in index order).
    :raises ValueError: in one line naming the folder or file: no or bad manifest, overlapping
                        shards, a shard past num_samples, or the first missing index range.
    """
    manifest = os.path.join(folder, SHARD_MANIFEST)
    if not os.path.isfile(manifest):
        raise ValueError(f"{folder}: a folder without {SHARD_MANIFEST}; expected a shard folder "
                         f"(manifest.json + samples_START-STOP.npz) or an .npz batch")
    try:
        with open(manifest) as f:
            num_samples = json.load(f)["num_samples"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest}: not a JSON object with \"num_samples\" "
                         f"({type(e).__name__}: {e})") from e
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{manifest}: \"num_samples\" is {num_samples!r}; expected a positive "
                         f"integer")
    shards = []
    for name in os.listdir(folder):  # hidden names (.*.tmp) are writes in progress: never matched
        match = SHARD_PATTERN.match(name)
        if match:
            shards.append((int(match.group(1)), int(match.group(2)), os.path.join(folder, name)))
    shards.sort()
    expected = 0  # every index below this is covered
    for start, stop, path in shards:
        if stop <= start:
            raise ValueError(f"{path}: empty index range [{start}, {stop})")
        if start > expected:
            break  # a gap: reported below with the first missing range
        if start < expected:
            raise ValueError(f"{path}: overlaps the shard before it (indices from {start} are "
                             f"already covered up to {expected})")
        if stop > num_samples:
            raise ValueError(f"{path}: ends at {stop}, past num_samples={num_samples} of "
                             f"{manifest}")
        expected = stop
    if expected < num_samples:
        after = [start for start, _, _ in shards if start > expected]
        gap_end = min(after) if after else num_samples
        raise ValueError(f"{folder}: incomplete: samples [{expected}, {gap_end}) of "
                         f"{num_samples} are missing (no {shard_name(expected, gap_end)} or "
                         f"shards covering it)")
    return num_samples, shards


class ShardFolderReader(_RowReader):
    """
    Stream the rows of one array across the shards of a shard folder, in index order.

    The same interface as NpzArrayReader (`shape`, `dtype`, `read_batch`, `batches`): batches
    cross shard boundaries, so a folder yields exactly the batches of the merged .npz, and at
    most one shard is open at a time.

    :param folder: the shard folder.
    :param name: the array ('arr_0' images, 'arr_1' labels).
    :raises ValueError: naming the folder or shard: incomplete folder (see list_shards()),
                        a shard whose row count, row shape or dtype disagrees, labels in some
                        shards only.
    """

    def __init__(self, folder: str, name: str = IMAGE_KEY):
        self.path, self.name = folder, name
        self.rows_read = 0
        self.max_batch_rows = 0
        num_samples, self.shards = list_shards(folder)
        row_shape = dtype = None
        labelled = set()
        for start, stop, path in self.shards:
            with NpzArrayReader(path, name) as shard:  # reads the header only
                labelled.add(LABEL_KEY in shard.arrays)
                if len(shard.shape) < 1 or len(shard) != stop - start:
                    raise ValueError(f"{path}: '{name}' has shape {shard.shape}; its name says "
                                     f"{stop - start} rows")
                if row_shape is None:
                    row_shape, dtype = shard.shape[1:], shard.dtype
                elif (shard.shape[1:], shard.dtype) != (row_shape, dtype):
                    raise ValueError(f"{path}: '{name}' rows are {shard.shape[1:]} {shard.dtype}, "
                                     f"the first shard's {row_shape} {dtype}")
            if LABEL_KEY in shard.arrays and name != LABEL_KEY:
                with NpzArrayReader(path, LABEL_KEY) as labels:
                    if labels.shape != (stop - start,) or labels.dtype.kind not in "iu":
                        raise ValueError(f"{path}: '{LABEL_KEY}' is {labels.shape} {labels.dtype}; "
                                         f"expected [{stop - start}] integer class labels")
        if len(labelled) > 1:
            raise ValueError(f"{folder}: some shards have labels ('{LABEL_KEY}') and some do not")
        self.shape: tuple = (num_samples,) + tuple(row_shape)
        self.dtype: np.dtype = dtype
        self._next_shard = 0
        self._current: NpzArrayReader | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, count: int) -> np.ndarray:
        parts, got = [], 0
        while got < count:  # a batch may end one shard and begin the next
            if self._current is None or self._current.rows_read == len(self._current):
                self.close()  # one shard open at a time
                self._current = NpzArrayReader(self.shards[self._next_shard][2], self.name)
                self._next_shard += 1
            parts.append(self._current.read_batch(count - got))
            got += len(parts[-1])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None


def open_image_batch(path: str, min_images: int = 1) -> NpzArrayReader | ShardFolderReader:
    """
    Open `arr_0` of an evaluator batch (an .npz or a shard folder) and check it is
    [N x H x W x 3] uint8.

    :param min_images: the fewest images accepted (FID needs 2, k-NN precision/recall k + 1).

    :raises ValueError: naming the file and what is wrong.
    """
    if os.path.isdir(path):
        reader = ShardFolderReader(path, IMAGE_KEY)
    elif os.path.isfile(path):
        reader = NpzArrayReader(path, IMAGE_KEY)
    else:
        raise FileNotFoundError(f"{path}: no such batch file or shard folder")
    problem = None
    if len(reader.shape) != 4 or reader.shape[-1] != 3:
        problem = f"has shape {reader.shape}; expected [N x H x W x 3] RGB images"
    elif reader.dtype != np.uint8:
        problem = f"has dtype {reader.dtype}; expected uint8 pixels in [0, 255]"
    elif reader.shape[0] < min_images:
        problem = f"has {reader.shape[0]} image(s); the metrics need at least {min_images}"
    if problem:
        reader.close()
        raise ValueError(f"{path}: '{IMAGE_KEY}' {problem}")
    return reader


def _open_npz(path: str):
    """`np.load` of an .npz (never unpickling); anything else (a .npy, text, a truncated zip) is
    a ValueError naming the file."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''})") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single .npy array, not an .npz file of arrays")
    return z


def read_precomputed_statistics(path: str) -> dict[str, np.ndarray] | None:
    """
    Read the `mu`, `sigma`, `mu_s`, `sigma_s` that the original's reference batches carry.

    :return: the four arrays, or None when the file has none of them (shard folders never do).
    :raises ValueError: when only some are present, or shapes disagree, or values are not finite.
    """
    if os.path.isdir(path):
        return None
    with _open_npz(path) as z:
        present = [k for k in STAT_KEYS if k in z.files]
        if not present:
            return None
        if len(present) != len(STAT_KEYS):
            missing = [k for k in STAT_KEYS if k not in present]
            raise ValueError(f"{path}: has precomputed {present} but not {missing}")
        stats = {k: z[k] for k in STAT_KEYS}
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        mu, sigma = stats[mu_key], stats[sigma_key]
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{path}: '{mu_key}' {mu.shape} and '{sigma_key}' {sigma.shape} are "
                             f"not a [D] mean and [D x D] covariance")
        for key in (mu_key, sigma_key):
            value = stats[key]
            if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
                raise ValueError(f"{path}: '{key}' contains NaN/inf or is not floating point")
    return stats


def statistics_preprocessing(path: str) -> str:
    """:return: how the features of a batch's precomputed statistics were made ('tf' unless the
    file records otherwise under 'preprocessing')."""
    with _open_npz(path) as z:
        if PREPROCESSING_KEY not in z.files:
            return "tf"
        return str(z[PREPROCESSING_KEY])


def _member_info(name: str) -> zipfile.ZipInfo:
    """The zip entry of array `name`, dated 1980-01-01 (zip's epoch) rather than now: the same
    arrays then make the same bytes, e.g. a merged sample file whatever its run's history."""
    return zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))


class NpzArrayWriter:
    """
    Write an .npz whose first array is streamed in row batches (then small arrays added whole).

    It writes to an open file; give it the temporary file of `atomic_write()` (as
    `write_npz_atomically()` does) so that a failed or killed run never leaves a partial .npz
    under the final name nor removes the good file already there.

    :param file: a binary file open for writing (seekable: zip headers are patched after data).
    :param shape: the streamed array's full shape, [N x ...]; exactly N rows must be written.
    :param dtype: its dtype.
    :param name: its name in the .npz.
    :param label: what errors call the output (e.g. its final path).
    """

    def __init__(self, file: BinaryIO, shape: tuple, dtype=np.uint8, name: str = IMAGE_KEY,
                 label: str = "npz"):
        if isinstance(file, (str, os.PathLike)):
            raise TypeError(f"NpzArrayWriter({file!r}): pass an open file; write_npz_atomically() "
                            f"writes a path through a temporary file")
        self.label, self.name, self.shape, self.dtype = label, name, tuple(shape), np.dtype(dtype)
        self.rows_written = 0
        self._zip = zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._member = self._zip.open(_member_info(name), "w", force_zip64=True)
        header = dict(descr=np.lib.format.dtype_to_descr(self.dtype), fortran_order=False,
                      shape=self.shape)
        np.lib.format.write_array_header_2_0(self._member, header)

    def write_batch(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows_written + len(rows) > self.shape[0]:
            raise ValueError(f"{self.label}: rows of shape {rows.shape} do not fit '{self.name}' "
                             f"{self.shape} after {self.rows_written} rows")
        self._member.write(rows.tobytes())
        self.rows_written += len(rows)

    def add_array(self, name: str, value: np.ndarray) -> None:
        """Add a whole (small) array, e.g. the statistics, after the streamed one is complete."""
        self._finish_member()
        with self._zip.open(_member_info(name), "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)

    def _finish_member(self) -> None:
        if self._member is not None:
            if self.rows_written != self.shape[0]:
                raise ValueError(f"{self.label}: wrote {self.rows_written} of {self.shape[0]} rows "
                                 f"of '{self.name}'")
            self._member.close()
            self._member = None

    def close(self) -> None:
        self._finish_member()
        self._zip.close()

    def __enter__(self) -> "NpzArrayWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
            return
        # On error the file is abandoned half-written (atomic_write() deletes it); close the zip
        # without checking the row count, which would hide the original error.
        try:
            if self._member is not None:
                self._member.close()
            self._zip.close()
        except (OSError, ValueError):
            pass


def write_npz_atomically(path: str, shape: tuple, fill, dtype=np.uint8) -> None:
    """
    Create the .npz `path` through a temporary file in its folder, renamed over `path` only
    when complete.

    :param shape: the shape of the streamed `arr_0`.
    :param fill: a function of an NpzArrayWriter that writes all rows (and any extra arrays).
    """
    # The project's one atomic writer; imported here, not at the top, so that reading batches
    # does not import the training package.

    def write(f: BinaryIO) -> None:
        with NpzArrayWriter(f, shape, dtype, label=path) as writer:
            fill(writer)

    atomic_write(path, write)


def run_main(main, prog: str) -> None:
    """Run a command-line main; bad input (ValueError, FileNotFoundError) exits in one line."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"{prog}: error: {e}")


def list_images(image_dir: str) -> list[str]:
    """:return: the image files in image_dir (recursively), sorted by path."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{image_dir}: no such image folder")
    paths = sorted(
        os.path.join(root, f)
        for root, _, files in os.walk(image_dir)
        for f in files
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise ValueError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return paths


def load_image(path: str, image_size: int | None = None) -> np.ndarray:
    """
    :param image_size: if given, resize and center-crop to [image_size x image_size] the way
                       the training data is prepared (guided_diffusion.image_util).
    :return: an [H x W x 3] uint8 RGB array.
    """

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.load()
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
    if image_size is None:
        return np.asarray(img, dtype=np.uint8)

    return np.asarray(center_crop_arr(img, image_size), dtype=np.uint8)


def image_batches(paths: list[str], batch_size: int,
                  image_size: int | None = None) -> Iterator[np.ndarray]:
    """
    Yield [n x H x W x 3] uint8 batches of the images at `paths`, all of one size.

    :raises ValueError: naming the first image whose size differs from the first one's.
    """
    first_shape = None
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start:start + batch_size]:
            arr = load_image(path, image_size)
            first_shape = first_shape or arr.shape
            if arr.shape != first_shape:
                raise ValueError(f"{path}: is {arr.shape[1]}x{arr.shape[0]}, the first image "
                                 f"{first_shape[1]}x{first_shape[0]}; pass --image_size to "
                                 f"resize all")
            batch.append(arr)
        yield np.stack(batch)


def images_to_npz(image_dir: str, out_path: str, image_size: int | None = None,
                  batch_size: int = 256, consume=None) -> int:
    """
    Write the images of image_dir as `arr_0` of out_path, streaming (never all in memory).

    :param consume: optional function of the batch iterator that must pass every batch through
                    (make_reference_batch computes Inception features on the way) and may return
                    a dict of extra arrays to store after `arr_0`.
    :return: the number of images written.
    """
    paths = list_images(image_dir)
    first = load_image(paths[0], image_size)

    def fill(writer: NpzArrayWriter) -> None:
        def written():
            for batch in image_batches(paths, batch_size, image_size):
                writer.write_batch(batch)
                yield batch

        if consume is None:
            for _ in written():
                pass
            extra = {}
        else:
            extra = consume(written()) or {}
        for name, value in extra.items():
            writer.add_array(name, value)

    write_npz_atomically(out_path, (len(paths),) + first.shape, fill)
    return len(paths)


def npz_to_images(npz_path: str, out_dir: str, batch_size: int = 256, ext: str = "png") -> int:
    """
    Write each image of `arr_0` of an .npz or shard folder to out_dir/{index:06d}.{ext},
    streaming; each file atomically.

    :return: the number of images written.
    """


    image_format = Image.registered_extensions().get(f".{ext.lower()}")
    if image_format is None:
        raise ValueError(f"ext={ext!r}: not an image format PIL can write")
    os.makedirs(out_dir, exist_ok=True)
    with open_image_batch(npz_path) as reader:
        index = 0
        for batch in reader.batches(batch_size):
            for image in batch:
                def save(f, image=image):
                    Image.fromarray(image).save(f, format=image_format)

                atomic_write(os.path.join(out_dir, f"{index:06d}.{ext}"), save)
                index += 1
    return index
