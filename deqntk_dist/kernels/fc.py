"""Fully-connected DEQ-NTK and NNGP (DESIGN.md §1.1), for a (rows, cols) tile.

ReLU fast path
--------------
With ``s = sqrt(Sigma*(x,x) Sigma*(y,y))`` and ``r = Sigma*(x,y)/s``, the off-diagonal fixed
point ``S = sw2 k1(S) + I`` becomes the scalar equation ``h(r) = r - sw2 f(r) = t`` with
``t = I(x,y)/s``.  ``h`` is increasing (``h' = 1 - sw2 k0 >= 1 - sw2/2 > 0``) and concave, so
Newton from a tabulated inverse converges monotonically to machine precision in 2-3 steps.
"""

from __future__ import annotations

import math
from functools import lru_cache, partial

import numba as nb
import numpy as np

from ..spec import DEQSpec
from .common import GRAM_BLOCK, KernelResult, copy_into, gram, raise_failures
from .duals import (
    _INV_2PI,
    ACTIVATION_IDS,
    DEFAULT_QUAD_NODES,
    dual_maps,
    gauss_hermite,
    k1k0,
    relu_normalised,
)

__all__ = [
    "injection",
    "self_covariance",
    "fc_kernel",
    "finite_depth_kernel",
    "relu_inverse_table",
    "relu_table_values",
]

MAX_ITER = 100
#: A fixed point whose relative residual exceeds this is reported as not converged.
RESIDUAL_TOL = 1e-11
_TABLE_SIZE = 4097


def injection(spec: DEQSpec, G: np.ndarray, d: int) -> np.ndarray:
    """Injection kernel ``I = su2 <x,y>/d + sb2`` from inner products ``G``."""
    return spec.sigma_u2 / d * G + spec.sigma_b2


@nb.njit(cache=True, error_model="numpy")
def _sqnorms(X):
    n, d = X.shape
    out = np.empty(n)
    for i in range(n):
        acc = 0.0
        for k in range(d):
            acc += X[i, k] * X[i, k]
        out[i] = acc
    return out


# ----------------------------------------------------------------------------- ReLU path
@nb.njit(cache=True, error_model="numpy")
def _relu_solve_r(t, sw2, r0):
    """Newton for ``r - sw2 f(r) = t`` from ``r0`` (concave h: monotone convergence)."""
    r = r0
    it = 0
    for it in range(1, MAX_ITER + 1):  # noqa: B007 (it is the count returned)
        f, k0 = relu_normalised(r)
        dr = (r - sw2 * f - t) / (1.0 - sw2 * k0)
        r_new = min(max(r - dr, -1.0), 1.0)
        step = abs(r_new - r)
        r = r_new
        if step <= 4e-16:
            break
    f, k0 = relu_normalised(r)
    return r, f, k0, abs(r - sw2 * f - t), it


@lru_cache(maxsize=32)
def relu_inverse_table(sigma_w2: float) -> tuple[float, float, np.ndarray]:
    """Tabulated angle ``theta(u)`` of the normalised ReLU fixed point.

    ``cos(theta)`` solves ``h(r) = r - sw2 f(r) = t`` with ``u = sqrt(t_max - t)``,
    ``t_max = 1 - sw2/2``.  In ``u`` the angle is analytic up to ``t = t_max`` (``h`` is
    quadratic in theta at theta = 0), so cubic interpolation is accurate to ~1e-15.

    Returns
    -------
    u_step, t_max : float
    theta_table : ndarray, shape (_TABLE_SIZE,)
    """
    t_max = 1.0 - sigma_w2 / 2.0
    u = np.linspace(0.0, math.sqrt(t_max + 1.0), _TABLE_SIZE)
    theta = relu_table_values(t_max - u * u, sigma_w2)
    theta.setflags(write=False)
    return float(u[1] - u[0]), t_max, theta


@nb.njit(cache=True, error_model="numpy")
def _h_theta(theta, sw2):
    c = math.cos(theta)
    k0 = (math.pi - theta) * _INV_2PI
    return c - sw2 * (math.sin(theta) * _INV_2PI + k0 * c)


@nb.njit(cache=True, error_model="numpy")
def relu_table_values(t, sw2):
    """Angle ``theta`` with ``h(cos theta) = t`` for each ``t`` (shape (m,)), by bisection
    to the last bit (see :func:`relu_inverse_table`)."""
    out = np.empty(t.shape[0])
    for i in range(t.shape[0]):
        # h(cos theta) decreases in theta on [0, pi]: bisection to the last bit
        lo, hi = 0.0, math.pi
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid <= lo or mid >= hi:
                break
            if _h_theta(mid, sw2) > t[i]:
                lo = mid
            else:
                hi = mid
        out[i] = lo if abs(_h_theta(lo, sw2) - t[i]) <= abs(_h_theta(hi, sw2) - t[i]) else hi
    return out


@nb.njit(cache=True, parallel=True, error_model="numpy")
def _relu_tile(G, sx, sy, su2_d, sb2, sw2, tmax, inv_step, table, ntk, nngp, want, tri, res):
    """Normalised fixed point per entry from the tabulated angle, then one Newton step.

    ``theta(u)`` by cubic interpolation, one sin/cos pair, the residual of
    ``r - sw2 f(r) = t`` at that point (reported: a bound on the final residual), and one
    Newton correction of ``r`` and of ``k0 = (pi - theta)/(2 pi)``.  ``want`` = (ntk, nngp)
    flags: an output not wanted may be a (1, 1) dummy.  Outputs may be float32 (the value is
    rounded on store, exactly as ``astype`` would).  ``tri``: only entries with ``j >= i``
    (a diagonal block of a symmetric tile).
    """
    n, m = G.shape
    nt = table.shape[0]
    w_ntk, w_nngp = want
    for i in nb.prange(n):
        rmax = 0.0
        for j in range(i if tri else 0, m):
            s = sx[i] * sy[j]
            inj = su2_d * G[i, j] + sb2
            if s == 0.0:
                if w_nngp:
                    nngp[i, j] = inj
                if w_ntk:
                    ntk[i, j] = inj
                continue
            gap = tmax - inj / s
            # a gap of a few ulps is a duplicate direction whose inner product and norms
            # were rounded differently; theta there is ill-conditioned (~ sqrt(gap))
            if gap <= 8e-16:
                gap = 0.0
            t = tmax - gap
            u = math.sqrt(gap) * inv_step
            k = min(max(int(u), 1), nt - 3)
            w = u - k
            a0 = table[k - 1]
            a1 = table[k]
            a2 = table[k + 1]
            a3 = table[k + 2]
            # Newton form of the cubic through (-1, a0), (0, a1), (1, a2), (2, a3)
            d2 = 0.5 * (a2 - 2.0 * a1 + a0)
            d3 = (a3 - 3.0 * a2 + 3.0 * a1 - a0) * (1.0 / 6.0)
            th = min(max(a1 + w * ((a2 - a1) + (w - 1.0) * (d2 + (w + 1.0) * d3)), 0.0), math.pi)
            c = math.cos(th)
            sn = math.sin(th)
            k0 = (math.pi - th) * _INV_2PI
            resid = c - sw2 * (sn * _INV_2PI + k0 * c) - t
            dr = -resid / (1.0 - sw2 * k0)
            r = min(c + dr, 1.0)
            if sn > 0.0:
                k0 = (math.pi - (th - dr / sn)) * _INV_2PI
            sig = s * r
            if w_nngp:
                nngp[i, j] = sig
            if w_ntk:
                ntk[i, j] = sig / (1.0 - sw2 * k0)
            rmax = max(rmax, abs(resid))
        res[i] = rmax


@nb.njit(cache=True, parallel=True, error_model="numpy")
def _relu_tile_newton(G, sx, sy, su2_d, sb2, sw2, tmax, ntk, nngp, want, tri, res):
    """Slow, table-free path: safeguarded Newton in r per entry (rows the table missed)."""
    n, m = G.shape
    w_ntk, w_nngp = want
    for i in nb.prange(n):
        rmax = 0.0
        for j in range(i if tri else 0, m):
            s = sx[i] * sy[j]
            inj = su2_d * G[i, j] + sb2
            if s == 0.0:
                if w_nngp:
                    nngp[i, j] = inj
                if w_ntk:
                    ntk[i, j] = inj
                continue
            t = min(max(inj / s, -1.0), tmax)
            r, _f, k0, resid, _it = _relu_solve_r(t, sw2, 0.0)
            if w_nngp:
                nngp[i, j] = s * r
            if w_ntk:
                ntk[i, j] = s * r / (1.0 - sw2 * k0)
            rmax = max(rmax, resid)
        res[i] = rmax


@nb.njit(cache=True, parallel=True, error_model="numpy")
def _nonfinite_rows(A, symmetric):
    """Per row: whether it holds a non-finite value (only j >= i when ``symmetric``)."""
    n, m = A.shape
    bad = np.zeros(n, dtype=np.bool_)
    for i in nb.prange(n):
        for j in range(i if symmetric else 0, m):
            if not np.isfinite(A[i, j]):
                bad[i] = True
                break
    return bad


def _outputs(out: dict | None, n: int, m: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(ntk, nngp, want): the caller's arrays, fresh float64 ones, or a (1, 1) dummy."""
    if out is None:
        return np.empty((n, m)), np.empty((n, m)), (True, True)
    ntk, nngp = out.get("ntk"), out.get("nngp")
    some = ntk if ntk is not None else nngp
    assert some is not None  # ``out`` holds at least one kernel
    dummy = np.empty((1, 1), dtype=some.dtype)
    return (
        dummy if ntk is None else ntk,
        dummy if nngp is None else nngp,
        (ntk is not None, nngp is not None),
    )


def _relu_fc(spec: DEQSpec, X, Y, symmetric: bool, out: dict | None = None) -> KernelResult:
    d = X.shape[1]
    sw2 = spec.sigma_w2
    su2_d = spec.sigma_u2 / d
    sb2 = spec.sigma_b2
    qx = (su2_d * _sqnorms(X) + sb2) / (1.0 - sw2 / 2.0)
    qy = qx if symmetric else (su2_d * _sqnorms(Y) + sb2) / (1.0 - sw2 / 2.0)
    sx, sy = np.sqrt(qx), np.sqrt(qy)
    n, m = X.shape[0], Y.shape[0]
    ntk, nngp, want = _outputs(out, n, m)
    res = np.empty(n)
    u_step, tmax, table = relu_inverse_table(sw2)
    failed = np.zeros(n, dtype=bool)
    B = GRAM_BLOCK
    # Row groups of one Gram block per thread: the GEMMs of a group, then its entries.
    # One group-sized Gram buffer is reused (a tile-sized one would be fresh memory for
    # every tile, whose page faults cost ~1/4 of the time of a large tile).
    group = B * max(1, min(nb.get_num_threads(), -(-n // B)))
    gbuf = np.empty((min(group, n), m))
    for g0 in range(0, n, group):
        g1 = min(g0 + group, n)
        c0 = g0 if symmetric else 0
        G = gram(X[g0:g1], Y[c0:], upper=symmetric, out=gbuf[: g1 - g0, : m - c0])
        if symmetric:  # block rows of the upper triangle
            blocks = [(i0, min(i0 + B, g1), i0, m) for i0 in range(g0, g1, B)]
        else:
            blocks = [(g0, g1, 0, m)]
        for i0, i1, j0, j1 in blocks:
            args = (
                G[i0 - g0 : i1 - g0, j0 - c0 : j1 - c0],
                sx[i0:i1],
                sy[j0:j1],
                su2_d,
                sb2,
                sw2,
                tmax,
            )
            outs = (
                ntk[i0:i1, j0:j1] if want[0] else ntk,
                nngp[i0:i1, j0:j1] if want[1] else nngp,
                want,
                symmetric,
                res[i0:i1],
            )
            _relu_tile(*args, 1.0 / u_step, table, *outs)
            if res[i0:i1].max() > RESIDUAL_TOL:  # off the table: never expected
                _relu_tile_newton(*args, *outs)
            failed[i0:i1] |= res[i0:i1] > RESIDUAL_TOL
    rmax = float(res.max())
    kept = [a for a, w in zip((ntk, nngp), want) if w]
    if symmetric:
        # the diagonal is the closed form; the lower triangle mirrors the upper one
        idx = np.arange(n)
        if want[1]:
            nngp[idx, idx] = qx
        if want[0]:
            ntk[idx, idx] = qx / (1.0 - sw2 / 2.0)
        for a in kept:
            _mirror_upper(a)
    for a in kept:
        failed |= _nonfinite_rows(a, symmetric)
    if failed.any():
        bad = failed[:, None] & np.ones((1, m), dtype=bool)
        bad &= (res > RESIDUAL_TOL)[:, None] | ~np.all([np.isfinite(a) for a in kept], axis=0)
        raise_failures(bad, "ReLU DEQ kernel")
    return KernelResult(
        ntk=ntk if want[0] else None,
        nngp=nngp if want[1] else None,
        max_residual=rmax,
        iterations=1,
    )


@nb.njit(cache=True, parallel=True, error_model="numpy")
def _mirror_upper(A):
    """Copy the strict upper triangle onto the lower one (exact symmetry), in 64-blocks."""
    n = A.shape[0]
    nb_ = (n + 63) // 64
    for bi in nb.prange(nb_):
        i0 = bi * 64
        for bj in range(bi + 1):
            j0 = bj * 64
            for i in range(i0, min(i0 + 64, n)):
                for j in range(j0, min(j0 + 64, i)):
                    A[i, j] = A[j, i]


# -------------------------------------------------------------------- generic activations
@nb.njit(cache=True, error_model="numpy")
def _solve_entry(act, use_quad, sw2, a, b, inj, c0, nodes, weights):
    """Safeguarded Newton for ``g(c) = c - sw2 k1(a, b, c) - inj`` on ``[-sqrt(ab), sqrt(ab)]``.

    Returns ``(c, k0, relative residual, iterations)``; ``k0`` is at the solution.
    """
    bound = math.sqrt(a * b)
    scale = max(bound, abs(inj), 1e-300)
    lo, hi = -bound, bound
    c = min(max(c0, lo), hi)
    it = 0
    for it in range(1, MAX_ITER + 1):  # noqa: B007 (it is the count returned)
        k1, k0 = k1k0(act, use_quad, a, b, c, nodes, weights)
        g = c - sw2 * k1 - inj
        if g < 0.0:
            lo = c
        else:
            hi = c
        dg = 1.0 - sw2 * k0
        c_new = c - g / dg if dg > 0.0 else 0.5 * (lo + hi)
        if not (lo <= c_new <= hi):
            c_new = 0.5 * (lo + hi)
        step = abs(c_new - c)
        c = c_new
        if step <= 4e-16 * scale:
            break
    k1, k0 = k1k0(act, use_quad, a, b, c, nodes, weights)
    return c, k0, abs(c - sw2 * k1 - inj) / scale, it


@nb.njit(cache=True, parallel=True, error_model="numpy")
def _generic_tile(
    act, use_quad, sw2, G, su2_d, sb2, Ix, Iy, Sx, Sy, nodes, weights, ntk, nngp, res, its
):
    n, m = G.shape
    for i in nb.prange(n):
        for j in range(m):
            inj = su2_d * G[i, j] + sb2
            # start from the injection correlation mapped onto the fixed-point variances
            q = math.sqrt(Ix[i] * Iy[j])
            c0 = inj * math.sqrt(Sx[i] * Sy[j]) / q if q > 0.0 else 0.0
            c, k0, r, it = _solve_entry(act, use_quad, sw2, Sx[i], Sy[j], inj, c0, nodes, weights)
            nngp[i, j] = c
            den = 1.0 - sw2 * k0
            ntk[i, j] = c / den if den > 0.0 else math.inf
            res[i, j] = r
            its[i, j] = it


@nb.njit(cache=True, parallel=True, error_model="numpy")
def _generic_diag(act, use_quad, sw2, Ix, nodes, weights, out, res, its):
    for i in nb.prange(Ix.shape[0]):
        # bracket a in [Ix, hi] where g(a) = a - sw2 k1(a,a,a) - Ix changes sign
        lo = Ix[i]
        hi = Ix[i] + sw2 + 1.0
        ok = False
        for _ in range(200):
            k1, _k0 = k1k0(act, use_quad, hi, hi, hi, nodes, weights)
            if hi - sw2 * k1 - Ix[i] >= 0.0:
                ok = True
                break
            lo = hi
            hi *= 2.0
        if not ok:
            out[i] = math.nan
            res[i] = math.inf
            its[i] = 200
            continue
        it = 0
        for it in range(1, 200):  # noqa: B007 (it is the count returned)
            mid = 0.5 * (lo + hi)
            if mid <= lo or mid >= hi:
                break
            k1, _k0 = k1k0(act, use_quad, mid, mid, mid, nodes, weights)
            if mid - sw2 * k1 - Ix[i] < 0.0:
                lo = mid
            else:
                hi = mid
        a = 0.5 * (lo + hi)
        k1, _k0 = k1k0(act, use_quad, a, a, a, nodes, weights)
        out[i] = a
        res[i] = abs(a - sw2 * k1 - Ix[i]) / max(a, 1e-300)
        its[i] = it


def self_covariance(spec: DEQSpec, X: np.ndarray, *, n_nodes: int | None = None) -> np.ndarray:
    """Diagonal fixed points ``Sigma*(x, x)`` for each row of X.

    Parameters
    ----------
    spec : DEQSpec
    X : ndarray, shape (n, d), float64

    Returns
    -------
    ndarray, shape (n,)
    """
    d = X.shape[1]
    Ix = spec.sigma_u2 / d * _sqnorms(X) + spec.sigma_b2
    if spec.activation == "relu":
        return Ix / (1.0 - spec.sigma_w2 / 2.0)
    out, res, its = _generic_self(spec, Ix, n_nodes)
    raise_failures(
        (~np.isfinite(out) | (res > RESIDUAL_TOL))[:, None],
        f"{spec.activation} DEQ self-covariance",
    )
    return out


def _generic_self(spec, Ix, n_nodes):
    nodes, weights = gauss_hermite(n_nodes or DEFAULT_QUAD_NODES)
    out = np.empty_like(Ix)
    res = np.empty_like(Ix)
    its = np.empty(Ix.shape, dtype=np.int64)
    _generic_diag(
        ACTIVATION_IDS[spec.activation],
        spec.activation not in ("relu", "erf"),
        spec.sigma_w2,
        Ix,
        nodes,
        weights,
        out,
        res,
        its,
    )
    return out, res, its


def _generic_fc(spec: DEQSpec, X, Y, symmetric: bool, n_nodes) -> KernelResult:
    d = X.shape[1]
    su2_d = spec.sigma_u2 / d
    Ix = su2_d * _sqnorms(X) + spec.sigma_b2
    Iy = Ix if symmetric else su2_d * _sqnorms(Y) + spec.sigma_b2
    Sx, dres, dits = _generic_self(spec, Ix, n_nodes)
    Sy = Sx if symmetric else _generic_self(spec, Iy, n_nodes)[0]
    if not (np.isfinite(Sx).all() and np.isfinite(Sy).all()):
        raise_failures(
            ~np.isfinite(np.concatenate([Sx, Sy]))[:, None],
            f"{spec.activation} DEQ self-covariance",
        )
    G = gram(X, Y)
    n, m = G.shape
    ntk = np.empty((n, m))
    nngp = np.empty((n, m))
    res = np.empty((n, m))
    its = np.empty((n, m), dtype=np.int64)
    nodes, weights = gauss_hermite(n_nodes or DEFAULT_QUAD_NODES)
    _generic_tile(
        ACTIVATION_IDS[spec.activation],
        spec.activation not in ("relu", "erf"),
        spec.sigma_w2,
        G,
        su2_d,
        spec.sigma_b2,
        Ix,
        Iy,
        Sx,
        Sy,
        nodes,
        weights,
        ntk,
        nngp,
        res,
        its,
    )
    if symmetric:
        _mirror_upper(nngp)
        _mirror_upper(ntk)
        _mirror_upper(res)
    failed = (res > RESIDUAL_TOL) | ~np.isfinite(ntk) | ~np.isfinite(nngp)
    raise_failures(
        failed,
        f"{spec.activation} DEQ kernel",
        " (the fixed point may not exist for these parameters: try a smaller sigma_w2)",
    )
    return KernelResult(
        ntk=ntk,
        nngp=nngp,
        max_residual=float(res.max()),
        iterations=int(max(its.max(), dits.max())),
    )


def fc_kernel(
    spec: DEQSpec,
    X: np.ndarray,
    Y: np.ndarray | None = None,
    *,
    n_nodes: int | None = None,
    out: dict[str, np.ndarray] | None = None,
) -> KernelResult:
    """DEQ-NTK and NNGP of a fully-connected DEQ on a tile.

    Parameters
    ----------
    spec : DEQSpec
    X : ndarray, shape (n, d), float64, validated
    Y : ndarray, shape (m, d), optional
        ``None`` means ``Y = X`` and an exactly symmetric result.
    n_nodes : int, optional
        Gauss-Hermite nodes per dimension for quadrature activations.
    out : dict, optional
        Validated ``{"ntk": array, "nngp": array}`` (either or both) of shape (n, m) to
        write into; only those kernels are returned.

    Returns
    -------
    KernelResult
        ``ntk`` and ``nngp`` of shape (n, m).
    """
    symmetric = Y is None
    Y = X if symmetric else Y
    if spec.activation == "relu":
        return _relu_fc(spec, X, Y, symmetric, out)
    return copy_into(_generic_fc(spec, X, Y, symmetric, n_nodes), out)


def finite_depth_kernel(
    spec: DEQSpec,
    X: np.ndarray,
    Y: np.ndarray | None = None,
    *,
    depth: int,
    injection_all_layers: bool = True,
    n_nodes: int | None = None,
) -> KernelResult:
    """Kernels of a weight-tied network of finite depth, by unrolling the layer recursion.

    ``Sigma_1 = Theta_1 = I``; then ``Sigma_{h+1} = sw2 k1(Lambda_h) + inj`` and
    ``Theta_{h+1} = Sigma_{h+1} + sw2 k0(Lambda_h) Theta_h`` where ``inj = I(x, y)`` with input
    injection and ``inj = sb2`` without it (the input then only enters the first layer).
    This is the independent reference the DEQ fixed point is the limit of, and it shows the
    degeneration (constant or identity correlation) of the network without injection.

    Returns
    -------
    KernelResult
        ``max_residual`` is the relative change of the last layer, ``iterations = depth``.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    symmetric = Y is None
    Y = X if Y is None else Y
    d = X.shape[1]
    su2_d = spec.sigma_u2 / d
    Ixy = su2_d * (X @ Y.T) + spec.sigma_b2
    if symmetric:
        # the same rounded numbers on the diagonal keep the correlation there exactly 1
        Ixx = Iyy = np.diag(Ixy).copy()
    else:
        Ixx = su2_d * np.einsum("ij,ij->i", X, X) + spec.sigma_b2
        Iyy = su2_d * np.einsum("ij,ij->i", Y, Y) + spec.sigma_b2
    quad = spec.activation not in ("relu", "erf")
    maps = partial(
        dual_maps, spec.activation, quadrature=quad, n_nodes=n_nodes or DEFAULT_QUAD_NODES
    )
    S, Sx, Sy, T = Ixy.copy(), Ixx.copy(), Iyy.copy(), Ixy.copy()
    change = 0.0
    for _ in range(depth - 1):
        k1, k0 = maps(Sx[:, None], Sy[None, :], S)
        k1x, _ = maps(Sx, Sx, Sx)
        k1y, _ = maps(Sy, Sy, Sy)
        if injection_all_layers:
            S_new, Sx_new, Sy_new = (
                spec.sigma_w2 * k1 + Ixy,
                spec.sigma_w2 * k1x + Ixx,
                spec.sigma_w2 * k1y + Iyy,
            )
        else:
            b = spec.sigma_b2
            S_new, Sx_new, Sy_new = (
                spec.sigma_w2 * k1 + b,
                spec.sigma_w2 * k1x + b,
                spec.sigma_w2 * k1y + b,
            )
        T_new = S_new + spec.sigma_w2 * k0 * T
        change = float(np.max(np.abs(T_new - T)) / max(np.max(np.abs(T_new)), 1e-300))
        S, Sx, Sy, T = S_new, Sx_new, Sy_new, T_new
    return KernelResult(ntk=T, nngp=S, max_residual=change, iterations=depth)
