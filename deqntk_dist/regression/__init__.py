"""The regression wing: kernel ridge regression on Gram matrices and kernel stores.

- :mod:`.krr`: :func:`kernel_ridge` (validate at the edge, then the private routes), the
  ridge selection and the in-core / streamed solvers;
- :mod:`.linalg`: out-of-core symmetric solvers (blocked Cholesky, Nyström, PCG);
- :mod:`.report`: the frozen :class:`SolveReport`;
- :mod:`.from_store`: :func:`solve_store` on a kernel store (results through the store
  package);
- :mod:`.distributed`: block PCG on a Dask cluster, row bands held by the workers.
"""

from .from_store import complete_rows, solve_store
from .krr import DEFAULT_RIDGES, METHODS, kernel_ridge, one_hot_targets, plan_method
from .report import SolveReport

__all__ = [
    "DEFAULT_RIDGES",
    "METHODS",
    "SolveReport",
    "complete_rows",
    "kernel_ridge",
    "one_hot_targets",
    "plan_method",
    "solve_store",
]
