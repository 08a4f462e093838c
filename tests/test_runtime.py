"""The LocalCluster runtime: worker processes get the malloc settings before they start."""

import logging
import os
import resource
from pathlib import Path

import numpy as np
import pytest

from deqntk_dist.errors import InputError
from deqntk_dist.runtime import MALLOC_ENV, RuntimeConfig, dask_client

pytestmark = pytest.mark.cluster


def _faults_of_tile_temporaries(reps: int = 8, nbytes: int = 24 * 2**20) -> int:
    """Minor page faults of allocating, filling and freeing ``reps`` tile-sized arrays."""
    a = np.ones(nbytes // 8)  # first use: its pages fault in once in any case
    del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        a = np.empty(nbytes // 8)
        a.fill(1.0)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _worker_env() -> dict:
    import os

    return {k: os.environ.get(k) for k in MALLOC_ENV}


def test_local_cluster_workers_reuse_tile_memory(monkeypatch):
    """dask's default (MALLOC_TRIM_THRESHOLD_=65536) re-faults every 24 MiB temporary;
    the workers dask_client starts keep it in the heap (counted by the kernel, not assumed).

    dask's value left in this process's environment (a nanny of an earlier cluster sets it
    there) must not reach the workers dask_client starts.
    """
    import os

    from distributed import Client, LocalCluster

    for k in MALLOC_ENV:  # restored at teardown, whatever the nannies write meanwhile
        monkeypatch.setenv(k, "0")
        monkeypatch.delenv(k)
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        default = next(iter(client.run(_faults_of_tile_temporaries).values()))
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "65536"  # as the nanny above leaves it
    leaked = {k: os.environ.get(k) for k in MALLOC_ENV}
    with dask_client(RuntimeConfig(workers=1)) as client:
        assert list(client.run(_worker_env).values()) == [MALLOC_ENV]
        ours = next(iter(client.run(_faults_of_tile_temporaries).values()))
    assert {k: os.environ.get(k) for k in MALLOC_ENV} == leaked  # restored
    pages = 8 * 24 * 2**20 // 4096
    # the default faults in (nearly) every page of every array, ours (nearly) none
    assert default > 0.5 * pages / 512, default  # >= one fault per huge page even with THP
    assert ours < 0.1 * default, (ours, default)


# ------------------------------------------------------------------------------ listeners
def _listeners(exclude: set | frozenset = frozenset()) -> set[tuple[int, str, int]]:
    """(pid, ip, port) of every listening inet socket of this process and its descendants."""
    import psutil

    me = psutil.Process()
    found = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                found.add((proc.pid, c.laddr.ip, c.laddr.port))
    return found - set(exclude)


def test_local_cluster_listens_on_loopback_only():
    """Scheduler, dashboard, nanny and worker of dask_client's LocalCluster listen on
    127.0.0.1 (counted from the kernel's socket table), and the printed link is one of them."""
    from urllib.parse import urlparse

    from deqntk_dist.runtime import dashboard_link

    before = _listeners()
    with dask_client(RuntimeConfig(workers=1)) as client:
        found = _listeners(before)
        link = dashboard_link(client)
        worker_pids = set(client.run(os.getpid).values())
    assert {ip for _, ip, _ in found} == {"127.0.0.1"}, found
    # the scheduler (comm + dashboard) and the worker process both listen (>= 2 each)
    assert len([p for p, _, _ in found if p == os.getpid()]) >= 2, found
    assert len([p for p, _, _ in found if p in worker_pids]) >= 1, found
    if link is not None:
        url = urlparse(link)
        assert url.hostname == "127.0.0.1"
        assert (os.getpid(), "127.0.0.1", url.port) in found


def test_dashboard_address_is_an_explicit_choice():
    """RuntimeConfig(dashboard_address=...) and dask config deqntk.dashboard-address move the
    dashboard (127.0.0.2, another loopback address, stands for "somewhere else")."""
    import dask

    from deqntk_dist.runtime import resolve_dashboard_address

    assert resolve_dashboard_address(RuntimeConfig()) is None
    before = _listeners()
    with dask_client(RuntimeConfig(workers=1, dashboard_address="127.0.0.2:0")) as client:
        found = _listeners(before)
        port = client.scheduler_info()["services"]["dashboard"]
    assert (os.getpid(), "127.0.0.2", port) in found
    assert {ip for _, ip, _ in found} == {"127.0.0.1", "127.0.0.2"}
    with dask.config.set({"deqntk.dashboard-address": "127.0.0.2:0"}):
        assert resolve_dashboard_address(RuntimeConfig()) == "127.0.0.2:0"
        assert resolve_dashboard_address(RuntimeConfig(dashboard_address=":0")) == ":0"
    with dask.config.set({"deqntk.dashboard-address": "localhost"}):
        with pytest.raises(InputError, match="deqntk.dashboard-address .*must be 'HOST:PORT'"):
            resolve_dashboard_address(RuntimeConfig())
    for bad in ("8787", "127.0.0.1:99999", "127.0.0.1:x", 8787, "tcp://1.2.3.4:5"):
        with pytest.raises(InputError, match=r"dashboard_address must be 'HOST:PORT'.*got"):
            RuntimeConfig(dashboard_address=bad)


def test_jobqueue_scheduler_dashboard_on_loopback():
    """dask-jobqueue's default dashboard is ':8787' (every interface); ours is 127.0.0.1,
    and so is the one cluster/jobqueue.yaml asks for."""
    pytest.importorskip("dask_jobqueue")
    import yaml

    from deqntk_dist.runtime import jobqueue_cluster

    config = yaml.safe_load((Path(__file__).parents[1] / "cluster" / "jobqueue.yaml").read_text())
    for kind in ("slurm", "pbs"):
        address = config["jobqueue"][kind]["scheduler-options"]["dashboard_address"]
        assert address.rpartition(":")[0] == "127.0.0.1", (kind, address)
    before = _listeners()
    cluster = jobqueue_cluster(
        "slurm", cores=1, memory="1GiB", scheduler_options={"host": "127.0.0.1"}
    )
    try:
        port = cluster.scheduler.services["dashboard"].port
        found = _listeners(before)
    finally:
        cluster.close()
    assert (os.getpid(), "127.0.0.1", port) in found
    assert {ip for _, ip, _ in found} == {"127.0.0.1"}, found
