"""Shared pieces of the kernel maths: result type, input checks, deterministic Gram."""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numba as nb
import numpy as np
from threadpoolctl import ThreadpoolController

from ..errors import FixedPointError, InputError

__all__ = [
    "KERNEL_OUTPUTS",
    "KernelResult",
    "as_float_array",
    "copy_into",
    "gram",
    "raise_failures",
    "validate_out",
]

#: The kernels a tile function computes, in the order of :class:`KernelResult`.
KERNEL_OUTPUTS = ("ntk", "nngp")

#: Row block of the Gram product.  Every block product is a GEMM of the same shape, so the
#: bits of an entry depend only on its two rows, never on where it sits in a tile: this is
#: what makes a tiled Gram bitwise equal to an untiled one.
GRAM_BLOCK = 512


@dataclass(frozen=True)
class KernelResult:
    """Kernel values of one tile and how the fixed points converged.

    Attributes
    ----------
    ntk, nngp : ndarray, shape (n_rows, n_cols), float64
        DEQ neural tangent kernel Theta* and NNGP kernel Sigma*.  With ``out`` they are
        the caller's arrays (float32 or float64), and ``None`` for a kernel not in ``out``.
    max_residual : float
        Largest fixed-point residual over the tile, relative to the kernel scale.
    iterations : int
        Largest number of solver iterations used by any entry (or by the tile solver).
    """

    ntk: np.ndarray | None
    nngp: np.ndarray | None
    max_residual: float
    iterations: int


def as_float_array(name: str, value, ndim: int, *, what: str) -> np.ndarray:
    """Validate an input array and return it as C-contiguous float64.

    Raises
    ------
    InputError
        Wrong type/ndim, empty, or non-finite entries.
    """
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise InputError(f"{name} must be an array of shape {what}, got {type(value)!r}") from exc
    if arr.dtype.kind not in "fiu" or arr.dtype == bool:
        raise InputError(
            f"{name} must be a real numeric array of shape {what}, got dtype {arr.dtype}"
        )
    if arr.ndim != ndim:
        raise InputError(f"{name} must have {ndim} dimensions {what}, got shape {arr.shape}")
    if arr.size == 0 or arr.shape[0] == 0:
        raise InputError(f"{name} must be non-empty {what}, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1)))[0]
        raise InputError(f"{name} must be finite; row {bad[0]} holds NaN or inf")
    return arr


def validate_out(out, shape: tuple[int, int]) -> dict[str, np.ndarray] | None:
    """Check ``out`` (kernel name -> preallocated array) for a tile of ``shape``.

    Raises
    ------
    InputError
        Not a non-empty mapping of ``ntk`` / ``nngp`` to writeable C-contiguous float32 or
        float64 arrays of ``shape``.
    """
    if out is None:
        return None
    if not isinstance(out, Mapping) or not out:
        raise InputError(
            f"out must be a non-empty dict of {' / '.join(KERNEL_OUTPUTS)} -> array, got {out!r}"
        )
    for name, a in out.items():
        if name not in KERNEL_OUTPUTS:
            raise InputError(f"out keys must be among {KERNEL_OUTPUTS}, got {name!r}")
        if not isinstance(a, np.ndarray) or a.dtype not in (np.float32, np.float64):
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise InputError(f"out[{name!r}] must be a float32 or float64 ndarray, got {got}")
        if a.shape != shape:
            raise InputError(f"out[{name!r}] must have shape {shape}, got {a.shape}")
        if not (a.flags.c_contiguous and a.flags.writeable):
            raise InputError(f"out[{name!r}] must be a writeable C-contiguous array")
    return dict(out)


def copy_into(res: KernelResult, out: dict[str, np.ndarray] | None) -> KernelResult:
    """``res`` with its kernels copied into ``out`` (rounded like ``astype``)."""
    if out is None:
        return res
    for name, a in out.items():
        np.copyto(a, getattr(res, name), casting="same_kind")
    return KernelResult(
        ntk=out.get("ntk"),
        nngp=out.get("nngp"),
        max_residual=res.max_residual,
        iterations=res.iterations,
    )


def _gram_stripe(G: np.ndarray, X: np.ndarray, Y: np.ndarray, r0: int, r1: int, upper: bool):
    """Fill rows ``[r0, r1)`` of ``G = X @ Y.T`` (block-aligned ``r0``)."""
    d = X.shape[1]
    m = Y.shape[0]
    B = GRAM_BLOCK
    xb = np.zeros((B, d))
    yb = np.zeros((B, d))
    gb = np.empty((B, B))
    for i0 in range(r0, r1, B):
        i1 = min(i0 + B, r1)
        xb[: i1 - i0] = X[i0:i1]
        xb[i1 - i0 :] = 0.0
        for j0 in range(i0 if upper else 0, m, B):
            j1 = min(j0 + B, m)
            yb[: j1 - j0] = Y[j0:j1]
            yb[j1 - j0 :] = 0.0
            np.dot(xb, yb.T, out=gb)
            G[i0:i1, j0:j1] = gb[: i1 - i0, : j1 - j0]


def gram(
    X: np.ndarray, Y: np.ndarray, *, upper: bool = False, out: np.ndarray | None = None
) -> np.ndarray:
    """``X @ Y.T`` in float64 with position-independent bits.

    Every block is one GEMM of the fixed shape (GRAM_BLOCK, d) x (d, GRAM_BLOCK) on
    zero-padded copies, so each entry's bits depend only on its two rows.  The BLAS runs
    single-threaded while row stripes run in parallel Python threads: OpenBLAS's own
    threads keep spinning after a call and would slow the compiled entry kernel that runs
    next.

    Parameters
    ----------
    X : ndarray, shape (n, d)
    Y : ndarray, shape (m, d)
    upper : bool
        Only fill blocks on or above the block diagonal (X is Y); the rest is left unset.
    out : ndarray, shape (n, m), float64, optional
        Where to write (may be a view of a larger reused buffer).

    Returns
    -------
    ndarray, shape (n, m)
    """
    n = X.shape[0]
    G = np.empty((n, Y.shape[0])) if out is None else out
    B = GRAM_BLOCK
    n_blocks = -(-n // B)
    workers = max(1, min(nb.get_num_threads(), n_blocks))
    # stripes of whole blocks; with ``upper`` later stripes are shorter, so split by work
    weights = np.array([(n_blocks - b) if upper else 1 for b in range(n_blocks)], float)
    cuts = np.searchsorted(np.cumsum(weights) / weights.sum(), np.arange(1, workers) / workers)
    bounds = [0, *sorted({min(int(c) + 1, n_blocks) for c in cuts}), n_blocks]
    stripes = [(b0 * B, min(b1 * B, n)) for b0, b1 in zip(bounds[:-1], bounds[1:]) if b1 > b0]
    with _blas_controller().limit(limits=1, user_api="blas"):
        if len(stripes) == 1:
            _gram_stripe(G, X, Y, *stripes[0], upper)
        else:
            pool = _pool(len(stripes), os.getpid())  # a pool inherited by fork has no threads
            list(pool.map(lambda s: _gram_stripe(G, X, Y, s[0], s[1], upper), stripes))
    return G


@lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


@lru_cache(maxsize=4)
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="deqntk-gram")


def raise_failures(failed: np.ndarray, what: str, detail: str = "") -> None:
    """Raise :class:`FixedPointError` naming the failing (row, col) tile entries."""
    idx = np.argwhere(failed)
    if idx.size == 0:
        return
    shown = [tuple(int(v) for v in row) for row in idx[:20]]
    more = "" if len(idx) <= 20 else f" (first 20 of {len(idx)})"
    raise FixedPointError(
        f"{what} did not converge for {len(idx)} entries{more}: {shown}{detail}",
        entries=shown,
        n_failed=len(idx),
    )
