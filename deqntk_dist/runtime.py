"""Dask runtime: a LocalCluster sized to the machine, an existing scheduler, or a batch queue.

Workers run one tile at a time (``threads_per_worker = 1``) with numba and the BLAS limited
to one thread each (through the worker environment), so ``n_workers = cores`` uses every
core without oversubscription.  Resume never depends on scheduler state (the store's
ledger drives it), so any of these runtimes can be killed and restarted.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil

from .config import DEFAULTS, setting
from .errors import ClusterError, InputError

__all__ = [
    "DEFAULT_DASHBOARD_ADDRESS",
    "MALLOC_ENV",
    "RuntimeConfig",
    "WORKER_ENV",
    "cluster_health",
    "cluster_summary",
    "dashboard_link",
    "dask_client",
    "jobqueue_cluster",
    "resolve_dashboard_address",
    "silence_dask_logs",
]

#: glibc malloc settings for worker processes.  dask's nanny sets
#: ``MALLOC_TRIM_THRESHOLD_=65536`` before it spawns a worker, which also fixes the mmap
#: threshold at 128 KiB: every tile-sized temporary is then a fresh ``mmap`` whose pages
#: fault in again on every tile (measured: 5.6x the page faults and +29% time per 2560^2
#: tile).  These keep blocks up to 32 MiB in the heap for reuse and return free heap
#: memory above 256 MiB to the system.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "268435456",
}

#: Environment of worker processes: one compute thread per worker, and :data:`MALLOC_ENV`
#: (which must be in place before the process starts: see :func:`dask_client`).
WORKER_ENV = {
    "NUMBA_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    **MALLOC_ENV,
}
CLUSTER_KINDS = ("local", "slurm", "pbs")

#: Where the scheduler's dashboard listens unless asked otherwise: this machine only, on a
#: free port.  The dashboard is an unauthenticated HTTP server; ``":8787"`` or
#: ``"0.0.0.0:8787"`` (an explicit choice) serves it on every interface.
DEFAULT_DASHBOARD_ADDRESS = "127.0.0.1:0"


def _check_dashboard_address(value, name: str) -> str:
    """``value`` if it is a ``HOST:PORT`` string (HOST may be empty), else InputError."""
    ok = isinstance(value, str) and ":" in value
    if ok:
        host, _, port = value.rpartition(":")
        ok = (
            port.isascii()
            and port.isdigit()
            and int(port) <= 65535
            and not any(c.isspace() for c in host)
            and "/" not in host
        )
    if not ok:
        raise InputError(
            f"{name} must be 'HOST:PORT' with 0 <= PORT <= 65535 (e.g. '127.0.0.1:8787'; "
            f"':8787' or '0.0.0.0:8787' serves every interface), got {value!r}"
        )
    return value


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Where the tiles run.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``) or a scheduler JSON file
        (a path ending in ``.json``); overrides ``cluster``.
    cluster : {"local", "slurm", "pbs"}
        ``local`` starts a LocalCluster; ``slurm`` / ``pbs`` start dask-jobqueue workers
        configured by dask's ``jobqueue`` config (``~/.config/dask/jobqueue.yaml`` or
        ``$DASK_CONFIG``, see ``cluster/``); without ``workers`` they scale adaptively
        when the dask config has ``deqntk.adapt``.
    workers : int, optional
        Worker processes (default: the number of cores for ``local``, 1 job otherwise).
    memory_limit : str or int, optional
        Per-worker memory limit for a LocalCluster (default: RAM / workers).
    dashboard_address : str, optional
        ``HOST:PORT`` of the dashboard of the scheduler this runtime starts (LocalCluster,
        jobqueue); ignored with ``scheduler``.  Default: dask config
        ``deqntk.dashboard-address`` (environment ``DASK_DEQNTK__DASHBOARD_ADDRESS``), then
        for jobqueue ``jobqueue.<kind>.scheduler-options.dashboard_address``, then
        :data:`DEFAULT_DASHBOARD_ADDRESS` (127.0.0.1 only).  ``":8787"`` serves every
        interface: the dashboard has no authentication.
    connect_timeout : float, optional
        Seconds to wait for the ``scheduler`` to answer (and for its scheduler file to
        appear).  Default: dask config ``deqntk.connect-timeout``
        (``DASK_DEQNTK__CONNECT_TIMEOUT``, a duration such as ``"30s"``), else
        dask config ``deqntk.connect-timeout`` (default 10 s).
    """

    scheduler: str | None = None
    cluster: str = "local"
    workers: int | None = None
    memory_limit: str | int | None = None
    dashboard_address: str | None = None
    connect_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.scheduler is not None and not (
            isinstance(self.scheduler, str) and self.scheduler.strip()
        ):
            raise InputError(
                "scheduler must be a scheduler address (e.g. 'tcp://HOST:8786') or the path "
                f"of a scheduler JSON file, got {self.scheduler!r}"
            )
        t = self.connect_timeout
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not t > 0):
            raise InputError(f"connect_timeout must be a number of seconds > 0, got {t!r}")
        if self.cluster not in CLUSTER_KINDS:
            raise InputError(
                f"cluster must be one of {', '.join(CLUSTER_KINDS)}, got {self.cluster!r}"
            )
        w = self.workers
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise InputError(f"workers must be an integer >= 1, got {w!r}")
        if self.dashboard_address is not None:
            _check_dashboard_address(self.dashboard_address, "dashboard_address")


def resolve_dashboard_address(config: RuntimeConfig | None = None) -> str | None:
    """The dashboard address asked for: ``config``, else dask config ``deqntk.dashboard-address``.

    Returns ``None`` when neither sets one (the runtime then uses its own default, which is
    on 127.0.0.1).  A malformed value raises :class:`InputError` naming where it came from.
    """

    if config is not None and config.dashboard_address is not None:
        return config.dashboard_address
    value = setting("dashboard-address")
    if value is None or value == "":
        return None
    return _check_dashboard_address(
        value, "dask config deqntk.dashboard-address (DASK_DEQNTK__DASHBOARD_ADDRESS)"
    )


def _default_workers() -> int:
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def jobqueue_cluster(kind: str, *, dashboard_address: str | None = None, **kwargs):
    """A dask-jobqueue ``SLURMCluster`` / ``PBSCluster`` from dask's ``jobqueue.<kind>`` config.

    No job is submitted.  The worker thread limits of :data:`WORKER_ENV` are appended to the
    config's ``job-script-prologue`` (which is kept); ``kwargs`` override the config.  The
    scheduler's dashboard listens on ``dashboard_address`` when given, else on dask config
    ``deqntk.dashboard-address``, else on the ``dashboard_address`` of ``scheduler_options``
    (the argument, or the config's ``scheduler-options``), else on
    :data:`DEFAULT_DASHBOARD_ADDRESS` -- never on every interface unless asked
    (dask-jobqueue's own default is ``":8787"``, every interface).
    """
    import dask

    try:
        import dask_jobqueue
    except ImportError as exc:  # pragma: no cover - optional extra
        raise InputError(
            f"cluster={kind!r} needs dask-jobqueue: pip install 'deqntk_dist[jobqueue]'"
        ) from exc
    if kind not in ("slurm", "pbs"):
        raise InputError(f"kind must be 'slurm' or 'pbs', got {kind!r}")
    cls = dask_jobqueue.SLURMCluster if kind == "slurm" else dask_jobqueue.PBSCluster
    prologue = list(dask.config.get(f"jobqueue.{kind}.job-script-prologue", None) or [])
    prologue += [f"export {k}={v}" for k, v in WORKER_ENV.items()]
    options = kwargs.pop("scheduler_options", None)
    if options is None:
        options = dask.config.get(f"jobqueue.{kind}.scheduler-options", None)
    options = dict(options or {})
    if dashboard_address is None:
        dashboard_address = resolve_dashboard_address()
    else:
        _check_dashboard_address(dashboard_address, "dashboard_address")
    if dashboard_address is not None:
        options["dashboard_address"] = dashboard_address
    options.setdefault("dashboard_address", DEFAULT_DASHBOARD_ADDRESS)
    return cls(**{"job_script_prologue": prologue, "scheduler_options": options, **kwargs})


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables of this process for the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _duration(key: str, raw: Any, example: str) -> float:
    """Seconds of the dask config value ``deqntk.<key>`` (``raw``: a number or a duration
    such as ``'30s'``); InputError naming the key unless it is positive."""
    from dask.utils import parse_timedelta

    try:
        value = float(parse_timedelta(raw, default="seconds"))
    except (TypeError, ValueError, KeyError):
        value = float("nan")
    if not value > 0:
        raise InputError(
            f"dask config deqntk.{key} must be a positive duration (e.g. {example!r}), got {raw!r}"
        )
    return value


def _connect_timeout(config: RuntimeConfig) -> float:
    """Seconds to wait for a running scheduler: ``config``, dask config, default."""
    if config.connect_timeout is not None:
        return float(config.connect_timeout)
    raw = setting("connect-timeout")
    if raw is None or raw == "":
        raw = DEFAULTS["deqntk"]["connect-timeout"]
    return _duration("connect-timeout", raw, "30s")


def _scheduler_file_address(path: str, timeout: float) -> str:
    """The address in the dask scheduler file ``path``, waiting up to ``timeout`` s for the
    file to appear (a scheduler that is starting writes it).

    Raises
    ------
    ClusterError
        No such file within ``timeout``, or a file that is not a scheduler file.
    """
    import json
    import time

    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            raise ClusterError(
                f"scheduler={path!r}: no dask scheduler file at {path} (waited {timeout:g} s "
                "for a starting scheduler to write it); is the scheduler running with this "
                "scheduler file? (or pass its address, 'tcp://HOST:PORT')"
            )
        time.sleep(0.05)
    cause = ""
    for attempt in range(10):  # a scheduler may be writing it right now
        if attempt:
            time.sleep(0.05)
        try:
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
        except OSError as exc:
            cause = f"cannot read it: {exc.strerror or exc}"
            break
        except ValueError as exc:
            cause = f"not JSON: {exc}"
            continue
        address = info.get("address") if isinstance(info, dict) else None
        if isinstance(address, str) and address:
            return address
        cause = "it has no 'address' entry"
    raise ClusterError(f"scheduler={path!r}: {path} is not a dask scheduler file ({cause})")


def _connect(target: str, timeout: float):
    """A ``distributed.Client`` of the running scheduler ``target`` (address or file)."""
    import dask
    from distributed import Client

    if target.endswith(".json"):
        address = _scheduler_file_address(target, timeout)
        where = f"{address} (from the scheduler file {target})"
    else:
        address, where = target, target
    # a Client makes itself dask's default scheduler as it starts, and one that fails to
    # start leaves that setting behind (later plain ``.compute()`` calls would then ask for
    # a client that does not exist); a plain socket first answers "nothing listens there"
    previous = dask.config.get("scheduler", None)
    try:
        _probe(address, timeout)
        try:
            return Client(address=address, timeout=timeout)
        except BaseException:
            if previous is None:
                dask.config.config.pop("scheduler", None)
            else:
                dask.config.set(scheduler=previous)
            raise
    except ValueError as exc:  # distributed's address parser: a malformed value
        raise InputError(
            "scheduler must be a scheduler address such as 'tcp://HOST:8786' or the path of "
            f"a scheduler JSON file, got {target!r}: {exc}"
        ) from exc
    except OSError as exc:  # refused, unreachable, timed out
        raise ClusterError(
            f"scheduler={target!r}: no dask scheduler reachable at {where} within "
            f"{timeout:g} s ({exc}); is it running? (connect_timeout, dask config "
            "deqntk.connect-timeout)"
        ) from exc


def _probe(address: str, timeout: float) -> None:
    """Open and close a TCP connection to a ``tcp://`` scheduler address (other schemes
    are left to the Client).

    Raises
    ------
    ValueError
        A malformed address (no scheme, unknown scheme, no port).
    OSError
        Nothing accepts connections there within ``timeout`` seconds.
    """
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    scheme, location = parse_address(address, strict=True)
    get_backend(scheme)
    if scheme != "tcp":
        return
    host, port = parse_host_port(location)
    socket.create_connection((host, port), timeout=timeout).close()


def _worker_timeout() -> float:
    """Seconds to wait for the first worker (dask config ``deqntk.worker-timeout``)."""
    return float(setting("worker-timeout"))


def _watch_settings() -> tuple[float, int]:
    """``deqntk.job-check-interval`` (seconds) and ``deqntk.max-failed-starts``, validated."""
    interval = _duration("job-check-interval", setting("job-check-interval"), "10s")
    raw = setting("max-failed-starts")
    digits = isinstance(raw, int | str) and not isinstance(raw, bool) and str(raw).isdigit()
    if not (digits and int(raw) >= 1):
        raise InputError(
            f"dask config deqntk.max-failed-starts must be an integer >= 1, got {raw!r}"
        )
    return interval, int(raw)


#: health checks of the clients :func:`dask_client` started on batch queues, by id(client)
_HEALTH: dict[int, Callable[[], None]] = {}


def cluster_health(client) -> Callable[[], None] | None:
    """A callable that raises what went wrong with the runtime of ``client``, or None.

    For batch-queue clusters started by :func:`dask_client` it raises the
    :class:`~deqntk_dist.errors.ClusterError` of its :class:`~deqntk_dist.batchjobs.JobWatch`
    once worker jobs keep failing to start; the driver calls it while it waits.
    """
    return _HEALTH.get(id(client))


def _wait_for_first_worker(client, timeout: float, check: Callable[[], None]) -> None:
    """Wait up to ``timeout`` s for one worker, calling ``check()`` about every second."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        check()
        left = deadline - time.monotonic()
        try:
            client.wait_for_workers(1, timeout=max(0.01, min(1.0, left)))
            return
        except TimeoutError:
            if left <= 1.0:
                raise


@contextlib.contextmanager
def _quiet_teardown_on_interrupt() -> Iterator[None]:
    """On Ctrl-C, silence the logs of the cluster teardown that follows (the nannies of a
    LocalCluster run in this process; callbacks cut short by the interrupt log tracebacks
    that say nothing to the user, who gets one ``interrupted`` line)."""
    try:
        yield
    except KeyboardInterrupt:
        silence_dask_logs()
        raise


def silence_dask_logs() -> None:
    """Silence the distributed, tornado and asyncio loggers of this process (after Ctrl-C).

    Child loggers are set too: dask's logging config gives some their own level (e.g.
    ``tornado.application: error``), which a parent's level does not override.
    """
    prefixes = ("distributed", "tornado", "asyncio")
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in prefixes]
    for name in {*prefixes, *names}:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


@contextlib.contextmanager
def dask_client(config: RuntimeConfig | None = None) -> Iterator:
    """Yield a ``distributed.Client`` for ``config``; close what was started on exit.

    Raises
    ------
    ClusterError
        No scheduler answers at ``config.scheduler`` within the connect timeout, its
        scheduler file is missing or malformed, or no worker joined in time (dask config
        ``deqntk.worker-timeout``).
    InputError
        ``config.scheduler`` is not an address or a scheduler file path.
    """
    import dask
    from distributed import Client, LocalCluster

    config = config or RuntimeConfig()
    dashboard = resolve_dashboard_address(config)
    if config.scheduler:
        target = config.scheduler
        client = _connect(target, _connect_timeout(config))
        try:
            timeout = _worker_timeout()
            try:
                client.wait_for_workers(1, timeout=timeout)
            except TimeoutError as exc:
                raise ClusterError(
                    f"no dask worker joined the scheduler {target} within {timeout:g} s "
                    "(dask config deqntk.worker-timeout)"
                ) from exc
            yield client
        finally:
            client.close()
        return
    watch = None
    if config.cluster in ("slurm", "pbs"):
        from .batchjobs import JobWatch

        interval, max_failed = _watch_settings()
        cluster = jobqueue_cluster(config.cluster, dashboard_address=dashboard)
        adapt = setting("adapt")
        adaptive = config.workers is None and bool(adapt)
        watch = JobWatch(
            cluster,
            config.cluster,
            jobs=None if adaptive else (config.workers or 1),
            interval=interval,
            max_failed_starts=max_failed,
        ).start()
        if adaptive:
            cluster.adapt(**{k.replace("-", "_"): v for k, v in adapt.items()})
        else:
            cluster.scale(jobs=config.workers or 1)
    else:
        n = config.workers or _default_workers()
        # the nanny applies ``pre-spawn-environ`` before the worker process starts (glibc
        # reads its malloc settings then; ``env`` is applied only after the start), and the
        # variables of this process override it: an earlier cluster leaves dask's own there
        spawn_env = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **MALLOC_ENV}
        with (
            dask.config.set({"distributed.nanny.pre-spawn-environ": spawn_env}),
            _environ(MALLOC_ENV),
        ):
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                memory_limit=config.memory_limit if config.memory_limit is not None else "auto",
                env=dict(WORKER_ENV),
                dashboard_address=dashboard or DEFAULT_DASHBOARD_ADDRESS,
                silence_logs=logging.ERROR,
            )
    try:
        client = Client(cluster)
        check = watch.check if watch is not None else (lambda: None)
        if watch is not None:
            _HEALTH[id(client)] = check
        try:
            _wait_for_first_worker(client, _worker_timeout(), check)
            with _quiet_teardown_on_interrupt():
                yield client
        finally:
            _HEALTH.pop(id(client), None)
            client.close()
    finally:
        if watch is not None:
            watch.close()
        cluster.close()


def cluster_summary(client) -> dict:
    """Workers, total threads and the smallest per-worker memory limit (bytes, 0 = none)."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    limits = [int(w.get("memory_limit") or 0) for w in workers.values()]
    positive = [m for m in limits if m > 0]
    return {
        "workers": len(workers),
        "threads": sum(int(w.get("nthreads", 1)) for w in workers.values()),
        "memory_limit": min(positive) if positive else 0,
    }


def dashboard_link(client) -> str | None:
    """The dashboard URL, or None when the scheduler serves no dashboard (no bokeh)."""
    try:
        services = client.scheduler_info(n_workers=0).get("services", {})
    except Exception:  # pragma: no cover - scheduler gone
        return None
    if "dashboard" not in services:
        return None
    return client.dashboard_link
