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

import math
from functools import lru_cache, partial

import numba as nb
import numpy as np

from ..errors import InputError
from ..spec import CDEQSpec
from .common import KernelResult, raise_failures
from .conv_slices import START_DEGREE, box_eigen_bounds, pair_tasks
from .conv_solve import WORKSPACE_ROWS, reduce_pairs, self_covariances
from .duals import ACTIVATION_IDS, gauss_hermite, uses_quadrature
from .fc import relu_inverse_table, relu_table_values

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_TOL",
    "FLOAT32_TOL",
    "conv_kernel",
    "conv_self_covariance",
    "default_tol",
    "readout_plan",
]

#: Relative fixed-point residual every pixel-pair solve is driven to (float64 results).
DEFAULT_TOL = 1e-13
#: The same for tiles stored as float32 (~7 digits): errors ~100x below their rounding.
FLOAT32_TOL = 1e-9
#: Largest number of iterations per solve before it is reported as failed.
DEFAULT_MAX_ITER = 400
#: Anderson history length.
DEFAULT_HISTORY = 5
_SOLVERS = ("newton", "anderson", "plain", "newton-cg")
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


def _task_inputs(spec, X, Y, VX, VY, n_nodes) -> tuple:
    """Everything :func:`slice_tasks` passes to the compiled tasks but the pairs."""
    n, H, W, C = X.shape
    P = H * W
    VX2 = VX.reshape(n, P)
    VY2 = VY.reshape(Y.shape[0], P)
    SX2, ISX2 = _roots(VX2)
    SY2, ISY2 = (SX2, ISX2) if VY is VX else _roots(VY2)
    r = spec.filter_size // 2
    return (
        spec,
        X.reshape(n, P, C),
        Y.reshape(Y.shape[0], P, C),
        VX2,
        VY2,
        SX2,
        SY2,
        ISX2,
        ISY2,
        _activation(spec, n_nodes),
        _eigen_bounds(max(H, W), r),
        _relu_start_table(spec.sigma_w2),
        (H, W, r),
    )


def slice_tasks(inputs, plan, pi, pj, *, tol, max_iter, history, method) -> np.ndarray:
    """Solve every offset slice of the pairs ``(pi[q], pj[q])``.

    Returns
    -------
    ndarray, shape (len(pi) * n_off, 6)
        Per (pair, offset): weighted Theta* and Sigma* sums, residual, nonlinear
        evaluations, linear iterations, 1.0 where the robust solver took over.
    """
    spec, X3, Y3, VX2, VY2, SX2, SY2, ISX2, ISY2, activation, bounds, start, shape = inputs
    d1s, d2s, WR, WC, _ = plan
    H, W, r = shape
    act, use_quad, nodes, weights = activation
    mu_lo, mu_hi = bounds
    table, t_max, inv_step, poly, u_poly = start
    out = np.empty((pi.shape[0] * d1s.shape[0], 6))
    pair_tasks(
        act,
        use_quad,
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
        SX2,
        SY2,
        ISX2,
        ISY2,
        pi,
        pj,
        d1s,
        d2s,
        WR,
        WC,
        float(tol),
        int(max_iter),
        int(history),
        int(method),
        mu_lo,
        mu_hi,
        table,
        t_max,
        inv_step,
        poly,
        u_poly,
        nb.get_num_threads(),
        out,
    )
    return out


def readout_plan(spec: CDEQSpec, H: int, W: int):
    """Offset slices a readout needs and their separable per-pixel weights.

    Returns
    -------
    d1s, d2s : ndarray, shape (n_off,), int64
        Pixel offsets ``delta = j - i``: (0, 0) for flatten, every offset for gap, and
        ``|delta| <= pool_size - 1`` per axis for lap.
    WR, WC : ndarray, shape (n_off, H) / (n_off, W)
        Weights of the slice's rows / columns (the readout sums ``WR[o, u] WC[o, v]
        Theta(u, v)`` over slice pixels, DESIGN §1.2); ones for flatten and gap.
    inv_norm : float
        Factor of the weighted sum: ``1/(HW)`` (flatten), ``1/(HW)^2`` (gap),
        ``1/(HW c^4)`` (lap).
    """
    if spec.readout == "flatten":
        d1s, d2s = np.zeros(1, np.int64), np.zeros(1, np.int64)
    else:
        c = spec.pool_size if spec.readout == "lap" else max(H, W)
        assert c is not None  # readout "lap" has a pool_size (CDEQSpec checks)
        e1, e2 = min(c - 1, H - 1), min(c - 1, W - 1)
        g1, g2 = np.meshgrid(np.arange(-e1, e1 + 1), np.arange(-e2, e2 + 1), indexing="ij")
        d1s, d2s = g1.ravel().astype(np.int64), g2.ravel().astype(np.int64)
    n_off = d1s.shape[0]
    WR = np.ones((n_off, H))
    WC = np.ones((n_off, W))
    if spec.readout == "lap":
        assert spec.pool_size is not None  # CDEQSpec checks
        R = (spec.pool_size - 1) // 2
        for o in range(n_off):
            WR[o, : H - abs(d1s[o])] = _overlap_counts(H, int(d1s[o]), R)
            WC[o, : W - abs(d2s[o])] = _overlap_counts(W, int(d2s[o]), R)
        return d1s, d2s, WR, WC, 1.0 / (H * W * spec.pool_size**4)
    return d1s, d2s, WR, WC, 1.0 / (H * W) if spec.readout == "flatten" else 1.0 / (H * W) ** 2


def _overlap_counts(n: int, d: int, R: int) -> np.ndarray:
    """``#{i in [0, n): |i - a| <= R, |i - a - d| <= R}`` for the slice pixels ``a`` (those
    with ``a`` and ``a + d`` in ``[0, n)``): the windows that hold both pixels of a pair."""
    a = np.arange(max(0, -d), n - max(0, d))
    lo = np.maximum(np.maximum(a, a + d) - R, 0)
    hi = np.minimum(np.minimum(a, a + d) + R, n - 1)
    return np.maximum(hi - lo + 1, 0).astype(np.float64)


@lru_cache(maxsize=16)
def _eigen_bounds(n_max: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    return box_eigen_bounds(n_max, r)


def _roots(V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sqrt(V)`` and ``1 / sqrt(V)`` (0 where ``V = 0``)."""
    S = np.sqrt(V)
    with np.errstate(divide="ignore"):
        return S, np.where(S > 0, 1.0 / S, 0.0)


@lru_cache(maxsize=16)
def _relu_start_table(sigma_w2: float) -> tuple[np.ndarray, float, float, np.ndarray, float]:
    """Correlation of the pointwise ReLU fixed point: ``(table, t_max, inv_step, poly,
    u_poly)``, the table on the FC kernel's ``u`` grid and a polynomial for ``u <= u_poly``
    (see :func:`.conv_slices._initial`)."""
    if not sigma_w2 < 2.0:  # not ReLU-admissible: only other activations get here
        return np.zeros(2), 0.0, 0.0, np.zeros(START_DEGREE + 1), 0.0
    u_step, t_max, theta = relu_inverse_table(sigma_w2)
    poly, u_poly = _relu_start_poly(sigma_w2, t_max)
    return np.cos(theta), t_max, 1.0 / u_step, poly, u_poly


#: Largest error of the polynomial start.  A start needs no more: a slice's first Newton
#: step (a float32 evaluation and a solve to ``max(rel, 1e-5)``) removes such an error, and
#: the other slices start 10^4-10^5 times farther from their fixed point.
_START_POLY_ERROR = 1e-6


def _relu_start_poly(sigma_w2: float, t_max: float) -> tuple[np.ndarray, float]:
    """Monomial coefficients in ``z = 2 u / u_poly - 1`` of the start correlation
    ``cos theta(u)``, interpolated at Chebyshev points on ``u`` in ``[0, u_poly]``, with
    ``u_poly`` the widest of a few ranges ``t >= t_lo`` on which the polynomial is within
    :data:`_START_POLY_ERROR` of the exact value on a fine grid (``u_poly = 0``: none is,
    the table serves every pixel).  Near ``t = -1`` (correlation -1) the correlation has
    a square-root point that no polynomial follows."""
    z = np.linspace(-1.0, 1.0, 4001)
    nodes = np.cos(np.pi * (np.arange(START_DEGREE + 1) + 0.5) / (START_DEGREE + 1))
    for t_lo in (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5):
        if not t_lo < t_max:
            break
        u_poly = math.sqrt(t_max - t_lo)

        def rho(z: np.ndarray, u_poly: float = u_poly) -> np.ndarray:
            u = 0.5 * (z + 1.0) * u_poly
            return np.cos(relu_table_values(t_max - u * u, sigma_w2))

        cheb = np.polynomial.chebyshev.chebfit(nodes, rho(nodes), START_DEGREE)
        coef = np.polynomial.chebyshev.cheb2poly(cheb)
        approx = np.polynomial.polynomial.polyval(z, coef)
        if np.max(np.abs(approx - rho(z))) <= _START_POLY_ERROR:
            return coef, u_poly
    return np.zeros(START_DEGREE + 1), 0.0


def default_tol(out) -> float:
    """Tolerance for a tile written into ``out``: float32 outputs need ~7 digits."""
    if out and all(a.dtype == np.float32 for a in out.values()):
        return FLOAT32_TOL
    return DEFAULT_TOL


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
        Relative fixed-point residual each slice solve is driven to (Sigma* and Theta*).
    max_iter, history : int
        Iteration cap per solve of the robust solvers (reported as a failure when hit);
        Anderson history length.
    n_nodes : int, optional
        Gauss-Hermite nodes per dimension for quadrature activations.
    solver : {"newton", "newton-cg", "anderson", "plain"}
        ``newton`` (default): Newton-Chebyshev in mixed precision (:mod:`.conv_slices`); a
        slice it cannot solve (e.g. ``k0 < 0`` for gelu) goes to the robust solver.
        ``newton-cg``: the previous float64 Newton-Krylov solver (Anderson fallback);
        ``anderson``: Anderson throughout; ``plain``: forward iteration of the layer
        recursion (the reference of the benchmarks).
    batch_pairs : int, optional
        Image pairs per sub-batch; default: as many as ``memory_budget`` allows.

    Returns
    -------
    KernelResult
        ``ntk``, ``nngp`` of shape (n, m); ``iterations`` = the most sweeps any image pair
        used on one offset slice (nonlinear evaluations + linear iterations);
        ``max_residual`` = largest relative fixed-point residual (Sigma* and Theta*) over
        the tile.  With ``spec.hflip`` both are over the two kernels averaged.

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
    Y = X if Y is None else Y
    self_cov = partial(
        conv_self_covariance, spec, tol=tol, max_iter=max_iter, history=history, n_nodes=n_nodes
    )
    VX = _check_self("self_x", self_x, X)
    VY = _check_self("self_y", self_y, Y)
    if VX is None:
        VX = self_cov(X)
    if VY is None:
        VY = VX if symmetric else self_cov(Y)
    run = {
        "memory_budget": memory_budget,
        "tol": float(tol),
        "max_iter": int(max_iter),
        "history": int(history),
        "n_nodes": n_nodes,
        "method": _SOLVERS.index(solver),
        "batch_pairs": batch_pairs,
    }
    ntk, nngp, res, its = _pairs(spec, X, Y, VX, VY, symmetric, **run)
    if spec.hflip:
        # K(x, flip y) = K(y, flip x): the flipped half of a symmetric tile is symmetric too
        Yf = np.ascontiguousarray(Y[:, :, ::-1, :])
        VYf = np.ascontiguousarray(VY[:, :, ::-1])
        f_ntk, f_nngp, f_res, f_its = _pairs(spec, X, Yf, VX, VYf, symmetric, **run)
        ntk = 0.5 * (ntk + f_ntk)
        nngp = 0.5 * (nngp + f_nngp)
        res = np.maximum(res, f_res)
        its = max(its, f_its)
    failed = ~(np.isfinite(res) & np.isfinite(ntk) & np.isfinite(nngp))
    raise_failures(
        failed,
        f"{spec.activation} CDEQ kernel ({spec.readout})",
        " (the fixed point may not exist for these parameters: try a smaller sigma_w2)",
    )
    return KernelResult(ntk=ntk, nngp=nngp, max_residual=float(res.max()), iterations=its)


def _pairs(spec, X, Y, VX, VY, symmetric, *, memory_budget, tol, max_iter, history, n_nodes,
           method, batch_pairs):  # fmt: skip
    """Readout sums of every pair of X x Y (``symmetric``: pairs i <= j, mirrored)."""
    n, H, W, C = X.shape
    m_ = Y.shape[0]
    if symmetric:
        pi, pj = np.triu_indices(n)
    else:
        pi, pj = np.divmod(np.arange(n * m_), m_)
    pi = pi.astype(np.int64)
    pj = pj.astype(np.int64)
    plan = readout_plan(spec, H, W)
    n_off = plan[0].shape[0]
    P = H * W
    r = spec.filter_size // 2
    # memory: per-thread slice workspaces + 6 partial results per (pair, offset) in a batch
    per_thread = 8 * (WORKSPACE_ROWS + 3 * max(history, 1)) * (P + 2 * r * H)
    per_thread += (8 * 15 + 4 * 14) * ((H + 2 * r) * (W + 2 * r) + 2 * r)
    ws_bytes = nb.get_num_threads() * per_thread
    per_pair = 8 * 6 * n_off + 64
    batch = max(1, (int(memory_budget) - ws_bytes) // per_pair)
    if batch_pairs is not None:
        batch = int(batch_pairs)
    n_pairs = pi.shape[0]
    ntk_v = np.empty(n_pairs)
    nngp_v = np.empty(n_pairs)
    res_v = np.empty(n_pairs)
    its_v = np.empty(n_pairs)
    inputs = _task_inputs(spec, X, Y, VX, VY, n_nodes)
    for b0 in range(0, n_pairs, batch):
        b1 = min(b0 + batch, n_pairs)
        out = slice_tasks(
            inputs, plan, pi[b0:b1], pj[b0:b1], tol=tol, max_iter=max_iter, history=history,
            method=method,
        )  # fmt: skip
        reduce_pairs(out, n_off, plan[4], ntk_v[b0:b1], nngp_v[b0:b1], res_v[b0:b1], its_v[b0:b1])
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
    return ntk, nngp, res, int(its_v.max())
