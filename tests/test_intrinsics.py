"""numba intrinsics of the slice solver (deqntk_dist.kernels.intrinsics)."""

import sys
from fractions import Fraction

import numba as nb
import numpy as np
import pytest

from deqntk_dist.kernels.intrinsics import abs_bits, borrow, fma, from_bits


@nb.njit
def _fma_all(a, b, c, out):
    for k in range(a.shape[0]):
        out[k] = fma(a[k], b[k], c[k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fma_rounds_once(rng, dtype):
    a, b, c = (rng.standard_normal(2000).astype(dtype) for _ in range(3))
    out = np.empty_like(a)
    _fma_all(a, b, c, out)
    # the exact value rounded once: float32 through float64 (the product of two float32 is
    # exact there; a second rounding to float32 could only matter on an exact tie), float64
    # through fractions (int / int division in Python rounds correctly)
    if dtype == np.float32:
        ref = (a.astype(np.float64) * b + c).astype(np.float32)
    else:
        exact = (Fraction(x) * Fraction(y) + Fraction(z) for x, y, z in zip(a, b, c))
        ref = np.array([float(e) for e in exact])
    assert np.array_equal(out, ref)
    # and it differs from the twice-rounded product-plus-sum somewhere
    assert not np.array_equal(out, (a * b + c).astype(dtype))


@nb.njit
def _through_borrowed(a, b, rows):
    """Row sums of ``a`` written into ``b``, both through borrowed views and their slices."""
    va = borrow(a)
    vb = borrow(b)
    for i in range(rows):
        row = va[i]
        acc = 0.0
        for j in range(row.shape[0]):
            acc += row[j]
        vb[i] = acc
    return va.shape[0] + va.shape[1] + va.strides[0]


@nb.njit
def _local_owner(n):
    own = np.arange(n) * 1.0
    view = borrow(own)
    total = 0.0
    for k in range(view.shape[0]):
        total += view[k]
    return total + own[0]  # a use of the owner after the view's: it lives until here


def test_borrowed_views_read_and_write_the_same_memory(rng):
    a = rng.standard_normal((7, 5))
    b = np.zeros(7)
    before = (sys.getrefcount(a), sys.getrefcount(b))
    for _ in range(3):
        info = _through_borrowed(a, b, 7)
    assert np.array_equal(b, a.sum(axis=1))  # same order of additions
    assert info == 7 + 5 + 5 * 8
    # a view that borrows takes no reference, and the owners' references are unchanged
    assert (sys.getrefcount(a), sys.getrefcount(b)) == before
    assert _local_owner(1000) == 999 * 1000 / 2


def test_borrow_rejects_non_arrays():
    with pytest.raises(nb.core.errors.TypingError):
        nb.njit(lambda x: borrow(x))(1.0)


@nb.njit
def _abs_bits_max(a):
    m = abs_bits(a[0])
    for k in range(a.shape[0]):
        m = max(m, abs_bits(a[k]))
    return m, from_bits(m)


@pytest.mark.parametrize(("dtype", "utype"), [(np.float32, np.uint32), (np.float64, np.uint64)])
def test_abs_bits_order_like_magnitudes(rng, dtype, utype):
    a = (rng.standard_normal(3000) * 10.0 ** rng.integers(-30, 30, 3000)).astype(dtype)
    a[:4] = (-0.0, np.finfo(dtype).tiny / 4, -np.finfo(dtype).max, 0.0)
    bits, value = _abs_bits_max(a)
    assert value == np.abs(a).max() and bits == np.abs(a).max().view(utype)
    ret = _abs_bits_max.nopython_signatures[-1].return_type  # (uint of the width, the float)
    assert [str(t) for t in ret] == [np.dtype(utype).name, np.dtype(dtype).name]
    # the integer order of the bits is the order of the magnitudes, everywhere
    order = np.argsort(np.abs(a), kind="stable")
    ub = np.array([int(np.abs(x).view(utype)) for x in a])
    assert np.all(np.diff(ub[order]) >= 0)
    a[1234] = -np.inf
    assert _abs_bits_max(a)[1] == np.inf
    a[77] = -np.nan  # a NaN anywhere: the maximum is NaN
    assert np.isnan(_abs_bits_max(a)[1])
