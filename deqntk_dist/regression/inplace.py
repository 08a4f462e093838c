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

import numba as nb
import numpy as np

from ..errors import NotPositiveDefiniteError, SolveError
from .blas import ColumnMajor
from .dense import _mirror_lower
from .linalg import factored_pcg

__all__ = ["InplaceSolver", "inplace_bytes"]

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


# ------------------------------------------------------------------------ factorization
def _restore(A: np.ndarray, m: int, d: np.ndarray, shift) -> None:
    """Upper triangle of ``A[:m, :m]`` from its lower one, diagonal ``d[:m] + shift``."""
    view = A[:m, :m]
    _mirror_lower(view, 64)
    np.einsum("ii->i", view)[:] = d[:m] + shift


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
    (from :func:`.dense.load_symmetric`), one float32 (or float64) in-place factorization per
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
        _restore(self.A, self.m, self.d_native, self.A.dtype.type(pshift))
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
