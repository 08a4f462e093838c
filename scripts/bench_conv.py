"""Benchmark of the CDEQ-NTK slice solver against the previous version, in one run.

The previous version is the last commit before the Newton-Chebyshev solver (``--baseline``,
default ``3bab065``), checked out as a git worktree under ``.bench/`` and imported from
there; every measurement runs in its own process, the two versions alternating round by
round (same synthetic images, same thread count, warm numba caches).  Per case it prints
the median image pairs per second (wall) and per CPU-second, the ratios to the baseline,
iterations and peak memory:

* baseline: the previous solver as it computed every store (tolerance 1e-13);
* float32-store path: this code at ``FLOAT32_TOL`` (1e-9), what a float32 store uses;
* float64 path: this code at 1e-13.

Cases: 28x28x1 (Fashion-MNIST-like strokes on a zero background) and 32x32x3 (CIFAR-like
smooth colour fields), readouts flatten, gap and lap (pool 5; new code only), sigma_w2=1.5,
sigma_u2=0.8, sigma_b2=0.1 (as the earlier benchmark).

Usage::

    python scripts/bench_conv.py                 # 7 rounds, ~2 minutes on 2 cores
    python scripts/bench_conv.py --quick         # smoke run
    python scripts/bench_conv.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"sigma_w2": 1.5, "sigma_u2": 0.8, "sigma_b2": 0.1}
IMAGES = {"28x28x1": (28, 28, 1), "32x32x3": (32, 32, 3)}
DATASETS = {"28x28x1": ("Fashion-MNIST", 70_000), "32x32x3": ("CIFAR-10", 60_000)}


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


def images(name: str, side: int) -> np.ndarray:
    """``2 side`` seeded images of a case (the two versions see the same ones)."""
    rng = np.random.default_rng(0)
    return mnist_like(rng, 2 * side) if name == "28x28x1" else cifar_like(rng, 2 * side)


# --------------------------------------------------------------- worker (one process)
def _time_new(conv, spec, A, B, VA, VB, tol):
    plan = conv.readout_plan(spec, *A.shape[1:3])
    inputs = conv._task_inputs(spec, A, B, VA, VB, None)
    pi, pj = (a.astype(np.int64) for a in np.divmod(np.arange(len(A) * len(B)), len(B)))
    kw = {"tol": tol, "max_iter": 4000, "history": 5, "method": 0}
    conv.slice_tasks(inputs, plan, pi[:1], pj[:1], **kw)  # compile / warm
    t0, c0 = time.perf_counter(), time.process_time()
    out = conv.slice_tasks(inputs, plan, pi, pj, **kw)
    return time.perf_counter() - t0, time.process_time() - c0, out


def _time_old(conv, spec, A, B, VA, VB, tol):
    n, H, W, C = A.shape
    m = len(B)
    d1s, d2s = conv.offsets(spec, H, W)
    act, quad, nodes, weights = conv._activation(spec, None)
    pi, pj = (a.astype(np.int64) for a in np.divmod(np.arange(n * m), m))

    def call(pi, pj):
        out = np.empty((len(pi) * d1s.shape[0], 5))
        conv.offset_tasks(
            act, quad, nodes, weights, spec.sigma_w2, spec.sigma_u2, spec.sigma_b2, H, W,
            spec.filter_size // 2, A.reshape(n, H * W, C), B.reshape(m, H * W, C),
            VA.reshape(n, -1), VB.reshape(m, -1), pi, pj, d1s, d2s, tol,
            conv.DEFAULT_MAX_ITER * 10, conv.DEFAULT_HISTORY, 0, out,
        )  # fmt: skip
        return out

    call(pi[:1], pj[:1])
    t0, c0 = time.perf_counter(), time.process_time()
    out = call(pi, pj)
    return time.perf_counter() - t0, time.process_time() - c0, out


def worker(impl: str, cases: list[dict]) -> list[dict]:
    """Time every case with the implementation on ``sys.path`` (``old`` or ``new``)."""
    from deqntk_dist import CDEQSpec
    from deqntk_dist.kernels import conv

    rows = []
    for case in cases:
        if impl == "old" and case["readout"] == "lap":
            continue
        kw = {"readout": case["readout"]}
        if case["readout"] == "lap":
            kw["pool_size"] = case["pool"]
        spec = CDEQSpec(**SPEC, **kw)
        side = case["side"]
        X = images(case["images"], side)
        V = conv.conv_self_covariance(spec, X)
        A, B, VA, VB = X[:side], X[side:], V[:side], V[side:]
        for tol in case["tols"] if impl == "new" else (1e-13,):
            timer = _time_new if impl == "new" else _time_old
            sec, cpu, out = timer(conv, spec, A, B, VA, VB, tol)
            if not np.isfinite(out[:, 2]).all():
                raise RuntimeError(f"{impl} {case}: some slices did not converge")
            rows.append(
                {
                    "impl": impl,
                    "images": case["images"],
                    "readout": case["readout"] + (str(case["pool"]) if case.get("pool") else ""),
                    "tol": tol,
                    "pairs": side * side,
                    "pairs_per_s": side * side / sec,
                    "pairs_per_cpu_s": side * side / cpu,
                    "nonlinear_median": float(np.median(out[:, 3])),
                    "linear_median": float(np.median(out[:, 4])),
                    "robust_slices": int(out[:, 5].sum()) if out.shape[1] > 5 else 0,
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                }
            )
    return rows


# ----------------------------------------------------------------------------- driver
def ensure_baseline(ref: str, path: Path) -> Path:
    """A git worktree of ``ref`` at ``path`` (created once; ``.bench/`` is ignored)."""
    if not (path / "deqntk_dist" / "kernels" / "conv.py").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(path), ref],
            check=True,
            capture_output=True,
        )
    return path


def run_worker(impl: str, cases: list[dict], baseline: Path) -> list[dict]:
    env = dict(os.environ)
    src = baseline if impl == "old" else ROOT
    env["PYTHONPATH"] = str(src)
    env["NUMBA_CACHE_DIR"] = str(ROOT / ".bench" / f"numba-{impl}")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, json.dumps(cases)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=src)
    if res.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["impl"], r["images"], r["readout"], r["tol"]), []).append(r)
    out = []
    for (impl, img, readout, tol), rs in groups.items():
        out.append(
            {
                "impl": impl,
                "images": img,
                "readout": readout,
                "tol": tol,
                "runs": len(rs),
                "pairs_per_s": statistics.median(r["pairs_per_s"] for r in rs),
                "pairs_per_cpu_s": statistics.median(r["pairs_per_cpu_s"] for r in rs),
                "nonlinear_median": rs[0]["nonlinear_median"],
                "linear_median": rs[0]["linear_median"],
                "robust_slices": max(r["robust_slices"] for r in rs),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            }
        )
    return out


def report(summary: list[dict], threads: int) -> list[str]:
    by = {(s["impl"], s["images"], s["readout"], s["tol"]): s for s in summary}
    lines = [
        f"threads {threads}; medians over {summary[0]['runs']} alternating rounds; "
        f"sigma_w2={SPEC['sigma_w2']} sigma_u2={SPEC['sigma_u2']} sigma_b2={SPEC['sigma_b2']}",
        f"{'case':<16} {'path':<14} {'pairs/s':>10} {'per CPU-s':>10} {'x wall':>7} "
        f"{'x CPU':>7} {'evals':>6} {'linear':>7}",
    ]
    for img in IMAGES:
        for readout in ("flatten", "gap", "lap5"):
            old = by.get(("old", img, readout, 1e-13))
            for label, impl, tol in (
                ("baseline", "old", 1e-13),
                ("float32 store", "new", 1e-9),
                ("float64", "new", 1e-13),
            ):
                s = by.get((impl, img, readout, tol))
                if s is None:
                    continue
                ratio_w = s["pairs_per_s"] / old["pairs_per_s"] if old else float("nan")
                ratio_c = s["pairs_per_cpu_s"] / old["pairs_per_cpu_s"] if old else float("nan")
                lines.append(
                    f"{img + ' ' + readout:<16} {label:<14} {s['pairs_per_s']:>10.2f} "
                    f"{s['pairs_per_cpu_s']:>10.2f} {ratio_w:>7.2f} {ratio_c:>7.2f} "
                    f"{s['nonlinear_median']:>6.0f} {s['linear_median']:>7.0f}"
                )
        for tol, label in ((1e-9, "float32 store"), (1e-13, "float64")):
            gap, lap = by.get(("new", img, "gap", tol)), by.get(("new", img, "lap5", tol))
            if gap and lap:
                lines.append(
                    f"{img} lap5 / gap per pair ({label}): "
                    f"{lap['pairs_per_cpu_s'] / gap['pairs_per_cpu_s']:.1f}x"
                )
    for img, (name, n) in DATASETS.items():
        pairs = n * (n + 1) / 2
        for readout in ("flatten", "lap5", "gap"):
            s = by.get(("new", img, readout, 1e-9))
            if s:
                hours = pairs / s["pairs_per_cpu_s"] / 3600
                lines.append(
                    f"{name} {n} {readout}: {pairs:.3g} pairs -> {hours:,.0f} core-hours "
                    f"(float32 store, {s['pairs_per_cpu_s']:,.2f} pairs per CPU-s)"
                )
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("cases", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--baseline", default="3bab065", help="git ref of the previous version")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--flatten-side", type=int, default=64, help="pairs = side^2")
    ap.add_argument("--lap-side", type=int, default=8)
    ap.add_argument("--gap-side", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--json", help="also write the rows and medians to this file")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.cases))))
        return
    if args.quick:
        args.flatten_side, args.lap_side, args.gap_side, args.rounds = 8, 2, 1, 1
    baseline = ensure_baseline(args.baseline, ROOT / ".bench" / f"baseline-{args.baseline}")
    tols = [1e-9, 1e-13]
    cases = []
    for img in IMAGES:
        cases.append({"images": img, "readout": "flatten", "side": args.flatten_side})
        cases.append({"images": img, "readout": "gap", "side": args.gap_side})
        cases.append({"images": img, "readout": "lap", "pool": 5, "side": args.lap_side})
    for c in cases:
        c["tols"] = tols
    print(
        f"baseline {args.baseline} at {baseline}; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    rows = []
    t0 = time.perf_counter()
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for impl in order:
            rows += run_worker(impl, cases, baseline)
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = summarise(rows)
    threads = int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count() or 1))
    for line in report(summary, threads):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
