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

    Raises
    ------
    InputError
        Wrong type, ndim, empty, non-finite, or mismatched feature shapes.
    """
    if isinstance(spec, DEQSpec):
        ndim, what = 2, "(n, d)"
    elif isinstance(spec, CDEQSpec):
        ndim, what = 4, "(n, H, W, C)"
    else:
        raise InputError(f"spec must be a DEQSpec or CDEQSpec, got {type(spec).__name__}")
    X = as_float_array("X", X, ndim, what=what)
    if Y is not None:
        Y = as_float_array("Y", Y, ndim, what=what)
        if Y.shape[1:] != X.shape[1:]:
            raise InputError(
                f"Y must have the same feature shape as X {X.shape[1:]}, got {Y.shape[1:]}"
            )
    if isinstance(spec, CDEQSpec):
        H, W = X.shape[1:3]
        if spec.filter_size > min(H, W):
            raise InputError(
                f"filter_size must be <= the image side min(H, W) = {min(H, W)}, "
                f"got {spec.filter_size}"
            )
    return X, Y


def kernel_matrix(spec: DEQSpec | CDEQSpec, X, Y=None, *, out=None, **options) -> KernelResult:
    """NTK and NNGP Gram block of a DEQ (or convolutional DEQ) between X and Y.

    Parameters
    ----------
    spec : DEQSpec or CDEQSpec
    X : array_like, shape (n, d) for DEQSpec or (n, H, W, C) for CDEQSpec
    Y : array_like, optional
        Same feature shape as X; ``None`` means ``Y = X`` (exactly symmetric result).
    out : dict, optional
        ``{"ntk": array, "nngp": array}`` (either or both): preallocated C-contiguous
        float32 or float64 arrays of shape (len(X), len(Y or X)) to write into.  Only those
        kernels are computed (the other is ``None`` in the result); float32 values are
        rounded exactly as ``astype(np.float32)`` of the float64 result.  Reusing arrays
        across calls avoids fresh memory per tile.
    **options
        Passed to the tile function (e.g. ``n_nodes`` for quadrature activations).

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

        return fc_kernel(spec, X, Y, out=out, **options)
    from .conv import conv_kernel

    return copy_into(conv_kernel(spec, X, Y, **options), out)


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
