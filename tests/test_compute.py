"""Tiled Gram on a real Dask LocalCluster (worker processes) into a real zarr store."""

import logging
import os
import re
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
    """Finished tiles' ledger files: layout-1 ``done`` entries or layout-2 records."""
    records = os.path.join(store, "ledger", "records")
    if os.path.isdir(records):
        return sum(1 for f in os.listdir(records) if f.startswith("c."))
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
        compute_kernel_store(ds, tmp_path / "ks", spec, tol=1e-11, client=client, progress=False)
    with pytest.raises(InputError, match="tol applies to the cdeq kernel"):
        compute_kernel_store(ds, tmp_path / "ks2", SPEC, tol=1e-11, client=client, progress=False)


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
    (store / "ledger" / "records" / "c.0.0.0").unlink()
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
    with pytest.raises(InputError, match="kernels must be a non-empty list"):
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


# ------------------------------------------------------------------ issue 12 hardening
def _no_cluster(monkeypatch):
    """Make starting a cluster a test failure (for checks that must come first)."""
    import deqntk_dist.compute as compute_mod

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was started before the check")

    monkeypatch.setattr(compute_mod, "dask_client", refuse)


def test_a_resume_never_mixes_two_identities(tmp_path, rng, client):
    """A store whose spec was edited in zarr.json after tiles were written: verify reports
    it, a resume with the edited spec is refused (or recomputes those tiles on request),
    a resume with the original spec is told the attrs were edited."""
    import zarr

    from deqntk_dist.errors import StoreMismatchError

    n = 60
    x = rng.normal(size=(n, 5))
    ds = write_dataset_store(tmp_path / "ds", x, rng.integers(0, 3, n), n_train=50, name="t")
    store = tmp_path / "ks"
    rep = compute_kernel_store(
        ds, store, SPEC, tile=16, kernels=("ntk",), max_tiles=3, client=client, progress=False
    )
    assert rep.tiles_computed == 3 and rep.tiles_total == 10
    root = zarr.open_group(str(store), mode="r+")
    edited = DEQSpec(sigma_w2=0.5, sigma_u2=0.8, sigma_b2=0.2)
    root.attrs["spec"] = edited.to_dict()
    assert any("3 finished tiles were computed under another identity" in p
               for p in verify_kernel_store(store))  # fmt: skip
    with pytest.raises(StoreMismatchError, match=r"3 finished tiles were computed under another"):
        compute_kernel_store(ds, store, edited, client=client, progress=False)
    with pytest.raises(StoreMismatchError, match=r"computed with the requested settings"):
        compute_kernel_store(ds, store, SPEC, client=client, progress=False)
    assert len(open_kernel_store(store).missing_tiles()) == 7  # nothing was written
    rep = compute_kernel_store(
        ds, store, edited, recompute_mismatched=True, client=client, progress=False
    )
    assert rep.tiles_computed == 10 and rep.tiles_done_before == 0
    full = kernel_matrix(edited, x.astype(np.float32)).ntk.astype(np.float32)
    np.testing.assert_array_equal(open_kernel_store(store).array("ntk")[...], full)
    assert verify_kernel_store(store) == []


def test_a_store_from_older_software_resumes(tmp_path, rng, client):
    """No identity ledger, no leases, no label checksum (older layout): opens, resumes
    (new tiles carry digests, the old ones are noted), verifies."""
    import shutil

    import zarr

    n = 50
    x = rng.normal(size=(n, 4))
    ds = write_dataset_store(tmp_path / "ds", x, rng.integers(0, 3, n), n_train=40, name="t")
    store = tmp_path / "ks"
    compute_kernel_store(
        ds, store, SPEC, tile=16, max_tiles=4, client=client, progress=False, layout=1
    )
    for sub in ("ledger/identity", "leases"):
        shutil.rmtree(store / sub)
    labels = zarr.open_array(str(store / "labels"), mode="r+")
    labels.attrs.pop("crc32")
    spec = dict(zarr.open_group(str(store)).attrs["spec"])
    spec.pop("hflip")
    zarr.open_group(str(store), mode="r+").attrs["spec"] = spec  # an older spelling
    notes = []
    assert len(verify_kernel_store(store, notes=notes)) == 1  # 6 of 10 tiles not done
    assert any("without identity digests" in s for s in notes)
    rep = compute_kernel_store(ds, store, SPEC, client=client, progress=False)
    assert (rep.tiles_computed, rep.tiles_done_before) == (6, 4)
    notes = []
    assert verify_kernel_store(store, notes=notes) == []
    assert notes == ["4 tiles written without identity digests (older software)"]
    full = kernel_matrix(SPEC, x.astype(np.float32))
    ks = open_kernel_store(store)
    np.testing.assert_array_equal(ks.array("nngp")[...], full.nngp.astype(np.float32))


def test_tile_is_clamped_to_n_and_absurd_plans_are_refused(tmp_path, rng, client, monkeypatch):
    n = 40
    x = rng.normal(size=(n, 4))
    ds = write_dataset_store(tmp_path / "ds", x, np.zeros(n, int), n_train=n, name="t")
    rep = compute_kernel_store(
        ds, tmp_path / "ks", SPEC, tile=100000, kernels=("ntk",), client=client, progress=False
    )
    assert (rep.tile, rep.tiles_total) == (n, 1)
    assert rep.bytes_written == n * n * 4  # not a 100000 x 100000 chunk
    again = compute_kernel_store(ds, tmp_path / "ks", SPEC, tile=4000, client=client)
    assert again.tiles_computed == 0 and again.tile == n
    big = write_dataset_store(
        tmp_path / "ds2", rng.normal(size=(400, 4)), np.zeros(400, int), n_train=400, name="t"
    )
    _no_cluster(monkeypatch)
    with pytest.raises(InputError, match=r"at most 1,000 tiles .* got tile 1: 80,200 tiles"):
        compute_kernel_store(big, tmp_path / "ks2", SPEC, tile=1)
    assert not (tmp_path / "ks2").exists()


def test_a_legacy_store_with_a_huge_tile_is_refused_clearly(tmp_path, rng, monkeypatch):
    """Older software recorded tiles larger than n (chunks padded to tile x tile)."""
    import json

    import deqntk_dist.store.resume as resume_mod
    from deqntk_dist.store import create_kernel_store

    n = 40
    ds = write_dataset_store(
        tmp_path / "ds", rng.normal(size=(n, 4)), np.zeros(n, int), n_train=n, name="t"
    )
    ks = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=n, kernels=("ntk",))
    for meta in (tmp_path / "ks" / "zarr.json", tmp_path / "ks" / "ntk" / "zarr.json"):
        d = json.loads(meta.read_text())
        if "tile" in d.get("attributes", {}):
            d["attributes"]["tile"] = 100000
        else:
            d["chunk_grid"]["configuration"]["chunk_shape"] = [100000, 100000]
        meta.write_text(json.dumps(d))
    assert open_kernel_store(ks.path).tile == 100000
    monkeypatch.setattr(resume_mod, "MAX_CHUNK_BYTES", 2**20)
    _no_cluster(monkeypatch)
    with pytest.raises(StoreError, match=r"made by older software with tile 100000 > n = 40"):
        compute_kernel_store(ds, ks.path, SPEC, tile=100000)
    with pytest.raises(StoreError, match=r"tile 100000 > n = 40"):
        compute_kernel_store(ds, ks.path, SPEC)


def test_bad_runtime_arguments_and_read_only_stores_fail_before_a_cluster(
    tmp_path, rng, monkeypatch, small_fs
):
    n = 30
    ds = write_dataset_store(
        tmp_path / "ds", rng.normal(size=(n, 4)), np.zeros(n, int), n_train=n, name="t"
    )
    fs = small_fs("8m")
    from deqntk_dist.store import create_kernel_store

    create_kernel_store(fs.path / "ks", ds, SPEC, tile=16)
    fs.readonly()
    _no_cluster(monkeypatch)
    with pytest.raises(StoreError, match=r"kernel store .*ks is not writable"):
        compute_kernel_store(ds, fs.path / "ks", SPEC)
    with pytest.raises(StoreError, match=r"cannot create kernel store at .*ks2"):
        compute_kernel_store(ds, fs.path / "ks2", SPEC)
    with pytest.raises(InputError, match=r"memory_budget must be at least 1 MiB, got 0"):
        compute_kernel_store(ds, tmp_path / "k3", SPEC, memory_budget=0)
    with pytest.raises(InputError, match=r"task_threads must be an integer >= 1, got -3"):
        compute_kernel_store(ds, tmp_path / "k3", SPEC, task_threads=-3)
    with pytest.raises(InputError, match=r"max_tiles must be an integer >= 1, got 0"):
        compute_kernel_store(ds, tmp_path / "k3", SPEC, max_tiles=0)
    from deqntk_dist.cli import main

    with pytest.raises(SystemExit) as e:  # argparse: the size parser refuses it
        main(["compute", ds.path, str(tmp_path / "k4"), "--memory-budget", "0"])
    assert e.value.code == 2
    assert main(["compute", ds.path, str(tmp_path / "k4"), "--task-threads", "-3"]) == 2
    assert not (tmp_path / "k3").exists() and not (tmp_path / "k4").exists()


def test_an_interrupted_store_solves_on_a_leading_block(tmp_path, rng, client):
    """Tiles run training block by training block (each with its test tiles), so a store
    stopped after k tiles has the leading block those k tiles can cover."""
    from deqntk_dist.regression import solve_store

    n, n_train = 150, 120
    centres = 3 * rng.normal(size=(3, 6))
    y = rng.integers(0, 3, n)
    x = centres[y] + rng.normal(size=(n, 6))
    ds = write_dataset_store(tmp_path / "ds", x, y, n_train=n_train, name="t")
    # blocks of 32: training blocks 0..3 (3 straddles n_train), test block 4; shells of
    # 2, 3, 4, 5 tiles: after 9 tiles the leading 96 x 96 block is done, and so are the
    # test rows of block 4 against it (those of block 3 come with its shell)
    rep = compute_kernel_store(
        ds, tmp_path / "ks", SPEC, tile=32, kernels=("ntk",), max_tiles=9, client=client,
        progress=False,
    )  # fmt: skip
    assert rep.tiles_computed == 9
    sol = solve_store(tmp_path / "ks", ridges=[1e-3], allow_incomplete=True, write_results=False)
    assert (sol.n_train, sol.n_test) == (96, 22)
    assert sol.incomplete and sol.accuracy > 0.8


def _lease(store, i, j, *, host, pid, start, age=0.0):
    import json
    import os
    import time

    path = os.path.join(store, "leases", "c", str(i), str(j), "0")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rec = {"token": "f" * 32, "host": host, "pid": pid, "start": start}
    with open(path, "wb") as f:
        f.write(json.dumps(rec).encode().ljust(256, b"\0"))
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def test_stale_leases_are_taken_over(tmp_path, rng, client):
    """Leases of a killed job: not renewed for longer than the ttl (another host), or of a
    process that no longer exists on this host; both are taken over at once."""
    import socket
    import subprocess
    import sys

    from deqntk_dist.store import create_kernel_store

    n = 40
    x = rng.normal(size=(n, 4))
    ds = write_dataset_store(tmp_path / "ds", x, np.zeros(n, int), n_train=n, name="t")
    ks = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=16, kernels=("ntk",))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout  # fmt: skip
    paths = [
        _lease(ks.path, 0, 0, host="elsewhere", pid=1, start=0.0, age=1000.0),
        _lease(ks.path, 1, 1, host=socket.gethostname(), pid=int(dead), start=1.0),
    ]
    logs = []
    rep = compute_kernel_store(ds, ks.path, SPEC, client=client, progress=False, log=logs.append)
    assert rep.tiles_computed == 6 and rep.tiles_by_others == 0
    assert not any("another job" in m for m in logs)
    assert not any(os.path.exists(p) for p in paths)
    assert verify_kernel_store(ks.path) == []


def test_a_tile_leased_by_a_live_job_is_left_to_it(tmp_path, rng, client):
    import psutil

    from deqntk_dist.store import create_kernel_store

    n = 40
    x = rng.normal(size=(n, 4))
    ds = write_dataset_store(tmp_path / "ds", x, np.zeros(n, int), n_train=n, name="t")
    ks = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=16, kernels=("ntk",))
    import socket

    me = psutil.Process()
    lease = _lease(
        ks.path, 1, 2, host=socket.gethostname(), pid=me.pid, start=round(me.create_time(), 3)
    )
    logs, out = [], {}

    def job():
        out["report"] = compute_kernel_store(
            ds, ks.path, SPEC, client=client, progress=False, log=logs.append
        )

    th = threading.Thread(target=job)
    th.start()
    deadline = time.monotonic() + 120
    while not any("another job" in m for m in logs) and time.monotonic() < deadline:
        time.sleep(0.05)
    # the job's other tiles may still be in flight when it reports the leased one
    while open_kernel_store(ks.path).missing_tiles() != [(1, 2)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert th.is_alive() and open_kernel_store(ks.path).missing_tiles() == [(1, 2)]
    # the other job finishes its tile and releases the lease
    X = ds.rows(0, n)
    res = kernel_matrix(SPEC, X[16:32], X[32:40])
    writer = open_kernel_store(ks.path, writable=True)
    writer.write_tile(1, 2, {"ntk": res.ntk}, max_residual=0.0, iterations=1, seconds=0.0)
    os.unlink(lease)
    th.join(120)
    rep = out["report"]
    assert (rep.tiles_computed, rep.tiles_by_others) == (5, 1)
    assert verify_kernel_store(ks.path) == []


def test_a_task_re_executed_for_a_done_tile_does_not_compute_it_again(tmp_path, rng, client):
    """A tile task that runs again after its tile was written (its worker retired with the
    result unread) rebuilds its report from the ledger and writes nothing."""
    from dataclasses import replace

    from deqntk_dist.tasks import TileJob, run_tile

    spec = DEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1)
    x = rng.normal(size=(40, 6))
    ds = write_dataset_store(tmp_path / "ds", x, rng.integers(0, 3, 40), n_train=30, name="s")
    compute_kernel_store(ds, tmp_path / "ks", spec, tile=16, client=client, progress=False)
    ks = open_kernel_store(tmp_path / "ks")
    before = ks.ledger()
    job = TileJob(
        store=ks.path,
        dataset=ds.path,
        i=0,
        j=1,
        rows=ks.plan.bounds(0),
        cols=ks.plan.bounds(1),
        threads=1,
        options=dict(ks.options),
        identity=ks.identity_digest,
    )
    files = sorted(p.stat().st_mtime_ns for p in (tmp_path / "ks").rglob("*") if p.is_file())
    rep = run_tile(job)
    assert rep["ok"] and rep["reused"] and rep["bytes"] == 0 and rep["entries"] == 2 * 16 * 16
    assert rep["checksum"] == int(before["checksum"][0, 1])
    assert rep["max_residual"] == before["max_residual"][0, 1]
    after = sorted(p.stat().st_mtime_ns for p in (tmp_path / "ks").rglob("*") if p.is_file())
    assert after == files  # nothing rewritten
    # a tile not marked done is computed (and equals the first result bitwise)
    open_kernel_store(ks.path, writable=True).invalidate(tiles=[(0, 1)])
    ntk = ks.array("ntk")[:16, 16:32]
    rep = run_tile(replace(job))
    assert rep["ok"] and not rep["reused"] and rep["bytes"] > 0
    np.testing.assert_array_equal(open_kernel_store(ks.path).array("ntk")[:16, 16:32], ntk)
    assert verify_kernel_store(ks.path) == []


def test_resume_asking_a_subset_of_the_store_kernels_completes_the_store(tmp_path, rng, client):
    """One rule for kernels (store and pipeline): a request for a subset of a store's
    kernels resumes it, computing every kernel the store declares; a superset is refused."""
    from deqntk_dist.errors import StoreMismatchError
    from deqntk_dist.options import ComputeOptions
    from deqntk_dist.pipeline import _kernel_store_state

    spec = DEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1)
    x = rng.normal(size=(48, 5))
    ds = write_dataset_store(tmp_path / "ds", x, rng.integers(0, 3, 48), n_train=40, name="s")
    path = tmp_path / "ks"
    kw = dict(tile=16, client=client, progress=False)
    compute_kernel_store(ds, path, spec, kernels=("ntk", "nngp"), max_tiles=2, **kw)
    assert _kernel_store_state(path, spec, ds, ComputeOptions(kernels=("ntk",))) == "partial"
    rep = compute_kernel_store(ds, path, spec, kernels=("ntk",), **kw)
    assert rep.tiles_computed == 4
    ks = open_kernel_store(path)
    assert ks.kernels == ("ntk", "nngp") and ks.is_complete()
    full = kernel_matrix(spec, x.astype(np.float32))
    np.testing.assert_array_equal(ks.array("ntk")[...], full.ntk.astype(np.float32))
    np.testing.assert_array_equal(ks.array("nngp")[...], full.nngp.astype(np.float32))
    assert verify_kernel_store(path) == []
    assert _kernel_store_state(path, spec, ds, ComputeOptions(kernels=("nngp",))) == "complete"

    only_ntk = tmp_path / "ntk"
    compute_kernel_store(ds, only_ntk, spec, kernels=("ntk",), max_tiles=1, **kw)
    assert (
        _kernel_store_state(only_ntk, spec, ds, ComputeOptions(kernels=("ntk", "nngp")))
        == "mismatch"
    )
    with pytest.raises(StoreMismatchError, match=r"kernels: store has \['ntk'\], requested"):
        compute_kernel_store(ds, only_ntk, spec, kernels=("ntk", "nngp"), **kw)


# ------------------------------------------------------- issue 16: worker errors, cache
def test_a_worker_fixed_point_error_arrives_as_itself_with_its_entries(tmp_path, rng, client):
    """The FixedPointError of a tile computed in a worker process reaches the caller with
    its type and attributes (the entries of the first failing tile), chained to the
    worker's exception, its message saying which tile failed."""
    spec = DEQSpec(sigma_w2=5.0, sigma_u2=1.0, activation="erf")  # no unique fixed point
    n = 24
    x = rng.normal(size=(n, 5))
    ds = write_dataset_store(tmp_path / "ds", x, np.zeros(n, int), n_train=n, name="t")
    with pytest.raises(FixedPointError) as info:
        compute_kernel_store(ds, tmp_path / "ks", spec, tile=12, client=client, progress=False)
    err = info.value
    found = re.match(
        r"tile \((\d+), (\d+)\) rows \[(\d+), (\d+)\) x cols \[(\d+), (\d+)\) failed: (.*) "
        r"did not converge .*; finished tiles are kept in the store$",
        str(err),
    )
    assert found, str(err)
    i, j, r0, r1, c0, c1 = (int(v) for v in found.groups()[:6])
    # the same tile computed here fails on the same entries
    X = ds.rows(r0, r1).astype(np.float64)
    Y = None if i == j else ds.rows(c0, c1).astype(np.float64)
    with pytest.raises(FixedPointError) as local:
        kernel_matrix(spec, X, Y)
    assert err.entries == local.value.entries and len(err.entries) > 0
    assert err.n_failed == local.value.n_failed >= len(err.entries)
    assert all(isinstance(e, tuple) for e in err.entries)
    cause = err.__cause__
    assert type(cause) is FixedPointError and cause.entries == err.entries
    assert f"({i}, {j}) rows [{r0}, {r1}) x cols [{c0}, {c1}) failed: {cause}" in str(err)


def test_a_worker_store_mismatch_arrives_as_itself(tmp_path, rng, client, monkeypatch):
    """A tile job planned under another identity than the store's: the worker refuses it
    (StoreMismatchError), and the caller gets a StoreMismatchError, nothing written."""
    import deqntk_dist.compute as compute_mod
    from deqntk_dist.errors import StoreMismatchError
    from deqntk_dist.tasks import TileJob

    def stale_job(**kw):
        return TileJob(**{**kw, "identity": "0" * 16})

    monkeypatch.setattr(compute_mod, "TileJob", stale_job)
    n = 30
    ds = write_dataset_store(
        tmp_path / "ds", rng.normal(size=(n, 4)), np.zeros(n, int), n_train=n, name="t"
    )
    with pytest.raises(StoreMismatchError) as info:
        compute_kernel_store(ds, tmp_path / "ks", SPEC, tile=16, client=client, progress=False)
    err = info.value
    assert re.search(r"^tile \(\d, \d\) rows .* failed: the attrs of kernel store", str(err))
    assert "planned under 0000000000000000" in str(err)
    assert type(err.__cause__) is StoreMismatchError
    assert len(open_kernel_store(tmp_path / "ks").missing_tiles()) == 3


def _touch(path, ns_later: int = 10**9) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + ns_later))


def test_worker_cache_keeps_its_bounds_and_reopens_changed_stores(tmp_path, rng):
    from deqntk_dist.errors import StoreMismatchError
    from deqntk_dist.store import create_kernel_store
    from deqntk_dist.tasks import WorkerCache

    n, d = 40, 8
    x = rng.normal(size=(n, d))
    ds = write_dataset_store(tmp_path / "ds", x, np.zeros(n, int), n_train=n, name="t")
    ks = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=10, kernels=("ntk",))
    block = 10 * d * 8  # bytes of a 10-row float64 block

    # at least rows_keep blocks, more while within rows_bytes, least recently used first out
    cache = WorkerCache(rows_keep=2, rows_bytes=3 * block)
    fp = ks.dataset_fingerprint
    first = cache.rows(ds.path, fp, 0, 10)
    np.testing.assert_array_equal(first, ds.rows(0, 10).astype(np.float64))
    assert first.dtype == np.float64
    for a in (10, 20, 30):
        cache.rows(ds.path, fp, a, a + 10)
    assert cache.cached_rows() == [(10, 20), (20, 30), (30, 40)]
    assert cache.row_bytes() == 3 * block
    assert cache.rows(ds.path, fp, 10, 20) is cache.rows(ds.path, fp, 10, 20)  # a hit
    assert cache.cached_rows() == [(20, 30), (30, 40), (10, 20)]
    cache.rows(ds.path, fp, 0, 40)  # a big block: only rows_keep are left
    assert cache.cached_rows() == [(10, 20), (0, 40)]
    small = WorkerCache(rows_keep=1, rows_bytes=0)
    for a in (0, 10, 20):
        small.rows(ds.path, fp, a, a + 10)
    assert small.cached_rows() == [(20, 30)]

    # another dataset fingerprint is refused
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        cache.rows(ds.path, "not-the-fingerprint", 0, 10)

    # the kernel store is reused until its zarr.json changes, then reopened
    opened = cache.kernel_store(ks.path)
    assert cache.kernel_store(ks.path) is opened and opened.tile == 10
    _touch(tmp_path / "ks" / "zarr.json")
    again = cache.kernel_store(ks.path)
    assert again is not opened and again.path == opened.path
    assert cache.kernel_store(ks.path) is again

    # a dataset store whose zarr.json changed is reopened and its row blocks dropped
    _touch(tmp_path / "ds" / "zarr.json")
    cache.rows(ds.path, fp, 20, 30)
    assert cache.cached_rows() == [(20, 30)]

    # tile buffers: reused for a shape, page-aligned, of the store's dtype
    buf = cache.tile_buffers(again, (10, 10))
    assert set(buf) == {"ntk"} and buf["ntk"].dtype == again.dtype
    assert buf["ntk"].ctypes.data % 4096 == 0
    assert cache.tile_buffers(again, (10, 10))["ntk"] is buf["ntk"]
    cache.clear()
    assert cache.cached_rows() == [] and cache.kernel_store(ks.path) is not again


def test_a_worker_with_several_threads_writes_every_tile_exactly(tmp_path, rng):
    """Several threads of one worker write tiles of one store at once: each tile gets its
    own values (the reused cast, shard and padding buffers are per thread; shared, they
    mixed the values of concurrent diagonal tiles by up to 7 in this store)."""
    import logging

    from distributed import Client, LocalCluster

    n, tile = 160, 32
    spec = DEQSpec(sigma_w2=1.2, sigma_u2=1.0, sigma_b2=0.3)
    x = rng.normal(size=(n, 10))
    ds = write_dataset_store(tmp_path / "ds", x, np.arange(n) % 3, n_train=n, name="t")
    out = {k: np.empty((n, n), np.float32) for k in ("ntk", "nngp")}
    kernel_matrix(spec, ds.rows(0, n), out=out)
    cluster = LocalCluster(
        n_workers=1, processes=False, threads_per_worker=2, dashboard_address=None,
        silence_logs=logging.ERROR,
    )  # fmt: skip
    with cluster, Client(cluster) as cl:
        for run in range(2):
            path = tmp_path / f"ks{run}"
            compute_kernel_store(ds, path, spec, tile=tile, client=cl, progress=False)
            ks = open_kernel_store(path)
            for k in ("ntk", "nngp"):
                np.testing.assert_array_equal(ks.array(k)[...], out[k])
