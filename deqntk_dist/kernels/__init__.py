"""Pure kernel maths: numpy arrays in, numpy arrays out (no dask, zarr or paths)."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..spec import CDEQSpec, DEQSpec
from .common import KernelResult, as_float_array, copy_into, validate_out

__all__ = [
    "KernelResult",
    "finite_depth_kernel",
    "kernel_matrix",
    "self_covariance",
    "validate_inputs",
]


def validate_inputs(spec: DEQSpec | CDEQSpec, X, Y=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Check X (and Y) against the spec; return float64 C-contiguous copies.

    A DEQSpec takes rows ``(n, d)`` or images ``(n, H, W, C)`` (flattened by the kernel;
    required with ``hflip``); a CDEQSpec takes images.

    Raises
    ------
    InputError
        Wrong type, ndim, empty, non-finite, mismatched feature shapes, a filter or pool
        larger than the images allow, or ``hflip`` on rows that are not images.
    """
    if isinstance(spec, DEQSpec):
        ndim, what = (4, "(n, H, W, C)") if spec.hflip else (2, "(n, d)")
        if not spec.hflip and np.ndim(X) == 4:
            ndim, what = 4, "(n, H, W, C)"
    elif isinstance(spec, CDEQSpec):
        ndim, what = 4, "(n, H, W, C)"
    else:
        raise InputError(f"spec must be a DEQSpec or CDEQSpec, got {type(spec).__name__}")
    if isinstance(spec, DEQSpec) and spec.hflip and np.ndim(X) != 4:
        raise InputError(
            "hflip=True needs image rows X of shape (n, H, W, C) to flip along the width, "
            f"got shape {np.shape(X)}"
        )
    X = as_float_array("X", X, ndim, what=what)
    if Y is not None:
        Y = as_float_array("Y", Y, ndim, what=what)
        if Y.shape[1:] != X.shape[1:]:
            raise InputError(
                f"Y must have the same feature shape as X {X.shape[1:]}, got {Y.shape[1:]}"
            )
    for name, A in (("X", X), ("Y", Y)):
        if A is not None:
            _check_scale(name, A, spec)
    if isinstance(spec, CDEQSpec):
        H, W = X.shape[1:3]
        if spec.filter_size > min(H, W):
            raise InputError(
                f"filter_size must be <= the image side min(H, W) = {min(H, W)}, "
                f"got {spec.filter_size}"
            )
        if spec.readout == "lap" and spec.pool_size > 2 * max(H, W) - 1:
            raise InputError(
                f"pool_size must be <= 2 max(H, W) - 1 = {2 * max(H, W) - 1} for {H}x{W} "
                f"images (a larger window pools nothing more), got {spec.pool_size}"
            )
    return X, Y


#: Largest input covariance ``sigma_u2 |x|^2 / d`` accepted: products of two of them (the
#: kernel maths forms such products) must stay finite in float64 (max ~1.8e308).
MAX_INPUT_COVARIANCE = 1e150


def _check_scale(name: str, A: np.ndarray, spec) -> None:
    """Refuse inputs so large that their inner products overflow float64 (the kernel would
    otherwise report entries that "did not converge" where the cause is overflow)."""
    flat = A.reshape(A.shape[0], -1)
    with np.errstate(over="ignore", invalid="ignore"):
        cov = spec.sigma_u2 * np.einsum("ij,ij->i", flat, flat) / flat.shape[1]
    bad = ~(cov <= MAX_INPUT_COVARIANCE)  # also inf / nan
    if bad.any():
        k = int(np.argmax(bad))
        raise InputError(
            f"{name} must have input covariances sigma_u2 |x|^2 / d <= "
            f"{MAX_INPUT_COVARIANCE:g} (beyond that the inner products overflow float64), got "
            f"{cov[k]:.3g} for row {k} (max |{name}| entry {np.abs(flat[k]).max():.3g}); "
            "rescale the inputs, e.g. unit-norm preprocessing"
        )


def kernel_matrix(spec: DEQSpec | CDEQSpec, X, Y=None, *, out=None, **options) -> KernelResult:
    """NTK and NNGP Gram block of a DEQ (or convolutional DEQ) between X and Y.

    Parameters
    ----------
    spec : DEQSpec or CDEQSpec
    X : array_like, shape (n, d) or (n, H, W, C) for DEQSpec, (n, H, W, C) for CDEQSpec
    Y : array_like, optional
        Same feature shape as X; ``None`` means ``Y = X`` (exactly symmetric result).
    out : dict, optional
        ``{"ntk": array, "nngp": array}`` (either or both): preallocated C-contiguous
        float32 or float64 arrays of shape (len(X), len(Y or X)) to write into.  Only those
        kernels are computed (the other is ``None`` in the result); float32 values are
        rounded exactly as ``astype(np.float32)`` of the float64 result.  Reusing arrays
        across calls avoids fresh memory per tile.
    **options
        Passed to the tile function (e.g. ``n_nodes`` for quadrature activations; for
        CDEQSpec ``tol``, whose default is :data:`~.conv.FLOAT32_TOL` when every ``out``
        array is float32 and :data:`~.conv.DEFAULT_TOL` otherwise).

    Returns
    -------
    KernelResult
        ``ntk``, ``nngp``: float64 arrays of shape (len(X), len(Y or X)), with the
        convergence report (``max_residual``, ``iterations``).

    Raises
    ------
    InputError, SpecError, FixedPointError
    """
    X, Y = validate_inputs(spec, X, Y)
    out = validate_out(out, (X.shape[0], (X if Y is None else Y).shape[0]))
    if isinstance(spec, DEQSpec):
        from .fc import fc_kernel

        if spec.hflip:
            return _fc_hflip(fc_kernel, spec, X, Y, out, options)
        X = X.reshape(X.shape[0], -1)
        Y = None if Y is None else Y.reshape(Y.shape[0], -1)
        return fc_kernel(spec, X, Y, out=out, **options)
    from .conv import conv_kernel, default_tol

    options.setdefault("tol", default_tol(out))
    return copy_into(conv_kernel(spec, X, Y, **options), out)


def _fc_hflip(fc_kernel, spec: DEQSpec, X, Y, out, options) -> KernelResult:
    """``(K(x, y) + K(x, flip y)) / 2`` of the FC kernel on image rows.

    In a symmetric tile the flipped half is read from its upper triangle (``K(x_a, flip
    x_b)``, ``a <= b``) and mirrored, as an off-diagonal tile computes it.
    """
    n = X.shape[0]
    symmetric = Y is None
    images = X if symmetric else Y
    flat = X.reshape(n, -1)
    flipped = np.ascontiguousarray(images[:, :, ::-1, :]).reshape(images.shape[0], -1)
    names = list(out) if out else ["ntk", "nngp"]
    shape = (n, images.shape[0])
    a = {k: np.empty(shape) for k in names}
    b = {k: np.empty(shape) for k in names}
    ra = fc_kernel(spec, flat, None if symmetric else Y.reshape(shape[1], -1), out=a, **options)
    rb = fc_kernel(spec, flat, flipped, out=b, **options)
    for k in names:
        B = b[k]
        if symmetric:
            B = np.triu(B) + np.triu(B, 1).T
        a[k] += B
        a[k] *= 0.5
    res = KernelResult(
        ntk=a.get("ntk"),
        nngp=a.get("nngp"),
        max_residual=max(ra.max_residual, rb.max_residual),
        iterations=max(ra.iterations, rb.iterations),
    )
    return copy_into(res, out)


def self_covariance(spec: DEQSpec | CDEQSpec, X) -> np.ndarray:
    """Per-example self-covariance fixed points, computed once per dataset (O(N)).

    Returns
    -------
    ndarray
        Shape (n,) for DEQSpec (``Sigma*(x, x)``); for CDEQSpec the per-pixel diagonal
        ``Sigma*(x, x)_{ii}`` of shape (n, H, W).  Pass slices of it to
        ``kernel_matrix(spec, X, Y, self_x=..., self_y=...)`` for a CDEQ tile.
    """
    X, _ = validate_inputs(spec, X)
    if isinstance(spec, DEQSpec):
        from .fc import self_covariance as fc_self

        return fc_self(spec, X)
    from .conv import conv_self_covariance

    return conv_self_covariance(spec, X)


def finite_depth_kernel(spec: DEQSpec, X, Y=None, *, depth: int, **options) -> KernelResult:
    """Kernels of the depth-``depth`` weight-tied FC network (the DEQ's finite-depth baseline).

    Validated front end of :func:`deqntk_dist.kernels.fc.finite_depth_kernel`; pass
    ``injection_all_layers=False`` for the network without input injection, whose kernel
    degenerates as the depth grows.
    """
    if not isinstance(spec, DEQSpec):
        raise InputError(
            f"spec must be a DEQSpec for finite_depth_kernel, got {type(spec).__name__}"
        )
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise InputError(f"depth must be an integer >= 1, got {depth!r}")
    X, Y = validate_inputs(spec, X, Y)
    from .fc import finite_depth_kernel as _finite_depth

    return _finite_depth(spec, X, Y, depth=depth, **options)
