"""The LocalCluster runtime: worker processes get the malloc settings before they start."""

import logging
import os
import resource
from pathlib import Path

import numpy as np
import pytest

from deqntk_dist.errors import ClusterError, InputError
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


# --------------------------------------------------------- issue 16: scheduler problems
def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _enter(config: RuntimeConfig) -> None:
    with dask_client(config):
        raise AssertionError("dask_client yielded a client")


def test_no_scheduler_at_the_address_is_a_cluster_error_within_the_timeout():
    import time

    address = f"tcp://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as info:
        _enter(RuntimeConfig(scheduler=address, connect_timeout=1.5))
    took = time.monotonic() - t0
    assert took < 10, took
    message = str(info.value)
    assert message.startswith(f"scheduler={address!r}: no dask scheduler reachable at {address}")
    assert "within 1.5 s" in message and "--" not in message
    assert isinstance(info.value, RuntimeError) and info.value.jobs == []
    assert isinstance(info.value.__cause__, OSError)


def test_connect_timeout_from_dask_config_and_validated():
    import time

    import dask

    address = f"tcp://127.0.0.1:{_free_port()}"
    with dask.config.set({"deqntk.connect-timeout": "1s"}):
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match=r"within 1 s"):
            _enter(RuntimeConfig(scheduler=address))
        assert time.monotonic() - t0 < 10
    with dask.config.set({"deqntk.connect-timeout": "soon"}):
        with pytest.raises(InputError, match="deqntk.connect-timeout must be a positive"):
            _enter(RuntimeConfig(scheduler=address))
    for bad in (0, -1.0, "3s", True):
        with pytest.raises(InputError, match="connect_timeout must be a number of seconds"):
            RuntimeConfig(scheduler=address, connect_timeout=bad)


def test_missing_or_malformed_scheduler_file_is_a_cluster_error(tmp_path):
    import json
    import time

    missing = str(tmp_path / "scheduler.json")
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"^scheduler='.*scheduler\.json': no dask scheduler "
                       r"file at .*scheduler\.json \(waited 0\.5 s"):  # fmt: skip
        _enter(RuntimeConfig(scheduler=missing, connect_timeout=0.5))
    assert time.monotonic() - t0 < 5
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ClusterError, match=r"bad\.json is not a dask scheduler file \(not JSON"):
        _enter(RuntimeConfig(scheduler=str(bad), connect_timeout=0.5))
    bad.write_text(json.dumps({"type": "Scheduler"}))
    with pytest.raises(ClusterError, match=r"not a dask scheduler file \(it has no 'address'"):
        _enter(RuntimeConfig(scheduler=str(bad), connect_timeout=0.5))
    # a file naming a scheduler that is gone: both are named
    address = f"tcp://127.0.0.1:{_free_port()}"
    bad.write_text(json.dumps({"address": address}))
    with pytest.raises(ClusterError) as info:
        _enter(RuntimeConfig(scheduler=str(bad), connect_timeout=1))
    assert f"reachable at {address} (from the scheduler file {bad})" in str(info.value)


def test_malformed_scheduler_value_is_an_input_error():
    import dask

    before = dask.config.get("scheduler", None)
    for bad in ("notanaddress", "foo://127.0.0.1:1"):
        with pytest.raises(InputError, match=rf"^scheduler must be .* got {bad!r}"):
            _enter(RuntimeConfig(scheduler=bad, connect_timeout=1))
        # the Client that failed to start left no default scheduler behind
        assert dask.config.get("scheduler", None) == before
    for bad in ("", "  ", 8786):
        with pytest.raises(InputError, match="scheduler must be a scheduler address"):
            RuntimeConfig(scheduler=bad)


def test_scheduler_file_of_a_running_scheduler_and_one_without_workers(tmp_path):
    """A scheduler file written by a running scheduler connects; a scheduler that no worker
    joins is a ClusterError after deqntk.worker-timeout."""
    import dask
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, processes=False, dashboard_address=None, silence_logs=logging.ERROR
        ) as cluster,
        Client(cluster) as client,
    ):
        path = str(tmp_path / "scheduler.json")
        client.write_scheduler_file(path)
        with dask_client(RuntimeConfig(scheduler=path, connect_timeout=5)) as cl:
            assert cl.scheduler.address == cluster.scheduler_address
            assert len(cl.scheduler_info()["workers"]) == 1
    with (
        LocalCluster(
            n_workers=0, processes=False, dashboard_address=None, silence_logs=logging.ERROR
        ) as empty,
        dask.config.set({"deqntk.worker-timeout": 0.5}),
    ):
        with pytest.raises(ClusterError, match=r"no dask worker joined the scheduler .* 0\.5 s"):
            _enter(RuntimeConfig(scheduler=empty.scheduler_address, connect_timeout=5))


def test_the_site_config_restates_the_package_defaults():
    """cluster/deqntk.yaml (a site copy users edit) and the package defaults agree on every
    key they share, and the code reads the package defaults when nothing overrides them."""
    from pathlib import Path

    import dask
    import yaml

    from deqntk_dist.config import DEFAULTS, setting

    site = yaml.safe_load((Path(__file__).parents[1] / "cluster" / "deqntk.yaml").read_text())
    ours = DEFAULTS["deqntk"]
    shared = set(site["deqntk"]) & set(ours)
    assert {"worker-timeout", "adapt", "direct-io", "max-failed-starts"} <= shared
    for key in shared:
        assert site["deqntk"][key] == ours[key], key
    assert setting("worker-timeout") == ours["worker-timeout"] == 7200
    with dask.config.set({"deqntk.worker-timeout": 5}):
        from deqntk_dist.runtime import _worker_timeout

        assert _worker_timeout() == 5.0
