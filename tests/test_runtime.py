"""The LocalCluster runtime: worker processes get the malloc settings before they start."""

import logging
import resource

import numpy as np
import pytest

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
