#!/usr/bin/env python
"""Validation sweep of the FC DEQ-NTK hyperparameters (and an RBF baseline) on Fashion-MNIST.

Validation split: class-balanced ``--n-train`` training rows and ``--n-val`` held-out rows,
both drawn (seeded) from the *training* images only; the test images are never touched by
the sweep. Preprocessing is fitted on the sweep's training rows only. Kernels come straight
from :func:`deqntk_dist.kernel_matrix`; the regression is a plain in-memory kernel ridge
``(K + lam tr(K)/n I) alpha = Y`` (one-hot targets 0.9 / -0.1) solved by Cholesky, lam swept.

Stage 1 sweeps the preprocessing with fixed kernel parameters, stage 2 the kernel parameters
(sigma_w2, sigma_b2 with sigma_u2 = 1: the ReLU DEQ-NTK is homogeneous in (sigma_u2,
sigma_b2), so only their ratio matters) with the best preprocessing.

``--final`` instead evaluates given parameters on the real test split: ``--n-train`` training
rows (balanced subset) against all (or ``--n-test``) test images, DEQ-NTK and NNGP against the
RBF baseline with the RBF parameters chosen on a validation split inside those training rows.

Usage::

    .venv/bin/python scripts/sweep_hparams.py --n-train 5000 --n-val 2000 --out sweep.json
    .venv/bin/python scripts/sweep_hparams.py --final --n-train 10000 \\
        --sigma-w2 1.0 --sigma-b2 0.1 --preprocess center,unit-norm
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

from deqntk_dist import DEQSpec, kernel_matrix
from deqntk_dist.data import load_dataset
from deqntk_dist.preprocess import PreprocessConfig, fit_preprocessing, parse_steps, select_rows

LAMBDAS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)


def ridge_accuracies(K_tt, K_vt, y_tr, y_val, lambdas=LAMBDAS):
    """Accuracy per relative ridge lam for ``(K + lam tr(K)/n I) alpha = Y``."""
    n = K_tt.shape[0]
    k = int(max(y_tr.max(), y_val.max())) + 1
    Y = np.full((n, k), -0.1)
    Y[np.arange(n), y_tr] = 0.9
    scale = np.trace(K_tt) / n
    out = {}
    for lam in lambdas:
        A = K_tt + (lam * scale) * np.eye(n)
        try:
            alpha = scipy.linalg.cho_solve(scipy.linalg.cho_factor(A, lower=True), Y)
        except np.linalg.LinAlgError:
            out[lam] = float("nan")
            continue
        out[lam] = float(np.mean(np.argmax(K_vt @ alpha, axis=1) == y_val))
    return out


def rbf(X, Y, gamma):
    """``exp(-gamma |x - y|^2 / d)``."""
    sq = (X * X).sum(1)[:, None] + (Y * Y).sum(1)[None, :] - 2 * X @ Y.T
    return np.exp(-gamma * np.maximum(sq, 0) / X.shape[1])


def split(raw, n_train, n_val, seed, steps, zca):
    xs, ys, xv, yv, _ = select_rows(
        replace(raw, x_test=None, y_test=None), n_train, n_val, seed=seed
    )
    fitted = fit_preprocessing(PreprocessConfig(steps=steps, zca_strength=zca), xs)
    flat = lambda a: fitted.transform(a).reshape(a.shape[0], -1)  # noqa: E731
    return flat(xs), ys, flat(xv), yv


def deq_scores(spec, Xs, ys, Xv, yv):
    t = time.perf_counter()
    Ktt = kernel_matrix(spec, Xs)
    Kvt = kernel_matrix(spec, Xv, Xs)
    kt = time.perf_counter() - t
    ntk = ridge_accuracies(Ktt.ntk, Kvt.ntk, ys, yv)
    nngp = ridge_accuracies(Ktt.nngp, Kvt.nngp, ys, yv)
    return ntk, nngp, kt


def best(acc):
    lam = max(acc, key=lambda k: (acc[k], -k))
    return acc[lam], lam


def sweep(args, raw):
    rows = []

    def record(stage, steps, zca, spec, Xs, ys, Xv, yv):
        ntk, nngp, kt = deq_scores(spec, Xs, ys, Xv, yv)
        row = {
            "stage": stage,
            "preprocess": ",".join(steps) or "none",
            "zca_strength": zca,
            "sigma_w2": spec.sigma_w2,
            "sigma_u2": spec.sigma_u2,
            "sigma_b2": spec.sigma_b2,
            "ntk_acc": best(ntk)[0],
            "ntk_lambda": best(ntk)[1],
            "nngp_acc": best(nngp)[0],
            "nngp_lambda": best(nngp)[1],
            "kernel_seconds": round(kt, 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    base = DEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1)
    pre_grid = [
        (("center", "unit-norm"), 0.0),
        (("unit-norm",), 0.0),
        (("standardize", "unit-norm"), 0.0),
        (("zca", "unit-norm"), 1.0),
    ]
    data = {}
    for steps, zca in pre_grid:
        data[(steps, zca)] = split(raw, args.n_train, args.n_val, args.seed, steps, zca)
        record("preprocess", steps, zca, base, *data[(steps, zca)])
    stage1 = [r for r in rows if r["stage"] == "preprocess"]
    top = max(stage1, key=lambda r: r["ntk_acc"])
    steps, zca = parse_steps(top["preprocess"]), top["zca_strength"]
    for sw2 in (0.5, 1.0, 1.5, 1.9):
        for sb2 in (0.0, 1.0):
            if (sw2, sb2) == (1.0, 0.1):
                continue
            spec = DEQSpec(sigma_w2=sw2, sigma_u2=1.0, sigma_b2=sb2)
            record("kernel", steps, zca, spec, *data[(steps, zca)])
    # RBF baseline on the best preprocessing
    Xs, ys, Xv, yv = data[(steps, zca)]
    for gamma in (1.0, 2.0, 4.0, 8.0):
        acc = ridge_accuracies(rbf(Xs, Xs, gamma), rbf(Xv, Xs, gamma), ys, yv)
        row = {
            "stage": "rbf",
            "preprocess": top["preprocess"],
            "zca_strength": zca,
            "gamma": gamma,
            "acc": best(acc)[0],
            "lambda": best(acc)[1],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    win = max((r for r in rows if r["stage"] != "rbf"), key=lambda r: r["ntk_acc"])
    return {
        "n_train": args.n_train,
        "n_val": args.n_val,
        "seed": args.seed,
        "rows": rows,
        "best": win,
    }


def final(args, raw):
    steps = parse_steps(args.preprocess)
    xs, ys, xt, yt, _ = select_rows(raw, args.n_train, args.n_test, seed=args.seed)
    fitted = fit_preprocessing(PreprocessConfig(steps=steps, zca_strength=args.zca_strength), xs)
    Xs = fitted.transform(xs).reshape(xs.shape[0], -1)
    Xt = fitted.transform(xt).reshape(xt.shape[0], -1)
    spec = DEQSpec(sigma_w2=args.sigma_w2, sigma_u2=1.0, sigma_b2=args.sigma_b2)
    ntk, nngp, kt = deq_scores(spec, Xs, ys, Xt, yt)
    # RBF: gamma and lam chosen on a validation split inside the training rows
    nv = max(1, xs.shape[0] // 5)
    rs = np.random.default_rng(args.seed).permutation(xs.shape[0])
    v, s = rs[:nv], rs[nv:]
    gam = {
        g: best(ridge_accuracies(rbf(Xs[s], Xs[s], g), rbf(Xs[v], Xs[s], g), ys[s], ys[v]))
        for g in (0.5, 1.0, 2.0, 4.0, 8.0)
    }
    g = max(gam, key=lambda k: gam[k][0])
    lam = gam[g][1]
    rbf_test = ridge_accuracies(rbf(Xs, Xs, g), rbf(Xt, Xs, g), ys, yt, lambdas=(lam,))[lam]
    out = {
        "n_train": xs.shape[0],
        "n_test": xt.shape[0],
        "spec": spec.to_dict(),
        "preprocess": list(steps),
        "deq_ntk_test_acc_by_lambda": ntk,
        "deq_nngp_test_acc_by_lambda": nngp,
        "kernel_seconds": round(kt, 1),
        "rbf_gamma": g,
        "rbf_lambda": lam,
        "rbf_val_acc": gam[g][0],
        "rbf_test_acc": rbf_test,
    }
    print(json.dumps(out, indent=1), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-val", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (shared machine)")
    p.add_argument("--final", action="store_true")
    p.add_argument("--sigma-w2", type=float, default=1.0)
    p.add_argument("--sigma-b2", type=float, default=0.1)
    p.add_argument("--preprocess", default="center,unit-norm")
    p.add_argument("--zca-strength", type=float, default=0.1)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args()
    raw = load_dataset("fashion-mnist")
    t = time.perf_counter()
    with threadpool_limits(args.threads):
        out = final(args, raw) if args.final else sweep(args, raw)
    out["wall_seconds"] = round(time.perf_counter() - t, 1)
    print(f"wall {out['wall_seconds']} s; best: {json.dumps(out.get('best', {}))}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
