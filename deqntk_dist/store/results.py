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

On an object store the same steps are whole-object PUTs: a version is claimed by creating
``v<N>/.claim`` only if absent (a conditional PUT where the store has one), the pointer is
one PUT of ``results/<kernel>/zarr.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid

import numpy as np
import zarr

from .location import Location

__all__ = ["RESULTS_FORMAT", "read_results", "write_results"]

RESULTS_FORMAT = "deqntk-results"
_VERSION = re.compile(r"v(\d+)")
#: arrays of a results group (also the array names of the layout before versioning)
RESULT_ARRAYS = ("alpha", "predictions", "train_rows", "test_rows")


def _version_number(name: str) -> int | None:
    m = _VERSION.fullmatch(name)
    return int(m.group(1)) if m else None


def _kernel_loc(store_path, kernel: str) -> Location:
    return Location.parse(store_path).child(f"results/{kernel}")


def _group(loc: Location, *, writable: bool = False) -> zarr.Group:
    return zarr.open_group(store=loc.zarr_store(read_only=not writable), mode="r")


def read_results(store_path, kernel: str) -> zarr.Group | None:
    """The current results group of ``kernel`` in a kernel store (None when there is none).

    Follows ``results/<kernel>``'s ``current`` pointer; reads the layout written before
    versioning (arrays in ``results/<kernel>`` itself, ``complete: true``) as well.
    """
    kloc = _kernel_loc(store_path, kernel)
    if not kloc.exists("zarr.json"):
        return None
    g = _group(kloc)
    current = g.attrs.get("current")
    if current:
        return _group(kloc.child(str(current)))
    if g.attrs.get("complete") and "alpha" in g:
        return g
    return None


def _ensure_group(loc: Location) -> None:
    if not loc.exists("zarr.json"):
        zarr.open_group(store=loc.zarr_store(read_only=False), mode="a", zarr_format=3)


def prepare_results(store_path, kernel: str) -> Location:
    """Create ``results/<kernel>`` if needed and check that a version can be written there
    (a probe file, synced on a local disk); returns its location.

    Raises
    ------
    OSError
        Read-only store, no permission, full disk.
    """
    kloc = _kernel_loc(store_path, kernel)
    _ensure_group(kloc.parent)
    _ensure_group(kloc)
    name = f".probe-{uuid.uuid4().hex[:12]}"
    if not kloc.is_local:
        kloc.put(name, b"\0")
        kloc.delete(name)
        return kloc
    probe = kloc.local_path / name
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    finally:
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()
    return kloc


def _versions(kloc: Location) -> list[str]:
    return [n for n in kloc.list("", dirs=True) if _version_number(n) is not None]


def _new_version(kloc: Location) -> str:
    """Claim (exclusively) the next version number; returns its name."""
    numbers = [_version_number(n) for n in _versions(kloc)]
    n = max([k for k in numbers if k is not None], default=0) + 1
    while True:
        name = f"v{n}"
        if kloc.is_local:
            try:
                (kloc.local_path / name).mkdir()
                return name
            except FileExistsError:  # a concurrent write took it
                pass
        elif kloc.put_if_absent(f"{name}/.claim", b"\0"):
            return name
        n += 1


def _build_version(vloc: Location, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write a complete results group into the (empty) version."""
    g = zarr.open_group(store=vloc.zarr_store(read_only=False), mode="w", zarr_format=3)
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
def _locked(kloc: Location):
    """An exclusive ``flock`` on the parent group's zarr.json (local disks; best effort
    where the filesystem has none, nothing on object stores)."""
    if not kloc.is_local:
        yield
        return
    import fcntl

    fd = os.open(kloc.parent.local_path / "zarr.json", os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _set_pointer(kloc: Location, name: str) -> bool:
    """Point ``results/<kernel>`` at version ``name`` (one atomic replace of its zarr.json)
    unless it already points at a newer version (a concurrent solve finished later).

    Returns whether the pointer now names ``name``.
    """
    with _locked(kloc):
        meta = json.loads(kloc.get("zarr.json") or b"{}")
        current = (meta.get("attributes") or {}).get("current")
        if current and (_version_number(current) or 0) > (_version_number(name) or 0):
            return False
        meta["attributes"] = {"format": RESULTS_FORMAT, "current": name}
        kloc.put("zarr.json", json.dumps(meta, indent=2).encode())
    return True


def _cleanup(kloc: Location, kernel: str) -> None:
    """Delete what no reader can reach: versions below the current one, the arrays of the
    layout before versioning, and the hidden leftovers of the older writer."""
    current = _version_number(str(_group(kloc).attrs.get("current") or ""))
    if current is None:
        return
    for name in kloc.list("", dirs=True):
        k = _version_number(name)
        if (k is not None and k < current) or (name in RESULT_ARRAYS and kloc.get(name) is None):
            kloc.delete_tree(name)
    if kloc.is_local:
        for p in kloc.parent.local_path.glob(f".{kernel}.*-*"):  # ``.<kernel>.tmp-…`` / ``.old-…``
            Location.parse(p).delete_tree()


def write_results(store_path, kernel: str, arrays: dict[str, np.ndarray], attrs: dict) -> str:
    """Write a new results version of ``kernel`` and make it the current one.

    Parameters
    ----------
    store_path : str, os.PathLike or Location
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
    kloc = prepare_results(store_path, kernel)
    name = _new_version(kloc)
    try:
        _build_version(kloc.child(name), arrays, attrs)
        if not _set_pointer(kloc, name):
            kloc.delete_tree(name)  # superseded by a later solve
            return name
    except BaseException:
        kloc.delete_tree(name)
        raise
    _cleanup(kloc, kernel)
    return name
