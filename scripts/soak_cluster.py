#!/usr/bin/env python
"""Soak test: repeated random worker kills during a kernel-store job on a real Dask cluster.

Starts a ``dask scheduler`` and ``--workers`` single-threaded ``dask worker`` processes on
127.0.0.1 (settings from ``cluster/*.yaml`` through ``DASK_CONFIG``), then runs the same
``deqntk compute --scheduler`` job twice on a synthetic dataset:

1. a clean run (no faults) -- the baseline wall time, measured in the same invocation;
2. a faulty run: every ``--min-gap`` .. ``--max-gap`` seconds (uniformly at random) one
   random worker's process group (nanny and worker) is SIGKILLed and a replacement worker is
   started, until ``--kills`` kills were made or the job finished.

A worker plugin appends one line per tile start and per tile completion to a log file (a
killed worker's lines stay on disk), so the report counts exactly how many tile executions
each run needed.  At the end both stores are verified (checksums, symmetry, ledger), the
faulty store is compared bitwise with the clean one and, on random disjoint row / column
samples and the diagonal, with an in-process ``kernel_matrix``.  Prints a report (and JSON
with ``--json``); exits 1 when a tile is lost or corrupt or the stores differ.

    .venv/bin/python scripts/soak_cluster.py --n 6000 --tile 150 --kills 6
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from deqntk_dist import DEQSpec, kernel_matrix, open_kernel_store, write_dataset_store
from deqntk_dist.errors import StoreError
from deqntk_dist.runtime import WORKER_ENV
from deqntk_dist.store import verify_kernel_store

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SPEC = DEQSpec(sigma_w2=1.3, sigma_u2=0.8, sigma_b2=0.2)
SPEC_ARGS = ["--sigma-w2", "1.3", "--sigma-u2", "0.8", "--sigma-b2", "0.2"]


def _task_log_plugin(path: str):
    """A worker plugin writing ``S|E key pid time`` for tile task starts / completions."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class TileTaskLog(WorkerPlugin):
        name = "deqntk-soak-tile-log"

        def __init__(self, path: str):
            self.path = path

        def transition(self, key, start, finish, **kwargs):
            if not str(key).startswith("deqntk-run_tile"):
                return
            if finish == "executing":
                tag = "S"
            elif start == "executing" and finish in ("memory", "error"):
                tag = "E"
            else:
                return
            with open(self.path, "a") as f:
                f.write(f"{tag} {key} {os.getpid()} {time.time():.6f}\n")

    return TileTaskLog(path)


class Cluster:
    """Scheduler and workers on 127.0.0.1, each in its own process group."""

    def __init__(self, root: Path):
        self.root = root
        self.scheduler_file = root / "scheduler.json"
        self.env = {**os.environ, **WORKER_ENV, "DASK_CONFIG": str(ROOT / "cluster")}
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.started = 0

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        with open(self.root / log, "ab") as out:
            return subprocess.Popen(
                [str(BIN / "dask"), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )

    def start(self, n_workers: int) -> None:
        self.scheduler = self._spawn(
            ["scheduler", "--host", "127.0.0.1", "--port", "0"]
            + ["--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(self.scheduler_file)],
            "scheduler.log",
        )
        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists():
            if time.monotonic() > deadline or self.scheduler.poll() is not None:
                raise RuntimeError(f"no scheduler; see {self.root / 'scheduler.log'}")
            time.sleep(0.1)
        for _ in range(n_workers):
            self.add_worker()
        self.client().wait_for_workers(n_workers, timeout=120)

    def client(self):
        from distributed import Client

        if not hasattr(self, "_client"):
            self._client = Client(scheduler_file=str(self.scheduler_file), timeout="30s")
        return self._client

    def add_worker(self) -> str:
        name = f"w{self.started}"
        self.started += 1
        self.workers[name] = self._spawn(
            ["worker", "--scheduler-file", str(self.scheduler_file), "--host", "127.0.0.1"]
            + ["--nthreads", "1", "--memory-limit", "1GiB", "--no-dashboard"]
            + ["--local-directory", str(self.root / f"scratch-{name}"), "--name", name],
            f"{name}.log",
        )
        return name

    @staticmethod
    def kill(proc: subprocess.Popen | None) -> None:
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def kill_worker(self, name: str) -> None:
        self.kill(self.workers.pop(name))

    def close(self) -> None:
        if hasattr(self, "_client"):
            self._client.close()
        for name in list(self.workers):
            self.kill_worker(name)
        self.kill(self.scheduler)


def _tiles_done(store: Path) -> int:
    try:
        ks = open_kernel_store(store)
    except StoreError:
        return 0
    return ks.plan.n_tiles - len(ks.missing_tiles())


def _run_job(args, cluster: Cluster, dataset: str, store: Path, log: Path, *, faults: bool):
    """One ``deqntk compute`` run; with ``faults`` kill random workers while it runs."""
    rng = random.Random(args.seed)
    cmd = [str(BIN / "deqntk"), "compute", dataset, str(store), "--scheduler"]
    cmd += [str(cluster.scheduler_file), "--tile", str(args.tile), "--no-progress", *SPEC_ARGS]
    kills: list[dict] = []
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        next_kill = t0 + rng.uniform(args.min_gap, args.max_gap)
        while proc.poll() is None:
            now = time.perf_counter()
            if now - t0 > args.max_seconds:
                raise TimeoutError(f"job still running after {args.max_seconds} s")
            if faults and len(kills) < args.kills and now >= next_kill:
                victim = rng.choice(sorted(cluster.workers))
                done = _tiles_done(store)
                if proc.poll() is not None:
                    break
                cluster.kill_worker(victim)
                replacement = cluster.add_worker()
                kills.append(
                    {
                        "at_s": round(time.perf_counter() - t0, 2),
                        "killed": victim,
                        "replacement": replacement,
                        "tiles_done": done,
                    }
                )
                next_kill = time.perf_counter() + rng.uniform(args.min_gap, args.max_gap)
            time.sleep(0.05)
    finally:
        Cluster.kill(proc)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"deqntk compute failed (exit {proc.returncode}):\n{text}")
    m = re.search(r"computed (\d+) tiles \((\d+) of (\d+) were done before\)", text)
    return {"wall_s": wall, "kills": kills, "report": m.group(0) if m else text}


def _executions(log: Path, skip: int) -> dict:
    """Tile executions in the task log after line ``skip``: started, completed, lost."""
    lines = log.read_text().splitlines()[skip:] if log.exists() else []
    starts, ends = Counter(), Counter()
    for line in lines:
        tag, key, _pid, _t = line.split()
        (starts if tag == "S" else ends)[key] += 1
    return {
        "tiles": len(starts),
        "started": sum(starts.values()),
        "completed": sum(ends.values()),
        "interrupted": sum(starts.values()) - sum(ends.values()),
        "completed_twice": sum(c - 1 for c in ends.values() if c > 1),
        "recomputed": sum(starts.values()) - len(starts),
        "lines": len(lines),
    }


def _reference_check(x32: np.ndarray, store: Path, sample: int, seed: int) -> bool:
    """Random disjoint row/column samples and diagonal entries against kernel_matrix."""
    rng = np.random.default_rng(seed)
    n = x32.shape[0]
    idx = rng.permutation(n)[: 2 * sample]
    rows, cols = np.sort(idx[:sample]), np.sort(idx[sample:])
    ref = kernel_matrix(SPEC, x32[rows], x32[cols])
    diag = kernel_matrix(SPEC, x32[rows])
    ks = open_kernel_store(store)
    ok = True
    for name in ks.kernels:
        full = ks.array(name)[...]
        ok &= np.array_equal(full[np.ix_(rows, cols)], getattr(ref, name).astype(ks.dtype))
        ok &= np.array_equal(full[np.ix_(rows, rows)], getattr(diag, name).astype(ks.dtype))
    return bool(ok)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=6000, help="examples (default 6000)")
    p.add_argument("--dim", type=int, default=64, help="features (default 64)")
    p.add_argument("--tile", type=int, default=150, help="tile side (default 150)")
    p.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    p.add_argument("--kills", type=int, default=6, help="most worker kills (default 6)")
    p.add_argument("--min-gap", type=float, default=1.5, help="seconds between kills, low")
    p.add_argument("--max-gap", type=float, default=4.0, help="seconds between kills, high")
    p.add_argument("--max-seconds", type=float, default=600, help="per-run time limit")
    p.add_argument("--sample", type=int, default=300, help="rows of the reference check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="keep everything here (default: temp)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    if not 0 < args.min_gap <= args.max_gap:
        p.error(f"need 0 < --min-gap <= --max-gap, got {args.min_gap}, {args.max_gap}")

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="deqntk-soak-")
    work = Path(args.workdir or tmp.name).absolute()
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(args.n, args.dim))
    ds = write_dataset_store(
        work / "ds.zarr",
        x,
        rng.integers(0, 10, args.n),
        n_train=args.n,
        name="soak",
        overwrite=True,
    )
    task_log = work / "tile-tasks.log"
    task_log.unlink(missing_ok=True)
    cluster = Cluster(work)
    try:
        cluster.start(args.workers)
        cluster.client().register_plugin(_task_log_plugin(str(task_log)))
        clean = _run_job(
            args, cluster, ds.path, work / "clean.zarr", work / "clean.log", faults=False
        )
        skip = len(task_log.read_text().splitlines())
        clean_exec = _executions(task_log, 0)
        faulty = _run_job(
            args, cluster, ds.path, work / "faulty.zarr", work / "faulty.log", faults=True
        )
        faulty_exec = _executions(task_log, skip)
    finally:
        cluster.close()

    clean_ks, faulty_ks = (
        open_kernel_store(work / "clean.zarr"),
        open_kernel_store(work / "faulty.zarr"),
    )
    problems = verify_kernel_store(faulty_ks.path) + verify_kernel_store(clean_ks.path)
    same = all(
        np.array_equal(clean_ks.array(k)[...], faulty_ks.array(k)[...]) for k in clean_ks.kernels
    )
    ref_ok = _reference_check(x.astype(np.float32), work / "faulty.zarr", args.sample, args.seed)
    n_tiles = faulty_ks.plan.n_tiles
    report = {
        "n": args.n,
        "tile": args.tile,
        "tiles": n_tiles,
        "workers": args.workers,
        "clean_wall_s": round(clean["wall_s"], 2),
        "faulty_wall_s": round(faulty["wall_s"], 2),
        "overhead": round(faulty["wall_s"] / clean["wall_s"] - 1, 4),
        "kills": len(faulty["kills"]),
        "kill_log": faulty["kills"],
        "clean_executions": clean_exec,
        "faulty_executions": faulty_exec,
        "tiles_recomputed": faulty_exec["recomputed"],
        "tiles_lost": len(faulty_ks.missing_tiles()),
        "verify_problems": problems,
        "bitwise_equal_to_clean_run": same,
        "reference_sample_equal": ref_ok,
        "clean_report": clean["report"],
        "faulty_report": faulty["report"],
        "workdir": str(work) if args.workdir else None,
    }
    ok = not problems and same and ref_ok and report["tiles_lost"] == 0
    ok &= faulty_exec["tiles"] == n_tiles and clean_exec["recomputed"] == 0
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(
            f"soak: n={args.n} tile={args.tile} -> {n_tiles} tiles, {args.workers} workers\n"
            f"clean run   {report['clean_wall_s']:.1f} s  ({clean_exec['started']} tile "
            f"executions)\n"
            f"faulty run  {report['faulty_wall_s']:.1f} s  with {report['kills']} worker kills "
            f"-> overhead {100 * report['overhead']:+.1f} %\n"
            f"tile executions {faulty_exec['started']} for {n_tiles} tiles: "
            f"{faulty_exec['recomputed']} recomputed ({faulty_exec['interrupted']} interrupted "
            f"mid-tile, {faulty_exec['completed_twice']} finished twice)\n"
            f"lost tiles {report['tiles_lost']}, verify problems {len(problems)}, bitwise equal "
            f"to the clean run: {same}, in-process reference sample equal: {ref_ok}\n"
            f"kills: "
            + ", ".join(
                f"{k['killed']}@{k['at_s']}s({k['tiles_done']} done)" for k in faulty["kills"]
            )
        )
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
