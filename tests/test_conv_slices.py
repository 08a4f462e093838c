"""Primitives of the Newton-Chebyshev slice solver (deqntk_dist.kernels.conv_slices)."""

import numpy as np
import pytest

from deqntk_dist.kernels.conv_slices import _amax, _amax32


@pytest.mark.parametrize(("amax", "dtype"), [(_amax, np.float64), (_amax32, np.float32)])
def test_band_max_is_exact_and_propagates_nan(rng, amax, dtype):
    a = (rng.standard_normal(1000) * 10.0 ** rng.integers(-30, 30, 1000)).astype(dtype)
    a[[5, 17]] = (-0.0, 0.0)
    for b0, n in ((0, 1000), (3, 1), (7, 600), (999, 1), (11, 0)):
        ref = np.abs(a[b0 : b0 + n].astype(np.float64)).max() if n else 0.0
        got = amax(a, np.uint64(b0), np.uint64(n))
        assert got == ref and isinstance(got, float)
    a[400] = -np.inf
    assert amax(a, np.uint64(0), np.uint64(1000)) == np.inf
    a[600] = np.nan  # a NaN anywhere in the band is a NaN maximum (the solver's check)
    assert np.isnan(amax(a, np.uint64(500), np.uint64(200)))
    assert amax(a, np.uint64(0), np.uint64(600)) == np.inf
