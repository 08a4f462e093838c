#!/usr/bin/env python
"""Benchmark: a full tiled kernel store on Dask vs the bare tile kernel, in the same run.

Builds a synthetic dataset of Fashion-MNIST shape (70,000 x 784, pixel-like values in
[0, 1]) or a subset (``--n``), writes its dataset store, measures the bare tile kernel
(``kernel_matrix`` on one off-diagonal tile of the same size, with all threads and with one
thread), then computes the whole kernel store on a LocalCluster and prints wall time,
entries/s, peak memory per worker, bytes written and the throughput ratios.  The stores are
written under ``--dir`` (default: a fresh directory in /tmp) and deleted unless ``--keep``.

Throughput is counted in *distinct* Gram entries, ``N (N + 1) / 2`` for the store (the
mirror halves are copies) and ``tile^2`` for an off-diagonal bare tile.

With ``--layouts 1,2`` the store is computed in each layout in turn (``--rounds`` times,
alternating, on the same cluster), and for each the script prints the wall time, the files
written per tile and what a consumer pays to read a ``--band``-row band of the whole store
with ``dask.array.from_zarr`` (bytes the process read, from /proc/self/io, and seconds,
page cache dropped first when this runs as root).

Example::

    python scripts/bench_tiles.py --n 20000 --kernels ntk --dtype float32
    python scripts/bench_tiles.py                      # the full 70k x 70k NTK store
    python scripts/bench_tiles.py --layouts 1,2 --rounds 2   # layout 1 vs 2, same run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_fashion(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-like rows: sparse non-negative values in [0, 1], 10 classes."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), dtype=np.float32)
    step = 5000
    for i in range(0, n, step):
        block = rng.random((min(step, n - i), d), dtype=np.float32)
        block[block < 0.5] = 0.0
        x[i : i + step] = block
    return x, rng.integers(0, 10, n)


def bare_tile(
    spec, X: np.ndarray, tile: int, threads: int | None, reps: int, cpu=None, out=None
) -> list[float]:
    """Seconds of ``kernel_matrix`` on one off-diagonal tile x tile block, per repetition.

    One untimed full-size call first (compilation, and first touch of the memory).
    ``cpu``, a list, receives the process CPU seconds of each repetition.  ``out``: the
    kernels and dtype to compute into reused arrays (what a store tile does), e.g.
    ``(("ntk",), "float32")``; default: the plain call (float64 ntk and nngp, new arrays).
    """
    import numba
    from threadpoolctl import threadpool_limits

    from deqntk_dist import kernel_matrix

    A = X[:tile].astype(np.float64)
    B = X[tile : 2 * tile].astype(np.float64) if len(X) >= 2 * tile else X[-tile:][::-1].copy()
    times = []
    kw = {}
    if out is not None:
        kw["out"] = {k: np.empty((len(A), len(B)), dtype=out[1]) for k in out[0]}
    prev = numba.get_num_threads()
    try:
        if threads is not None:
            numba.set_num_threads(threads)
        with threadpool_limits(limits=threads, user_api="blas") if threads else _null():
            kernel_matrix(spec, A, B, **kw)
            for _ in range(reps):
                t0, c0 = time.perf_counter(), time.process_time()
                kernel_matrix(spec, A, B, **kw)
                times.append(time.perf_counter() - t0)
                if cpu is not None:
                    cpu.append(time.process_time() - c0)
    finally:
        numba.set_num_threads(prev)
    return times


def _bare_on_worker(spec, dataset: str, tile: int, reps: int) -> list[float]:
    """Seconds of the bare kernel on one off-diagonal tile, on a worker (1 thread)."""
    import numba
    from threadpoolctl import threadpool_limits

    from deqntk_dist import kernel_matrix
    from deqntk_dist.store.dataset import open_dataset_store

    ds = open_dataset_store(dataset)
    A = ds.rows(0, tile).astype(np.float64)
    B = ds.rows(ds.n - tile, ds.n).astype(np.float64)
    numba.set_num_threads(1)
    times = []
    with threadpool_limits(limits=1, user_api="blas"):
        for _ in range(reps):
            t0 = time.perf_counter()
            kernel_matrix(spec, A, B)
            times.append(time.perf_counter() - t0)
    return times


def bare_on_workers(client, spec, dataset: str, tile: int, reps: int) -> float:
    """Summed bare-kernel entries/s of all workers, running at the same time."""
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    futs = [
        client.submit(_bare_on_worker, spec, dataset, tile, reps, workers=[w], pure=False)
        for w in workers
    ]
    return sum(tile * tile / statistics.median(f.result()) for f in futs)


def _warm_worker(spec) -> None:
    from deqntk_dist import kernel_matrix
    from deqntk_dist.store import cast_and_mirror

    rng = np.random.default_rng(0)
    kernel_matrix(spec, rng.random((40, 8)), rng.random((30, 8)))
    kernel_matrix(spec, rng.random((40, 8)))
    cast_and_mirror(rng.random((4, 3)), np.float32)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _read_bytes() -> int:
    """Bytes this process has read through read(2) and friends (``rchar``)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def band_read(path: Path, name: str, rows: int, start: int) -> dict:
    """A consumer reading rows [start, start + rows) of every column with dask (threads
    of this process), as plain zarr sees the store."""
    import dask
    import dask.array as da
    import zarr

    arr = zarr.open_array(str(path / name), mode="r")
    dropped = _drop_caches()
    b0, t0 = _read_bytes(), time.perf_counter()
    with dask.config.set(scheduler="threads"):
        band = da.from_zarr(arr)[start : start + rows, :].compute()
    secs = time.perf_counter() - t0
    got = _read_bytes() - b0
    assert np.isfinite(band).all()
    return {
        "band_rows": rows,
        "band_bytes_needed": int(band.nbytes),
        "band_bytes_read": got,
        "band_read_amplification": got / band.nbytes,
        "band_seconds": secs,
        "page_cache_dropped": dropped,
        "chunks": list(arr.chunks),
    }


def file_count(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=70000, help="rows (default 70000)")
    p.add_argument("--d", type=int, default=784, help="features (default 784)")
    p.add_argument("--kernels", default="ntk", help="ntk | nngp | ntk,nngp (default ntk)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--tile", type=int, default=None, help="tile side (default: memory budget)")
    p.add_argument("--workers", type=int, default=None, help="workers (default: cores)")
    p.add_argument(
        "--bare-reps", type=int, default=5, help="bare-kernel repetitions before and after"
    )
    p.add_argument("--dir", default=None, help="where to write the stores (default /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--layouts", default="2", help="store layouts to compute in turn, e.g. 1,2 (default 2)"
    )
    p.add_argument("--rounds", type=int, default=1, help="rounds of all layouts (default 1)")
    p.add_argument("--band", type=int, default=512, help="rows of the consumer band read")
    args = p.parse_args(argv)
    layouts = [int(v) for v in args.layouts.split(",")]

    import numba
    import psutil

    from deqntk_dist import DEQSpec, write_dataset_store
    from deqntk_dist.compute import compute_kernel_store
    from deqntk_dist.plan import choose_tile, tile_cap
    from deqntk_dist.runtime import RuntimeConfig, _default_workers, dask_client

    spec = DEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1)
    kernels = tuple(k.strip() for k in args.kernels.split(","))
    workers = args.workers or _default_workers()
    base = Path(args.dir or tempfile.mkdtemp(prefix="deqntk-bench-", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    out: dict = {
        "n": args.n,
        "d": args.d,
        "what": list(kernels),
        "dtype": args.dtype,
        "workers": workers,
        "cpu_count": os.cpu_count(),
        "load_before": os.getloadavg(),
    }
    try:
        t0 = time.perf_counter()
        x, y = synthetic_fashion(args.n, args.d, seed=0)
        ds = write_dataset_store(
            base / "dataset", x, y, n_train=min(60000, args.n), name="synth", overwrite=True
        )
        out["dataset_seconds"] = time.perf_counter() - t0

        mem_limit = psutil.virtual_memory().total // workers
        # the same default as `deqntk compute`: memory budget, and enough tiles per worker
        cap = tile_cap(args.n, workers=workers)
        tile = args.tile or choose_tile(args.n, min(2 * 2**30, mem_limit // 2), max_side=cap)
        out["tile"] = tile
        bt = min(tile, args.n)
        t_before = bare_tile(spec, x, bt, None, args.bare_reps)
        t_full = statistics.median(t_before)
        cpu_one: list = []
        t_one = statistics.median(bare_tile(spec, x, bt, 1, args.bare_reps, cpu=cpu_one))
        out["bare_1thread_cpu_seconds_per_entry"] = statistics.median(cpu_one) / (bt * bt)
        out["bare_tile"] = bt
        out["bare_threads"] = numba.get_num_threads()
        out["bare_entries_per_s_before"] = bt * bt / t_full
        out["bare_1thread_entries_per_s"] = bt * bt / t_one
        print(
            f"bare kernel, {bt} x {bt} tile: {out['bare_entries_per_s_before']:.4g} entries/s "
            f"with "
            f"{out['bare_threads']} threads, {out['bare_1thread_entries_per_s']:.4g} with 1",
            file=sys.stderr,
        )

        t0 = time.perf_counter()
        with dask_client(RuntimeConfig(workers=workers)) as client:
            t1 = time.perf_counter()
            # imports and numba cache loading, once per worker process
            client.run(_warm_worker, spec)
            t2 = time.perf_counter()
            # baseline on the same workers, all at once, just before and after the store
            # (the machine is shared): the bare tile kernel with no store around it
            bt_w = min(tile, args.n // 2)
            workers_bare_before = bare_on_workers(client, spec, ds.path, bt_w, args.bare_reps)
            runs = []
            for r in range(args.rounds):
                for layout in layouts:
                    kdir = base / f"kernel-v{layout}"
                    shutil.rmtree(kdir, ignore_errors=True)
                    t3 = time.perf_counter()
                    rep = compute_kernel_store(
                        ds,
                        kdir,
                        spec,
                        kernels=kernels,
                        tile=tile,
                        dtype=args.dtype,
                        client=client,
                        layout=layout,
                    )
                    t4 = time.perf_counter()
                    n_tiles = rep.tiles_total
                    run = {
                        "layout": layout,
                        "round": r,
                        "compute_call_seconds": t4 - t3,
                        "tile_phase_seconds": rep.seconds,
                        "files": file_count(kdir),
                        "files_per_tile": file_count(kdir) / n_tiles,
                        **band_read(kdir, kernels[0], args.band, args.n // 2 - args.band // 2),
                    }
                    runs.append(run)
                    print(f"layout {layout} round {r}: {json.dumps(run)}", file=sys.stderr)
                    if not args.keep and (r < args.rounds - 1 or layout != layouts[-1]):
                        shutil.rmtree(kdir, ignore_errors=True)
            out["layout_runs"] = runs
            for layout in layouts:
                mine = [x for x in runs if x["layout"] == layout]
                out[f"layout{layout}_compute_seconds_median"] = statistics.median(
                    x["compute_call_seconds"] for x in mine
                )
            if len(layouts) > 1:
                out["layout_time_ratio"] = (
                    out[f"layout{layouts[-1]}_compute_seconds_median"]
                    / out[f"layout{layouts[0]}_compute_seconds_median"]
                )
            workers_bare_after = bare_on_workers(client, spec, ds.path, bt_w, args.bare_reps)
        # end to end = cluster start + warm-up + the compute call + cluster shutdown
        # (with several layout runs: the last one, as if it had run alone)
        wall = (t1 - t0) + (t2 - t1) + (t4 - t3)
        out["cluster_start_seconds"] = t1 - t0
        out["worker_warmup_seconds"] = t2 - t1
        out["compute_call_seconds"] = t4 - t3
        out["workers_bare_tile"] = bt_w
        out["workers_bare_entries_per_s"] = [workers_bare_before, workers_bare_after]
        distinct = args.n * (args.n + 1) / 2
        out.update(
            wall_seconds=wall,
            tile_phase_seconds=rep.seconds,
            tiles=rep.tiles_total,
            store_entries_per_s=args.n * args.n / wall,
            distinct_entries_per_s=distinct / wall,
            distinct_entries_per_s_tile_phase=distinct / rep.seconds,
            bytes_written=rep.bytes_written,
            bytes_on_disk=du(base / f"kernel-v{layouts[-1]}"),
            peak_rss_per_worker=sorted(rep.peak_rss.values()),
            worker_compute_seconds=rep.compute_seconds,
            worker_read_seconds=rep.read_seconds,
            worker_write_seconds=rep.write_seconds,
            worker_compute_cpu_seconds=rep.compute_cpu_seconds,
            worker_write_cpu_seconds=rep.write_cpu_seconds,
            max_residual=rep.max_residual,
        )
        # load-independent: CPU seconds per distinct entry, bare kernel / all worker phases
        worker_cpu = rep.compute_cpu_seconds + rep.write_cpu_seconds
        out["cpu_efficiency"] = out["bare_1thread_cpu_seconds_per_entry"] * distinct / worker_cpu
        out["write_cpu_fraction"] = rep.write_cpu_seconds / worker_cpu
        out["ratio_vs_bare_1thread_x_workers"] = out["distinct_entries_per_s"] / (
            workers * out["bare_1thread_entries_per_s"]
        )
        out["load_after"] = os.getloadavg()
        # the machine is shared: the bare kernel is timed before and after the run, and the
        # reference is the median of all those repetitions
        t_after = bare_tile(spec, x, bt, None, args.bare_reps)
        out["bare_entries_per_s_after"] = bt * bt / statistics.median(t_after)
        out["bare_entries_per_s"] = bt * bt / statistics.median(t_before + t_after)
        # the stricter reference: the kernel computing just what the store keeps, in the
        # store dtype, into reused arrays (no fresh memory), as the workers' tiles do
        t_out = bare_tile(spec, x, bt, None, args.bare_reps, out=(kernels, args.dtype))
        out["bare_out_entries_per_s"] = bt * bt / statistics.median(t_out)
        out["ratio_vs_bare_out"] = out["distinct_entries_per_s"] / out["bare_out_entries_per_s"]
        out["ratio_vs_bare"] = out["distinct_entries_per_s"] / out["bare_entries_per_s"]
        out["ratio_vs_bare_tile_phase"] = (
            out["distinct_entries_per_s_tile_phase"] / out["bare_entries_per_s"]
        )
        out["ratio_vs_bare_on_workers"] = out["distinct_entries_per_s_tile_phase"] / (
            sum(out["workers_bare_entries_per_s"]) / 2
        )
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(out, indent=1))
    print(
        f"\nN={args.n} {'+'.join(kernels)} {args.dtype} tile={out['tile']} "
        f"({out['tiles']} tiles, {workers} workers): wall {out['wall_seconds']:.1f} s "
        f"(cluster start {out['cluster_start_seconds']:.1f} s, worker warm-up "
        f"{out['worker_warmup_seconds']:.1f} s, tile phase {out['tile_phase_seconds']:.1f} s), "
        f"{out['distinct_entries_per_s']:.4g} distinct entries/s, "
        f"{out['store_entries_per_s']:.4g} store entries/s, "
        f"{out['bytes_written'] / 1e9:.3g} GB written, peak RSS per worker "
        f"{max(out['peak_rss_per_worker']) / 2**30:.2f} GiB\n"
        f"bare kernel ({out['bare_threads']} threads, median of {2 * args.bare_reps} runs "
        f"before and after): {out['bare_entries_per_s']:.4g} entries/s\n"
        f"ratio to the bare kernel: {out['ratio_vs_bare']:.3f} end to end, "
        f"{out['ratio_vs_bare_tile_phase']:.3f} tile phase; ratio to {workers} x "
        f"single-thread bare kernel: {out['ratio_vs_bare_1thread_x_workers']:.3f}\n"
        f"bare kernel into reused {args.dtype} {'+'.join(kernels)} arrays: "
        f"{out['bare_out_entries_per_s']:.4g} entries/s; end-to-end ratio to it: "
        f"{out['ratio_vs_bare_out']:.3f}\n"
        f"ratio of the tile phase to the bare kernel run on the same {workers} workers at "
        f"once (mean of before/after): {out['ratio_vs_bare_on_workers']:.3f}\n"
        f"CPU efficiency (bare single-thread CPU s/entry over workers' CPU s/entry): "
        f"{out['cpu_efficiency']:.3f}; write phase {100 * out['write_cpu_fraction']:.1f}% "
        f"of worker CPU"
    )
    for layout in layouts:
        mine = [x for x in out["layout_runs"] if x["layout"] == layout]
        times = ", ".join(f"{x['compute_call_seconds']:.1f}" for x in mine)
        print(
            f"layout {layout}: compute {times}"
            f" s (median {out[f'layout{layout}_compute_seconds_median']:.1f} s), "
            f"{mine[-1]['files']} files ({mine[-1]['files_per_tile']:.2f} per tile), "
            f"chunks {tuple(mine[-1]['chunks'])}; {args.band}-row band: "
            f"{mine[-1]['band_bytes_read'] / 1e6:.1f} MB read for "
            f"{mine[-1]['band_bytes_needed'] / 1e6:.1f} MB "
            f"({mine[-1]['band_read_amplification']:.2f}x) in {mine[-1]['band_seconds']:.2f} s"
        )
    if "layout_time_ratio" in out:
        print(
            f"layout {layouts[-1]} / layout {layouts[0]} compute time (medians): "
            f"{out['layout_time_ratio']:.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
