"""Fast offset-slice solver of the CDEQ-NTK: Newton-Chebyshev in mixed precision.

One call solves ``Sigma*`` and ``Theta*`` on one offset slice of one image pair (see
:mod:`deqntk_dist.kernels.conv`) and returns their weighted sums (the readout).

Method
------
* ``Sigma* = F(Sigma*)``, ``F(S) = sw2 M k1(S) + kb``, by inexact Newton.  The Jacobian
  ``J = I - sw2 M diag(k0)`` (``k0 >= 0``) is similar to the symmetric ``I - sw2 D M D``
  (``D = diag(sqrt(k0))``), so its spectrum is real and lies in
  ``[1 - sw2 kmax mu_max, 1 - sw2 kmax mu_min]``, with ``kmax = max k0`` and ``mu`` the
  extreme eigenvalues of the zero-padded box mean ``M`` on the slice (exact, from the 1-D
  factors).  Each Newton system is solved by Chebyshev iteration on those bounds: a fixed
  number of steps for the accuracy asked (no inner products, one fused pass per step).
* Precision: the early Newton steps evaluate the dual maps and residuals in float32 (the
  errors they leave are removed by the later ones); from a relative residual of about
  ``1e-5`` on, dual maps and residuals are float64; every inner Chebyshev solve is float32
  (inexact Newton needs only a few digits per step).
* ``Theta* = Sigma* + sw2 M (k0 Theta*)`` is linear: float32 Chebyshev solves refined by
  float64 residuals (iterative refinement) until the float64 residual is below ``tol``.
* Anything unexpected (non-ReLU ``k0 < 0``, an empty spectral interval, no progress) makes
  the caller fall back to the robust solver of :mod:`.conv_solve` for that slice.

Layout
------
A slice of ``h x w`` pixels and box radius ``r`` is stored flat and row-major with ``r``
zero rows above and below and ``r`` pad columns before each row (row stride ``wp = w + r``:
a row's right pads are the next row's left pads, which a box of radius ``r`` reads from
both sides), and ``r`` spare entries at each end; the first band entry is rounded up to a
64-byte boundary and workspace rows start on one.  Passes run over whole padded rows (the
*band* of interior rows, extended into the zero rows below to a multiple of
:data:`QUANTUM` entries, which are pads too), so every loop is one contiguous
unsigned-index loop that LLVM vectorises without a remainder.  Pad columns may hold finite
garbage: the mask (1 inside, 0 on pads) removes it wherever it could reach the interior,
and the arrays a box mean reads are zero there (the dual maps give ``k0 = k1 = 0`` where
``s = 0``, so box inputs written over the band stay zero on its pads).

Passes are fused where one loop can do the work of several (the box mean with the
residual and its float32 copy, the update of ``x`` with its float32 copy, the Theta update
with ``k0 Theta``); maxima over the band are unsigned-integer maxima of the magnitude bits
(they vectorise, are exact, and a NaN anywhere makes the maximum NaN, so the slice goes to
the robust solver).

Bitwise reproducibility: a slice's operations depend only on its two images (and their
self-covariances): fixed loop orders, iteration counts from the slice's own residuals, and
plain IEEE arithmetic (no ``fastmath``: no reassociation, and fused multiply-adds only
where written, :func:`_fma`), so tiles equal the untiled Gram for any tile, batch or thread
count, vector width (256- or 512-bit), and whether numba compiled the code or loaded it
from its cache.  A CPU without an FMA unit computes the same bits (software FMA), slowly.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .conv_solve import (
    _W_TH,
    _W_X,
    WORKSPACE_ROWS,
    _identical,
    _load_slice,
    _plain_slice,
    _solve_slice,
)
from .duals import k1k0
from .intrinsics import abs_bits as _abs_bits
from .intrinsics import borrow as _borrow
from .intrinsics import fma as _fma
from .intrinsics import from_bits as _from_bits

__all__ = ["START_DEGREE", "box_eigen_bounds", "fast_slice", "pair_tasks", "slice_length"]


_U = np.uint64
_F = np.float32
_U0, _U1, _U2 = _U(0), _U(1), _U(2)

# asin(z) = z + z t A(t), t = z^2 <= 1/4: A is the degree-12 polynomial interpolating
# (asin(z) - z) / (z t) at the 13 Chebyshev points of [0, 1/4] (coefficients computed in
# 40-digit arithmetic, ascending); with fused multiply-adds within 0.5 ulp of asin on
# [0, 1/2].  A polynomial, not fdlibm's rational (conv_solve): no division, which shares
# the divider with the square root (the dual map 12 % faster).
_A0, _A1, _A2, _A3, _A4, _A5, _A6, _A7, _A8, _A9, _A10, _A11, _A12 = (
    0.16666666666666669,
    0.07499999999998433,
    0.04464285714635543,
    0.030381944138531247,
    0.02237217294214989,
    0.017352392720869973,
    0.013971212973552933,
    0.011479177415184906,
    0.01032281435018578,
    0.005457506718640358,
    0.01740087944269402,
    -0.014851887071247204,
    0.028757851367421566,
)
# cos(phi) = sum_k (-1)^k phi^2k / (2k)!, |phi| <= pi/6: 9 terms reach 1e-18
_C1, _C2, _C3, _C4, _C5, _C6, _C7, _C8 = ((-1.0) ** k / math.factorial(2 * k) for k in range(1, 9))
_PI = math.pi
_HALF_PI = 0.5 * math.pi
_INV_2PI = 1.0 / (2.0 * math.pi)
# float32 versions (single-precision constants keep the float32 passes in float32); the
# asin polynomial is the degree-4 interpolant at 5 such points, within 7.2e-8 relative
# (fdlibm's single-precision rational, e_asinf.c: 6.5e-8)
_A0f, _A1f, _A2f, _A3f, _A4f = (_F(v) for v in (0.16666673, 0.07498855, 0.04500138,
                                                 0.026554542, 0.038085025))  # fmt: skip
_C1f, _C2f, _C3f, _C4f, _C5f = (_F(v) for v in (_C1, _C2, _C3, _C4, _C5))
_PIf, _HALF_PIf, _INV_2PIf = _F(_PI), _F(_HALF_PI), _F(_INV_2PI)
_ZEROf, _HALFf, _ONEf, _TWOf, _MONEf = _F(0.0), _F(0.5), _F(1.0), _F(2.0), _F(-1.0)

#: Relative residual of a float32 evaluation after whose Newton step the evaluations are
#: float64 (that step lands at ~1e-5 .. 1e-7, near the float32 floor).
SWITCH_F64 = 3e-3
#: Smallest relative accuracy asked of one float32 Chebyshev solve.
ETA_MIN = 1e-5
#: Relative residual a Newton step from a float32 evaluation cannot go below (the
#: evaluation's own rounding): its inner solve is asked for no more than this.
F32_FLOOR = 1e-7
#: Largest number of Newton steps (float32 + float64) and of refinement rounds for Theta.
MAX_NEWTON = 40
MAX_ROUNDS = 12

# rows of the float64 workspace
(_MSK, _S, _INVS, _KB, _X, _K1, _K0, _F64, _TH, _T64, _VS64, _VX, _VY, _KXY) = range(14)
#: Rows of the float64 workspace (each of :func:`slice_length` entries).
ROWS64 = 14
# rows of the float32 workspace
(_MSKf, _Sf, _INVSf, _KBf, _Xf, _K1f, _K0f, _Ff, _XA, _XB, _TA, _TB, _VSf) = range(13)
#: Rows of the float32 workspace.
ROWS32 = 13


#: Band starts and workspace rows are multiples of this many entries (64 bytes in float32):
#: 512-bit loads and stores then do not straddle cache lines (a Chebyshev step on a 28x28
#: slice takes 195 ns aligned, 250 ns not).
ALIGN = 16
#: Band lengths are rounded up to a multiple of this many entries, which pad the band like
#: pad columns: the vector loops (2 x 16 float32 or 4 x 8 float64 lanes per iteration) then
#: leave no remainder, which LLVM runs 4 lanes or 1 at a time (a Chebyshev step on 191
#: entries took 63 ns, on 192 53 ns).
QUANTUM = 32


@nb.njit(cache=True)
def slice_length(H: int, W: int, r: int) -> int:
    """Workspace row length for slices of an ``H x W`` image with box radius ``r`` (a
    multiple of :data:`ALIGN`)."""
    need = (H + 2 * r) * (W + 2 * r) + 2 * r + ALIGN - 1 + QUANTUM
    return (need + ALIGN - 1) // ALIGN * ALIGN


@nb.njit(cache=True)
def _band_length(h, wp):
    """Entries of the band of ``h`` rows of stride ``wp``: ``h * wp`` rounded up to a
    multiple of :data:`QUANTUM`."""
    return (_U(h) * wp + _U(QUANTUM - 1)) // _U(QUANTUM) * _U(QUANTUM)


@nb.njit(cache=True)
def _band_start(ru, wp):
    """First band entry: after ``r`` zero rows and ``r`` spare entries, rounded up to a
    multiple of :data:`ALIGN`."""
    return (ru + ru * wp + _U(ALIGN - 1)) // _U(ALIGN) * _U(ALIGN)


@nb.njit(cache=True)
def _aligned_rows(rows, L, dtype):
    """``(rows, L)`` array whose rows start on 64-byte boundaries (``L`` a multiple of
    :data:`ALIGN`), and the buffer that owns it."""
    item = np.empty(1, dtype=dtype).itemsize
    per = 64 // item
    buf = np.empty(rows * L + per, dtype=dtype)
    off = (-(buf.ctypes.data % 64) % 64) // item
    return buf[off : off + rows * L].reshape(rows, L), buf


def box_eigen_bounds(n_max: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Extreme eigenvalues of the 1-D zero-padded box mean of width ``2r+1``.

    Returns
    -------
    lo, hi : ndarray, shape (n_max + 1,)
        ``lo[n]``, ``hi[n]`` for a line of ``n`` pixels (the divisor is ``2r+1`` per
        dimension, so the 2-D box mean on ``h x w`` is the Kronecker product of two of
        them); slightly widened so that rounding never puts an eigenvalue outside.
    """
    lo = np.zeros(n_max + 1)
    hi = np.zeros(n_max + 1)
    for n in range(1, n_max + 1):
        idx = np.arange(n)
        A = (np.abs(idx[:, None] - idx[None, :]) <= r) / (2.0 * r + 1.0)
        ev = np.linalg.eigvalsh(A)
        lo[n] = ev[0] - 1e-12
        hi[n] = ev[-1] + 1e-12
    return lo, hi


# ------------------------------------------------------------------------- dual maps
@nb.njit(cache=True, error_model="numpy")
def _relu64(x, s, inv_s, k1, k0, k0f, b0, n, divide):
    """ReLU dual maps at covariances ``x`` (band ``[b0, b0+n)``); ``s = 0`` on pads;
    ``k0f`` receives ``k0`` in float32 (the Chebyshev solves' operator).

    One square root per pixel and no division: ``phi = asin(z)`` by a polynomial in ``z^2``,
    ``sin(theta)`` as ``cos(phi)`` (or ``2 z cos(phi)``) by its Taylor polynomial.
    ``divide`` computes the correlation as ``x / s`` (identical images: exactly 1).
    Returns ``max k0f`` (as a float64; NaN if any ``k0`` is).
    """
    m = np.uint32(0)
    for kk in range(n):
        p = b0 + kk
        sp = s[p]
        pos = sp > 0.0
        if divide:
            q = x[p] / sp if pos else 0.0
        else:
            q = x[p] * inv_s[p]
        rho = min(max(q, -1.0), 1.0)
        a = abs(rho)
        small = a < 0.5
        t = rho * rho if small else 0.5 * (1.0 - a)
        R = _fma(t, _fma(t, _fma(t, _fma(t, _A12, _A11), _A10), _A9), _A8)
        R = _fma(t, _fma(t, _fma(t, _fma(t, R, _A7), _A6), _A5), _A4)
        R = _fma(t, _fma(t, _fma(t, _fma(t, R, _A3), _A2), _A1), _A0) * t
        z = rho if small else math.sqrt(t)
        phi = _fma(z, R, z)
        u = phi * phi
        c = _fma(u, _fma(u, _fma(u, _fma(u, _C8, _C7), _C6), _C5), _C4)
        c = _fma(u, _fma(u, _fma(u, _fma(u, c, _C3), _C2), _C1), 1.0)
        sn = c if small else 2.0 * z * c
        two_phi = phi + phi
        pm = _HALF_PI + phi if small else (_PI - two_phi if rho > 0.0 else two_phi)
        kq = pm * _INV_2PI
        k = kq if pos else 0.0
        k0[p] = k
        kf = np.float32(k)
        k0f[p] = kf
        m = max(m, _abs_bits(kf))
        k1[p] = sp * _fma(sn, _INV_2PI, kq * rho)
    return np.float64(_from_bits(m))


@nb.njit(cache=True, error_model="numpy")
def _relu32(x, s, inv_s, k1, k0, b0, n):
    """:func:`_relu64` in float32 (early Newton steps); returns ``max k0``."""
    m = np.uint32(0)
    for kk in range(n):
        p = b0 + kk
        sp = s[p]
        rho = min(max(x[p] * inv_s[p], _MONEf), _ONEf)
        a = abs(rho)
        small = a < _HALFf
        t = rho * rho if small else _HALFf * (_ONEf - a)
        R = _fma(t, _fma(t, _fma(t, _fma(t, _A4f, _A3f), _A2f), _A1f), _A0f) * t
        z = rho if small else np.sqrt(t)
        phi = _fma(z, R, z)
        u = phi * phi
        c = _fma(u, _fma(u, _fma(u, _fma(u, _fma(u, _C5f, _C4f), _C3f), _C2f), _C1f), _ONEf)
        sn = c if small else _TWOf * z * c
        two_phi = phi + phi
        pm = _HALF_PIf + phi if small else (_PIf - two_phi if rho > _ZEROf else two_phi)
        kq = pm * _INV_2PIf
        kf = kq if sp > _ZEROf else _ZEROf
        k0[p] = kf
        m = max(m, _abs_bits(kf))
        k1[p] = sp * _fma(sn, _INV_2PIf, kq * rho)
    return np.float64(_from_bits(m))


@nb.njit(cache=True, error_model="numpy")
def _generic64(act, use_quad, nodes, weights, msk, vx, vy, x, k1, k0, b0, n):
    for kk in range(n):
        p = b0 + kk
        if msk[p] != 0.0:
            k1[p], k0[p] = k1k0(act, use_quad, vx[p], vy[p], x[p], nodes, weights)
        else:
            k1[p] = 0.0
            k0[p] = 0.0


# ------------------------------------------------------------------- band primitives
@nb.njit(cache=True, error_model="numpy", inline="always")
def _vsum3(src, vs, b0, n, wp):
    """``vs[p] = (src[p - wp] + src[p]) + src[p + wp]`` for ``p`` in ``[b0 - 1, b0 + n]``
    (radius-1 vertical sums); the main loop starts at the aligned ``b0``, so that its
    stores and one of its loads stay within cache lines."""
    lo = b0 - _U1
    vs[lo] = (src[lo - wp] + src[lo]) + src[lo + wp]
    top = b0 - wp
    bot = b0 + wp
    for k in range(n):
        vs[b0 + k] = (src[top + k] + src[b0 + k]) + src[bot + k]
    e = b0 + n
    vs[e] = (src[e - wp] + src[e]) + src[e + wp]


@nb.njit(cache=True, error_model="numpy")
def _box(src, dst, vs, b0, n, wp, r, inv_q):
    """``dst = M src`` on the band: ``2r+1`` rows summed, then ``2r+1`` columns, in order.

    ``src`` must be zero on the pad rows and pad columns; ``dst`` holds garbage on the pad
    columns of the band.
    """
    lo = b0 - r
    m = n + r + r
    top = lo - r * wp
    if r == 1:
        _vsum3(src, vs, b0, n, wp)
        for k in range(n):
            dst[b0 + k] = ((vs[lo + k] + vs[b0 + k]) + vs[b0 + _U1 + k]) * inv_q
        return
    for k in range(m):
        vs[lo + k] = src[top + k]
    for a in range(_U1, r + r + _U1):
        off = top + a * wp
        for k in range(m):
            vs[lo + k] += src[off + k]
    for k in range(n):
        dst[b0 + k] = vs[lo + k]
    for b in range(_U1, r + r + _U1):
        off = lo + b
        for k in range(n):
            dst[b0 + k] += vs[off + k]
    for k in range(n):
        dst[b0 + k] *= inv_q


@nb.njit(cache=True, error_model="numpy")
def _amax32(a, b0, n):
    """max |a| over the band of a float32 array, as a float64; NaN if any entry is NaN (an
    integer maximum of magnitude bits, :func:`.intrinsics.abs_bits`: exact, and it
    vectorises)."""
    m = np.uint32(0)
    for k in range(n):
        m = max(m, _abs_bits(a[b0 + k]))
    return np.float64(_from_bits(m))


@nb.njit(cache=True, error_model="numpy")
def _residual(src, F, F32, kb, x, msk, sw2, vs, b0, n, wp, r, inv_q, copy32):
    """``F = msk ((sw2 M src + kb) - x)``, the fixed-point residual ``F(x) - x`` with
    ``src = k1(x)`` (any dtype), in one pass after the vertical sums for ``r = 1``;
    ``F32 = float32(F)`` when ``copy32``.  Returns ``max |F|`` (as a float64; NaN if any
    entry is)."""
    m = _abs_bits(sw2 - sw2)  # zero bits of F's width
    if r == 1:
        lo = b0 - _U1
        _vsum3(src, vs, b0, n, wp)
        for k in range(n):
            p = b0 + k
            g = ((vs[lo + k] + vs[p]) + vs[p + _U1]) * inv_q
            v = msk[p] * (_fma(sw2, g, kb[p]) - x[p])
            F[p] = v
            m = max(m, _abs_bits(v))
    else:
        _box(src, F, vs, b0, n, wp, r, inv_q)
        for k in range(n):
            p = b0 + k
            v = msk[p] * (_fma(sw2, F[p], kb[p]) - x[p])
            F[p] = v
            m = max(m, _abs_bits(v))
    if copy32:
        for k in range(n):
            F32[b0 + k] = np.float32(F[b0 + k])
    return np.float64(_from_bits(m))


@nb.njit(cache=True, error_model="numpy")
def _to32(src, dst, b0, n):
    for k in range(n):
        dst[b0 + k] = np.float32(src[b0 + k])


@nb.njit(cache=True, error_model="numpy")
def _add_masked(x, d, msk, xf, b0, n):
    """``x += msk * d`` (float64 ``x``, float32 ``d``) and ``xf = float32(x)``."""
    for k in range(n):
        p = b0 + k
        v = _fma(msk[p], np.float64(d[p]), x[p])
        x[p] = v
        xf[p] = np.float32(v)


@nb.njit(cache=True, error_model="numpy")
def _theta_update(th, t64, k0, d, msk, b0, n, first):
    """``th = msk d`` (``first``) or ``th += msk d``, and ``t64 = k0 th``; returns
    ``max |th|``."""
    m = _U0
    for k in range(n):
        p = b0 + k
        v = msk[p] * np.float64(d[p]) if first else _fma(msk[p], np.float64(d[p]), th[p])
        th[p] = v
        t64[p] = k0[p] * v
        m = max(m, _abs_bits(v))
    return _from_bits(m)


@nb.njit(cache=True, error_model="numpy")
def _theta_residual(t64, x, th, msk, sw2, F, Ff, vs, b0, n, wp, r, inv_q):
    """``F = msk (x - (th - sw2 M t64))`` (the residual of the Theta equation at
    ``t64 = k0 th``) and ``Ff = float32(F)``; returns ``max |F|``."""
    _box(t64, F, vs, b0, n, wp, r, inv_q)
    m = _U0
    for k in range(n):
        p = b0 + k
        v = msk[p] * (x[p] - _fma(-sw2, F[p], th[p]))
        F[p] = v
        Ff[p] = np.float32(v)
        m = max(m, _abs_bits(v))
    return _from_bits(m)


@nb.njit(cache=True, error_model="numpy")
def _spectrum(k0f, b0, n, sw2, m_lo, m_hi, check_sign, kmax):
    """Bounds ``(lo, hi)`` of the spectrum of ``I - sw2 M diag(k0f)`` on the slice (``k0f``
    float32, the operator the Chebyshev solves apply), given the box mean's
    ``[m_lo, m_hi]`` and ``kmax = max |k0f|`` (the ReLU dual maps return it); ``lo <= 0``
    (or ``k0f < 0`` when ``check_sign``, for activations whose ``k0`` may be negative, for
    which this function takes ``kmax`` itself) means the Chebyshev solves do not apply."""
    if check_sign:
        kmin = _ZEROf
        for k in range(n):
            kmin = min(kmin, k0f[b0 + k])
        if kmin < _ZEROf:
            return -1.0, 1.0  # indefinite Jacobian: Anderson in the robust solver
        kmax = _amax32(k0f, b0, n)
    return 1.0 - sw2 * kmax * m_hi, 1.0 - sw2 * kmax * m_lo


@nb.njit(cache=True, error_model="numpy")
def _cheb_steps(eta, lo, hi):
    """Chebyshev steps that reduce the error by ``eta`` on the spectrum ``[lo, hi]``."""
    if hi - lo <= 1e-12 * hi:
        return 1
    sigma = (hi + lo) / (hi - lo)
    # the least m with T_m(sigma) = cosh(m acosh(sigma)) >= 1/eta, by the three-term
    # recurrence (a few flops per step instead of two calls to acosh)
    target = 1.0 / eta
    t_old, t = 1.0, sigma
    for m in range(1, 64):
        if t >= target:
            return m
        t_old, t = t, 2.0 * sigma * t - t_old
    return max(64, int(math.ceil(math.acosh(target) / math.acosh(sigma))))


@nb.njit(cache=True, error_model="numpy")
def _chebyshev(k0, b, xa, xb, ta, tb, vs, b0, n, wp, r, inv_q, sw2, steps, lo, hi):
    """Solve ``(I - sw2 M diag(k0)) x = b`` (float32) by ``steps`` Chebyshev steps from 0.

    Three-term recurrence on the true residual ``b - J x_k`` (Saad, Alg. 12.1); the box
    inputs ``t = k0 x`` are kept for the next step.  ``ta``/``tb`` must be zero on the pad
    rows.  Returns the array (``xa`` or ``xb``) that holds the solution.

    The first two steps are the general step with the zeros of the start substituted
    (``x_0 = t_0 = 0``: ``x_1 = fma(c2, b, 0)``; ``x_1 - x_0 = x_1``), which computes the
    same bits without zeroing ``xa``, ``xb``, ``ta`` or summing the zero box input.
    """
    theta = 0.5 * (hi + lo)
    delta = 0.5 * (hi - lo)
    sigma = theta / delta if delta > 0.0 else 1e300
    rho_old = 0.0
    cur_x, old_x, cur_t, new_t = xa, xb, ta, tb
    c = np.float32(sw2 * inv_q) if r == 1 else np.float32(sw2)
    lo_b = b0 - r
    for it in range(steps):
        if it == 0:
            rho = 1.0 / sigma
            c1 = _ZEROf
            c2 = np.float32(1.0 / theta)
        else:
            rho = 1.0 / (2.0 * sigma - rho_old)
            c1 = np.float32(rho * rho_old)
            c2 = np.float32(2.0 * rho / delta)
        if it == 0:  # x = t = 0: res = b
            for k in range(n):
                p = b0 + k
                xn = _fma(c2, b[p], _ZEROf)
                old_x[p] = xn
                new_t[p] = k0[p] * xn
        elif r == 1:
            _vsum3(cur_t, vs, b0, n, wp)
            if it == 1:  # old x = 0 (a loop of its own: a select in the loop would not vectorise)
                for k in range(n):
                    p = b0 + k
                    q = (vs[lo_b + k] + vs[p]) + vs[p + _U1]
                    xk = cur_x[p]
                    res = b[p] - _fma(-c, q, xk)
                    xn = _fma(c2, res, _fma(c1, xk, xk))
                    old_x[p] = xn
                    new_t[p] = k0[p] * xn
            else:
                for k in range(n):
                    p = b0 + k
                    q = (vs[lo_b + k] + vs[p]) + vs[p + _U1]
                    xk = cur_x[p]
                    res = b[p] - _fma(-c, q, xk)
                    xn = _fma(c2, res, _fma(c1, xk - old_x[p], xk))
                    old_x[p] = xn
                    new_t[p] = k0[p] * xn
        else:
            _box(cur_t, new_t, vs, b0, n, wp, r, _ONEf)  # new_t <- M t (then overwritten)
            if it == 1:  # old x = 0
                for k in range(n):
                    p = b0 + k
                    xk = cur_x[p]
                    res = b[p] - _fma(-c, new_t[p] * np.float32(inv_q), xk)
                    xn = _fma(c2, res, _fma(c1, xk, xk))
                    old_x[p] = xn
                    new_t[p] = k0[p] * xn
            else:
                for k in range(n):
                    p = b0 + k
                    xk = cur_x[p]
                    res = b[p] - _fma(-c, new_t[p] * np.float32(inv_q), xk)
                    xn = _fma(c2, res, _fma(c1, xk - old_x[p], xk))
                    old_x[p] = xn
                    new_t[p] = k0[p] * xn
        rho_old = rho
        cur_x, old_x = old_x, cur_x
        cur_t, new_t = new_t, cur_t
    return cur_x


# --------------------------------------------------------------------------- a slice
@nb.njit(cache=True, error_model="numpy", inline="always")
def _zero_pads(msk, s, inv_s, vx, vy, lo, hi):
    """Zero the per-pixel slice inputs on the pad entries ``[lo, hi)``."""
    for k in range(lo, hi):
        msk[k] = 0.0
        s[k] = 0.0
        inv_s[k] = 0.0
        vx[k] = 0.0
        vy[k] = 0.0


@nb.njit(cache=True, error_model="numpy")
def _load(Xi, Yj, vxi, vyj, sxi, syj, isxi, isyj, d1, d2, H, W, C, r, su2, sb2, same,
          need_v, fresh, w64, w32):  # fmt: skip
    """Fill the slice inputs (mask, s, 1/s, kb and, when ``need_v``, the self-covariances)
    for offset (d1, d2).

    ``fresh``: also write what depends only on the slice shape (the mask, the zeros on pad
    rows and pad columns); a caller may pass False when the workspaces last held a slice
    of the same shape, since no pass writes outside the band or to those entries.

    ``sxi``/``isxi`` are ``sqrt(v)`` / ``1/sqrt(v)`` of the image's self-covariances (0 where
    ``v = 0``), so ``s = sqrt(vx vy)`` and ``1/s`` are products.  Returns ``(h, w, scale)``
    with ``scale = max(s, |kb|)`` over the slice.  Rows read only over the band get zeros on
    its pad columns; ``kxy``, a box input, is zero everywhere outside the interior.
    """
    a0 = max(0, -d1)
    c0 = max(0, -d2)
    h = H - abs(d1)
    w = W - abs(d2)
    ru = _U(r)
    wu = _U(w)
    wp = wu + ru
    b0 = _band_start(ru, wp)
    nh = _U(h) * wp
    n = _band_length(h, wp)
    N = b0 + n + ru * wp + ru
    msk, s, inv_s, kxy = w64[_MSK], w64[_S], w64[_INVS], w64[_KXY]
    vx, vy = w64[_VX], w64[_VY]
    if fresh:
        for k in range(N):
            kxy[k] = 0.0
    inv_c = 1.0 / C
    for u in range(h):
        base = b0 + _U(u) * wp + ru
        if fresh:  # the r pads before row u are also the right pads of row u - 1
            _zero_pads(msk, s, inv_s, vx, vy, base - ru, base)
            for v in range(wu):
                msk[base + v] = 1.0
        xi0 = _U((a0 + u) * W + c0)
        yj0 = _U((a0 + d1 + u) * W + c0 + d2)
        # short loops over the row, one or two outputs each, so that each vectorises
        if C == 1:
            for v in range(wu):
                kxy[base + v] = Xi[xi0 + v, 0] * Yj[yj0 + v, 0]
        elif C == 3:  # the general loop's sum, unrolled (colour images), so that it vectorises
            for v in range(wu):
                i = xi0 + v
                j = yj0 + v
                acc = ((0.0 + Xi[i, 0] * Yj[j, 0]) + Xi[i, 1] * Yj[j, 1]) + Xi[i, 2] * Yj[j, 2]
                kxy[base + v] = acc * inv_c
        else:
            for v in range(wu):
                acc = 0.0
                for ch in range(C):
                    acc += Xi[xi0 + v, ch] * Yj[yj0 + v, ch]
                kxy[base + v] = acc * inv_c
        if need_v:
            for v in range(wu):
                vx[base + v] = vxi[xi0 + v]
                vy[base + v] = vyj[yj0 + v]
        for v in range(wu):
            s[base + v] = sxi[xi0 + v] * syj[yj0 + v]
            inv_s[base + v] = isxi[xi0 + v] * isyj[yj0 + v]
        if same:  # s = v exactly, so that x = s gives correlation 1
            for v in range(wu):
                p = base + v
                s[p] = vx[p]
                inv_s[p] = 1.0 / vx[p] if vx[p] > 0.0 else 0.0
    if fresh:  # the right pads of the last row and the band's own padding
        _zero_pads(msk, s, inv_s, vx, vy, b0 + nh, b0 + max(n, nh + ru))
    kb, kbf, sf, inv_sf = w64[_KB], w32[_KBf], w32[_Sf], w32[_INVSf]
    _box(kxy, kb, w64[_VS64], b0, n, wp, ru, 1.0 / ((2 * r + 1) * (2 * r + 1)))
    mk = _U0
    for k in range(n):
        p = b0 + k
        v = msk[p] * _fma(su2, kb[p], sb2)
        kb[p] = v
        kbf[p] = np.float32(v)
        mk = max(mk, _abs_bits(v))
    ms = _U0
    for k in range(n):
        p = b0 + k
        v = s[p]
        sf[p] = np.float32(v)
        inv_sf[p] = np.float32(inv_s[p])
        ms = max(ms, _abs_bits(v))
    scale = max(max(_from_bits(ms), _from_bits(mk)), 1e-300)
    if not fresh:
        return h, w, scale
    _to32(msk, w32[_MSKf], b0, n)
    # box inputs must be zero on the pad rows
    for row in (w64[_K1], w64[_T64]):
        for k in range(b0):
            row[k] = 0.0
        for k in range(b0 + n, N):
            row[k] = 0.0
    for row in (w32[_K1f], w32[_TA], w32[_TB]):
        for k in range(b0):
            row[k] = _ZEROf
        for k in range(b0 + n, N):
            row[k] = _ZEROf
    return h, w, scale


#: Degree of the polynomial start (:func:`_initial`); ``poly`` holds its 13 coefficients.
START_DEGREE = 12


@nb.njit(cache=True, error_model="numpy", inline="always")
def _start_poly(z, a):
    """``sum_k a[k] z^k`` (``k <= START_DEGREE``) by Horner's rule, unrolled."""
    p = a[START_DEGREE]
    for k in range(START_DEGREE - 1, -1, -1):
        p = _fma(p, z, a[k])
    return p


@nb.njit(cache=True, error_model="numpy")
def _initial(x, xf, s, inv_s, kb, table, t_max, inv_step, poly, u_poly, b0, n):
    """Pointwise start ``x = s rho(kb / s)``: the ReLU fixed point with ``M`` taken as the
    identity (exact where the slice is locally uniform, e.g. blank backgrounds), and
    ``xf = float32(x)``.

    ``rho`` is a function of ``u = sqrt(t_max - t)``: for ``u <= u_poly`` a polynomial in
    ``z = 2 u / u_poly - 1`` (``poly``, ascending; a vectorised pass), beyond it (and for
    every pixel when ``u_poly = 0``) linear interpolation in ``table``, held at
    ``u = k / inv_step`` (a scalar look-up pass, run only when some pixel needs it).
    """
    over = 0
    if u_poly > 0.0:
        zs = 2.0 / u_poly
        for kk in range(n):
            p = b0 + kk
            u = math.sqrt(max(t_max - kb[p] * inv_s[p], 0.0))
            v = s[p] * _start_poly(_fma(u, zs, -1.0), poly)
            x[p] = v
            xf[p] = np.float32(v)
            over += u > u_poly
        if over == 0:
            return
    last = _U(table.shape[0] - 2)
    for kk in range(n):  # unsigned index: u >= 0, clamped to the table
        p = b0 + kk
        u = math.sqrt(max(t_max - kb[p] * inv_s[p], 0.0))
        if u > u_poly or u_poly == 0.0:
            g = u * inv_step
            k = min(_U(g), last)
            f = min(g - np.float64(k), 1.0)
            t0 = table[k]
            v = s[p] * _fma(f, table[k + _U1] - t0, t0)
            x[p] = v
            xf[p] = np.float32(v)


@nb.njit(cache=True, error_model="numpy")
def fast_slice(
    act, use_quad, nodes, weights, sw2, su2, sb2, Xi, Yj, vxi, vyj, sxi, syj, isxi, isyj,
    d1, d2, H, W, C, r, wr, wc, same, tol, mu_lo, mu_hi, table, t_max, inv_step, poly, u_poly,
    fresh, w64, w32, out,
):  # fmt: skip
    """Sigma* and Theta* on one offset slice; ``out = (sum w Theta, sum w Sigma, residual,
    nonlinear evaluations, Chebyshev steps)`` with the separable readout weights
    ``wr[i] wc[j]``.  Returns False when the slice must go to the robust solver.
    ``fresh``: False only when ``w64``/``w32`` last held a slice of the same shape
    (:func:`_load`).
    """
    relu = act == 0 and not use_quad
    h, w, scale = _load(
        Xi, Yj, vxi, vyj, sxi, syj, isxi, isyj, d1, d2, H, W, C, r, su2, sb2, same,
        same or not relu, fresh, w64, w32,
    )  # fmt: skip
    ru = _U(r)
    wp = _U(w) + ru
    b0 = _band_start(ru, wp)
    n = _band_length(h, wp)
    inv_q = 1.0 / ((2 * r + 1) * (2 * r + 1))
    inv_qf = np.float32(inv_q)
    sw2f = np.float32(sw2)
    # spectrum of the 2-D box mean on this slice
    m_hi = max(mu_hi[h] * mu_hi[w], mu_lo[h] * mu_lo[w])
    m_lo = min(mu_lo[h] * mu_hi[w], mu_hi[h] * mu_lo[w])
    msk, s, inv_s, kb, x = w64[_MSK], w64[_S], w64[_INVS], w64[_KB], w64[_X]
    k1, k0, F = w64[_K1], w64[_K0], w64[_F64]
    vs64 = w64[_VS64]
    mskf, sf, inv_sf, kbf, xf = w32[_MSKf], w32[_Sf], w32[_INVSf], w32[_KBf], w32[_Xf]
    k1f, k0f, Ff = w32[_K1f], w32[_K0f], w32[_Ff]
    xa, xb, ta, tb, vsf = w32[_XA], w32[_XB], w32[_TA], w32[_TB], w32[_VSf]
    vx = w64[_VX]
    # x and xf = float32(x) from here on (the Newton updates write both)
    if same:
        for k in range(n):
            x[b0 + k] = vx[b0 + k]
            xf[b0 + k] = np.float32(vx[b0 + k])
    elif relu:
        _initial(x, xf, s, inv_s, kb, table, t_max, inv_step, poly, u_poly, b0, n)
    else:
        for k in range(n):
            x[b0 + k] = kb[b0 + k]
            xf[b0 + k] = kbf[b0 + k]
    evals = 0
    steps = 0
    kmax = 0.0  # max k0f, from the ReLU dual maps (other activations: _spectrum takes it)
    # ---- Newton, float32 evaluations while the residual is large (ReLU)
    prev = math.inf
    if relu and not same:
        while evals < MAX_NEWTON:
            kmax = _relu32(xf, sf, inv_sf, k1f, k0f, b0, n)
            amax = _residual(k1f, Ff, Ff, kbf, xf, mskf, sw2f, vsf, b0, n, wp, ru, inv_qf, False)
            evals += 1
            rel = amax / scale
            if not math.isfinite(rel):
                return False
            if rel > 0.5 * prev:
                break  # float32 no longer helps: evaluate in float64
            prev = rel
            lo, hi = _spectrum(k0f, b0, n, sw2, m_lo, m_hi, False, kmax)
            if not lo > 0.0:
                return False
            eta = min(0.1, max(ETA_MIN, rel, F32_FLOOR / rel))
            m = _cheb_steps(eta, lo, hi)
            d = _chebyshev(k0f, Ff, xa, xb, ta, tb, vsf, b0, n, wp, ru, inv_q, sw2, m, lo, hi)
            steps += m
            _add_masked(x, d, msk, xf, b0, n)
            if rel <= SWITCH_F64:
                break
    # ---- Newton, float64 evaluations
    prev = math.inf
    res_s = math.inf
    while True:
        if relu:
            kmax = _relu64(x, s, inv_s, k1, k0, k0f, b0, n, same)
        else:
            _generic64(act, use_quad, nodes, weights, msk, vx, w64[_VY], x, k1, k0, b0, n)
            _to32(k0, k0f, b0, n)
        amax = _residual(k1, F, Ff, kb, x, msk, sw2, vs64, b0, n, wp, ru, inv_q, True)
        evals += 1
        rel = amax / scale
        if not math.isfinite(rel):
            return False
        if rel <= tol:
            res_s = rel
            break
        if rel > 0.5 * prev or evals >= MAX_NEWTON:
            return False
        prev = rel
        lo, hi = _spectrum(k0f, b0, n, sw2, m_lo, m_hi, not relu, kmax)
        if not lo > 0.0:
            return False
        eta = min(0.1, max(ETA_MIN, 0.3 * tol / rel, rel))
        m = _cheb_steps(eta, lo, hi)
        d = _chebyshev(k0f, Ff, xa, xb, ta, tb, vsf, b0, n, wp, ru, inv_q, sw2, m, lo, hi)
        steps += m
        _add_masked(x, d, msk, xf, b0, n)
    # ---- Theta*: float32 Chebyshev refined by float64 residuals; k0 is at Sigma*
    lo, hi = _spectrum(k0f, b0, n, sw2, m_lo, m_hi, not relu, kmax)
    if not lo > 0.0:
        return False
    th, t64 = w64[_TH], w64[_T64]
    m = _cheb_steps(ETA_MIN, lo, hi)
    d = _chebyshev(k0f, xf, xa, xb, ta, tb, vsf, b0, n, wp, ru, inv_q, sw2, m, lo, hi)
    steps += m
    tmax = _theta_update(th, t64, k0, d, msk, b0, n, True)
    prev = math.inf
    res_t = math.inf
    for _ in range(MAX_ROUNDS):
        amax_f = _theta_residual(t64, x, th, msk, sw2, F, Ff, vs64, b0, n, wp, ru, inv_q)
        rel = amax_f / max(tmax, 1e-300)
        if not math.isfinite(rel):
            return False
        if rel <= tol:
            res_t = rel
            break
        if rel > 0.5 * prev:
            return False
        prev = rel
        m = _cheb_steps(min(0.1, max(ETA_MIN, 0.3 * tol / rel)), lo, hi)
        d = _chebyshev(k0f, Ff, xa, xb, ta, tb, vsf, b0, n, wp, ru, inv_q, sw2, m, lo, hi)
        steps += m
        tmax = _theta_update(th, t64, k0, d, msk, b0, n, False)
    if not res_t <= tol:
        return False
    # readout sum_v wc[v] sum_u wr[u] (.)[u, v]: the row weights applied along the rows
    # (vector operations over v), then one short sum over the columns
    ct, cs = F, vs64  # scratch rows now
    wu = _U(w)
    for v in range(wu):
        ct[v] = 0.0
        cs[v] = 0.0
    for u in range(h):
        base = b0 + _U(u) * wp + ru
        wr_u = wr[u]
        for v in range(wu):
            ct[v] = _fma(wr_u, th[base + v], ct[v])
            cs[v] = _fma(wr_u, x[base + v], cs[v])
    st = 0.0
    ss = 0.0
    for v in range(wu):
        st = _fma(wc[v], ct[v], st)
        ss = _fma(wc[v], cs[v], ss)
    out[0] = st
    out[1] = ss
    out[2] = max(res_s, res_t)
    out[3] = evals
    out[4] = steps
    return True


# ------------------------------------------------------------------ tasks of a tile
@nb.njit(cache=True, error_model="numpy")
def _robust_slice(
    act, use_quad, nodes, weights, sw2, su2, sb2, Xi, Yj, vxi, vyj, d1, d2, H, W, C, r,
    wr, wc, same, tol, max_iter, m, method, ws, dF, dG, gram, small, out,
):  # fmt: skip
    """The previous per-slice solvers (Newton-CG / Anderson / plain iteration) with the
    readout weights applied to the Theta* and Sigma* they leave in ``ws``."""
    h, w = _load_slice(Xi, Yj, vxi, vyj, d1, d2, H, W, C, r, su2, sb2, ws)
    if method == 2:
        _plain_slice(act, use_quad, nodes, weights, sw2, h, w, r, ws, tol, max_iter, out)
    else:
        _solve_slice(
            act, use_quad, nodes, weights, sw2, h, w, r, ws, dF, dG, gram, small, tol,
            max_iter, m, method != 1, same, out,
        )  # fmt: skip
    th, x = ws[_W_TH], ws[_W_X]
    st = 0.0
    ss = 0.0
    for u in range(h):
        rt = 0.0
        rs = 0.0
        for v in range(w):
            rt += wc[v] * th[u * w + v]
            rs += wc[v] * x[u * w + v]
        st += wr[u] * rt
        ss += wr[u] * rs
    out[0] = st
    out[1] = ss


@nb.njit(cache=True)
def _chunk_tasks(c, n_chunks, n_off, n_pairs, by_offset):
    """Number of tasks of chunk ``c`` (see :func:`_chunk_task`)."""
    if by_offset:
        return (n_off - c + n_chunks - 1) // n_chunks * n_pairs
    return (n_off * n_pairs - c + n_chunks - 1) // n_chunks


@nb.njit(cache=True)
def _chunk_task(c, j, n_chunks, n_off, n_pairs, by_offset):
    """Offset and pair ``(o, q)`` of the ``j``-th task of chunk ``c``.

    Tasks of one offset run back to back (the slice shape, hence the loop trip counts and
    the shape-only workspace entries, repeat: 1.2x on gap tiles): with many offsets
    (``by_offset``) chunk ``c`` takes offsets ``c, c + n_chunks, ...``, each for every pair;
    otherwise every ``n_chunks``-th task of the offset-major order.
    """
    if by_offset:
        return c + j // n_pairs * n_chunks, j % n_pairs
    k = c + j * n_chunks
    return k // n_pairs, k % n_pairs


@nb.njit(cache=True)
def _alive(*arrays):
    """Nothing: a use of the arrays, which numba keeps alive until this call."""
    return None


@nb.njit(cache=True, parallel=True, error_model="numpy")
def pair_tasks(
    act, use_quad, nodes, weights, sw2, su2, sb2, H, W, r, X, Y, VX, VY, SX, SY, ISX, ISY,
    pi, pj, d1s, d2s, WR, WC, tol, max_iter, m, method, mu_lo, mu_hi, table, t_max, inv_step,
    poly, u_poly, threads, out,
):  # fmt: skip
    """prange over (pair, offset) tasks: ``out[t] = (sum w Theta, sum w Sigma, residual,
    nonlinear evaluations, linear iterations, robust)``.

    X, Y: (n, H*W, C); VX, VY: (n, H*W) self-covariances, SX, SY their square roots and
    ISX, ISY the reciprocals of those (0 where v = 0); ``table``, ``t_max``, ``inv_step``,
    ``poly``, ``u_poly``: the ReLU start (:func:`_initial`); ``threads``: numba's current
    thread count;
    task ``t`` is the pair ``(pi[t // n_off], pj[t // n_off])`` at offset
    ``(d1s[o], d2s[o])``, ``o = t % n_off``, read out with the weights ``WR[o, :h]`` (rows)
    and ``WC[o, :w]`` (columns).  ``method``: 0 the Newton-Chebyshev solver of this module
    (a slice it cannot solve goes to the robust one), 1 Anderson, 2 plain iteration,
    3 the previous Newton-CG.
    """
    n_tasks = out.shape[0]
    n_off = d1s.shape[0]
    C = X.shape[2]
    P = H * W
    mm = max(m, 1)
    L = slice_length(H, W, r)
    # a few chunks of interleaved tasks per thread, each with its workspaces allocated once
    # (fresh memory per task costs page faults and cold caches: 1.5x on gap tiles); every
    # array a solve reads it writes first (or, for the shape-only entries, last wrote with
    # the same values), so the chunking cannot change any bits
    n_chunks = max(1, min(n_tasks, 8 * threads))
    n_pairs = n_tasks // n_off
    by_offset = n_off >= 4 * n_chunks
    # borrowed views (no reference counting, see .intrinsics): the arguments live for the
    # call, the workspaces until their last use after the loop
    X, Y, VX, VY = _borrow(X), _borrow(Y), _borrow(VX), _borrow(VY)
    SX, SY, ISX, ISY = _borrow(SX), _borrow(SY), _borrow(ISX), _borrow(ISY)
    WR, WC, out = _borrow(WR), _borrow(WC), _borrow(out)
    nodes, weights, table = _borrow(nodes), _borrow(weights), _borrow(table)
    poly = _borrow(poly)
    mu_lo, mu_hi = _borrow(mu_lo), _borrow(mu_hi)
    for c in nb.prange(n_chunks):
        ws64, own64 = _aligned_rows(ROWS64, L, np.float64)
        ws32, own32 = _aligned_rows(ROWS32, L, np.float32)
        own_ws = np.empty((WORKSPACE_ROWS, P + 2 * r * H))
        own_dF = np.empty((mm, P))
        own_dG = np.empty((mm, P))
        own_gram = np.zeros((mm, mm))
        own_small = np.empty((mm + 2, mm))
        w64, w32, ws = _borrow(ws64), _borrow(ws32), _borrow(own_ws)
        dF, dG = _borrow(own_dF), _borrow(own_dG)
        gram, small = _borrow(own_gram), _borrow(own_small)
        last_h = -1
        last_w = -1
        for j in range(_chunk_tasks(c, n_chunks, n_off, n_pairs, by_offset)):
            o, q = _chunk_task(c, j, n_chunks, n_off, n_pairs, by_offset)
            t = q * n_off + o
            a = pi[q]
            b = pj[q]
            d1 = d1s[o]
            d2 = d2s[o]
            h = H - abs(d1)
            w = W - abs(d2)
            fresh = h != last_h or w != last_w
            same = d1 == 0 and d2 == 0 and _identical(X[a], Y[b], VX[a], VY[b])
            row = out[t]
            row[5] = 0.0
            if method == 0 and fast_slice(
                act, use_quad, nodes, weights, sw2, su2, sb2, X[a], Y[b], VX[a], VY[b],
                SX[a], SY[b], ISX[a], ISY[b], d1, d2, H, W, C, r, WR[o], WC[o], same, tol,
                mu_lo, mu_hi, table, t_max, inv_step, poly, u_poly, fresh, w64, w32, row,
            ):  # fmt: skip
                last_h, last_w = h, w
                continue
            if method == 0:
                last_h, last_w = h, w
            row[5] = 1.0 if method == 0 else 0.0
            _robust_slice(
                act, use_quad, nodes, weights, sw2, su2, sb2, X[a], Y[b], VX[a], VY[b], d1,
                d2, H, W, C, r, WR[o], WC[o], same, tol, max_iter, m, method, ws, dF, dG,
                gram, small, row,
            )  # fmt: skip
        _alive(own64, own32, own_ws, own_dF, own_dG, own_gram, own_small)
