"""Dataset readers: IDX (MNIST / Fashion-MNIST), CIFAR-10 python batches, npz / npy.

Every reader returns a :class:`RawDataset` (train and test split as the public format ships
them, images as ``(n, H, W, C)``) and raises :class:`~deqntk_dist.errors.DatasetError` naming
the file and what is wrong with it (missing, truncated, wrong magic number, count mismatch).
Files are untrusted: no reader holds more than the format can legitimately hold (declared
sizes checked exactly before memory is set aside, compressed streams read through a byte
cap, CIFAR pickles through a restricted unpickler that cannot build arrays; see
:mod:`deqntk_dist.safeload`).  Preprocessing and subsetting live in
:mod:`deqntk_dist.preprocess`.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import subprocess
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError
from .safeload import (
    DECOMPRESSION_ERRORS,
    MAX_DIMS,
    NPZ_ERRORS,
    BoundedTarInfo,
    CappedReader,
    PickledArray,
    TarLimitError,
    check_declared_size,
    load_array_pickle,
    open_stream,
    read_exactly,
    read_npy_files,
    read_npz_arrays,
    skip_bytes,
)
from .store.dataset import MAX_CLASSES, label_range_error

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_PACKAGE",
    "RawDataset",
    "ensure_fashion_mnist",
    "load_cifar10",
    "load_dataset",
    "load_idx_dataset",
    "load_npz",
    "read_idx",
]

#: Dataset names accepted by :func:`load_dataset` (and ``deqntk prepare --dataset``).
DATASETS = ("fashion-mnist", "mnist", "cifar10", "npz")

#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_DIR = "cifar-10-batches-py"


@dataclass(frozen=True)
class RawDataset:
    """A dataset as read from its files, before subsetting and preprocessing.

    Attributes
    ----------
    name : str
    x_train : ndarray, shape (n_train, H, W, C) or (n_train, d)
        uint8 for the image formats, any real dtype for npz.
    y_train : ndarray of int64, shape (n_train,)
    x_test, y_test : ndarray or None
        ``None`` when the source has no separate test split (npz with ``x``/``y`` only).
    source : dict
        JSON-serialisable description: path, format, per-file sizes and SHA-256 digests.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


# ------------------------------------------------------------------------------------ helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_record(path: Path) -> dict[str, Any]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def _check_labels(what: str, y, n_expected: int, *, n_classes: int | None = None) -> np.ndarray:
    """Labels as int64, or DatasetError: not 1-D integers, wrong count, or a label outside
    ``[0, n_classes)`` (default :data:`~deqntk_dist.store.dataset.MAX_CLASSES`) naming its row."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DatasetError(f"{what} must be one-dimensional, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        with np.errstate(invalid="ignore"):
            integral = np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)
        if not integral:
            raise DatasetError(f"{what} must be integer class labels, got dtype {y.dtype}")
    if y.shape[0] != n_expected:
        raise DatasetError(
            f"{what}: label/image count mismatch: {y.shape[0]} labels for {n_expected} images"
        )
    problem = label_range_error(what, y, MAX_CLASSES if n_classes is None else n_classes)
    if problem:
        raise DatasetError(problem)
    return y.astype(np.int64)


# ----------------------------------------------------------------------------------------- IDX
def _idx_header(stream: io.BufferedIOBase, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """dtype, shape and header length of an IDX stream positioned at its start."""
    head = read_exactly(stream, 4)
    if len(head) < 4:
        raise DatasetError(
            f"IDX file {str(path)!r} is truncated: {len(head)} bytes, shorter than the "
            "4-byte magic number"
        )
    if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES or head[3] == 0:
        raise DatasetError(
            f"IDX file {str(path)!r} has a wrong magic number 0x{head.hex()}: expected "
            "0x0000TTNN with type code TT in (08, 09, 0b, 0c, 0d, 0e) and NN >= 1 dimensions"
        )
    dtype, ndim = _IDX_TYPES[head[2]], head[3]
    header = 4 + 4 * ndim
    dims = read_exactly(stream, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise DatasetError(
            f"IDX file {str(path)!r} is truncated inside its header ({4 + len(dims)} bytes, "
            f"{header} needed for {ndim} dimensions)"
        )
    if ndim > MAX_DIMS:
        raise DatasetError(
            f"IDX file {str(path)!r} declares {ndim} dimensions; at most {MAX_DIMS} are supported"
        )
    shape = tuple(int.from_bytes(dims[k : k + 4], "big") for k in range(0, 4 * ndim, 4))
    return dtype, shape, header


def _read_idx_header(path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    stream, kind = open_stream(path, f"dataset file {str(path)!r}")
    try:
        with stream:
            dtype, shape, _ = _idx_header(stream, path)
    except DECOMPRESSION_ERRORS as exc:
        raise _stream_error(path, kind, exc) from None
    return dtype, shape


def _stream_error(path: Path, kind: str | None, exc: BaseException) -> DatasetError:
    if kind is None:
        return DatasetError(f"cannot read dataset file {str(path)!r}: {exc}")
    return DatasetError(
        f"dataset file {str(path)!r} is a corrupt or truncated {kind} stream: {exc}"
    )


#: A compressed IDX file declaring more data than this is read through once, keeping
#: nothing, before memory is set aside for it; smaller ones are read in one pass (a crafted
#: file then holds at most this much, briefly, before it is refused).
_IDX_ONE_PASS_BYTES = 256 * 2**20


def _idx_size_error(path: Path, shape, expected: int, found: int | str) -> DatasetError:
    short = isinstance(found, int) and found < expected
    kind = "truncated" if short else "longer than its header says"
    return DatasetError(
        f"IDX file {str(path)!r} is {kind}: header shape {shape} needs {expected} data "
        f"bytes, found {found}"
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip / bzip2 / xz compressed), the format of MNIST.

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
    big-endian uint32; the data follow in row-major big-endian order.

    The data size the header declares is computed exactly (Python integers), must fit this
    machine's memory and is all that is ever inflated (plus one byte, to see trailing
    data).  A plain file is checked by its size before it is read; a compressed one that
    declares more than 256 MiB is read through once, keeping nothing, before memory is set
    aside for it.

    Returns
    -------
    ndarray
        Native-endian array of the shape in the header.

    Raises
    ------
    DatasetError
        Missing file, corrupt compressed stream, wrong magic number, more than 32
        dimensions, a declared size larger than this machine's memory, truncated data or
        trailing bytes.
    """
    path = Path(path)
    label = f"dataset file {str(path)!r}"
    stream, kind = open_stream(path, label)
    try:
        try:
            dtype, shape, header = _idx_header(stream, path)
            expected = math.prod(shape) * dtype.itemsize
            check_declared_size(f"IDX file {str(path)!r} (header shape {shape})", expected)
            if kind is None:
                got = path.stat().st_size - header
                if got != expected:
                    raise _idx_size_error(path, shape, expected, got)
            elif expected > _IDX_ONE_PASS_BYTES:
                got = skip_bytes(stream, expected + 1)
                if got != expected:
                    raise _idx_size_error(path, shape, expected, got if got < expected else "more")
                stream.close()
                stream, kind = open_stream(path, label)
                skip_bytes(stream, header)
            buf = np.empty(expected, dtype=np.uint8)
            # numpy's stubs give ndarray ``__buffer__`` only for Python >= 3.12
            view, pos = memoryview(buf), 0  # type: ignore[arg-type]
            while pos < expected:
                n = stream.readinto(view[pos:])
                if not n:
                    break
                pos += n
            if pos < expected:
                raise _idx_size_error(path, shape, expected, pos)
            if kind is not None and stream.read(1):
                raise _idx_size_error(path, shape, expected, "more")
        finally:
            stream.close()
    except DECOMPRESSION_ERRORS as exc:
        raise _stream_error(path, kind, exc) from None
    data = buf.view(dtype).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


def _find_idx(directory: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DatasetError(f"IDX file {stem!r} (or {stem}.gz) not found in {str(directory)!r}")


def load_idx_dataset(source: str | os.PathLike, *, name: str = "mnist") -> RawDataset:
    """MNIST-format dataset from a directory holding the four standard IDX files.

    Parameters
    ----------
    source : path
        Directory with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
    name : str
        Recorded dataset name (``"mnist"`` or ``"fashion-mnist"``).

    Returns
    -------
    RawDataset
        Images uint8 of shape (n, 28, 28, 1), labels int64.
    """
    directory = Path(source)
    if not directory.is_dir():
        raise DatasetError(
            f"source for {name} must be a directory holding the four IDX files, "
            f"got {str(directory)!r}"
        )
    paths = {key: _find_idx(directory, stem) for key, stem in _IDX_FILES.items()}
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        xp, yp = paths[f"x_{split}"], paths[f"y_{split}"]
        what = f"{name} {split} labels ({yp.name})"
        # headers first: a count mismatch is refused before any image data is read
        _, x_shape = _read_idx_header(xp)
        if len(x_shape) != 3:
            raise DatasetError(
                f"IDX image file {str(xp)!r} must have 3 dimensions (n, rows, cols), got shape "
                f"{x_shape}"
            )
        _, y_shape = _read_idx_header(yp)
        if len(y_shape) == 1 and y_shape[0] != x_shape[0]:
            raise DatasetError(
                f"{what}: label/image count mismatch: {y_shape[0]} labels for {x_shape[0]} images"
            )
        x = read_idx(xp)
        arrays[f"x_{split}"] = x[..., None]
        arrays[f"y_{split}"] = _check_labels(what, read_idx(yp), x.shape[0])
    source_info = {
        "format": "idx",
        "path": str(directory.resolve()),
        "files": [_file_record(p) for p in paths.values()],
    }
    return RawDataset(name=name, source=source_info, **arrays)


# ------------------------------------------------------------------------------------ CIFAR-10
#: Rows of one CIFAR-10 batch and bytes per row (3 x 32 x 32 uint8).
_CIFAR_ROWS, _CIFAR_ROW_BYTES = 10_000, 3072
#: Largest batch file accepted: the pixel bytes twice (Python 3 pickles bytes at protocol
#: <= 2 as UTF-8 text, up to 2 bytes per byte; the original Python 2 files hold them once:
#: 31,035,704 bytes for data_batch_1) plus 256 bytes per row of labels, file names and
#: pickle framing.
_CIFAR_BATCH_MAX_BYTES = 2 * _CIFAR_ROWS * _CIFAR_ROW_BYTES + 256 * _CIFAR_ROWS
#: Most pickle opcodes a batch may run (~7 per row for labels and file names).
_CIFAR_MAX_OPS = 20 * _CIFAR_ROWS
#: Most bytes a CIFAR-10 archive may inflate to before its six batches are found, and most
#: members it may list (the real one: 6 batches, batches.meta, readme.html, a directory).
_CIFAR_TAR_MAX_BYTES = 6 * _CIFAR_BATCH_MAX_BYTES + 2**24
_CIFAR_TAR_MAX_MEMBERS = 1000


def _cifar_labels(obj: Any, n: int, what: str) -> np.ndarray:
    """The ``labels`` entry (a list of ints, or an integer array) as int64 in [0, 10)."""
    if isinstance(obj, PickledArray):
        y = obj.to_numpy()
        if y.dtype.kind not in "iu":
            raise DatasetError(f"{what} must be integer class labels, got dtype {y.dtype}")
    elif isinstance(obj, list | tuple):
        if not all(type(v) is int for v in obj):
            raise DatasetError(f"{what} must be a list of integer class labels")
        if len(obj) != n:
            raise DatasetError(
                f"{what}: label/image count mismatch: {len(obj)} labels for {n} images"
            )
        bad = next((r for r, v in enumerate(obj) if not 0 <= v < 10), None)
        if bad is not None:
            raise DatasetError(
                f"{what} must be class labels >= 0 and < 10: row {bad} holds label "
                f"{str(obj[bad])[:60]}"
            )
        y = np.array(obj, dtype=np.int64)
    else:
        raise DatasetError(f"{what} must be a list of integer class labels")
    return _check_labels(what, y, n, n_classes=10)


def _parse_cifar_batch(raw: bytes, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 32, 32, 3) uint8 and labels of one pickled batch, built by this reader."""
    try:
        batch = load_array_pickle(raw, _CIFAR_MAX_OPS)
    except MemoryError:  # pragma: no cover - bounded by the file and opcode limits
        raise
    except Exception as exc:  # any unpickling failure means a corrupt (or hostile) file
        raise DatasetError(
            f"CIFAR-10 batch {label!r} is not a readable python pickle (truncated or corrupt): "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from None
    if not isinstance(batch, dict):
        raise DatasetError(f"CIFAR-10 batch {label!r} must be a dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise DatasetError(f"CIFAR-10 batch {label!r} lacks the key(s) {missing}")
    data = batch["data"]
    shape = data.shape if isinstance(data, PickledArray) else None
    if (
        shape is None
        or data.dtype != np.uint8
        or len(shape) != 2
        or shape[1] != _CIFAR_ROW_BYTES
        or not 1 <= shape[0] <= _CIFAR_ROWS
    ):
        got = f"{data.dtype} {shape}" if shape is not None else type(data).__name__
        raise DatasetError(
            f"CIFAR-10 batch {label!r}: 'data' must be a uint8 array of shape (n, 3072) with "
            f"1 <= n <= {_CIFAR_ROWS}, got {got}"
        )
    n = shape[0]
    y = _cifar_labels(batch["labels"], n, f"CIFAR-10 batch {label!r} labels")
    # rows are 1024 red, 1024 green, 1024 blue values, each a 32x32 row-major image
    x = data.to_numpy().reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), y


def _read_capped(path: Path, cap: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > cap:
            raise DatasetError(
                f"{what} {str(path)!r} is {size} bytes, more than the format can hold ({cap})"
            )
        with open(path, "rb") as f:
            raw = f.read(cap + 1)
    except OSError as exc:
        raise DatasetError(f"cannot read {what} {str(path)!r}: {exc}") from None
    if len(raw) > cap:
        raise DatasetError(f"{what} {str(path)!r} grew beyond {cap} bytes while it was read")
    return raw


def _cifar_from_dir(directory: Path) -> tuple[dict[str, tuple], list[dict[str, Any]]]:
    if not (directory / _CIFAR_TEST).exists() and (directory / _CIFAR_DIR).is_dir():
        directory = directory / _CIFAR_DIR
    names = (*_CIFAR_TRAIN, _CIFAR_TEST)
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise DatasetError(
            f"CIFAR-10 directory {str(directory)!r} lacks the batch file(s) {missing} "
            "(expected data_batch_1..5 and test_batch of the python version)"
        )
    parsed = {
        n: _parse_cifar_batch(_read_capped(directory / n, _CIFAR_BATCH_MAX_BYTES, "file"), n)
        for n in names
    }
    return parsed, [_file_record(directory / n) for n in names]


def _cifar_from_tar(archive: Path) -> tuple[dict[str, tuple], list[dict[str, Any]]]:
    wanted = set((*_CIFAR_TRAIN, _CIFAR_TEST))
    parsed: dict[str, tuple] = {}
    label = f"CIFAR-10 archive {str(archive)!r}"
    stream, kind = open_stream(archive, label)
    capped = CappedReader(stream, _CIFAR_TAR_MAX_BYTES, label, "tar data")
    try:
        # typeshed asks fileobj for write/tell/seek/close too, which stream mode never calls
        with stream, tarfile.open(fileobj=capped, mode="r|", tarinfo=BoundedTarInfo) as tar:  # type: ignore[call-overload]
            for count, member in enumerate(tar, 1):
                if count > _CIFAR_TAR_MAX_MEMBERS:
                    raise DatasetError(
                        f"{label} lists more than {_CIFAR_TAR_MAX_MEMBERS} members before its "
                        "six batches (the real archive has 9)"
                    )
                base = member.name.rsplit("/", 1)[-1]
                if not (member.isfile() and base in wanted and base not in parsed):
                    continue
                if member.size > _CIFAR_BATCH_MAX_BYTES:
                    raise DatasetError(
                        f"{label}: member {member.name[:200]!r} is {member.size} bytes, more "
                        f"than a CIFAR-10 batch can hold ({_CIFAR_BATCH_MAX_BYTES})"
                    )
                f = tar.extractfile(member)
                raw = f.read(member.size) if f is not None else b""
                parsed[base] = _parse_cifar_batch(raw, base)
                del raw
                if len(parsed) == len(wanted):
                    break
    except DatasetError:
        raise
    except TarLimitError as exc:
        raise DatasetError(f"{label}: {exc}") from None
    except (tarfile.TarError, *DECOMPRESSION_ERRORS, RecursionError, ValueError) as exc:
        raise DatasetError(f"{label} is corrupt or truncated: {str(exc)[:300]}") from None
    missing = sorted(wanted - set(parsed))
    if missing:
        raise DatasetError(f"{label} lacks the batch file(s) {missing}")
    return parsed, [_file_record(archive)]


def load_cifar10(source: str | os.PathLike) -> RawDataset:
    """CIFAR-10 "python version": a directory or the ``.tar.gz`` of the pickled batches.

    Parameters
    ----------
    source : path
        ``cifar-10-python.tar.gz`` (or an uncompressed / bzip2 / xz tar), or a directory
        holding ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (directly or in
        ``cifar-10-batches-py/``).

    Returns
    -------
    RawDataset
        Images uint8 of shape (n, 32, 32, 3) (50,000 train, 10,000 test for the real data).

    Notes
    -----
    Batches are read with a restricted unpickler (:func:`deqntk_dist.safeload.load_array_pickle`):
    only plain data and numpy's array reconstruction, which yields byte strings whose length
    must match the stated shape; the images are built here, at most 10,000 rows of 3072
    bytes per batch.  A batch file may be at most ``_CIFAR_BATCH_MAX_BYTES`` (~64 MB), an
    archive may inflate to at most six of those before its batches are found.
    """
    path = Path(source)
    if path.is_dir():
        parsed, files = _cifar_from_dir(path)
    elif path.is_file():
        parsed, files = _cifar_from_tar(path)
    else:
        raise DatasetError(
            f"CIFAR-10 source {str(path)!r} does not exist (give the directory of the python "
            "batches or cifar-10-python.tar.gz)"
        )
    parts = [parsed[n] for n in _CIFAR_TRAIN]
    x_test, y_test = parsed[_CIFAR_TEST]
    source_info = {"format": "cifar10-python", "path": str(path.resolve()), "files": files}
    return RawDataset(
        name="cifar10",
        x_train=np.concatenate([p[0] for p in parts]),
        y_train=np.concatenate([p[1] for p in parts]),
        x_test=x_test,
        y_test=y_test,
        source=source_info,
    )


# ------------------------------------------------------------------------------------ npz/npy
def _check_features(what: str, x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == object or not (
        np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    ):
        raise DatasetError(f"{what} must be a real numeric array, got dtype {x.dtype}")
    if x.ndim == 3:  # (n, H, W) grey-scale images
        x = x[..., None]
    if x.ndim not in (2, 4) or x.shape[0] == 0 or 0 in x.shape[1:]:
        raise DatasetError(
            f"{what} must have shape (n, d), (n, H, W) or (n, H, W, C) with n, d >= 1, "
            f"got {x.shape}"
        )
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        raise DatasetError(f"{what} contains non-finite values (NaN or inf)")
    return x


def _split_n_train(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``x``, ``y`` and a scalar ``n_train``: the first n_train rows are the training rows."""
    n_train, n = arrays["n_train"], len(arrays["x"])
    if (
        n_train.shape != ()
        or not np.issubdtype(n_train.dtype, np.integer)
        or not 1 <= int(n_train) < n
    ):
        raise DatasetError(
            f"npz source {str(path)!r}: n_train must be an integer scalar with 1 <= n_train < "
            f"{n} (the number of rows of x), got {n_train!r}"
        )
    k = int(n_train)
    x, y = arrays["x"], arrays["y"]
    if len(y) != n:
        raise DatasetError(
            f"npz array 'y': label/image count mismatch: {len(y)} labels for {n} images"
        )
    return {"x_train": x[:k], "y_train": y[:k], "x_test": x[k:], "y_test": y[k:]}


#: Arrays an npz source may provide; nothing else in the file is read.
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test", "x", "y", "n_train")


def _npz_arrays(path: Path) -> tuple[dict[str, np.ndarray], list[str], list[Path]]:
    """The arrays of :data:`_NPZ_KEYS` in an ``.npz`` or a directory of ``.npy`` files.

    Returns the arrays, every array name found (for messages) and the files read.  Each
    header is checked against the bytes its member really holds, and their total against
    the machine's memory, before any array data is read.
    """
    where = f"npz source {str(path)!r}"
    if path.is_dir():
        found = sorted(f.stem for f in path.glob("*.npy"))
        files = [path / f"{k}.npy" for k in _NPZ_KEYS if (path / f"{k}.npy").is_file()]
        return read_npy_files(files, where), found, files
    if not path.is_file():
        raise DatasetError(f"{where} does not exist")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            single = fh.read(6) == b"\x93NUMPY"
        if single:
            raise DatasetError(
                f"{where} holds a single array; give a .npz with x_train/y_train/x_test/"
                "y_test (or x/y) or a directory of .npy files"
            )
    arrays, found = read_npz_arrays(path, _NPZ_KEYS, where)
    return arrays, found, [path]


def load_npz(source: str | os.PathLike) -> RawDataset:
    """Arrays with labels: a ``.npz`` file or a directory of ``.npy`` files.

    The keys (or file stems) are ``x_train, y_train, x_test, y_test``; or ``x, y`` with a
    scalar ``n_train`` (the first n_train rows train, the rest test, as read by
    :func:`deqntk_dist.store.dataset.dataset_store_from_file`); or ``x, y`` alone for data
    without a test split (:func:`deqntk_dist.preprocess.select_rows` then draws a
    class-balanced test split with the seed). ``x`` is ``(n, d)``, ``(n, H, W)`` or
    ``(n, H, W, C)``; ``y`` integer labels in ``[0, MAX_CLASSES)``. Pickled objects are
    refused; other arrays in the file are not read.  Each array's header must match the
    bytes its member holds (so a compressed member inflates to at most its declared size).
    """
    path = Path(source)
    try:
        arrays, found, read = _npz_arrays(path)
        records = [_file_record(f) for f in read]
    except DatasetError:
        raise
    except NPZ_ERRORS as exc:
        raise DatasetError(
            f"npz source {str(path)!r} is corrupt or not a numpy file: {str(exc)[:300]}"
        ) from None
    names = set(found)
    if {"x_train", "y_train", "x_test", "y_test"} <= names:
        keys = {"x_train": "x_train", "y_train": "y_train", "x_test": "x_test", "y_test": "y_test"}
    elif {"x", "y"} <= names and "n_train" in names:
        arrays = _split_n_train(path, arrays)
        keys = {"x_train": "x_train", "y_train": "y_train", "x_test": "x_test", "y_test": "y_test"}
    elif {"x", "y"} <= names:
        keys = {"x_train": "x", "y_train": "y"}
    else:
        raise DatasetError(
            f"npz source {str(path)!r} must hold arrays x_train, y_train, x_test, y_test "
            f"(or x, y), found {found}"
        )
    out: dict[str, np.ndarray | None] = {"x_test": None, "y_test": None}
    for split in ("train", "test"):
        if f"x_{split}" not in keys:
            continue
        x = _check_features(f"npz array {keys[f'x_{split}']!r}", arrays[keys[f"x_{split}"]])
        out[f"x_{split}"] = x
        out[f"y_{split}"] = _check_labels(
            f"npz array {keys[f'y_{split}']!r}", arrays[keys[f"y_{split}"]], x.shape[0]
        )
    x_train, y_train, x_test = out["x_train"], out["y_train"], out["x_test"]
    assert x_train is not None and y_train is not None  # ``keys`` always has the train split
    if x_test is not None and x_test.shape[1:] != x_train.shape[1:]:
        raise DatasetError(
            f"npz x_test feature shape {x_test.shape[1:]} differs from x_train {x_train.shape[1:]}"
        )
    source_info = {"format": "npz", "path": str(path.resolve()), "files": records}
    return RawDataset(
        name="npz",
        source=source_info,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=out["y_test"],
    )


# -------------------------------------------------------------------------------- entry point
def ensure_fashion_mnist(*, install: bool = True) -> Path:
    """Directory of the Fashion-MNIST IDX files, installing the Debian package if needed.

    Installs ``dataset-fashion-mnist`` with ``apt-get`` when the files are missing, the
    process runs as root and ``apt-get`` exists; otherwise raises a :class:`DatasetError`
    that says exactly what to run (or to pass ``source=DIR``).
    """
    directory = Path(FASHION_MNIST_DIR)
    have = directory.is_dir() and any(directory.glob("train-images-idx3-ubyte*"))
    if have:
        return directory
    how = (
        f"install it with `sudo apt-get update && sudo apt-get install -y "
        f"{FASHION_MNIST_PACKAGE}` (Debian/Ubuntu), or download the four IDX files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz) into a directory and pass it as source=DIR"
    )
    apt = shutil.which("apt-get")
    if not install or apt is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise DatasetError(f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR}: {how}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = [apt, "install", "-y", "-q", FASHION_MNIST_PACKAGE]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # the package lists may be missing or stale
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True, text=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not any(directory.glob("train-images-idx3-ubyte*")):
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise DatasetError(
            f"installing {FASHION_MNIST_PACKAGE} with apt-get failed ({' | '.join(tail)}); {how}"
        )
    return directory


def load_dataset(
    name: str, source: str | os.PathLike | None = None, *, install: bool = True
) -> RawDataset:
    """Read a dataset by name.

    Parameters
    ----------
    name : {"fashion-mnist", "mnist", "cifar10", "npz"}
    source : path, optional
        Required except for ``fashion-mnist``, which defaults to the Debian package's
        directory (installed on demand, see :func:`ensure_fashion_mnist`).
    install : bool
        Allow installing Fashion-MNIST with apt-get when it is missing.
    """
    if name not in DATASETS:
        raise DatasetError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    if source is None:
        if name != "fashion-mnist":
            raise DatasetError(f"dataset {name!r} needs a source path (source=PATH), got none")
        source = ensure_fashion_mnist(install=install)
    if name in ("fashion-mnist", "mnist"):
        return load_idx_dataset(source, name=name)
    if name == "cifar10":
        return load_cifar10(source)
    return load_npz(source)
