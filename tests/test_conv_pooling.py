"""Local average pooling (lap), horizontal-flip symmetrisation and the fast slice solver,
checked against independent routes (DESIGN.md §1.2)."""

import numba
import numpy as np
import pytest
from test_conv import RELU, _finite_width_cdeq, _rel, _unrolled

from deqntk_dist import CDEQSpec, DEQSpec, InputError, SpecError, kernel_matrix
from deqntk_dist.kernels import self_covariance
from deqntk_dist.kernels.conv import (
    FLOAT32_TOL,
    _task_inputs,
    conv_kernel,
    readout_plan,
    slice_tasks,
)


def _pool_matrix(H: int, W: int, c: int) -> np.ndarray:
    """Dense (HW x HW) local average pooling: ``P[i, a] = 1/c^2`` for pixels ``a`` of the
    c x c window centred on ``i`` that lie inside the image."""
    R = (c - 1) // 2
    P = np.zeros((H * W, H * W))
    for i in range(H):
        for j in range(W):
            for a in range(max(0, i - R), min(H, i + R + 1)):
                for b in range(max(0, j - R), min(W, j + R + 1)):
                    P[i * W + j, a * W + b] = 1.0 / c**2
    return P


def _lap_readout(T: np.ndarray, c: int) -> float:
    """``(1/HW) sum_ab (P^T P)_ab T_ab`` of a (H, W, H, W) pixel-pair tensor."""
    H, W = T.shape[:2]
    P = _pool_matrix(H, W, c)
    return float(np.sum((P.T @ P) * T.reshape(H * W, H * W)) / (H * W))


@pytest.mark.parametrize(
    ("params", "depth"),
    [(RELU, 200), ({"sigma_w2": 0.4, "sigma_u2": 1.2, "sigma_b2": 0.1, "activation": "tanh"}, 45)],
)
def test_lap_equals_unrolled_recursion_through_a_pooling_matrix(rng, params, depth):
    H, W = 5, 6
    X = rng.standard_normal((3, H, W, 2))
    X[2] = 0.6 * X[0] + 0.3 * rng.standard_normal((H, W, 2))
    pairs = ((0, 1), (1, 1), (0, 2))
    refs = {p: _unrolled(CDEQSpec(**params), X[p[0]], X[p[1]], depth) for p in pairs}
    for c in (1, 3, 5, 2 * max(H, W) - 1):  # the last covers the whole image
        spec = CDEQSpec(**params, readout="lap", pool_size=c)
        got = kernel_matrix(spec, X)
        assert got.max_residual <= 1e-13
        for (i, j), (S, T, _) in refs.items():
            assert abs(got.nngp[i, j] / _lap_readout(S, c) - 1) <= 1e-9, (c, i, j)
            assert abs(got.ntk[i, j] / _lap_readout(T, c) - 1) <= 1e-9, (c, i, j)


def test_lap_one_is_flatten_and_whole_image_is_scaled_gap(rng):
    X = rng.standard_normal((4, 5, 7, 2))
    flat = kernel_matrix(CDEQSpec(**RELU), X)
    lap1 = kernel_matrix(CDEQSpec(**RELU, readout="lap", pool_size=1), X)
    np.testing.assert_allclose(lap1.ntk, flat.ntk, rtol=1e-14)
    np.testing.assert_allclose(lap1.nngp, flat.nngp, rtol=1e-14)
    # a window that always covers the image: every pixel pair has weight HW / c^4
    c = 13
    gap = kernel_matrix(CDEQSpec(**RELU, readout="gap"), X)
    whole = kernel_matrix(CDEQSpec(**RELU, readout="lap", pool_size=c), X)
    scale = (5 * 7) ** 2 / c**4
    np.testing.assert_allclose(whole.ntk, scale * gap.ntk, rtol=1e-12)


@pytest.mark.slow
def test_finite_width_monte_carlo_lap_nngp(rng):
    """A random wide conv DEQ read out by local average pooling: its empirical kernel
    averages to the lap NNGP within the Monte-Carlo error."""
    X = rng.standard_normal((3, 5, 5, 2))
    X[2] = 0.5 * X[0] + X[1]
    spec = CDEQSpec(sigma_w2=1.0, sigma_u2=0.8, sigma_b2=0.1)
    c = 3
    P = _pool_matrix(5, 5, c)
    samples = np.array([_finite_width_cdeq(spec, X, 256, seed, pool=P)[2] for seed in range(6)])
    lap = CDEQSpec(sigma_w2=1.0, sigma_u2=0.8, sigma_b2=0.1, readout="lap", pool_size=c)
    exact = kernel_matrix(lap, X).nngp
    mean = samples.mean(axis=0)
    sem = samples.std(axis=0, ddof=1) / np.sqrt(len(samples))
    assert np.all(np.abs(mean - exact) <= 4 * sem + 5e-3 * np.abs(exact))
    assert _rel(mean, exact) < 0.1


@pytest.mark.parametrize("readout", ["flatten", "lap", "gap"])
def test_hflip_is_the_average_with_the_flipped_images(rng, readout):
    pool = 3 if readout == "lap" else None
    X = rng.standard_normal((5, 5, 6, 2))
    Y = rng.standard_normal((3, 5, 6, 2))
    plain = CDEQSpec(**RELU, readout=readout, pool_size=pool)
    flip = CDEQSpec(**RELU, readout=readout, pool_size=pool, hflip=True)
    got = kernel_matrix(flip, X, Y)
    a = kernel_matrix(plain, X, Y)
    b = kernel_matrix(plain, X, Y[:, :, ::-1, :])
    np.testing.assert_allclose(got.ntk, 0.5 * (a.ntk + b.ntk), rtol=1e-12)
    np.testing.assert_allclose(got.nngp, 0.5 * (a.nngp + b.nngp), rtol=1e-12)
    # mirror invariance K(flip x, flip y) = K(x, y), hence a symmetric, PSD Gram
    both = kernel_matrix(plain, X[:, :, ::-1, :], Y[:, :, ::-1, :])
    np.testing.assert_allclose(both.ntk, a.ntk, rtol=1e-12)
    G = kernel_matrix(flip, X)
    for K in (G.ntk, G.nngp):
        assert np.array_equal(K, K.T)
        w = np.linalg.eigvalsh(K)
        assert w.min() > -1e-12 * w.max()
    # the symmetric tile agrees with the explicit average too (its flipped half is mirrored)
    ref = 0.5 * (kernel_matrix(plain, X).ntk + kernel_matrix(plain, X, X[:, :, ::-1, :]).ntk)
    np.testing.assert_allclose(G.ntk, ref, rtol=1e-12)


def test_fc_hflip_on_image_rows(rng):
    X = rng.standard_normal((6, 4, 5, 3))
    Y = rng.standard_normal((4, 4, 5, 3))
    spec = DEQSpec(sigma_w2=1.2, sigma_u2=1.0, sigma_b2=0.1)
    flip = DEQSpec(sigma_w2=1.2, sigma_u2=1.0, sigma_b2=0.1, hflip=True)
    flat = lambda A: A.reshape(len(A), -1)  # noqa: E731
    got = kernel_matrix(flip, X, Y)
    a = kernel_matrix(spec, flat(X), flat(Y))
    b = kernel_matrix(spec, flat(X), flat(Y[:, :, ::-1, :]))
    np.testing.assert_allclose(got.ntk, 0.5 * (a.ntk + b.ntk), rtol=1e-13)
    np.testing.assert_allclose(got.nngp, 0.5 * (a.nngp + b.nngp), rtol=1e-13)
    # image rows without hflip are flattened: the same kernel as on flat rows
    assert np.array_equal(kernel_matrix(spec, X, Y).ntk, a.ntk)
    G = kernel_matrix(flip, X)
    assert np.array_equal(G.ntk, G.ntk.T)
    assert np.linalg.eigvalsh(G.ntk).min() > -1e-12 * np.abs(G.ntk).max()
    # tiled == untiled, bitwise, with out= buffers of either dtype
    for dtype in (np.float64, np.float32):
        full = kernel_matrix(flip, X, out={"ntk": np.empty((6, 6), dtype)}).ntk
        top = kernel_matrix(flip, X[:3], out={"ntk": np.empty((3, 3), dtype)}).ntk
        right = kernel_matrix(flip, X[:3], X[3:], out={"ntk": np.empty((3, 3), dtype)}).ntk
        assert np.array_equal(top, full[:3, :3]) and np.array_equal(right, full[:3, 3:])


@pytest.mark.parametrize(
    ("readout", "pool"), [("flatten", None), ("lap", 3), ("lap", 5), ("gap", None)]
)
def test_float32_tolerance_agrees_with_float64(rng, readout, pool):
    X = rng.standard_normal((6, 7, 7, 2))
    X[3] = X[1]  # the same-image path off the diagonal
    spec = CDEQSpec(**RELU, readout=readout, pool_size=pool)
    f64 = kernel_matrix(spec, X)
    out = {"ntk": np.empty((6, 6), np.float32), "nngp": np.empty((6, 6), np.float32)}
    loose = kernel_matrix(spec, X, tol=FLOAT32_TOL)
    assert loose.max_residual <= FLOAT32_TOL
    assert f64.max_residual <= 1e-13
    assert _rel(loose.ntk, f64.ntk) <= 1e-7 and _rel(loose.nngp, f64.nngp) <= 1e-7
    # float32 outputs take the float32-store tolerance by default: the rounded loose values
    f32 = kernel_matrix(spec, X, out=out)
    assert f32.max_residual == loose.max_residual
    np.testing.assert_array_equal(out["ntk"], loose.ntk.astype(np.float32))
    # an explicit tol wins
    kernel_matrix(spec, X, out=out, tol=1e-13)
    np.testing.assert_array_equal(out["ntk"], f64.ntk.astype(np.float32))


@pytest.mark.parametrize(
    ("readout", "pool", "hflip"),
    [("lap", 3, False), ("lap", 5, True), ("gap", None, True), ("flatten", None, True)],
)
def test_pooled_tiles_batches_threads_do_not_change_bits(rng, readout, pool, hflip):
    spec = CDEQSpec(**RELU, readout=readout, pool_size=pool, hflip=hflip)
    X = rng.standard_normal((7, 6, 6, 1))
    X[2] = 0.0
    X[5] = X[1]
    X[6] = X[0, :, ::-1]  # the mirror image of another: the same-image path of the flip
    full = kernel_matrix(spec, X)
    V = self_covariance(spec, X)
    diag = kernel_matrix(spec, X[:3], self_x=V[:3])
    off = kernel_matrix(spec, X[:3], X[3:], self_x=V[:3], self_y=V[3:])
    assert np.array_equal(diag.ntk, full.ntk[:3, :3])
    assert np.array_equal(off.ntk, full.ntk[:3, 3:])
    assert np.array_equal(off.nngp, full.nngp[:3, 3:])
    one = conv_kernel(spec, X[1:2], X, self_x=V[1:2], self_y=V, batch_pairs=2)
    assert np.array_equal(one.ntk[0, 1:], full.ntk[1, 1:])
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        single = kernel_matrix(spec, X[:4], X[4:])
    finally:
        numba.set_num_threads(old)
    assert np.array_equal(single.ntk, full.ntk[:4, 4:])


def test_fast_solver_agrees_with_the_previous_one_and_falls_back(rng):
    X = rng.standard_normal((3, 6, 5, 2))
    Y = rng.standard_normal((2, 6, 5, 2))
    for readout, pool in (("gap", None), ("lap", 3)):
        spec = CDEQSpec(**RELU, readout=readout, pool_size=pool)
        new = conv_kernel(spec, X, Y)
        old = conv_kernel(spec, X, Y, solver="newton-cg")
        assert _rel(new.ntk, old.ntk) <= 1e-12 and _rel(new.nngp, old.nngp) <= 1e-12
    # far fewer dual-map evaluations than the plain layer recursion, and none robust
    spec = CDEQSpec(**RELU, readout="gap")
    V = self_covariance(spec, X)
    plan = readout_plan(spec, 6, 5)
    inputs = _task_inputs(spec, X, X, V, V, None)
    pi, pj = np.triu_indices(3, 1)  # distinct images (plain stalls near correlation 1)
    kw = {"tol": 1e-13, "max_iter": 4000, "history": 5}
    fast = slice_tasks(inputs, plan, pi, pj, method=0, **kw)
    plain = slice_tasks(inputs, plan, pi, pj, method=2, **kw)
    assert fast[:, 5].sum() == 0 and fast[:, 3].max() <= 8
    assert np.median(plain[:, 3]) > 3 * np.median(fast[:, 3])
    np.testing.assert_allclose(fast[:, 0], plain[:, 0], rtol=1e-9)
    # gelu's k0 can be negative: those slices go to the robust solver, same values
    gelu = CDEQSpec(sigma_w2=0.6, sigma_u2=1.0, sigma_b2=0.1, activation="gelu", readout="gap")
    a = conv_kernel(gelu, X[:2], Y[:1])
    b = conv_kernel(gelu, X[:2], Y[:1], solver="anderson")
    assert _rel(a.ntk, b.ntk) <= 1e-11


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"readout": "lap"}, "pool_size must be an odd integer"),
        ({"readout": "lap", "pool_size": 4}, "pool_size must be an odd integer"),
        ({"readout": "lap", "pool_size": 0}, "pool_size must be an odd integer"),
        ({"readout": "lap", "pool_size": -3}, "pool_size must be an odd integer"),
        ({"readout": "lap", "pool_size": True}, "pool_size must be an odd integer"),
        ({"readout": "lap", "pool_size": 3.0}, "pool_size must be an odd integer"),
        ({"readout": "flatten", "pool_size": 3}, "only used with readout='lap'"),
        ({"readout": "gap", "pool_size": 1}, "only used with readout='lap'"),
        ({"hflip": 1}, "hflip must be True or False"),
    ],
)
def test_bad_pooling_specs(kwargs, needle):
    with pytest.raises(SpecError, match=needle):
        CDEQSpec(**RELU, **kwargs)


def test_pool_and_flip_inputs_are_checked(rng):
    X = rng.standard_normal((2, 5, 4, 1))
    with pytest.raises(InputError, match=r"pool_size must be <= 2 max\(H, W\) - 1 = 9"):
        kernel_matrix(CDEQSpec(**RELU, readout="lap", pool_size=11), X)
    kernel_matrix(CDEQSpec(**RELU, readout="lap", pool_size=9), X)  # the largest allowed
    with pytest.raises(InputError, match=r"hflip=True needs image rows"):
        kernel_matrix(DEQSpec(**RELU, hflip=True), X.reshape(2, -1))


def test_pooling_fields_round_trip():
    spec = CDEQSpec(**RELU, readout="lap", pool_size=5, hflip=True)
    assert CDEQSpec.from_dict(spec.to_dict()) == spec
    d = CDEQSpec(**RELU).to_dict()
    del d["pool_size"], d["hflip"]  # a store written before these fields existed
    assert CDEQSpec.from_dict(d) == CDEQSpec(**RELU)
