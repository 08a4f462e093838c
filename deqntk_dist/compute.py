"""Plan -> Dask tasks -> kernel store: retries, bounded tiles in flight, progress, resume.

Per-chunk functions (:func:`run_tile`, :func:`run_self_covariance`) run on the workers: they
read their input rows from the dataset store themselves, compute with the pure kernel
maths, write whole chunks and then the ledger.  Only small job descriptions and reports
go through the scheduler.  :func:`compute_kernel_store` builds and drives the tasks; resume
is driven by the store's ledger (the missing tiles are exactly those not marked done).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import errors
from .dataset import DatasetStore, open_dataset_store
from .errors import DeqntkError, InputError, StoreError, StoreMismatchError
from .plan import cdeq_pair_seconds, choose_tile, tile_cap
from .runtime import RuntimeConfig, cluster_summary, dashboard_link, dask_client
from .spec import CDEQSpec, DEQSpec
from .store import (
    KERNEL_NAMES,
    AlignedBuffers,
    KernelStore,
    check_dataset_shape,
    create_kernel_store,
    open_kernel_store,
)

__all__ = [
    "AuxJob",
    "ComputeReport",
    "TileJob",
    "compute_kernel_store",
    "run_self_covariance",
    "run_tile",
]

#: Default cap of the per-tile memory budget (bytes) when a worker has more memory.
MAX_TILE_BUDGET = 2 * 2**30
#: Slice tolerance of CDEQ stores whose options do not record one (written before it was).
LEGACY_CDEQ_TOL = 1e-13


# ----------------------------------------------------------------- per-chunk (worker) side
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

    def describe(self) -> str:
        return f"self-covariance rows [{self.start}, {self.stop})"


_STORES: dict[tuple, KernelStore] = {}
_DATASETS: dict[tuple, DatasetStore] = {}
_ROWS: OrderedDict[tuple, np.ndarray] = OrderedDict()
#: Row blocks kept per worker: at least this many, and more while within ``_ROWS_BYTES``
#: (a worker then reads each block of a mid-sized dataset once, not once per tile).
_ROWS_KEEP = 3
_ROWS_BYTES = 512 * 2**20


def _store(path: str) -> KernelStore:
    key = (path, os.stat(Path(path) / "zarr.json").st_mtime_ns)
    if key not in _STORES:
        _STORES.clear()
        _STORES[key] = open_kernel_store(path, writable=True)
    return _STORES[key]


def _rows(dataset: str, fingerprint: str, start: int, stop: int) -> np.ndarray:
    """float64 rows of the dataset store a kernel store was made for.

    A per-process LRU cache keeps recent row blocks (at least ``_ROWS_KEEP``, more within
    ``_ROWS_BYTES``), so a worker rarely reads a block twice.  The dataset must still carry the
    fingerprint recorded in the kernel store: rows of another dataset are never mixed in.
    """
    key = (dataset, os.stat(Path(dataset) / "zarr.json").st_mtime_ns)
    if key not in _DATASETS:
        _DATASETS.clear()
        _ROWS.clear()
        _DATASETS[key] = open_dataset_store(dataset)
    ds = _DATASETS[key]
    if ds.fingerprint != fingerprint:
        raise StoreMismatchError(
            f"dataset store {dataset} now has fingerprint {ds.fingerprint}, but the kernel "
            f"store was computed from {fingerprint}; it was changed after the store was made"
        )
    rkey = (key, start, stop)
    if rkey in _ROWS:
        _ROWS.move_to_end(rkey)
        return _ROWS[rkey]
    X = ds.rows(start, stop).astype(np.float64)
    _ROWS[rkey] = X
    while len(_ROWS) > _ROWS_KEEP and sum(a.nbytes for a in _ROWS.values()) > _ROWS_BYTES:
        _ROWS.popitem(last=False)
    return X


_BUFFERS = AlignedBuffers()


def _tile_buffers(ks: KernelStore, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Reused, page-aligned output arrays (store dtype) for a tile of ``shape``.

    The tile kernel writes the store's values straight into them, and the store writes
    them with direct I/O: no per-tile float64 outputs, cast copies or fresh memory.
    """
    key = (shape, ks.dtype.str, ks.kernels)
    return _BUFFERS.get(key, {name: shape for name in ks.kernels}, ks.dtype)


@contextlib.contextmanager
def _thread_limit(threads: int | None):
    """Limit numba and the BLAS to ``threads`` in this task (None: leave as is)."""
    import numba

    # numba re-reads NUMBA_NUM_THREADS from the environment whenever it compiles (first use
    # on a machine without a cache) and refuses a value other than the one its thread pool
    # was launched with; a worker's environment may differ from it (the nanny sets it
    # around the spawn), so pin the variable to the pool's size.
    os.environ["NUMBA_NUM_THREADS"] = str(numba.config.NUMBA_NUM_THREADS)
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(previous)


def _failure(what: str, exc: DeqntkError) -> dict[str, Any]:
    return {"ok": False, "what": what, "type": type(exc).__name__, "error": str(exc)}


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_tile(job: TileJob) -> dict[str, Any]:
    """Compute tile (i, j) on this worker, write it and its mirror, then its ledger entry.

    A deterministic maths or input failure (:class:`DeqntkError`) is returned as a report
    with ``ok = False`` (retrying cannot help); anything else (I/O, memory) raises so that
    dask retries the task.  Nothing is marked done unless its data was written.

    Returns
    -------
    dict
        ``ok``, ``tile``, ``entries``, ``max_residual``, ``iterations``, ``seconds``
        (reading the rows + compute), ``read_seconds``, ``write_seconds``, ``bytes``
        (written), ``checksum``, ``peak_rss``, ``pid``.
    """
    from .kernels import kernel_matrix

    t0, c0 = time.perf_counter(), time.process_time()
    ks = _store(job.store)
    what = job.describe()
    X = _rows(job.dataset, ks.dataset_fingerprint, *job.rows)
    Y = None if job.i == job.j else _rows(job.dataset, ks.dataset_fingerprint, *job.cols)
    kw = dict(job.options)
    if isinstance(ks.spec, CDEQSpec):
        # stores made before the tolerance was recorded were computed at 1e-13
        kw.setdefault("tol", LEGACY_CDEQ_TOL)
        kw["self_x"] = ks.self_covariance_rows(*job.rows)
        if Y is not None:
            kw["self_y"] = ks.self_covariance_rows(*job.cols)
    t_read = time.perf_counter() - t0
    shape = (job.rows[1] - job.rows[0], job.cols[1] - job.cols[0])
    try:
        with _thread_limit(job.threads):
            res = kernel_matrix(ks.spec, X, Y, out=_tile_buffers(ks, shape), **kw)
    except DeqntkError as exc:
        return _failure(what, exc)
    t1, c1 = time.perf_counter(), time.process_time()
    values = {name: getattr(res, name) for name in ks.kernels}
    crc = ks.write_tile(
        job.i,
        job.j,
        values,
        max_residual=float(res.max_residual),
        iterations=int(res.iterations),
        seconds=t1 - t0,
    )
    n_entries = (job.rows[1] - job.rows[0]) * (job.cols[1] - job.cols[0])
    n_entries *= 1 if job.i == job.j else 2
    return {
        "ok": True,
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


def run_self_covariance(job: AuxJob) -> dict[str, Any]:
    """Compute and store the CDEQ self-covariances of rows ``[start, stop)``."""
    from .kernels import self_covariance

    ks = _store(job.store)
    X = _rows(job.dataset, ks.dataset_fingerprint, job.start, job.stop)
    try:
        with _thread_limit(job.threads):
            sc = self_covariance(ks.spec, X)
    except DeqntkError as exc:
        return _failure(job.describe(), exc)
    ks.write_self_covariance(job.start, job.stop, sc)
    return {"ok": True, "rows": (job.start, job.stop), "peak_rss": _peak_rss()}


# ------------------------------------------------------------------------ driver side
@dataclass(frozen=True, kw_only=True)
class ComputeReport:
    """What one :func:`compute_kernel_store` call did.

    Attributes
    ----------
    store : str
    tiles_total, tiles_done_before, tiles_computed : int
    entries_computed : int
        Store entries written by this call (a tile and its mirror).
    seconds : float
        Wall time of the tile phase.
    entries_per_second : float
    bytes_written : int
    max_residual : float
    peak_rss : dict
        Worker pid -> peak resident memory (bytes) reported by its tiles.
    compute_seconds, write_seconds : float
        Summed over tiles: reading rows + kernel maths, and cast + checksum + write + ledger.
    read_seconds : float
        The part of ``compute_seconds`` spent reading rows from the dataset store.
    compute_cpu_seconds, write_cpu_seconds : float
        The same phases in worker CPU time (robust to a shared, oversubscribed machine).
    tile : int
    workers : int
    """

    store: str
    tiles_total: int
    tiles_done_before: int
    tiles_computed: int
    entries_computed: int
    seconds: float
    entries_per_second: float
    bytes_written: int
    max_residual: float
    peak_rss: dict
    compute_seconds: float
    read_seconds: float
    write_seconds: float
    compute_cpu_seconds: float
    write_cpu_seconds: float
    tile: int
    workers: int


class Progress:
    """One-line progress bar on a stream: tiles done/total, entries/s, ETA."""

    def __init__(
        self,
        total_tiles,
        done_tiles,
        total_entries,
        done_entries,
        *,
        stream=None,
        enabled=True,
        interval=None,
    ):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.total_tiles, self.tiles = total_tiles, done_tiles
        self.total_entries, self.entries = total_entries, done_entries
        self.start_entries = done_entries
        self.t0 = time.perf_counter()
        self.last = -1e9

    def update(self, entries: int, *, force: bool = False) -> None:
        self.tiles += 1
        self.entries += entries
        self.show(force=force)

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return (self.entries - self.start_entries) / dt if dt > 0 else 0.0

    def show(self, *, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.interval):
            return
        self.last = now
        rate = self.rate()
        left = self.total_entries - self.entries
        eta = _hms(left / rate) if rate > 0 else "?"
        frac = self.entries / self.total_entries if self.total_entries else 1.0
        bar = "#" * int(20 * frac)
        line = (
            f"[{bar:<20}] {self.tiles}/{self.total_tiles} tiles  "
            f"{self.entries:.3g}/{self.total_entries:.3g} entries  {rate:.3g} entries/s  "
            f"ETA {eta}"
        )
        end = "" if self.tty else "\n"
        self.stream.write(("\r" + line if self.tty else line) + end)
        self.stream.flush()

    def close(self) -> None:
        self.show(force=True)
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _raise_failures(failures: list[dict]) -> None:
    first = failures[0]
    cls = getattr(errors, first.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, DeqntkError)):
        cls = StoreError
    more = f" (and {len(failures) - 1} more failed tasks)" if len(failures) > 1 else ""
    msg = f"{first['what']} failed: {first['error']}{more}; finished tiles are kept in the store"
    if cls is errors.FixedPointError:
        raise errors.FixedPointError(msg)
    raise cls(msg)


def _run_jobs(client, fn, jobs, *, limit, retries, token, on_result):
    """Submit ``jobs`` with at most ``limit`` in flight; call ``on_result`` per success.

    Returns the failure reports (submission stops at the first failure; tasks already in
    flight finish, so their work is kept).
    """
    from distributed import as_completed

    failures: list[dict] = []
    pending = iter(enumerate(jobs))
    ac = as_completed()
    described: dict[str, str] = {}

    def submit_next() -> bool:
        nxt = next(pending, None)
        if nxt is None:
            return False
        k, job = nxt
        key = f"deqntk-{fn.__name__}-{token}-{k}"
        described[key] = job.describe()
        ac.add(client.submit(fn, job, key=key, retries=retries, pure=False))
        return True

    for _ in range(limit):
        if not submit_next():
            break
    for fut in ac:
        try:
            out = fut.result()
        except Exception as exc:  # remote error after retries, or a lost worker
            out = {
                "ok": False,
                "what": described.get(fut.key, str(fut.key)),
                "type": "",
                "error": f"{type(exc).__name__}: {exc}",
            }
        described.pop(fut.key, None)
        fut.release()
        if out.get("ok"):
            on_result(out)
        else:
            failures.append(out)
        if not failures:
            submit_next()
    return failures


def _store_options(spec, options, existing: KernelStore | None, dtype: str) -> dict:
    """Kernel options of the store: as given, else the existing store's, else the defaults
    (a CDEQ store records the slice tolerance its dtype needs)."""
    if options is not None:
        options = dict(options)
        if isinstance(spec, DEQSpec) and "tol" in options:
            raise InputError(f"tol applies to the cdeq kernel only, got options={options}")
        return options
    if existing is not None:
        return dict(existing.options)
    if isinstance(spec, CDEQSpec):
        from .kernels.conv import DEFAULT_TOL, FLOAT32_TOL

        return {"tol": FLOAT32_TOL if dtype == "float32" else DEFAULT_TOL}
    return {}


def _validate(spec, kernels, dtype, tile, max_in_flight, retries) -> None:
    if not isinstance(spec, DEQSpec | CDEQSpec):
        raise InputError(f"spec must be a DEQSpec or CDEQSpec, got {type(spec).__name__}")
    if kernels is not None:
        bad = [k for k in kernels if k not in KERNEL_NAMES]
        if bad or not kernels:
            raise InputError(
                f"what must be a non-empty list of {', '.join(KERNEL_NAMES)}, got {list(kernels)}"
            )
    if dtype is not None and dtype not in ("float32", "float64"):
        raise InputError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    for name, v, lo in (
        ("tile", tile, 1),
        ("max_in_flight", max_in_flight, 1),
        ("retries", retries, 0),
    ):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise InputError(f"{name} must be an integer >= {lo}, got {v!r}")


def compute_kernel_store(
    dataset,
    store,
    spec: DEQSpec | CDEQSpec,
    *,
    kernels=None,
    tile: int | None = None,
    dtype: str | None = None,
    options: dict | None = None,
    client=None,
    runtime: RuntimeConfig | None = None,
    memory_budget: int | None = None,
    max_in_flight: int | None = None,
    retries: int = 2,
    task_threads: int | None = 1,
    progress: bool = True,
    log=None,
) -> ComputeReport:
    """Compute (or finish) the kernel store of a dataset store on Dask.

    Parameters
    ----------
    dataset : str, Path or DatasetStore
        The dataset store (its rows are read by the workers).
    store : str or Path
        Kernel store path; created if absent, resumed if present (same settings).
    spec : DEQSpec or CDEQSpec
    kernels : sequence of {"ntk", "nngp"}, optional
        Arrays to store (default: the existing store's, else both).
    tile : int, optional
        Tile side (default: the existing store's, else from ``memory_budget``).
    dtype : {"float32", "float64"}, optional
        Store dtype (default: the existing store's, else float32).
    options : dict, optional
        Extra keyword options for every tile's ``kernel_matrix`` call, part of the store's
        identity (default: the existing store's; for a new CDEQ store ``{"tol": t}`` with
        the slice tolerance of its dtype, 1e-9 for float32 and 1e-13 for float64).
    client : distributed.Client, optional
        Use this client; otherwise one is started from ``runtime`` and closed at the end.
    runtime : RuntimeConfig, optional
        LocalCluster (default), ``scheduler`` address, or a batch cluster.
    memory_budget : int, optional
        Bytes per tile on a worker (default: half the worker memory limit, at most 2 GiB).
    max_in_flight : int, optional
        Tiles submitted at once (default: 2 x worker threads, at least 2).
    retries : int
        Dask retries per task (I/O errors, lost workers).
    task_threads : int or None
        numba / BLAS threads inside a task (default 1; None leaves the worker's setting).
    progress : bool
        Progress bar on stderr.
    log : callable, optional
        Receives one-line messages (default: print to stderr).

    Returns
    -------
    ComputeReport

    Raises
    ------
    StoreError, StoreMismatchError
        Missing dataset store, unwritable destination, settings differ from the store's.
    FixedPointError
        A tile did not converge (the tiles that finished stay in the store).
    """
    _validate(spec, kernels, dtype, tile, max_in_flight, retries)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    ds = dataset if isinstance(dataset, DatasetStore) else open_dataset_store(dataset)
    check_dataset_shape(ds, spec)
    path = Path(store).absolute()
    existing = open_kernel_store(path) if path.exists() else None

    dtype = dtype or (existing.dtype.name if existing else "float32")
    options = _store_options(spec, options, existing, dtype)

    def make_store(tile: int) -> KernelStore:
        return create_kernel_store(
            path,
            ds,
            spec,
            tile=tile,
            dtype=dtype,
            kernels=kernels or (existing.kernels if existing else KERNEL_NAMES),
            options=options,
        )

    # settings are checked against an existing store before any cluster is started
    tile = tile or (existing.tile if existing is not None else None)
    ks = make_store(tile) if tile is not None else None
    ctx = contextlib.nullcontext(client) if client is not None else dask_client(runtime)
    with ctx as cl:
        summary = cluster_summary(cl)
        if ks is None:
            limit = summary["memory_limit"]
            budget = memory_budget or min(MAX_TILE_BUDGET, limit // 2 if limit else 2**30)
            cap = tile_cap(
                ds.n,
                workers=max(1, summary["threads"]),
                pair_seconds=cdeq_pair_seconds(spec, ds.feature_shape)
                if isinstance(spec, CDEQSpec)
                else None,
            )
            ks = make_store(choose_tile(ds.n, int(budget), max_side=cap))
        link = dashboard_link(cl)
        say(
            f"deqntk: {summary['workers']} workers / {summary['threads']} threads; dashboard: "
            + (link or "not available (install bokeh)")
        )
        token = uuid.uuid4().hex[:8]
        limit = max_in_flight or max(2, 2 * summary["threads"])
        if isinstance(spec, CDEQSpec):
            aux = [
                AuxJob(store=ks.path, dataset=ds.path, start=a, stop=b, threads=task_threads)
                for a, b in ks.self_covariance_missing()
            ]
            if aux:
                say(f"deqntk: self-covariances of {ds.n} examples ({len(aux)} tasks)")
                fails = _run_jobs(
                    cl,
                    run_self_covariance,
                    aux,
                    limit=limit,
                    retries=retries,
                    token=token,
                    on_result=lambda r: None,
                )
                if fails:
                    _raise_failures(fails)
        return _compute_tiles(
            cl,
            ks,
            ds,
            summary,
            limit=limit,
            retries=retries,
            token=token,
            task_threads=task_threads,
            progress=progress,
            say=say,
        )


def _compute_tiles(cl, ks, ds, summary, *, limit, retries, token, task_threads, progress, say):
    plan = ks.plan
    missing = plan.largest_first(ks.missing_tiles())
    done_before = plan.n_tiles - len(missing)
    entries_total = plan.n * plan.n
    entries_before = entries_total - sum(plan.entries(t) for t in missing)
    say(
        f"deqntk: {ks.path}: n={plan.n}, tile={plan.tile}, {plan.n_tiles} tiles; "
        f"{done_before} done, computing {len(missing)}"
    )
    jobs = [
        TileJob(
            store=ks.path,
            dataset=ds.path,
            i=i,
            j=j,
            rows=plan.bounds(i),
            cols=plan.bounds(j),
            threads=task_threads,
            options=dict(ks.options),
        )
        for i, j in missing
    ]
    bar = Progress(
        plan.n_tiles, done_before, entries_total, entries_before, enabled=progress and bool(jobs)
    )
    acc = {"entries": 0, "bytes": 0, "res": 0.0, "peak": {}}
    acc.update(compute=0.0, read=0.0, write=0.0, compute_cpu=0.0, write_cpu=0.0)

    def on_result(r: dict) -> None:
        acc["entries"] += r["entries"]
        acc["bytes"] += r["bytes"]
        acc["res"] = max(acc["res"], r["max_residual"])
        acc["compute"] += r["seconds"]
        acc["read"] += r["read_seconds"]
        acc["write"] += r["write_seconds"]
        acc["compute_cpu"] += r["cpu_seconds"]
        acc["write_cpu"] += r["write_cpu_seconds"]
        acc["peak"][r["pid"]] = max(acc["peak"].get(r["pid"], 0), r["peak_rss"])
        bar.update(r["entries"])

    t0 = time.perf_counter()
    failures = (
        _run_jobs(
            cl, run_tile, jobs, limit=limit, retries=retries, token=token, on_result=on_result
        )
        if jobs
        else []
    )
    seconds = time.perf_counter() - t0
    bar.close()
    if failures:
        _raise_failures(failures)
    computed = len(jobs)
    still = ks.missing_tiles()
    if still:  # cannot happen unless the store was changed under us
        raise StoreError(f"{ks.path}: {len(still)} tiles still missing after the run: {still[:5]}")
    return ComputeReport(
        store=ks.path,
        tiles_total=plan.n_tiles,
        tiles_done_before=done_before,
        tiles_computed=computed,
        entries_computed=acc["entries"],
        seconds=seconds,
        entries_per_second=acc["entries"] / seconds if seconds > 0 else 0.0,
        bytes_written=acc["bytes"],
        max_residual=acc["res"],
        peak_rss=dict(acc["peak"]),
        compute_seconds=acc["compute"],
        read_seconds=acc["read"],
        write_seconds=acc["write"],
        compute_cpu_seconds=acc["compute_cpu"],
        write_cpu_seconds=acc["write_cpu"],
        tile=plan.tile,
        workers=summary["workers"],
    )
