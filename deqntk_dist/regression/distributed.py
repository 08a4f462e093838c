"""Kernel ridge regression on a Dask cluster: block preconditioned CG, all right-hand sides
at once, with the train block split into row bands that the workers hold.

Each band ``K[rows_b, rows]`` is read from the kernel store by the worker that runs its task
and kept in that worker's memory when all bands fit (``keep``): every CG iteration is then
one wave of band products and reads nothing from the store; otherwise every product task
reads its band again (streamed).  The preconditioner is a randomised Nyström approximation
built on the workers: its sketch ``Y = K Omega`` (``Omega`` drawn per band from the seed, so
any task can rebuild it), the small ``r x r`` algebra on the driver, and the factor ``U``
kept in row bands beside the kernel bands.  The driver holds only ``n x classes`` vectors
and ``r x r`` matrices.

Every band, sketch and factor is a dask task whose inputs are the store and small matrices
embedded in the graph, so a worker lost mid-solve costs only the recomputation of its bands;
the wave that was running is submitted again (the iteration is recomputed).

A product of the masked operator (vectors are full length ``n``, zero outside a row subset
``S``) solves on ``K[S][:, S]`` without copying it, which is how the validation fit rows
are handled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, SolveError
from .dense import dense_matmul

__all__ = ["BandedKernel", "DistributedNystrom", "band_plan"]

#: Errors of a wave that are worth one more try (a worker or its connection lost).
_RETRY_NAMES = (
    "KilledWorker",
    "CancelledError",
    "FutureCancelledError",
    "FuturesCancelledError",
    "CommClosedError",
)
_MAX_WAVE_TRIES = 5


def band_plan(n: int, row_bytes: int, *, band_bytes: int, align: int = 1) -> list[tuple[int, int]]:
    """``n`` rows of ``row_bytes`` each in bands ``[(r0, r1), ...]`` of about ``band_bytes``,
    multiples of ``align`` rows where possible."""
    rows = max(1, band_bytes // max(1, row_bytes))
    if rows >= align:
        rows -= rows % align
    return [(s, min(n, s + rows)) for s in range(0, n, rows)]


# ------------------------------------------------------------------------ worker side
def _load_band(store: str, kernel: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``K[rows][:, cols]`` from the kernel store, in the store dtype (C-contiguous)."""
    from ..store import open_kernel_store

    arr = open_kernel_store(store).array(kernel)
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    block = np.asarray(arr[r0:r1, c0:c1])
    if rows.size != r1 - r0 or cols.size != c1 - c0:
        block = block[np.ix_(rows - r0, cols - c0)]
    if not np.isfinite(block).all():
        raise SolveError(f"{store}/{kernel} has non-finite values in rows {r0}:{r1}")
    return np.ascontiguousarray(block)


def _band(source, store, kernel, rows, cols):
    return source if source is not None else _load_band(store, kernel, rows, cols)


def _product(source, store, kernel, rows, cols, mask_rows, P):
    """Band rows of ``K @ P`` (float64), zero on the band rows outside the mask."""
    K = _band(source, store, kernel, rows, cols)
    out = dense_matmul(K, P)
    if mask_rows is not None:
        out[~mask_rows] = 0.0
    return out


def _omega(seed: int, b: int, n_rows: int, rank: int, mask_rows) -> np.ndarray:
    """Band ``b`` of the Gaussian test matrix (zero outside the mask)."""
    om = np.random.default_rng([seed, b]).standard_normal((n_rows, rank))
    if mask_rows is not None:
        om[~mask_rows] = 0.0
    return om


def _sketch(source, store, kernel, rows, cols, seed, bands, b, rank, mask):
    """Band ``b`` of ``Y = K_S Omega`` and its partial sums ``Omega_b^T Y_b``,
    ``Omega_b^T Omega_b`` and ``||Y_b||_F^2``."""
    K = _band(source, store, kernel, rows, cols)
    Y = np.zeros((K.shape[0], rank))
    for j, (c0, c1) in enumerate(bands):  # K[b, :] @ Omega, Omega rebuilt band by band
        mj = None if mask is None else mask[c0:c1]
        om = _omega(seed, j, c1 - c0, rank, mj).astype(K.dtype)
        Y += K[:, c0:c1] @ om  # a BLAS GEMM in the store's precision (a sketch)
    r0, r1 = bands[b]
    mb = None if mask is None else mask[r0:r1]
    if mb is not None:
        Y[~mb] = 0.0
    om = _omega(seed, b, r1 - r0, rank, mb)
    return Y, (om.T @ Y, om.T @ om, float((Y * Y).sum()))


def _first(pair):
    return pair[0]


def _second(pair):
    return pair[1]


def _diag(source, store, kernel, rows, cols, offset):
    K = _band(source, store, kernel, rows, cols)
    return np.asarray(K[np.arange(K.shape[0]), offset + np.arange(K.shape[0])], np.float64)


def _factor_band(Y, seed, bands, b, rank, mask, nu, T):
    """``B_b = (Y_b + nu Omega_b) T`` and its Gram ``B_b^T B_b``."""
    r0, r1 = bands[b]
    mb = None if mask is None else mask[r0:r1]
    B = (Y + nu * _omega(seed, b, r1 - r0, rank, mb)) @ T
    return B, B.T @ B


def _u_band(pair, W):
    return pair[0] @ W


def _ut_r(U, R, r0, r1):
    return U.T @ R[r0:r1]


def _apply_band(U, R, r0, r1, D, C):
    return U @ (D[:, None] * C) + R[r0:r1]


# ------------------------------------------------------------------------ driver side
def _retrying(run, stats: WaveStats):
    """``run()`` (one or more waves), run again after a lost worker or connection (up to
    :data:`_MAX_WAVE_TRIES` times in all); the dask tasks it depends on are recomputed."""
    for attempt in range(_MAX_WAVE_TRIES):
        try:
            return run()
        except Exception as exc:
            if type(exc).__name__ not in _RETRY_NAMES or attempt + 1 == _MAX_WAVE_TRIES:
                raise
            stats.retries += 1
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _sum_results(futures, *, single: bool = False):
    """The sums of the futures' results (tuples summed element-wise), gathered one at a
    time so that the driver holds two partial results at once, not one per band."""
    from distributed import as_completed

    total = None
    for _, part in as_completed(futures, with_results=True):
        part = (part,) if single else part
        total = list(part) if total is None else [a + b for a, b in zip(total, part)]
    return total


@dataclass
class WaveStats:
    """Counts of the distributed work (for reports and benchmarks)."""

    waves: int = 0
    retries: int = 0
    product_seconds: list = field(default_factory=list)


class BandedKernel:
    """The train block ``K[rows][:, rows]`` of a kernel store as row bands on a cluster.

    Parameters
    ----------
    client : distributed.Client
    store : str
        Kernel store path or URL (the workers open it themselves).
    kernel : {"ntk", "nngp"}
    rows : int array (n,)
        Sorted global rows of the train block.
    band_bytes : int
        Bytes of one band in memory.
    keep : bool or None
        Hold the bands in worker memory (None: when all of them take at most half the
        cluster's memory limit).
    align : int
        Band rows are multiples of this (the store's chunk side) where possible.
    """

    def __init__(
        self,
        client,
        store: str,
        kernel: str,
        rows: np.ndarray,
        *,
        cols: np.ndarray | None = None,
        itemsize: int = 4,
        band_bytes: int = 256 * 2**20,
        keep: bool | None = None,
        align: int = 1,
    ):
        self.client, self.store, self.kernel = client, str(store), kernel
        self.rows = np.asarray(rows, dtype=np.int64)
        self.cols = self.rows if cols is None else np.asarray(cols, dtype=np.int64)
        self.n = self.rows.size
        if self.n < 1:
            raise InputError("rows must hold at least one train row")
        self.bands = band_plan(
            self.n, self.cols.size * itemsize, band_bytes=band_bytes, align=align
        )
        total = self.n * self.cols.size * itemsize
        if keep is None:
            info = client.scheduler_info()
            limit = sum(w.get("memory_limit") or 0 for w in info["workers"].values())
            keep = bool(limit) and total <= limit // 2
        self.keep = bool(keep)
        self.total_bytes = total
        self.itemsize = itemsize
        self.stats = WaveStats()
        self._sources = [None] * len(self.bands)
        if self.keep:
            self._sources = [
                client.submit(
                    _load_band, self.store, kernel, self.rows[r0:r1], self.cols, pure=False
                )
                for r0, r1 in self.bands
            ]

    def _args(self, b: int) -> tuple:
        r0, r1 = self.bands[b]
        return (self._sources[b], self.store, self.kernel, self.rows[r0:r1], self.cols)

    def wave(self, fn, per_band, *shared, scatter=()):
        """Run ``fn(*band args, *per_band[b], *shared, *scattered)`` for every band and
        gather the results in band order, submitting the wave again after a lost worker."""
        from distributed import wait

        def run():
            big = [self.client.scatter(x, broadcast=True, hash=False) for x in scatter]
            futs = [
                self.client.submit(fn, *self._args(b), *per_band[b], *shared, *big, pure=False)
                for b in range(len(self.bands))
            ]
            wait(futs)
            out = self.client.gather(futs)
            self.stats.waves += 1
            return out

        return _retrying(run, self.stats)

    def masks(self, mask: np.ndarray | None) -> list:
        return [(None if mask is None else mask[r0:r1],) for r0, r1 in self.bands]

    def matmul(self, P: np.ndarray, shift: float = 0.0, *, mask=None) -> np.ndarray:
        """``(K_S + shift I) P`` for full-length ``P`` (n, c) that is zero outside the mask
        (``mask`` None: all rows)."""
        t0 = time.perf_counter()
        parts = self.wave(_product, self.masks(mask), scatter=(np.asarray(P, np.float64),))
        self.stats.product_seconds.append(time.perf_counter() - t0)
        out = np.concatenate(parts)
        return out + shift * P if shift else out

    def diagonal(self) -> np.ndarray:
        """The diagonal of the (square) banded block, float64 (n,)."""
        parts = self.wave(_diag, [(r0,) for r0, _ in self.bands])
        return np.concatenate(parts)

    def release(self) -> None:
        """Drop the bands from the workers."""
        for f in self._sources:
            if f is not None:
                f.release()
        self._sources = [None] * len(self.bands)


class DistributedNystrom:
    """Rank-``rank`` randomised Nyström approximation of ``K_S`` built on the workers; the
    factor ``U`` stays there in row bands.  ``apply(R, shift)`` is the preconditioner of
    :class:`~.linalg.NystromPreconditioner` for ``K_S + shift I``."""

    def __init__(self, K: BandedKernel, rank: int, *, seed: int = 0, mask=None):
        t0 = time.perf_counter()
        self.K, self.mask = K, mask
        n_s = K.n if mask is None else int(np.count_nonzero(mask))
        rank = int(min(max(rank, 1), n_s))
        c = K.client
        per = [(seed, K.bands, b, rank, mask) for b in range(len(K.bands))]
        sk = [c.submit(_sketch, *K._args(b), *per[b], pure=False) for b in range(len(K.bands))]
        core, gram, ysq = _sum_results([c.submit(_second, f, pure=False) for f in sk])
        ynorm = np.sqrt(ysq)
        eps = np.finfo(np.float32 if K.itemsize == 4 else np.float64).eps
        nu = np.sqrt(n_s) * eps * ynorm  # above the sketch's rounding
        core = core + nu * gram
        core = 0.5 * (core + core.T)
        w, V = np.linalg.eigh(core)
        keep = w > w.max() * 1e-12
        # the small matrices are embedded in the tasks and the sketches kept, so that a
        # factor band lost with its worker is recomputed from the store
        T = V[:, keep] / np.sqrt(w[keep])
        ys = [c.submit(_first, f, pure=False) for f in sk]
        bs = [c.submit(_factor_band, ys[b], *per[b], nu, T, pure=False) for b in range(len(ys))]
        (G,) = _sum_results([c.submit(_second, f, pure=False) for f in bs], single=True)
        s2, W = np.linalg.eigh(0.5 * (G + G.T))
        order = np.argsort(s2)[::-1]
        s2, W = np.maximum(s2[order], 0.0), W[:, order]
        good = s2 > s2.max() * 1e-14
        s2, W = s2[good], W[:, good]
        Wn = W / np.sqrt(s2)
        self.U = [c.submit(_u_band, f, Wn, pure=False) for f in bs]
        self._lineage = (sk, ys, bs)
        self.lam = np.maximum(s2 - nu, 0.0)
        self.rank = int(self.lam.size)
        self.seconds = time.perf_counter() - t0

    def apply(self, R: np.ndarray, shift: float) -> np.ndarray:
        from distributed import wait

        K, c = self.K, self.K.client
        bands = K.bands
        D = (self.lam[-1] + shift) / (self.lam + shift) - 1.0

        def run():
            Rf = c.scatter(np.asarray(R, np.float64), broadcast=True, hash=False)
            parts = [
                c.submit(_ut_r, self.U[b], Rf, r0, r1, pure=False)
                for b, (r0, r1) in enumerate(bands)
            ]
            wait(parts)
            C = sum(c.gather(parts))
            zs = [
                c.submit(_apply_band, self.U[b], Rf, r0, r1, D, C, pure=False)
                for b, (r0, r1) in enumerate(bands)
            ]
            wait(zs)
            K.stats.waves += 2
            return np.concatenate(c.gather(zs))

        return _retrying(run, K.stats)


# ------------------------------------------------------------------------ the regression
def distributed_ridge(
    client,
    store,
    kernel: str,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    labels: np.ndarray,
    *,
    ridges: list[float],
    n_classes: int,
    val_fraction: float,
    seed: int,
    tol: float,
    max_iter: int,
    rank: int,
    band_bytes: int = 256 * 2**20,
    keep: bool | None = None,
):
    """Kernel ridge regression of a kernel store on a Dask cluster (validated arguments,
    see :func:`~.from_store.solve_store`): the ridge chosen on the same validation split as
    in core, then the fit on all train rows and the test predictions.

    Returns
    -------
    SolveReport
    """
    from .krr import VAL_TOL, _peak_rss, one_hot_targets
    from .linalg import check_converged, pcg
    from .report import SolveReport, _accuracy

    t_start = time.perf_counter()
    ks_chunk = _store_chunk(store)
    itemsize = _store_itemsize(store)
    K = BandedKernel(
        client, store.path, kernel, train_rows, itemsize=itemsize, band_bytes=band_bytes,
        keep=keep, align=ks_chunk,
    )  # fmt: skip
    n = K.n
    y = labels[train_rows]
    Y = one_hot_targets(y, n_classes)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    diag = K.diagonal()
    stages["load"] = time.perf_counter() - t0
    iterations: list[int] = []

    def solve(rhs, shift, nys, mask, tol_):
        x, info = pcg(
            None, rhs, shift, precondition=lambda R: nys.apply(R, shift), tol=tol_,
            max_iter=max_iter, what=f"{kernel} train block",
            matmul=lambda P, s: K.matmul(P, s, mask=mask),
        )  # fmt: skip
        check_converged(info, "cg-distributed", tol_, "raise max_iter, the rank or the ridge")
        iterations.append(info.iterations)
        return x, info

    val_acc = val_mse = val = None
    n_val = 0
    if len(ridges) > 1:
        t0 = time.perf_counter()
        n_val = max(1, int(round(val_fraction * n)))
        if n - n_val < 1:
            raise InputError(f"too few training rows ({n}) for a validation split")
        val = np.sort(np.random.default_rng(seed).choice(n, size=n_val, replace=False))
        mask = np.ones(n, dtype=bool)
        mask[val] = False
        nys = DistributedNystrom(K, rank, seed=seed, mask=mask)
        trace_fit = float(diag[mask].sum())
        Yf = np.where(mask[:, None], Y, 0.0)
        val_acc, val_mse = [], []
        for lam in ridges:
            s = lam * trace_fit / (n - n_val)
            x, _ = solve(Yf, s, nys, mask, max(tol, VAL_TOL))
            pred = K.matmul(x)[val]
            val_acc.append(_accuracy(pred, y[val]))
            val_mse.append(float(np.mean((pred - Y[val]) ** 2)))
        best = max(range(len(ridges)), key=lambda i: (val_acc[i], -val_mse[i]))
        ridge = ridges[best]
        del nys
        stages["validation"] = time.perf_counter() - t0
    else:
        ridge = ridges[0]
    t0 = time.perf_counter()
    trace = float(diag.sum())
    shift = ridge * trace / n
    nys = DistributedNystrom(K, rank, seed=seed)
    n_waves = K.stats.waves
    product_calls = len(K.stats.product_seconds)
    alpha, info = solve(Y, shift, nys, None, tol)
    fit_products = K.stats.product_seconds[product_calls:]
    stages["fit"] = time.perf_counter() - t0
    predictions = accuracy = None
    if test_rows.size:
        t0 = time.perf_counter()
        T = BandedKernel(
            client, store.path, kernel, test_rows, cols=train_rows, itemsize=itemsize,
            band_bytes=band_bytes, keep=False, align=ks_chunk,
        )  # fmt: skip
        predictions = T.matmul(alpha)
        stages["predict"] = time.perf_counter() - t0
        accuracy = _accuracy(predictions, labels[test_rows])
    train_pred = Y - shift * alpha
    detail = {
        "bands": len(K.bands),
        "band_rows": K.bands[0][1] - K.bands[0][0],
        "bands_kept_in_memory": K.keep,
        "train_block_bytes": K.total_bytes,
        "nystrom_rank": nys.rank,
        "nystrom_seconds": nys.seconds,
        "waves": K.stats.waves,
        "fit_waves": K.stats.waves - n_waves,
        "wave_retries": K.stats.retries,
        "seconds_per_iteration": (stages["fit"] - nys.seconds) / max(1, info.iterations),
        "product_seconds_median": float(np.median(fit_products)) if fit_products else None,
        "bytes_read_per_iteration": 0 if K.keep else K.total_bytes,
        "iterations_per_solve": iterations,
        "workers": len(client.scheduler_info()["workers"]),
    }
    K.release()
    return SolveReport(
        kernel=kernel, method="cg-distributed", method_requested="cg",
        method_reason="a Dask client or cluster was given", ridge=ridge, shift=shift,
        ridges=ridges, val_accuracy=val_acc, val_mse=val_mse, accuracy=accuracy,
        train_accuracy=_accuracy(train_pred, y), n_train=n, n_fit=n - n_val, n_val=n_val,
        n_test=int(test_rows.size), n_classes=n_classes, residual=info.residual,
        iterations=info.iterations, converged=info.converged, tol=tol, memory_limit=0,
        peak_rss=_peak_rss(), seconds=time.perf_counter() - t_start, stages=stages,
        detail=detail, alpha=alpha, predictions=predictions, val_rows=val,
    )  # fmt: skip


def _store_chunk(store) -> int:
    geom = getattr(store, "geometry", None)
    return int(geom.chunk) if geom is not None else int(store.tile)


def _store_itemsize(store) -> int:
    return int(store.dtype.itemsize)
