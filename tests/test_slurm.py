"""Batch jobs on a real SLURM: a single node on 127.0.0.1 started by cluster/slurm/local-slurm.sh.

The daemons (munged, slurmctld, slurmd) run as root with a private configuration under a
temporary directory (``SLURM_CONF``); the script installs ``slurm-wlm`` and ``munge`` with
apt-get when they are missing.  Without root (or when the daemons cannot start) every test
here is skipped with the reason.  The node has the machine's cores (2 here): one for a
driver, one for a one-core worker job, so worker jobs are really queued behind each other.

Every worker job runs ``dask worker`` with a preload (``count_tiles.py``) that appends one
line per *finished* tile execution to a file, so the tests count executions across jobs.
The stores are compared bitwise with an in-process ``kernel_matrix`` of the whole data.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from deqntk_dist import CDEQSpec, kernel_matrix, open_kernel_store, write_dataset_store
from deqntk_dist.errors import StoreError
from deqntk_dist.store import verify_kernel_store

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = ROOT / "cluster" / "slurm" / "local-slurm.sh"
# 12x12 images, gap readout: ~0.1-0.2 s per 8x8 tile on one core, long enough to act mid-run
SPEC = CDEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1, readout="gap")
SPEC_ARGS = ["--model", "cdeq", "--readout", "gap", "--sigma-w2", "1", "--sigma-u2", "1"]
SPEC_ARGS += ["--sigma-b2", "0.1", "--tile", "8", "--no-progress"]
N, SIDE = 120, 12  # 15 x 15 blocks: 120 tiles


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two free consecutive ports")


class Slurm:
    """The running single-node SLURM (``env`` has SLURM_CONF for its commands)."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {
            **os.environ,
            "SLURM_CONF": str(root / "slurm.conf"),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        }

    def run(self, *args: str, check: bool = True) -> str:
        res = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check:
            assert res.returncode == 0, f"{args}: {res.stdout}{res.stderr}"
        return res.stdout

    def jobs(self) -> dict[str, tuple[str, str]]:
        """Jobs in the queue: ``{job_id: (name, state)}`` (finished ones included)."""
        out = self.run("squeue", "-h", "--states=all", "-o", "%i %j %T")
        return {p[0]: (p[1], p[2]) for p in (line.split() for line in out.splitlines()) if p}

    def active(self, name: str | None = None) -> dict[str, str]:
        """Jobs not yet ended (of one job name, or all): ``{job_id: state}``."""
        alive = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING"}
        return {j: s for j, (n, s) in self.jobs().items() if name in (None, n) and s in alive}

    def wait_until(self, what: str, cond, timeout: float = 120.0, every: float = 0.2):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            time.sleep(every)
        raise TimeoutError(f"{what} not within {timeout:g} s; queue: {self.jobs()}")

    def cancel_all(self) -> None:
        self.run("scancel", "-u", str(os.getuid()), check=False)
        self.wait_until("an empty queue", lambda: not self.active(), timeout=60)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a local SLURM needs root on Linux (the daemons run as root)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("slurm-wlm is not installed and apt-get is not available")
    root = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "DEQNTK_SLURM_PORT": str(_free_port_pair())}
    res = subprocess.run(
        ["bash", str(SCRIPT), "start", str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if res.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(root)], env=env, capture_output=True)
        pytest.skip(f"the local SLURM did not start: {res.stderr.strip()[-500:]}")
    s = Slurm(root)
    try:
        yield s
    finally:
        s.run("scancel", "-u", str(os.getuid()), check=False)
        subprocess.run(["bash", str(SCRIPT), "stop", str(root)], env=env, capture_output=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(3)
    x = rng.uniform(0.0, 1.0, size=(N, SIDE, SIDE, 1))
    y = rng.integers(0, 10, N)
    root = tmp_path_factory.mktemp("slurm-data")
    ds = write_dataset_store(root / "ds.zarr", x, y, n_train=N - 24, name="synthetic")
    ref = kernel_matrix(SPEC, x.astype(np.float32), tol=1e-9)  # the store holds float32 rows
    return ds.path, ref.ntk.astype(np.float32), ref.nngp.astype(np.float32)


COUNT_TILES = '''
"""Worker preload of tests/test_slurm.py: one line per finished tile execution."""
import os
from distributed.diagnostics.plugin import WorkerPlugin

PATH = os.environ["DEQNTK_TEST_EXECUTIONS"]


class CountTiles(WorkerPlugin):
    def setup(self, worker):
        self.worker = worker

    def transition(self, key, start, finish, **kwargs):
        if finish == "memory" and str(key).startswith("deqntk-run_tile"):
            report = self.worker.data.get(key, {})
            how = "reused" if report.get("reused") else "computed"
            with open(PATH, "a") as fh:
                fh.write(f"{key} {self.worker.name} {os.getpid()} {how}\\n")


async def dask_setup(worker):
    await worker.plugin_add(CountTiles(), name="count-tiles")
'''


def _config(root: Path, *, walltime="00:10:00", extra_args=(), prologue=(), max_failed=3) -> Path:
    """A DASK_CONFIG directory: one-core worker jobs on loopback, quick checks."""
    conf = root / "dask-config"
    conf.mkdir(parents=True, exist_ok=True)
    (root / "count_tiles.py").write_text(COUNT_TILES)
    args = [f"--preload={root / 'count_tiles.py'}", *extra_args]
    lines = [f'source "{BIN / "activate"}"', *prologue]
    (conf / "jobqueue.yaml").write_text(
        textwrap.dedent(
            f"""\
            jobqueue:
              slurm:
                name: deqntk-worker
                cores: 1
                processes: 1
                memory: 2GiB
                walltime: '{walltime}'
                interface: lo
                death-timeout: 15
                local-directory: {root / "scratch"}
                log-directory: {root / "logs"}
                worker-extra-args: {args!r}
                job-script-prologue: {lines!r}
                scheduler-options:
                  dashboard_address: "127.0.0.1:0"
            """
        )
    )
    (conf / "deqntk.yaml").write_text(
        textwrap.dedent(
            f"""\
            deqntk:
              adapt:
                minimum-jobs: 1
                maximum-jobs: 1
                interval: 2s
                wait-count: 3
              worker-timeout: 300
              job-check-interval: 2s
              max-failed-starts: {max_failed}
            """
        )
    )
    shutil.copy(ROOT / "cluster" / "distributed.yaml", conf / "distributed.yaml")
    return conf


def _env(slurm: Slurm, root: Path, conf: Path) -> dict[str, str]:
    return {
        **slurm.env,
        "DASK_CONFIG": str(conf),
        "DEQNTK_HOME": str(ROOT),
        "DEQNTK_TEST_EXECUTIONS": str(root / "executions.txt"),
    }


def _executions(root: Path, how: str = "computed") -> Counter:
    """Tile computations (``how="computed"``) or re-executions answered from the ledger
    (``"reused"``), by task key."""
    path = root / "executions.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(p[0] for p in (line.split() for line in lines) if p[3] == how)


def _tiles_done(store: Path) -> int:
    try:
        ks = open_kernel_store(store)
    except StoreError:
        return 0
    return ks.plan.n_tiles - len(ks.missing_tiles())


def _check_store(store: Path, ntk: np.ndarray, nngp: np.ndarray) -> None:
    assert verify_kernel_store(store) == []
    ks = open_kernel_store(store)
    np.testing.assert_array_equal(ks.array("ntk")[...], ntk)
    np.testing.assert_array_equal(ks.array("nngp")[...], nngp)


def _compute(env, dataset, store, log: Path, *extra: str) -> subprocess.Popen:
    """``deqntk compute --cluster slurm`` as a driver process on this host."""
    args = [str(BIN / "deqntk"), "compute", str(dataset), str(store), "--cluster", "slurm"]
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*args, *SPEC_ARGS, *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log.parent,
            start_new_session=True,
        )


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(
            f"the driver did not finish in {timeout} s:\n{log.read_text()}"
        ) from None
    return log.read_text()


def _sbatch_driver(slurm: Slurm, env, root: Path, store: Path, dataset, *extra: str) -> str:
    """Submit the documented driver job; one core and 2 GB so a worker job fits beside it."""
    env = {**env, "DATASET": str(dataset), "STORE": str(store)}
    out = subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=1", "--mem=2G"]
        + [f"--output={root}/driver-%j.out", str(ROOT / "cluster/slurm/deqntk-compute.sbatch")]
        + [*SPEC_ARGS, *extra],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def test_driver_job_runs_to_a_bitwise_store(slurm, data, tmp_path):
    """`sbatch cluster/slurm/deqntk-compute.sbatch` with the documented variables."""
    dataset, ntk, nngp = data
    conf = _config(tmp_path)
    env = _env(slurm, tmp_path, conf)
    store = tmp_path / "k.zarr"
    t0 = time.monotonic()
    driver = _sbatch_driver(slurm, env, tmp_path, store, dataset)
    slurm.wait_until(
        "the driver job's end", lambda: driver not in slurm.active("deqntk-driver"), 300, 0.5
    )
    wall = time.monotonic() - t0
    out = (tmp_path / f"driver-{driver}.out").read_text()
    assert slurm.jobs()[driver][1] == "COMPLETED", out
    assert re.search(r"computed 120 tiles \(0 of 120 were done before\)", out), out
    assert re.search(r"k\.zarr: OK \(120 tiles, 120 x 120, ntk, nngp, float32\)", out), out
    _check_store(store, ntk, nngp)
    runs = _executions(tmp_path)
    assert len(runs) == 120 and set(runs.values()) == {1}
    print(f"driver job: 120 tiles in {wall:.1f} s from sbatch to the end of the job")


def test_worker_job_cancelled_mid_run_is_replaced(slurm, data, tmp_path):
    dataset, ntk, nngp = data
    env = _env(slurm, tmp_path, _config(tmp_path))
    store, log = tmp_path / "k.zarr", tmp_path / "compute.log"
    proc = _compute(env, dataset, store, log, "--workers", "1")
    try:
        slurm.wait_until("20 tiles", lambda: _tiles_done(store) >= 20, 240)
        jobs = slurm.active("deqntk-worker")
        assert len(jobs) == 1 and proc.poll() is None, (jobs, log.read_text())
        (first,) = jobs
        slurm.run("scancel", first)
        out = _finish(proc, log)
    finally:
        slurm.cancel_all()
    assert proc.returncode == 0, out
    assert f"worker job {first} ended (CANCELLED" in out, out
    _check_store(store, ntk, nngp)
    runs = _executions(tmp_path)
    assert len(set(runs) | set(_executions(tmp_path, "reused"))) == 120, out
    lines = (tmp_path / "executions.txt").read_text().splitlines()
    assert len({line.split()[2] for line in lines}) == 2  # the cancelled worker, its replacement
    repeated = sum(runs.values()) - len(runs)
    reused = sum(_executions(tmp_path, "reused").values())
    print(f"preemption: {repeated} finished tiles recomputed, {reused} answered from the ledger")


def test_worker_job_retiring_at_its_lifetime_is_replaced(slurm, data, tmp_path):
    """A 1-minute walltime with --lifetime=12s: each worker retires, a new job takes over,
    and no finished tile is computed twice (executions counted by the preload)."""
    dataset, ntk, nngp = data
    conf = _config(
        tmp_path, walltime="00:01:00", extra_args=["--lifetime=12s", "--lifetime-stagger=0s"]
    )
    env = _env(slurm, tmp_path, conf)
    store, log = tmp_path / "k.zarr", tmp_path / "compute.log"
    t0 = time.monotonic()
    proc = _compute(env, dataset, store, log, "--workers", "1")
    try:
        out = _finish(proc, log, timeout=300)
    finally:
        slurm.cancel_all()
    wall = time.monotonic() - t0
    assert proc.returncode == 0, out
    retired = re.findall(r"worker job (\d+) ended \(COMPLETED\); submitting a replacement", out)
    assert retired, out
    _check_store(store, ntk, nngp)
    # no tile computed twice; a task re-executed after its worker retired (its tile written,
    # the result unread) answers from the ledger
    runs, again = _executions(tmp_path), _executions(tmp_path, "reused")
    assert set(runs.values()) == {1}, runs.most_common(3)
    assert len(set(runs) | set(again)) == 120
    lines = (tmp_path / "executions.txt").read_text().splitlines()
    pids = {line.split()[2] for line in lines}
    assert len(pids) >= 2, out
    print(
        f"walltime: {len(retired)} jobs retired, {len(pids)} workers, 0 tiles computed twice "
        f"({sum(again.values())} re-executed tasks answered from the ledger), {wall:.1f} s"
    )


def test_driver_job_cancelled_then_resubmitted(slurm, data, tmp_path):
    """scancel of the driver job mid-run; the resubmitted driver computes only the rest."""
    dataset, ntk, nngp = data
    env = _env(slurm, tmp_path, _config(tmp_path))
    store = tmp_path / "k.zarr"
    first = _sbatch_driver(slurm, env, tmp_path, store, dataset, "--workers", "1")
    try:
        slurm.wait_until("30 tiles", lambda: _tiles_done(store) >= 30, 240)
        slurm.run("scancel", first)
        # its worker job loses the scheduler and exits after death-timeout (15 s)
        slurm.wait_until("no running job", lambda: not slurm.active(), 120, 0.5)
    finally:
        slurm.cancel_all()
    before = open_kernel_store(store).ledger()
    upper = np.triu(np.ones_like(before["done"], dtype=bool))
    done_before = before["done"] & upper
    n_done, total = int(done_before.sum()), int(upper.sum())
    assert 30 <= n_done < total

    second = _sbatch_driver(slurm, env, tmp_path, store, dataset, "--workers", "1")
    slurm.wait_until(
        "the second driver's end", lambda: second not in slurm.active("deqntk-driver"), 300, 0.5
    )
    out = (tmp_path / f"driver-{second}.out").read_text()
    assert slurm.jobs()[second][1] == "COMPLETED", out
    expect = rf"computed {total - n_done} tiles \({n_done} of {total} were done before\)"
    assert re.search(expect, out), out
    after = open_kernel_store(store).ledger()
    for field in ("finished", "checksum", "seconds"):
        np.testing.assert_array_equal(after[field][done_before], before[field][done_before])
    _check_store(store, ntk, nngp)


def test_worker_job_cancelled_while_pending_is_replaced(slurm, data, tmp_path):
    dataset, ntk, nngp = data
    env = _env(slurm, tmp_path, _config(tmp_path))
    store, log = tmp_path / "k.zarr", tmp_path / "compute.log"
    cpus = slurm.run("sinfo", "-h", "-o", "%c").split()[0]
    blocker = slurm.run(
        "sbatch",
        "--parsable",
        "-J",
        "blocker",
        "-c",
        cpus,
        "-o",
        "/dev/null",
        "--wrap",
        "sleep 600",
    ).strip()
    proc = _compute(env, dataset, store, log, "--workers", "1")
    try:
        pending = slurm.wait_until(
            "a pending worker job",
            lambda: [j for j, s in slurm.active("deqntk-worker").items() if s == "PENDING"],
        )
        slurm.run("scancel", pending[0])
        slurm.wait_until(
            "the replacement notice", lambda: "before its worker joined" in log.read_text(), 60
        )
        replacement = slurm.wait_until(
            "a replacement job",
            lambda: [j for j in slurm.active("deqntk-worker") if j != pending[0]],
            60,
        )
        slurm.run("scancel", blocker)
        out = _finish(proc, log)
    finally:
        slurm.cancel_all()
    assert proc.returncode == 0, out
    assert re.search(
        rf"worker job {pending[0]} ended \(CANCELLED\) before its worker joined \(log: "
        rf"{re.escape(str(tmp_path))}/logs/deqntk-worker-{pending[0]}\.err\); submitting a "
        r"replacement",
        out,
    ), out
    assert int(replacement[0]) > int(pending[0])
    _check_store(store, ntk, nngp)


def test_worker_jobs_that_fail_to_start_stop_the_driver(slurm, data, tmp_path):
    """A job script that exits before `dask worker` (a failing prologue): two such jobs
    in a row, and the driver stops with their ids and logs instead of waiting."""
    dataset, _, _ = data
    conf = _config(tmp_path, prologue=["echo 'prologue failed' >&2", "exit 1"], max_failed=2)
    env = _env(slurm, tmp_path, conf)
    store, log = tmp_path / "k.zarr", tmp_path / "compute.log"
    t0 = time.monotonic()
    proc = _compute(env, dataset, store, log, "--workers", "1")
    try:
        out = _finish(proc, log, timeout=120)
    finally:
        slurm.cancel_all()
    assert proc.returncode == 2, out
    m = re.search(
        r"2 slurm worker jobs in a row ended before their dask worker joined the "
        r"scheduler: job (\d+) \(FAILED, log: (\S+)\); job (\d+) \(FAILED, log: (\S+)\)",
        out,
    )
    assert m, out
    for log_file in (m.group(2), m.group(4)):
        assert "prologue failed" in Path(log_file).read_text()
    assert "deqntk.max-failed-starts = 2" in out
    assert not slurm.active("deqntk-worker")
    print(f"failed starts: driver stopped after {time.monotonic() - t0:.1f} s")
