"""Tiled Gram on a real Dask LocalCluster (worker processes) into a real zarr store."""

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest

from deqntk_dist import CDEQSpec, DEQSpec, kernel_matrix, open_kernel_store, write_dataset_store
from deqntk_dist.compute import compute_kernel_store
from deqntk_dist.errors import FixedPointError, InputError, StoreError
from deqntk_dist.runtime import WORKER_ENV
from deqntk_dist.store import verify_kernel_store

SPEC = DEQSpec(sigma_w2=1.3, sigma_u2=0.8, sigma_b2=0.2)

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        env=WORKER_ENV,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    cl = Client(cluster)
    yield cl
    cl.close()
    cluster.close()


def _done_files(store) -> int:
    root = os.path.join(store, "ledger", "done", "c")
    return sum(len(files) for _, _, files in os.walk(root)) if os.path.isdir(root) else 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tiled_store_equals_untiled_deq(tmp_path, rng, client, dtype):
    n = 150  # not a multiple of the tile
    x = rng.normal(size=(n, 9))
    ds = write_dataset_store(tmp_path / "ds", x, rng.integers(0, 3, n), n_train=120, name="t")
    rep = compute_kernel_store(
        ds.path,
        tmp_path / "ks",
        SPEC,
        tile=64,
        dtype=dtype,
        kernels=("ntk", "nngp"),
        client=client,
        progress=False,
    )
    assert (rep.tiles_total, rep.tiles_computed, rep.tiles_done_before) == (6, 6, 0)
    assert rep.entries_computed == n * n
    assert rep.bytes_written == 2 * n * n * np.dtype(dtype).itemsize
    full = kernel_matrix(SPEC, x.astype(np.float32))
    ks = open_kernel_store(tmp_path / "ks")
    assert ks.array("ntk").dtype == dtype
    np.testing.assert_array_equal(ks.array("ntk")[...], full.ntk.astype(dtype))
    np.testing.assert_array_equal(ks.array("nngp")[...], full.nngp.astype(dtype))
    assert verify_kernel_store(ks.path) == []
    again = compute_kernel_store(ds.path, tmp_path / "ks", SPEC, client=client, progress=False)
    assert (again.tiles_computed, again.tiles_done_before) == (0, 6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tiled_store_equals_untiled_cdeq(tmp_path, rng, client, dtype):
    pytest.importorskip("deqntk_dist.kernels.conv")
    from deqntk_dist.kernels import self_covariance
    from deqntk_dist.store import create_kernel_store

    spec = CDEQSpec(sigma_w2=1.2, sigma_u2=1.0, sigma_b2=0.1, filter_size=3)
    n = 23
    x = rng.normal(size=(n, 6, 5, 2))
    ds = write_dataset_store(tmp_path / "ds", x, rng.integers(0, 3, n), n_train=20, name="img")
    # self-covariances in 3 row chunks (3 tasks), then the 6 tiles
    create_kernel_store(
        tmp_path / "ks", ds, spec, tile=8, dtype=dtype, kernels=("ntk", "nngp"), aux_rows=10
    )
    rep = compute_kernel_store(ds, tmp_path / "ks", spec, client=client, progress=False)
    assert rep.tiles_computed == 6
    x32 = x.astype(np.float32)
    full = kernel_matrix(spec, x32)
    ks = open_kernel_store(tmp_path / "ks")
    np.testing.assert_array_equal(ks.array("ntk")[...], full.ntk.astype(dtype))
    np.testing.assert_array_equal(ks.array("nngp")[...], full.nngp.astype(dtype))
    np.testing.assert_array_equal(ks.self_covariance(), self_covariance(spec, x32))
    assert verify_kernel_store(ks.path) == []


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pooled_flipped_cdeq_store_records_its_tolerance(tmp_path, rng, client, dtype):
    from deqntk_dist.errors import StoreMismatchError
    from deqntk_dist.kernels.conv import DEFAULT_TOL, FLOAT32_TOL

    spec = CDEQSpec(sigma_w2=1.2, sigma_u2=1.0, sigma_b2=0.1, readout="lap", pool_size=3,
                    hflip=True)  # fmt: skip
    n = 17
    x = rng.normal(size=(n, 5, 6, 1))
    x[4] = x[1, :, ::-1]  # a mirror image: the flipped pair is the same-image path
    ds = write_dataset_store(tmp_path / "ds", x, rng.integers(0, 3, n), n_train=14, name="img")
    rep = compute_kernel_store(
        ds, tmp_path / "ks", spec, tile=6, dtype=dtype, client=client, progress=False
    )
    assert rep.tiles_computed == 6
    ks = open_kernel_store(tmp_path / "ks")
    tol = FLOAT32_TOL if dtype == "float32" else DEFAULT_TOL
    assert ks.options == {"tol": tol} and ks.spec == spec
    assert rep.max_residual <= tol
    # the store is the untiled Gram at that tolerance, rounded (float32 out= takes it too)
    out = {k: np.empty((n, n), dtype) for k in ("ntk", "nngp")}
    kernel_matrix(spec, x.astype(np.float32), out=out)
    np.testing.assert_array_equal(ks.array("ntk")[...], out["ntk"])
    np.testing.assert_array_equal(ks.array("nngp")[...], out["nngp"])
    assert verify_kernel_store(ks.path) == []
    with pytest.raises(StoreMismatchError, match="options"):
        compute_kernel_store(
            ds, tmp_path / "ks", spec, options={"tol": 1e-11}, client=client, progress=False
        )
    with pytest.raises(InputError, match="tol applies to the cdeq kernel"):
        compute_kernel_store(
            ds, tmp_path / "ks2", SPEC, options={"tol": 1e-11}, client=client, progress=False
        )


def test_worker_killed_while_tiles_run(tmp_path, rng, client):
    n = 300
    x = rng.normal(size=(n, 40))
    ds = write_dataset_store(tmp_path / "ds", x, np.zeros(n, int), n_train=n, name="t")
    store = str(tmp_path / "ks")
    out = {}

    def job():
        try:
            out["report"] = compute_kernel_store(
                ds,
                store,
                SPEC,
                tile=16,
                kernels=("ntk",),
                client=client,
                progress=False,
                retries=1,
            )
        except BaseException as exc:  # pragma: no cover - reported below
            out["error"] = exc

    pids = client.run(os.getpid)
    th = threading.Thread(target=job)
    th.start()
    deadline = time.monotonic() + 60
    while _done_files(store) < 20 and time.monotonic() < deadline and th.is_alive():
        time.sleep(0.01)
    victim = list(pids.values())[0]
    done_at_kill = _done_files(store)
    alive_at_kill = th.is_alive()
    os.kill(victim, signal.SIGKILL)
    th.join(180)
    assert "error" not in out, out.get("error")
    rep = out["report"]
    n_tiles = 19 * 20 // 2
    assert alive_at_kill and 0 < done_at_kill < 2 * n_tiles  # 2 ledger files per tile
    assert rep.tiles_computed == n_tiles and victim in rep.peak_rss
    ks = open_kernel_store(store)
    assert ks.is_complete()
    full = kernel_matrix(SPEC, x.astype(np.float32)).ntk.astype(np.float32)
    np.testing.assert_array_equal(ks.array("ntk")[...], full)
    assert verify_kernel_store(store) == []
    client.wait_for_workers(2, timeout=60)


def test_non_convergence_is_a_clear_error_and_nothing_false_is_done(tmp_path, rng, client):
    spec = DEQSpec(sigma_w2=5.0, sigma_u2=1.0, activation="erf")  # no unique fixed point
    n = 40
    x = rng.normal(size=(n, 5))
    ds = write_dataset_store(tmp_path / "ds", x, np.zeros(n, int), n_train=n, name="t")
    with pytest.raises(FixedPointError, match=r"tile \(\d+, \d+\) rows .* did not converge"):
        compute_kernel_store(ds, tmp_path / "ks", spec, tile=10, client=client, progress=False)
    ks = open_kernel_store(tmp_path / "ks")
    assert not ks.is_complete()
    problems = verify_kernel_store(ks.path)
    # the only problem is the unfinished tiles: every tile marked done holds verified data
    assert len(problems) == 1 and "not done" in problems[0]


def test_failed_writes_never_mark_tiles_done(tmp_path, rng, client):
    n = 50
    ds = write_dataset_store(
        tmp_path / "ds", rng.normal(size=(n, 4)), np.zeros(n, int), n_train=n, name="t"
    )
    store = tmp_path / "ks"
    compute_kernel_store(
        ds, store, SPEC, tile=64, kernels=("ntk",), client=client, progress=False
    )  # one tile, creates the layout
    import shutil

    shutil.rmtree(store / "ntk" / "c")
    (store / "ntk" / "c").write_text("not a directory: chunk writes fail")
    zarr_done = store / "ledger" / "done" / "c"
    shutil.rmtree(zarr_done)
    for sub in ("checksum", "max_residual", "iterations", "seconds", "finished"):
        shutil.rmtree(store / "ledger" / sub / "c")
    with pytest.raises(StoreError, match=r"tile \(0, 0\) rows \[0, 50\).* failed: .*Error"):
        compute_kernel_store(ds, store, SPEC, client=client, progress=False, retries=1)
    assert open_kernel_store(store).missing_tiles() == [(0, 0)]


def test_bad_arguments_and_missing_dataset(tmp_path, rng, client):
    with pytest.raises(StoreError, match="dataset store not found"):
        compute_kernel_store(tmp_path / "none", tmp_path / "ks", SPEC, client=client)
    ds = write_dataset_store(
        tmp_path / "ds", rng.normal(size=(10, 4)), np.zeros(10, int), n_train=10, name="t"
    )
    with pytest.raises(InputError, match="tile"):
        compute_kernel_store(ds, tmp_path / "ks", SPEC, tile=0, client=client)
    with pytest.raises(InputError, match="what"):
        compute_kernel_store(ds, tmp_path / "ks", SPEC, kernels=("ntk", "cov"), client=client)
    with pytest.raises(InputError, match="4 dimensions"):
        compute_kernel_store(
            ds, tmp_path / "ks", CDEQSpec(sigma_w2=1.0, sigma_u2=1.0), client=client
        )
    assert not (tmp_path / "ks").exists()


def test_dataset_replaced_under_a_store_is_refused(tmp_path, rng, client):
    from deqntk_dist.errors import StoreMismatchError

    n = 30
    ds = write_dataset_store(
        tmp_path / "ds", rng.normal(size=(n, 4)), np.zeros(n, int), n_train=n, name="t"
    )
    compute_kernel_store(ds, tmp_path / "ks", SPEC, tile=16, client=client, progress=False)
    write_dataset_store(
        tmp_path / "ds",
        rng.normal(size=(n, 4)),
        np.zeros(n, int),
        n_train=n,
        name="t",
        overwrite=True,
    )
    with pytest.raises(StoreMismatchError, match="dataset fingerprint"):
        compute_kernel_store(tmp_path / "ds", tmp_path / "ks", SPEC, client=client)
