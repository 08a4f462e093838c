"""Fault tolerance on a real multi-process Dask cluster started with the ``dask`` CLI.

A scheduler and three single-threaded ``dask worker`` processes run on 127.0.0.1 (free
ports through ``--port 0`` and a scheduler file); ``deqntk compute --scheduler`` runs as a
separate process.  Workers and the scheduler are killed with SIGKILL (whole process groups:
nanny and worker) while the store's ledger shows the job half done.  The finished stores are
compared bitwise with an in-process ``kernel_matrix`` of the whole data, and the ledger shows
which tiles were computed by which run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deqntk_dist import DEQSpec, kernel_matrix, open_kernel_store, write_dataset_store
from deqntk_dist.errors import StoreError
from deqntk_dist.runtime import WORKER_ENV
from deqntk_dist.store import verify_kernel_store

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SPEC = DEQSpec(sigma_w2=1.3, sigma_u2=0.8, sigma_b2=0.2)
N, D, TILE = 2000, 32, 100  # 20 x 20 tile grid: 210 tiles of ~40 ms each
SPEC_ARGS = ["--sigma-w2", "1.3", "--sigma-u2", "0.8", "--sigma-b2", "0.2"]


class StaticCluster:
    """``dask scheduler`` + ``dask worker`` processes on 127.0.0.1, each in its own session."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.scheduler_file = root / "scheduler.json"
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, **WORKER_ENV}

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        with open(self.root / log, "ab") as out:
            return subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )

    def start_scheduler(self) -> None:
        self.scheduler_file.unlink(missing_ok=True)
        self.scheduler = self._spawn(
            [
                str(BIN / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                "127.0.0.1:0",
                "--scheduler-file",
                str(self.scheduler_file),
            ],
            "scheduler.log",
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                address = json.loads(self.scheduler_file.read_text())["address"]
                assert address.startswith("tcp://127.0.0.1:")
                return
            except (OSError, ValueError, KeyError):
                assert self.scheduler.poll() is None, "dask scheduler exited at start"
                time.sleep(0.1)
        raise TimeoutError("dask scheduler did not write its scheduler file")

    def start_worker(self, name: str) -> None:
        self.workers[name] = self._spawn(
            [
                str(BIN / "dask"),
                "worker",
                "--scheduler-file",
                str(self.scheduler_file),
                "--host",
                "127.0.0.1",
                "--nthreads",
                "1",
                "--memory-limit",
                "1GiB",
                "--local-directory",
                str(self.root / f"scratch-{name}"),
                "--no-dashboard",
                "--death-timeout",
                "30",
                "--name",
                name,
            ],
            f"{name}.log",
        )

    def wait_for_workers(self, n: int) -> None:
        from distributed import Client

        with Client(scheduler_file=str(self.scheduler_file), timeout="30s") as client:
            client.wait_for_workers(n, timeout=120)

    def start(self, n_workers: int) -> None:
        self.start_scheduler()
        for k in range(n_workers):
            self.start_worker(f"w{k}")
        self.wait_for_workers(n_workers)

    @staticmethod
    def kill(proc: subprocess.Popen | None) -> None:
        """SIGKILL a process group (nanny + worker, or the scheduler) and reap it."""
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def kill_worker(self, name: str) -> None:
        self.kill(self.workers.pop(name))

    def kill_all(self) -> None:
        self.kill(self.scheduler)
        self.scheduler = None
        for name in list(self.workers):
            self.kill_worker(name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A dataset store and the untiled in-process reference, cast to the store dtype."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D))
    y = rng.integers(0, 10, N)
    root = tmp_path_factory.mktemp("cluster-data")
    ds = write_dataset_store(root / "ds.zarr", x, y, n_train=N - 400, name="synthetic")
    ref = kernel_matrix(SPEC, x.astype(np.float32))
    return ds.path, ref.ntk.astype(np.float32), ref.nngp.astype(np.float32)


@pytest.fixture
def cluster(tmp_path):
    c = StaticCluster(tmp_path / "cluster")
    try:
        yield c
    finally:
        c.kill_all()


def _compute(dataset: str, store: Path, cluster: StaticCluster, log: Path) -> subprocess.Popen:
    args = [str(BIN / "deqntk"), "compute", dataset, str(store)]
    args += ["--scheduler", str(cluster.scheduler_file), "--tile", str(TILE), "--no-progress"]
    with open(log, "wb") as out:
        return subprocess.Popen(
            args + SPEC_ARGS, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _tiles_done(store: Path) -> int:
    """Tiles marked done in the ledger (0 before the store exists)."""
    try:
        ks = open_kernel_store(store)
    except StoreError:
        return 0
    return ks.plan.n_tiles - len(ks.missing_tiles())


def _wait_until_done(store: Path, proc: subprocess.Popen, at_least: int) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = _tiles_done(store)
        if done >= at_least or proc.poll() is not None:
            return done
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {at_least} tiles done after 120 s")


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 180) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return log.read_text()


def _check_store(store: Path, ntk: np.ndarray, nngp: np.ndarray) -> None:
    assert verify_kernel_store(store) == []
    ks = open_kernel_store(store)
    np.testing.assert_array_equal(ks.array("ntk")[...], ntk)
    np.testing.assert_array_equal(ks.array("nngp")[...], nngp)


def test_worker_killed_mid_run_and_replaced(data, cluster, tmp_path):
    dataset, ntk, nngp = data
    cluster.start(3)
    store, log = tmp_path / "kernel.zarr", tmp_path / "compute.log"
    proc = _compute(dataset, store, cluster, log)
    try:
        done_at_kill = _wait_until_done(store, proc, at_least=30)
        assert proc.poll() is None, "the job finished before the worker could be killed"
        cluster.kill_worker("w1")
        cluster.start_worker("w3")
        out = _finish(proc, log)
    finally:
        cluster.kill(proc)
    assert proc.returncode == 0, out
    total = open_kernel_store(store).plan.n_tiles
    assert 30 <= done_at_kill < total
    assert re.search(rf"computed {total} tiles \(0 of {total} were done before\)", out), out
    assert re.search(r"deqntk: 3 workers / 3 threads; dashboard: http://127\.0\.0\.1:\d+", out)
    _check_store(store, ntk, nngp)


def test_scheduler_killed_mid_run_then_everything_restarted(data, cluster, tmp_path):
    dataset, ntk, nngp = data
    cluster.start(3)
    store = tmp_path / "kernel.zarr"
    log1, log2 = tmp_path / "compute1.log", tmp_path / "compute2.log"
    proc = _compute(dataset, store, cluster, log1)
    try:
        _wait_until_done(store, proc, at_least=60)
        assert proc.poll() is None, "the job finished before the scheduler could be killed"
        cluster.kill_all()  # the scheduler first, then every worker (a lost allocation)
        out1 = _finish(proc, log1, timeout=60)
    finally:
        cluster.kill(proc)
    assert proc.returncode != 0, out1
    assert "finished tiles are kept in the store" in out1 or "scheduler" in out1, out1

    # nothing runs now: this is the state the rerun starts from
    before = open_kernel_store(store).ledger()
    upper = np.triu(np.ones_like(before["done"], dtype=bool))
    done_before = before["done"] & upper
    n_done, total = int(done_before.sum()), int(upper.sum())
    assert 60 <= n_done < total

    cluster.start(3)
    proc = _compute(dataset, store, cluster, log2)
    try:
        out2 = _finish(proc, log2)
    finally:
        cluster.kill(proc)
    assert proc.returncode == 0, out2
    computed = total - n_done
    expect = rf"computed {computed} tiles \({n_done} of {total} were done before\)"
    assert re.search(expect, out2), out2

    after = open_kernel_store(store).ledger()
    assert after["done"][upper].all()
    # tiles finished before the crash were not touched again; all the others were computed
    for field in ("finished", "checksum", "seconds"):
        np.testing.assert_array_equal(after[field][done_before], before[field][done_before])
    todo = upper & ~done_before
    assert (after["finished"][todo] > np.nanmax(before["finished"][done_before])).all()
    _check_store(store, ntk, nngp)


def test_static_cluster_scripts(data, tmp_path):
    """cluster/static/*.sh start a scheduler and workers that ``deqntk compute`` uses."""
    dataset, ntk, nngp = data
    static = ROOT / "cluster" / "static"
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["DEQNTK_WORKER_HOST"] = "127.0.0.1"

    def sh(*args: str, timeout: float = 120) -> str:
        res = subprocess.run(
            ["bash", *args], env=env, capture_output=True, text=True, timeout=timeout
        )
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    try:
        out = sh(
            str(static / "start-scheduler.sh"),
            "--port",
            "0",
            "--dashboard",
            "127.0.0.1:0",
            "--run-dir",
            str(run_dir),
        )
        assert "scheduler tcp://127.0.0.1:" in out
        sh(
            str(static / "start-workers.sh"),
            "--nworkers",
            "2",
            "--memory-limit",
            "1GiB",
            "--scratch",
            str(tmp_path / "scratch"),
            "--run-dir",
            str(run_dir),
        )
        store = tmp_path / "kernel.zarr"
        args = ["compute", dataset, str(store), "--scheduler", str(run_dir / "scheduler.json")]
        out = subprocess.run(
            [str(BIN / "deqntk"), *args, "--no-progress", *SPEC_ARGS],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        # the driver waited for the workers instead of sizing the job for an empty cluster
        assert re.search(r"deqntk: [12] workers / [12] threads", out.stderr), out.stderr
        _check_store(store, ntk, nngp)
    finally:
        stopped = sh(str(static / "stop.sh"), "--run-dir", str(run_dir))
    assert "stopped scheduler" in stopped and "stopped worker" in stopped


def _tree_listeners(pid_files) -> set[tuple[str, int]]:
    """(ip, port) of the listening inet sockets of the processes in ``pid_files`` and their
    descendants (nannies and worker processes)."""
    import psutil

    found = set()
    for f in pid_files:
        root = psutil.Process(int(Path(f).read_text()))
        for proc in [root, *root.children(recursive=True)]:
            try:
                conns = proc.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def test_static_scripts_listen_on_loopback_by_default(tmp_path):
    """start-scheduler.sh's default dashboard and start-workers.sh's worker HTTP servers listen
    on 127.0.0.1 (the kernel's socket table); DEQNTK_DASHBOARD_ADDRESS moves the dashboard."""
    static = ROOT / "cluster" / "static"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["DEQNTK_WORKER_HOST"] = "127.0.0.1"
    env.pop("DEQNTK_DASHBOARD_ADDRESS", None)
    env.pop("DEQNTK_WORKER_DASHBOARD_ADDRESS", None)

    def sh(*args: str, extra: dict | None = None) -> str:
        res = subprocess.run(
            ["bash", *args],
            env={**env, **(extra or {})},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    run_dir, moved_dir = tmp_path / "run", tmp_path / "moved"
    try:
        out = sh(str(static / "start-scheduler.sh"), "--port", "0", "--run-dir", str(run_dir))
        sh(
            str(static / "start-workers.sh"),
            *("--nworkers", "1", "--memory-limit", "1GiB", "--run-dir", str(run_dir)),
            *("--scratch", str(tmp_path / "scratch")),
        )
        from distributed import Client

        with Client(scheduler_file=str(run_dir / "scheduler.json"), timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
            port = client.scheduler_info()["services"]["dashboard"]
        found = _tree_listeners(sorted(run_dir.glob("*.pid")))
        assert {ip for ip, _ in found} == {"127.0.0.1"}, found
        # scheduler comm + dashboard, nanny comm, worker comm + worker HTTP server
        assert ("127.0.0.1", port) in found and len(found) >= 5, found
        assert f"dashboard http://127.0.0.1:{port}/status" in out, out
        out = sh(
            str(static / "start-scheduler.sh"),
            *("--port", "0", "--run-dir", str(moved_dir)),
            extra={"DEQNTK_DASHBOARD_ADDRESS": "127.0.0.2:0"},
        )
        port = int(re.search(r"dashboard http://127\.0\.0\.2:(\d+)/status", out).group(1))
        assert ("127.0.0.2", port) in _tree_listeners([moved_dir / "scheduler.pid"])
    finally:
        for d in (run_dir, moved_dir):
            if (d / "scheduler.pid").exists():
                sh(str(static / "stop.sh"), "--run-dir", str(d))


JOBQUEUE_PROBE = """
import json, dask
from deqntk_dist.runtime import jobqueue_cluster
out = {"adapt": dask.config.get("deqntk.adapt"),
       "timeout": dask.config.get("deqntk.worker-timeout"),
       "allowed_failures": dask.config.get("distributed.scheduler.allowed-failures")}
for kind in ("slurm", "pbs"):
    cluster = jobqueue_cluster(
        kind, scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
    )
    try:
        out[kind] = cluster.job_script()
        adapt = {k.replace("-", "_"): v for k, v in out["adapt"].items()}
        cluster.adapt(**{**adapt, "minimum_jobs": 0})  # accepted; nothing is submitted
    finally:
        cluster.close()
print(json.dumps(out))
"""


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_jobqueue_config_renders_job_script(kind, tmp_path):
    """cluster/jobqueue.yaml through DASK_CONFIG: the worker job a batch run would submit."""
    pytest.importorskip("dask_jobqueue")
    env = {**os.environ, "DASK_CONFIG": str(ROOT / "cluster")}
    res = subprocess.run(
        [sys.executable, "-c", JOBQUEUE_PROBE],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["adapt"]["maximum-jobs"] >= out["adapt"]["minimum-jobs"] >= 1
    assert out["timeout"] >= 600 and out["allowed_failures"] >= 3
    script = out[kind]
    directive = {"slurm": "#SBATCH", "pbs": "#PBS"}[kind]
    walltime = {"slurm": "#SBATCH -t 04:00:00", "pbs": "walltime=04:00:00"}[kind]
    assert script.startswith("#!/usr/bin/env bash") and directive in script and walltime in script
    # the config's prologue is kept and deqntk's one-thread limits are appended
    assert "/.venv/bin/activate" in script
    for key, value in WORKER_ENV.items():
        assert f"export {key}={value}" in script
    worker = next(line for line in script.splitlines() if "distributed.cli.dask_worker" in line)
    for arg in ("--nthreads 1", "--nworkers 16", "--memory-limit 4.00GiB", "--nanny"):
        assert arg in worker
    assert "--local-directory $TMPDIR" in worker
    # workers retire (lifetime + stagger) at least 10 minutes before the walltime kills them
    from dask.utils import parse_timedelta

    lifetime = parse_timedelta(re.search(r"--lifetime=(\S+)", worker).group(1))
    stagger = parse_timedelta(re.search(r"--lifetime-stagger=(\S+)", worker).group(1))
    h, m, sec = map(int, re.search(r"(\d+):(\d\d):(\d\d)", walltime_line(script)).groups())
    assert lifetime + stagger <= 3600 * h + 60 * m + sec - 600


def walltime_line(script: str) -> str:
    return next(line for line in script.splitlines() if re.search(r"-t |walltime=", line))


@pytest.mark.parametrize(
    "script",
    [
        "static/start-scheduler.sh",
        "static/start-workers.sh",
        "static/stop.sh",
        "slurm/deqntk-compute.sbatch",
        "slurm/deqntk-static.sbatch",
        "pbs/deqntk-compute.pbs",
    ],
)
def test_cluster_scripts_parse(script):
    res = subprocess.run(["bash", "-n", str(ROOT / "cluster" / script)], capture_output=True)
    assert res.returncode == 0, res.stderr
