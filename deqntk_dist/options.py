"""How to compute and how to solve: frozen, validated option values defined once.

:class:`ComputeOptions` (what :func:`~deqntk_dist.compute.compute_kernel_store` stores and
how it schedules) and :class:`SolveOptions` (what
:func:`~deqntk_dist.regression.solve_store` fits) are used by the library, the pipeline,
the CLI (which builds its choices, defaults and help from the field metadata) and the
scripts.  Both round-trip through JSON store attributes with ``to_dict`` / ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Self

from .errors import InputError
from .units import parse_size

__all__ = [
    "DTYPES",
    "KERNELS",
    "LAYOUTS",
    "SOLVERS",
    "ComputeOptions",
    "SolveOptions",
]

#: Kernels a store can hold.
KERNELS = ("ntk", "nngp")
#: Store dtypes.
DTYPES = ("float32", "float64")
#: Kernel store layouts (1: a chunk and ledger files per tile; 2: a shard and a record).
LAYOUTS = (1, 2)
#: Regression solver routes a user can ask for (``auto`` chooses by memory).
SOLVERS = ("auto", "cholesky", "cg")
#: Relative ridges tried on the validation split by default.
DEFAULT_RIDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _help(text: str, **more: Any) -> dict[str, Any]:
    return {"help": text, **more}


def _int(name: str, value: Any, lo: int, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise InputError(f"{name} must be an integer >= {lo}, got {value!r}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {value!r}")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        shown = ", ".join(map(repr, choices))
        raise InputError(f"{name} must be one of {shown}, got {value!r}")


def _positive(name: str, value: Any, *, optional: bool, upper: float = math.inf) -> None:
    if value is None and optional:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (0 < value <= upper)
        or not math.isfinite(value)
    ):
        bound = "> 0" if upper == math.inf else f"in (0, {upper}]"
        raise InputError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class _Options:
    """Shared ``to_dict`` / ``from_dict`` / ``replace`` of the option values."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples as lists)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys default."""
        if not isinstance(data, dict):
            raise InputError(f"{cls.__name__} must come from a dict, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def resolve(
        cls, options: Any, fields: dict[str, Any] | None = None, *, param: str = "options"
    ) -> Self:
        """``options`` (None: the defaults) with ``fields`` replaced; ``param`` names the
        argument in the error when ``options`` is not a ``cls``."""
        if options is None:
            options = cls()
        elif not isinstance(options, cls):
            raise InputError(f"{param} must be a {cls.__name__}, got {type(options).__name__}")
        return options.replace(**fields) if fields else options

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (validated like the constructor)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise InputError(f"unknown {type(self).__name__} field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def default(cls, name: str) -> Any:
        """The default value of field ``name``."""
        f = {f.name: f for f in fields(cls)}[name]
        return f.default

    @classmethod
    def meta(cls, name: str) -> dict[str, Any]:
        """The metadata (``help``, ``choices``) of field ``name``."""
        return dict({f.name: f for f in fields(cls)}[name].metadata)


@dataclass(frozen=True, kw_only=True)
class ComputeOptions(_Options):
    """What a kernel store holds and how its tiles are scheduled.

    ``kernels``, ``tile``, ``dtype``, ``tol``, ``layout`` and ``chunk`` describe a new store
    (``None``: an existing store's own, else the defaults); the others only how this call
    schedules.

    Parameters
    ----------
    kernels : tuple of {"ntk", "nngp"}, optional
        Arrays to store (default: an existing store's, else both).
    tile : int, optional
        Tile side (default: an existing store's, else from ``memory_budget``).
    dtype : {"float32", "float64"}, optional
        Store dtype (default: an existing store's, else float32).
    tol : float, optional
        CDEQ only: relative fixed-point residual of every offset slice (default 1e-9 for a
        float32 store, 1e-13 for float64); part of the store's identity.
    memory_budget : int or str, optional
        Bytes per tile on a worker, at least 1 MiB (``"1GiB"`` or ``"1GB"`` accepted;
        default: half the worker memory limit, at most 2 GiB).
    max_in_flight : int, optional
        Tiles submitted at once (default: 2 x worker threads, at least 2).
    retries : int
        Dask retries per task (I/O errors, lost workers).
    task_threads : int or None
        numba / BLAS threads inside a task (None leaves the worker's).
    max_tiles : int, optional
        Compute at most this many tiles in this call; the rest stay for a later one.
    recompute_mismatched : bool
        Recompute finished tiles whose identity differs from the store's attrs instead of
        refusing the store.
    progress : bool
        Progress bar on stderr.
    layout : {1, 2}
        Layout of a new store (2: one shard and one ledger record per tile).
    chunk : int
        Layout 2: side of the inner chunks readers fetch (a divisor of the tile is used).
    """

    kernels: tuple[str, ...] | None = field(
        default=None,
        metadata=_help(
            "kernels to store: ntk, nngp or ntk,nngp (default: ntk,nngp, or the existing store's)",
            choices=KERNELS,
        ),
    )
    tile: int | None = field(
        default=None,
        metadata=_help("tile side (default: from --memory-budget, or the existing store's)"),
    )
    dtype: str | None = field(
        default=None,
        metadata=_help("store dtype (default float32, or the existing store's)", choices=DTYPES),
    )
    tol: float | None = field(
        default=None,
        metadata=_help(
            "cdeq: relative fixed-point residual of every slice (default 1e-9 for float32 "
            "stores, 1e-13 for float64)"
        ),
    )
    memory_budget: int | None = field(
        default=None,
        metadata=_help(
            "bytes per tile on a worker, e.g. 1GiB (2^30) or 1GB (10^9) (default: half the "
            "worker memory limit, at most 2GiB)"
        ),
    )
    max_in_flight: int | None = field(
        default=None, metadata=_help("tiles submitted at once (default 2 x worker threads)")
    )
    retries: int = field(default=2, metadata=_help("dask retries per tile"))
    task_threads: int | None = field(
        default=1, metadata=_help("numba/BLAS threads per task (0 on the CLI: the worker's)")
    )
    max_tiles: int | None = field(
        default=None,
        metadata=_help(
            "compute at most this many tiles in this run (the rest stay for a later run)"
        ),
    )
    recompute_mismatched: bool = field(
        default=False,
        metadata=_help(
            "recompute finished tiles computed under another identity than the store's attrs "
            "claim (edited attrs) instead of refusing the store"
        ),
    )
    progress: bool = field(default=True, metadata=_help("progress bar on stderr"))
    layout: int = field(
        default=2,
        metadata=_help(
            "layout of a new store: 2 (one shard and one ledger record per tile) or 1 (one "
            "chunk and 14 ledger files per tile); an existing store keeps its own",
            choices=LAYOUTS,
        ),
    )
    chunk: int = field(
        default=1024,
        metadata=_help(
            "layout 2: side of the inner chunks readers fetch (or a divisor of the tile)"
        ),
    )

    def __post_init__(self) -> None:
        k = self.kernels
        if k is not None:
            if isinstance(k, str):
                k = tuple(s.strip() for s in k.split(",") if s.strip())
            try:
                k = tuple(k)
            except TypeError:
                raise InputError(f"kernels must be a sequence of ntk, nngp, got {k!r}") from None
            bad = [s for s in k if s not in KERNELS]
            if bad or not k or len(set(k)) != len(k):
                raise InputError(
                    f"kernels must be a non-empty list of distinct ntk, nngp, got {list(k)}"
                )
            object.__setattr__(self, "kernels", k)
        if self.dtype is not None:
            _choice("dtype", self.dtype, DTYPES)
        _positive("tol", self.tol, optional=True, upper=1e-3)
        if self.memory_budget is not None:
            budget = parse_size(self.memory_budget, param="memory_budget", minimum=2**20)
            object.__setattr__(self, "memory_budget", budget)
        _int("tile", self.tile, 1, optional=True)
        _int("max_in_flight", self.max_in_flight, 1, optional=True)
        _int("retries", self.retries, 0, optional=False)
        _int("task_threads", self.task_threads, 1, optional=True)
        _int("max_tiles", self.max_tiles, 1, optional=True)
        _int("chunk", self.chunk, 1, optional=False)
        _choice("layout", self.layout, LAYOUTS)
        _flag("recompute_mismatched", self.recompute_mismatched)
        _flag("progress", self.progress)


@dataclass(frozen=True, kw_only=True)
class SolveOptions(_Options):
    """Kernel ridge regression on a kernel store: which kernel, which ridges, which solver.

    Parameters
    ----------
    kernel : {"ntk", "nngp"}
        Kernel the regression uses.
    ridges : tuple of float, optional
        Relative ridges lam (the shift is ``lam tr(K) / n``), chosen on a validation split
        of the training rows (default 1e-5 ... 1e-1; one value is used as given).
    solver : {"auto", "cholesky", "cg"}
        Route: ``auto`` chooses by memory; ``cg`` is preconditioned CG (the only route on a
        Dask cluster).
    memory_limit : int or str, optional
        Memory the in-process solve may use (``"16GB"`` accepted; default 75 % of the
        machine).
    val_fraction : float
        Share of the training rows held out to choose the ridge, in (0, 0.5].
    seed : int
        Seed of the validation split.
    tol : float
        Relative residual of the final fit.
    max_iter : int
        CG iterations per solve.
    rank : int
        Nyström rank of the CG preconditioner.
    allow_incomplete : bool
        Solve a partial store on the rows whose tiles are all done.
    band_bytes : int or str
        Distributed solve: bytes of one row band of the train block (at least 1 MiB).
    keep_bands : bool, optional
        Distributed solve: hold the bands in worker memory (default: when they take at
        most half of the cluster's memory) or re-read them every iteration.
    """

    kernel: str = field(
        default="ntk", metadata=_help("kernel the regression uses", choices=KERNELS)
    )
    ridges: tuple[float, ...] | None = field(
        default=None,
        metadata=_help(
            "comma list of relative ridges lam, e.g. 1e-4,1e-3,1e-2, chosen on a validation "
            "split of the training rows (default 1e-5..1e-1; one value is used as given)"
        ),
    )
    solver: str = field(
        default="auto",
        metadata=_help(
            "regression route (default auto: by memory; cg on a Dask cluster)", choices=SOLVERS
        ),
    )
    memory_limit: int | None = field(
        default=None,
        metadata=_help(
            "memory of the in-process solve, e.g. 16GB (10^9) or 16GiB (2^30) (default 75%% "
            "of the machine memory)"
        ),
    )
    val_fraction: float = field(
        default=0.2, metadata=_help("share of training rows for the validation")
    )
    seed: int = field(default=0, metadata=_help("seed of the validation split"))
    tol: float = field(default=1e-10, metadata=_help("relative residual of the final fit"))
    max_iter: int = field(default=500, metadata=_help("CG iterations per solve"))
    rank: int = field(default=512, metadata=_help("Nystrom rank of the CG preconditioner"))
    allow_incomplete: bool = field(
        default=False,
        metadata=_help("solve a partial store on the rows whose tiles are all done"),
    )
    band_bytes: int = field(
        default=256 * 2**20,
        metadata=_help("distributed solve: bytes of one row band of the train block"),
    )
    keep_bands: bool | None = field(
        default=None,
        metadata=_help("distributed solve: hold the bands in worker memory (default: if fit)"),
    )

    def __post_init__(self) -> None:
        _choice("kernel", self.kernel, KERNELS)
        _choice("solver", self.solver, SOLVERS)
        r = self.ridges
        if r is not None:
            if isinstance(r, int | float) and not isinstance(r, bool):
                r = (r,)
            try:
                r = tuple(float(v) for v in r)
            except (TypeError, ValueError):
                raise InputError(f"ridges must be a list of positive numbers, got {r!r}") from None
            if not r or any(not (math.isfinite(v) and v > 0) for v in r):
                raise InputError(f"ridges must be a non-empty list of numbers > 0, got {list(r)}")
            object.__setattr__(self, "ridges", r)
        if self.memory_limit is not None:
            limit = parse_size(self.memory_limit, param="memory_limit")
            object.__setattr__(self, "memory_limit", limit)
        _positive("val_fraction", self.val_fraction, optional=False, upper=0.5)
        _int("seed", self.seed, 0, optional=False)
        _positive("tol", self.tol, optional=False, upper=1.0)
        _int("max_iter", self.max_iter, 1, optional=False)
        _int("rank", self.rank, 0, optional=False)
        _flag("allow_incomplete", self.allow_incomplete)
        band = parse_size(self.band_bytes, param="band_bytes", minimum=2**20)
        object.__setattr__(self, "band_bytes", band)
        if self.keep_bands is not None:
            _flag("keep_bands", self.keep_bands)
