"""In-place route: the train block held once in memory, factored over itself.

One ``n`` x ``n`` array ``A`` (the store's dtype, its values exactly) holds everything:

- its strict lower triangle (C order, ``A[i, j]`` for ``j < i``) keeps the kernel, never
  written after loading, and with a saved copy of the diagonal it gives the exact float64
  products of the CG refinement;
- its upper triangle and diagonal hold the Cholesky factor: they are the *lower* triangle
  of the column-major view, where a right-looking blocked factorization runs with direct
  BLAS calls on sub-blocks (:mod:`.blas`).  Before each factorization the upper triangle is
  restored from the lower one.

So the route needs ``itemsize * n^2`` bytes, a third of the in-memory route's ``12 n^2``:
a 60,000-row float32 train block (14.4 GB) is solved in memory on a 24 GB machine.  The
factor is a float32 preconditioner of float64 CG (as in ``cholesky-dense``), so the final
fit keeps the float64 residual guarantee.

Ridge selection factors the *leading* block: the train block is loaded in the order fit
rows, then validation rows, so the fit block is ``A[:n_fit, :n_fit]`` and the validation x
fit block ``A[n_fit:, :n_fit]`` lies in the kept lower triangle.

Platform hazard (DESIGN §5): no LAPACK / syrk call sees more than one ``block`` x
``block`` diagonal block; the large updates are GEMMs.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numba as nb
import numpy as np

from ..errors import InputError, NotPositiveDefiniteError
from .blas import ColumnMajor
from .linalg import _bounds, _read, factored_pcg

__all__ = ["InplaceSolver", "inplace_bytes", "load_symmetric"]

#: Fixed groups of row blocks in the symmetric product: the summation order (and so the
#: bits) does not depend on the number of threads.
_GROUPS = 8
_ROWS = 4  # rows sharing each pass of the symmetric product (fixed: unrolled by hand)


def inplace_bytes(n: int, itemsize: int = 4, n_classes: int = 10) -> int:
    """Peak bytes of the in-place route: the train block, two read bands in flight (each
    with the reader's decoding space), the product's scatter accumulators and the CG
    vectors."""
    band = 4 * min(n, 1024) * n * itemsize
    return int(itemsize * n * n + band + (_GROUPS + 16) * 8 * n * n_classes)


# ------------------------------------------------------------------------------ loading
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


# ------------------------------------------------------------------------ factorization
@nb.njit(parallel=True, cache=True, nogil=True)
def _restore(A, m, d, shift, B):
    """Upper triangle of ``A[:m, :m]`` from its lower one, diagonal ``d + shift``."""
    nt = (m + B - 1) // B
    for tj in nb.prange(nt):
        j0, j1 = tj * B, min(m, (tj + 1) * B)
        for i0 in range(0, j1, B):
            for i in range(i0, min(m, i0 + B)):
                for j in range(max(j0, i + 1), j1):
                    A[i, j] = A[j, i]
        for j in range(j0, j1):
            A[j, j] = d[j] + shift


def _factor(cm: ColumnMajor, m: int, block: int) -> int:
    """Right-looking blocked lower Cholesky of the leading ``m`` x ``m`` block of the
    column-major view, in place; returns 0 or the 1-based failing row."""
    for k0 in range(0, m, block):
        kb = min(block, m - k0)
        info = cm.potrf(k0, kb)
        if info:
            return k0 + info
        r0 = k0 + kb
        if r0 == m:
            break
        cm.panel_divide(k0, kb, r0, m - r0)
        for j0 in range(r0, m, block):
            jb = min(block, m - j0)
            cm.syrk_lower(j0, jb, k0, kb)
            if j0 + jb < m:
                cm.gemm_update(j0 + jb, m - j0 - jb, j0, jb, k0, kb)
    return 0


# -------------------------------------------------------------------- symmetric product
@nb.njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _symv_lower(A, m, d, Xt, out, S):
    """``out = (L + L^T + diag d) @ Xt.T`` in float64 for ``L`` the strict lower triangle
    of ``A[:m, :m]`` (float32 entries used exactly); ``S`` (groups, c, m) scatter space.

    Rows go in quads (four rows share each load of ``x`` and of the scatter slice), quads
    round-robin over a fixed number of groups, each with its own scatter row."""
    c = Xt.shape[0]
    nq = (m + _ROWS - 1) // _ROWS
    for g in nb.prange(_GROUPS):
        S[g] = 0.0
        for quad in range(g, nq, _GROUPS):
            i0 = quad * _ROWS
            if i0 + _ROWS <= m:
                for k in range(c):
                    x = Xt[k]
                    Sg = S[g, k]
                    x0, x1, x2, x3 = x[i0], x[i0 + 1], x[i0 + 2], x[i0 + 3]
                    s0 = s1 = s2 = s3 = 0.0
                    for j in range(i0):
                        a0 = np.float64(A[i0, j])
                        a1 = np.float64(A[i0 + 1, j])
                        a2 = np.float64(A[i0 + 2, j])
                        a3 = np.float64(A[i0 + 3, j])
                        xj = x[j]
                        s0 += a0 * xj
                        s1 += a1 * xj
                        s2 += a2 * xj
                        s3 += a3 * xj
                        Sg[j] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                    out[i0, k] = s0
                    out[i0 + 1, k] = s1
                    out[i0 + 2, k] = s2
                    out[i0 + 3, k] = s3
                i1 = i0 + _ROWS
            else:
                for i in range(i0, m):
                    for k in range(c):
                        out[i, k] = 0.0
                i1 = m
            for i in range(i0, i1):  # the triangle inside the quad, and the diagonal
                for k in range(c):
                    x = Xt[k]
                    acc = np.float64(d[i]) * x[i]
                    for j in range(i0, i):
                        a = np.float64(A[i, j])
                        acc += a * x[j]
                        S[g, k, j] += a * x[i]
                    if i1 == m and i0 + _ROWS > m:
                        for j in range(i0):
                            a = np.float64(A[i, j])
                            acc += a * x[j]
                            S[g, k, j] += a * x[i]
                    out[i, k] += acc


# ----------------------------------------------------------------------------- solver
class InplaceSolver:
    """Solves ``(K + shift I) X = B`` for ``K`` the leading ``m`` x ``m`` block of ``A``
    (from :func:`load_symmetric`), one float32 (or float64) in-place factorization per
    ridge, float64 CG refinement to ``tol``.

    Parameters
    ----------
    A : ndarray, shape (n, n), C-contiguous, float32 or float64; shared, factored in place
    m : int
        Order of the leading block solved on (``m <= n``).
    diag : ndarray, shape (>= m,)
        The kernel's diagonal (``A``'s own is overwritten by the factor); float64.
    """

    def __init__(
        self, A: np.ndarray, m: int, diag: np.ndarray, *, tol: float, max_iter: int,
        block: int, what: str,
    ):  # fmt: skip
        self.A, self.m, self.tol, self.max_iter, self.what = A, m, tol, max_iter, what
        self.block = max(256, int(block))
        self.cm = ColumnMajor(A)
        self.d = np.ascontiguousarray(diag[:m], dtype=np.float64)
        self.d_native = self.d.astype(A.dtype)
        self.trace = float(self.d.sum())
        if not self.trace > 0:
            from ..errors import SolveError

            raise SolveError(f"{what} has a non-positive trace {self.trace:.6g}; not a kernel")
        self._S = np.empty((_GROUPS, 0, m))

    def shift(self, ridge: float) -> float:
        return ridge * self.trace / self.m

    def matmul(self, P: np.ndarray, shift: float = 0.0) -> np.ndarray:
        """``(K + shift I) @ P`` in float64, from the kept lower triangle."""
        P2 = np.asarray(P, dtype=np.float64).reshape(self.m, -1)
        Xt = np.ascontiguousarray(P2.T)
        c = Xt.shape[0]
        if self._S.shape[1] != c:
            self._S = np.empty((_GROUPS, c, self.m))
        out = np.empty((self.m, c))
        _symv_lower(self.A, self.m, self.d, Xt, out, self._S)
        out += self._S.sum(axis=0).T
        if shift:
            out += shift * P2
        return out.reshape(np.shape(P))

    def _factorize(self, pshift: float):
        t0 = time.perf_counter()
        _restore(self.A, self.m, self.d_native, self.A.dtype.type(pshift), 64)
        failed = _factor(self.cm, self.m, self.block)
        if failed:
            raise NotPositiveDefiniteError(
                f"{self.what} + {pshift:.3g} I is not positive definite in "
                f"{self.A.dtype.name} (Cholesky failed at row {failed - 1} of {self.m})"
            )
        seconds = time.perf_counter() - t0
        dtype = self.A.dtype

        def solve(R: np.ndarray) -> np.ndarray:
            z = np.asfortranarray(np.asarray(R, dtype=np.float64).reshape(self.m, -1))
            scale = np.abs(z).max(axis=0)
            scale[scale == 0] = 1.0
            z = np.asfortranarray(z / scale, dtype=dtype)  # away from float32 overflow
            self.cm.solve_lower(self.m, z, self.block)
            return (z.astype(np.float64) * scale).reshape(np.shape(R))

        return solve, {"factor_seconds": seconds}

    def solve(self, ridge: float, B: np.ndarray, *, tol: float | None = None):
        """The solution for ``ridge`` (relative), refined to ``tol`` (default the solver's).

        Returns
        -------
        _Solved
        """
        from .krr import _Solved

        tol = self.tol if tol is None else tol
        x, info, detail = factored_pcg(
            self._factorize, B, self.shift(ridge), 1e-7 * self.trace / self.m,
            matmul=self.matmul, tol=tol, max_iter=self.max_iter, route="cholesky-inplace",
            what=self.what, ridge=ridge,
        )  # fmt: skip
        detail.update(factor_dtype=self.A.dtype.name, factor_bytes=0)
        return _Solved(x, info.residual, info.iterations, info.converged, detail)
