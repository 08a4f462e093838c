"""Dataset and kernel stores on an S3-compatible object store (a moto server on 127.0.0.1):
compute, status, verify and solve through the CLI; kill -9 and resume gives the same bytes
as an uninterrupted run on local disk."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from deqntk_dist import DEQSpec, kernel_matrix, open_kernel_store, write_dataset_store
from deqntk_dist.store import verify_kernel_store
from deqntk_dist.store.dataset import open_dataset_store
from deqntk_dist.store.location import Location
from deqntk_dist.store.results import read_results

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SPEC_ARGS = ["--sigma-w2", "1.1", "--sigma-u2", "0.7", "--sigma-b2", "0.05"]
SPEC = DEQSpec(sigma_w2=1.1, sigma_u2=0.7, sigma_b2=0.05)


def _cli(*args):
    return [sys.executable, "-m", "deqntk_dist.cli", *map(str, args)]


def _objects(loc: Location, key: str = "") -> dict[str, bytes]:
    """Every object under ``key`` (recursively) except lease and probe files."""
    out = {}
    for name in loc.list(key):
        out[f"{key}/{name}".lstrip("/")] = loc.get(f"{key}/{name}".lstrip("/"))
    for name in loc.list(key, dirs=True):
        sub = f"{key}/{name}".lstrip("/")
        if loc.get(sub) is None and name != "leases":
            out.update(_objects(loc, sub))
    return out


def test_dataset_and_kernel_store_on_s3_through_the_cli(tmp_path, rng, s3_server):
    bucket = s3_server.bucket()
    n, tile = 120, 32
    x = rng.normal(size=(n, 6))
    y = rng.integers(0, 3, n)
    ds = write_dataset_store(f"{bucket}/ds.zarr", x, y, n_train=100, name="t")
    assert ds.path == f"{bucket}/ds.zarr" and open_dataset_store(ds.path).fingerprint
    store = f"{bucket}/ks.zarr"
    args = [*SPEC_ARGS, "--tile", tile, "--workers", 2, "--kernels", "ntk,nngp", "--no-progress"]
    first = subprocess.run(
        _cli("compute", ds.path, store, *args, "--max-tiles", 4),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    st = subprocess.run(_cli("status", store), capture_output=True, text=True)
    assert st.returncode == 0 and "4/10 done" in st.stdout, st.stdout + st.stderr
    rest = subprocess.run(_cli("compute", ds.path, store, *args), capture_output=True, text=True)
    assert rest.returncode == 0 and "computed 6 tiles" in rest.stdout, rest.stderr
    ok = subprocess.run(_cli("verify", store), capture_output=True, text=True)
    assert ok.returncode == 0 and "OK (10 tiles" in ok.stdout, ok.stdout + ok.stderr
    full = kernel_matrix(SPEC, x.astype(np.float32))
    ks = open_kernel_store(store)
    assert ks.format_version == 2 and not ks.loc.is_local
    np.testing.assert_array_equal(ks.array("ntk")[...], full.ntk.astype(np.float32))
    np.testing.assert_array_equal(ks.array("nngp")[...], full.nngp.astype(np.float32))
    solved = subprocess.run(
        _cli("solve", store, "--ridges", "1e-3"), capture_output=True, text=True, timeout=300
    )
    assert solved.returncode == 0, solved.stderr
    res = read_results(store, "ntk")
    assert res is not None and res["predictions"].shape[0] == 20
    # a flipped byte in a shard on the server is caught
    loc = Location.parse(store)
    raw = bytearray(loc.get("ntk/c/0/1"))
    raw[123] ^= 0x10
    loc.put("ntk/c/0/1", bytes(raw))
    assert any("checksum mismatch (shard ntk/c/0/1" in p for p in verify_kernel_store(store))


def test_sigkill_and_resume_on_s3_gives_the_bytes_of_an_uninterrupted_run(
    tmp_path, rng, s3_server
):
    bucket = s3_server.bucket()
    n, tile = 360, 24
    x = rng.normal(size=(n, 20))
    ds = write_dataset_store(f"{bucket}/ds.zarr", x, rng.integers(0, 4, n), n_train=300, name="t")
    args = [*SPEC_ARGS, "--tile", tile, "--workers", 2, "--kernels", "ntk,nngp"]
    ref = tmp_path / "ref.zarr"  # the same job, uninterrupted, on local disk
    done = subprocess.run(
        _cli("compute", ds.path, ref, *args, "--no-progress"), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    store = f"{bucket}/ks.zarr"
    loc = Location.parse(store)
    proc = subprocess.Popen(
        _cli("compute", ds.path, store, *args, "--max-in-flight", 2),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    n_tiles = 15 * 16 // 2
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if len(loc.list("ledger/records")) >= 30:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = len(open_kernel_store(store).ledger()["done"].nonzero()[0])
    assert 0 < before < n * n
    assert 0 < len(open_kernel_store(store).missing_tiles()) < n_tiles
    rerun = subprocess.run(
        _cli("compute", ds.path, store, *args, "--no-progress"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert verify_kernel_store(store) == []
    # identical bytes: every shard on the server equals the uninterrupted run's file
    here = _objects(loc)
    there = _objects(Location.parse(ref))
    shards = [k for k in there if k.split("/")[0] in ("ntk", "nngp") and "/c/" in k]
    assert len(shards) == 2 * 15 * 15
    for k in shards:
        assert here[k] == there[k], k
    # and the ledger records say the same (but for the times)
    a, b = open_kernel_store(store).ledger(), open_kernel_store(ref).ledger()
    for f in ("done", "checksum", "identity", "iterations", "max_residual"):
        np.testing.assert_array_equal(a[f], b[f])


def test_run_with_its_stores_on_s3(tmp_path, rng, s3_server):
    """``deqntk run --stores s3://...``: dataset and kernel store in the bucket, reports in
    the local workdir; a second run reuses both stores."""
    import json

    from deqntk_dist.cli import main

    x = rng.normal(size=(90, 8)) + np.repeat(np.eye(3, 8) * 3, 30, axis=0)
    y = np.repeat(np.arange(3), 30)
    src = tmp_path / "blobs.npz"
    idx = rng.permutation(90)
    np.savez(src, x_train=x[idx[:60]], y_train=y[idx[:60]], x_test=x[idx[60:]], y_test=y[idx[60:]])
    bucket = s3_server.bucket()
    argv = ["run", "--dataset", "npz", "--source", str(src), "--workdir", str(tmp_path / "w")]
    argv += ["--stores", f"{bucket}/job", "--tile", "32", "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert report["paths"]["kernel_store"] == f"{bucket}/job/kernel.zarr"
    assert report["accuracy"] > 0.9 and not (tmp_path / "w" / "kernel.zarr").exists()
    assert open_kernel_store(f"{bucket}/job/kernel.zarr").is_complete()
    assert main(argv) == 0
    again = json.loads((tmp_path / "w" / "report.json").read_text())
    assert again["stages"]["prepare"]["reused"] and again["stages"]["compute"]["reused"]
    assert again["accuracy"] == report["accuracy"]
