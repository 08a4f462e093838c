"""Exceptions raised by deqntk_dist.

Every exception derives from :class:`DeqntkError` *and* from the builtin that a caller would
naturally catch (``ValueError`` for bad input, ``ArithmeticError`` for numerical failure,
``RuntimeError`` / ``OSError`` for store and runtime problems), in the style of zarr-python.
"""

from __future__ import annotations

import copy
from typing import Any, Self

__all__ = [
    "DeqntkError",
    "SpecError",
    "InputError",
    "FixedPointError",
    "StoreError",
    "ClusterError",
    "StoreNotFoundError",
    "StoreMismatchError",
    "IncompleteStoreError",
    "DatasetError",
    "SolveError",
    "NotPositiveDefiniteError",
    "DatasetWarning",
]


def _rebuild(cls: type, args: tuple, kwargs: dict[str, Any]) -> BaseException:
    """Unpickle an exception: ``cls(*args, **kwargs)`` (its ``__dict__`` is restored after)."""
    return cls(*args, **kwargs)


class DeqntkError(Exception):
    """Base class of every error raised by deqntk_dist.

    Every subclass pickles with its attributes (a worker's error reaches the driver as
    itself): the constructor's keyword-only attributes are named in ``_keyword_attrs``.
    """

    #: attributes passed back to the constructor as keywords when unpickling
    _keyword_attrs: tuple[str, ...] = ()

    def __reduce__(self):
        kwargs = {name: getattr(self, name) for name in self._keyword_attrs}
        return (_rebuild, (type(self), self.args, kwargs), dict(self.__dict__) or None)

    def with_message(self, message: str) -> Self:
        """A copy of this error (same type and attributes) whose message is ``message``."""
        new = copy.copy(self)
        new.args = (message,)
        return new


class SpecError(DeqntkError, ValueError):
    """A kernel specification parameter is outside its valid region."""


class InputError(DeqntkError, ValueError):
    """An input array (shape, dtype, values) is not acceptable."""


class FixedPointError(DeqntkError, ArithmeticError):
    """A kernel fixed point did not converge (or does not exist) for some entries.

    Attributes
    ----------
    entries : list of tuple
        Up to 20 ``(row, col)`` indices (tile-local) of failing entries.
    n_failed : int
        Total number of failing entries.
    """

    _keyword_attrs = ("entries", "n_failed")

    def __init__(self, message: str, *, entries=(), n_failed: int = 0):
        super().__init__(message)
        self.entries = list(entries)
        self.n_failed = int(n_failed)


class StoreError(DeqntkError, RuntimeError):
    """A dataset or kernel store is missing, unreadable or inconsistent."""


class ClusterError(DeqntkError, RuntimeError):
    """The runtime did not provide workers: no scheduler reachable at the given address or
    scheduler file, no worker joined in time, or batch jobs that ended before their worker
    started.

    Attributes
    ----------
    jobs : list of dict
        One ``{"job_id", "state", "log"}`` per worker job that failed to start (empty for
        scheduler problems).
    """

    _keyword_attrs = ("jobs",)

    def __init__(self, message: str, *, jobs=()):
        super().__init__(message)
        self.jobs = list(jobs)


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store at the given path or URL."""


class StoreMismatchError(StoreError, ValueError):
    """A store was reopened with a different spec, dataset, tile size or dtype."""


class IncompleteStoreError(StoreError):
    """A kernel store has tiles that are not (verifiably) done."""


class DatasetError(DeqntkError, ValueError):
    """A dataset file is missing, corrupt or inconsistent, or the dataset name is unknown."""


class SolveError(DeqntkError, ArithmeticError):
    """The regression stage failed (indefinite matrix, non-finite values, size mismatch)."""


class NotPositiveDefiniteError(SolveError):
    """A Cholesky factorisation (or CG curvature) found the matrix not positive definite."""


class DatasetWarning(UserWarning):
    """A dataset is usable but suspicious (e.g. test classes that never occur in training)."""
