"""Plan -> Dask tasks -> kernel store: retries, bounded tiles in flight, leases, progress,
resume.

The per-chunk tasks (:func:`~deqntk_dist.tasks.run_tile`,
:func:`~deqntk_dist.tasks.run_self_covariance`) run on the workers (:mod:`.tasks`).
:func:`compute_kernel_store` checks the store before any cluster starts
(:func:`~deqntk_dist.store.resume.prepare_resume`), then submits the missing tiles in the
order that keeps a partial store usable (:meth:`~deqntk_dist.plan.TilePlan.usable_first`),
each after leasing it (:mod:`deqntk_dist.store.lease`), so concurrent jobs on one store
share the work.  Resume is driven by the store's ledger (the missing tiles are exactly those
not marked done).
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from . import errors
from .errors import DeqntkError, InputError, StoreError
from .plan import cdeq_pair_seconds, choose_tile, tile_cap
from .runtime import (
    RuntimeConfig,
    cluster_health,
    cluster_summary,
    dashboard_link,
    dask_client,
)
from .spec import CDEQSpec, DEQSpec
from .store import (
    KERNEL_NAMES,
    KernelStore,
    check_dataset_shape,
    create_kernel_store,
    open_kernel_store,
)
from .store.core import KERNEL_FORMAT_VERSION
from .store.dataset import DatasetStore, open_dataset_store
from .store.lease import NoLeases, TileLeases, leases_for
from .store.location import Location
from .store.resume import prepare_resume
from .store.shards import DEFAULT_CHUNK
from .tasks import AuxJob, TileJob, run_self_covariance, run_tile

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
#: Smallest ``memory_budget`` accepted (bytes).
MIN_MEMORY_BUDGET = 2**20
#: Seconds between checks of tiles leased by another job.
LEASE_POLL_SECONDS = 1.0
#: seconds between runtime health checks while the driver waits for a tile (batch queues)
HEALTH_POLL_SECONDS = 0.05


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
    tiles_by_others : int
        Tiles this call found leased by another job and left to it (done when it returned,
        unless ``max_tiles`` stopped it first).
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
    tiles_by_others: int = 0


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


def _run_jobs(
    client,
    fn,
    next_job: Callable[[], Any],
    *,
    limit: int,
    retries: int,
    token: str,
    on_result: Callable[[Any, dict], None],
    on_failure: Callable[[Any], None] = lambda job: None,
    more_later: Callable[[], bool] = lambda: False,
    poll: float = LEASE_POLL_SECONDS,
    health: Callable[[], None] | None = None,
) -> list[dict]:
    """Submit the jobs ``next_job()`` hands out (None: none now) with at most ``limit`` in
    flight; ``on_result(job, report)`` per success.  While nothing is in flight and
    ``more_later()`` says jobs may still come (tiles leased by another job), poll.
    ``health()`` (if given) is called while waiting and raises when the runtime gave up
    (a batch queue whose worker jobs keep failing to start).

    Returns the failure reports (submission stops at the first failure; tasks already in
    flight finish, so their work is kept).
    """
    from distributed import as_completed

    failures: list[dict] = []
    ac = as_completed()
    jobs: dict[str, Any] = {}
    count = 0

    def fill() -> None:
        nonlocal count
        while len(jobs) < limit and not failures:
            job = next_job()
            if job is None:
                return
            key = f"deqntk-{fn.__name__}-{token}-{count}"
            count += 1
            jobs[key] = job
            ac.add(client.submit(fn, job, key=key, retries=retries, pure=False))

    fill()
    while True:
        if ac.is_empty():
            if failures or not more_later():
                break
            time.sleep(poll)
            fill()
            continue
        if health is not None:
            while not ac.has_ready():
                health()
                time.sleep(HEALTH_POLL_SECONDS)
        fut = next(ac)
        job = jobs.pop(fut.key)
        try:
            out = fut.result()
        except Exception as exc:  # remote error after retries, or a lost worker
            out = {
                "ok": False,
                "what": job.describe(),
                "type": "",
                "error": f"{type(exc).__name__}: {exc}",
            }
        fut.release()
        if out.get("ok"):
            on_result(job, out)
        else:
            on_failure(job)
            failures.append(out)
        fill()
    return failures


def _jobs_of(items) -> Callable[[], Any]:
    it = iter(items)
    return lambda: next(it, None)


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


def _validate(spec, kernels, dtype, ints: dict[str, tuple[Any, int]]) -> None:
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
    for name, (v, lo) in ints.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise InputError(f"{name} must be an integer >= {lo}, got {v!r}")


def _local_cluster(client, runtime: RuntimeConfig | None) -> bool:
    """Whether this call starts its own LocalCluster (whose workers it may configure)."""
    return client is None and (
        runtime is None or (not runtime.scheduler and runtime.cluster == "local")
    )


class _IgnoreInterrupt(WorkerPlugin):
    """Worker plugin: the workers of a LocalCluster started by ``compute`` ignore SIGINT.

    Ctrl-C reaches the whole process group; the driver handles it (it closes the cluster),
    while workers would each print a traceback."""

    name = "deqntk-ignore-sigint"

    def setup(self, worker) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


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
    max_tiles: int | None = None,
    recompute_mismatched: bool = False,
    progress: bool = True,
    log=None,
    layout: int = KERNEL_FORMAT_VERSION,
    chunk: int = DEFAULT_CHUNK,
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
        Tile side (default: the existing store's, else from ``memory_budget``); a tile
        larger than the number of rows is one tile of all rows.
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
        Bytes per tile on a worker, at least 1 MiB (default: half the worker memory limit,
        at most 2 GiB).
    max_in_flight : int, optional
        Tiles submitted at once (default: 2 x worker threads, at least 2).
    retries : int
        Dask retries per task (I/O errors, lost workers).
    task_threads : int or None
        numba / BLAS threads inside a task, >= 1 (default 1; None leaves the worker's).
    max_tiles : int, optional
        Compute at most this many tiles in this call (e.g. to bound a batch job); the
        others stay missing for a later call.
    recompute_mismatched : bool
        Recompute finished tiles whose identity digest differs from the store's (its attrs
        were changed after they were written) instead of refusing the store.
    progress : bool
        Progress bar on stderr.
    log : callable, optional
        Receives one-line messages (default: print to stderr).
    layout, chunk : int
        Layout of a new store (2: one shard per tile with ``chunk``-sided inner chunks; 1:
        one chunk per tile) and its inner chunk side; an existing store keeps its own.

    Returns
    -------
    ComputeReport

    Raises
    ------
    InputError
        Bad arguments, or a tile so small that per-tile overhead would dominate.
    StoreError, StoreMismatchError
        Missing dataset store, unwritable destination (checked before any cluster starts),
        settings differ from the store's, tiles computed under another identity.
    FixedPointError
        A tile did not converge (the tiles that finished stay in the store).
    """
    ints = {
        "tile": (tile, 1),
        "max_in_flight": (max_in_flight, 1),
        "retries": (retries, 0),
        "memory_budget": (memory_budget, MIN_MEMORY_BUDGET),
        "task_threads": (task_threads, 1),
        "max_tiles": (max_tiles, 1),
    }
    _validate(spec, kernels, dtype, ints)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    ds = dataset if isinstance(dataset, DatasetStore) else open_dataset_store(dataset)
    check_dataset_shape(ds, spec)
    path = Location.parse(store, param="store")
    existing = open_kernel_store(path) if path.exists() else None

    dtype = dtype or (existing.dtype.name if existing else "float32")
    options = _store_options(spec, options, existing, dtype)

    def make_store(tile: int) -> KernelStore:
        ks = create_kernel_store(
            path,
            ds,
            spec,
            tile=tile,
            dtype=dtype,
            kernels=kernels or (existing.kernels if existing else KERNEL_NAMES),
            options=options,
            layout=layout,
            chunk=chunk,
        )
        prepare_resume(ks, ds, recompute_mismatched=recompute_mismatched, say=say)
        return ks

    # settings and writability are checked before any cluster is started
    tile = tile or (existing.tile if existing is not None else None)
    ks = make_store(tile) if tile is not None else None
    if ks is None and path.is_local:
        _check_parent(path.local_path)
    ctx = contextlib.nullcontext(client) if client is not None else dask_client(runtime)
    with ctx as cl:
        if _local_cluster(client, runtime):
            with contextlib.suppress(Exception):  # cosmetic: quiet Ctrl-C
                cl.register_plugin(_IgnoreInterrupt())
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
                AuxJob(
                    store=ks.path,
                    dataset=ds.path,
                    start=a,
                    stop=b,
                    threads=task_threads,
                    identity=ks.identity_digest,
                )
                for a, b in ks.self_covariance_missing()
            ]
            if aux:
                say(f"deqntk: self-covariances of {ds.n} examples ({len(aux)} tasks)")
                fails = _run_jobs(
                    cl,
                    run_self_covariance,
                    _jobs_of(aux),
                    limit=limit,
                    retries=retries,
                    token=token,
                    on_result=lambda job, r: None,
                    health=cluster_health(cl),
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
            max_tiles=max_tiles,
            progress=progress,
            say=say,
        )


def _check_parent(path: Path) -> None:
    """A new store's directory must be creatable: probe it before a cluster starts."""
    parent = path.parent
    if not parent.is_dir():
        raise StoreError(f"parent directory of the kernel store does not exist: {parent}")
    probe = parent / f".{path.name}.probe-{uuid.uuid4().hex[:12]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise StoreError(
            f"cannot create kernel store at {path}: {exc.strerror or exc} in {parent}"
        ) from exc


class _TileSource:
    """Hands out the missing tiles in order, each only once this job holds its lease and
    it is still not done; tiles leased by another job wait and are checked again."""

    def __init__(
        self, ks: KernelStore, order, leases: TileLeases | NoLeases, *, max_tiles, poll, say
    ):
        self.ks, self.leases, self.say, self.poll = ks, leases, say, poll
        self.queue = deque(order)
        self.waiting: dict[tuple[int, int], Any] = {}
        self.left = max_tiles if max_tiles is not None else len(self.queue)
        self.by_others = 0
        self.next_check = 0.0
        self.announced = False

    def _take(self, t: tuple[int, int]) -> bool:
        got, holder = self.leases.acquire(*t)
        if not got:
            self.waiting[t] = holder
            return False
        if self.ks.tile_done(*t):  # finished by another job before we leased it
            self.leases.release(*t)
            self.by_others += 1
            return False
        return True

    def __call__(self) -> tuple[int, int] | None:
        if self.left <= 0:
            return None
        while self.queue:
            t = self.queue.popleft()
            if self._take(t):
                self.left -= 1
                return t
        if self.waiting and not self.announced:
            holders = {h.describe() for h in self.waiting.values() if h is not None}
            self.say(
                f"deqntk: {len(self.waiting)} tiles are being computed by another job "
                f"({', '.join(sorted(holders)) or 'unknown'}); waiting for them"
            )
            self.announced = True
        now = time.monotonic()
        if self.waiting and now >= self.next_check:
            self.next_check = now + self.poll
            for t in list(self.waiting):
                if self.ks.tile_done(*t):
                    del self.waiting[t]
                    self.by_others += 1
                elif self._take(t):
                    del self.waiting[t]
                    self.left -= 1
                    return t
        return None

    def more_later(self) -> bool:
        return self.left > 0 and bool(self.waiting)


def _compute_tiles(
    cl, ks, ds, summary, *, limit, retries, token, task_threads, max_tiles, progress, say
):
    plan = ks.plan
    missing = plan.usable_first(ks.missing_tiles(), n_train=ks.n_train, last_round=limit)
    done_before = plan.n_tiles - len(missing)
    entries_total = plan.n * plan.n
    entries_before = entries_total - sum(plan.entries(t) for t in missing)
    todo = len(missing) if max_tiles is None else min(max_tiles, len(missing))
    say(
        f"deqntk: {ks.path}: n={plan.n}, tile={plan.tile}, {plan.n_tiles} tiles; "
        f"{done_before} done, computing {todo}"
    )

    def job_for(t: tuple[int, int]) -> TileJob:
        i, j = t
        return TileJob(
            store=ks.path,
            dataset=ds.path,
            i=i,
            j=j,
            rows=plan.bounds(i),
            cols=plan.bounds(j),
            threads=task_threads,
            options=dict(ks.options),
            identity=ks.identity_digest,
        )

    bar = Progress(
        plan.n_tiles, done_before, entries_total, entries_before, enabled=progress and bool(todo)
    )
    acc = {"entries": 0, "bytes": 0, "res": 0.0, "peak": {}, "tiles": 0}
    acc.update(compute=0.0, read=0.0, write=0.0, compute_cpu=0.0, write_cpu=0.0)

    t0 = time.perf_counter()
    with leases_for(ks) as leases:
        source = _TileSource(
            ks, missing, leases, max_tiles=max_tiles, poll=LEASE_POLL_SECONDS, say=say
        )

        def next_job():
            t = source()
            return None if t is None else job_for(t)

        def on_result(job: TileJob, r: dict) -> None:
            leases.release(job.i, job.j)
            acc["tiles"] += 1
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

        failures = _run_jobs(
            cl,
            run_tile,
            next_job,
            limit=limit,
            retries=retries,
            token=token,
            on_result=on_result,
            on_failure=lambda job: leases.release(job.i, job.j),
            more_later=source.more_later,
            health=cluster_health(cl),
        )
    seconds = time.perf_counter() - t0
    bar.close()
    if failures:
        _raise_failures(failures)
    if max_tiles is None:
        still = ks.missing_tiles()
        if still:  # cannot happen unless the store was changed under us
            raise StoreError(
                f"{ks.path}: {len(still)} tiles still missing after the run: {still[:5]}"
            )
    return ComputeReport(
        store=ks.path,
        tiles_total=plan.n_tiles,
        tiles_done_before=done_before,
        tiles_computed=acc["tiles"],
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
        tiles_by_others=source.by_others,
    )
