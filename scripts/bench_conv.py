"""Benchmark of the CDEQ-NTK tile kernel: image pairs per second, iterations, plain baseline.

For 28x28x1 (Fashion-MNIST-like: zero background, strokes) and 32x32x3 (CIFAR-like: smooth
colour fields) synthetic images, and each readout, it times ``conv_kernel`` on a tile with the
default solver (Newton-Krylov Sigma*, CG Theta*) and the plain forward iteration of the layer
recursion to the same tolerance, in the same run, and prints medians over repeats, the ratio,
the iterations, the peak memory, and an extrapolation to full Fashion-MNIST / CIFAR-10 Grams.

Usage::

    python scripts/bench_conv.py                # default sizes (a few minutes on 2 cores)
    python scripts/bench_conv.py --quick        # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numba
import numpy as np

from deqntk_dist import CDEQSpec
from deqntk_dist.kernels import conv

DATASETS = {"fashion-mnist": (70_000, (28, 28, 1)), "cifar-10": (60_000, (32, 32, 3))}


def mnist_like(rng, n, H=28, W=28):
    """Zero background with 2-4 blurred strokes, values in [0, 1] (like (Fashion-)MNIST)."""
    out = np.zeros((n, H, W, 1))
    yy, xx = np.mgrid[0:H, 0:W]
    for k in range(n):
        img = np.zeros((H, W))
        for _ in range(rng.integers(2, 5)):
            p0, p1 = rng.uniform(5, H - 5, 2), rng.uniform(5, H - 5, 2)
            for t in np.linspace(0.0, 1.0, 30):
                c = p0 + t * (p1 - p0)
                img += np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / 2.0)
        out[k, :, :, 0] = np.clip(img / img.max() * 1.3, 0.0, 1.0)
    return out


def cifar_like(rng, n, H=32, W=32, C=3):
    """1/f^2 random colour fields, standardised per image (like CIFAR-10 after centring)."""
    ky = np.fft.fftfreq(H)[:, None]
    kx = np.fft.fftfreq(W)[None, :]
    filt = (1.0 / (0.02 + ky**2 + kx**2))[:, :, None]
    out = np.empty((n, H, W, C))
    for k in range(n):
        F = np.fft.fft2(rng.standard_normal((H, W, C)), axes=(0, 1)) * filt
        img = np.real(np.fft.ifft2(F, axes=(0, 1)))
        img += 2.0 * img.std() * rng.standard_normal(C)
        out[k] = (img - img.mean()) / img.std()
    return out


def run_tiles(spec, X, Y, VX, VY, solver, tol):
    """All pairs of X x Y through the tile kernel.

    Returns (wall seconds, process CPU seconds, per-task stats).  The CPU time makes the
    figure meaningful on a shared machine: pairs per CPU-second is the per-core rate.
    """
    n, H, W, C = X.shape
    m = Y.shape[0]
    pi, pj = np.divmod(np.arange(n * m), m)
    d1s, d2s = conv.offsets(spec, H, W)
    act, quad, nodes, weights = conv._activation(spec, None)
    out = np.empty((n * m * d1s.shape[0], 5))
    method = conv._SOLVERS.index(solver)
    t0 = time.perf_counter()
    c0 = time.process_time()
    conv.offset_tasks(
        act,
        quad,
        nodes,
        weights,
        spec.sigma_w2,
        spec.sigma_u2,
        spec.sigma_b2,
        H,
        W,
        spec.filter_size // 2,
        X.reshape(n, H * W, C),
        Y.reshape(m, H * W, C),
        VX.reshape(n, -1),
        VY.reshape(m, -1),
        pi.astype(np.int64),
        pj.astype(np.int64),
        d1s,
        d2s,
        tol,
        conv.DEFAULT_MAX_ITER * 10,
        conv.DEFAULT_HISTORY,
        method,
        out,
    )
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if not np.isfinite(out[:, 2]).all():
        raise RuntimeError(f"{solver}: some slices did not converge")
    return seconds, cpu, out


def bench_case(name, X, readout, n_pairs, repeats, tol):
    spec = CDEQSpec(sigma_w2=1.5, sigma_u2=0.8, sigma_b2=0.1, readout=readout)
    t0 = time.perf_counter()
    V = conv.conv_self_covariance(spec, X)
    self_rate = len(X) / (time.perf_counter() - t0)
    side = max(1, int(round(np.sqrt(n_pairs))))
    rows = {}
    for solver in ("newton", "plain"):
        # the plain baseline gets fewer pairs: it is slower, and its rate is per pair anyway
        s = side if solver == "newton" else max(1, side // 2)
        A, B = X[:s], X[len(X) - s :]
        VA, VB = V[:s], V[len(X) - s :]
        run_tiles(spec, A[:1], B[:1], VA[:1], VB[:1], solver, tol)  # compile / warm
        rates, cpu_rates, stats = [], [], None
        for _ in range(repeats):
            sec, cpu, out = run_tiles(spec, A, B, VA, VB, solver, tol)
            rates.append(s * s / sec)
            cpu_rates.append(s * s / cpu)
            stats = out
        n_off = conv.offsets(spec, *X.shape[1:3])[0].shape[0]
        nonlin = stats[:, 3].reshape(-1, n_off)
        linear = stats[:, 4].reshape(-1, n_off)
        rows[solver] = {
            "pairs": s * s,
            "pairs_per_s": float(np.median(rates)),
            "pairs_per_cpu_s": float(np.median(cpu_rates)),
            "nonlinear_iterations_median": float(np.median(nonlin)),
            "nonlinear_iterations_max": int(nonlin.max()),
            "linear_iterations_median": float(np.median(linear)),
            "sweeps_median": float(np.median(nonlin + linear)),
            "sweeps_max": int((nonlin + linear).max()),
        }
    new, old = rows["newton"], rows["plain"]
    return {
        "images": name,
        "readout": readout,
        "self_covariance_images_per_s": self_rate,
        "newton": new,
        "plain": old,
        "speedup_wall": new["pairs_per_s"] / old["pairs_per_s"],
        "speedup_cpu": new["pairs_per_cpu_s"] / old["pairs_per_cpu_s"],
        "ratio_nonlinear_iterations": old["nonlinear_iterations_median"]
        / new["nonlinear_iterations_median"],
        "ratio_sweeps": old["sweeps_median"] / new["sweeps_median"],
    }


def extrapolate(results):
    lines = []
    for r in results:
        n_img, shape = DATASETS["fashion-mnist" if r["images"].startswith("28") else "cifar-10"]
        pairs = n_img * (n_img + 1) / 2
        per_core = r["newton"]["pairs_per_cpu_s"]
        hours = pairs / per_core / 3600
        lines.append(
            f"{r['images']} {r['readout']:>7}: full {n_img}-image Gram = {pairs:.3g} "
            f"pairs -> {hours:,.0f} core-hours at {per_core:,.1f} pairs/s/core"
        )
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flatten-pairs", type=int, default=1024)
    ap.add_argument("--gap-pairs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tol", type=float, default=conv.DEFAULT_TOL)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.flatten_pairs, args.gap_pairs, args.repeats = 64, 1, 1
    rng = np.random.default_rng(0)
    threads = numba.get_num_threads()
    n_img = 2 * max(2, int(np.ceil(np.sqrt(args.flatten_pairs))))
    images = {"28x28x1": mnist_like(rng, n_img), "32x32x3": cifar_like(rng, n_img)}
    print(
        f"numba threads: {threads}; tol {args.tol:g}; sigma_w2=1.5 sigma_u2=0.8 sigma_b2=0.1; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    results = []
    for name, X in images.items():
        for readout, n_pairs in (("flatten", args.flatten_pairs), ("gap", args.gap_pairs)):
            r = bench_case(name, X, readout, n_pairs, args.repeats, args.tol)
            results.append(r)
            nw, pl = r["newton"], r["plain"]
            print(
                f"{name} {readout:>7}: newton {nw['pairs_per_s']:9.2f} pairs/s wall, "
                f"{nw['pairs_per_cpu_s']:9.2f} per CPU-s; iterations: nonlinear "
                f"{nw['nonlinear_iterations_median']:.0f} median / "
                f"{nw['nonlinear_iterations_max']} max + linear (CG) "
                f"{nw['linear_iterations_median']:.0f} median\n"
                f"{'':16}plain  {pl['pairs_per_s']:9.2f} pairs/s wall, "
                f"{pl['pairs_per_cpu_s']:9.2f} per CPU-s; iterations "
                f"{pl['nonlinear_iterations_median']:.0f} median / "
                f"{pl['nonlinear_iterations_max']} max\n"
                f"{'':16}speed-up {r['speedup_wall']:.2f}x wall, {r['speedup_cpu']:.2f}x CPU; "
                f"{r['ratio_nonlinear_iterations']:.1f}x fewer nonlinear iterations, "
                f"{r['ratio_sweeps']:.2f}x fewer sweeps (nonlinear + linear)",
                flush=True,
            )
        print(f"{name} self-covariances: {r['self_covariance_images_per_s']:,.0f} images/s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    for line in extrapolate(results):
        print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
