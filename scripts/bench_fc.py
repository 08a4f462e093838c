#!/usr/bin/env python
"""Benchmark the fully-connected DEQ-NTK tile kernel (issue 2).

Times ``kernel_matrix`` (ReLU, float64 maths, both NTK and NNGP) on a rows x cols tile of
d-dimensional rows and prints entries per second, next to a plain "iterate the layer map
until it stops moving" implementation measured in the same run (on a smaller tile, scaled
per entry), and the bare X @ Y.T product that bounds the kernel from above.

Usage::

    .venv/bin/python scripts/bench_fc.py [--rows 2048] [--cols 2048] [--d 784] [--repeat 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numba
import numpy as np

from deqntk_dist import DEQSpec, kernel_matrix
from deqntk_dist.kernels.duals import dual_maps


def plain_iteration(spec: DEQSpec, X: np.ndarray, Y: np.ndarray, tol: float = 1e-15):
    """Baseline: iterate Sigma <- sw2 k1(Sigma) + I and Theta <- Sigma + sw2 k0 Theta."""
    d = X.shape[1]
    inj = spec.sigma_u2 / d * (X @ Y.T) + spec.sigma_b2
    ix = spec.sigma_u2 / d * np.einsum("ij,ij->i", X, X) + spec.sigma_b2
    iy = spec.sigma_u2 / d * np.einsum("ij,ij->i", Y, Y) + spec.sigma_b2
    S, Sx, Sy, T = inj.copy(), ix.copy(), iy.copy(), inj.copy()
    for it in range(1, 10_000):
        k1, k0 = dual_maps(spec.activation, Sx[:, None], Sy[None, :], S)
        kx, _ = dual_maps(spec.activation, Sx, Sx, Sx)
        ky, _ = dual_maps(spec.activation, Sy, Sy, Sy)
        S_new = spec.sigma_w2 * k1 + inj
        T_new = S_new + spec.sigma_w2 * k0 * T
        Sx, Sy = spec.sigma_w2 * kx + ix, spec.sigma_w2 * ky + iy
        moved = np.max(np.abs(T_new - T) / np.abs(T_new))
        S, T = S_new, T_new
        if moved <= tol:
            return S, T, it
    raise RuntimeError("plain iteration did not stop moving")


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline-rows", type=int, default=256, help="tile side for the baseline")
    ap.add_argument("--unit-norm", action="store_true", help="rows scaled to norm sqrt(d)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    X = rng.random((args.rows, args.d)).astype(np.float32).astype(np.float64)
    Y = rng.random((args.cols, args.d)).astype(np.float32).astype(np.float64)
    if args.unit_norm:
        X *= np.sqrt(args.d) / np.linalg.norm(X, axis=1, keepdims=True)
        Y *= np.sqrt(args.d) / np.linalg.norm(Y, axis=1, keepdims=True)
    spec = DEQSpec(sigma_w2=1.5, sigma_u2=1.0, sigma_b2=0.1)
    entries = args.rows * args.cols
    print(
        f"tile {args.rows} x {args.cols}, d = {args.d}, ReLU, float64 maths, "
        f"{numba.get_num_threads()} threads, median of {args.repeat}"
    )

    kernel_matrix(spec, X[:8], Y[:8])  # compile / load the numba cache
    t_kernel = _median_time(lambda: kernel_matrix(spec, X, Y), args.repeat)
    t_sym = _median_time(lambda: kernel_matrix(spec, X), args.repeat)
    t_gemm = _median_time(lambda: X @ Y.T, args.repeat)
    res = kernel_matrix(spec, X, Y)
    print(
        f"kernel_matrix(X, Y)      : {t_kernel * 1e3:8.1f} ms  "
        f"{entries / t_kernel:12.4g} entries/s"
        f"  (NTK and NNGP; max residual {res.max_residual:.1e})"
    )
    print(f"kernel_matrix(X) (sym.)  : {t_sym * 1e3:8.1f} ms  {entries / t_sym:12.4g} entries/s")
    print(f"bare X @ Y.T (float64)   : {t_gemm * 1e3:8.1f} ms  {entries / t_gemm:12.4g} entries/s")

    b = min(args.baseline_rows, args.rows, args.cols)
    Xb, Yb = X[:b], Y[:b]
    t0 = time.perf_counter()
    S, T, iters = plain_iteration(spec, Xb, Yb)
    t_plain = time.perf_counter() - t0
    ours = kernel_matrix(spec, Xb, Yb)
    agree = max(
        np.max(np.abs(T - ours.ntk) / np.abs(ours.ntk)),
        np.max(np.abs(S - ours.nngp) / np.abs(ours.nngp)),
    )
    print(
        f"plain layer iteration    : {t_plain * 1e3:8.1f} ms  {b * b / t_plain:12.4g} entries/s"
        f"  ({b} x {b} tile, {iters} iterations, max rel. diff to ours {agree:.1e})"
    )
    print(
        f"speed-up over plain iteration: {(entries / t_kernel) / (b * b / t_plain):.0f}x;"
        f" kernel / bare GEMM time: {t_kernel / t_gemm:.2f}"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak:.0f} MiB")
    full = 70_000 * 70_001 / 2
    print(
        f"70k x 70k Gram (upper triangle, {full:.3g} entries) at this rate: "
        f"{full / (entries / t_kernel):.0f} s of kernel compute"
    )


if __name__ == "__main__":
    main()
