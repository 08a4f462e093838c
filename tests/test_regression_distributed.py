"""The distributed regression route: block PCG on a Dask cluster against the in-core
Cholesky route, a worker SIGKILLed mid-solve on a real multi-process cluster, and the
driver's and workers' memory against the band budget."""

import os
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from deqntk_dist import DEQSpec, kernel_matrix, write_dataset_store
from deqntk_dist.errors import InputError
from deqntk_dist.regression import solve_store
from deqntk_dist.store import create_kernel_store

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SPEC = DEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1)


def _store(path, rng, n_train, n_test, *, tile=256, d=24, k=4):
    n = n_train + n_test
    centres = rng.normal(size=(k, d)) * 1.5
    y = np.arange(n) % k
    x = centres[y] + rng.normal(size=(n, d))
    ds = write_dataset_store(path / "ds", x, y, n_train=n_train, name="blobs")
    ks = create_kernel_store(path / "ks", ds, SPEC, tile=tile, kernels=("ntk",))
    X = ds.rows(0, n)
    for i, j in ks.plan.tiles():
        r0, r1 = ks.plan.bounds(i)
        c0, c1 = ks.plan.bounds(j)
        res = kernel_matrix(SPEC, X[r0:r1]) if i == j else kernel_matrix(SPEC, X[r0:r1], X[c0:c1])
        ks.write_tile(i, j, {"ntk": res.ntk}, max_residual=0.0, iterations=1, seconds=0.0)
    return ks


#: Where dask's own bookkeeping allocates (task messages, comms): not the solver's data.
_CLIENT_FILES = ("/distributed/", "/tornado/", "/msgpack/", "/cloudpickle/", "/asyncio/", "pickle")


def _driver_data_peak(fn):
    """``fn()`` and the peak of what this process's own code holds while it runs (traced
    allocations, dask's message buffers excluded), sampled every 50 ms."""
    import threading

    tracemalloc.start()
    out, stop, peak = {}, threading.Event(), [0]

    def run():
        try:
            out["value"] = fn()
        finally:
            stop.set()

    def own() -> int:
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, f"*{f}*") for f in _CLIENT_FILES]
        )
        return sum(st.size for st in snap.statistics("filename"))

    th = threading.Thread(target=run)
    th.start()
    while not stop.wait(0.05):
        peak[0] = max(peak[0], own())
    th.join()
    tracemalloc.stop()
    return out["value"], peak[0]


class _CliCluster:
    """A scheduler and workers started with the dask CLI on 127.0.0.1 (separate processes,
    so the test process holds only the driver)."""

    def __init__(self, tmp_path, n_workers: int, memory_limit: str = "2GB"):
        from distributed import Client

        sched_file = tmp_path / "scheduler.json"
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        common = ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", *common, "--port", "0",
             "--scheduler-file", str(sched_file)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    "--scheduler-file",
                    str(sched_file),
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--memory-limit",
                    memory_limit,
                    *common,
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for _ in range(n_workers)
        ]
        self.client = Client(scheduler_file=str(sched_file), timeout=60)
        self.client.wait_for_workers(n_workers, timeout=60)

    def close(self) -> None:
        self.client.close()
        for p in [*self.workers, self.scheduler]:
            p.kill()
            p.wait()


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def local_client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        host="127.0.0.1", memory_limit="2GB",
    )  # fmt: skip
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.mark.parametrize("keep", [True, False])
def test_distributed_cg_agrees_with_cholesky(tmp_path, rng, local_client, keep):
    ks = _store(tmp_path, rng, 700, 120)
    chol = solve_store(ks.path, ridges=[1e-3], solver="cholesky", write_results=False)
    dist = solve_store(
        ks.path, ridges=[1e-3], solver="cg", client=local_client, band_bytes=2**20,
        keep_bands=keep, rank=64,
    )  # fmt: skip
    assert dist.method == "cg-distributed" and chol.method == "cholesky-dense"
    assert _rel(dist.alpha, chol.alpha) <= 1e-6
    assert _rel(dist.predictions, chol.predictions) <= 1e-6
    assert dist.accuracy == chol.accuracy and dist.residual <= 1e-10
    d = dist.detail
    assert d["bands"] == 3 and d["bands_kept_in_memory"] is keep  # 1 MiB bands of 2.8 KB rows
    assert d["bytes_read_per_iteration"] == (0 if keep else 700 * 700 * 4)
    # the results went into the store like any solve's
    from deqntk_dist.store.results import read_results

    np.testing.assert_array_equal(read_results(ks.path, "ntk")["alpha"][...], dist.alpha)


def test_distributed_validation_chooses_like_the_in_core_route(tmp_path, rng, local_client):
    ks = _store(tmp_path, rng, 600, 100)
    ridges = [1e-4, 1e-2, 1.0]
    core = solve_store(ks.path, ridges=ridges, solver="cholesky", write_results=False)
    dist = solve_store(
        ks.path, ridges=ridges, solver="cg", client=local_client, band_bytes=2**20,
        write_results=False, rank=64,
    )  # fmt: skip
    assert dist.ridge == core.ridge and dist.val_accuracy == core.val_accuracy
    np.testing.assert_allclose(dist.val_mse, core.val_mse, rtol=1e-5)
    np.testing.assert_array_equal(dist.val_rows, core.val_rows)
    assert _rel(dist.alpha, core.alpha) <= 1e-6


def test_memory_stays_within_the_band_budget(tmp_path, rng):
    """On a cluster of separate processes: the driver never holds the train block
    (tracemalloc peak of everything it allocates), and each worker's peak RSS grows by
    about the bands it holds, not by the whole block."""
    ks = _store(tmp_path, rng, 5000, 200, tile=512)
    block = 5000 * 5000 * 4  # 100 MB

    def rss(dask_worker):
        """The RSS now, with the peak reset to it: the warm-up's transient peaks (numba
        compiling on a fresh machine) are not the solve's. The kernel's VmHWM reset where
        /proc/self/clear_refs is writable, else a sampler thread (every 2 ms)."""
        import threading
        import time

        import psutil

        proc = psutil.Process()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            dask_worker._test_peak = None
        except OSError:
            box = {"max": proc.memory_info().rss, "stop": threading.Event()}

            def sample():
                while not box["stop"].is_set():
                    box["max"] = max(box["max"], proc.memory_info().rss)
                    time.sleep(0.002)

            threading.Thread(target=sample, daemon=True).start()
            dask_worker._test_peak = box
        return proc.memory_info().rss

    def peak(dask_worker):
        box = dask_worker._test_peak
        if box is not None:
            box["stop"].set()
            return box["max"]
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def warm(path):  # imports, compiled kernels and a store open: not the bands
        from deqntk_dist.regression.distributed import _load_band, dense_matmul

        dense_matmul(np.ones((4, 4), np.float32), np.ones((4, 2)))
        _load_band(path, "ntk", np.arange(2), np.arange(2))

    cluster = _CliCluster(tmp_path, 2)
    try:
        client = cluster.client
        client.run(warm, ks.path)
        before = client.run(rss)
        rep, driver_peak = _driver_data_peak(
            lambda: solve_store(
                ks.path,
                ridges=[1e-1],
                solver="cg",
                client=client,
                band_bytes=16 * 2**20,
                write_results=False,
                rank=64,
                keep_bands=True,
            )  # fmt: skip
        )
        after = client.run(peak)
    finally:
        cluster.close()
    n, c, r = 5000, 4, 64
    # driver: a few dozen n x classes float64 vectors and r x r matrices, never a band
    assert driver_peak <= 40 * n * c * 8 + 10 * r * r * 8 + 4 * 2**20, driver_peak
    assert driver_peak < block / 10
    held = rep.detail["train_block_bytes"] / len(before)  # about half the bands each
    for w, b in before.items():
        grew = after[w] - b
        assert grew <= 1.5 * held + 64 * 2**20 and grew < block, (w, grew, held)
    assert rep.detail["bands_kept_in_memory"] and rep.residual <= 1e-10
    print(rep.detail, rep.stages)


def test_a_worker_killed_mid_solve_on_a_real_cluster(tmp_path, rng, monkeypatch):
    """Scheduler and two workers started with the dask CLI on 127.0.0.1; one worker is
    SIGKILLed during the solve; the solve finishes with the same predictions."""
    from deqntk_dist.regression import distributed as dist_mod

    ks = _store(tmp_path, rng, 900, 100)
    ref = solve_store(ks.path, ridges=[1e-3], solver="cholesky", write_results=False)
    cluster = _CliCluster(tmp_path, 2)
    try:
        client, victim = cluster.client, cluster.workers[0]
        calls = {"n": 0}
        real = dist_mod.BandedKernel.matmul

        def matmul(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 3:  # mid-solve: the bands are held, CG is iterating
                victim.send_signal(signal.SIGKILL)
                victim.wait()
            return real(self, *a, **kw)

        monkeypatch.setattr(dist_mod.BandedKernel, "matmul", matmul)
        rep = solve_store(
            ks.path, ridges=[1e-3], solver="cg", client=client, band_bytes=2**20,
            write_results=False, rank=64, keep_bands=True,
        )  # fmt: skip
        assert calls["n"] > 3 and victim.poll() is not None
        assert len(client.scheduler_info()["workers"]) == 1
    finally:
        cluster.close()
    assert _rel(rep.predictions, ref.predictions) <= 1e-6
    np.testing.assert_array_equal(rep.predictions.argmax(1), ref.predictions.argmax(1))


def test_bad_distributed_arguments(tmp_path, rng, local_client):
    ks = _store(tmp_path, rng, 100, 10, tile=64)
    with pytest.raises(InputError, match="a Dask cluster needs solver='cg', got solver='auto'"):
        solve_store(ks.path, client=local_client)
    with pytest.raises(InputError, match="band_bytes must be at least 1 MiB, got 10"):
        solve_store(ks.path, solver="cg", client=local_client, band_bytes=10)
    with pytest.raises(InputError, match="ridges must be"):
        solve_store(ks.path, solver="cg", client=local_client, ridges=[-1])


def test_cli_solve_on_a_local_cluster(tmp_path, rng, capsys):
    import json

    from deqntk_dist.cli import main

    ks = _store(tmp_path, rng, 700, 80)
    argv = ["solve", ks.path, "--solver", "cg", "--cluster", "local", "--workers", "2"]
    assert main([*argv, "--ridges", "1e-3", "--band-memory", "1MiB", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["method"] == "cg-distributed" and rep["detail"]["bands"] == 3
    chol = solve_store(ks.path, ridges=[1e-3], solver="cholesky", write_results=False)
    assert rep["accuracy"] == chol.accuracy
    assert main(["solve", ks.path, "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "--scheduler / --cluster need --solver cg, got --solver auto" in capsys.readouterr().err
