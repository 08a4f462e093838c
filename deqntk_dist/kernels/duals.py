"""Dual maps of activations: ``k1 = E[phi(u) phi(v)]`` and ``k0 = E[phi'(u) phi'(v)]``.

``(u, v) ~ N(0, [[a, c], [c, b]])``.  ReLU and erf have closed forms; every other activation
(and ReLU/erf on request, for cross-checking) uses 2-D Gauss-Hermite quadrature.

The scalar functions are numba ``njit`` functions so the fixed-point solvers can call them
inside compiled loops; :func:`dual_maps` is the vectorised numpy-facing entry point.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numba as nb
import numpy as np

__all__ = ["ACTIVATION_IDS", "dual_maps", "gauss_hermite", "relu_normalised"]

ACTIVATION_IDS = {"relu": 0, "erf": 1, "tanh": 2, "gelu": 3}

_INV_2PI = 1.0 / (2.0 * math.pi)
_TWO_OVER_PI = 2.0 / math.pi
_FOUR_OVER_PI = 4.0 / math.pi
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TWO_OVER_SQRTPI = 2.0 / math.sqrt(math.pi)

DEFAULT_QUAD_NODES = 64


@lru_cache(maxsize=8)
def gauss_hermite(n_nodes: int = DEFAULT_QUAD_NODES) -> tuple[np.ndarray, np.ndarray]:
    """Probabilists' Gauss-Hermite nodes and weights normalised to sum to one.

    Returns
    -------
    nodes, weights : ndarray, shape (n_nodes,)
        ``E[f(z)] ~= sum(weights * f(nodes))`` for ``z ~ N(0, 1)``.
    """
    if not 2 <= n_nodes <= 150:
        raise ValueError(
            f"n_nodes must be in [2, 150] (numpy's Gauss-Hermite overflows above), got {n_nodes}"
        )
    z, w = np.polynomial.hermite_e.hermegauss(n_nodes)
    w = w / w.sum()
    z.setflags(write=False)
    w.setflags(write=False)
    return z, w


@nb.njit(cache=True, inline="always", error_model="numpy")
def relu_normalised(r):
    """ReLU dual maps at unit variances and correlation ``r``: ``(f(r), k0(r))``.

    ``f(r) = (sqrt(1-r^2) + (pi - arccos r) r) / (2 pi)`` and ``k0(r) = (pi - arccos r)/(2 pi)``.
    """
    theta = math.acos(r)
    k0 = (math.pi - theta) * _INV_2PI
    f = math.sqrt(max(1.0 - r * r, 0.0)) * _INV_2PI + k0 * r
    return f, k0


@nb.njit(cache=True, error_model="numpy")
def _phi(act, u):
    if act == 0:
        return u if u > 0.0 else 0.0
    if act == 1:
        return math.erf(u)
    if act == 2:
        return math.tanh(u)
    return u * 0.5 * (1.0 + math.erf(u * _INV_SQRT2))


@nb.njit(cache=True, error_model="numpy")
def _dphi(act, u):
    if act == 0:
        return 1.0 if u > 0.0 else 0.0
    if act == 1:
        return _TWO_OVER_SQRTPI * math.exp(-u * u)
    if act == 2:
        t = math.tanh(u)
        return 1.0 - t * t
    return 0.5 * (1.0 + math.erf(u * _INV_SQRT2)) + u * _INV_SQRT2PI * math.exp(-0.5 * u * u)


@nb.njit(cache=True, error_model="numpy")
def k1k0_closed(act, a, b, c):
    """Closed-form ``(k1, k0)`` for ReLU (act 0) and erf (act 1)."""
    if act == 0:
        s = math.sqrt(a * b)
        if s == 0.0:
            return 0.0, 0.0
        r = min(max(c / s, -1.0), 1.0)
        f, k0 = relu_normalised(r)
        return s * f, k0
    da = 1.0 + 2.0 * a
    db = 1.0 + 2.0 * b
    q = math.sqrt(da * db)
    arg = min(max(2.0 * c / q, -1.0), 1.0)
    k1 = _TWO_OVER_PI * math.asin(arg)
    den = da * db - 4.0 * c * c
    k0 = _FOUR_OVER_PI / math.sqrt(den) if den > 0.0 else math.inf
    return k1, k0


@nb.njit(cache=True, error_model="numpy")
def k1k0_quadrature(act, a, b, c, nodes, weights):
    """2-D Gauss-Hermite ``(k1, k0)`` for any activation id.

    The variances are put in a canonical order (the larger first) so the approximation is
    exactly symmetric in ``(a, b)``, as the true dual map is.
    """
    if a < b:
        a, b = b, a
    sa = math.sqrt(a)
    sb = math.sqrt(b)
    s = sa * sb
    rho = 0.0 if s == 0.0 else min(max(c / s, -1.0), 1.0)
    cr = math.sqrt(max(1.0 - rho * rho, 0.0))
    k1 = 0.0
    k0 = 0.0
    n = nodes.shape[0]
    for i in range(n):
        u = sa * nodes[i]
        pu = _phi(act, u)
        du = _dphi(act, u)
        acc1 = 0.0
        acc0 = 0.0
        for j in range(n):
            v = sb * (rho * nodes[i] + cr * nodes[j])
            acc1 += weights[j] * _phi(act, v)
            acc0 += weights[j] * _dphi(act, v)
        k1 += weights[i] * pu * acc1
        k0 += weights[i] * du * acc0
    return k1, k0


@nb.njit(cache=True, error_model="numpy")
def k1k0(act, use_quad, a, b, c, nodes, weights):
    """Dispatch to the closed form or to quadrature."""
    if use_quad:
        return k1k0_quadrature(act, a, b, c, nodes, weights)
    return k1k0_closed(act, a, b, c)


@nb.njit(cache=True, parallel=True, error_model="numpy")
def _dual_maps_flat(act, use_quad, a, b, c, nodes, weights, k1_out, k0_out):
    for i in nb.prange(a.shape[0]):
        k1_out[i], k0_out[i] = k1k0(act, use_quad, a[i], b[i], c[i], nodes, weights)


def uses_quadrature(activation: str) -> bool:
    """True for activations without a closed-form dual map."""
    return activation not in ("relu", "erf")


def dual_maps(
    activation: str,
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    *,
    quadrature: bool | None = None,
    n_nodes: int = DEFAULT_QUAD_NODES,
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised dual maps.

    Parameters
    ----------
    activation : str
        One of ``relu``, ``erf``, ``tanh``, ``gelu``.
    a, b, c : array_like
        Variances and covariance, broadcast together.
    quadrature : bool, optional
        Force (True) or forbid (False) quadrature; default: closed form where one exists.
    n_nodes : int
        Gauss-Hermite nodes per dimension.

    Returns
    -------
    k1, k0 : ndarray, broadcast shape of ``a, b, c``
    """
    if activation not in ACTIVATION_IDS:
        raise ValueError(
            f"activation must be one of {', '.join(ACTIVATION_IDS)}, got {activation!r}"
        )
    if quadrature is None:
        quadrature = uses_quadrature(activation)
    elif not quadrature and uses_quadrature(activation):
        raise ValueError(f"activation {activation!r} has no closed-form dual map")
    a, b, c = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (a, b, c)))
    shape = a.shape
    flat = [np.ascontiguousarray(v).reshape(-1) for v in (a, b, c)]
    k1 = np.empty(flat[0].shape[0])
    k0 = np.empty_like(k1)
    nodes, weights = gauss_hermite(n_nodes)
    act = ACTIVATION_IDS[activation]
    _dual_maps_flat(act, bool(quadrature), flat[0], flat[1], flat[2], nodes, weights, k1, k0)
    return k1.reshape(shape), k0.reshape(shape)
