"""Convolutional DEQ-NTK (CDEQ-NTK): checked against independent routes (DESIGN.md §1.2)."""

import numba
import numpy as np
import pytest
from scipy.special import erf

from deqntk_dist import CDEQSpec, DEQSpec, FixedPointError, InputError, SpecError, kernel_matrix
from deqntk_dist.kernels import self_covariance
from deqntk_dist.kernels.conv import conv_kernel

RELU = {"sigma_w2": 1.5, "sigma_u2": 0.8, "sigma_b2": 0.1}
ERF = {"sigma_w2": 1.0, "sigma_u2": 1.0, "sigma_b2": 0.2, "activation": "erf"}


def _rel(a, b):
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


# ------------------------------------------------------------ brute-force reference (numpy)
def _window_mean(T, k):
    """``A[T]_{ij} = (1/k^2) sum_a T_{i+a, j+a}`` on a (H, W, H, W) pixel-pair tensor."""
    H, W = T.shape[:2]
    r = k // 2
    Tp = np.pad(T, [(r, r)] * 4)
    out = np.zeros_like(T)
    for a in range(-r, r + 1):
        for b in range(-r, r + 1):
            out += Tp[r + a : r + a + H, r + b : r + b + W, r + a : r + a + H, r + b : r + b + W]
    return out / k**2


def _duals(activation, a, b, c):
    if activation == "relu":
        s = np.sqrt(a * b)
        rho = np.clip(np.divide(c, s, out=np.zeros_like(c), where=s > 0), -1.0, 1.0)
        th = np.arccos(rho)
        k1 = s * (np.sin(th) + (np.pi - th) * np.cos(th)) / (2 * np.pi)
        return k1, np.where(s > 0, (np.pi - th) / (2 * np.pi), 0.0)
    if activation == "erf":
        da, db = 1 + 2 * a, 1 + 2 * b
        k1 = 2 / np.pi * np.arcsin(2 * c / np.sqrt(da * db))
        return k1, 4 / np.pi / np.sqrt(da * db - 4 * c * c)
    # 2-D Gauss-Hermite with 48 nodes per dimension (the kernel's default rule)
    z, w = np.polynomial.hermite_e.hermegauss(48)
    w = w / w.sum()
    phi, dphi = {
        "tanh": (np.tanh, lambda u: 1 - np.tanh(u) ** 2),
        "gelu": (
            lambda u: u * 0.5 * (1 + erf(u / np.sqrt(2))),
            lambda u: (
                0.5 * (1 + erf(u / np.sqrt(2))) + u * np.exp(-u * u / 2) / np.sqrt(2 * np.pi)
            ),
        ),
    }[activation]
    a, b, c = np.broadcast_arrays(a, b, c)
    a, b = np.maximum(a, b), np.minimum(a, b)  # the larger variance first, as duals.py does
    sa, sb = np.sqrt(a)[..., None, None], np.sqrt(b)[..., None, None]
    rho = np.clip(c / np.sqrt(a * b), -1, 1)[..., None, None]
    u = sa * z[:, None]
    v = sb * (rho * z[:, None] + np.sqrt(1 - rho * rho) * z[None, :])
    ww = w[:, None] * w[None, :]
    return (ww * phi(u) * phi(v)).sum((-1, -2)), (ww * dphi(u) * dphi(v)).sum((-1, -2))


def _unrolled(spec, x, y, depth):
    """Depth-L recursion on the full pixel-pair tensors of (x,x), (y,y), (x,y)."""
    k, act = spec.filter_size, spec.activation

    def inj(u, v):
        G = np.einsum("abc,dec->abde", u, v) / u.shape[-1]
        return spec.sigma_u2 * _window_mean(G, k) + spec.sigma_b2

    Ixx, Iyy, Ixy = inj(x, x), inj(y, y), inj(x, y)
    Sxx, Syy, Sxy, T = Ixx, Iyy, Ixy, Ixy
    for _ in range(depth - 1):
        dx, dy = np.einsum("abab->ab", Sxx), np.einsum("abab->ab", Syy)
        k1xx, _ = _duals(act, dx[:, :, None, None], dx[None, None], Sxx)
        k1yy, _ = _duals(act, dy[:, :, None, None], dy[None, None], Syy)
        k1, k0 = _duals(act, dx[:, :, None, None], dy[None, None], Sxy)
        Sxx = spec.sigma_w2 * _window_mean(k1xx, k) + Ixx
        Syy = spec.sigma_w2 * _window_mean(k1yy, k) + Iyy
        T_new = spec.sigma_w2 * _window_mean(k1, k) + Ixy
        T = T_new + spec.sigma_w2 * _window_mean(k0 * T, k)
        Sxy = T_new
    return Sxy, T, np.einsum("abab->ab", Sxx)


def _readout(readout, K):
    return np.einsum("abab->ab", K).mean() if readout == "flatten" else K.mean()


@pytest.mark.parametrize(
    ("params", "k"), [(RELU, 3), ({**RELU, "sigma_b2": 0.0}, 3), (RELU, 5), (ERF, 3)]
)
def test_unrolled_recursion_agrees_with_both_readouts(rng, params, k):
    X = rng.standard_normal((3, 6, 6, 2))
    X[2] = 0.5 * X[0] + 0.2 * rng.standard_normal((6, 6, 2))
    refs = {
        (i, j): _unrolled(CDEQSpec(**params, filter_size=k), X[i], X[j], 200)
        for i in range(3)
        for j in range(3)
    }
    for readout in ("flatten", "gap"):
        spec = CDEQSpec(**params, filter_size=k, readout=readout)
        got = kernel_matrix(spec, X)
        assert got.max_residual <= 1e-12
        for (i, j), (S, T, dx) in refs.items():
            assert abs(got.nngp[i, j] / _readout(readout, S) - 1) <= 1e-9
            assert abs(got.ntk[i, j] / _readout(readout, T) - 1) <= 1e-9
            if i == j:
                assert _rel(self_covariance(spec, X)[i], dx) <= 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["tanh", "gelu"])
def test_quadrature_activations_against_unrolled_recursion(rng, activation):
    # sw2 * k0 <~ 0.5 here: depth 45 leaves a tail far below the 1e-9 tolerance
    params = {"sigma_w2": 0.4, "sigma_u2": 1.2, "sigma_b2": 0.1, "activation": activation}
    X = rng.standard_normal((2, 3, 4, 1))
    refs = {(i, j): _unrolled(CDEQSpec(**params), X[i], X[j], 45) for i, j in ((0, 1), (1, 1))}
    for readout in ("flatten", "gap"):
        got = kernel_matrix(CDEQSpec(**params, readout=readout), X)
        for (i, j), (S, T, _) in refs.items():
            assert abs(got.nngp[i, j] / _readout(readout, S) - 1) <= 1e-9
            assert abs(got.ntk[i, j] / _readout(readout, T) - 1) <= 1e-9


def test_one_pixel_filter_one_is_the_fully_connected_kernel(rng):
    X = rng.standard_normal((7, 5))
    Y = rng.standard_normal((4, 5))
    for params in (RELU, ERF):
        fc = kernel_matrix(DEQSpec(**params), X, Y)
        for readout in ("flatten", "gap"):
            spec = CDEQSpec(**params, filter_size=1, readout=readout)
            cv = kernel_matrix(spec, X[:, None, None, :], Y[:, None, None, :])
            np.testing.assert_allclose(cv.nngp, fc.nngp, rtol=1e-12)
            np.testing.assert_allclose(cv.ntk, fc.ntk, rtol=1e-12)


def test_self_covariance_is_the_linear_solve_for_relu(rng):
    spec = CDEQSpec(**RELU)
    X = rng.standard_normal((2, 5, 7, 3))
    V = self_covariance(spec, X)
    # dense independent route: (I - sw2/2 M) v = su2 M K_xx + sb2
    H, W = 5, 7
    M = np.zeros((H * W, H * W))
    for i in range(H):
        for j in range(W):
            for a in (-1, 0, 1):
                for b in (-1, 0, 1):
                    if 0 <= i + a < H and 0 <= j + b < W:
                        M[i * W + j, (i + a) * W + j + b] = 1 / 9
    for n in range(2):
        Kxx = (X[n] ** 2).sum(-1).ravel() / 3
        v = np.linalg.solve(np.eye(H * W) - 0.75 * M, 0.8 * M @ Kxx + 0.1)
        assert _rel(V[n].ravel(), v) <= 1e-12


def _finite_width_cdeq(spec, X, width, seed, pool=None):
    """Random weight-tied conv DEQ (SAME padding), fixed point by plain iteration.

    Returns the per-image-pair empirical kernels of the flatten and gap readouts (and, given
    a (HW x HW) pooling matrix ``pool``, of the pooled-then-flattened readout).
    """
    r = np.random.default_rng(seed)
    n, H, W, C = X.shape
    k = spec.filter_size
    q = k * k
    phi = (lambda z: np.maximum(z, 0.0)) if spec.activation == "relu" else erf

    def patches(Z):  # (n, H, W, c) -> (n, H*W, q*c), zero padded
        p = k // 2
        Zp = np.pad(Z, [(0, 0), (p, p), (p, p), (0, 0)])
        cols = [Zp[:, a : a + H, b : b + W, :] for a in range(k) for b in range(k)]
        return np.concatenate(cols, axis=-1).reshape(n, H * W, -1)

    Wt = r.standard_normal((q * width, width)) * np.sqrt(spec.sigma_w2 / (q * width))
    U = r.standard_normal((q * C, width)) * np.sqrt(spec.sigma_u2 / (q * C))
    inj = patches(X) @ U + np.sqrt(spec.sigma_b2) * r.standard_normal(width)
    z = np.zeros((n, H * W, width))
    for _ in range(500):
        z_new = patches(phi(z).reshape(n, H, W, width)) @ Wt + inj
        if np.max(np.abs(z_new - z)) < 1e-8:  # far below the Monte-Carlo error
            flat = np.einsum("api,bpi->ab", z_new, z_new) / (width * H * W)
            pooled = z_new.mean(axis=1)
            if pool is None:
                return flat, pooled @ pooled.T / width
            local = np.einsum("qp,api->aqi", pool, z_new)
            lap = np.einsum("aqi,bqi->ab", local, local) / (width * H * W)
            return flat, pooled @ pooled.T / width, lap
        z = z_new
    raise AssertionError("finite-width conv DEQ did not converge")


@pytest.mark.slow
@pytest.mark.parametrize("params", [{**RELU, "sigma_w2": 1.0}, ERF])
def test_finite_width_monte_carlo_nngp(rng, params):
    X = rng.standard_normal((3, 5, 5, 2))
    X[2] = 0.5 * X[0] + X[1]
    samples = np.array([_finite_width_cdeq(CDEQSpec(**params), X, 256, s) for s in range(6)])
    for idx, readout in enumerate(("flatten", "gap")):
        exact = kernel_matrix(CDEQSpec(**params, readout=readout), X).nngp
        mean = samples[:, idx].mean(axis=0)
        sem = samples[:, idx].std(axis=0, ddof=1) / np.sqrt(len(samples))
        assert np.all(np.abs(mean - exact) <= 4 * sem + 5e-3 * np.abs(exact))
        assert _rel(mean, exact) < 0.1  # informative: a few per cent of Monte-Carlo error


@pytest.mark.parametrize("readout", ["flatten", "gap"])
def test_symmetric_and_psd(rng, readout):
    spec = CDEQSpec(**RELU, readout=readout)
    X = rng.standard_normal((12, 6, 5, 2))
    res = kernel_matrix(spec, X)
    for K in (res.ntk, res.nngp):
        assert np.array_equal(K, K.T)
        w = np.linalg.eigvalsh(K)
        assert w.min() > -1e-12 * w.max()


@pytest.mark.parametrize("readout", ["flatten", "gap"])
def test_tiles_batches_threads_do_not_change_bits(rng, readout):
    spec = CDEQSpec(**RELU, readout=readout)
    X = rng.standard_normal((9, 6, 6, 2))
    X[4] = 0.0  # a zero image: correlation-free pixels
    X[7] = X[1]  # a duplicate: the same-image path off the diagonal
    full = kernel_matrix(spec, X)
    V = self_covariance(spec, X)
    cuts = [0, 4, 9]
    for a, b in zip(cuts[:-1], cuts[1:]):
        diag = kernel_matrix(spec, X[a:b], self_x=V[a:b])
        assert np.array_equal(diag.ntk, full.ntk[a:b, a:b])
        assert np.array_equal(diag.nngp, full.nngp[a:b, a:b])
        for c, e in zip(cuts[:-1], cuts[1:]):
            if c > a:
                off = kernel_matrix(spec, X[a:b], X[c:e])
                assert np.array_equal(off.ntk, full.ntk[a:b, c:e])
                assert np.array_equal(off.nngp, full.nngp[a:b, c:e])
    # one row against everything, in sub-batches of one and of four pairs
    for batch in (1, 4):
        one = conv_kernel(spec, X[2:3], X, self_x=V[2:3], self_y=V, batch_pairs=batch)
        assert np.array_equal(one.ntk[0, 3:], full.ntk[2, 3:])
        assert np.array_equal(one.nngp[0, 3:], full.nngp[2, 3:])
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        single = kernel_matrix(spec, X[:5], X[5:])
    finally:
        numba.set_num_threads(old)
    assert np.array_equal(single.ntk, full.ntk[:5, 5:])
    assert np.array_equal(single.nngp, full.nngp[:5, 5:])


def test_solvers_agree(rng):
    spec = CDEQSpec(**RELU, readout="gap")
    X = rng.standard_normal((3, 5, 6, 2))
    Y = rng.standard_normal((2, 5, 6, 2))
    newton = conv_kernel(spec, X, Y)
    newton_cg = conv_kernel(spec, X, Y, solver="newton-cg")
    anderson = conv_kernel(spec, X, Y, solver="anderson")
    plain = conv_kernel(spec, X, Y, solver="plain", max_iter=2000)
    for other in (newton_cg, anderson, plain):
        assert _rel(other.ntk, newton.ntk) <= 1e-11
        assert _rel(other.nngp, newton.nngp) <= 1e-11
    assert plain.iterations > newton_cg.iterations


def test_zero_images_without_bias(rng):
    spec = CDEQSpec(sigma_w2=1.0, sigma_u2=1.0, readout="gap")
    X = rng.standard_normal((3, 5, 5, 1))
    X[1] = 0.0
    res = kernel_matrix(spec, X)
    assert np.all(res.nngp[1] == 0) and np.all(res.ntk[:, 1] == 0)
    assert np.all(np.isfinite(res.ntk)) and np.all(res.ntk[[0, 2]][:, [0, 2]] > 0)


def test_nonexistent_ntk_raises_fixed_point_error(rng):
    spec = CDEQSpec(sigma_w2=12.0, sigma_u2=1.0, sigma_b2=0.1, activation="erf")
    X = rng.standard_normal((3, 4, 4, 1))
    with pytest.raises(FixedPointError, match="did not converge") as info:
        kernel_matrix(spec, X)
    assert info.value.n_failed > 0
    assert all(len(e) == 2 for e in info.value.entries)


@pytest.mark.parametrize(
    ("X", "Y", "kw", "needle"),
    [
        (np.ones((2, 5, 5)), None, {}, "dimensions"),
        (np.ones((2, 5, 5, 1, 1)), None, {}, "dimensions"),
        (np.ones((2, 5, 5, 2)), np.ones((1, 5, 4, 2)), {}, "same feature shape"),
        (np.ones((2, 5, 5, 2)), np.ones((1, 5, 5, 3)), {}, "same feature shape"),
        (np.ones((2, 2, 5, 1)), None, {}, "filter_size"),
        (np.full((2, 5, 5, 1), np.nan), None, {}, "finite"),
        (np.ones((2, 5, 5, 1)), np.full((1, 5, 5, 1), np.inf), {}, "Y must be finite"),
        (np.ones((2, 5, 5, 1)), None, {"self_x": np.ones((2, 5, 4))}, "self_x"),
        (np.ones((2, 5, 5, 1)), None, {"self_x": -np.ones((2, 5, 5))}, "self_x"),
        (np.ones((2, 5, 5, 1)), None, {"tol": 0.5}, "tol"),
        (np.ones((2, 5, 5, 1)), None, {"memory_budget": 10}, "memory_budget"),
        (np.ones((2, 5, 5, 1)), None, {"batch_pairs": 0}, "batch_pairs"),
        (np.ones((2, 5, 5, 1)), None, {"solver": "magic"}, "solver"),
    ],
)
def test_bad_inputs(X, Y, kw, needle):
    with pytest.raises(InputError, match=needle):
        kernel_matrix(CDEQSpec(**RELU), X, Y, **kw)


def test_even_filter_size_is_refused():
    with pytest.raises(SpecError, match="odd"):
        CDEQSpec(**RELU, filter_size=4)


def test_out_arrays_hold_the_rounded_values(rng):
    spec = CDEQSpec(**RELU)
    X = rng.standard_normal((5, 6, 6, 2))
    ref = kernel_matrix(spec, X)
    out = {"nngp": np.empty((5, 5), dtype=np.float32)}
    res = kernel_matrix(spec, X, out=out)
    assert res.ntk is None and res.nngp is out["nngp"]
    np.testing.assert_array_equal(res.nngp, ref.nngp.astype(np.float32))
