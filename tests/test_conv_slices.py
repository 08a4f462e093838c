"""Primitives of the Newton-Chebyshev slice solver (deqntk_dist.kernels.conv_slices)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from deqntk_dist.kernels.conv_slices import (
    ALIGN,
    QUANTUM,
    _aligned_rows,
    _amax32,
    _band_length,
    _band_start,
    slice_length,
)


@pytest.mark.parametrize(("amax", "dtype"), [(_amax32, np.float32)])
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_workspace_rows_are_aligned_and_hold_every_slice(dtype):
    for H, W, r in ((1, 1, 1), (28, 28, 1), (32, 32, 1), (7, 5, 2), (9, 30, 3)):
        L = slice_length(H, W, r)
        assert L % ALIGN == 0
        for _ in range(5):  # the heap offset varies between allocations
            rows, owner = _aligned_rows(3, L, dtype)
            assert rows.shape == (3, L) and rows.dtype == dtype
            assert all(rows[i].ctypes.data % 64 == 0 for i in range(3))
            assert np.shares_memory(rows, owner)
        for h in range(1, H + 1):  # every slice's band and its zero rows fit the row
            for w in range(1, W + 1):
                wp = w + 2 * r
                b0 = int(_band_start(np.uint64(r), np.uint64(wp)))
                n = int(_band_length(h, np.uint64(wp)))
                assert b0 % ALIGN == 0 and b0 >= r + r * wp
                assert n % QUANTUM == 0 and h * wp <= n < h * wp + QUANTUM
                assert b0 + n + r * wp + r <= L


_CDEQ_SNIPPET = """
import sys
import numpy as np
from deqntk_dist import CDEQSpec, kernel_matrix
x = np.random.default_rng(12345).normal(size=(23, 6, 5, 2)).astype(np.float32)
x[3] = x[1, :, ::-1]
out = b""
for extra in ({}, {"readout": "lap", "pool_size": 3, "hflip": True}):
    k = kernel_matrix(CDEQSpec(sigma_w2=1.2, sigma_u2=1.0, sigma_b2=0.1, **extra), x)
    out += k.ntk.tobytes() + k.nngp.tobytes()
sys.stdout.write(out.hex())
"""


@pytest.mark.slow
def test_slice_bits_do_not_depend_on_numba_cache_or_cpu_tuning(tmp_path):
    """The same CDEQ Gram, bit for bit, from freshly compiled code, from numba's cache, and
    from code compiled for a generic x86-64 CPU (no FMA unit: software FMA, no wide
    vectors).  CI caught a fresh-compile / cache-load mismatch when FMA was left to LLVM's
    contraction, and dask workers routinely compile or load at different times."""
    import platform

    def run(cache, **env_extra):
        drop = ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME", "DEQNTK_WIDE_VECTORS")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(NUMBA_CACHE_DIR=str(tmp_path / cache), **env_extra)
        out = subprocess.run(
            [sys.executable, "-c", _CDEQ_SNIPPET], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    fresh = run("a")
    assert len(fresh) == 2 * 4 * 23 * 23 * 8
    assert run("a") == fresh  # loaded from the cache the first run wrote
    if platform.machine() in ("x86_64", "AMD64"):
        assert run("b", NUMBA_CPU_NAME="generic") == fresh


@pytest.mark.parametrize("sigma_w2", [0.5, 1.0, 1.5, 1.8, 1.95])
def test_polynomial_start_is_the_pointwise_fixed_point(rng, sigma_w2):
    """The start x = s rho(kb / s) solves the pointwise ReLU fixed point rho - sw2 f(rho) = t
    (f the normalised arc-cosine map), by the polynomial where it applies and the table
    beyond; checked against a bracketing root finder on random t in [-1, 1]."""
    from scipy.optimize import brentq

    from deqntk_dist.kernels.conv import _relu_start_table
    from deqntk_dist.kernels.conv_slices import _initial

    table, t_max, inv_step, poly, u_poly = _relu_start_table(sigma_w2)
    if sigma_w2 <= 1.5:  # the polynomial covers t >= -0.75 at these weights
        assert u_poly >= np.sqrt(t_max + 0.75)

    def f(rho):
        th = np.arccos(np.clip(rho, -1.0, 1.0))
        return (np.sin(th) + (np.pi - th) * np.cos(th)) / (2.0 * np.pi)

    n = 400
    t = np.concatenate([rng.uniform(-1.0, 1.0, n - 4), [-1.0, 0.0, t_max, 1.0]])
    s = rng.uniform(0.5, 2.0, n)
    x = np.full(n + 2, np.nan)
    x[[0, -1]] = 7.0  # outside the band: untouched
    pad = np.zeros(1)
    xf = np.full(n + 2, np.nan, np.float32)
    _initial(x, xf, np.concatenate([pad, s, pad]), np.concatenate([pad, 1.0 / s, pad]),
             np.concatenate([pad, t * s, pad]), table, t_max, inv_step, poly, u_poly,
             np.uint64(1), np.uint64(n))  # fmt: skip
    assert x[0] == 7.0 and x[-1] == 7.0 and np.isnan(xf[[0, -1]]).all()
    assert np.array_equal(xf[1:-1], x[1:-1].astype(np.float32))  # its float32 copy
    ref = np.array(
        [brentq(lambda r, ti=ti: r - sigma_w2 * f(r) - ti, -1.0, 1.0, xtol=1e-15)
         if ti < t_max else 1.0 for ti in t]
    )  # fmt: skip
    np.testing.assert_allclose(x[1:-1] / s, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("by_offset", [True, False])
def test_chunks_take_every_task_once_offsets_back_to_back(by_offset):
    from deqntk_dist.kernels.conv_slices import _chunk_task, _chunk_tasks

    for n_chunks, n_off, n_pairs in ((1, 1, 1), (16, 121, 7), (5, 3, 11), (8, 81, 1), (3, 9, 4)):
        seen = []
        for c in range(n_chunks):
            k = _chunk_tasks(c, n_chunks, n_off, n_pairs, by_offset)
            mine = [_chunk_task(c, j, n_chunks, n_off, n_pairs, by_offset) for j in range(k)]
            seen += mine
            if by_offset:  # one offset for every pair, then the next
                assert [o for o, _ in mine] == sorted(o for o, _ in mine)
                assert all(o % n_chunks == c for o, _ in mine)
        assert sorted(seen) == [(o, q) for o in range(n_off) for q in range(n_pairs)]


@pytest.mark.parametrize(("readout", "extra"), [("gap", {}), ("lap", {"pool_size": 3})])
def test_slice_results_do_not_depend_on_the_slice_solved_before(rng, readout, extra):
    """Consecutive tasks of one shape skip the shape-only writes (mask, pad zeros): every
    (pair, offset) result is bit for bit the same whatever was solved before it in the
    workspace: pairs in another order, or alone."""
    from deqntk_dist import CDEQSpec
    from deqntk_dist.kernels import conv

    spec = CDEQSpec(sigma_w2=1.5, sigma_u2=0.8, sigma_b2=0.1, readout=readout, **extra)
    X = rng.uniform(0.0, 1.0, (5, 9, 8, 2))
    X[1, :4] = 0.0  # blank rows: locally uniform slices
    X[3] = X[0]  # the same-image path at offset 0
    V = conv.conv_self_covariance(spec, X)
    inp = conv._task_inputs(spec, X, X, V, V, None)
    plan = conv.readout_plan(spec, 9, 8)
    n_off = len(plan[0])
    pi, pj = (a.ravel().astype(np.int64) for a in np.meshgrid(range(5), range(5), indexing="ij"))
    kw = {"tol": 1e-9, "max_iter": 4000, "history": 5, "method": 0}
    ref = conv.slice_tasks(inp, plan, pi, pj, **kw).reshape(25, n_off, 6)
    assert ref[..., 5].sum() == 0  # all fast: the workspaces carry over between tasks
    perm = rng.permutation(25)
    got = conv.slice_tasks(inp, plan, pi[perm], pj[perm], **kw).reshape(25, n_off, 6)
    assert np.array_equal(got, ref[perm])
    for q in (0, 7, 24):
        one = conv.slice_tasks(inp, plan, pi[q : q + 1], pj[q : q + 1], **kw)
        assert np.array_equal(one.reshape(n_off, 6), ref[q])
    assert not np.array_equal(ref[..., 0], 0.0)


def test_relu_dual_maps_match_the_closed_form(rng):
    """The float64 and float32 ReLU dual maps of the slice solver (asin polynomials, cos
    Taylor series) against numpy's arccos: k0 = acos(-rho) / 2pi,
    k1 = s (sqrt(1 - rho^2) + rho acos(-rho)) / 2pi; pads (s = 0) give zeros."""
    from deqntk_dist.kernels.conv_slices import _relu32, _relu64

    def closed_form(rho, s):
        theta_c = np.arccos(-rho)  # pi - theta, accurate near rho = -1
        k0 = np.where(s > 0, theta_c / (2 * np.pi), 0.0)
        return k0, s * (np.sqrt((1 - rho) * (1 + rho)) + rho * theta_c) / (2 * np.pi)

    special = [-1.0, -0.5, 0.0, 0.5, 1.0, 1e-300, -1e-17, 0.3]
    special += list(np.nextafter([-0.5, 0.5, -1.0, 1.0], 0.0))
    n = 4000
    rho = np.concatenate([rng.uniform(-1.0, 1.0, n - len(special)), special])
    s = rng.uniform(0.5, 2.0, n)
    s[-1] = 0.0  # a pad
    inv_s = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), 0.0)
    x = rho * s
    # at the correlation the map sees (x / s: rounding x moves rho near +-1, where k0 has a
    # square-root end)
    k0_ref, k1_ref = closed_form(np.clip(x / np.where(s > 0, s, 1.0), -1.0, 1.0), s)
    k1, k0, k0f = np.empty(n), np.empty(n), np.empty(n, np.float32)
    m = _relu64(x, s, inv_s, k1, k0, k0f, np.uint64(0), np.uint64(n), True)
    assert np.abs(k0 - k0_ref).max() <= 2.3e-16 and np.abs(k1 - k1_ref).max() <= 1e-15
    assert np.array_equal(k0f, k0.astype(np.float32)) and m == np.abs(k0f).max()
    assert k0[-1] == 0.0 and k1[-1] == 0.0
    # float32: against the closed form at the correlation its rounded inputs give
    x32, s32, is32 = x.astype(np.float32), s.astype(np.float32), inv_s.astype(np.float32)
    k1f, k0f32 = np.empty(n, np.float32), np.empty(n, np.float32)
    m32 = _relu32(x32, s32, is32, k1f, k0f32, np.uint64(0), np.uint64(n))
    rho32 = np.clip(x32.astype(np.float64) * is32, -1.0, 1.0)
    k0_32, k1_32 = closed_form(rho32, s32.astype(np.float64))
    ok = np.abs(rho32) < 0.999  # away from the square-root ends, where rounding rho matters
    assert np.abs(k0f32 - k0_32)[ok].max() <= 3e-7 and np.abs(k1f - k1_32)[ok].max() <= 1e-6
    assert np.abs(k0f32 - k0_32).max() <= 1e-4 and m32 == np.abs(k0f32).max()
