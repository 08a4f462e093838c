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


def _run_job(args, cluster, dataset: str, store: Path, log: Path, *, faults: bool, seed: int):
    """One ``deqntk compute`` run; with ``faults`` kill random workers while it runs."""
    rng = random.Random(seed)
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
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--kills", type=int, default=6, help="most worker kills (default 6)")
    p.add_argument("--min-gap", type=float, default=1.5, help="seconds between kills, low")
    p.add_argument("--max-gap", type=float, default=4.0, help="seconds between kills, high")
    p.add_argument("--max-seconds", type=float, default=600, help="per-run time limit")
    p.add_argument("--sample", type=int, default=300, help="rows of the reference check")
    p.add_argument("--repeats", type=int, default=1, help="clean + faulty pairs (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="keep everything here (default: temp)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
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
    runs = []
    try:
        cluster.start(args.workers)
        cluster.client().register_plugin(_task_log_plugin(str(task_log)))
        for r in range(args.repeats):
            out = {}
            for kind in ("clean", "faulty"):
                skip = len(task_log.read_text().splitlines()) if task_log.exists() else 0
                name = f"{kind}-{r}"
                job = _run_job(
                    args,
                    cluster,
                    ds.path,
                    work / f"{name}.zarr",
                    work / f"{name}.log",
                    faults=kind == "faulty",
                    seed=args.seed + r,
                )
                job["executions"] = _executions(task_log, skip)
                job["store"] = work / f"{name}.zarr"
                out[kind] = job
            runs.append(out)
    finally:
        cluster.close()

    x32 = x.astype(np.float32)
    n_tiles = open_kernel_store(runs[0]["clean"]["store"]).plan.n_tiles
    problems, lost, same, ref_ok, ok = [], 0, True, True, True
    for k, run in enumerate(runs):
        clean_ks = open_kernel_store(run["clean"]["store"])
        faulty_ks = open_kernel_store(run["faulty"]["store"])
        problems += verify_kernel_store(faulty_ks.path) + verify_kernel_store(clean_ks.path)
        lost += len(faulty_ks.missing_tiles())
        same &= all(
            np.array_equal(clean_ks.array(name)[...], faulty_ks.array(name)[...])
            for name in clean_ks.kernels
        )
        ref_ok &= _reference_check(x32, run["faulty"]["store"], args.sample, args.seed + k)
        ok &= run["faulty"]["executions"]["tiles"] == n_tiles
        ok &= run["clean"]["executions"]["recomputed"] == 0
    clean_walls = [run["clean"]["wall_s"] for run in runs]
    faulty_walls = [run["faulty"]["wall_s"] for run in runs]
    fx = [run["faulty"]["executions"] for run in runs]
    report = {
        "n": args.n,
        "tile": args.tile,
        "tiles": n_tiles,
        "workers": args.workers,
        "repeats": args.repeats,
        "clean_wall_s": [round(w, 2) for w in clean_walls],
        "faulty_wall_s": [round(w, 2) for w in faulty_walls],
        "overhead_per_repeat": [round(f / c - 1, 4) for c, f in zip(clean_walls, faulty_walls)],
        "overhead_of_medians": round(
            float(np.median(faulty_walls) / np.median(clean_walls) - 1), 4
        ),
        "kills": [len(run["faulty"]["kills"]) for run in runs],
        "kill_log": [run["faulty"]["kills"] for run in runs],
        "clean_executions": [run["clean"]["executions"] for run in runs],
        "faulty_executions": fx,
        "tiles_recomputed": [e["recomputed"] for e in fx],
        "tiles_lost": lost,
        "verify_problems": problems,
        "bitwise_equal_to_clean_run": same,
        "reference_sample_equal": ref_ok,
        "faulty_report": [run["faulty"]["report"] for run in runs],
        "workdir": str(work) if args.workdir else None,
    }
    ok &= not problems and same and ref_ok and lost == 0
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(
            f"soak: n={args.n} tile={args.tile} -> {n_tiles} tiles, {args.workers} workers, "
            f"{args.repeats} repeat(s) of clean + faulty run"
        )
        for k, run in enumerate(runs):
            e, c, f = fx[k], clean_walls[k], faulty_walls[k]
            kills = run["faulty"]["kills"]
            print(
                f"[{k}] clean {c:.1f} s, faulty {f:.1f} s with {len(kills)} worker kills "
                f"-> overhead {100 * (f / c - 1):+.1f} %; {e['started']} tile executions: "
                f"{e['recomputed']} recomputed ({e['interrupted']} interrupted mid-tile, "
                f"{e['completed_twice']} finished twice); kills at "
                + ", ".join(f"{q['at_s']}s ({q['tiles_done']} done)" for q in kills)
            )
        print(
            f"median clean {np.median(clean_walls):.1f} s, median faulty "
            f"{np.median(faulty_walls):.1f} s -> overhead "
            f"{100 * report['overhead_of_medians']:+.1f} %; lost tiles {lost}, "
            f"verify problems {len(problems)}, bitwise equal to the "
            f"clean runs: {same}, in-process reference samples equal: {ref_ok}"
        )
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
