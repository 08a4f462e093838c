import numpy as np
import pytest

from deqntk_dist.kernels.duals import dual_maps


def _cov(rng, n):
    a = rng.uniform(0.2, 3.0, n)
    b = rng.uniform(0.2, 3.0, n)
    rho = rng.uniform(-0.99, 0.99, n)
    return a, b, rho * np.sqrt(a * b)


def test_erf_quadrature_matches_closed_form(rng):
    a, b, c = _cov(rng, 200)
    k1, k0 = dual_maps("erf", a, b, c)
    q1, q0 = dual_maps("erf", a, b, c, quadrature=True, n_nodes=150)
    np.testing.assert_allclose(q1, k1, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(q0, k0, rtol=1e-10, atol=1e-13)


def test_relu_quadrature_matches_closed_form(rng):
    # the kink (k1) and the jump (k0) limit Gauss-Hermite accuracy: the closed form is what
    # the kernel uses for ReLU; quadrature must still converge towards it
    a, b, c = _cov(rng, 50)
    k1, k0 = dual_maps("relu", a, b, c)
    e1, e0 = [], []
    for n in (40, 150):
        q1, q0 = dual_maps("relu", a, b, c, quadrature=True, n_nodes=n)
        e1.append(np.max(np.abs(q1 - k1) / np.sqrt(a * b)))
        e0.append(np.max(np.abs(q0 - k0)))
    assert e1[1] < 1.5e-3 and e0[1] < 2.5e-2
    assert e1[1] < e1[0] / 2 and e0[1] < e0[0] / 1.5
    with pytest.raises(ValueError, match="n_nodes"):
        dual_maps("relu", a, b, c, quadrature=True, n_nodes=400)


def test_relu_closed_form_against_monte_carlo(rng):
    a, b, rho = 1.7, 0.6, -0.3
    c = rho * np.sqrt(a * b)
    L = np.linalg.cholesky(np.array([[a, c], [c, b]]))
    z = rng.standard_normal((2, 2_000_000))
    u, v = L @ z
    mc1 = np.mean(np.maximum(u, 0) * np.maximum(v, 0))
    mc0 = np.mean((u > 0) & (v > 0))
    k1, k0 = dual_maps("relu", a, b, c)
    assert abs(k1 - mc1) < 4 * np.std(np.maximum(u, 0) * np.maximum(v, 0)) / np.sqrt(z.shape[1])
    assert abs(k0 - mc0) < 4 * 0.5 / np.sqrt(z.shape[1])


@pytest.mark.parametrize("act", ["tanh", "gelu"])
def test_quadrature_against_monte_carlo(rng, act):
    from scipy.special import erf

    phi = {"tanh": np.tanh, "gelu": lambda u: u * 0.5 * (1 + erf(u / np.sqrt(2)))}[act]
    a, b, rho = 1.3, 0.8, 0.55
    c = rho * np.sqrt(a * b)
    L = np.linalg.cholesky(np.array([[a, c], [c, b]]))
    u, v = L @ rng.standard_normal((2, 1_000_000))
    prod = phi(u) * phi(v)
    k1, _ = dual_maps(act, a, b, c)
    assert abs(k1 - prod.mean()) < 4 * prod.std() / np.sqrt(len(prod))


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        dual_maps("swish", 1.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="closed-form"):
        dual_maps("tanh", 1.0, 1.0, 0.5, quadrature=False)
