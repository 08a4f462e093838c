"""deqntk_dist: NTK / NNGP Gram matrices of infinitely deep equilibrium models, tiled on Dask."""

from .dataset import open_dataset_store, write_dataset_store
from .errors import (
    DatasetError,
    DeqntkError,
    FixedPointError,
    IncompleteStoreError,
    InputError,
    SolveError,
    SpecError,
    StoreError,
    StoreMismatchError,
)
from .kernels import KernelResult, finite_depth_kernel, kernel_matrix, self_covariance
from .solve import SolveReport, kernel_ridge, solve_store
from .spec import CDEQSpec, DEQSpec, spec_from_dict
from .store import open_kernel_store

__version__ = "0.1.0"

__all__ = [
    "CDEQSpec",
    "DEQSpec",
    "DatasetError",
    "DeqntkError",
    "FixedPointError",
    "IncompleteStoreError",
    "InputError",
    "KernelResult",
    "SolveError",
    "SolveReport",
    "SpecError",
    "StoreError",
    "StoreMismatchError",
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
