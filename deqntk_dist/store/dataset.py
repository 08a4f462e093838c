"""Dataset store: the input rows of a kernel store, as a zarr v3 group (DESIGN.md §3).

Layout
------
``x``  float32, shape (N, D) or (N, H, W, C), row chunks, no compression.
``y``  int64, shape (N,).
attrs  ``format`` ("deqntk-dataset"), ``format_version``, ``name``, ``n_train``, ``n_test``,
       ``preprocessing`` (dict), ``source`` (dict), ``fingerprint`` (blake2b of shape, n_train,
       x bytes and y bytes).

Train rows come first, then test rows.  On a local disk a store is written to a temporary
directory next to its destination and renamed into place, so it is never seen half-written;
on an object store (``s3://...``) its attrs, which make it a dataset store, are written
last.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import DatasetError, StoreError, StoreNotFoundError
from ..safeload import NPZ_ERRORS, read_npy_files, read_npz_arrays
from .chunkio import byte_view, zarr_array
from .location import Location

__all__ = [
    "DATASET_FORMAT",
    "DATASET_FORMAT_VERSION",
    "MAX_CLASSES",
    "DatasetStore",
    "dataset_fingerprint",
    "dataset_store_from_file",
    "open_dataset_store",
    "write_dataset_store",
]

DATASET_FORMAT = "deqntk-dataset"
DATASET_FORMAT_VERSION = 1
#: Target bytes per ``x`` chunk (row chunks).
_X_CHUNK_BYTES = 8 * 2**20
#: Class labels are integers in ``[0, MAX_CLASSES)``: the regression stage builds one-hot
#: targets with ``max(label) + 1`` columns for every training and test row.
MAX_CLASSES = 10_000


def label_range_error(what: str, y: np.ndarray, bound: int = MAX_CLASSES) -> str | None:
    """Message naming the first row of ``y`` whose label is outside ``[0, bound)``, or None.

    ``y`` is 1-D integer or (integer-valued, finite) floating; compared without casting, so
    a label of 1e300 or 2**63 is reported as given.
    """
    if not y.size:
        return None
    bad = np.flatnonzero(~((y >= 0) & (y < bound)))
    if not bad.size:
        return None
    row = int(bad[0])
    value = y[row].item()
    more = f" ({bad.size} rows out of range)" if bad.size > 1 else ""
    hint = "; number the classes 0..K-1" if bound == MAX_CLASSES else ""
    return (
        f"{what} must be class labels >= 0 and < {bound}: row {row} holds label {value!r}"
        f"{more}{hint}"
    )


@dataclass(frozen=True, eq=False)
class DatasetStore:
    """An opened dataset store (read-only view).

    Attributes
    ----------
    path : str
        Absolute path of the zarr group.
    x : zarr.Array
        Inputs, float32, shape (n, *feature_shape).
    y : ndarray, shape (n,), int64
        Labels of all rows (train rows first).
    n, n_train, n_test : int
    name, fingerprint : str
    attrs : dict
        All group attributes.
    """

    path: str
    x: zarr.Array = field(repr=False)
    y: np.ndarray = field(repr=False)
    n: int
    n_train: int
    n_test: int
    name: str
    fingerprint: str
    attrs: dict = field(repr=False)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one example: ``(D,)`` or ``(H, W, C)``."""
        return tuple(self.x.shape[1:])

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of ``x`` as a float32 ndarray of shape (stop-start, ...)."""
        if not (0 <= start <= stop <= self.n):
            raise DatasetError(
                f"row range must satisfy 0 <= start <= stop <= n = {self.n}, got [{start}, {stop})"
            )
        return np.asarray(self.x[start:stop], dtype=np.float32)


def dataset_fingerprint(x: np.ndarray, y: np.ndarray, n_train: int) -> str:
    """Content fingerprint (blake2b-128 hex) of float32 ``x``, int64 ``y`` and ``n_train``."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{DATASET_FORMAT}:{x.shape}:{n_train}".encode())
    x = np.ascontiguousarray(x, dtype="<f4")
    step = max(1, (64 * 2**20) // max(1, x[:1].nbytes))
    for i in range(0, x.shape[0], step):
        h.update(byte_view(np.ascontiguousarray(x[i : i + step])))
    h.update(byte_view(np.ascontiguousarray(y, dtype="<i8")))
    return h.hexdigest()


def _validate(x, y, n_train, name) -> tuple[np.ndarray, np.ndarray, int]:
    x = np.asarray(x)
    if x.dtype.kind not in "fiu" or x.dtype == bool:
        raise DatasetError(f"x must be a real numeric array, got dtype {x.dtype}")
    if x.ndim not in (2, 4):
        raise DatasetError(f"x must have shape (N, D) or (N, H, W, C), got shape {x.shape}")
    if x.shape[0] == 0 or x.size == 0:
        raise DatasetError(f"x must be non-empty, got shape {x.shape}")
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x32).all():
        bad = int(np.argwhere(~np.isfinite(x32.reshape(x32.shape[0], -1)))[0, 0])
        raise DatasetError(f"x must be finite (in float32); row {bad} holds NaN or inf")
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DatasetError(f"y must have shape ({x.shape[0]},) to match x, got {y.shape}")
    if y.dtype.kind not in "iu" and not (
        y.dtype.kind == "f" and np.isfinite(y).all() and np.all(y == np.round(y))
    ):
        raise DatasetError(f"y must hold integer class labels, got dtype {y.dtype}")
    problem = label_range_error("y", y)
    if problem:
        raise DatasetError(problem)
    if isinstance(n_train, bool) or not isinstance(n_train, int | np.integer):
        raise DatasetError(f"n_train must be an integer, got {n_train!r}")
    n_train = int(n_train)
    if not 1 <= n_train <= x.shape[0]:
        raise DatasetError(f"n_train must satisfy 1 <= n_train <= N = {x.shape[0]}, got {n_train}")
    if not isinstance(name, str) or not name:
        raise DatasetError(f"name must be a non-empty string, got {name!r}")
    return x32, y.astype(np.int64), n_train


def write_dataset_store(
    path,
    x,
    y,
    *,
    n_train: int,
    name: str,
    preprocessing: dict | None = None,
    source: dict | None = None,
    overwrite: bool = False,
) -> DatasetStore:
    """Write a dataset store (atomically: temp directory, then rename).

    Parameters
    ----------
    path : str, os.PathLike or Location
        Destination of the zarr group: a local directory or a store URL.
    x : array_like, shape (N, D) or (N, H, W, C)
        Inputs, stored as float32 (train rows first, then test rows).
    y : array_like, shape (N,)
        Integer labels.
    n_train : int
        Number of leading training rows, ``1 <= n_train <= N``.
    name : str
        Dataset name (e.g. "fashion-mnist").
    preprocessing, source : dict, optional
        JSON-serialisable descriptions kept in the attributes.
    overwrite : bool
        Replace an existing store at ``path``.

    Returns
    -------
    DatasetStore

    Raises
    ------
    DatasetError
        Bad arrays or arguments.
    StoreError
        ``path`` exists and ``overwrite`` is false, or it cannot be written.
    """
    x32, y64, n_train = _validate(x, y, n_train, name)
    loc = Location.parse(path, param="dataset store")
    if loc.exists() and not overwrite:
        raise StoreError(f"dataset store path already exists (pass overwrite=True): {loc}")
    attrs = _attrs(x32, y64, n_train, name, preprocessing, source)
    if not loc.is_local:
        try:
            loc.delete_tree()
            _build(loc, x32, y64, attrs)
        except OSError as exc:
            raise StoreError(f"cannot write dataset store {loc}: {exc}") from exc
        return open_dataset_store(loc)
    dest = loc.local_path
    if not dest.parent.is_dir():
        raise StoreError(f"parent directory of the dataset store does not exist: {dest.parent}")
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        _build(Location.parse(tmp), x32, y64, attrs)
        if dest.exists():
            trash = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(dest, trash)
            os.rename(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except OSError as exc:
        raise StoreError(f"cannot write dataset store {dest}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return open_dataset_store(dest)


def _attrs(x32, y64, n_train, name, preprocessing, source) -> dict[str, Any]:
    return {
        "format": DATASET_FORMAT,
        "format_version": DATASET_FORMAT_VERSION,
        "name": name,
        "n_train": n_train,
        "n_test": int(x32.shape[0] - n_train),
        "preprocessing": dict(preprocessing or {}),
        "source": dict(source or {}),
        "fingerprint": dataset_fingerprint(x32, y64, n_train),
    }


def _build(loc: Location, x32: np.ndarray, y64: np.ndarray, attrs: dict) -> None:
    """The arrays at ``loc``, then the attrs."""
    root = zarr.open_group(store=loc.zarr_store(read_only=False), mode="w-", zarr_format=3)
    row_bytes = max(1, x32[:1].nbytes)
    rows = int(max(1, min(x32.shape[0], _X_CHUNK_BYTES // row_bytes)))
    xa = root.create_array(
        "x", shape=x32.shape, dtype="float32", chunks=(rows, *x32.shape[1:]), compressors=None
    )
    xa[...] = x32
    ya = root.create_array("y", shape=y64.shape, dtype="int64", chunks=y64.shape)
    ya[...] = y64
    root.attrs.update(attrs)


def open_dataset_store(path) -> DatasetStore:
    """Open a dataset store written by :func:`write_dataset_store`.

    Raises
    ------
    StoreError
        The path does not exist or is not a deqntk dataset store.
    """
    p = Location.parse(path, param="dataset store")
    if not p.exists("zarr.json"):
        if not p.exists():
            raise StoreNotFoundError(f"dataset store not found: {p}")
        raise StoreError(f"not a zarr group (dataset store expected; no zarr.json): {p}")
    try:
        root = zarr.open_group(store=p.zarr_store(read_only=True), mode="r")
    except Exception as exc:
        raise StoreError(f"not a zarr group (dataset store expected): {p}: {exc}") from exc
    attrs: dict[str, Any] = dict(root.attrs)  # JSON
    if attrs.get("format") != DATASET_FORMAT:
        raise StoreError(
            f"not a deqntk dataset store (attrs['format'] must be {DATASET_FORMAT!r}, "
            f"got {attrs.get('format')!r}): {p}"
        )
    if int(attrs.get("format_version", -1)) > DATASET_FORMAT_VERSION:
        raise StoreError(
            f"dataset store format_version {attrs.get('format_version')} is newer than this "
            f"software supports ({DATASET_FORMAT_VERSION}): {p}"
        )
    try:
        x = zarr_array(root, "x")
        y = np.asarray(zarr_array(root, "y")[...], dtype=np.int64)
    except Exception as exc:
        raise StoreError(f"dataset store {p} is missing or has unreadable x / y: {exc}") from exc
    return DatasetStore(
        path=str(p),
        x=x,
        y=y,
        n=int(x.shape[0]),
        n_train=int(attrs["n_train"]),
        n_test=int(attrs["n_test"]),
        name=str(attrs["name"]),
        fingerprint=str(attrs["fingerprint"]),
        attrs=attrs,
    )


def dataset_store_from_file(
    src, path, *, n_train: int | None = None, name: str | None = None, overwrite: bool = False
) -> DatasetStore:
    """Write a dataset store from an ``.npz`` (keys ``x``, ``y``, optional ``n_train``) file.

    An ``.npy`` file holds ``x`` only; the labels are then all zero.  ``n_train`` defaults
    to the file's ``n_train`` entry, else all rows.
    """
    src = Path(src)
    if not src.is_file():
        raise DatasetError(f"dataset file not found: {src}")
    try:
        if src.suffix == ".npy":
            x = read_npy_files([src], f"dataset file {src}")[src.stem]
            y = np.zeros(len(x), dtype=np.int64)
            stored_n_train = None
        else:
            arrays, found = read_npz_arrays(src, ("x", "y", "n_train"), f"dataset file {src}")
            if "x" not in arrays or "y" not in arrays:
                raise DatasetError(f"npz dataset must hold arrays 'x' and 'y', got {found}: {src}")
            x, y = arrays["x"], arrays["y"]
            stored = arrays.get("n_train")
            if stored is not None and (stored.shape != () or stored.dtype.kind not in "iu"):
                raise DatasetError(
                    f"npz dataset's n_train must be an integer scalar, got {stored.dtype} of "
                    f"shape {stored.shape}: {src}"
                )
            stored_n_train = int(stored) if stored is not None else None
    except DatasetError:
        raise
    except NPZ_ERRORS as exc:
        raise DatasetError(f"cannot read dataset file {src}: {str(exc)[:300]}") from exc
    if n_train is None:
        n_train = stored_n_train if stored_n_train is not None else len(x)
    return write_dataset_store(
        path,
        x,
        y,
        n_train=n_train,
        name=name or src.stem,
        source={"file": str(src.absolute())},
        overwrite=overwrite,
    )
