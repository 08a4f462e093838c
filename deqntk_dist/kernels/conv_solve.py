"""Robust per-slice solvers of the CDEQ-NTK and the per-image self-covariances.

Float64 Newton-CG with an Anderson fallback, Anderson, and the plain layer recursion (the
benchmarks' reference) on one offset slice of one image pair; the fast Newton-Chebyshev
solver of :mod:`.conv_slices` hands them any slice it cannot solve.  Every loop runs over
the pixels of one slice in a fixed order, so results are bitwise independent of the tile,
the batch and the thread count.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .duals import k1k0

__all__ = ["WORKSPACE_ROWS", "reduce_pairs", "self_covariances"]

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
#: Rows of length ``H*W + 2 r H`` of the per-thread workspace of one slice solve.
WORKSPACE_ROWS = _W_FIXED


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
def _box3(src, dst, tmp, h, w, inv_q):
    """The 3 x 3 case of :func:`_box` in fused passes, with the same order of additions
    (so the same bits): ``((s[i-1] + s[i]) + s[i+1])`` vertically, then horizontally."""
    wp = w + 2
    for i in range(h):
        base = i * wp + 1
        tmp[base - 1] = 0.0
        tmp[base + w] = 0.0
        if h == 1:
            for j in range(w):
                tmp[base + j] = src[j]
        elif i == 0:
            for j in range(w):
                tmp[base + j] = src[j] + src[w + j]
        elif i == h - 1:
            for j in range(w):
                tmp[base + j] = src[(i - 1) * w + j] + src[i * w + j]
        else:
            for j in range(w):
                tmp[base + j] = (src[(i - 1) * w + j] + src[i * w + j]) + src[(i + 1) * w + j]
    for i in range(h):
        base = i * wp
        for j in range(w):
            dst[i * w + j] = ((tmp[base + j] + tmp[base + j + 1]) + tmp[base + j + 2]) * inv_q


@nb.njit(cache=True, error_model="numpy")
def _box(src, dst, tmp, h, w, r, inv_q):
    """``dst = M src``: zero-padded (2r+1)^2 box mean on an h x w rectangle (row-major).

    ``tmp`` needs ``h * (w + 2r)`` entries.  Vertical sums first, then horizontal sums over
    zero-padded rows, so the inner loops have fixed trip counts.
    """
    wp = w + 2 * r
    if r == 1:
        _box3(src, dst, tmp, h, w, inv_q)
        return
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
def _solve_slice(
    act,
    use_quad,
    nodes,
    weights,
    sw2,
    h,
    w,
    r,
    ws,
    dF,
    dG,
    gram,
    small,
    tol,
    max_iter,
    m,
    newton,
    same,
    out,
):
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
        its_t = _theta_anderson(
            sw2, h, w, r, inv_q, ws, x, k0, th, dF, dG, gram, small, tol, max_iter, mm
        )
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
    n8 = n - n % 8
    if bmax > 0.0:
        ok = False
        for p in range(n):
            out[p] = d[p] * pv[p]
        for it in range(max_iter):
            its = it + 1
            _box(out, q, tmp, h, w, r, inv_q)
            # ap = B pv and pv . ap in one pass (the same fixed 8-way split as _dot)
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
            for p0 in range(0, n8, 8):
                for u in range(8):
                    ap[p0 + u] = pv[p0 + u] - sw2 * d[p0 + u] * q[p0 + u]
                a0 += pv[p0] * ap[p0]
                a1 += pv[p0 + 1] * ap[p0 + 1]
                a2 += pv[p0 + 2] * ap[p0 + 2]
                a3 += pv[p0 + 3] * ap[p0 + 3]
                a4 += pv[p0 + 4] * ap[p0 + 4]
                a5 += pv[p0 + 5] * ap[p0 + 5]
                a6 += pv[p0 + 6] * ap[p0 + 6]
                a7 += pv[p0 + 7] * ap[p0 + 7]
            for p in range(n8, n):
                ap[p] = pv[p] - sw2 * d[p] * q[p]
                a0 += pv[p] * ap[p]
            pap = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
            if not pap > 0.0:
                break  # not positive definite: the fixed point does not exist
            alpha = rr / pap
            # v += alpha pv, rv -= alpha ap, rr = rv . rv, max |rv| in one pass
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
            rmax = 0.0
            for p0 in range(0, n8, 8):
                for u in range(8):
                    v[p0 + u] += alpha * pv[p0 + u]
                    rv[p0 + u] -= alpha * ap[p0 + u]
                    rmax = max(rmax, abs(rv[p0 + u]))
                a0 += rv[p0] * rv[p0]
                a1 += rv[p0 + 1] * rv[p0 + 1]
                a2 += rv[p0 + 2] * rv[p0 + 2]
                a3 += rv[p0 + 3] * rv[p0 + 3]
                a4 += rv[p0 + 4] * rv[p0 + 4]
                a5 += rv[p0 + 5] * rv[p0 + 5]
                a6 += rv[p0 + 6] * rv[p0 + 6]
                a7 += rv[p0 + 7] * rv[p0 + 7]
            for p in range(n8, n):
                v[p] += alpha * pv[p]
                rv[p] -= alpha * ap[p]
                rmax = max(rmax, abs(rv[p]))
                a0 += rv[p] * rv[p]
            if rmax <= rel_tol * bmax:
                ok = True
                break
            rr_new = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
            beta = rr_new / rr
            rr = rr_new
            for p in range(n):
                pv[p] = rv[p] + beta * pv[p]
                out[p] = d[p] * pv[p]
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


@nb.njit(cache=True, error_model="numpy")
def reduce_pairs(out, n_off, inv_norm, ntk, nngp, res, its):
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
def self_covariances(
    act, use_quad, nodes, weights, sw2, su2, sb2, H, W, r, X, tol, max_iter, m, V, res, its
):
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
