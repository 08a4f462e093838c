"""deqntk_dist: NTK / NNGP Gram matrices of infinitely deep equilibrium models, tiled on Dask."""

from . import jit as jit  # first: sets numba's CPU features before anything compiles
from .errors import (
    ClusterError,
    DatasetError,
    DeqntkError,
    FixedPointError,
    IncompleteStoreError,
    InputError,
    SolveError,
    SpecError,
    StoreError,
    StoreMismatchError,
    StoreNotFoundError,
)
from .kernels import KernelResult, finite_depth_kernel, kernel_matrix, self_covariance
from .options import ComputeOptions, SolveOptions
from .spec import CDEQSpec, DEQSpec, spec_from_dict
from .store import open_kernel_store
from .store.dataset import open_dataset_store, write_dataset_store

__version__ = "0.1.0"

#: Imported on first use: workers computing tiles never need scipy's solvers.
_LAZY = {"SolveReport": "regression", "kernel_ridge": "regression", "solve_store": "regression"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CDEQSpec",
    "ClusterError",
    "ComputeOptions",
    "DEQSpec",
    "DatasetError",
    "DeqntkError",
    "FixedPointError",
    "IncompleteStoreError",
    "InputError",
    "KernelResult",
    "SolveError",
    "SolveOptions",
    "SolveReport",
    "SpecError",
    "StoreError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "finite_depth_kernel",
    "kernel_matrix",
    "kernel_ridge",
    "open_dataset_store",
    "open_kernel_store",
    "self_covariance",
    "solve_store",
    "spec_from_dict",
    "write_dataset_store",
    "__version__",
]
