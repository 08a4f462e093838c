#!/usr/bin/env python
"""Fashion-MNIST accuracy of FC and CDEQ kernels on one split (the README's table).

Every row uses the same class-balanced split (``--n-train`` training rows, ``--n-test``
test rows, seeded), preprocessing fitted on the training rows only, the kernels computed
with :func:`deqntk_dist.kernel_matrix` at the float32-store tolerance (what a float32
kernel store holds), and the product's regression stage (:func:`deqntk_dist.kernel_ridge`:
ridge chosen on a validation split of the training rows, then refitted on all of them).
``--sweep`` draws both parts from the *training* images (the second part is the
validation set of a hyper-parameter sweep; the test images are never touched).

A config is ``NAME:PREPROCESS[:key=value...]``:

* ``NAME``: ``fc``, ``flatten``, ``gap`` or ``lapC`` (local average pooling, window C);
* ``PREPROCESS``: ``unit-norm`` or ``zca`` (``zca,unit-norm`` with strength ``zca=EPS``,
  default 0.1);
* keys: ``sw2``, ``su2``, ``sb2`` (defaults 1.0, 1.0, 0.1), ``hflip=1``, ``ntk=0`` (use
  the NNGP).

Kernels are cached as ``.npy`` under ``--cache`` (a rerun only solves).  One JSON line per
config goes to ``--out``; a Markdown table is printed at the end.

Usage::

    .venv/bin/python scripts/accuracy_table.py --n-train 1000 --n-test 1000 \\
        --configs fc:unit-norm lap3:unit-norm lap5:zca:hflip=1 --out table.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from deqntk_dist import CDEQSpec, DEQSpec, kernel_matrix, kernel_ridge
from deqntk_dist.data import load_dataset
from deqntk_dist.kernels.conv import FLOAT32_TOL
from deqntk_dist.preprocess import PreprocessConfig, fit_preprocessing, select_rows

RIDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def parse_config(text: str) -> dict:
    name, pre, *rest = text.split(":")
    kw = dict(kv.split("=", 1) for kv in rest)
    steps = ("unit-norm",) if pre == "unit-norm" else ("zca", "unit-norm")
    if pre not in ("unit-norm", "zca"):
        raise SystemExit(f"preprocessing must be unit-norm or zca, got {pre!r} in {text!r}")
    params = {
        "sigma_w2": float(kw.get("sw2", 1.0)),
        "sigma_u2": float(kw.get("su2", 1.0)),
        "sigma_b2": float(kw.get("sb2", 0.1)),
        "hflip": kw.get("hflip", "0") == "1",
    }
    if name == "fc":
        spec = DEQSpec(**params)
    elif name in ("flatten", "gap"):
        spec = CDEQSpec(**params, readout=name)
    elif name.startswith("lap"):
        spec = CDEQSpec(**params, readout="lap", pool_size=int(name[3:]))
    else:
        raise SystemExit(f"config name must be fc, flatten, gap or lapC, got {name!r}")
    return {
        "config": text,
        "spec": spec,
        "preprocess": PreprocessConfig(steps=steps, zca_strength=float(kw.get("zca", 0.1))),
        "kernel": "ntk" if kw.get("ntk", "1") == "1" else "nngp",
    }


def split(raw, n_train: int, n_test: int, seed: int, sweep: bool):
    if sweep:  # both parts from the training images
        raw = replace(raw, x_test=None, y_test=None)
    return select_rows(raw, n_train, n_test, seed=seed)


def kernels(cfg: dict, xs, xt, cache: Path, key: str):
    """(K_train, K_test_train, seconds) of a config, cached under ``cache``."""
    spec = cfg["spec"]
    tag = hashlib.blake2b(
        json.dumps([spec.to_dict(), cfg["preprocess"].to_dict(), cfg["kernel"], key]).encode(),
        digest_size=8,
    ).hexdigest()
    paths = [cache / f"{tag}-{part}.npy" for part in ("tt", "st")]
    meta = cache / f"{tag}.json"
    if all(p.exists() for p in paths) and meta.exists():
        return np.load(paths[0]), np.load(paths[1]), json.loads(meta.read_text())["seconds"]
    fitted = fit_preprocessing(cfg["preprocess"], xs)
    Xs, Xt = fitted.transform(xs), fitted.transform(xt)
    if isinstance(spec, DEQSpec) and not spec.hflip:
        Xs, Xt = Xs.reshape(len(Xs), -1), Xt.reshape(len(Xt), -1)
    opts = {"tol": FLOAT32_TOL} if isinstance(spec, CDEQSpec) else {}
    t0 = time.perf_counter()
    Ktt = getattr(kernel_matrix(spec, Xs, **opts), cfg["kernel"])
    Kst = getattr(kernel_matrix(spec, Xt, Xs, **opts), cfg["kernel"])
    seconds = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    for p, K in zip(paths, (Ktt, Kst)):
        np.save(p, K)
    meta.write_text(json.dumps({"config": cfg["config"], "seconds": seconds}))
    return Ktt, Kst, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, required=True)
    p.add_argument("--n-test", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="validation split of the train rows")
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--out", default=None, help="append one JSON line per config here")
    p.add_argument("--cache", default=".bench/kernels", help="kernel cache directory")
    args = p.parse_args()
    raw = load_dataset("fashion-mnist")
    xs, ys, xt, yt, _ = split(raw, args.n_train, args.n_test, args.seed, args.sweep)
    key = f"{'sweep' if args.sweep else 'test'}-{args.n_train}-{args.n_test}-{args.seed}"
    rows = []
    for text in args.configs:
        cfg = parse_config(text)
        Ktt, Kst, seconds = kernels(cfg, xs, xt, Path(args.cache), key)
        n = len(xs)
        pairs = n * (n + 1) // 2 + len(xt) * n
        rep = kernel_ridge(Ktt, ys, Kst, yt, ridges=RIDGES, seed=args.seed)
        row = {
            "config": text,
            "split": key,
            "spec": cfg["spec"].to_dict(),
            "kernel": cfg["kernel"],
            "accuracy": rep.accuracy,
            "ridge": rep.ridge,
            "val_accuracy": dict(zip(map(str, rep.ridges), rep.val_accuracy or [])),
            "kernel_seconds": round(seconds, 1),
            "pairs": pairs,
            "pairs_per_s": round(pairs / seconds, 1) if seconds > 0 else None,
            "threads": int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count() or 1)),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    what = "validation" if args.sweep else "test"
    print(f"\n| config | {what} accuracy | ridge | kernel time |\n|---|---|---|---|")
    for r in rows:
        acc, sec = r["accuracy"], r["kernel_seconds"]
        print(f"| {r['config']} | {acc:.4f} | {r['ridge']:g} | {sec} s |")


if __name__ == "__main__":
    main()
