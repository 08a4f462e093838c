"""Dataset readers: IDX (MNIST / Fashion-MNIST), CIFAR-10 python batches, npz / npy.

Every reader returns a :class:`RawDataset` (train and test split as the public format ships
them, images as ``(n, H, W, C)``) and raises :class:`~deqntk_dist.errors.DatasetError` naming
the file and what is wrong with it (missing, truncated, wrong magic number, count mismatch).
Preprocessing and subsetting live in :mod:`deqntk_dist.preprocess`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import MAX_CLASSES, label_range_error
from .errors import DatasetError

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
_IDX_TYPES = {
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


def _read_bytes(path: Path) -> bytes:
    """Whole file, transparently gunzipped when it starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"dataset file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise DatasetError(f"cannot read dataset file {str(path)!r}: {exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(
                f"dataset file {str(path)!r} is a corrupt or truncated gzip stream: {exc}"
            ) from None
    return raw


def _check_labels(what: str, y, n_expected: int, *, n_classes: int | None = None) -> np.ndarray:
    """Labels as int64, or DatasetError: not 1-D integers, wrong count, or a label outside
    ``[0, n_classes)`` (default :data:`~deqntk_dist.dataset.MAX_CLASSES`) naming its row."""
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
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped), the format of MNIST and Fashion-MNIST.

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
    big-endian uint32; the data follow in row-major big-endian order.

    Returns
    -------
    ndarray
        Native-endian array of the shape in the header.

    Raises
    ------
    DatasetError
        Missing file, corrupt gzip, wrong magic number, truncated data or trailing bytes.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DatasetError(
            f"IDX file {str(path)!r} is truncated: {len(raw)} bytes, shorter than the "
            "4-byte magic number"
        )
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DatasetError(
            f"IDX file {str(path)!r} has a wrong magic number 0x{raw[:4].hex()}: expected "
            "0x0000TTNN with type code TT in (08, 09, 0b, 0c, 0d, 0e) and NN >= 1 dimensions"
        )
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(
            f"IDX file {str(path)!r} is truncated inside its header ({len(raw)} bytes, "
            f"{header} needed for {ndim} dimensions)"
        )
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        kind = "truncated" if got < expected else "longer than its header says"
        raise DatasetError(
            f"IDX file {str(path)!r} is {kind}: header shape {shape} needs {expected} data "
            f"bytes, found {got}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


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
        x = read_idx(paths[f"x_{split}"])
        if x.ndim != 3:
            raise DatasetError(
                f"IDX image file {str(paths[f'x_{split}'])!r} must have 3 dimensions "
                f"(n, rows, cols), got shape {x.shape}"
            )
        y = read_idx(paths[f"y_{split}"])
        arrays[f"x_{split}"] = x[..., None]
        arrays[f"y_{split}"] = _check_labels(
            f"{name} {split} labels ({paths[f'y_{split}'].name})", y, x.shape[0]
        )
    source_info = {
        "format": "idx",
        "path": str(directory.resolve()),
        "files": [_file_record(p) for p in paths.values()],
    }
    return RawDataset(name=name, source=source_info, **arrays)


# ------------------------------------------------------------------------------------ CIFAR-10
class _BatchUnpickler(pickle.Unpickler):
    """Unpickler restricted to what the CIFAR-10 python batches contain (numpy arrays)."""

    _ALLOWED = {
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): lambda: np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): lambda: np._core.multiarray._reconstruct,
        ("numpy.core.multiarray", "scalar"): lambda: np._core.multiarray.scalar,
        ("numpy._core.multiarray", "scalar"): lambda: np._core.multiarray.scalar,
        ("numpy.core.numeric", "_frombuffer"): lambda: np._core.numeric._frombuffer,
        ("numpy._core.numeric", "_frombuffer"): lambda: np._core.numeric._frombuffer,
        ("_codecs", "encode"): lambda: __import__("_codecs").encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]()
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a CIFAR-10 batch"
            ) from None


def _parse_cifar_batch(raw: bytes, label: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means a corrupt file
        raise DatasetError(
            f"CIFAR-10 batch {label!r} is not a readable python pickle (truncated or corrupt): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(batch, dict):
        raise DatasetError(f"CIFAR-10 batch {label!r} must be a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise DatasetError(f"CIFAR-10 batch {label!r} lacks the key(s) {missing}")
    data = np.asarray(batch["data"])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DatasetError(
            f"CIFAR-10 batch {label!r}: 'data' must be uint8 of shape (n, 3072), "
            f"got {data.dtype} {data.shape}"
        )
    y = _check_labels(
        f"CIFAR-10 batch {label!r} labels", batch["labels"], data.shape[0], n_classes=10
    )
    # rows are 1024 red, 1024 green, 1024 blue values, each a 32x32 row-major image
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), y


def _cifar_from_dir(directory: Path) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    if not (directory / _CIFAR_TEST).exists() and (directory / _CIFAR_DIR).is_dir():
        directory = directory / _CIFAR_DIR
    names = (*_CIFAR_TRAIN, _CIFAR_TEST)
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise DatasetError(
            f"CIFAR-10 directory {str(directory)!r} lacks the batch file(s) {missing} "
            "(expected data_batch_1..5 and test_batch of the python version)"
        )
    raws = {n: (directory / n).read_bytes() for n in names}
    return raws, [_file_record(directory / n) for n in names]


def _cifar_from_tar(archive: Path) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    wanted = set((*_CIFAR_TRAIN, _CIFAR_TEST))
    raws: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in raws:
                    f = tar.extractfile(member)
                    raws[base] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"CIFAR-10 archive {str(archive)!r} is corrupt or truncated: {exc}"
        ) from None
    missing = sorted(wanted - set(raws))
    if missing:
        raise DatasetError(f"CIFAR-10 archive {str(archive)!r} lacks the batch file(s) {missing}")
    return raws, [_file_record(archive)]


def load_cifar10(source: str | os.PathLike) -> RawDataset:
    """CIFAR-10 "python version": a directory or the ``.tar.gz`` of the pickled batches.

    Parameters
    ----------
    source : path
        ``cifar-10-python.tar.gz``, or a directory holding ``data_batch_1`` ..
        ``data_batch_5`` and ``test_batch`` (directly or in ``cifar-10-batches-py/``).

    Returns
    -------
    RawDataset
        Images uint8 of shape (n, 32, 32, 3) (50,000 train, 10,000 test for the real data).
    """
    path = Path(source)
    if path.is_dir():
        raws, files = _cifar_from_dir(path)
    elif path.is_file():
        raws, files = _cifar_from_tar(path)
    else:
        raise DatasetError(
            f"CIFAR-10 source {str(path)!r} does not exist (give the directory of the python "
            "batches or cifar-10-python.tar.gz)"
        )
    parts = [_parse_cifar_batch(raws[n], n) for n in _CIFAR_TRAIN]
    x_test, y_test = _parse_cifar_batch(raws[_CIFAR_TEST], _CIFAR_TEST)
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


def load_npz(source: str | os.PathLike) -> RawDataset:
    """Arrays with labels: a ``.npz`` file or a directory of ``.npy`` files.

    The keys (or file stems) are ``x_train, y_train, x_test, y_test``; or ``x, y`` with a
    scalar ``n_train`` (the first n_train rows train, the rest test, as read by
    :func:`deqntk_dist.dataset.dataset_store_from_file`); or ``x, y`` alone for data
    without a test split (:func:`deqntk_dist.preprocess.select_rows` then draws a
    class-balanced test split with the seed). ``x`` is ``(n, d)``, ``(n, H, W)`` or
    ``(n, H, W, C)``; ``y`` integer labels ``>= 0``. Pickled objects are refused.
    """
    path = Path(source)
    arrays: dict[str, np.ndarray] = {}
    try:
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            for f in files:
                arrays[f.stem] = np.load(f, allow_pickle=False)
            records = [_file_record(f) for f in files]
        elif path.is_file():
            with np.load(path, allow_pickle=False) as z:
                if not hasattr(z, "files"):
                    raise DatasetError(
                        f"npz source {str(path)!r} holds a single array; give a .npz with "
                        "x_train/y_train/x_test/y_test (or x/y) or a directory of .npy files"
                    )
                arrays = {k: z[k] for k in z.files}
            records = [_file_record(path)]
        else:
            raise DatasetError(f"npz source {str(path)!r} does not exist")
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        raise DatasetError(
            f"npz source {str(path)!r} is corrupt or not a numpy file: {exc}"
        ) from None
    if {"x_train", "y_train", "x_test", "y_test"} <= set(arrays):
        keys = {"x_train": "x_train", "y_train": "y_train", "x_test": "x_test", "y_test": "y_test"}
    elif {"x", "y"} <= set(arrays) and "n_train" in arrays:
        arrays = _split_n_train(path, arrays)
        keys = {"x_train": "x_train", "y_train": "y_train", "x_test": "x_test", "y_test": "y_test"}
    elif {"x", "y"} <= set(arrays):
        keys = {"x_train": "x", "y_train": "y"}
    else:
        raise DatasetError(
            f"npz source {str(path)!r} must hold arrays x_train, y_train, x_test, y_test "
            f"(or x, y), found {sorted(arrays)}"
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
    if out["x_test"] is not None and out["x_test"].shape[1:] != out["x_train"].shape[1:]:
        raise DatasetError(
            f"npz x_test feature shape {out['x_test'].shape[1:]} differs from x_train "
            f"{out['x_train'].shape[1:]}"
        )
    source_info = {"format": "npz", "path": str(path.resolve()), "files": records}
    return RawDataset(name="npz", source=source_info, **out)


# -------------------------------------------------------------------------------- entry point
def ensure_fashion_mnist(*, install: bool = True) -> Path:
    """Directory of the Fashion-MNIST IDX files, installing the Debian package if needed.

    Installs ``dataset-fashion-mnist`` with ``apt-get`` when the files are missing, the
    process runs as root and ``apt-get`` exists; otherwise raises a :class:`DatasetError`
    that says exactly what to run (or to pass ``--source``).
    """
    directory = Path(FASHION_MNIST_DIR)
    have = directory.is_dir() and any(directory.glob("train-images-idx3-ubyte*"))
    if have:
        return directory
    how = (
        f"install it with `sudo apt-get update && sudo apt-get install -y "
        f"{FASHION_MNIST_PACKAGE}` (Debian/Ubuntu), or download the four IDX files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz) into a directory and pass it as --source"
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
            raise DatasetError(f"dataset {name!r} needs a source path (--source), got none")
        source = ensure_fashion_mnist(install=install)
    if name in ("fashion-mnist", "mnist"):
        return load_idx_dataset(source, name=name)
    if name == "cifar10":
        return load_cifar10(source)
    return load_npz(source)
