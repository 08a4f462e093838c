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
  by Anderson acceleration (type II, history ``m``) of the fixed-point map.  The Jacobian
  ``sw2 M diag(k0)`` has spectral radius <= sw2/2 < 1 for ReLU.
* ``Theta* = Sigma* + sw2 M (k0 * Theta*)`` is linear; with ``d = sqrt(k0)`` and
  ``w = d * Theta`` it is the SPD system ``(I - sw2 D M D) w = d * Sigma*`` (M is symmetric),
  solved by conjugate gradients; ``Theta = Sigma + sw2 M (d * w)``.  Activations whose ``k0``
  can be negative fall back to Anderson on the linear map.

Bitwise reproducibility: every solve is per image pair and per slice, with its own
convergence test and iteration count; every loop runs over the pixels of one slice in a fixed
order (dot products use a fixed 8-way split), so an entry's bits depend only on its two images
and their self-covariances, never on the tile, the batch or the thread count.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ..errors import InputError
from ..spec import CDEQSpec
from .common import KernelResult, raise_failures
from .duals import ACTIVATION_IDS, gauss_hermite, k1k0, uses_quadrature

__all__ = ["conv_kernel", "conv_self_covariance", "DEFAULT_MEMORY_BUDGET", "DEFAULT_TOL"]

#: Relative fixed-point residual every pixel-pair solve is driven to.
DEFAULT_TOL = 1e-13
#: Largest number of accelerated iterations per solve before it is reported as failed.
DEFAULT_MAX_ITER = 400
#: Anderson history length.
DEFAULT_HISTORY = 5
_SOLVERS = ("newton", "anderson", "plain")
#: Working memory a tile may use for its sub-batches of image pairs (bytes).
DEFAULT_MEMORY_BUDGET = 1 << 30

_PI = math.pi
_HALF_PI = 0.5 * math.pi
_INV_2PI = 1.0 / (2.0 * math.pi)
# fdlibm asin rational approximation: asin(x) = x + x R(x^2) on |x| < 0.5 and
# acos(|x|) = 2 (s + s R(t)), t = (1 - |x|)/2, s = sqrt(t) on |x| >= 0.5
_PS0 = 1.66666666666666657415e-01
_PS1 = -3.25565818622400915405e-01
_PS2 = 2.01212532134862925881e-01
_PS3 = -4.00555345006794114027e-02
_PS4 = 7.91534994289814532176e-04
_PS5 = 3.47933107596021167570e-05
_QS1 = -2.40339491173441421878e00
_QS2 = 2.02094576023350569471e00
_QS3 = -6.88283971605453293030e-01
_QS4 = 7.70381505559019352791e-02

# workspace rows of one slice solve (each of length H*W)
_W_S, _W_INVS, _W_KB, _W_VX, _W_VY, _W_X, _W_G, _W_F, _W_FO, _W_GO = range(10)
_W_K1, _W_K0, _W_D, _W_R, _W_P, _W_AP, _W_Q, _W_TH, _W_TMP = range(10, 19)
_W_FIXED = 19


# ------------------------------------------------------------------ pixel-level primitives
@nb.njit(cache=True, inline="always", error_model="numpy")
def _dot(a, b, n):
    """Dot product with a fixed 8-way split: bits independent of anything but ``n``."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    n8 = n - n % 8
    for i in range(0, n8, 8):
        s0 += a[i] * b[i]
        s1 += a[i + 1] * b[i + 1]
        s2 += a[i + 2] * b[i + 2]
        s3 += a[i + 3] * b[i + 3]
        s4 += a[i + 4] * b[i + 4]
        s5 += a[i + 5] * b[i + 5]
        s6 += a[i + 6] * b[i + 6]
        s7 += a[i + 7] * b[i + 7]
    for i in range(n8, n):
        s0 += a[i] * b[i]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@nb.njit(cache=True, error_model="numpy")
def _box(src, dst, tmp, h, w, r, inv_q):
    """``dst = M src``: zero-padded (2r+1)^2 box mean on an h x w rectangle (row-major).

    ``tmp`` needs ``h * (w + 2r)`` entries.  Vertical sums first, then horizontal sums over
    zero-padded rows, so the inner loops have fixed trip counts.
    """
    wp = w + 2 * r
    for i in range(h):
        i0 = max(0, i - r)
        i1 = min(h, i + r + 1)
        base = i * wp
        for j in range(r):
            tmp[base + j] = 0.0
            tmp[base + r + w + j] = 0.0
        for j in range(w):
            tmp[base + r + j] = src[i0 * w + j]
        for ii in range(i0 + 1, i1):
            for j in range(w):
                tmp[base + r + j] += src[ii * w + j]
    k = 2 * r + 1
    for i in range(h):
        base = i * wp
        row = dst[i * w : (i + 1) * w]
        for j in range(w):
            row[j] = tmp[base + j]
        for b in range(1, k):
            for j in range(w):
                row[j] += tmp[base + j + b]
        for j in range(w):
            row[j] *= inv_q


@nb.njit(cache=True, error_model="numpy")
def _relu_eval(x, s, inv_s, k1, k0, n):
    """ReLU dual maps at covariances ``x`` (vectorisable: selects, no calls but sqrt)."""
    for p in range(n):
        # a division, not x * (1/s): x == s must give rho == 1 exactly (identical images)
        rho = min(max(x[p] / s[p], -1.0), 1.0) if s[p] > 0.0 else 0.0
        a = abs(rho)
        small = a < 0.5
        t = rho * rho if small else 0.5 * (1.0 - a)
        num = t * (_PS0 + t * (_PS1 + t * (_PS2 + t * (_PS3 + t * (_PS4 + t * _PS5)))))
        den = 1.0 + t * (_QS1 + t * (_QS2 + t * (_QS3 + t * _QS4)))
        R = num / den
        sq = math.sqrt(t)
        half = 2.0 * (sq + sq * R)  # acos(|rho|) when |rho| >= 0.5
        pm = _HALF_PI + (rho + rho * R) if small else (_PI - half if rho > 0.0 else half)
        kk = pm * _INV_2PI  # (pi - theta) / (2 pi)
        sn = math.sqrt((1.0 - rho) * (1.0 + rho))
        k0[p] = kk if s[p] > 0.0 else 0.0
        k1[p] = s[p] * (sn * _INV_2PI + kk * rho)


@nb.njit(cache=True, error_model="numpy")
def _generic_eval(act, use_quad, vx, vy, x, k1, k0, n, nodes, weights):
    for p in range(n):
        k1[p], k0[p] = k1k0(act, use_quad, vx[p], vy[p], x[p], nodes, weights)


@nb.njit(cache=True, error_model="numpy")
def _aa_step(k, m, n, x, g, f, fo, go, dF, dG, gram, small):
    """One Anderson (type II) update: ``x <- g - dG gamma``, ``gamma = argmin |f - dF gamma|``.

    ``k`` counts the (f, g) pairs seen since the last restart; histories are ring buffers
    of length ``m``.  Returns False when the least-squares system broke down (caller
    restarts with ``x = g``).
    """
    ok = True
    if k > 0 and m > 0:
        pos = (k - 1) % m
        for p in range(n):
            dF[pos, p] = f[p] - fo[p]
            dG[pos, p] = g[p] - go[p]
        for j in range(min(k, m)):
            v = _dot(dF[pos], dF[j], n)
            gram[pos, j] = v
            gram[j, pos] = v
    for p in range(n):
        fo[p] = f[p]
        go[p] = g[p]
        x[p] = g[p]
    nh = min(k, m)
    if nh == 0:
        return ok
    # scaled normal equations with a tiny ridge, Cholesky in ``small``
    L = small[:nh, :nh]
    dsc = small[nh, :nh]
    y = small[nh + 1, :nh]
    for j in range(nh):
        if not gram[j, j] > 0.0:
            return False
        dsc[j] = 1.0 / math.sqrt(gram[j, j])
    for i in range(nh):
        y[i] = _dot(dF[i], f, n) * dsc[i]
        for j in range(i + 1):
            v = gram[i, j] * dsc[i] * dsc[j] + (1e-13 if i == j else 0.0)
            for t in range(j):
                v -= L[i, t] * L[j, t]
            if i == j:
                if not v > 0.0:
                    return False
                L[i, i] = math.sqrt(v)
            else:
                L[i, j] = v / L[j, j]
    for i in range(nh):
        v = y[i]
        for t in range(i):
            v -= L[i, t] * y[t]
        y[i] = v / L[i, i]
    for i in range(nh - 1, -1, -1):
        v = y[i]
        for t in range(i + 1, nh):
            v -= L[t, i] * y[t]
        y[i] = v / L[i, i]
    for j in range(nh):
        gam = y[j] * dsc[j]
        if not math.isfinite(gam):
            for p in range(n):
                x[p] = g[p]
            return False
        for p in range(n):
            x[p] -= gam * dG[j, p]
    return ok


# ---------------------------------------------------------------------- one slice solve
@nb.njit(cache=True, error_model="numpy")
def _solve_slice(act, use_quad, nodes, weights, sw2, h, w, r, ws, dF, dG, gram, small,
                 tol, max_iter, m, newton, same, out):
    """Sigma* and Theta* on one offset slice; inputs in ``ws`` rows VX, VY, KB.

    ``same``: the slice is offset 0 of an image with itself, whose exact solution is the
    self-covariance (correlation exactly 1): the iteration starts there and stops at once.
    Started anywhere else it would stop ``tol`` short of correlation 1, where ``k0`` has a
    square-root singularity (an error of 1e-13 in Sigma would be ~1e-7 in Theta).

    Writes ``out = (sum Theta, sum Sigma, residual, sigma iterations, theta iterations)``;
    residual is +inf when a solve did not converge.
    """
    n = h * w
    inv_q = 1.0 / ((2 * r + 1) * (2 * r + 1))
    vx, vy, kb = ws[_W_VX], ws[_W_VY], ws[_W_KB]
    s, inv_s, x, g, f = ws[_W_S], ws[_W_INVS], ws[_W_X], ws[_W_G], ws[_W_F]
    fo, go, k1, k0, tmp = ws[_W_FO], ws[_W_GO], ws[_W_K1], ws[_W_K0], ws[_W_TMP]
    relu = act == 0 and not use_quad
    scale = 1e-300
    for p in range(n):
        s[p] = math.sqrt(vx[p] * vy[p])
        inv_s[p] = 1.0 / s[p] if s[p] > 0.0 else 0.0
        scale = max(scale, s[p], abs(kb[p]))
        x[p] = vx[p] if same else kb[p]
    # ---- Sigma*: Newton-Krylov (CG on the symmetrised Jacobian), Anderson as fallback
    res_s = math.inf
    its_s = 0
    its_lin = 0
    k = 0
    mm = m
    prev = math.inf
    for it in range(max_iter):
        if relu:
            _relu_eval(x, s, inv_s, k1, k0, n)
        else:
            _generic_eval(act, use_quad, vx, vy, x, k1, k0, n, nodes, weights)
        _box(k1, g, tmp, h, w, r, inv_q)
        rmax = 0.0
        kmin = 0.0
        for p in range(n):
            g[p] = sw2 * g[p] + kb[p]
            f[p] = g[p] - x[p]
            rmax = max(rmax, abs(f[p]))
            kmin = min(kmin, k0[p])
        its_s = it + 1
        if not math.isfinite(rmax):
            break
        if rmax <= tol * scale:
            res_s = rmax / scale
            break
        if newton and kmin >= 0.0 and rmax < 2.0 * prev:
            # inexact Newton step: J delta = F(x) - x to relative accuracy sqrt(residual)
            eta = min(0.1, math.sqrt(rmax / scale))
            ci = _cg(sw2, h, w, r, inv_q, ws, f, k0, g, eta, max_iter)
            its_lin += abs(ci)
            if ci > 0:
                prev = rmax
                for p in range(n):
                    x[p] += g[p]
                continue
            for p in range(n):
                g[p] = x[p] + f[p]
        newton = False  # Anderson from here on (negative k0, breakdown, no progress)
        if _aa_step(k, mm, n, x, g, f, fo, go, dF, dG, gram, small):
            k += 1
        else:
            k = 0
    # x is Sigma*, k0 is evaluated at x
    kmin = math.inf
    for p in range(n):
        kmin = min(kmin, k0[p])
    th = ws[_W_TH]
    if kmin >= 0.0:
        its_t = _cg(sw2, h, w, r, inv_q, ws, x, k0, th, 0.05 * tol, max_iter)
    else:
        its_t = _theta_anderson(sw2, h, w, r, inv_q, ws, x, k0, th, dF, dG, gram, small,
                                tol, max_iter, mm)
    # true residual of the Theta equation
    q = ws[_W_Q]
    for p in range(n):
        f[p] = k0[p] * th[p]
    _box(f, q, tmp, h, w, r, inv_q)
    tmax = 1e-300
    rmax = 0.0
    st = 0.0
    ss = 0.0
    for p in range(n):
        rmax = max(rmax, abs(th[p] - x[p] - sw2 * q[p]))
        tmax = max(tmax, abs(th[p]))
        st += th[p]
        ss += x[p]
    res_t = rmax / tmax
    if not (res_t <= 100.0 * tol) or its_t < 0:
        res_t = math.inf
    out[0] = st
    out[1] = ss
    out[2] = max(res_s, res_t)
    out[3] = its_s
    out[4] = abs(its_t) + its_lin


@nb.njit(cache=True, error_model="numpy")
def _cg(sw2, h, w, r, inv_q, ws, src, k0, out, rel_tol, max_iter):
    """``out = (I - sw2 M diag(k0))^-1 src`` by CG on the SPD form (k0 >= 0).

    With ``d = sqrt(k0)`` and ``v = d * out``: ``(I - sw2 D M D) v = d * src``, then
    ``out = src + sw2 M (d * v)``.  Stops when the CG residual is at most
    ``rel_tol * max|d * src|``.  Returns the iterations (negative: breakdown / no
    convergence, i.e. the operator is not positive definite).  ``out`` doubles as scratch.
    """
    n = h * w
    d, rv, pv, ap, q, tmp = ws[_W_D], ws[_W_R], ws[_W_P], ws[_W_AP], ws[_W_Q], ws[_W_TMP]
    v = ws[_W_FO]
    bmax = 0.0
    for p in range(n):
        d[p] = math.sqrt(k0[p])
        rv[p] = d[p] * src[p]
        pv[p] = rv[p]
        v[p] = 0.0
        bmax = max(bmax, abs(rv[p]))
    rr = _dot(rv, rv, n)
    its = 0
    ok = True
    if bmax > 0.0:
        ok = False
        for it in range(max_iter):
            its = it + 1
            for p in range(n):
                out[p] = d[p] * pv[p]
            _box(out, q, tmp, h, w, r, inv_q)
            for p in range(n):
                ap[p] = pv[p] - sw2 * d[p] * q[p]
            pap = _dot(pv, ap, n)
            if not pap > 0.0:
                break  # not positive definite: the fixed point does not exist
            alpha = rr / pap
            rmax = 0.0
            for p in range(n):
                v[p] += alpha * pv[p]
                rv[p] -= alpha * ap[p]
                rmax = max(rmax, abs(rv[p]))
            if rmax <= rel_tol * bmax:
                ok = True
                break
            rr_new = _dot(rv, rv, n)
            beta = rr_new / rr
            rr = rr_new
            for p in range(n):
                pv[p] = rv[p] + beta * pv[p]
    for p in range(n):
        out[p] = d[p] * v[p]
    _box(out, q, tmp, h, w, r, inv_q)
    for p in range(n):
        out[p] = src[p] + sw2 * q[p]
    return its if ok else -max(its, 1)


@nb.njit(cache=True, error_model="numpy")
def _theta_anderson(sw2, h, w, r, inv_q, ws, S, k0, th, dF, dG, gram, small, tol, max_iter, m):
    """Anderson on the linear map ``T -> S + sw2 M (k0 T)`` (k0 of any sign)."""
    n = h * w
    g, f, fo, go, q, tmp = ws[_W_G], ws[_W_F], ws[_W_FO], ws[_W_GO], ws[_W_Q], ws[_W_TMP]
    scale = 1e-300
    for p in range(n):
        th[p] = S[p]
        scale = max(scale, abs(S[p]))
    k = 0
    for it in range(max_iter):
        for p in range(n):
            q[p] = k0[p] * th[p]
        _box(q, g, tmp, h, w, r, inv_q)
        rmax = 0.0
        for p in range(n):
            g[p] = S[p] + sw2 * g[p]
            f[p] = g[p] - th[p]
            rmax = max(rmax, abs(f[p]))
        if not math.isfinite(rmax):
            return -(it + 1)
        if rmax <= 0.05 * tol * scale:
            return it + 1
        if _aa_step(k, m, n, th, g, f, fo, go, dF, dG, gram, small):
            k += 1
        else:
            k = 0
    return -max_iter


@nb.njit(cache=True, error_model="numpy")
def _plain_slice(act, use_quad, nodes, weights, sw2, h, w, r, ws, tol, max_iter, out):
    """Reference: plain forward iteration of the layer recursion (Sigma_h, Theta_h) jointly,
    until both change by at most ``tol`` (relative), as an unrolled network would."""
    n = h * w
    inv_q = 1.0 / ((2 * r + 1) * (2 * r + 1))
    vx, vy, kb = ws[_W_VX], ws[_W_VY], ws[_W_KB]
    s, inv_s, x, g, th = ws[_W_S], ws[_W_INVS], ws[_W_X], ws[_W_G], ws[_W_TH]
    k1, k0, q, f, tmp = ws[_W_K1], ws[_W_K0], ws[_W_Q], ws[_W_F], ws[_W_TMP]
    relu = act == 0 and not use_quad
    scale = 1e-300
    for p in range(n):
        s[p] = math.sqrt(vx[p] * vy[p])
        inv_s[p] = 1.0 / s[p] if s[p] > 0.0 else 0.0
        scale = max(scale, s[p], abs(kb[p]))
        x[p] = kb[p]
        th[p] = kb[p]
    res = math.inf
    its = max_iter
    for it in range(max_iter):
        if relu:
            _relu_eval(x, s, inv_s, k1, k0, n)
        else:
            _generic_eval(act, use_quad, vx, vy, x, k1, k0, n, nodes, weights)
        _box(k1, g, tmp, h, w, r, inv_q)
        for p in range(n):
            f[p] = k0[p] * th[p]
        _box(f, q, tmp, h, w, r, inv_q)
        rs = 0.0
        rt = 0.0
        tmax = 1e-300
        for p in range(n):
            gn = sw2 * g[p] + kb[p]
            tn = gn + sw2 * q[p]
            rs = max(rs, abs(gn - x[p]))
            rt = max(rt, abs(tn - th[p]))
            tmax = max(tmax, abs(tn))
            x[p] = gn
            th[p] = tn
        if rs <= tol * scale and rt <= tol * tmax:
            res = max(rs / scale, rt / tmax)
            its = it + 1
            break
    st = 0.0
    ss = 0.0
    for p in range(n):
        st += th[p]
        ss += x[p]
    out[0] = st
    out[1] = ss
    out[2] = res
    out[3] = its
    out[4] = 0.0


# ----------------------------------------------------------------------- slice set-up
@nb.njit(cache=True, error_model="numpy")
def _load_slice(Xi, Yj, vxi, vyj, d1, d2, H, W, C, r, su2, sb2, ws):
    """Fill ws rows VX, VY, KB for offset (d1, d2) of the pair (x, y); returns (h, w)."""
    a0 = max(0, -d1)
    b0 = max(0, -d2)
    h = H - abs(d1)
    w = W - abs(d2)
    vx, vy, kb, kxy = ws[_W_VX], ws[_W_VY], ws[_W_KB], ws[_W_Q]
    inv_c = 1.0 / C
    for u in range(h):
        for v in range(w):
            i = (a0 + u) * W + (b0 + v)
            j = (a0 + d1 + u) * W + (b0 + d2 + v)
            p = u * w + v
            vx[p] = vxi[i]
            vy[p] = vyj[j]
            acc = 0.0
            for c in range(C):
                acc += Xi[i, c] * Yj[j, c]
            kxy[p] = acc * inv_c
    _box(kxy, kb, ws[_W_TMP], h, w, r, 1.0 / ((2 * r + 1) * (2 * r + 1)))
    for p in range(h * w):
        kb[p] = su2 * kb[p] + sb2
    return h, w


@nb.njit(cache=True, error_model="numpy")
def _identical(Xa, Yb, va, vb):
    for p in range(va.shape[0]):
        if va[p] != vb[p]:
            return False
        for c in range(Xa.shape[1]):
            if Xa[p, c] != Yb[p, c]:
                return False
    return True


@nb.njit(cache=True, parallel=True, error_model="numpy")
def _tasks_kernel(act, use_quad, nodes, weights, sw2, su2, sb2, H, W, r, X, Y, VX, VY,
                  pi, pj, d1s, d2s, tol, max_iter, m, method, out):
    """prange over (pair, offset) tasks: ``out[t] = (sum Theta, sum Sigma, res, its_s, its_t)``.

    X, Y: (n, H*W, C); VX, VY: (n, H*W) self-covariances; task ``t`` is the pair
    ``(pi[t // n_off], pj[t // n_off])`` at offset ``(d1s[t % n_off], d2s[t % n_off])``.
    """
    n_tasks = out.shape[0]
    n_off = d1s.shape[0]
    C = X.shape[2]
    P = H * W
    mm = max(m, 1)
    # workspaces are allocated once per chunk of tasks; every array a solve reads is written
    # by that solve first, so the chunking cannot change any bits
    n_chunks = min(n_tasks, 256)
    for c in nb.prange(n_chunks):
        ws = np.empty((_W_FIXED, P + 2 * r * H))
        dF = np.empty((mm, P))
        dG = np.empty((mm, P))
        gram = np.zeros((mm, mm))
        small = np.empty((mm + 2, mm))
        for t in range(c, n_tasks, n_chunks):
            a = pi[t // n_off]
            b = pj[t // n_off]
            o = t % n_off
            h, w = _load_slice(X[a], Y[b], VX[a], VY[b], d1s[o], d2s[o], H, W, C, r, su2, sb2,
                               ws)
            if method == 2:
                _plain_slice(act, use_quad, nodes, weights, sw2, h, w, r, ws, tol, max_iter,
                             out[t])
                continue
            same = d1s[o] == 0 and d2s[o] == 0 and _identical(X[a], Y[b], VX[a], VY[b])
            _solve_slice(act, use_quad, nodes, weights, sw2, h, w, r, ws, dF, dG, gram, small,
                         tol, max_iter, m, method == 0, same, out[t])


@nb.njit(cache=True, error_model="numpy")
def _reduce_pairs(out, n_off, inv_norm, ntk, nngp, res, its):
    """Sum the per-offset slice sums of each pair in a fixed order."""
    for q in range(out.shape[0] // n_off):
        st = 0.0
        ss = 0.0
        rm = 0.0
        im = 0.0
        for o in range(n_off):
            row = out[q * n_off + o]
            st += row[0]
            ss += row[1]
            rm = max(rm, row[2]) if math.isfinite(row[2]) else math.inf
            im = max(im, row[3] + row[4])
        ntk[q] = st * inv_norm
        nngp[q] = ss * inv_norm
        res[q] = rm
        its[q] = im


# ------------------------------------------------------------------- self-covariances
@nb.njit(cache=True, parallel=True, error_model="numpy")
def _self_kernel(act, use_quad, nodes, weights, sw2, su2, sb2, H, W, r, X, tol, max_iter, m,
                 V, res, its):
    """Per-image diagonal fixed point ``v = sw2 M k1(v, v, v) + su2 M K_xx + sb2``.

    ReLU: ``k1(v, v, v) = v / 2``, the SPD linear system ``(I - sw2/2 M) v = b`` by CG.
    Other activations: Anderson on the (pixel-coupled) nonlinear map.
    """
    n = X.shape[0]
    C = X.shape[2]
    P = H * W
    mm = max(m, 1)
    inv_q = 1.0 / ((2 * r + 1) * (2 * r + 1))
    relu = act == 0 and not use_quad
    for a in nb.prange(n):
        ws = np.empty((_W_FIXED, P + 2 * r * H))
        tmp = ws[_W_TMP]
        kxx, b, v = ws[_W_Q], ws[_W_KB], V[a]
        inv_c = 1.0 / C
        for p in range(P):
            acc = 0.0
            for c in range(C):
                acc += X[a, p, c] * X[a, p, c]
            kxx[p] = acc * inv_c
        _box(kxx, b, tmp, H, W, r, inv_q)
        bmax = 1e-300
        for p in range(P):
            b[p] = su2 * b[p] + sb2
            bmax = max(bmax, abs(b[p]))
        if relu:
            rv, pv, ap, q = ws[_W_R], ws[_W_P], ws[_W_AP], ws[_W_S]
            c_ = 0.5 * sw2
            for p in range(P):
                v[p] = 0.0
                rv[p] = b[p]
                pv[p] = b[p]
            rr = _dot(rv, rv, P)
            ok = bmax <= 1e-300
            it_used = 0
            for it in range(max_iter):
                if ok:
                    break
                it_used = it + 1
                _box(pv, q, tmp, H, W, r, inv_q)
                for p in range(P):
                    ap[p] = pv[p] - c_ * q[p]
                alpha = rr / _dot(pv, ap, P)
                rmax = 0.0
                for p in range(P):
                    v[p] += alpha * pv[p]
                    rv[p] -= alpha * ap[p]
                    rmax = max(rmax, abs(rv[p]))
                if rmax <= 0.05 * tol * bmax:
                    ok = True
                    break
                rr_new = _dot(rv, rv, P)
                beta = rr_new / rr
                rr = rr_new
                for p in range(P):
                    pv[p] = rv[p] + beta * pv[p]
            # residual of the original equation
            _box(v, q, tmp, H, W, r, inv_q)
            rmax = 0.0
            vmax = 1e-300
            for p in range(P):
                rmax = max(rmax, abs(v[p] - c_ * q[p] - b[p]))
                vmax = max(vmax, abs(v[p]))
            res[a] = rmax / vmax if ok else math.inf
            its[a] = it_used
            continue
        dF = np.empty((mm, P))
        dG = np.empty((mm, P))
        gram = np.zeros((mm, mm))
        small = np.empty((mm + 2, mm))
        g, f, fo, go, k1, k0 = ws[_W_G], ws[_W_F], ws[_W_FO], ws[_W_GO], ws[_W_K1], ws[_W_K0]
        for p in range(P):
            v[p] = b[p]
        res[a] = math.inf
        k = 0
        for it in range(max_iter):
            its[a] = it + 1
            for p in range(P):
                k1[p], k0[p] = k1k0(act, use_quad, v[p], v[p], v[p], nodes, weights)
            _box(k1, g, tmp, H, W, r, inv_q)
            rmax = 0.0
            vmax = 1e-300
            for p in range(P):
                g[p] = sw2 * g[p] + b[p]
                f[p] = g[p] - v[p]
                rmax = max(rmax, abs(f[p]))
                vmax = max(vmax, abs(g[p]))
            if not math.isfinite(rmax):
                break
            if rmax <= tol * vmax:
                res[a] = rmax / vmax
                break
            if _aa_step(k, m, P, v, g, f, fo, go, dF, dG, gram, small):
                k += 1
            else:
                k = 0
            for p in range(P):
                v[p] = max(v[p], 0.0)  # a variance: keep the iterate in the domain


# ------------------------------------------------------------------------ Python layer
def _activation(spec: CDEQSpec, n_nodes):
    act = ACTIVATION_IDS[spec.activation]
    quad = uses_quadrature(spec.activation)
    nodes, weights = gauss_hermite(int(n_nodes) if n_nodes else 48)
    return act, quad, nodes, weights


def _check_options(tol, max_iter, history, memory_budget=DEFAULT_MEMORY_BUDGET):
    if not (isinstance(tol, float | int) and 0 < tol < 1e-3):
        raise InputError(f"tol must be a number in (0, 1e-3), got {tol!r}")
    for name, value, lo in (("max_iter", max_iter, 1), ("history", history, 0),
                            ("memory_budget", memory_budget, 1 << 20)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
            raise InputError(f"{name} must be an integer >= {lo}, got {value!r}")


def conv_self_covariance(spec: CDEQSpec, X: np.ndarray, *, tol: float = DEFAULT_TOL,
                         max_iter: int = DEFAULT_MAX_ITER, history: int = DEFAULT_HISTORY,
                         n_nodes: int | None = None) -> np.ndarray:
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
    _self_kernel(act, quad, nodes, weights, spec.sigma_w2, spec.sigma_u2, spec.sigma_b2, H, W,
                 spec.filter_size // 2, X3, float(tol), int(max_iter), int(history), V, res,
                 its)
    bad = ~(np.isfinite(res) & np.isfinite(V).all(axis=1) & (res <= 100 * tol))
    raise_failures(bad[:, None], f"{spec.activation} CDEQ self-covariance",
                   " (the fixed point may not exist: try a smaller sigma_w2)")
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


def conv_kernel(spec: CDEQSpec, X: np.ndarray, Y: np.ndarray | None = None, *,
                self_x=None, self_y=None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                history: int = DEFAULT_HISTORY, n_nodes: int | None = None,
                solver: str = "newton", batch_pairs: int | None = None) -> KernelResult:
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
        ``ntk``, ``nngp`` of shape (n, m); ``iterations`` = most sweeps any slice used
        (Sigma* iterations + Theta* iterations); ``max_residual`` = largest relative residual.

    Raises
    ------
    InputError, FixedPointError
    """
    _check_options(tol, max_iter, history, memory_budget)
    if batch_pairs is not None and (isinstance(batch_pairs, bool) or
                                    not isinstance(batch_pairs, int | np.integer) or
                                    batch_pairs < 1):
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
    ws_bytes = nb.get_num_threads() * 8 * (_W_FIXED + 3 * max(history, 1)) * (P + 2 * r * H)
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
        _tasks_kernel(act, quad, nodes, weights, spec.sigma_w2, spec.sigma_u2, spec.sigma_b2,
                      H, W, r, X3, Y3, VX2, VY2, pi[b0:b1], pj[b0:b1], d1s, d2s, float(tol),
                      int(max_iter), int(history), _SOLVERS.index(solver), out)
        _reduce_pairs(out, n_off, inv_norm, ntk_v[b0:b1], nngp_v[b0:b1], res_v[b0:b1],
                      its_v[b0:b1])
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
    raise_failures(failed, f"{spec.activation} CDEQ kernel ({spec.readout})",
                   " (the fixed point may not exist for these parameters: "
                   "try a smaller sigma_w2)")
    return KernelResult(ntk=ntk, nngp=nngp, max_residual=float(res.max()),
                        iterations=int(its_v.max()))
