"""Out-of-core symmetric positive definite solvers for kernel ridge regression.

Every routine takes the matrix as a *block source*: any object with a 2-D ``shape`` that
answers ``K[r0:r1, c0:c1]`` with something :func:`numpy.asarray` can read (a numpy array, a
``zarr.Array``, :class:`IndexedBlocks`), and reads it in row bands, so a kernel store is
streamed rather than loaded. Only the lower triangle ``K[i, :i + 1]`` (plus the diagonal
blocks, which are read whole) is ever read: the source must be symmetric.

The system solved is ``(K + shift I) X = B`` with float64 right-hand sides and solution.

Platform hazard (DESIGN §5): threaded OpenBLAS dsyrk / dpotrf segfault from n ~ 17,000, so
nothing here calls LAPACK on more than one ``block`` x ``block`` matrix, and never as
``A @ A.T`` (which numpy routes to syrk); large products are plain GEMMs.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
from threadpoolctl import ThreadpoolController

from ..errors import InputError, NotPositiveDefiniteError, SolveError

__all__ = [
    "CholeskyFactor",
    "IndexedBlocks",
    "NystromPreconditioner",
    "SolveInfo",
    "as_block_source",
    "band_rows",
    "block_cholesky",
    "diagonal",
    "factored_pcg",
    "nystrom_preconditioner",
    "pcg",
    "sym_matmul",
]

_CONTROLLER: ThreadpoolController | None = None
_SYRK_SPLIT = 4096  # column chunk for the diagonal-block update (avoids numpy's syrk path)
_CAST_COLS = 8192  # column chunk of the float64 copies in sym_matmul


def _blas_single_thread():
    """Context manager limiting BLAS to one thread (for the small LAPACK calls)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


# ---------------------------------------------------------------------------- block sources
class IndexedBlocks:
    """Lazy view ``K[rows][:, cols]`` of a block source, for sorted index arrays.

    Each read fetches the contiguous band spanned by the requested indices from the
    underlying source and selects from it, so sorted (e.g. train-minus-validation) subsets
    stream in row bands like the full matrix.

    Parameters
    ----------
    source : block source, shape (N, M)
    rows : int array, shape (n,), strictly increasing
    cols : int array, shape (m,), strictly increasing
    """

    def __init__(self, source, rows, cols):
        self.source = source
        self.rows = _sorted_index("rows", rows, source.shape[0])
        self.cols = _sorted_index("cols", cols, source.shape[1])
        self.shape = (len(self.rows), len(self.cols))
        self.dtype = np.dtype(getattr(source, "dtype", np.float64))
        self.block_rows = getattr(source, "block_rows", None) or _chunk_rows(source)

    def __getitem__(self, key):
        rs, cs = key
        r = self.rows[rs]
        c = self.cols[cs]
        if r.size == 0 or c.size == 0:
            return np.zeros((r.size, c.size), dtype=self.dtype)
        r0, r1, c0, c1 = int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1
        band = np.asarray(self.source[r0:r1, c0:c1])
        if r1 - r0 != r.size:
            band = band[r - r0]
        if c1 - c0 != c.size:
            band = band[:, c - c0]
        return band


def _sorted_index(name: str, idx, bound: int) -> np.ndarray:
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx.size and (idx[0] < 0 or idx[-1] >= bound or np.any(np.diff(idx) <= 0)):
        raise InputError(
            f"{name} must be strictly increasing indices in [0, {bound}), got "
            f"{idx.size} indices from {idx.min()} to {idx.max()}"
        )
    return idx


def _chunk_rows(source) -> int | None:
    chunks = getattr(source, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == 2 and isinstance(chunks[0], int):
        return int(chunks[0])
    return None


def as_block_source(K, *, name: str = "K"):
    """Check that ``K`` is a square 2-D block source and return it (numpy lists converted).

    Raises
    ------
    InputError
        Not 2-D, not square, empty or not a floating-point dtype.
    """
    if not hasattr(K, "shape") or not hasattr(K, "__getitem__"):
        K = np.asarray(K)
    shape = tuple(K.shape)
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
        raise InputError(f"{name} must be a non-empty square 2-D matrix, got shape {shape}")
    dtype = np.dtype(getattr(K, "dtype", np.float64))
    if dtype.kind != "f":
        raise InputError(f"{name} must have a floating-point dtype, got {dtype}")
    return K


def _bounds(n: int, block: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + block)) for s in range(0, n, block)]


def band_rows(K, most: int = 1024) -> int:
    """Rows of a band read whole into memory: a multiple of ``K``'s chunk rows up to
    ``most`` (bands that cut chunks decode them twice), else ``most`` (a store tile can be
    1.6 GB wide)."""
    rows = getattr(K, "block_rows", None) or _chunk_rows(K)
    return int(rows) * (most // int(rows)) if rows and rows <= most else most


def _default_block(K, block: int | None) -> int:
    if block is not None:
        if block < 1:
            raise InputError(f"block must be a positive number of rows, got {block}")
        return int(block)
    rows = getattr(K, "block_rows", None) or _chunk_rows(K)
    if rows:
        return int(rows) * max(1, 1024 // int(rows)) if rows < 1024 else int(rows)
    return 2048


def _read(K, r0: int, r1: int, c0: int, c1: int, what: str = "K") -> np.ndarray:
    """Read a block and check that it is finite."""
    a = np.asarray(K[r0:r1, c0:c1])
    if a.shape != (r1 - r0, c1 - c0):
        raise SolveError(f"{what}[{r0}:{r1}, {c0}:{c1}] read back with shape {a.shape}")
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise SolveError(
            f"{what} has non-finite values in the block rows {r0}:{r1}, cols {c0}:{c1} "
            f"(first at ({r0 + bad[0]}, {c0 + bad[1]}): {a[tuple(bad)]})"
        )
    return a


def diagonal(K, *, block: int | None = None) -> np.ndarray:
    """Diagonal of a block source, float64 shape (n,), reading only the diagonal blocks."""
    K = as_block_source(K)
    block = _default_block(K, block)
    n = K.shape[0]
    return np.concatenate(
        [np.diagonal(_read(K, s, e, s, e)).astype(np.float64) for s, e in _bounds(n, block)]
    )


def sym_matmul(K, X: np.ndarray, shift: float = 0.0, *, block: int | None = None) -> np.ndarray:
    """``(K + shift I) @ X`` in float64, reading only the lower triangle of ``K``.

    Parameters
    ----------
    K : block source, shape (n, n), symmetric
    X : ndarray, shape (n, c) or (n,)
    shift : float

    Returns
    -------
    ndarray, float64, shape of ``X``
    """
    K = as_block_source(K)
    block = _default_block(K, block)
    X = np.asarray(X, dtype=np.float64)
    vec = X.ndim == 1
    X2 = X.reshape(X.shape[0], -1)
    n = K.shape[0]
    if X2.shape[0] != n:
        raise InputError(f"X must have {n} rows to multiply K, got {X2.shape[0]}")
    out = shift * X2
    # skinny products are memory bound: one BLAS thread is faster (4x on a busy machine)
    with _blas_single_thread() if X2.shape[1] <= 64 else contextlib.nullcontext():
        for s, e in _bounds(n, block):
            band = _read(K, s, e, 0, e)
            for c0 in range(0, e, _CAST_COLS):  # float64 copies of bounded size
                c1 = min(e, c0 + _CAST_COLS)
                sub = band[:, c0:c1].astype(np.float64)
                out[s:e] += sub @ X2[c0:c1]
                if c0 < s:
                    m = min(c1, s)
                    out[c0:m] += (X2[s:e].T @ sub[:, : m - c0]).T
    return out.reshape(X.shape) if vec else out


# ------------------------------------------------------------------------ blocked Cholesky
@dataclass
class CholeskyFactor:
    """Lower Cholesky factor of ``K + shift I`` stored as packed block rows.

    ``rows[i]`` holds ``L[s_i:e_i, 0:e_i]`` (the strictly upper part of its diagonal block
    is zero), so the factor takes ``n (n + block) / 2`` entries of ``dtype``.
    """

    n: int
    block: int
    shift: float
    dtype: np.dtype
    rows: list = field(repr=False)
    seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        return int(sum(r.nbytes for r in self.rows))

    def solve(self, B: np.ndarray) -> np.ndarray:
        """``(L L^T)^{-1} B`` computed in the factor's dtype; returns float64, shape of B."""
        B = np.asarray(B)
        vec = B.ndim == 1
        z = B.reshape(self.n, -1).astype(self.dtype)
        scale = np.abs(z).max(axis=0)
        scale[scale == 0] = 1.0
        z /= scale  # keeps float32 solves away from overflow / underflow
        bounds = _bounds(self.n, self.block)
        with _blas_single_thread():
            self._substitute(z, bounds)
        out = z.astype(np.float64) * scale
        return out.reshape(B.shape) if vec else out

    def _substitute(self, z: np.ndarray, bounds) -> None:
        """Forward then backward substitution in place (``z`` of the factor's dtype)."""
        for i, (s, e) in enumerate(bounds):
            R = self.rows[i]
            if s:
                z[s:e] -= R[:, :s] @ z[:s]
            z[s:e] = scipy.linalg.solve_triangular(
                R[:, s:e], z[s:e], lower=True, check_finite=False
            )
        for i in range(len(bounds) - 1, -1, -1):
            s, e = bounds[i]
            R = self.rows[i]
            z[s:e] = scipy.linalg.solve_triangular(
                R[:, s:e], z[s:e], lower=True, trans="T", check_finite=False
            )
            if s:
                z[:s] -= (z[s:e].T @ R[:, :s]).T


def block_cholesky(
    K, shift: float = 0.0, *, dtype=np.float64, block: int | None = None, what: str = "K"
) -> CholeskyFactor:
    """Cholesky factor of ``K + shift I``, streaming the lower triangle once (up-looking).

    Row band ``i`` is read, updated with GEMMs against the finished bands ``j < i``,
    divided by the diagonal factors (via their explicit small triangular inverses, again a
    GEMM), and its diagonal block factored by a ``block``-sized LAPACK potrf on one thread.

    Parameters
    ----------
    K : block source, shape (n, n), symmetric
    shift : float
        Added to the diagonal.
    dtype : float32 or float64
        Precision of the factor (float32 halves its memory; use it as a preconditioner).
    block : int, optional
        Band height (default: the source's chunk rows, at least 1024, else 2048).

    Returns
    -------
    CholeskyFactor

    Raises
    ------
    SolveError
        ``K + shift I`` is not positive definite in ``dtype`` (potrf failure), or ``K``
        holds non-finite values.
    """
    K = as_block_source(K, name=what)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputError(f"dtype must be float32 or float64, got {dtype}")
    block = _default_block(K, block)
    n = K.shape[0]
    t0 = time.perf_counter()
    bounds = _bounds(n, block)
    potrf, trtri = scipy.linalg.lapack.get_lapack_funcs(("potrf", "trtri"), dtype=dtype)
    rows: list[np.ndarray] = []
    inverses: list[np.ndarray] = []
    for i, (s, e) in enumerate(bounds):
        R = _read(K, s, e, 0, e, what).astype(dtype)  # a fresh, C-contiguous copy
        for j in range(i):
            sj, ej = bounds[j]
            if sj:
                R[:, sj:ej] -= R[:, :sj] @ rows[j][:, :sj].T
            R[:, sj:ej] = R[:, sj:ej] @ inverses[j].T
        D = R[:, s:e]
        for c0 in range(0, s, _SYRK_SPLIT):
            X = R[:, c0 : min(s, c0 + _SYRK_SPLIT)]
            D -= X @ X.copy().T  # distinct buffers: GEMM, not syrk
        D = 0.5 * (D + D.T)
        D[np.diag_indices_from(D)] += dtype.type(shift)
        with _blas_single_thread():
            L, info = potrf(D, lower=1, clean=1, overwrite_a=1)
            if info > 0:
                raise NotPositiveDefiniteError(
                    f"{what} + shift I is not positive definite in {dtype.name} (Cholesky "
                    f"failed at row {s + info - 1} of {n}, shift {shift:.6g}); the kernel is "
                    "indefinite or the ridge is too small for this precision"
                )
            if info < 0:  # pragma: no cover - argument error inside LAPACK
                raise SolveError(f"LAPACK potrf argument error {info}")
            Linv, info = trtri(L, lower=1)
            if info != 0:  # pragma: no cover - cannot happen after a successful potrf
                raise SolveError(f"triangular inverse failed ({info}) at row band {s}:{e}")
        R[:, s:e] = L
        rows.append(R)
        inverses.append(np.tril(Linv))
    return CholeskyFactor(
        n=n,
        block=block,
        shift=float(shift),
        dtype=dtype,
        rows=rows,
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------- Nyström preconditioner
@dataclass
class NystromPreconditioner:
    """Randomised Nyström approximation ``K ~ U diag(lam) U^T`` (Frangella, Tropp & Udell).

    ``apply(R, shift)`` is the inverse of the preconditioner for ``K + shift I``:
    ``(lam_r + shift) U (lam + shift)^{-1} U^T R + R - U U^T R``.
    """

    U: np.ndarray = field(repr=False)
    lam: np.ndarray = field(repr=False)
    rank: int = 0
    seconds: float = 0.0

    def apply(self, R: np.ndarray, shift: float) -> np.ndarray:
        if self.rank == 0:
            return R.copy()
        UR = self.U.T @ R
        floor = self.lam[-1] + shift
        return self.U @ ((floor / (self.lam + shift))[:, None] * UR - UR) + R


def nystrom_preconditioner(
    K, rank: int, *, seed: int = 0, block: int | None = None, sketch=None, eps: float | None = None
) -> NystromPreconditioner:
    """Rank-``rank`` randomised Nyström approximation of a PSD block source.

    One streaming pass ``K @ Omega`` (float64), then small dense algebra in memory
    ``O(n * rank)``.  ``sketch``, a callable ``Omega -> K @ Omega``, replaces the pass (e.g.
    an in-memory float32 product; ``K`` is then only its order ``n``); ``eps`` is its
    relative precision (default float64's).
    """
    if sketch is None:
        K = as_block_source(K)

        def sketch(omega):
            return sym_matmul(K, omega, block=block)

    n = K if isinstance(K, int) else K.shape[0]
    rank = int(min(max(rank, 0), n))
    t0 = time.perf_counter()
    if rank == 0:
        return NystromPreconditioner(U=np.zeros((n, 0)), lam=np.zeros(0), rank=0)
    rng = np.random.default_rng(seed)
    # threaded LAPACK QR / SVD crawl on a busy machine (thread sync in level-2 BLAS)
    with _blas_single_thread():
        omega, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    Y = sketch(omega)
    eps = np.finfo(np.float64).eps if eps is None else eps
    nu = np.sqrt(n) * eps * np.linalg.norm(Y)  # a stabilising shift above the sketch's noise
    Y += nu * omega
    core = omega.T @ Y
    core = 0.5 * (core + core.T)
    with _blas_single_thread():
        w, V = np.linalg.eigh(core)
        keep = w > w.max() * 1e-12
        B = Y @ (V[:, keep] / np.sqrt(w[keep]))
        del Y, omega
        U, sig, _ = np.linalg.svd(B, full_matrices=False)
    lam = np.maximum(sig**2 - nu, 0.0)
    return NystromPreconditioner(
        U=U, lam=lam, rank=int(keep.sum()), seconds=time.perf_counter() - t0
    )


#: Float32 factor shift escalations (x10 each) before a factorization failure is final.
MAX_FACTOR_TRIES = 6


def factor_escalating(factor, shift: float, floor: float):
    """``(factor(pshift), pshift)`` for the first ``pshift`` that factors, starting at
    ``shift`` and multiplying ``max(pshift, floor)`` by 10 after each
    :class:`NotPositiveDefiniteError` (:data:`MAX_FACTOR_TRIES` tries in all).

    A float32 factor may fail where float64 would not: a more shifted matrix is factored
    and the float64 CG it preconditions corrects the difference.
    """
    pshift = shift
    for tries in range(1, MAX_FACTOR_TRIES + 1):
        try:
            return factor(pshift), pshift
        except NotPositiveDefiniteError:
            if tries == MAX_FACTOR_TRIES:
                raise
            pshift = max(pshift, floor) * 10
    raise AssertionError("unreachable")


def factored_pcg(factor, B: np.ndarray, shift: float, floor: float, *, matmul, tol: float,
                 max_iter: int, route: str, what: str, ridge: float | None = None):  # fmt: skip
    """Solve ``(K + shift I) X = B`` by float64 CG preconditioned with a (float32) factor,
    started from the factor's own solution.

    Parameters
    ----------
    factor : callable ``pshift -> (solve, detail)``
        A factorization of ``K + pshift I``; escalated by :func:`factor_escalating`.
    matmul : callable ``(P, shift) -> (K + shift I) P`` in float64

    Returns
    -------
    X : ndarray, float64, shape of ``B``
    info : SolveInfo
    detail : dict
        The factor's detail with ``preconditioner_shift`` and ``cg_seconds``.
    """
    (solve, detail), pshift = factor_escalating(factor, shift, floor)
    x, info = pcg(
        None, B, shift, precondition=solve, x0=solve(B), tol=tol, max_iter=max_iter,
        what=what, matmul=matmul,
    )  # fmt: skip
    check_converged(info, route, tol, "raise max_iter or the ridge", ridge)
    detail.update(preconditioner_shift=pshift, cg_seconds=info.seconds)
    return x, info, detail


def check_converged(info: SolveInfo, route: str, tol: float, hint: str, ridge=None) -> None:
    """Raise :class:`SolveError` when CG stopped above ``tol`` and above 1e-8 (the float64
    floor that a stagnating run may end at).  ``hint`` says what to change."""
    if not info.converged and info.residual > max(tol, 1e-8):
        at = "" if ridge is None else f" for ridge {ridge:g}"
        raise SolveError(
            f"{route} did not reach the relative residual {tol:g}{at} (got "
            f"{info.residual:.3g} after {info.iterations} iterations); {hint}"
        )


# ------------------------------------------------------------------------------ CG
@dataclass
class SolveInfo:
    """Convergence report of :func:`pcg`."""

    iterations: int
    residual: float  # max over columns of ||b - A x|| / ||b|| (recomputed, float64)
    residuals: list = field(default_factory=list)  # per-column relative residuals
    history: list = field(default_factory=list)  # max recurrence residual per iteration
    converged: bool = False
    seconds: float = 0.0


def pcg(
    K,
    B: np.ndarray,
    shift: float,
    *,
    precondition=None,
    x0: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int = 500,
    block: int | None = None,
    what: str = "K",
    matmul=None,
) -> tuple[np.ndarray, SolveInfo]:
    """Preconditioned conjugate gradients for ``(K + shift I) X = B``, all columns at once.

    Float64 throughout (residuals from exact float64 products of the stored entries); one
    streaming pass over ``K`` per iteration for all right-hand sides together. Uses the
    flexible (Polak-Ribiere) update, so a preconditioner applied in float32 is fine.

    Parameters
    ----------
    K : block source, shape (n, n), symmetric
    B : ndarray, shape (n, c)
    precondition : callable ``R -> M^{-1} R``, optional (default: Jacobi)
    x0 : ndarray, shape (n, c), optional starting guess
    tol : float
        Stop when every column has ``||b - A x|| <= tol ||b||`` (checked on the true,
        recomputed residual).
    matmul : callable ``(P, shift) -> (K + shift I) P``, optional
        The product in float64 (default: :func:`sym_matmul` streaming ``K``; e.g. an
        in-memory or a distributed product); with it, ``K`` is only used for the default
        preconditioner.

    Returns
    -------
    X : ndarray, float64, shape (n, c)
    info : SolveInfo

    Raises
    ------
    SolveError
        Non-positive curvature (``K + shift I`` not positive definite).
    """
    t0 = time.perf_counter()
    B = np.asarray(B, dtype=np.float64)
    B2 = B.reshape(B.shape[0], -1)
    n, c = B2.shape
    if K is not None:
        K = as_block_source(K, name=what)
        if n != K.shape[0]:
            raise InputError(f"B must have {K.shape[0]} rows, got {n}")
    if matmul is None:

        def matmul(P, s):
            return sym_matmul(K, P, s, block=block)

    if precondition is None:
        d = diagonal(K, block=block) + shift
        if np.any(d <= 0):
            raise SolveError(
                f"{what} + shift I has a non-positive diagonal entry; not "
                f"positive definite (shift {shift:.6g})"
            )
        precondition = lambda R: R / d[:, None]  # noqa: E731
    bnorm = np.linalg.norm(B2, axis=0)
    bnorm[bnorm == 0] = 1.0
    X = np.zeros((n, c)) if x0 is None else np.array(x0, dtype=np.float64).reshape(n, c)
    R = B2 - matmul(X, shift) if x0 is not None else B2.copy()
    fresh = True  # R is the true residual, not the CG recurrence
    history: list[float] = []
    it = 0
    last_true = np.inf
    while True:
        rel = np.linalg.norm(R, axis=0) / bnorm
        active = rel > tol
        if not active.any() or it >= max_iter:
            if not fresh:
                R = B2 - matmul(X, shift)
                rel = np.linalg.norm(R, axis=0) / bnorm
                fresh = True
            # stop when converged, out of iterations, or stagnating at the float64 floor
            if (rel <= tol).all() or it >= max_iter or rel.max() > 0.5 * last_true:
                break
            last_true = rel.max()
            active = rel > tol
        Z = precondition(R)
        Z[:, ~active] = 0.0
        rz = np.einsum("ij,ij->j", R, Z)
        P = Z
        while it < max_iter:
            Q = matmul(P, shift)
            pq = np.einsum("ij,ij->j", P, Q)
            if np.any(pq[active] <= 0):
                raise NotPositiveDefiniteError(
                    f"{what} + shift I is not positive definite (CG found "
                    f"non-positive curvature {pq[active].min():.3g}, shift "
                    f"{shift:.6g})"
                )
            a = np.where(active, rz / np.where(active, pq, 1.0), 0.0)
            X += a * P
            R -= a * Q
            it += 1
            fresh = False
            rel = np.linalg.norm(R, axis=0) / bnorm
            history.append(float(rel.max()))
            active &= rel > tol
            if not active.any():
                break
            Znew = precondition(R)
            Znew[:, ~active] = 0.0
            rz_new = np.einsum("ij,ij->j", R, Znew)
            beta = np.where(
                active, np.einsum("ij,ij->j", R, Znew - Z) / np.where(active, rz, 1.0), 0.0
            )
            beta = np.maximum(beta, 0.0)
            P = Znew + beta * P
            Z, rz = Znew, rz_new
    info = SolveInfo(
        iterations=it,
        residual=float(rel.max()),
        residuals=rel.tolist(),
        history=history,
        converged=bool((rel <= tol).all()),
        seconds=time.perf_counter() - t0,
    )
    return X.reshape(B.shape), info
