"""Convolutional DEQ-NTK and NNGP (CDEQ-NTK, DESIGN.md §1.2) for a (rows, cols) tile.

Structure used
--------------
The window mean ``A`` shifts both pixels of a pair by the same offset, so it preserves the
pixel offset ``delta = j - i``: the pixel-pair tensor of an image pair splits into independent
*offset slices*.  Slice ``delta`` lives on the rectangle of pixels ``i`` with ``i`` and
``i + delta`` both inside the image, and on it ``A`` is an ordinary k x k box mean with zero
padding.  ``flatten`` needs only the slice ``delta = 0`` (O(HW) per pair); ``gap`` sums every
slice (O((HW)^2) work per pair but only O(HW) memory per slice being solved).

On a slice, with ``s = sqrt(Sigma(x,x)_ii Sigma(y,y)_jj)`` from the per-image self-covariances:

* ``Sigma* = F(Sigma*)``, ``F(S) = sw2 M k1(S) + su2 M K + sb2`` (M the box mean), is solved
  by inexact Newton-Krylov: the Jacobian ``I - sw2 M diag(k0)`` is similar to the SPD matrix
  ``I - sw2 D M D`` (``D = diag(sqrt(k0))``, M symmetric), so each Newton step is a CG solve
  to relative accuracy ``min(0.1, sqrt(residual))``.  For ReLU ``F`` is convex and isotone and
  ``sw2 M diag(k0)`` has spectral radius <= sw2/2 < 1: Newton from ``Sigma_0 = su2 M K + sb2``
  (below the root) converges monotonically and quadratically, ~6 steps to 1e-13.  A slice
  falls back to Anderson acceleration (type II) when ``k0`` has negative entries, a Jacobian
  is not positive definite, or a step makes no progress (``solver="anderson"`` forces it).
* ``Theta* = Sigma* + sw2 M (k0 * Theta*)`` is linear; with ``w = D Theta`` it is the SPD
  system ``(I - sw2 D M D) w = D Sigma*``, solved by CG; ``Theta = Sigma + sw2 M (D w)``.
  Activations whose ``k0`` can be negative fall back to Anderson on the linear map.
* An image paired with itself at offset 0 has correlation exactly 1 and its self-covariance
  as the exact root; it is started there (otherwise ``k0``'s square-root singularity at
  correlation 1 would turn a 1e-13 error in Sigma into ~1e-7 in Theta).

Cost per pair and offset slice of n pixels: ~6-7 evaluations of the dual maps (one arcsine
and two square roots per pixel, vectorised; no libm calls) and ~40-60 CG iterations (one box
filter and a few vector passes each).  Memory: ~(19 + 2 history) n floats per thread.

Bitwise reproducibility: every solve is per image pair and per slice, with its own
convergence test and iteration count; every loop runs over the pixels of one slice in a fixed
order (dot products use a fixed 8-way split), so an entry's bits depend only on its two images
and their self-covariances, never on the tile, the batch or the thread count.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..errors import InputError
from ..spec import CDEQSpec
from .common import KernelResult, raise_failures
from .conv_solve import WORKSPACE_ROWS, offset_tasks, reduce_pairs, self_covariances
from .duals import ACTIVATION_IDS, gauss_hermite, uses_quadrature

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_TOL",
    "conv_kernel",
    "conv_self_covariance",
    "offsets",
]

#: Relative fixed-point residual every pixel-pair solve is driven to.
DEFAULT_TOL = 1e-13
#: Largest number of iterations per solve before it is reported as failed.
DEFAULT_MAX_ITER = 400
#: Anderson history length.
DEFAULT_HISTORY = 5
_SOLVERS = ("newton", "anderson", "plain")
#: Working memory a tile may use for its sub-batches of image pairs (bytes).
DEFAULT_MEMORY_BUDGET = 1 << 30


# ------------------------------------------------------------------------ Python layer
def _activation(spec: CDEQSpec, n_nodes):
    act = ACTIVATION_IDS[spec.activation]
    quad = uses_quadrature(spec.activation)
    nodes, weights = gauss_hermite(int(n_nodes) if n_nodes else 48)
    return act, quad, nodes, weights


def _check_options(tol, max_iter, history, memory_budget=DEFAULT_MEMORY_BUDGET):
    if not (isinstance(tol, float | int) and 0 < tol < 1e-3):
        raise InputError(f"tol must be a number in (0, 1e-3), got {tol!r}")
    for name, value, lo in (
        ("max_iter", max_iter, 1),
        ("history", history, 0),
        ("memory_budget", memory_budget, 1 << 20),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
            raise InputError(f"{name} must be an integer >= {lo}, got {value!r}")


def conv_self_covariance(
    spec: CDEQSpec,
    X: np.ndarray,
    *,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    history: int = DEFAULT_HISTORY,
    n_nodes: int | None = None,
) -> np.ndarray:
    """Per-pixel self-covariance fixed points ``Sigma*(x, x)_ii`` of each image.

    Parameters
    ----------
    spec : CDEQSpec
    X : ndarray, shape (n, H, W, C), float64, validated

    Returns
    -------
    ndarray, shape (n, H, W)
        Computed per image (its bits depend on that image only); pass slices of it as
        ``self_x`` / ``self_y`` to :func:`conv_kernel`.

    Raises
    ------
    FixedPointError
        The fixed point was not found for some image (rows named as ``(image, 0)``).
    """
    _check_options(tol, max_iter, history)
    n, H, W, C = X.shape
    act, quad, nodes, weights = _activation(spec, n_nodes)
    V = np.empty((n, H * W))
    res = np.empty(n)
    its = np.zeros(n, dtype=np.int64)
    X3 = np.ascontiguousarray(X, dtype=np.float64).reshape(n, H * W, C)
    self_covariances(
        act,
        quad,
        nodes,
        weights,
        spec.sigma_w2,
        spec.sigma_u2,
        spec.sigma_b2,
        H,
        W,
        spec.filter_size // 2,
        X3,
        float(tol),
        int(max_iter),
        int(history),
        V,
        res,
        its,
    )
    bad = ~(np.isfinite(res) & np.isfinite(V).all(axis=1) & (res <= 100 * tol))
    raise_failures(
        bad[:, None],
        f"{spec.activation} CDEQ self-covariance",
        " (the fixed point may not exist: try a smaller sigma_w2)",
    )
    return V.reshape(n, H, W)


def _check_self(name, value, X):
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.shape != X.shape[:3]:
        raise InputError(f"{name} must have shape {X.shape[:3]} (n, H, W), got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not (np.isfinite(arr).all() and (arr >= 0).all()):
        raise InputError(f"{name} must be finite and >= 0 (self-covariances)")
    return arr


def offsets(spec: CDEQSpec, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets (d1, d2) the readout needs: (0, 0) for flatten, all for gap."""
    if spec.readout == "flatten":
        return np.zeros(1, np.int64), np.zeros(1, np.int64)
    d1, d2 = np.meshgrid(np.arange(-(H - 1), H), np.arange(-(W - 1), W), indexing="ij")
    return d1.ravel().astype(np.int64), d2.ravel().astype(np.int64)


def conv_kernel(
    spec: CDEQSpec,
    X: np.ndarray,
    Y: np.ndarray | None = None,
    *,
    self_x=None,
    self_y=None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    history: int = DEFAULT_HISTORY,
    n_nodes: int | None = None,
    solver: str = "newton",
    batch_pairs: int | None = None,
) -> KernelResult:
    """CDEQ-NTK and NNGP of a convolutional DEQ on a tile of image pairs.

    Parameters
    ----------
    spec : CDEQSpec
    X : ndarray, shape (n, H, W, C), float64, validated
    Y : ndarray, shape (m, H, W, C), optional
        ``None`` means ``Y = X``: only pairs ``i <= j`` are solved and the result is exactly
        symmetric.
    self_x, self_y : ndarray, shape (n, H, W) / (m, H, W), optional
        Slices of :func:`conv_self_covariance` (computed once per dataset); computed here
        when omitted (bitwise the same values).
    memory_budget : int
        Bytes of working memory for the tile (per-pair, per-offset partial results plus the
        per-thread slice workspaces); pairs are processed in sub-batches that fit.
    tol : float
        Relative fixed-point residual each slice solve is driven to.
    max_iter, history : int
        Iteration cap per solve (reported as a failure when hit); Anderson history length.
    n_nodes : int, optional
        Gauss-Hermite nodes per dimension for quadrature activations.
    solver : {"newton", "anderson", "plain"}
        Sigma* by Newton-Krylov (default; a slice falls back to Anderson when a Jacobian is
        not positive definite or a step makes no progress) or by Anderson throughout;
        ``plain`` is the reference forward iteration of the layer recursion (benchmarks).
    batch_pairs : int, optional
        Image pairs per sub-batch; default: as many as ``memory_budget`` allows.

    Returns
    -------
    KernelResult
        ``ntk``, ``nngp`` of shape (n, m); ``iterations`` = the most sweeps any image pair
        used on one offset slice (nonlinear map evaluations + CG iterations of the Newton
        steps and of the Theta* solve); ``max_residual`` = largest relative fixed-point
        residual (Sigma* and Theta*) over the tile.

    Raises
    ------
    InputError, FixedPointError
    """
    _check_options(tol, max_iter, history, memory_budget)
    if batch_pairs is not None and (
        isinstance(batch_pairs, bool)
        or not isinstance(batch_pairs, int | np.integer)
        or batch_pairs < 1
    ):
        raise InputError(f"batch_pairs must be an integer >= 1, got {batch_pairs!r}")
    if solver not in _SOLVERS:
        raise InputError(f"solver must be one of {', '.join(_SOLVERS)}, got {solver!r}")
    symmetric = Y is None
    Y = X if symmetric else Y
    n, H, W, C = X.shape
    m_ = Y.shape[0]
    opts = {"tol": tol, "max_iter": max_iter, "history": history, "n_nodes": n_nodes}
    VX = _check_self("self_x", self_x, X)
    VY = _check_self("self_y", self_y, Y)
    if VX is None:
        VX = conv_self_covariance(spec, X, **opts)
    if VY is None:
        VY = VX if symmetric else conv_self_covariance(spec, Y, **opts)
    if symmetric:
        pi, pj = np.triu_indices(n)
    else:
        pi, pj = np.divmod(np.arange(n * m_), m_)
    pi = pi.astype(np.int64)
    pj = pj.astype(np.int64)
    d1s, d2s = offsets(spec, H, W)
    n_off = d1s.shape[0]
    P = H * W
    r = spec.filter_size // 2
    act, quad, nodes, weights = _activation(spec, n_nodes)
    # memory: per-thread slice workspace + 5 partial results per (pair, offset) in a batch
    ws_bytes = nb.get_num_threads() * 8 * (WORKSPACE_ROWS + 3 * max(history, 1)) * (P + 2 * r * H)
    per_pair = 8 * 5 * n_off + 64
    batch = max(1, (int(memory_budget) - ws_bytes) // per_pair)
    if batch_pairs is not None:
        batch = int(batch_pairs)
    X3 = X.reshape(n, P, C)
    Y3 = Y.reshape(m_, P, C)
    VX2 = VX.reshape(n, P)
    VY2 = VY.reshape(m_, P)
    n_pairs = pi.shape[0]
    ntk_v = np.empty(n_pairs)
    nngp_v = np.empty(n_pairs)
    res_v = np.empty(n_pairs)
    its_v = np.empty(n_pairs)
    inv_norm = 1.0 / P if spec.readout == "flatten" else 1.0 / (P * P)
    for b0 in range(0, n_pairs, batch):
        b1 = min(b0 + batch, n_pairs)
        out = np.empty(((b1 - b0) * n_off, 5))
        offset_tasks(
            act,
            quad,
            nodes,
            weights,
            spec.sigma_w2,
            spec.sigma_u2,
            spec.sigma_b2,
            H,
            W,
            r,
            X3,
            Y3,
            VX2,
            VY2,
            pi[b0:b1],
            pj[b0:b1],
            d1s,
            d2s,
            float(tol),
            int(max_iter),
            int(history),
            _SOLVERS.index(solver),
            out,
        )
        reduce_pairs(out, n_off, inv_norm, ntk_v[b0:b1], nngp_v[b0:b1], res_v[b0:b1], its_v[b0:b1])
    ntk = np.empty((n, m_))
    nngp = np.empty((n, m_))
    res = np.empty((n, m_))
    ntk[pi, pj] = ntk_v
    nngp[pi, pj] = nngp_v
    res[pi, pj] = res_v
    if symmetric:
        ntk[pj, pi] = ntk_v
        nngp[pj, pi] = nngp_v
        res[pj, pi] = res_v
    failed = ~(np.isfinite(res) & np.isfinite(ntk) & np.isfinite(nngp))
    raise_failures(
        failed,
        f"{spec.activation} CDEQ kernel ({spec.readout})",
        " (the fixed point may not exist for these parameters: try a smaller sigma_w2)",
    )
    return KernelResult(
        ntk=ntk, nngp=nngp, max_residual=float(res.max()), iterations=int(its_v.max())
    )
