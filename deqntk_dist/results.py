"""Solve results inside a kernel store: versioned groups behind one pointer.

Layout: ``results/<kernel>`` is a group whose attrs hold ``format`` ("deqntk-results") and
``current`` (e.g. ``"v3"``); ``results/<kernel>/v<N>`` holds ``alpha``, ``predictions``,
``train_rows``, ``test_rows`` and attrs ``report`` and ``complete``.  A write builds a new
version ``v<N>`` (N larger than any before), then replaces the pointer (one atomic file
rename of ``results/<kernel>/zarr.json``), then deletes the versions below it and the
leftovers of older writers.  A reader follows the pointer (:func:`read_results`), so it sees
the previous results or the new ones, whatever step a crash interrupts; versions left by a
crash are deleted by the next write.  Stores written before versioning hold the arrays in
``results/<kernel>`` itself (attrs ``complete``, ``report``); they are read as they are and
replaced at the next write.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr

__all__ = ["RESULTS_FORMAT", "read_results", "write_results"]

RESULTS_FORMAT = "deqntk-results"
_VERSION = re.compile(r"v(\d+)")
#: arrays of a results group (also the array names of the layout before versioning)
RESULT_ARRAYS = ("alpha", "predictions", "train_rows", "test_rows")


def _version_number(name: str) -> int | None:
    m = _VERSION.fullmatch(name)
    return int(m.group(1)) if m else None


def read_results(store_path, kernel: str) -> zarr.Group | None:
    """The current results group of ``kernel`` in a kernel store (None when there is none).

    Follows ``results/<kernel>``'s ``current`` pointer; reads the layout written before
    versioning (arrays in ``results/<kernel>`` itself, ``complete: true``) as well.
    """
    kdir = Path(store_path, "results", kernel)
    if not (kdir / "zarr.json").exists():
        return None
    g = zarr.open_group(str(kdir), mode="r")
    current = g.attrs.get("current")
    if current:
        return zarr.open_group(str(kdir / current), mode="r")
    if g.attrs.get("complete") and "alpha" in g:
        return g
    return None


def _ensure_group(path: Path) -> None:
    if not (path / "zarr.json").exists():
        zarr.open_group(str(path), mode="a", zarr_format=3)


def prepare_results(store_path, kernel: str) -> Path:
    """Create ``results/<kernel>`` if needed and check that a version can be written there
    (a probe file); returns its directory.

    Raises
    ------
    OSError
        Read-only store, no permission, full disk.
    """
    kdir = Path(store_path, "results", kernel)
    _ensure_group(kdir.parent)
    _ensure_group(kdir)
    probe = kdir / f".probe-{uuid.uuid4().hex[:12]}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    finally:
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()
    return kdir


def _new_version(kdir: Path) -> Path:
    """Create (exclusively) the directory of the next version number."""
    numbers = [_version_number(p.name) for p in kdir.iterdir()]
    n = max([k for k in numbers if k is not None], default=0) + 1
    while True:
        path = kdir / f"v{n}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # a concurrent write took it
            n += 1


def _build_version(vdir: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write a complete results group into the (empty) version directory."""
    g = zarr.open_group(str(vdir), mode="w", zarr_format=3)
    for name, value in arrays.items():
        a = g.create_array(
            name,
            shape=value.shape,
            dtype=value.dtype,
            chunks=tuple(max(1, d) for d in value.shape),
        )
        a[...] = value
    g.attrs.update({**attrs, "complete": True})


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive ``flock`` on ``path`` (best effort where the filesystem has none)."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _set_pointer(kdir: Path, name: str) -> bool:
    """Point ``results/<kernel>`` at version ``name`` (one atomic rename of its zarr.json)
    unless it already points at a newer version (a concurrent solve finished later).

    Returns whether the pointer now names ``name``.
    """
    meta_path = kdir / "zarr.json"
    with _locked(kdir.parent / "zarr.json"):
        meta = json.loads(meta_path.read_text())
        current = (meta.get("attributes") or {}).get("current")
        if current and (_version_number(current) or 0) > (_version_number(name) or 0):
            return False
        meta["attributes"] = {"format": RESULTS_FORMAT, "current": name}
        tmp = kdir / f".zarr.json.tmp-{uuid.uuid4().hex[:12]}"
        try:
            tmp.write_text(json.dumps(meta, indent=2))
            os.replace(tmp, meta_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return True


def _cleanup(kdir: Path, kernel: str) -> None:
    """Delete what no reader can reach: versions below the current one, the arrays of the
    layout before versioning, and the hidden leftovers of the older writer."""
    g = zarr.open_group(str(kdir), mode="r")
    current = _version_number(str(g.attrs.get("current") or ""))
    if current is None:
        return
    for p in kdir.iterdir():
        k = _version_number(p.name)
        if (k is not None and k < current) or (p.name in RESULT_ARRAYS and p.is_dir()):
            shutil.rmtree(p, ignore_errors=True)
    for p in kdir.parent.glob(f".{kernel}.*-*"):  # ``.<kernel>.tmp-…`` / ``.old-…``
        shutil.rmtree(p, ignore_errors=True)


def write_results(store_path, kernel: str, arrays: dict[str, np.ndarray], attrs: dict) -> str:
    """Write a new results version of ``kernel`` and make it the current one.

    Parameters
    ----------
    store_path : str or Path
        Kernel store.
    kernel : str
    arrays : dict
        Name -> ndarray (see :data:`RESULT_ARRAYS`).
    attrs : dict
        Attributes of the version group (e.g. ``report``).

    Returns
    -------
    str
        The version name (``"v<N>"``).

    Raises
    ------
    OSError
        The store cannot be written (what readers see is unchanged, unless the pointer
        was already replaced).
    """
    kdir = prepare_results(store_path, kernel)
    vdir = _new_version(kdir)
    try:
        _build_version(vdir, arrays, attrs)
        if not _set_pointer(kdir, vdir.name):
            shutil.rmtree(vdir, ignore_errors=True)  # superseded by a later solve
            return vdir.name
    except BaseException:
        shutil.rmtree(vdir, ignore_errors=True)
        raise
    _cleanup(kdir, kernel)
    return vdir.name
