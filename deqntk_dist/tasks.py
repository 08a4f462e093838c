"""The tasks a ``compute`` job runs on Dask workers, one per tile or self-covariance chunk.

:func:`run_tile` and :func:`run_self_covariance` read their input rows from the dataset
store themselves, compute with the pure kernel maths, write whole chunks and then the
ledger.  Only small job descriptions (:class:`TileJob`, :class:`AuxJob`) and reports go
through the scheduler.  Failures that a retry cannot fix (a maths or input error, a full or
read-only disk, a store whose attrs changed) come back as reports with ``ok = False`` that
carry the :class:`~deqntk_dist.errors.DeqntkError` itself (the driver re-raises it, see
:mod:`deqntk_dist.scheduling`); anything else raises so that dask retries the task.  What a
worker keeps between tasks (open stores, row blocks, output buffers) is its
:class:`WorkerCache`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DeqntkError, StoreError, StoreMismatchError
from .spec import CDEQSpec
from .store import AlignedBuffers, KernelStore, open_kernel_store
from .store.core import FATAL_WRITE_ERRNOS
from .store.dataset import DatasetStore, open_dataset_store
from .store.location import Location

__all__ = [
    "FATAL_WRITE_ERRNOS",
    "LEGACY_CDEQ_TOL",
    "AuxJob",
    "TileJob",
    "WorkerCache",
    "run_self_covariance",
    "run_tile",
    "worker_cache",
]

#: Slice tolerance of CDEQ stores whose options do not record one (written before it was).
LEGACY_CDEQ_TOL = 1e-13


@dataclass(frozen=True, kw_only=True)
class TileJob:
    """Everything a worker needs for tile (i, j): paths and row ranges, never arrays."""

    store: str
    dataset: str
    i: int
    j: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    threads: int | None = 1
    options: dict = field(default_factory=dict)
    #: the store identity digest the driver planned under ("" skips the check)
    identity: str = ""

    def describe(self) -> str:
        (r0, r1), (c0, c1) = self.rows, self.cols
        return f"tile ({self.i}, {self.j}) rows [{r0}, {r1}) x cols [{c0}, {c1})"


@dataclass(frozen=True, kw_only=True)
class AuxJob:
    """Rows ``[start, stop)`` of the CDEQ self-covariances (one aux chunk)."""

    store: str
    dataset: str
    start: int
    stop: int
    threads: int | None = 1
    identity: str = ""

    def describe(self) -> str:
        return f"self-covariance rows [{self.start}, {self.stop})"


#: Row blocks a worker keeps: at least this many, and more while within
#: :data:`ROWS_BYTES` (a worker then reads each block of a mid-sized dataset once, not once
#: per tile).
ROWS_KEEP = 3
ROWS_BYTES = 512 * 2**20


def store_stamp(path: str):
    """When a store's root metadata (``zarr.json``) last changed: a cached open of the store
    is stale once this differs."""
    loc = Location.parse(path)
    if loc.is_local:
        return os.stat(Path(loc.url) / "zarr.json").st_mtime_ns
    return loc.mtime("zarr.json")


class WorkerCache:
    """What a worker process keeps between its tasks (one instance per process,
    :func:`worker_cache`).

    * the open kernel store (one: reopened when its ``zarr.json`` changes, see
      :func:`store_stamp`),
    * the open dataset store (one, likewise; opening another drops the cached rows),
    * an LRU of float64 row blocks of that dataset: at least ``rows_keep`` blocks, more
      while they hold at most ``rows_bytes`` bytes,
    * reused page-aligned tile output buffers (per thread: a process running several
      tasks at once never shares them).

    The bookkeeping is thread-safe; rows are read outside the lock.
    """

    def __init__(self, *, rows_keep: int = ROWS_KEEP, rows_bytes: int = ROWS_BYTES):
        self.rows_keep = rows_keep
        self.rows_bytes = rows_bytes
        self._lock = threading.Lock()
        self._store: tuple[tuple, KernelStore] | None = None
        self._dataset: tuple[tuple, DatasetStore] | None = None
        self._rows: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._buffers = AlignedBuffers()

    def clear(self) -> None:
        """Forget every open store, row block and output buffer."""
        with self._lock:
            self._store = self._dataset = None
            self._rows.clear()
            self._buffers = AlignedBuffers()

    def kernel_store(self, path: str) -> KernelStore:
        """The kernel store at ``path``, opened writable (reused while unchanged)."""
        key = (path, store_stamp(path))
        with self._lock:
            if self._store is not None and self._store[0] == key:
                return self._store[1]
        ks = open_kernel_store(path, writable=True)
        with self._lock:
            self._store = (key, ks)
        return ks

    def _dataset_store(self, path: str) -> tuple[tuple, DatasetStore]:
        key = (path, store_stamp(path))
        with self._lock:
            if self._dataset is not None and self._dataset[0] == key:
                return self._dataset
        ds = open_dataset_store(path)
        with self._lock:
            if self._dataset is None or self._dataset[0] != key:
                self._dataset = (key, ds)
                self._rows.clear()
            return self._dataset

    def rows(self, dataset: str, fingerprint: str, start: int, stop: int) -> np.ndarray:
        """float64 rows ``[start, stop)`` of the dataset store a kernel store was made for.

        The dataset must still carry ``fingerprint`` (the one recorded in the kernel store):
        rows of another dataset are never mixed in (:class:`StoreMismatchError`).
        """
        key, ds = self._dataset_store(dataset)
        if ds.fingerprint != fingerprint:
            raise StoreMismatchError(
                f"dataset store {dataset} now has fingerprint {ds.fingerprint}, but the kernel "
                f"store was computed from {fingerprint}; it was changed after the store was made"
            )
        rkey = (key, start, stop)
        with self._lock:
            if rkey in self._rows:
                self._rows.move_to_end(rkey)
                return self._rows[rkey]
        X = ds.rows(start, stop).astype(np.float64)
        with self._lock:
            if self._dataset is not None and self._dataset[0] == key:
                self._rows[rkey] = X
                self._rows.move_to_end(rkey)
                self._trim_rows()
        return X

    def _trim_rows(self) -> None:
        while len(self._rows) > self.rows_keep and self.row_bytes() > self.rows_bytes:
            self._rows.popitem(last=False)

    def row_bytes(self) -> int:
        """Bytes of the cached row blocks."""
        return sum(a.nbytes for a in self._rows.values())

    def cached_rows(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of the cached row blocks, least recently used first."""
        with self._lock:
            return [(start, stop) for _, start, stop in self._rows]

    def tile_buffers(self, ks: KernelStore, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """Reused, page-aligned output arrays (store dtype) for a tile of ``shape``.

        The tile kernel writes the store's values straight into them, and the store writes
        them with direct I/O: no per-tile float64 outputs, cast copies or fresh memory.
        """
        key = (shape, ks.dtype.str, ks.kernels)
        return self._buffers.get(key, {name: shape for name in ks.kernels}, ks.dtype)


_CACHE = WorkerCache()


def worker_cache() -> WorkerCache:
    """The :class:`WorkerCache` of this process."""
    return _CACHE


@contextlib.contextmanager
def _thread_limit(threads: int | None):
    """Limit numba and the BLAS to ``threads`` in this task (None: leave as is)."""
    import numba

    # numba re-reads NUMBA_NUM_THREADS from the environment whenever it compiles (first use
    # on a machine without a cache) and refuses a value other than the one its thread pool
    # was launched with; a worker's environment may differ from it (the nanny sets it
    # around the spawn), so pin the variable to the pool's size.
    os.environ["NUMBA_NUM_THREADS"] = str(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(previous)


def _failure(what: str, exc: DeqntkError) -> dict[str, Any]:
    """The report of a task that failed with ``exc``: the exception itself travels to the
    driver (every :class:`DeqntkError` pickles with its attributes); one that does not
    pickle (an attribute added by hand) travels as a :class:`StoreError` with its text."""
    try:
        pickle.dumps(exc)
    except Exception:
        exc = StoreError(f"{type(exc).__name__}: {exc}")
    return {"ok": False, "what": what, "error": exc}


@contextlib.contextmanager
def _fatal_write_errors(path: str):
    """Turn write errors that a retry cannot fix (full disk, read-only filesystem, no
    permission) into a :class:`StoreError`, which the task reports instead of raising."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in FATAL_WRITE_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise StoreError(
            f"cannot write to the kernel store {path}: {exc.strerror or exc}{where}"
        ) from exc


def _check_identity(ks: KernelStore, job) -> None:
    if job.identity and job.identity != ks.identity_digest:
        raise StoreMismatchError(
            f"the attrs of kernel store {ks.path} changed while the job ran (identity "
            f"{ks.identity_digest}, planned under {job.identity}); nothing was written"
        )


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_tile(job: TileJob) -> dict[str, Any]:
    """Compute tile (i, j) on this worker, write it and its mirror, then its ledger entry.

    A deterministic maths or input failure (:class:`DeqntkError`) is returned as a report
    with ``ok = False`` and the exception as ``error`` (retrying cannot help); anything
    else (I/O, memory) raises so that dask retries the task.  Nothing is marked done unless
    its data was written.

    A tile the ledger already marks done is not computed again (a task re-executed
    after its worker left with the result unread, e.g. a worker retiring at the end of its
    lifetime): the report is rebuilt from the ledger with ``reused = True``.

    Returns
    -------
    dict
        ``ok``, ``tile``, ``entries``, ``max_residual``, ``iterations``, ``seconds``
        (reading the rows + compute), ``read_seconds``, ``write_seconds``, ``bytes``
        (written), ``checksum``, ``peak_rss``, ``pid``, ``reused``.
    """
    from .kernels import kernel_matrix

    t0, c0 = time.perf_counter(), time.process_time()
    cache = worker_cache()
    ks = cache.kernel_store(job.store)
    what = job.describe()
    shape = (job.rows[1] - job.rows[0], job.cols[1] - job.cols[0])
    n_entries = shape[0] * shape[1] * (1 if job.i == job.j else 2)
    try:
        _check_identity(ks, job)
        if ks.tile_done(job.i, job.j):
            return _reused(ks, job, n_entries)
        X = cache.rows(job.dataset, ks.dataset_fingerprint, *job.rows)
        Y = None if job.i == job.j else cache.rows(job.dataset, ks.dataset_fingerprint, *job.cols)
        kw = dict(job.options)
        if isinstance(ks.spec, CDEQSpec):
            # stores made before the tolerance was recorded were computed at 1e-13
            kw.setdefault("tol", LEGACY_CDEQ_TOL)
            kw["self_x"] = ks.self_covariance_rows(*job.rows)
            if Y is not None:
                kw["self_y"] = ks.self_covariance_rows(*job.cols)
        t_read = time.perf_counter() - t0
        with _thread_limit(job.threads):
            res = kernel_matrix(ks.spec, X, Y, out=cache.tile_buffers(ks, shape), **kw)
    except DeqntkError as exc:
        return _failure(what, exc)
    t1, c1 = time.perf_counter(), time.process_time()
    values = {name: getattr(res, name) for name in ks.kernels}
    try:
        with _fatal_write_errors(ks.path):
            crc = ks.write_tile(
                job.i,
                job.j,
                values,
                max_residual=float(res.max_residual),
                iterations=int(res.iterations),
                seconds=t1 - t0,
            )
    except StoreError as exc:
        return _failure(what, exc)
    return {
        "ok": True,
        "reused": False,
        "tile": (job.i, job.j),
        "entries": n_entries,
        "max_residual": float(res.max_residual),
        "iterations": int(res.iterations),
        "seconds": t1 - t0,
        "read_seconds": t_read,
        "write_seconds": time.perf_counter() - t1,
        "cpu_seconds": c1 - c0,
        "write_cpu_seconds": time.process_time() - c1,
        "bytes": n_entries * ks.dtype.itemsize * len(ks.kernels),
        "checksum": crc["checksum"],
        "peak_rss": _peak_rss(),
        "pid": os.getpid(),
    }


def _reused(ks: KernelStore, job: TileJob, n_entries: int) -> dict[str, Any]:
    """The report of a tile that was already done, from its ledger entries."""
    fields = ("max_residual", "iterations", "checksum")
    entry = {f: ks.ledger_entry(f, job.i, job.j) for f in fields}
    return {
        "ok": True,
        "reused": True,
        "tile": (job.i, job.j),
        "entries": n_entries,
        "max_residual": float(entry["max_residual"]),
        "iterations": int(entry["iterations"]),
        "seconds": 0.0,
        "read_seconds": 0.0,
        "write_seconds": 0.0,
        "cpu_seconds": 0.0,
        "write_cpu_seconds": 0.0,
        "bytes": 0,
        "checksum": int(entry["checksum"]),
        "peak_rss": _peak_rss(),
        "pid": os.getpid(),
    }


def run_self_covariance(job: AuxJob) -> dict[str, Any]:
    """Compute and store the CDEQ self-covariances of rows ``[start, stop)``."""
    from .kernels import self_covariance

    cache = worker_cache()
    ks = cache.kernel_store(job.store)
    try:
        _check_identity(ks, job)
        X = cache.rows(job.dataset, ks.dataset_fingerprint, job.start, job.stop)
        with _thread_limit(job.threads):
            sc = self_covariance(ks.spec, X)
        with _fatal_write_errors(ks.path):
            ks.write_self_covariance(job.start, job.stop, sc)
    except DeqntkError as exc:
        return _failure(job.describe(), exc)
    return {"ok": True, "rows": (job.start, job.stop), "peak_rss": _peak_rss()}
