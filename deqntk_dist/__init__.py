"""deqntk_dist: NTK / NNGP Gram matrices of infinitely deep equilibrium models, tiled on Dask."""

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
from .kernels import KernelResult, kernel_matrix
from .spec import CDEQSpec, DEQSpec, spec_from_dict

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
    "SpecError",
    "StoreError",
    "StoreMismatchError",
    "kernel_matrix",
    "spec_from_dict",
    "__version__",
]
