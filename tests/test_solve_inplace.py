"""The in-place route (``cholesky-inplace``): one array holds the kernel and its factor."""

import numba
import numpy as np
import pytest
import scipy.linalg
from test_solve import _data, _dense_alpha, _make_store, _noisy_two_classes, _rel

from deqntk_dist import DEQSpec, kernel_matrix
from deqntk_dist.errors import InputError, NotPositiveDefiniteError, SolveError
from deqntk_dist.regression import kernel_ridge, one_hot_targets, solve_store
from deqntk_dist.regression.blas import ColumnMajor
from deqntk_dist.regression.dense import load_symmetric
from deqntk_dist.regression.inplace import (
    InplaceSolver,
    _factor,
    _restore,
    inplace_bytes,
)
from deqntk_dist.regression.krr import plan_method

SPEC = DEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1)


def _kernel(rng, n, dtype=np.float32):
    x, y = _data(rng, n)
    return kernel_matrix(SPEC, x).ntk.astype(dtype), y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_load_symmetric_permutes_the_lower_triangle(rng, dtype):
    K, _ = _kernel(rng, 203, dtype)
    for order in (None, rng.permutation(203), np.r_[np.arange(100, 203), np.arange(100)]):
        A = load_symmetric(K, order, block=48)
        assert A.dtype == dtype and A.flags.c_contiguous
        ref = K if order is None else K[np.ix_(order, order)]
        np.testing.assert_array_equal(np.tril(A), np.tril(ref))


def test_load_symmetric_rejects_bad_orders_and_non_finite_values(rng):
    K, _ = _kernel(rng, 50)
    with pytest.raises(InputError, match="permutation of range"):
        load_symmetric(K, np.r_[np.arange(49), 3])
    K[30, 7] = K[7, 30] = np.nan
    with pytest.raises(SolveError, match=r"non-finite.*\(30, 7\)"):
        load_symmetric(K, rng.permutation(50), block=16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,m,block", [(300, 300, 64), (301, 250, 96), (257, 257, 512)])
def test_factor_matches_lapack_and_keeps_the_kernel(rng, dtype, n, m, block):
    K, _ = _kernel(rng, n, dtype)
    A = load_symmetric(K, block=64)
    lower = np.tril(A, -1).copy()
    d = np.diagonal(K).copy()
    _restore(A, m, d, dtype(0.01))
    assert _factor(ColumnMajor(A), m, block) == 0
    L = np.tril(A[:m, :m].T)  # the column-major lower triangle = the C-order upper one
    ref = scipy.linalg.cholesky(
        K[:m, :m].astype(np.float64) + 0.01 * np.eye(m), lower=True
    )  # independent: LAPACK on a float64 copy
    tol = 2e-4 if dtype == np.float32 else 1e-10
    assert np.abs(L - ref).max() <= tol * np.abs(ref).max()
    np.testing.assert_array_equal(np.tril(A, -1), lower)  # the kernel is untouched


@pytest.mark.parametrize("m", [97, 98, 99, 100])
def test_symmetric_product_is_exact_float64_and_thread_independent(rng, m):
    K, _ = _kernel(rng, 101)
    A = load_symmetric(K, rng.permutation(101), block=32)
    ref_K = np.tril(A, -1).astype(np.float64)
    ref_K = ref_K + ref_K.T + np.diag(K.diagonal().astype(np.float64)[: A.shape[0]])
    diag = np.diagonal(ref_K).copy()
    A[np.triu_indices(101, 1)] = np.nan  # the product must not read the factor's triangle
    s = InplaceSolver(A, m, diag, tol=1e-10, max_iter=10, block=32, what="K")
    P = rng.normal(size=(m, 5))
    got = s.matmul(P, 0.25)
    np.testing.assert_allclose(got, ref_K[:m, :m] @ P + 0.25 * P, rtol=0, atol=1e-12)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = s.matmul(P, 0.25)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(one, got)


def _limit_for_inplace(n, itemsize=4):
    """A memory limit that admits the in-place route (with ``no_dense``, not the in-memory
    one)."""
    return inplace_bytes(n, itemsize) + 1000


@pytest.fixture
def no_dense(monkeypatch):
    """The in-memory route never fits (at these small sizes its 12 n^2 bytes are below the
    in-place route's read bands)."""
    import deqntk_dist.regression.krr as krr

    monkeypatch.setattr(krr, "dense_bytes", lambda n, itemsize=4: 1 << 62)


@pytest.mark.parametrize("dtype,n", [(np.float32, 400), (np.float64, 333)])
def test_kernel_ridge_inplace_equals_dense_numpy(rng, no_dense, dtype, n):
    K, y = _kernel(rng, n + 60, dtype)
    limit = _limit_for_inplace(n, np.dtype(dtype).itemsize)
    assert plan_method(n, "auto", limit, itemsize=np.dtype(dtype).itemsize)[0] == (
        "cholesky-inplace"
    )
    rep = kernel_ridge(
        K[:n, :n], y[:n], K[n:, :n], y[n:], ridges=[1e-3], memory_limit=limit, block=96
    )
    assert rep.method == "cholesky-inplace"
    assert rep.detail["factor_dtype"] == np.dtype(dtype).name
    alpha, Y, shift = _dense_alpha(K[:n, :n], y[:n], 1e-3, 3)
    assert rep.shift == pytest.approx(shift, rel=1e-12)
    assert _rel(rep.alpha, alpha) < 1e-8 and rep.residual <= 1e-10
    r = Y - (K[:n, :n].astype(np.float64) + shift * np.eye(n)) @ rep.alpha
    assert np.linalg.norm(r, axis=0).max() / np.linalg.norm(Y, axis=0).min() <= 1e-10
    pred = K[n:, :n].astype(np.float64) @ alpha
    np.testing.assert_allclose(rep.predictions, pred, rtol=0, atol=1e-8 * np.abs(pred).max())


def test_inplace_validation_matches_the_split_solved_independently(no_dense):
    # the fit rows are loaded first: the validation accuracies and the final alpha (back in
    # the training rows' order) must equal plain numpy solves on the same split
    n = 401
    x, y = _noisy_two_classes(n)
    K = kernel_matrix(SPEC, x).ntk.astype(np.float32)
    ridges = [1e-6, 1e-3, 1e-1, 10.0, 1e3]
    rep = kernel_ridge(
        K, y, ridges=ridges, val_fraction=0.2, seed=3, memory_limit=_limit_for_inplace(n),
        block=64,
    )  # fmt: skip
    assert rep.method == "cholesky-inplace"
    val = rep.val_rows
    fit = np.setdiff1d(np.arange(n), val)
    accs, mses = [], []
    for lam in ridges:
        alpha, _, _ = _dense_alpha(K[np.ix_(fit, fit)], y[fit], lam, 2)
        pred = K[np.ix_(val, fit)].astype(np.float64) @ alpha
        accs.append(np.mean(pred.argmax(1) == y[val]))
        mses.append(np.mean((pred - one_hot_targets(y[val], 2)) ** 2))
    np.testing.assert_allclose(rep.val_accuracy, accs)
    np.testing.assert_allclose(rep.val_mse, mses, rtol=1e-5)
    alpha, _, _ = _dense_alpha(K, y, rep.ridge, 2)
    assert _rel(rep.alpha, alpha) < 1e-8


def test_inplace_indefinite_matrix_is_a_clear_error(rng, no_dense):
    n = 120
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    w = np.linspace(1.0, 2.0, n)
    w[10] = -5.0
    K = ((Q * w) @ Q.T).astype(np.float32)
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        kernel_ridge(
            K, rng.integers(0, 2, n), ridges=[1e-3], memory_limit=_limit_for_inplace(n), block=16
        )


def test_store_inplace_agrees_with_the_in_memory_route(tmp_path, rng, monkeypatch):
    x, y = _data(rng, 900)
    ks = _make_store(tmp_path, x, y, 800, tile=128)
    limit = _limit_for_inplace(800)
    ref = solve_store(ks.path, ridges=[1e-4, 1e-2], solver="cholesky", write_results=False)
    import deqntk_dist.regression.krr as krr

    monkeypatch.setattr(krr, "dense_bytes", lambda n, itemsize=4: 1 << 62)
    rep = solve_store(ks.path, ridges=[1e-4, 1e-2], memory_limit=limit, write_results=False)
    assert rep.method == "cholesky-inplace" and ref.method == "cholesky-dense"
    assert rep.ridge == ref.ridge and rep.val_accuracy == ref.val_accuracy
    assert _rel(rep.alpha, ref.alpha) < 1e-8
    np.testing.assert_allclose(rep.predictions, ref.predictions, rtol=1e-7, atol=1e-9)
