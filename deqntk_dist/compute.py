"""The driver: plan -> Dask tasks -> kernel store, with retries, bounded tiles in flight,
leases, progress and resume.

The per-chunk tasks (:func:`~deqntk_dist.tasks.run_tile`,
:func:`~deqntk_dist.tasks.run_self_covariance`) run on the workers (:mod:`.tasks`); their
submission, the tile leases and the failure reports are :mod:`.scheduling`; the progress
line is :mod:`.progress`.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from .errors import InputError, StoreError
from .options import ComputeOptions
from .plan import cdeq_pair_seconds, choose_tile, tile_cap
from .progress import Progress
from .runtime import (
    RuntimeConfig,
    cluster_health,
    cluster_summary,
    dashboard_link,
    dask_client,
)
from .scheduling import LEASE_POLL_SECONDS, TileSource, jobs_of, raise_failures, run_jobs
from .spec import CDEQSpec, DEQSpec
from .store import (
    KERNEL_NAMES,
    KernelStore,
    check_dataset_shape,
    create_kernel_store,
    open_kernel_store,
)
from .store.dataset import DatasetStore, open_dataset_store
from .store.lease import leases_for
from .store.location import Location
from .store.resume import prepare_resume
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


def _store_options(spec, tol: float | None, existing: KernelStore | None, dtype: str) -> dict:
    """Kernel options of the store (part of its identity): the CDEQ slice tolerance as
    given, else the existing store's options, else the tolerance the dtype needs."""
    if tol is not None:
        if isinstance(spec, DEQSpec):
            raise InputError(f"tol applies to the cdeq kernel only, got tol={tol!r}")
        return {"tol": float(tol)}
    if existing is not None:
        return dict(existing.options)
    if isinstance(spec, CDEQSpec):
        from .kernels.conv import DEFAULT_TOL, FLOAT32_TOL

        return {"tol": FLOAT32_TOL if dtype == "float32" else DEFAULT_TOL}
    return {}


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
    options: ComputeOptions | None = None,
    *,
    client=None,
    runtime: RuntimeConfig | None = None,
    log=None,
    **fields: Any,
) -> ComputeReport:
    """Compute (or finish) the kernel store of a dataset store on Dask.

    Parameters
    ----------
    dataset : str, Path or DatasetStore
        The dataset store (its rows are read by the workers).
    store : str or Path
        Kernel store path or URL; created if absent, resumed if present (same settings).
    spec : DEQSpec or CDEQSpec
    options : ComputeOptions, optional
        What the store holds and how its tiles are scheduled (default
        ``ComputeOptions()``): kernels, tile, dtype, CDEQ slice tolerance, memory budget,
        tiles in flight, retries, threads per task, max tiles, layout, ...
    **fields
        :class:`~deqntk_dist.options.ComputeOptions` fields that replace those of
        ``options`` (``compute_kernel_store(ds, ks, spec, tile=64, kernels=("ntk",))``).
    client : distributed.Client, optional
        Use this client; otherwise one is started from ``runtime`` and closed at the end.
    runtime : RuntimeConfig, optional
        LocalCluster (default), ``scheduler`` address, or a batch cluster.
    log : callable, optional
        Receives one-line messages (default: print to stderr).

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
    opts = ComputeOptions.resolve(options, fields)
    if not isinstance(spec, DEQSpec | CDEQSpec):
        raise InputError(f"spec must be a DEQSpec or CDEQSpec, got {type(spec).__name__}")
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    ds = dataset if isinstance(dataset, DatasetStore) else open_dataset_store(dataset)
    check_dataset_shape(ds, spec)
    path = Location.parse(store, param="store")
    existing = open_kernel_store(path) if path.exists() else None

    dtype = opts.dtype or (existing.dtype.name if existing else "float32")
    kernel_options = _store_options(spec, opts.tol, existing, dtype)

    def make_store(tile: int) -> KernelStore:
        ks = create_kernel_store(
            path,
            ds,
            spec,
            tile=tile,
            dtype=dtype,
            kernels=opts.kernels or (existing.kernels if existing else KERNEL_NAMES),
            options=kernel_options,
            compute_options=opts.to_dict(),
            layout=opts.layout,
            chunk=opts.chunk,
        )
        prepare_resume(ks, ds, recompute_mismatched=opts.recompute_mismatched, say=say)
        return ks

    # settings and writability are checked before any cluster is started
    tile = opts.tile or (existing.tile if existing is not None else None)
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
            budget = opts.memory_budget or min(MAX_TILE_BUDGET, limit // 2 if limit else 2**30)
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
        limit = opts.max_in_flight or max(2, 2 * summary["threads"])
        if isinstance(spec, CDEQSpec):
            aux = [
                AuxJob(
                    store=ks.path,
                    dataset=ds.path,
                    start=a,
                    stop=b,
                    threads=opts.task_threads,
                    identity=ks.identity_digest,
                )
                for a, b in ks.self_covariance_missing()
            ]
            if aux:
                say(f"deqntk: self-covariances of {ds.n} examples ({len(aux)} tasks)")
                fails = run_jobs(
                    cl,
                    run_self_covariance,
                    jobs_of(aux),
                    limit=limit,
                    retries=opts.retries,
                    token=token,
                    on_result=lambda job, r: None,
                    health=cluster_health(cl),
                )
                if fails:
                    raise_failures(fails)
        return _compute_tiles(cl, ks, ds, summary, opts, limit=limit, token=token, say=say)


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


def _compute_tiles(cl, ks, ds, summary, opts: ComputeOptions, *, limit, token, say):
    plan = ks.plan
    missing = plan.usable_first(ks.missing_tiles(), n_train=ks.n_train, last_round=limit)
    done_before = plan.n_tiles - len(missing)
    entries_total = plan.n * plan.n
    entries_before = entries_total - sum(plan.entries(t) for t in missing)
    max_tiles = opts.max_tiles
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
            threads=opts.task_threads,
            options=dict(ks.options),
            identity=ks.identity_digest,
        )

    bar = Progress(
        plan.n_tiles,
        done_before,
        entries_total,
        entries_before,
        enabled=opts.progress and bool(todo),
    )
    acc: dict[str, Any] = {"entries": 0, "bytes": 0, "res": 0.0, "peak": {}, "tiles": 0}
    acc.update(compute=0.0, read=0.0, write=0.0, compute_cpu=0.0, write_cpu=0.0)

    t0 = time.perf_counter()
    with leases_for(ks) as leases:
        source = TileSource(
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

        failures = run_jobs(
            cl,
            run_tile,
            next_job,
            limit=limit,
            retries=opts.retries,
            token=token,
            on_result=on_result,
            on_failure=lambda job: leases.release(job.i, job.j),
            more_later=source.more_later,
            health=cluster_health(cl),
        )
    seconds = time.perf_counter() - t0
    bar.close()
    if failures:
        raise_failures(failures)
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
