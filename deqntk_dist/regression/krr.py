"""Kernel ridge regression: ``(K + lam tr(K)/n I) alpha = Y`` with the ridge chosen on a
validation split, in core or streamed from any block source (validate at the edge in
:func:`kernel_ridge`, then :func:`_select_ridge` and :func:`_fit`).

One-hot centred targets (0.9 / -0.1), predictions ``K_st alpha``, accuracy by argmax.
Routes (every final fit meets the float64 relative residual ``tol``):

``cholesky-dense``  the train block read once into memory as float32; per ridge a float32
                    Cholesky factor preconditions float64 CG (:mod:`.dense`).
``cholesky-inplace`` the train block read once into memory (``itemsize n^2`` bytes), its
                    float32 factor written over its own upper triangle and the kernel
                    kept in the lower one for the float64 CG products (:mod:`.inplace`).
``cholesky-mixed``  streamed: a blocked float32 factor read from the store in row bands,
                    float64 CG whose residuals re-read the store.
``nystrom-dense``   ``method="cg"`` when the train block fits in memory: CG preconditioned
                    by a Nyström approximation sketched in float32, one in-memory pass
                    per iteration (no factorization; iterations grow as the ridge shrinks).
``cg-nystrom``      streamed CG preconditioned by a randomised Nyström approximation,
                    memory ``O(n * rank)`` besides one row band.
``auto``            the first of ``cholesky-dense``, ``cholesky-inplace``,
                    ``cholesky-mixed``, ``cg-nystrom`` that fits the memory limit.

Validation solves stop at :data:`VAL_TOL` (enough to rank the ridges).
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError, SolveError
from ..options import DEFAULT_RIDGES, SOLVERS
from ..store.dataset import MAX_CLASSES
from ..units import parse_size
from .dense import (
    DenseSolver,
    NystromDenseSolver,
    dense_bytes,
    dense_matmul,
    gather,
    load_dense,
    load_symmetric,
    nystrom_dense_bytes,
)
from .inplace import InplaceSolver, inplace_bytes
from .linalg import (
    IndexedBlocks,
    NystromPreconditioner,
    as_block_source,
    band_rows,
    block_cholesky,
    check_converged,
    diagonal,
    factor_escalating,
    nystrom_preconditioner,
    pcg,
    sym_matmul,
)
from .report import SolveReport, _accuracy

__all__ = [
    "DEFAULT_RIDGES",
    "METHODS",
    "kernel_ridge",
    "one_hot_targets",
    "plan_method",
]

#: the routes a caller may ask for (``method`` here, ``solver`` in :class:`SolveOptions`)
METHODS = SOLVERS


# ----------------------------------------------------------------------------- helpers
def _default_memory_limit() -> int:
    import psutil

    return int(0.75 * psutil.virtual_memory().total)


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def one_hot_targets(
    labels, n_classes: int | None = None, *, on: float = 0.9, off: float = -0.1
) -> np.ndarray:
    """One-hot centred targets, float64 shape (n, n_classes): ``on`` at the label, else ``off``.

    Raises
    ------
    InputError
        Labels not 1-D non-negative integers (or >= ``n_classes``).
    """
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise InputError(f"labels must be a 1-D integer array, got shape {y.shape} {y.dtype}")
    if y.size and y.min() < 0:
        raise InputError(f"labels must be non-negative class indices, got {y.min()}")
    k = int(y.max()) + 1 if n_classes is None else int(n_classes)
    if y.size and y.max() >= k:
        raise InputError(f"labels must be < n_classes = {k}, got {y.max()}")
    if k > MAX_CLASSES:
        raise InputError(
            f"labels must be < {MAX_CLASSES} (one-hot targets of {k} classes would not fit; a "
            f"store written before labels were bounded), got {k - 1}"
        )
    Y = np.full((y.size, k), off, dtype=np.float64)
    Y[np.arange(y.size), y] = on
    return Y


def plan_method(
    n: int,
    method: str,
    memory_limit: int,
    *,
    block: int = 2048,
    itemsize: int = 4,
    rank: int = 512,
) -> tuple[str, str]:
    """Pick the solver route for ``n`` training rows.

    Returns
    -------
    route : {"cholesky-dense", "cholesky-inplace", "nystrom-dense", "cholesky-mixed",
        "cg-nystrom"}
    why : str
        The reason, for the report.

    Raises
    ------
    InputError
        Unknown method, or ``cholesky`` asked for but even the float32 factor does not fit.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    dense = dense_bytes(n, itemsize)
    packed32 = 2 * n * (n + block) + 22 * n * block  # factor, inverses, band workspace
    gb = 1e9
    nys = nystrom_dense_bytes(n, rank, itemsize)
    if method == "cg":
        if nys <= memory_limit:
            return "nystrom-dense", (
                f"requested; the train block in memory with a rank-{rank} sketch "
                f"({nys / gb:.2f} GB) fits memory_limit {memory_limit / gb:.2f} GB"
            )
        return "cg-nystrom", "requested"
    if dense <= memory_limit:
        return "cholesky-dense", (
            f"the train block in memory with its factor ({dense / gb:.2f} GB) fits "
            f"memory_limit {memory_limit / gb:.2f} GB"
        )
    inplace = inplace_bytes(n, itemsize)
    if inplace <= memory_limit:
        return "cholesky-inplace", (
            f"the in-memory route ({dense / gb:.2f} GB) exceeds memory_limit "
            f"{memory_limit / gb:.2f} GB; the train block factored over itself "
            f"({inplace / gb:.2f} GB) fits"
        )
    if packed32 <= memory_limit:
        return "cholesky-mixed", (
            f"the train block ({inplace / gb:.2f} GB) exceeds memory_limit "
            f"{memory_limit / gb:.2f} GB; packed float32 factor {packed32 / gb:.2f} GB fits"
        )
    if method == "cholesky":
        raise InputError(
            f"memory_limit {memory_limit / gb:.2f} GB is too small for method 'cholesky' with "
            f"n = {n} (the float32 factor needs {packed32 / gb:.2f} GB); raise it or use "
            "method 'cg'"
        )
    return "cg-nystrom", (
        f"packed float32 factor {packed32 / gb:.2f} GB exceeds memory_limit "
        f"{memory_limit / gb:.2f} GB"
    )


# ----------------------------------------------------------------------------- one solve
@dataclass
class _Solved:
    alpha: np.ndarray
    residual: float
    iterations: int
    converged: bool
    detail: dict = field(default_factory=dict)


class _Solver:
    """Solves ``(K + shift I) X = B`` on one matrix by one route, reusing what it can."""

    def __init__(
        self,
        K,
        route: str,
        *,
        tol: float,
        max_iter: int,
        rank: int,
        seed: int,
        block: int | None,
        what: str,
    ):
        self.K, self.route, self.tol, self.max_iter = K, route, tol, max_iter
        self.rank, self.seed, self.block, self.what = rank, seed, block, what
        self._nystrom: NystromPreconditioner | None = None
        self.trace = float(diagonal(K, block=block).sum())
        if not self.trace > 0:
            raise SolveError(f"{what} has a non-positive trace {self.trace:.6g}; not a kernel")

    def shift(self, ridge: float) -> float:
        return ridge * self.trace / self.K.shape[0]

    def solve(self, ridge: float, B: np.ndarray, *, tol: float | None = None) -> _Solved:
        tol = self.tol if tol is None else tol
        s = self.shift(ridge)
        if self.route == "cg-nystrom":
            if self._nystrom is None:
                self._nystrom = nystrom_preconditioner(
                    self.K, self.rank, seed=self.seed, block=self.block
                )
            nys = self._nystrom
            x, info = pcg(
                self.K,
                B,
                s,
                precondition=lambda R: nys.apply(R, s),
                tol=tol,
                max_iter=self.max_iter,
                block=self.block,
                what=self.what,
            )
            detail: dict[str, Any] = {"nystrom_rank": nys.rank, "nystrom_seconds": nys.seconds}
        else:  # cholesky-mixed: a float32 factor preconditions float64 CG
            F, pshift = factor_escalating(
                lambda p: block_cholesky(
                    self.K, p, dtype=np.float32, block=self.block, what=self.what
                ),
                s,
                1e-7 * self.trace / self.K.shape[0],
            )
            x, info = pcg(
                self.K,
                B,
                s,
                precondition=F.solve,
                x0=F.solve(B),
                tol=tol,
                max_iter=self.max_iter,
                block=self.block,
                what=self.what,
            )
            detail = {
                "factor_dtype": "float32",
                "factor_seconds": F.seconds,
                "factor_bytes": F.nbytes,
                "preconditioner_shift": pshift,
            }
            del F
        check_converged(
            info, self.route, tol, "raise max_iter or the ridge, or use method 'cholesky'", ridge
        )
        detail["cg_seconds"] = info.seconds
        return _Solved(x, info.residual, info.iterations, info.converged, detail)


def _rows_matmul(S, X: np.ndarray, block: int) -> np.ndarray:
    """``S @ X`` for a (m, n) block source in row bands, float64."""
    m = S.shape[0]
    out = np.empty((m, X.shape[1]))
    for s in range(0, m, block):
        e = min(m, s + block)
        band = np.asarray(S[s:e, 0 : S.shape[1]])
        if not np.isfinite(band).all():
            raise SolveError(f"test x train block has non-finite values in rows {s}:{e}")
        out[s:e] = dense_matmul(band, X)
    return out


# ---------------------------------------------------------------------------- kernel_ridge
def check_options(ridges, val_fraction, tol, max_iter, rank) -> list[float]:
    """Validate the solver options shared by every route; returns the sorted ridges.

    Raises
    ------
    InputError
    """
    ridges = _validate_ridges(ridges)
    if not (isinstance(val_fraction, int | float) and 0 < val_fraction <= 0.5):
        raise InputError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")
    if not (tol > 0 and max_iter >= 1 and rank >= 0):
        raise InputError(
            f"tol must be > 0, max_iter >= 1 and rank >= 0, got {tol}, {max_iter}, {rank}"
        )
    return ridges


def _validate_ridges(ridges) -> list[float]:
    try:
        out = [float(r) for r in (DEFAULT_RIDGES if ridges is None else ridges)]
    except (TypeError, ValueError):
        raise InputError(
            f"ridges must be a sequence of positive numbers, got {ridges!r}"
        ) from None
    if not out or any(not (math.isfinite(r) and r > 0) for r in out):
        raise InputError(
            f"ridges must be a non-empty sequence of positive numbers, got {ridges!r}"
        )
    return sorted(set(out))


def kernel_ridge(
    K_train,
    y_train,
    K_test=None,
    y_test=None,
    *,
    ridges=None,
    method: str = "auto",
    memory_limit=None,
    val_fraction: float = 0.2,
    seed: int = 0,
    tol: float = 1e-10,
    max_iter: int = 500,
    rank: int = 512,
    block: int | None = None,
    n_classes: int | None = None,
    kernel: str | None = None,
) -> SolveReport:
    """Kernel ridge regression with the ridge chosen on a validation split.

    Parameters
    ----------
    K_train : block source, shape (n, n)
        Symmetric train x train kernel (numpy array, zarr array, ...); only its lower
        triangle is read, in row bands.
    y_train : int array, shape (n,)
    K_test : block source, shape (m, n), optional
        Test x train kernel.
    y_test : int array, shape (m,), optional
    ridges : sequence of float, optional
        Relative ridges ``lam`` (shift ``lam * tr(K) / n``); default :data:`DEFAULT_RIDGES`.
        One value skips the validation.
    method : {"auto", "cholesky", "cg"}
    memory_limit : int or str, optional
        Bytes available to the solver (default 75% of the machine's memory).
    val_fraction : float in (0, 0.5]
        Share of the training rows held out to choose the ridge.
    seed : int
        Validation split and Nyström sketch.
    tol : float
        Relative float64 residual ``||Y - (K + shift I) alpha|| / ||Y||`` per column.
    max_iter : int
        CG iterations per solve.
    rank : int
        Nyström rank of the ``cg`` preconditioner.

    Returns
    -------
    SolveReport

    Raises
    ------
    InputError
        Bad parameters.
    SolveError
        Size mismatch, non-finite kernel values, indefinite matrix, no convergence.
    """
    t_start = time.perf_counter()
    K_train = as_block_source(K_train, name="K_train")
    n = K_train.shape[0]
    y_train = np.asarray(y_train)
    if y_train.shape != (n,):
        raise SolveError(
            f"label/kernel size mismatch: y_train has shape {y_train.shape} but "
            f"the train x train kernel has {n} rows"
        )
    m = 0
    if K_test is not None:
        if len(K_test.shape) != 2 or K_test.shape[1] != n:
            raise SolveError(
                f"label/kernel size mismatch: K_test must have shape (m, {n}), "
                f"got {tuple(K_test.shape)}"
            )
        m = K_test.shape[0]
        y_test = None if y_test is None else np.asarray(y_test)
        if y_test is not None and y_test.shape != (m,):
            raise SolveError(
                f"label/kernel size mismatch: y_test has shape {y_test.shape} but "
                f"the test x train kernel has {m} rows"
            )
    ridges = check_options(ridges, val_fraction, tol, max_iter, rank)
    if memory_limit is None:
        limit = _default_memory_limit()
    else:
        limit = parse_size(memory_limit, param="memory_limit")
    all_labels = y_train if y_test is None else np.concatenate([y_train, y_test])
    if n_classes is None:
        n_classes = int(all_labels.max()) + 1 if all_labels.size else 1
    Y = one_hot_targets(y_train, n_classes)
    itemsize = 4 if np.dtype(getattr(K_train, "dtype", np.float64)) == np.float32 else 8
    route, why = plan_method(n, method, limit, block=block or 2048, itemsize=itemsize, rank=rank)
    opts: dict[str, Any] = dict(tol=tol, max_iter=max_iter, rank=rank, seed=seed, block=block)

    blk = block or 2048
    stages: dict[str, float] = {}
    val = fit = None
    if len(ridges) > 1:
        n_val = max(1, int(round(val_fraction * n)))
        if n - n_val < 1:
            raise InputError(f"too few training rows ({n}) for a validation split")
        val = np.sort(np.random.default_rng(seed).choice(n, size=n_val, replace=False))
        fit = np.setdiff1d(np.arange(n), val)
    dense = None
    order = None  # cholesky-inplace: the fit rows first, so the fit block is leading
    if route in ("cholesky-dense", "nystrom-dense"):
        t0 = time.perf_counter()
        dense = load_dense(K_train, band_rows(K_train))
        stages["load"] = time.perf_counter() - t0
    elif route == "cholesky-inplace":
        t0 = time.perf_counter()
        if val is not None:
            order = np.concatenate([fit, val])
        dense = load_symmetric(K_train, order, block=band_rows(K_train))
        opts["diag"] = np.diagonal(dense).astype(np.float64)
        stages["load"] = time.perf_counter() - t0
    val_acc = val_mse = None
    if val is not None:
        t0 = time.perf_counter()
        ridge, val_acc, val_mse = _select_ridge(
            K_train, dense, Y, y_train, val, fit, ridges, route, opts
        )
        stages["validation"] = time.perf_counter() - t0
    else:
        ridge = ridges[0]
    t0 = time.perf_counter()
    solver, sol = _fit(K_train, dense, Y if order is None else Y[order], ridge, route, opts)
    del dense
    if order is not None:  # back to the training rows' order
        alpha = np.empty_like(sol.alpha)
        alpha[order] = sol.alpha
        sol.alpha = alpha
    stages["fit"] = time.perf_counter() - t0
    detail: dict[str, Any] = dict(sol.detail)
    n_val = 0 if val is None else val.size
    # K alpha = Y - shift alpha - residual, and the residual is below tol: no extra pass
    train_pred = Y - solver.shift(ridge) * sol.alpha
    predictions, accuracy = None, None
    if K_test is not None:
        t0 = time.perf_counter()
        predictions = _rows_matmul(K_test, sol.alpha, min(blk, band_rows(K_test)))
        stages["predict"] = time.perf_counter() - t0
        if y_test is not None:
            accuracy = _accuracy(predictions, y_test)
    return SolveReport(
        kernel=kernel,
        method=route,
        method_requested=method,
        method_reason=why,
        ridge=ridge,
        shift=solver.shift(ridge),
        ridges=ridges,
        val_accuracy=val_acc,
        val_mse=val_mse,
        accuracy=accuracy,
        train_accuracy=_accuracy(train_pred, y_train),
        n_train=n,
        n_fit=n - n_val,
        n_val=n_val,
        n_test=m,
        n_classes=n_classes,
        residual=sol.residual,
        iterations=sol.iterations,
        converged=sol.converged,
        tol=tol,
        memory_limit=limit,
        peak_rss=_peak_rss(),
        seconds=time.perf_counter() - t_start,
        stages=stages,
        detail=detail,
        alpha=sol.alpha,
        predictions=predictions,
        val_rows=val,
    )


#: Relative residual of the validation solves: enough to rank the ridges (predictions
#: change by ~1e-6 relative), far cheaper than the final fit's ``tol``.
VAL_TOL = 1e-6


def _solver(K, dense: np.ndarray | None, route: str, opts: dict, what: str, rows=None):
    """The route's solver for ``K`` (streamed) or ``dense`` (in memory; ``nystrom-dense``
    solves on ``dense[rows][:, rows]`` without copying it, ``cholesky-inplace`` on the
    leading ``rows`` x ``rows`` block)."""
    o = opts
    if route == "cholesky-inplace":
        assert dense is not None
        m = dense.shape[0] if rows is None else int(rows)
        return InplaceSolver(
            dense, m, o["diag"], tol=o["tol"], max_iter=o["max_iter"],
            block=o["block"] or 2048, what=what,
        )  # fmt: skip
    if route == "cholesky-dense":
        assert dense is not None
        block = o["block"] or 2048
        return DenseSolver(dense, tol=o["tol"], max_iter=o["max_iter"], block=block, what=what)
    if route == "nystrom-dense":
        assert dense is not None
        return NystromDenseSolver(
            dense, rank=o["rank"], seed=o["seed"], tol=o["tol"], max_iter=o["max_iter"],
            what=what, rows=rows,
        )  # fmt: skip
    return _Solver(K, route, what=what, **{k: v for k, v in opts.items() if k != "diag"})


def _select_ridge(K, dense, Y, y, val, fit, ridges, route, opts):
    """The ridge with the best validation accuracy (ties: the lower validation MSE) when
    fitting on the ``fit`` rows; also the per-ridge accuracies and MSEs."""
    n, n_classes = Y.shape
    if route == "cholesky-inplace":  # loaded fit rows first: all views, no copies
        Kvf = dense[fit.size :, : fit.size]
        solver = _solver(None, dense, route, opts, "K_fit", rows=fit.size)
    elif route == "nystrom-dense":  # no copy of the fit block: the route is memory-bound
        Kvf = gather(dense, val, fit)
        solver = _solver(None, dense, route, opts, "K_fit", rows=fit)
    elif dense is not None:
        Kf = gather(dense, fit, fit)
        Kvf = gather(dense, val, fit)
        solver = _solver(None, Kf, route, opts, "K_fit")
    else:
        solver = _solver(IndexedBlocks(K, fit, fit), None, route, opts, "K_fit")
    tol = max(opts["tol"], VAL_TOL)
    acc, mse = [], []
    for lam in ridges:
        sol = solver.solve(lam, Y[fit], tol=tol)
        if dense is not None:
            pred = dense_matmul(Kvf, sol.alpha)
        else:
            ext = np.zeros((n, n_classes))
            ext[fit] = sol.alpha
            pred = sym_matmul(K, ext, block=opts["block"])[val]
        acc.append(_accuracy(pred, y[val]))
        mse.append(float(np.mean((pred - Y[val]) ** 2)))
    best = max(range(len(ridges)), key=lambda i: (acc[i], -mse[i]))
    return ridges[best], acc, mse


def _fit(K, dense, Y, ridge, route, opts):
    """The solver on all training rows and its solution at ``ridge``."""
    solver = _solver(K, dense, route, opts, "K_train")
    return solver, solver.solve(ridge, Y)
