"""Benchmark of the regression stage: time, peak memory and residual per method and size.

For every size a real kernel store (DEQ-NTK of synthetic clustered data, float32, computed
tile by tile with ``kernel_matrix`` and written through the store API) is built under
``--dir`` and deleted afterwards (unless ``--keep``).  Every solve runs in its own
subprocess, so the peak RSS is that solve's own, and a crash (e.g. a BLAS segfault,
DESIGN §5) is reported instead of killing the benchmark.  Routes:

``baseline``  dense float64 ``scipy.linalg.solve(assume_a="pos")`` on one BLAS thread
              (the whole train block in memory); only up to ``--baseline-max``.
``float64``   ``method="cholesky"`` with room for the dense float64 block: blocked float64
              Cholesky + float64 refinement.
``mixed``     ``method="cholesky"`` with a memory limit below the dense float64 block:
              float32 factor as the preconditioner of float64 CG.
``cg``        ``method="cg"``: Nyström-preconditioned CG.

Usage::

    python scripts/bench_solve.py --sizes 10000,30000 --routes baseline,float64,mixed,cg
    python scripts/bench_solve.py --sizes 60000 --routes mixed

Issue-15 modes, on existing stores (e.g. the quick start's and full Fashion-MNIST's):

``--compare S1,S2 --before DIR``  the ``auto`` route of this code and of the code checked
    out in ``DIR`` (e.g. ``git worktree add DIR <commit>``), alternately, each solve in its
    own process (``--repeats``, ``--ridges``): time, peak RSS, residual, accuracy, stages.
``--distributed S1,S2``  the distributed CG on a LocalCluster (``--workers``): to convergence,
    or ``--dist-iterations K`` CG iterations (time per iteration, bytes read per iteration,
    band load time, peak worker memory).
``--scale 200000,1000000``  a simulated table from the measured per-band product rate:
    bytes per iteration, workers and memory needed, time per iteration.

Prints one line per solve and a JSON summary (``--out`` to save it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROUTES = ("baseline", "float64", "mixed", "cg", "auto", "distributed")
SPEC_KW = {"sigma_w2": 1.0, "sigma_u2": 1.0, "sigma_b2": 0.1}


def build_store(path: Path, n_train: int, n_test: int, *, tile: int, d: int, seed: int) -> dict:
    """Dataset + kernel store of ``n_train + n_test`` synthetic rows (10 Gaussian classes)."""
    from deqntk_dist import DEQSpec, kernel_matrix, write_dataset_store
    from deqntk_dist.store import create_kernel_store

    rng = np.random.default_rng(seed)
    n = n_train + n_test
    centres = 0.25 * rng.normal(size=(10, d))
    y = rng.integers(0, 10, n)
    x = centres[y] + rng.normal(size=(n, d))
    spec = DEQSpec(**SPEC_KW)
    t0 = time.perf_counter()
    ds = write_dataset_store(path / "dataset.zarr", x, y, n_train=n_train, name="synthetic")
    ks = create_kernel_store(path / "kernel.zarr", ds, spec, tile=tile, kernels=("ntk",))
    X = ds.rows(0, n).astype(np.float64)
    for i, j in ks.plan.tiles():
        r0, r1 = ks.plan.bounds(i)
        c0, c1 = ks.plan.bounds(j)
        res = kernel_matrix(spec, X[r0:r1]) if i == j else kernel_matrix(spec, X[r0:r1], X[c0:c1])
        ks.write_tile(
            i,
            j,
            {"ntk": res.ntk},
            max_residual=res.max_residual,
            iterations=res.iterations,
            seconds=0.0,
        )
    return {"seconds": time.perf_counter() - t0, "bytes": 4 * n * n}


def run_worker(args) -> dict:
    """One solve in this process (``--worker``); returns the measured figures."""
    from deqntk_dist import open_kernel_store
    from deqntk_dist.regression import one_hot_targets, solve_store

    ks = open_kernel_store(args.store)
    n = ks.n_train
    t0 = time.perf_counter()
    out: dict = {"route": args.worker, "n_train": n}
    if args.worker == "baseline":
        import scipy.linalg
        from threadpoolctl import threadpool_limits

        K = np.asarray(ks.train_train("ntk"), dtype=np.float64)
        y = ks.labels()
        Y = one_hot_targets(y[:n], int(y.max()) + 1)
        shift = args.ridge * np.trace(K) / n
        K[np.diag_indices(n)] += shift
        with threadpool_limits(1, user_api="blas"):  # threaded dpotrf segfaults (DESIGN §5)
            alpha = scipy.linalg.solve(K, Y, assume_a="pos", check_finite=False)
        seconds = time.perf_counter() - t0
        r = Y - K @ alpha
        out.update(
            method="dense-scipy-float64",
            seconds=seconds,
            residual=float((np.linalg.norm(r, axis=0) / np.linalg.norm(Y, axis=0)).max()),
        )
        pred = ks.test_train("ntk").astype(np.float64) @ alpha
        out["accuracy"] = float(np.mean(pred.argmax(1) == y[n:]))
    elif args.worker == "auto":
        ridges = [float(r) for r in args.ridges.split(",")] if args.ridges else None
        rep = solve_store(args.store, ridges=ridges, write_results=False)
        out.update(
            method=rep.method, seconds=rep.seconds, residual=rep.residual,
            iterations=rep.iterations, accuracy=rep.accuracy, ridge=rep.ridge,
            stages=rep.stages, code=__import__("deqntk_dist").__file__,
        )  # fmt: skip
    elif args.worker == "distributed":
        out.update(run_distributed(args))
    else:
        method = "cg" if args.worker == "cg" else "cholesky"
        limit = {
            "float64": args.memory_limit,
            "mixed": min(args.memory_limit, 8 * n * n - 1),
            "cg": args.memory_limit,
        }[args.worker]
        rep = solve_store(
            args.store,
            ridges=[args.ridge],
            method=method,
            memory_limit=limit,
            rank=args.rank,
            write_results=False,
            max_iter=args.max_iter,
        )
        out.update(
            method=rep.method,
            seconds=rep.seconds,
            residual=rep.residual,
            iterations=rep.iterations,
            accuracy=rep.accuracy,
            detail=rep.detail,
            stages=rep.stages,
        )
    out["peak_rss"] = _peak_rss()
    return out


def _peak_rss() -> int:
    """Peak RSS of this process in bytes (run on each worker)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_distributed(args) -> dict:
    """The distributed CG on a LocalCluster of ``--workers`` single-threaded workers."""
    import psutil
    from distributed import Client, LocalCluster

    from deqntk_dist import open_kernel_store
    from deqntk_dist.regression import one_hot_targets, solve_store
    from deqntk_dist.regression.distributed import BandedKernel, DistributedNystrom
    from deqntk_dist.regression.linalg import pcg

    ks = open_kernel_store(args.store)
    n = ks.n_train
    mem = psutil.virtual_memory().total * 0.85 / args.workers
    cluster = LocalCluster(
        n_workers=args.workers, threads_per_worker=1, memory_limit=int(mem),
        dashboard_address=None, host="127.0.0.1",
    )  # fmt: skip
    client = Client(cluster)
    out: dict = {"workers": args.workers, "worker_memory_limit": int(mem)}
    try:
        if args.dist_iterations == 0:
            rep = solve_store(
                args.store, ridges=[args.ridge], method="cg", client=client, rank=args.rank,
                max_iter=args.max_iter, write_results=False, band_bytes=args.band_bytes,
            )  # fmt: skip
            out.update(
                method=rep.method, seconds=rep.seconds, residual=rep.residual,
                iterations=rep.iterations, accuracy=rep.accuracy, stages=rep.stages,
                detail=rep.detail,
            )  # fmt: skip
        else:
            t0 = time.perf_counter()
            chunk = ks.geometry.chunk if ks.geometry is not None else ks.tile
            K = BandedKernel(
                client, ks.path, "ntk", np.arange(n), band_bytes=args.band_bytes, align=chunk
            )
            diag = K.diagonal()
            t_load = time.perf_counter() - t0
            t0 = time.perf_counter()
            nys = DistributedNystrom(K, args.rank, seed=0)
            t_nys = time.perf_counter() - t0
            y = ks.labels()[:n]
            Y = one_hot_targets(y, int(y.max()) + 1)
            s = args.ridge * diag.sum() / n
            t0 = time.perf_counter()
            _, info = pcg(
                None, Y, s, precondition=lambda R: nys.apply(R, s), tol=1e-10,
                max_iter=args.dist_iterations, matmul=lambda P, sh: K.matmul(P, sh),
            )  # fmt: skip
            t_cg = time.perf_counter() - t0
            out.update(
                method="cg-distributed (fixed iterations)", seconds=t_load + t_nys + t_cg,
                residual=info.residual, iterations=info.iterations, accuracy=None,
                stages={"load": t_load, "nystrom": t_nys, "cg": t_cg},
                detail={
                    "bands": len(K.bands), "band_rows": K.bands[0][1] - K.bands[0][0],
                    "bands_kept_in_memory": K.keep, "train_block_bytes": K.total_bytes,
                    "seconds_per_iteration": t_cg / max(1, info.iterations),
                    "product_seconds_median": float(np.median(K.stats.product_seconds)),
                    "bytes_read_per_iteration": 0 if K.keep else K.total_bytes,
                    "nystrom_rank": nys.rank, "residual_history": info.history,
                },
            )  # fmt: skip
        peaks = client.run(_peak_rss)
        out["peak_worker_rss"] = max(peaks.values())
    finally:
        client.close()
        cluster.close()
    return out


def run_one(store: Path, route: str, args, *, code: str | None = None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        route,
        "--store",
        str(store),
        "--ridge",
        str(args.ridge),
        "--memory-limit",
        str(args.memory_limit),
        "--rank",
        str(args.rank),
        "--max-iter",
        str(args.max_iter),
        "--workers",
        str(args.workers),
        "--dist-iterations",
        str(args.dist_iterations),
        "--band-bytes",
        str(args.band_bytes),
    ]
    if args.ridges:
        cmd += ["--ridges", args.ridges]
    env = dict(os.environ)
    if code:  # the previous version of the package first on the path
        env["PYTHONPATH"] = code
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {
            "route": route,
            "failed": True,
            "returncode": proc.returncode,
            "wall": wall,
            "stderr": proc.stderr[-2000:],
        }
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall"] = wall
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,30000", help="comma list of n_train")
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--routes", default="baseline,float64,mixed,cg")
    p.add_argument("--ridge", type=float, default=1e-3, help="relative ridge lam")
    p.add_argument("--memory-limit", type=float, default=20e9, help="bytes (default 20e9)")
    p.add_argument("--rank", type=int, default=512)
    p.add_argument("--max-iter", type=int, default=500)
    p.add_argument("--tile", type=int, default=2048)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--baseline-max", type=int, default=20000)
    p.add_argument("--dir", default="/tmp/deqntk-bench-solve")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default=None, help="write the JSON summary here")
    p.add_argument("--compare", default=None, help="comma list of kernel stores (auto route)")
    p.add_argument("--before", default=None, help="checkout of the previous version")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--ridges", default=None, help="ridge grid of --compare (default: all)")
    p.add_argument("--distributed", default=None, help="comma list of kernel stores")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dist-iterations", type=int, default=0, help="0: to convergence")
    p.add_argument("--band-bytes", type=int, default=256 * 2**20)
    p.add_argument("--scale", default=None, help="comma list of n for the simulated table")
    p.add_argument("--worker", choices=ROUTES, help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args), default=str))
        return 0
    if args.compare or args.distributed or args.scale:
        return issue15(args)
    routes = [r for r in args.routes.split(",") if r]
    if any(r not in ROUTES for r in routes):
        p.error(f"--routes must be a comma list of {', '.join(ROUTES)}")
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        path = Path(args.dir) / f"n{n}"
        if not (path / "kernel.zarr").exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            info = build_store(path, n, args.n_test, tile=args.tile, d=args.dim, seed=n)
            print(
                f"n_train={n}: built {info['bytes'] / 1e9:.1f} GB store in "
                f"{info['seconds']:.0f} s",
                flush=True,
            )
        base = None
        for route in routes:
            if route == "baseline" and n > args.baseline_max:
                continue
            res = run_one(path / "kernel.zarr", route, args)
            res["n_train"] = n
            results.append(res)
            if res.get("failed"):
                print(
                    f"n_train={n} {route:8s} FAILED rc={res['returncode']} after "
                    f"{res['wall']:.0f} s: {res['stderr'][-300:]}",
                    flush=True,
                )
                continue
            if route == "baseline":
                base = res["seconds"]
            ratio = f"  {res['seconds'] / base:5.2f}x baseline" if base else ""
            print(
                f"n_train={n} {route:8s} {res['method']:20s} {res['seconds']:8.1f} s  "
                f"peak RSS {res['peak_rss'] / 1e9:6.2f} GB  residual {res['residual']:.2e}  "
                f"iters {res.get('iterations', '-')}  accuracy {res['accuracy']:.4f}{ratio}",
                flush=True,
            )
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    summary = {
        "ridge": args.ridge,
        "memory_limit": args.memory_limit,
        "cpus": os.cpu_count(),
        "results": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, default=str))
    return 0


def _line(tag: str, res: dict) -> str:
    if res.get("failed"):
        return f"{tag}: FAILED rc={res['returncode']}: {res['stderr'][-300:]}"
    acc = res.get("accuracy")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in (res.get("stages") or {}).items())
    return (
        f"{tag}: {res['method']} {res['seconds']:.1f} s (wall {res['wall']:.1f} s; {stages}) "
        f"peak RSS {res['peak_rss'] / 1e9:.2f} GB, residual {res['residual']:.2e}, "
        f"{res.get('iterations')} CG iterations"
        + (f", accuracy {acc:.4f}" if acc is not None else "")
    )


def issue15(args) -> int:
    """--compare / --distributed / --scale (see the module docstring)."""
    import statistics

    summary: dict = {"cpus": os.cpu_count(), "compare": [], "distributed": [], "scale": []}
    for store in (args.compare or "").split(",") if args.compare else []:
        runs = {"before": [], "after": []}
        for _ in range(args.repeats):
            for which in ("before", "after"):
                code = args.before if which == "before" else None
                res = run_one(Path(store), "auto", args, code=code)
                runs[which].append(res)
                print(_line(f"{store} {which}", res), flush=True)
        med = {
            k: statistics.median(r["seconds"] for r in v if not r.get("failed"))
            for k, v in runs.items()
            if any(not r.get("failed") for r in v)
        }
        if len(med) == 2:
            print(
                f"{store}: median before {med['before']:.1f} s, after {med['after']:.1f} s, "
                f"speed-up {med['before'] / med['after']:.2f}x",
                flush=True,
            )
        summary["compare"].append({"store": store, "runs": runs, "median_seconds": med})
    rate = None
    for store in (args.distributed or "").split(",") if args.distributed else []:
        res = run_one(Path(store), "distributed", args)
        print(_line(f"{store} distributed", res), flush=True)
        if not res.get("failed"):
            d = res["detail"]
            print(
                f"  {d['bands']} bands of {d['band_rows']} rows, kept in memory "
                f"{d['bands_kept_in_memory']}, {d['seconds_per_iteration']:.2f} s per iteration, "
                f"product {d['product_seconds_median']:.2f} s, "
                f"{d['bytes_read_per_iteration'] / 1e9:.2f} GB read per iteration, peak worker "
                f"RSS {res['peak_worker_rss'] / 1e9:.2f} GB",
                flush=True,
            )
            # seconds per byte of band, per worker, of one product wave (bands held in
            # memory preferred: the scale table assumes they fit)
            if d["bands_kept_in_memory"] or rate is None:
                rate = d["product_seconds_median"] / (d["train_block_bytes"] / args.workers)
        summary["distributed"].append({"store": store, **res})
    if args.scale:
        if rate is None:
            rate = float(os.environ.get("DEQNTK_BAND_RATE", "2.5e-10"))
        worker_gb = 16
        print(
            f"simulated (measured {rate:.3g} s per band byte per worker, {worker_gb} GB "
            "workers holding half their memory in bands, float32, 10 classes):"
        )
        for n in (int(v) for v in args.scale.split(",")):
            block = 4 * n * n
            workers = int(np.ceil(block / (worker_gb * 2**30 / 2)))
            per_it = rate * block / workers
            row = {
                "n": n, "train_block_bytes": block, "workers": workers,
                "bytes_per_iteration_in_memory": block, "driver_bytes": 40 * n * 10 * 8,
                "seconds_per_iteration": per_it,
            }  # fmt: skip
            summary["scale"].append(row)
            print(
                f"  n={n:>9,}: train block {block / 1e9:8.1f} GB, {workers:5d} workers of "
                f"{worker_gb} GB, {per_it:6.2f} s per iteration (product wave), driver "
                f"{row['driver_bytes'] / 1e9:.2f} GB",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
