#!/usr/bin/env python
"""Simulated-scale estimate: measured per-tile costs x tile counts for full datasets.

Measures, on this machine and with one thread (one dask worker = one core):

* the fully-connected tile kernel on an off-diagonal ``--fc-tile`` x ``--fc-tile`` tile of
  unit-norm rows with d = 784 (Fashion-MNIST) and d = 3072 (CIFAR-10 flattened);
* the store write of one tile (both kernels, the tile and its mirror, float32 chunks and
  the ledger) into a local zarr kernel store;
* the CDEQ kernel (32 x 32 x 3 images) per image pair for the ``flatten`` and ``gap``
  readouts, and the per-image self-covariance, when ``deqntk_dist.kernels.conv`` exists;

then multiplies by the pair and tile counts of full Fashion-MNIST (70,000; FC) and CIFAR-10
(60,000; FC, CDEQ flatten, CDEQ gap) and prints core-hours, store sizes and the workers
needed for each ``--target-hours`` wall time.  Medians of ``--reps`` repetitions.

    .venv/bin/python cluster/estimate_scale.py --json estimate.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deqntk_dist import CDEQSpec, DEQSpec, kernel_matrix, write_dataset_store
from deqntk_dist.plan import TilePlan, choose_tile
from deqntk_dist.store import LEDGER_FIELDS, create_kernel_store

FC_SPEC = DEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1)
#: full datasets: (name, N, feature shape, kernels to estimate)
DATASETS = [
    ("Fashion-MNIST", 70_000, 784, ("fc",)),
    ("CIFAR-10", 60_000, 3072, ("fc", "cdeq-flatten", "cdeq-gap")),
]
#: per-tile memory budget of a 4 GiB worker (half its limit, capped at 2 GiB): the default
TILE_BUDGET = 2 * 2**30


def unit_rows(rng, n: int, shape) -> np.ndarray:
    """Rows scaled to norm sqrt(d), like the ``unit-norm`` preprocessing."""
    x = rng.normal(size=(n, *shape))
    flat = x.reshape(n, -1)
    flat *= np.sqrt(flat.shape[1]) / np.linalg.norm(flat, axis=1, keepdims=True)
    return x


def smooth_images(rng, n: int, H: int = 32, W: int = 32, C: int = 3) -> np.ndarray:
    """Random colour fields with a 1/f^2 power spectrum (natural-image-like correlations),
    scaled to norm sqrt(H W C) like the ``unit-norm`` preprocessing."""
    ky, kx = np.fft.fftfreq(H)[:, None, None], np.fft.fftfreq(W)[None, :, None]
    filt = 1.0 / (0.02 + ky**2 + kx**2)
    noise = np.fft.fft2(rng.normal(size=(n, H, W, C)), axes=(1, 2))
    x = np.fft.ifft2(noise * filt, axes=(1, 2)).real
    x -= x.mean(axis=(1, 2, 3), keepdims=True)
    flat = x.reshape(n, -1)
    flat *= np.sqrt(flat.shape[1]) / np.linalg.norm(flat, axis=1, keepdims=True)
    return x


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def one_thread():
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(1)
    return threadpool_limits(limits=1)


def fc_seconds_per_entry(d: int, tile: int, reps: int, rng) -> float:
    A, B = unit_rows(rng, tile, (d,)), unit_rows(rng, tile, (d,))
    kernel_matrix(FC_SPEC, A[:64], B[:64])  # compile / warm up
    return median_time(lambda: kernel_matrix(FC_SPEC, A, B), reps) / tile**2


def write_seconds_per_pair(tile: int, reps: int, rng, workdir: Path) -> float:
    """One off-diagonal tile and its mirror of ntk and nngp written as float32 chunks, plus
    its ledger, per computed pair (``tile**2``; the mirror's copy is included)."""
    n = 2 * tile
    ds = write_dataset_store(
        workdir / "ds.zarr", rng.normal(size=(n, 4)), np.zeros(n, int), n_train=n, name="w"
    )
    ks = create_kernel_store(
        workdir / "ks.zarr", ds, FC_SPEC, tile=tile, dtype="float32", kernels=("ntk", "nngp")
    )
    vals = {k: rng.normal(size=(tile, tile)) for k in ks.kernels}

    def write():
        ks.write_tile(0, 1, vals, max_residual=0.0, iterations=1, seconds=1.0)

    return median_time(write, reps) / tile**2


def cdeq_costs(readout: str, pairs: int, reps: int, rng) -> dict:
    """Seconds per image pair (off-diagonal tile) and per image (self-covariance)."""
    from deqntk_dist.kernels import self_covariance

    spec = CDEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1, filter_size=3, readout=readout)
    X, Y = smooth_images(rng, pairs), smooth_images(rng, pairs)
    t0 = time.perf_counter()
    sx, sy = self_covariance(spec, X), self_covariance(spec, Y)
    self_s = (time.perf_counter() - t0) / (2 * pairs)  # includes the first compile
    t_self = median_time(lambda: self_covariance(spec, X), reps) / pairs
    kernel_matrix(spec, X[:1], Y[:1], self_x=sx[:1], self_y=sy[:1])  # warm up
    res = {}

    def run():
        res["r"] = kernel_matrix(spec, X, Y, self_x=sx, self_y=sy)

    t = median_time(run, reps) / pairs**2
    return {
        "seconds_per_pair": t,
        "self_seconds_per_image": min(t_self, self_s),
        "pairs_measured": pairs**2,
        "iterations": int(res["r"].iterations),
        "max_residual": float(res["r"].max_residual),
    }


def cdeq_tile(n: int, per_pair: float, max_seconds: float) -> int:
    """Largest tile side (a multiple of 16, within the memory budget) whose off-diagonal
    tile takes at most ``max_seconds``: long tiles waste work when a worker retires."""
    side = int(math.sqrt(max_seconds / per_pair))
    side = max(16, side - side % 16)
    return min(side, choose_tile(n, TILE_BUDGET))


def estimate(n: int, per_pair: float, write_per_pair: float, tile: int, targets, kernels=2):
    plan = TilePlan(n=n, tile=tile)
    pairs = n * (n + 1) // 2
    compute_s = pairs * (per_pair + write_per_pair)
    core_hours = compute_s / 3600
    store_gb = kernels * n * n * 4 / 1e9
    tile_s = compute_s / plan.n_tiles
    out = {
        "n": n,
        "tile": tile,
        "tiles": plan.n_tiles,
        "pairs": pairs,
        "core_hours": core_hours,
        "seconds_per_tile": tile_s,
        "store_gb_float32_ntk_nngp": store_gb,
        # one file per chunk: ntk + nngp (nb^2 each) and the ledger (nb^2 per field)
        "store_files": plan.n_blocks**2 * (kernels + len(LEDGER_FIELDS)),
        "workers_for_target": {},
    }
    for h in targets:
        # whole tiles per worker: the last round of tiles bounds the wall time
        workers = math.ceil(core_hours / h)
        workers = min(workers, plan.n_tiles)
        rounds = math.ceil(plan.n_tiles / workers)
        out["workers_for_target"][f"{h:g}h"] = {
            "workers": workers,
            "wall_hours": rounds * tile_s / 3600,
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fc-tile", type=int, default=2048, help="measured FC tile side")
    p.add_argument("--cdeq-pairs", type=int, default=16, help="images per side (flatten)")
    p.add_argument("--gap-pairs", type=int, default=2, help="images per side (gap)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--target-hours", default="4,24", help="comma list of wall-time targets")
    p.add_argument(
        "--max-tile-minutes",
        type=float,
        default=15,
        help="CDEQ tiles are sized to take at most this long (default 15)",
    )
    p.add_argument("--skip-gap", action="store_true", help="do not measure the gap readout")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    targets = [float(v) for v in args.target_hours.split(",")]
    rng = np.random.default_rng(0)
    limits = one_thread()
    measured: dict = {}
    with tempfile.TemporaryDirectory(prefix="deqntk-scale-") as tmp:
        measured["write_seconds_per_pair"] = write_seconds_per_pair(
            1024, args.reps, rng, Path(tmp)
        )
    for d in (784, 3072):
        measured[f"fc_d{d}_seconds_per_entry"] = fc_seconds_per_entry(
            d, args.fc_tile, args.reps, rng
        )
    try:
        import deqntk_dist.kernels.conv  # noqa: F401

        have_conv = True
    except ImportError:
        have_conv = False
    if have_conv:
        measured["cdeq-flatten"] = cdeq_costs("flatten", args.cdeq_pairs, args.reps, rng)
        if not args.skip_gap:
            measured["cdeq-gap"] = cdeq_costs("gap", args.gap_pairs, 1, rng)
    limits.restore_original_limits()

    fc_tile = choose_tile(70_000, TILE_BUDGET)
    results = []
    for name, n, d, kinds in DATASETS:
        for kind in kinds:
            if kind == "fc":
                per_pair = measured[f"fc_d{d}_seconds_per_entry"]
                tile = fc_tile
                extra = 0.0
            elif kind in measured:
                per_pair = measured[kind]["seconds_per_pair"]
                tile = cdeq_tile(n, per_pair, 60 * args.max_tile_minutes)
                extra = n * measured[kind]["self_seconds_per_image"] / 3600
            else:
                results.append({"dataset": name, "kernel": kind, "pending": True})
                continue
            est = estimate(n, per_pair, measured["write_seconds_per_pair"], tile, targets)
            est["core_hours"] += extra
            results.append({"dataset": name, "kernel": kind, "seconds_per_pair": per_pair, **est})

    print(f"measured (one thread): {json.dumps(measured, indent=1)}")
    print(
        f"\n{'dataset':<14}{'kernel':<14}{'s/pair':>10}{'tile':>6}{'tiles':>8}{'s/tile':>10}"
        f"{'core-h':>11}{'store GB':>10}{'files':>10}  workers for target wall time"
    )
    for r in results:
        if r.get("pending"):
            print(f"{r['dataset']:<14}{r['kernel']:<14}  pending (no CDEQ kernel yet)")
            continue
        w = ", ".join(
            f"{k}: {v['workers']} ({v['wall_hours']:.1f} h)"
            for k, v in r["workers_for_target"].items()
        )
        print(
            f"{r['dataset']:<14}{r['kernel']:<14}{r['seconds_per_pair']:>10.3g}{r['tile']:>6}"
            f"{r['tiles']:>8}"
            f"{r['seconds_per_tile']:>10.3g}{r['core_hours']:>11.4g}"
            f"{r['store_gb_float32_ntk_nngp']:>10.1f}{r['store_files']:>10.3g}  {w}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"measured": measured, "estimates": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
