"""Fully-connected DEQ-NTK: checked against independent routes (DESIGN.md §1.1)."""

import numba
import numpy as np
import pytest
from scipy.special import erf

from deqntk_dist import DEQSpec, FixedPointError, InputError, kernel_matrix
from deqntk_dist.kernels import self_covariance
from deqntk_dist.kernels.fc import finite_depth_kernel

SPECS = {
    "relu": DEQSpec(sigma_w2=1.5, sigma_u2=0.8, sigma_b2=0.1),
    "relu_nobias": DEQSpec(sigma_w2=1.0, sigma_u2=1.0),
    "erf": DEQSpec(sigma_w2=1.2, sigma_u2=1.0, sigma_b2=0.2, activation="erf"),
    "tanh": DEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1, activation="tanh"),
    "gelu": DEQSpec(sigma_w2=0.8, sigma_u2=1.2, sigma_b2=0.05, activation="gelu"),
}


def _rel(a, b):
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300))


@pytest.mark.parametrize("name", list(SPECS))
def test_deep_unrolled_recursion_converges_to_root(rng, name):
    spec = SPECS[name]
    # quadrature activations: both routes use the same (coarser) quadrature rule
    quad = {} if spec.activation in ("relu", "erf") else {"n_nodes": 20}
    n = 40 if not quad else 12
    X = rng.standard_normal((n, 12))
    Y = np.vstack([rng.standard_normal((n // 2, 12)), 3.0 * X[:2], -X[2:4]])
    for Yarg in (None, Y):
        got = kernel_matrix(spec, X, Yarg, **quad)
        ref = finite_depth_kernel(spec, X, Yarg, depth=300, **quad)
        assert ref.max_residual < 1e-14  # the unrolled recursion has stopped moving
        assert _rel(got.nngp, ref.nngp) <= 1e-10
        assert _rel(got.ntk, ref.ntk) <= 1e-10
        assert got.max_residual <= 1e-11


def test_depth_l_kernel_approaches_deq_geometrically(rng):
    spec = SPECS["relu"]
    X = rng.standard_normal((10, 5))
    deq = kernel_matrix(spec, X)
    errs = [_rel(finite_depth_kernel(spec, X, depth=L).ntk, deq.ntk) for L in (5, 10, 20, 40)]
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:]))
    assert errs[-1] < 1e-3


def test_relu_diagonal_closed_form(rng):
    spec = SPECS["relu"]
    X = rng.standard_normal((30, 9)) * rng.uniform(0.1, 5.0, (30, 1))
    inj = spec.sigma_u2 * np.sum(X * X, axis=1) / 9 + spec.sigma_b2
    sig = inj / (1 - spec.sigma_w2 / 2)
    res = kernel_matrix(spec, X)
    np.testing.assert_allclose(np.diag(res.nngp), sig, rtol=1e-14)
    np.testing.assert_allclose(np.diag(res.ntk), sig / (1 - spec.sigma_w2 / 2), rtol=1e-14)
    # the same diagonal through the off-diagonal solver (X against a copy of itself)
    cross = kernel_matrix(spec, X, X.copy())
    np.testing.assert_allclose(np.diag(cross.nngp), sig, rtol=1e-13)
    np.testing.assert_allclose(np.diag(cross.ntk), sig / (1 - spec.sigma_w2 / 2), rtol=1e-13)
    np.testing.assert_allclose(self_covariance(spec, X), sig, rtol=1e-15)


@pytest.mark.parametrize("act", ["erf", "tanh"])
def test_generic_self_covariance_solves_its_equation(rng, act):
    from deqntk_dist.kernels.duals import dual_maps

    spec = SPECS[act]
    X = rng.standard_normal((20, 7))
    a = self_covariance(spec, X)
    inj = spec.sigma_u2 * np.sum(X * X, axis=1) / 7 + spec.sigma_b2
    k1, _ = dual_maps(act, a, a, a)
    np.testing.assert_allclose(a, spec.sigma_w2 * k1 + inj, rtol=1e-13)


def _finite_width_deq(spec, X, width, seed):
    """Random weight-tied, input-injected network; fixed point by plain iteration."""
    phi = {
        "relu": lambda z: np.maximum(z, 0.0),
        "tanh": np.tanh,
        "erf": erf,
    }[spec.activation]
    r = np.random.default_rng(seed)
    n, d = width, X.shape[1]
    W = r.standard_normal((n, n)) * np.sqrt(spec.sigma_w2 / n)
    inj = (r.standard_normal((n, d)) * np.sqrt(spec.sigma_u2 / d)) @ X.T
    inj += np.sqrt(spec.sigma_b2) * r.standard_normal((n, 1))
    z = np.zeros_like(inj)
    for _ in range(2000):
        z_new = W @ phi(z) + inj
        if np.max(np.abs(z_new - z)) < 1e-9:
            return z_new.T @ z_new / n
        z = z_new
    raise AssertionError("finite-width DEQ did not converge")


@pytest.mark.parametrize(
    "spec",
    [
        DEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1),
        DEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1, activation="tanh"),
    ],
)
def test_finite_width_monte_carlo_nngp(rng, spec):
    X = rng.standard_normal((4, 10))
    X[3] = 0.3 * X[0] + X[1]
    samples = np.array([_finite_width_deq(spec, X, 2000, seed) for seed in range(8)])
    mean = samples.mean(axis=0)
    sem = samples.std(axis=0, ddof=1) / np.sqrt(len(samples))
    exact = kernel_matrix(spec, X).nngp
    # within 4 standard errors (plus the O(1/width) finite-width bias)
    assert np.all(np.abs(mean - exact) <= 4 * sem + 2e-3 * np.abs(exact))
    # and the estimate is informative: errors small relative to the kernel scale
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    assert np.max(np.abs(mean - exact) / scale) < 0.05


@pytest.mark.parametrize("name", list(SPECS))
def test_symmetric_and_psd(rng, name):
    spec = SPECS[name]
    X = rng.standard_normal((60, 8))
    res = kernel_matrix(spec, X)
    for K in (res.ntk, res.nngp):
        assert np.array_equal(K, K.T)
        w = np.linalg.eigvalsh(K)
        assert w.min() > -1e-12 * w.max()


def test_tiles_are_bitwise_equal_to_the_whole(rng):
    spec = SPECS["relu"]
    X = rng.standard_normal((1100, 33))
    full = kernel_matrix(spec, X)
    cuts = [0, 300, 613, 1100]
    for a, b in zip(cuts[:-1], cuts[1:]):
        diag = kernel_matrix(spec, X[a:b])
        assert np.array_equal(diag.ntk, full.ntk[a:b, a:b])
        assert np.array_equal(diag.nngp, full.nngp[a:b, a:b])
        for c, e in zip(cuts[:-1], cuts[1:]):
            if c > a:
                off = kernel_matrix(spec, X[a:b], X[c:e])
                assert np.array_equal(off.ntk, full.ntk[a:b, c:e])
                assert np.array_equal(off.nngp, full.nngp[a:b, c:e])


def test_thread_count_does_not_change_bits(rng):
    spec = SPECS["erf"]
    X = rng.standard_normal((50, 6))
    Y = rng.standard_normal((30, 6))
    many = kernel_matrix(spec, X, Y)
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        one = kernel_matrix(spec, X, Y)
        one_relu = kernel_matrix(SPECS["relu"], X, Y)
    finally:
        numba.set_num_threads(old)
    assert np.array_equal(many.ntk, one.ntk)
    assert np.array_equal(kernel_matrix(SPECS["relu"], X, Y).ntk, one_relu.ntk)


def test_non_injected_network_degenerates_but_deq_does_not(rng):
    """Without injection the correlation freezes to a constant as depth grows."""
    spec = SPECS["relu"]
    X = rng.standard_normal((12, 6))

    def corr_spread(K):
        d = np.sqrt(np.diag(K))
        C = K / np.outer(d, d)
        return C.max() - C.min()

    deep_plain = finite_depth_kernel(spec, X, depth=300, injection_all_layers=False)
    shallow_plain = finite_depth_kernel(spec, X, depth=3, injection_all_layers=False)
    deq = kernel_matrix(spec, X)
    assert corr_spread(shallow_plain.ntk) > 0.1
    assert corr_spread(deep_plain.nngp) < 1e-6
    assert corr_spread(deep_plain.ntk) < 1e-3
    assert corr_spread(deq.nngp) > 0.1 and corr_spread(deq.ntk) > 0.1


def test_zero_rows_without_bias(rng):
    spec = SPECS["relu_nobias"]
    X = rng.standard_normal((5, 4))
    X[2] = 0.0
    res = kernel_matrix(spec, X)
    assert np.all(res.nngp[2] == 0) and np.all(res.ntk[:, 2] == 0)
    assert np.all(np.isfinite(res.ntk))


def test_nonexistent_ntk_raises_fixed_point_error(rng):
    # erf with a large weight variance: sw2 * k0 >= 1 on the diagonal, the NTK series diverges
    spec = DEQSpec(sigma_w2=12.0, sigma_u2=1.0, sigma_b2=0.1, activation="erf")
    X = rng.standard_normal((6, 3))
    with pytest.raises(FixedPointError, match="did not converge") as info:
        kernel_matrix(spec, X)
    assert info.value.n_failed > 0 and len(info.value.entries) > 0
    assert all(len(e) == 2 for e in info.value.entries)


@pytest.mark.parametrize(
    ("X", "Y", "needle"),
    [
        (np.array([[1.0, np.nan]]), None, "finite"),
        (np.array([[1.0, np.inf]]), None, "finite"),
        (np.ones(3), None, "dimensions"),
        (np.ones((2, 3, 4)), None, "dimensions"),
        (np.ones((0, 3)), None, "non-empty"),
        (np.ones((2, 3)), np.ones((2, 4)), "same feature shape"),
        (np.ones((2, 3)), np.ones((0, 3)), "non-empty"),
        (np.array([["a", "b"]]), None, "numeric"),
        (np.ones((2, 3)), np.array([[1.0, 2.0, np.nan]]), "Y must be finite"),
    ],
)
def test_bad_inputs(X, Y, needle):
    with pytest.raises(InputError, match=needle):
        kernel_matrix(SPECS["relu"], X, Y)


def test_public_finite_depth_kernel_validates(rng):
    import deqntk_dist

    spec = SPECS["relu"]
    X = rng.standard_normal((5, 3))
    ref = finite_depth_kernel(spec, X, depth=7)
    got = deqntk_dist.finite_depth_kernel(spec, X.tolist(), depth=7)
    assert np.array_equal(got.ntk, ref.ntk)
    with pytest.raises(InputError, match="depth"):
        deqntk_dist.finite_depth_kernel(spec, X, depth=0)
    with pytest.raises(InputError, match="finite"):
        deqntk_dist.finite_depth_kernel(spec, np.full((2, 3), np.nan), depth=3)


@pytest.mark.parametrize("name", ["relu", "erf"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_out_arrays_hold_the_rounded_values(rng, name, symmetric):
    """``out`` (any subset, float32 or float64, several row groups) holds exactly the
    plain call's values rounded like astype, and only the requested kernels."""
    spec = SPECS[name]
    n = 1100 if name == "relu" else 60
    X = rng.standard_normal((n, 9))
    Y = None if symmetric else rng.standard_normal((n - 37, 9))
    ref = kernel_matrix(spec, X, Y)
    shape = ref.ntk.shape
    for kernels in (("ntk",), ("nngp",), ("ntk", "nngp")):
        for dtype in (np.float32, np.float64):
            out = {k: np.full(shape, np.nan, dtype=dtype) for k in kernels}
            res = kernel_matrix(spec, X, Y, out=out)
            assert res.max_residual == ref.max_residual
            for k in ("ntk", "nngp"):
                got = getattr(res, k)
                if k not in kernels:
                    assert got is None
                    continue
                assert got is out[k]
                want = getattr(ref, k).astype(dtype)
                bits = np.uint32 if dtype == np.float32 else np.uint64
                np.testing.assert_array_equal(got.view(bits), want.view(bits))


def test_out_is_validated(rng):
    X = rng.standard_normal((5, 3))
    ok = np.empty((5, 4))
    Y = rng.standard_normal((4, 3))
    for out, needle in [
        ({}, "non-empty dict"),
        ([ok], "non-empty dict"),
        ({"theta": ok}, "out keys"),
        ({"ntk": np.empty((4, 5))}, r"shape \(5, 4\)"),
        ({"ntk": np.empty((5, 4), dtype=np.int64)}, "float32 or float64"),
        ({"ntk": np.empty((4, 5)).T}, "C-contiguous"),
        ({"nngp": [[0.0] * 4] * 5}, "ndarray"),
    ]:
        with pytest.raises(InputError, match=needle):
            kernel_matrix(SPECS["relu"], X, Y, out=out)


def test_overflowing_inputs_are_an_input_error_not_non_convergence(rng):
    """Inputs whose inner products overflow float64 (X * 1e200) are named as such; large
    but safe inputs still work (the ReLU kernel is homogeneous)."""
    from deqntk_dist import CDEQSpec

    X = rng.normal(size=(6, 7))
    spec = SPECS["relu"]
    for scale in (1e200, 1e80):
        with pytest.raises(InputError, match=r"X must have input covariances .* overflow"):
            kernel_matrix(spec, X * scale)
        with pytest.raises(InputError, match=r"Y must have input covariances"):
            kernel_matrix(spec, X, X * scale)
    homogeneous = SPECS["relu_nobias"]  # no bias: K(cx, cy) = c^2 K(x, y)
    big = kernel_matrix(homogeneous, X * 1e60).ntk
    np.testing.assert_allclose(big / 1e120, kernel_matrix(homogeneous, X).ntk, rtol=1e-10)
    images = rng.normal(size=(3, 5, 5, 1)) * 1e200
    with pytest.raises(InputError, match="overflow"):
        kernel_matrix(CDEQSpec(sigma_w2=1.0, sigma_u2=1.0), images)
    with pytest.raises(InputError, match="overflow"):
        self_covariance(spec, X * 1e200)
