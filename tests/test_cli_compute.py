"""`deqntk compute / status / verify` as subprocesses: SIGKILL part-way and resume."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from deqntk_dist import DEQSpec, kernel_matrix, open_kernel_store, write_dataset_store

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SPEC_ARGS = ["--sigma-w2", "1.1", "--sigma-u2", "0.7", "--sigma-b2", "0.05"]
SPEC = DEQSpec(sigma_w2=1.1, sigma_u2=0.7, sigma_b2=0.05)


def _cli(*args, **kw):
    return [sys.executable, "-m", "deqntk_dist.cli", *map(str, args)]


def _done_files(store) -> int:
    """Finished tiles' ledger files: layout-1 ``done`` entries or layout-2 records."""
    records = os.path.join(store, "ledger", "records")
    if os.path.isdir(records):
        return sum(1 for f in os.listdir(records) if f.startswith("c."))
    root = os.path.join(store, "ledger", "done", "c")
    return sum(len(files) for _, _, files in os.walk(root)) if os.path.isdir(root) else 0


def test_sigkill_then_rerun_completes_exactly_the_missing_tiles(tmp_path, rng):
    n, tile = 400, 16
    x = rng.normal(size=(n, 30))
    ds = write_dataset_store(tmp_path / "ds", x, rng.integers(0, 5, n), n_train=350, name="t")
    store = str(tmp_path / "ks")
    cmd = _cli(
        "compute",
        ds.path,
        store,
        *SPEC_ARGS,
        "--tile",
        tile,
        "--workers",
        2,
        "--kernels",
        "ntk,nngp",
        "--max-in-flight",
        2,
    )
    n_tiles = 25 * 26 // 2
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while _done_files(store) < 40 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, "the job finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker processes
        proc.wait()
    time.sleep(0.5)
    ks = open_kernel_store(store)
    led = ks.ledger()
    before = {t for t in ks.plan.tiles() if led["done"][t]}
    assert 0 < len(before) < n_tiles
    # the killed store is usable: tiles ran training block by block (each with its test
    # tiles), so >= 20 finished tiles (2 in flight) complete the shells of blocks 0 and 1
    # (4 + 5 tiles) and every test row of the test blocks (352..399) against them
    from deqntk_dist.regression import solve_store

    part = solve_store(store, ridges=[1e-3], allow_incomplete=True, write_results=False)
    assert part.n_train >= 32 and part.n_test == 48, (part.n_train, part.n_test, len(before))
    rerun = subprocess.run(cmd + ["--no-progress"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    m = re.search(r"(\d+) done, computing (\d+)", rerun.stderr)
    assert m and int(m.group(1)) == len(before) and int(m.group(2)) == n_tiles - len(before)
    assert f"computed {n_tiles - len(before)} tiles" in rerun.stdout
    after = open_kernel_store(store).ledger()
    for t in before:  # finished tiles were not recomputed
        assert after["finished"][t] == led["finished"][t]
        assert after["checksum"][t] == led["checksum"][t]
    assert after["done"].all()
    full = kernel_matrix(SPEC, x.astype(np.float32))
    ks = open_kernel_store(store)
    np.testing.assert_array_equal(ks.array("ntk")[...], full.ntk.astype(np.float32))
    np.testing.assert_array_equal(ks.array("nngp")[...], full.nngp.astype(np.float32))
    ok = subprocess.run(_cli("verify", store), capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr
    st = subprocess.run(_cli("status", store), capture_output=True, text=True)
    assert st.returncode == 0 and f"{n_tiles}/{n_tiles} done" in st.stdout
    # identical bytes: every shard file equals that of the same job run without a kill
    ref = str(tmp_path / "ref")
    plain = [ref if a == store else a for a in cmd]
    assert subprocess.run(plain + ["--no-progress"], capture_output=True).returncode == 0
    for name in ("ntk", "nngp"):
        files = sorted(p for p in (tmp_path / "ref" / name / "c").rglob("*") if p.is_file())
        assert len(files) == 25 * 25
        for f in files:
            rel = f.relative_to(tmp_path / "ref")
            assert (tmp_path / "ks" / rel).read_bytes() == f.read_bytes(), rel


def test_verify_status_and_errors_through_the_cli(tmp_path, rng):
    n = 70
    x = rng.normal(size=(n, 6))
    ds = write_dataset_store(tmp_path / "ds", x, np.zeros(n, int), n_train=60, name="t")
    store = tmp_path / "ks"
    done = subprocess.run(
        _cli(
            "compute",
            ds.path,
            store,
            *SPEC_ARGS,
            "--tile",
            32,
            "--workers",
            2,
            "--kernels",
            "ntk",
            "--dtype",
            "float64",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "tiles" in done.stderr and "entries/s" in done.stderr and "dashboard" in done.stderr
    np.testing.assert_array_equal(
        open_kernel_store(store).array("ntk")[...], kernel_matrix(SPEC, x.astype(np.float32)).ntk
    )
    # corrupt one chunk file on disk: verify must fail and name the tile
    chunk = store / "ntk" / "c" / "1" / "2"
    raw = bytearray(chunk.read_bytes())
    raw[8 * 5 + 3] ^= 0x40
    chunk.write_bytes(bytes(raw))
    bad = subprocess.run(_cli("verify", store), capture_output=True, text=True)
    assert bad.returncode == 1
    assert "PROBLEM: tile (1, 2) ntk: checksum mismatch (shard ntk/c/1/2 changed)" in bad.stdout
    # a missing tile in the ledger (its record deleted) shows in status and verify
    (store / "ledger" / "records" / "c.0.1.0").unlink()
    st = subprocess.run(_cli("status", store), capture_output=True, text=True)
    assert "5/6 done" in st.stdout
    assert subprocess.run(_cli("verify", store), capture_output=True).returncode == 1
    # mismatched spec, missing dataset store, missing kernel store: exit 2, clear message
    mism = subprocess.run(
        _cli("compute", ds.path, store, "--sigma-w2", "1.5", "--workers", 1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert mism.returncode == 2 and "different settings" in mism.stderr
    assert "sigma_w2" in mism.stderr
    nods = subprocess.run(
        _cli("compute", tmp_path / "nope", tmp_path / "k2"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert nods.returncode == 2 and "dataset store not found" in nods.stderr
    nostore = subprocess.run(_cli("status", tmp_path / "k3"), capture_output=True, text=True)
    assert nostore.returncode == 2 and "kernel store not found" in nostore.stderr


def test_compute_on_an_existing_scheduler(tmp_path, rng):
    import logging

    from distributed import LocalCluster

    n = 50
    x = rng.normal(size=(n, 5))
    ds = write_dataset_store(tmp_path / "ds", x, np.zeros(n, int), n_train=n, name="t")
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster:
        run = subprocess.run(
            _cli(
                "compute",
                ds.path,
                tmp_path / "ks",
                *SPEC_ARGS,
                "--tile",
                20,
                "--scheduler",
                cluster.scheduler_address,
                "--no-progress",
            ),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 0, run.stderr
    assert "2 workers" in run.stderr and "computed 6 tiles" in run.stdout
    ks = open_kernel_store(tmp_path / "ks")
    full = kernel_matrix(SPEC, x.astype(np.float32))
    np.testing.assert_array_equal(ks.array("nngp")[...], full.nngp.astype(np.float32))


# ------------------------------------------------------------------ issue 12 hardening
def _sigint_default():
    import signal as _signal

    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # as in a terminal (not a background job)


def test_two_jobs_on_one_store_share_the_tiles(tmp_path, rng):
    """Two `deqntk compute` processes on one store: each tile is computed by exactly one of
    them (leases), both finish, the store is the untiled Gram."""
    n = 160
    x = rng.normal(size=(n, 10))
    ds = write_dataset_store(tmp_path / "ds", x, np.zeros(n, int), n_train=n, name="t")
    store = str(tmp_path / "ks")
    gelu = ["--activation", "gelu", "--kernels", "ntk"]  # slow tiles (quadrature): overlap
    cmd = _cli("compute", ds.path, store, *SPEC_ARGS, *gelu, "--tile", 16, "--workers", 1,
               "--no-progress")  # fmt: skip
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while _done_files(store) < 4 and time.monotonic() < deadline and a.poll() is None:
        time.sleep(0.02)
    b = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_a, err_a = a.communicate(timeout=600)
    out_b, err_b = b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, err_a + err_b
    counts = [int(re.search(r"computed (\d+) tiles", out).group(1)) for out in (out_a, out_b)]
    assert sum(counts) == 55 and min(counts) > 0, (out_a, out_b)
    print("tiles computed by each job:", counts)
    spec = DEQSpec(sigma_w2=1.1, sigma_u2=0.7, sigma_b2=0.05, activation="gelu")
    full = kernel_matrix(spec, x.astype(np.float32)).ntk.astype(np.float32)
    np.testing.assert_array_equal(open_kernel_store(store).array("ntk")[...], full)
    ok = subprocess.run(_cli("verify", store), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout
    leases = [p for p in (tmp_path / "ks" / "leases").rglob("*") if p.is_file() and p.name == "0"]
    assert leases == []


def test_ctrl_c_and_a_full_disk_end_with_one_clear_line(tmp_path, rng, small_fs):
    n = 2000
    x = rng.normal(size=(n, 50))
    ds = write_dataset_store(tmp_path / "ds", x, np.zeros(n, int), n_train=n, name="t")
    store = tmp_path / "ks"
    cmd = _cli("compute", ds.path, store, "--tile", 64, "--workers", 2, "--no-progress")
    for _attempt in range(3):  # on a loaded machine the job may finish before the Ctrl-C
        shutil.rmtree(store, ignore_errors=True)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True, preexec_fn=_sigint_default,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while _done_files(store) < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        try:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does in a terminal
        except ProcessLookupError:
            proc.communicate()
            continue
        break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "deqntk compute: interrupted"
    assert len(err.strip().splitlines()) <= 3, err
    assert [
        p for p in (store / "leases").rglob("*") if p.is_file() and p.name == "0"
    ] == []  # released
    fs = small_fs("3m")
    full = subprocess.run(
        _cli("compute", ds.path, fs.path / "ks", "--tile", 256, "--workers", 2, "--no-progress"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 2 and "Traceback" not in full.stderr and len(lines) <= 4, lines
    assert "No space left on device" in lines[-1] and "finished tiles are kept" in lines[-1]
    assert lines[0].startswith("deqntk: warning:") and "GB free" in lines[0]


def test_multi_line_errors_become_one_line():
    from deqntk_dist.cli import _one_line

    exc = ValueError("store was made with different settings; delete it:\n  spec: a\n  tile: b")
    assert _one_line(exc) == "store was made with different settings; delete it: spec: a; tile: b"


def test_two_jobs_started_at_once_on_a_new_store(tmp_path, rng):
    """Two `deqntk compute` jobs started at the same instant on a store that does not exist
    yet: one creates it, the other reopens it (the creation race), the leases split the
    tiles (each computed once), the store verifies."""
    n, tile = 300, 20
    x = rng.normal(size=(n, 12))
    ds = write_dataset_store(tmp_path / "ds", x, rng.integers(0, 3, n), n_train=250, name="t")
    store = str(tmp_path / "ks")
    cmd = _cli(
        "compute", ds.path, store, *SPEC_ARGS, "--tile", tile, "--workers", 1, "--no-progress"
    )
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    n_tiles = 15 * 16 // 2
    computed = []
    for out, _ in outs:
        m = re.search(r"computed (\d+) tiles", out)
        assert m, out
        computed.append(int(m.group(1)))
    assert sum(computed) == n_tiles, computed
    ok = subprocess.run(_cli("verify", store), capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr
    full = kernel_matrix(SPEC, x.astype(np.float32))
    got = open_kernel_store(store)
    np.testing.assert_array_equal(got.array("ntk")[...], full.ntk.astype(np.float32))
    np.testing.assert_array_equal(got.array("nngp")[...], full.nngp.astype(np.float32))
    assert not any(
        p.is_file() for p in (tmp_path / "ks" / "leases").rglob("*") if p.name != "zarr.json"
    )
