"""In-core route: the train block held in memory once, in float32 (the store's values
exactly), factored in float32 per ridge and refined in float64.

Every solve factors ``K + shift I`` in float32 and uses the factor as the preconditioner
of float64 conjugate gradients whose residuals come from the float32 entries in float64
arithmetic, so the result meets the float64 residual bound of the streamed routes at the
cost of a float32 factorization (half the memory traffic and twice the flops rate of
float64).  Below :data:`THREADED_POTRF_MAX` rows the factorization is LAPACK's threaded
``potrf`` on the whole matrix; above it the blocked factorization of :mod:`.linalg`, whose
LAPACK calls never see more than one block (DESIGN §5: threaded ``dpotrf`` crashed from
n ~ 17,000 and ``spotrf`` at 60,000 on these machines; both ran at 16,000).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba as nb
import numpy as np
import scipy.linalg

from ..errors import InputError, NotPositiveDefiniteError, SolveError
from .linalg import _bounds, _read, block_cholesky, check_converged, factored_pcg, pcg

__all__ = [
    "THREADED_POTRF_MAX",
    "DenseSolver",
    "NystromDenseSolver",
    "dense_bytes",
    "dense_matmul",
    "gather",
    "load_dense",
    "load_symmetric",
    "nystrom_dense_bytes",
]

#: Largest matrix factored by one threaded LAPACK ``potrf`` call (see the module docstring).
THREADED_POTRF_MAX = 12_000


def dense_bytes(n: int, itemsize: int = 4) -> int:
    """Peak bytes of the in-core route with a validation split: the train block and the fit
    block (``itemsize`` bytes per entry: the source's), the float32 factor work copy, the
    validation rows against the fit rows in float64; about ``12 n^2`` for a float32 source,
    ``17 n^2`` for float64."""
    return int((1.64 * itemsize + 2.56 + 1.28 + 1.0) * n * n)


def load_dense(K, block: int) -> np.ndarray:
    """The symmetric block source ``K`` as a C-contiguous array of its own precision
    (float32 for float32 sources, else float64: the values exactly), reading only its
    lower triangle in row bands (:func:`load_symmetric`; the upper triangle is mirrored).

    Returns
    -------
    ndarray, shape (n, n), float32 or float64
    """
    A = load_symmetric(K, block=block)
    _mirror_lower(A, 64)
    return A


@nb.njit(parallel=True, cache=True, nogil=True)
def _scatter_band(A, band, s, q):
    """``A[q[i], q[j]] = band[i - s, j]`` for the source rows ``i`` of the band, ``j <= i``;
    returns the number of non-finite values among them."""
    h = band.shape[0]
    bad = 0
    for r in nb.prange(h):
        qi = q[s + r]
        for j in range(s + r + 1):
            v = band[r, j]
            if not np.isfinite(v):
                bad += 1
            A[qi, q[j]] = v
    return bad


@nb.njit(parallel=True, cache=True, nogil=True)
def _complete_lower(A, p, B):
    """``A[a, b] = A[b, a]`` for ``b < a`` wherever ``p[a] < p[b]`` (the lower-triangle
    entries that :func:`_scatter_band` wrote above the diagonal), in ``B`` x ``B`` tiles."""
    n = A.shape[0]
    nt = (n + B - 1) // B
    for ta in nb.prange(nt):
        a0, a1 = ta * B, min(n, (ta + 1) * B)
        for b0 in range(0, a1, B):
            for a in range(a0, a1):
                pa = p[a]
                for b in range(b0, min(b0 + B, a)):
                    if pa < p[b]:
                        A[a, b] = A[b, a]


def load_symmetric(K, order: np.ndarray | None = None, *, block: int = 1024) -> np.ndarray:
    """The lower triangle of ``K[order][:, order]`` for a symmetric block source, in one
    C-contiguous array of the source's precision, reading only the lower triangle of ``K``
    in row bands (the next band is read while the last is placed).

    The strict upper triangle of the result is scratch (partly filled); the solver builds
    it from the lower one before each factorization.

    Parameters
    ----------
    K : block source, shape (n, n), symmetric
    order : int array, shape (n,), a permutation (default: the identity)

    Returns
    -------
    ndarray, shape (n, n), float32 for float32 sources, else float64

    Raises
    ------
    SolveError
        A band reads back with the wrong shape or holds non-finite values.
    """
    n = K.shape[0]
    dtype = np.float32 if np.dtype(getattr(K, "dtype", np.float64)) == np.float32 else np.float64
    p = np.arange(n) if order is None else np.asarray(order, dtype=np.int64)
    if p.shape != (n,) or not np.array_equal(np.sort(p), np.arange(n)):
        raise InputError(f"order must be a permutation of range({n})")
    q = np.empty(n, dtype=np.int64)
    q[p] = np.arange(n)
    A = np.empty((n, n), dtype=dtype)
    bounds = _bounds(n, block)

    def read(s: int, e: int) -> np.ndarray:
        band = np.asarray(K[s:e, 0:e])
        if band.shape != (e - s, e):
            _read(K, s, e, 0, e)  # raises with the shape in the message
        return np.ascontiguousarray(band, dtype=dtype)

    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(read, *bounds[0])
        for k, (s, e) in enumerate(bounds):
            band = nxt.result()
            if k + 1 < len(bounds):
                nxt = pool.submit(read, *bounds[k + 1])
            if _scatter_band(A, band, s, q):
                _read(K, s, e, 0, e)  # raises, naming the first non-finite entry
            del band
    if order is not None:
        _complete_lower(A, p, 64)
    return A


@nb.njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _matmul_f64(K, Xt, out):
    """``out = K @ Xt.T`` with every product and sum in float64 (K float32 or float64, read
    once, row by row; each output entry summed by one thread in a fixed order)."""
    n, m = K.shape
    c = Xt.shape[0]
    for i in nb.prange(n):
        for k in range(c):
            acc = 0.0
            x = Xt[k]
            for j in range(m):
                acc += np.float64(K[i, j]) * x[j]
            out[i, k] = acc


def dense_matmul(K: np.ndarray, X: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """``(K + shift I) @ X`` in float64 for an in-memory ``K`` (float32 entries are used
    exactly, without a float64 copy of the matrix; ``shift`` only for a square ``K``).

    Parameters
    ----------
    K : ndarray, shape (m, n), float32 or float64, rows contiguous (a view is not copied)
    X : ndarray, shape (n, c)

    Returns
    -------
    ndarray, shape (m, c), float64
    """
    X2 = np.asarray(X, dtype=np.float64).reshape(K.shape[1], -1)
    out = np.empty((K.shape[0], X2.shape[1]))
    if K.strides[1] != K.itemsize:  # rows must be contiguous; a row-sliced view is fine
        K = np.ascontiguousarray(K)
    _matmul_f64(K, np.ascontiguousarray(X2.T), out)
    if shift:
        out += shift * X2
    return out if X.ndim == 2 or K.shape[0] != K.shape[1] else out.reshape(np.shape(X))


@nb.njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _matmul_idx_f64(K, rows, Xt, out):
    """``out = K[rows][:, rows] @ Xt.T`` in float64, without gathering ``K``."""
    c = Xt.shape[0]
    m = rows.size
    for a in nb.prange(m):
        r = rows[a]
        for k in range(c):
            acc = 0.0
            x = Xt[k]
            for b in range(m):
                acc += np.float64(K[r, rows[b]]) * x[b]
            out[a, k] = acc


@nb.njit(parallel=True, cache=True, nogil=True)
def _gather(A, rows, cols, out):
    for a in nb.prange(rows.size):
        r = rows[a]
        for b in range(cols.size):
            out[a, b] = A[r, cols[b]]


def gather(A: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``A[np.ix_(rows, cols)]`` as a new C-contiguous array (in parallel)."""
    out = np.empty((rows.size, cols.size), dtype=A.dtype)
    _gather(A, np.asarray(rows, np.int64), np.asarray(cols, np.int64), out)
    return out


@nb.njit(parallel=True, cache=True, nogil=True)
def _mirror_lower(A, B):
    """``A[i, j] = A[j, i]`` for ``i < j``, in ``B`` x ``B`` blocks."""
    n = A.shape[0]
    nb_ = (n + B - 1) // B
    for bj in nb.prange(nb_):
        j0, j1 = bj * B, min(n, (bj + 1) * B)
        for i0 in range(0, j1, B):
            i1 = min(n, i0 + B)
            for i in range(i0, i1):
                for j in range(max(j0, i + 1), j1):
                    A[i, j] = A[j, i]


class DenseSolver:
    """Solves ``(K + shift I) X = B`` for an in-memory ``K`` (n, n; float32 or float64),
    one float32 factorization per ridge, float64 CG refinement to ``tol``."""

    def __init__(self, K: np.ndarray, *, tol: float, max_iter: int, block: int, what: str):
        self.K, self.tol, self.max_iter, self.block, self.what = K, tol, max_iter, block, what
        self.n = K.shape[0]
        self.trace = float(np.trace(K, dtype=np.float64))
        if not self.trace > 0:
            raise SolveError(f"{what} has a non-positive trace {self.trace:.6g}; not a kernel")
        self._work: np.ndarray | None = None

    def shift(self, ridge: float) -> float:
        return ridge * self.trace / self.n

    def _factor(self, pshift: float):
        """A float32 Cholesky factor of ``K + pshift I`` as a solve function."""
        if self.n > THREADED_POTRF_MAX:
            F = block_cholesky(self.K, pshift, dtype=np.float32, block=self.block, what=self.what)
            return F.solve, {"factor_seconds": F.seconds, "factor_bytes": F.nbytes}
        if self._work is None:
            self._work = np.empty(self.K.shape, dtype=np.float32)
        work = self._work
        np.copyto(work, self.K, casting="same_kind")
        work[np.diag_indices(self.n)] += np.float32(pshift)
        try:
            c = scipy.linalg.cho_factor(work, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError as exc:
            raise NotPositiveDefiniteError(
                f"{self.what} + {pshift:.3g} I is not positive definite in float32 ({exc})"
            ) from None

        def solve(R: np.ndarray) -> np.ndarray:
            out = scipy.linalg.cho_solve(c, R.astype(np.float32), check_finite=False)
            return out.astype(np.float64)

        return solve, {"factor_bytes": work.nbytes}

    def solve(self, ridge: float, B: np.ndarray, *, tol: float | None = None):
        """The solution for ``ridge`` (relative), refined to ``tol`` (default the solver's).

        Returns
        -------
        _Solved
        """
        import time

        from .krr import _Solved

        tol = self.tol if tol is None else tol
        t0 = time.perf_counter()

        def factor(pshift: float):
            solve, detail = self._factor(pshift)
            detail.setdefault("factor_seconds", time.perf_counter() - t0)
            return solve, detail

        x, info, detail = factored_pcg(
            factor, B, self.shift(ridge), 1e-7 * self.trace / self.n,
            matmul=lambda P, shift: dense_matmul(self.K, P, shift), tol=tol,
            max_iter=self.max_iter, route="cholesky-dense", what=self.what, ridge=ridge,
        )  # fmt: skip
        detail.update(factor_dtype="float32")
        return _Solved(x, info.residual, info.iterations, info.converged, detail)


def nystrom_dense_bytes(n: int, rank: int, itemsize: int = 4) -> int:
    """Peak bytes of the in-memory Nyström route: the train block and ~6 ``n x rank``
    float64 arrays of the sketch and its factors."""
    return int(itemsize * n * n + 6 * 8 * n * rank)


class NystromDenseSolver:
    """Solves ``(K + shift I) X = B`` for an in-memory ``K`` by float64 CG preconditioned
    with a randomised Nyström approximation (rank ``rank``) sketched once in float32: no
    factorization of ``K``, one in-memory pass per iteration."""

    def __init__(
        self,
        K: np.ndarray,
        *,
        rank: int,
        seed: int,
        tol: float,
        max_iter: int,
        what: str,
        rows: np.ndarray | None = None,
    ):
        from .linalg import nystrom_preconditioner

        self.K, self.tol, self.max_iter, self.what = K, tol, max_iter, what
        # ``rows``: solve on ``K[rows][:, rows]`` without a copy of that block
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.n = K.shape[0] if self.rows is None else self.rows.size
        diag = np.diagonal(K) if rows is None else np.diagonal(K)[self.rows]
        self.trace = float(diag.sum(dtype=np.float64))
        if not self.trace > 0:
            raise SolveError(f"{what} has a non-positive trace {self.trace:.6g}; not a kernel")
        single = K.dtype == np.float32

        def sketch(omega: np.ndarray) -> np.ndarray:
            om = omega.astype(K.dtype)
            if self.rows is None:  # a plain threaded GEMM (never syrk, DESIGN §5)
                return (K @ om).astype(np.float64)
            out = np.empty(omega.shape)
            for s0 in range(0, self.n, 2048):  # row bands of the block, gathered
                band = gather(K, self.rows[s0 : s0 + 2048], self.rows)
                out[s0 : s0 + band.shape[0]] = band @ om
            return out

        eps = float(np.finfo(np.float32).eps) if single else None
        self.nys = nystrom_preconditioner(self.n, rank, seed=seed, sketch=sketch, eps=eps)

    def _matmul(self, P: np.ndarray, shift: float) -> np.ndarray:
        if self.rows is None:
            return dense_matmul(self.K, P, shift)
        out = np.empty(P.shape)
        _matmul_idx_f64(self.K, self.rows, np.ascontiguousarray(P.T), out)
        return out + shift * P

    def shift(self, ridge: float) -> float:
        return ridge * self.trace / self.n

    def solve(self, ridge: float, B: np.ndarray, *, tol: float | None = None):
        from .krr import _Solved

        tol = self.tol if tol is None else tol
        s = self.shift(ridge)
        nys = self.nys
        x, info = pcg(
            None,
            B,
            s,
            precondition=lambda R: nys.apply(R, s),
            tol=tol,
            max_iter=self.max_iter,
            what=self.what,
            matmul=self._matmul,
        )
        hint = "raise max_iter, the rank or the ridge, or use method 'cholesky'"
        check_converged(info, "nystrom-dense", tol, hint, ridge)
        detail = {
            "nystrom_rank": nys.rank,
            "nystrom_seconds": nys.seconds,
            "cg_seconds": info.seconds,
        }
        return _Solved(x, info.residual, info.iterations, info.converged, detail)
