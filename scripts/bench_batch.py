#!/usr/bin/env python
"""Overhead of the SLURM batch path against a LocalCluster, and the cost of preemption and
walltime retirement, on one machine (needs a running SLURM: cluster/slurm/local-slurm.sh).

Every run computes the same store (synthetic 12x12 images, CDEQ gap, tile 8) with ONE
single-threaded worker, so the routes are comparable:

* ``local``: ``deqntk compute --workers 1`` (LocalCluster);
* ``batch``: ``deqntk compute --cluster slurm --workers 1`` (a one-core worker job);
* ``preempt``: as batch, the worker job ``scancel``-ed when half the tiles are done;
* ``walltime``: as batch, workers retire after ``--lifetime`` (default 15 s).

Per run it prints the time from the driver's start to its first worker (the
``N workers / N threads`` line), tiles/s over the tile phase, the wall time, and for the
faulty runs, from a worker preload, the finished tiles computed a second time and the
re-executed tasks answered from the ledger (their tile was already written).
Routes alternate round by round; medians and ratios to ``local`` / ``batch`` at the end.

Usage (root, after ``cluster/slurm/local-slurm.sh start``)::

    SLURM_CONF=/tmp/deqntk-slurm/slurm.conf .venv/bin/python scripts/bench_batch.py --rounds 2
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from deqntk_dist import open_kernel_store, write_dataset_store

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARGS = ["--model", "cdeq", "--readout", "gap", "--tile", "8", "--no-progress", "--workers", "1"]

PRELOAD = """
import os
from distributed.diagnostics.plugin import WorkerPlugin
PATH = os.environ["DEQNTK_BENCH_EXECUTIONS"]
class Count(WorkerPlugin):
    def setup(self, worker):
        self.worker = worker
    def transition(self, key, start, finish, **kw):
        if finish == "memory" and str(key).startswith("deqntk-run_tile"):
            how = "reused" if self.worker.data.get(key, {}).get("reused") else "computed"
            with open(PATH, "a") as fh:
                fh.write(f"{key} {how}\\n")
async def dask_setup(worker):
    await worker.plugin_add(Count(), name="count")
"""


def config(root: Path, lifetime: str | None) -> Path:
    conf = root / ("conf-" + (lifetime or "plain"))
    conf.mkdir(parents=True, exist_ok=True)
    extra = [f"--preload={root / 'count.py'}"]
    if lifetime:
        extra += [f"--lifetime={lifetime}", "--lifetime-stagger=0s"]
    (conf / "jobqueue.yaml").write_text(
        textwrap.dedent(f"""\
        jobqueue:
          slurm:
            name: deqntk-worker
            cores: 1
            processes: 1
            memory: 2GiB
            walltime: '00:30:00'
            interface: lo
            death-timeout: 15
            local-directory: {root / "scratch"}
            log-directory: {root / "logs"}
            worker-extra-args: {extra!r}
            job-script-prologue: ['source "{BIN / "activate"}"']
            scheduler-options:
              dashboard_address: "127.0.0.1:0"
        """)
    )
    (conf / "deqntk.yaml").write_text("deqntk:\n  job-check-interval: 2s\n  worker-timeout: 300\n")
    shutil.copy(ROOT / "cluster" / "distributed.yaml", conf / "distributed.yaml")
    return conf


def done(store: Path) -> int:
    try:
        ks = open_kernel_store(store)
    except Exception:
        return 0
    return ks.plan.n_tiles - len(ks.missing_tiles())


def run(route: str, ds: Path, root: Path, k: int, lifetime: str) -> dict:
    store = root / f"{route}-{k}.zarr"
    execs = root / f"{route}-{k}.executions"
    env = {**os.environ, "DEQNTK_BENCH_EXECUTIONS": str(execs)}
    args = [str(BIN / "deqntk"), "compute", str(ds), str(store), *ARGS]
    if route != "local":
        env["DASK_CONFIG"] = str(config(root, lifetime if route == "walltime" else None))
        args += ["--cluster", "slurm"]
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root
    )

    def reader():
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line.rstrip()))

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    cancelled = None
    if route == "preempt":
        total = None
        while proc.poll() is None:
            if total is None and store.exists():
                try:
                    total = open_kernel_store(store).plan.n_tiles
                except Exception:
                    pass
            if total and done(store) >= total // 2:
                out = subprocess.run(
                    ["squeue", "-h", "-n", "deqntk-worker", "-t", "R", "-o", "%i"],
                    capture_output=True,
                    text=True,
                ).stdout.split()
                if out:
                    subprocess.run(["scancel", out[0]])
                    cancelled = out[0]
                    break
            time.sleep(0.1)
    proc.wait()
    th.join()
    wall = time.monotonic() - t0
    text = "\n".join(line for _, line in lines)
    if proc.returncode != 0:
        raise SystemExit(f"{route} run failed:\n{text}")
    first = next(t for t, line in lines if re.search(r"\d+ workers / \d+ threads", line))
    m = re.search(r"computed (\d+) tiles \(0 of \d+ were done before\) in ([\d.]+) s", text)
    tiles, secs = int(m.group(1)), float(m.group(2))
    records = [ln.split() for ln in execs.read_text().splitlines()] if execs.exists() else None
    computed = Counter(k for k, how in records if how == "computed") if records else None
    return {
        "route": route,
        "first_worker_s": first,
        "tiles_per_s": tiles / secs,
        "wall_s": wall,
        "tiles": tiles,
        # finished tiles computed a second time (visible: both executions returned), and
        # re-executed tasks whose tile was already written (answered from the ledger)
        "recomputed": None if computed is None else sum(c - 1 for c in computed.values()),
        "reused": None if records is None else sum(how == "reused" for _, how in records),
        "replaced": len(re.findall(r"submitting a replacement", text)),
        "cancelled": cancelled,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=160, help="images (tiles = b (b + 1) / 2, b = n/8)")
    ap.add_argument("--lifetime", default="15s")
    ap.add_argument("--routes", nargs="+", default=["local", "batch", "preempt", "walltime"])
    args = ap.parse_args()
    if "SLURM_CONF" not in os.environ:
        raise SystemExit("start cluster/slurm/local-slurm.sh and export SLURM_CONF first")
    root = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    (root / "count.py").write_text(PRELOAD)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.n, 12, 12, 1))
    ds = write_dataset_store(
        root / "ds.zarr", x, rng.integers(0, 10, args.n), n_train=args.n, name="synthetic"
    ).path
    rows = []
    for k in range(args.rounds):
        for route in args.routes:
            r = run(route, ds, root, k, args.lifetime)
            rows.append(r)
            print(
                f"round {k} {route:8s} first worker {r['first_worker_s']:6.1f} s  "
                f"{r['tiles_per_s']:6.2f} tiles/s  wall {r['wall_s']:6.1f} s  "
                f"recomputed {r['recomputed']}  from ledger {r['reused']}  "
                f"replaced {r['replaced']}",
                flush=True,
            )
    med = {}
    for route in args.routes:
        rs = [r for r in rows if r["route"] == route]
        med[route] = {
            key: statistics.median(r[key] for r in rs)
            for key in ("first_worker_s", "tiles_per_s", "wall_s")
        }
        med[route]["recomputed"] = [r["recomputed"] for r in rs]
        med[route]["reused"] = [r["reused"] for r in rs]
    print(f"\nmedians over {args.rounds} rounds, {rows[0]['tiles']} tiles, one worker:")
    print("route     first worker  tiles/s  wall    x tiles/s  x wall   recomputed  from ledger")
    for route, m in med.items():
        first = med[args.routes[0]]
        base = med.get("local", first) if route == "batch" else med.get("batch", first)
        if route == args.routes[0]:
            base = m
        print(
            f"{route:9s} {m['first_worker_s']:8.1f} s  {m['tiles_per_s']:7.2f}  "
            f"{m['wall_s']:6.1f} s  {m['tiles_per_s'] / base['tiles_per_s']:8.2f}  "
            f"{m['wall_s'] / base['wall_s']:6.2f}   {m['recomputed']}  {m['reused']}"
        )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
