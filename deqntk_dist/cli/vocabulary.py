"""The one CLI vocabulary: shared arguments built from the option values, deprecated
spellings, sizes, and the translation of library parameter names into flags.

``--model deq|cdeq`` is the network, ``--kernels ntk,nngp`` what a store holds,
``--kernel ntk|nngp`` the one kernel a regression uses, ``--ridges`` and ``--solver`` the
regression everywhere.  The spellings of earlier versions (``--what``, ``--ridge``,
``--lambdas``, ``--method``, ``--solve-method``, ``--solve-kernel``, ``--kernel deq|cdeq``)
still work with a one-line :class:`FlagDeprecationWarning`.
"""

from __future__ import annotations

import argparse
import re
import warnings
from typing import Any

from ..errors import InputError
from ..options import KERNELS, ComputeOptions, SolveOptions
from ..spec import READOUTS
from ..units import parse_size

__all__ = [
    "DEFAULT_HYPERPARAMETERS",
    "DEFAULT_POOL_SIZE",
    "MODELS",
    "FlagDeprecationWarning",
    "add_data_arguments",
    "add_resume_arguments",
    "add_runtime_arguments",
    "add_solve_arguments",
    "add_spec_arguments",
    "add_store_arguments",
    "compute_options_from_args",
    "flag_hints",
    "solve_options_from_args",
    "spec_from_args",
]

#: Networks: fully-connected DEQ or convolutional CDEQ.
MODELS = ("deq", "cdeq")
#: Default lap window side (chosen by the validation sweep in the README).
DEFAULT_POOL_SIZE = 5
#: Default hyperparameters per model (chosen by the validation sweep in the README).
DEFAULT_HYPERPARAMETERS = {
    "deq": {"sigma_w2": 1.0, "sigma_u2": 1.0, "sigma_b2": 0.1},
    "cdeq": {"sigma_w2": 1.0, "sigma_u2": 1.0, "sigma_b2": 0.1},
}


class FlagDeprecationWarning(FutureWarning):
    """A CLI flag spelled the way of an earlier version (it still works, for now)."""


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated; use {new}", FlagDeprecationWarning, stacklevel=2)


class _Alias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's dest and warns once used."""

    def __init__(self, option_strings, dest, *, new: str, **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        _deprecated(option_string, self.new)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def _alias(p, old: str, new: str, dest: str, **kw) -> None:
    p.add_argument(old, dest=dest, action=_Alias, new=new, help=argparse.SUPPRESS, **kw)


def _size(flag: str, minimum: int = 1):
    """argparse type: a size in bytes (the one parser, :func:`~deqntk_dist.units.parse_size`)."""

    def parse(text: str) -> int:
        try:
            return parse_size(text, param=flag, minimum=minimum)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag} ")) from None

    parse.__name__ = "size"
    return parse


def _kernel_list(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if not names or any(s not in KERNELS for s in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"must be ntk, nngp or ntk,nngp; got {text!r}")
    return names


def _ridge_list(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        out = ()
    if not out:
        raise argparse.ArgumentTypeError(f"must be a comma list of numbers, got {text!r}")
    return out


def _help(cls, name: str, default: Any = None) -> str:
    text = cls.meta(name)["help"]
    return text if default is None else f"{text} (default {default})"


# --------------------------------------------------------------------------- the network
class _KernelOrModel(argparse.Action):
    """``run --kernel``: ``ntk``/``nngp`` is the regression kernel; ``deq``/``cdeq`` (the
    earlier meaning) is the network, with a deprecation warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values in MODELS:
            _deprecated(f"{option_string} {values}", f"--model {values}")
            namespace.model = values
        elif values in KERNELS:
            namespace.kernel = values
        else:
            raise argparse.ArgumentError(
                self,
                f"must be one of {', '.join(KERNELS)} (or the network, --model), got {values!r}",
            )


def add_spec_arguments(p: argparse.ArgumentParser, *, kernel_alias: bool) -> None:
    """The network and its hyperparameters (``compute``, ``run``); with ``kernel_alias``
    the earlier ``--kernel deq|cdeq`` is accepted (``run`` handles ``--kernel`` itself)."""
    p.add_argument(
        "--model",
        choices=MODELS,
        default="deq",
        help="fully-connected DEQ-NTK or convolutional CDEQ-NTK (default deq)",
    )
    if kernel_alias:
        _alias(p, "--kernel", "--model", "model", choices=MODELS)
    p.add_argument(
        "--sigma-w2",
        type=float,
        default=None,
        help="weight variance (default: the tuned value for the model)",
    )
    p.add_argument("--sigma-u2", type=float, default=None, help="input-injection variance")
    p.add_argument("--sigma-b2", type=float, default=None, help="bias variance")
    p.add_argument("--activation", default="relu", help="relu | erf | tanh | gelu")
    p.add_argument("--filter-size", type=int, default=3, help="CDEQ filter side (odd)")
    p.add_argument(
        "--readout",
        choices=READOUTS,
        default="flatten",
        help="CDEQ readout: flatten, gap (global average pooling) or lap (local average "
        "pooling, then flatten; default flatten)",
    )
    p.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help=f"odd lap window side (default {DEFAULT_POOL_SIZE}, from the validation sweep)",
    )
    p.add_argument(
        "--hflip",
        action="store_true",
        help="horizontal-flip symmetrised kernel (K(x, y) + K(x, flip y)) / 2 (deq: on image "
        "rows)",
    )
    p.add_argument("--tol", type=float, default=None, help=_help(ComputeOptions, "tol"))


def spec_from_args(args: argparse.Namespace):
    """Build a DEQSpec / CDEQSpec from parsed :func:`add_spec_arguments` options."""
    from ..spec import CDEQSpec, DEQSpec

    defaults = DEFAULT_HYPERPARAMETERS[args.model]
    kw = {
        "sigma_w2": defaults["sigma_w2"] if args.sigma_w2 is None else args.sigma_w2,
        "sigma_u2": defaults["sigma_u2"] if args.sigma_u2 is None else args.sigma_u2,
        "sigma_b2": defaults["sigma_b2"] if args.sigma_b2 is None else args.sigma_b2,
        "activation": args.activation,
        "hflip": args.hflip,
    }
    if args.model == "cdeq":
        pool = args.pool_size
        if args.readout == "lap" and pool is None:
            pool = DEFAULT_POOL_SIZE
        return CDEQSpec(**kw, filter_size=args.filter_size, readout=args.readout, pool_size=pool)
    if args.pool_size is not None or args.readout != "flatten":
        raise InputError(
            "--readout and --pool-size apply to --model cdeq, got "
            f"--readout {args.readout} --pool-size {args.pool_size} with --model deq"
        )
    if args.tol is not None:
        raise InputError(f"--tol applies to --model cdeq, got --tol {args.tol} with deq")
    return DEQSpec(**kw)


# ------------------------------------------------------------------------------- runtime
def add_runtime_arguments(p, *, cluster_default: str | None) -> None:
    """Where the Dask work runs (``compute``, ``run``, ``solve``): a running scheduler, a
    LocalCluster or batch workers, and the dashboard of a started scheduler."""
    p.add_argument(
        "--dashboard-address",
        default=None,
        help="where the LocalCluster / batch scheduler dashboard listens (default "
        "127.0.0.1:0, i.e. this machine only; e.g. 0.0.0.0:8787 for every interface)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        help="address (tcp://host:8786) or JSON file of a running dask scheduler",
    )
    p.add_argument(
        "--cluster",
        choices=("local", "slurm", "pbs"),
        default=cluster_default,
        help="start a LocalCluster"
        + (" (default)" if cluster_default == "local" else "")
        + " or dask-jobqueue workers",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (local: default one per core) or batch jobs",
    )


def runtime_from_args(args: argparse.Namespace, *, cluster: str | None = None):
    """The :class:`~deqntk_dist.runtime.RuntimeConfig` of :func:`add_runtime_arguments`."""
    from ..runtime import RuntimeConfig

    return RuntimeConfig(
        scheduler=args.scheduler,
        cluster=cluster or args.cluster,
        workers=args.workers,
        dashboard_address=args.dashboard_address,
    )


# --------------------------------------------------------------------------------- store
def add_store_arguments(p: argparse.ArgumentParser) -> None:
    """What a kernel store holds, and the runtime (``compute``, ``run``)."""
    add_runtime_arguments(p, cluster_default="local")
    p.add_argument(
        "--kernels", type=_kernel_list, default=None, help=_help(ComputeOptions, "kernels")
    )
    _alias(p, "--what", "--kernels", "kernels", type=_kernel_list)
    p.add_argument("--tile", type=int, default=None, help=_help(ComputeOptions, "tile"))
    p.add_argument(
        "--dtype",
        choices=ComputeOptions.meta("dtype")["choices"],
        default=None,
        help=_help(ComputeOptions, "dtype"),
    )
    p.add_argument(
        "--memory-budget",
        type=_size("--memory-budget", 2**20),
        default=None,
        help=_help(ComputeOptions, "memory_budget"),
    )


def add_resume_arguments(p: argparse.ArgumentParser) -> None:
    """How much of a store to compute, and what to do with tiles of another identity."""
    p.add_argument("--max-tiles", type=int, default=None, help=_help(ComputeOptions, "max_tiles"))
    p.add_argument(
        "--recompute-mismatched",
        action="store_true",
        help=_help(ComputeOptions, "recompute_mismatched"),
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def compute_options_from_args(args: argparse.Namespace) -> ComputeOptions:
    """The :class:`~deqntk_dist.options.ComputeOptions` of ``compute`` / ``run``."""
    kw: dict[str, Any] = {
        "kernels": args.kernels,
        "tile": args.tile,
        "dtype": args.dtype,
        "tol": args.tol,
        "memory_budget": args.memory_budget,
        "max_tiles": args.max_tiles,
        "recompute_mismatched": args.recompute_mismatched,
        "progress": not args.no_progress,
    }
    for name in ("max_in_flight", "retries", "layout", "chunk"):
        if hasattr(args, name):
            kw[name] = getattr(args, name)
    if hasattr(args, "task_threads"):
        kw["task_threads"] = None if args.task_threads == 0 else args.task_threads
    return ComputeOptions(**kw)


# ---------------------------------------------------------------------------- regression
def add_solve_arguments(p, *, kernel_flag: bool, full: bool) -> None:
    """The regression: ``--kernel`` (when ``kernel_flag``), ``--ridges``, ``--solver``, and
    with ``full`` every :class:`~deqntk_dist.options.SolveOptions` knob (``solve``)."""
    if kernel_flag:
        p.add_argument(
            "--kernel",
            choices=KERNELS,
            default=SolveOptions.default("kernel"),
            help=_help(SolveOptions, "kernel", SolveOptions.default("kernel")),
        )
    p.add_argument("--ridges", type=_ridge_list, default=None, help=_help(SolveOptions, "ridges"))
    p.add_argument(
        "--solver",
        choices=SolveOptions.meta("solver")["choices"],
        default=SolveOptions.default("solver"),
        help=_help(SolveOptions, "solver"),
    )
    if not full:
        return
    _alias(p, "--ridge", "--ridges", "ridges", type=_ridge_list)
    _alias(p, "--method", "--solver", "solver", choices=SolveOptions.meta("solver")["choices"])
    p.add_argument(
        "--memory-limit",
        type=_size("--memory-limit"),
        default=None,
        help=_help(SolveOptions, "memory_limit"),
    )
    knobs = (("val_fraction", float), ("seed", int), ("tol", float), ("max_iter", int),
             ("rank", int))  # fmt: skip
    for name, typ in knobs:
        d = SolveOptions.default(name)
        p.add_argument(
            "--" + name.replace("_", "-"), type=typ, default=d, help=_help(SolveOptions, name, d)
        )
    p.add_argument(
        "--allow-incomplete", action="store_true", help=_help(SolveOptions, "allow_incomplete")
    )


def add_band_arguments(g) -> None:
    """Distributed-solve knobs of ``solve``."""
    g.add_argument(
        "--band-memory",
        type=_size("--band-memory", 2**20),
        default=SolveOptions.default("band_bytes"),
        help="bytes of one row band of the train block (default 256MiB)",
    )
    g.add_argument(
        "--stream-bands",
        action="store_true",
        help="re-read the bands from the store every iteration instead of holding them",
    )


def solve_options_from_args(args: argparse.Namespace, *, kernel: str, full: bool) -> SolveOptions:
    """The :class:`~deqntk_dist.options.SolveOptions` of ``solve`` (``full``: every knob of
    :func:`add_solve_arguments`) or ``run`` (kernel, ridges, solver)."""
    kw: dict[str, Any] = {"kernel": kernel, "ridges": args.ridges, "solver": args.solver}
    if not full:
        return SolveOptions(**kw)
    for name in ("memory_limit", "val_fraction", "seed", "tol", "max_iter", "rank"):
        kw[name] = getattr(args, name)
    kw["allow_incomplete"] = args.allow_incomplete
    kw["band_bytes"] = args.band_memory
    kw["keep_bands"] = False if args.stream_bands else None
    return SolveOptions(**kw)


def add_run_solve_arguments(p) -> None:
    """``run``: the regression kernel (``--kernel ntk|nngp``, or the earlier network
    meaning), ``--ridges``, ``--solver`` and their earlier spellings."""
    p.add_argument(
        "--kernel",
        dest="kernel",
        action=_KernelOrModel,
        default=SolveOptions.default("kernel"),
        metavar="{ntk,nngp}",
        help="kernel the regression uses (default ntk)",
    )
    _alias(p, "--solve-kernel", "--kernel", "kernel", choices=KERNELS)
    add_solve_arguments(p, kernel_flag=False, full=False)
    _alias(p, "--lambdas", "--ridges", "ridges", type=_ridge_list)
    _alias(
        p, "--solve-method", "--solver", "solver", choices=SolveOptions.meta("solver")["choices"]
    )


# ------------------------------------------------------------------------------ datasets
def add_data_arguments(p: argparse.ArgumentParser, *, required: bool) -> None:
    """Dataset, subset and preprocessing options shared by ``prepare`` and ``run``."""
    p.add_argument(
        "--dataset",
        required=required,
        default="fashion-mnist",
        help="fashion-mnist | mnist | cifar10 | npz"
        + ("" if required else " (default fashion-mnist)"),
    )
    p.add_argument(
        "--source",
        default=None,
        help="IDX directory (mnist, fashion-mnist), CIFAR-10 python batches directory "
        "or .tar.gz, .npz file or directory of .npy files; fashion-mnist "
        "defaults to the Debian package dataset-fashion-mnist (installed when "
        "missing if run as root)",
    )
    p.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="class-balanced subset of the training rows (default all)",
    )
    p.add_argument(
        "--n-test",
        type=int,
        default=None,
        help="class-balanced subset of the test rows (default all)",
    )
    p.add_argument(
        "--preprocess",
        default=None,
        help="comma list of center|standardize, zca, unit-norm, or none (default: "
        "unit-norm for (fashion-)mnist, center,unit-norm for npz, "
        "standardize,zca,unit-norm for cifar10)",
    )
    p.add_argument(
        "--zca-strength",
        type=float,
        default=None,
        help="ZCA regulariser relative to the mean eigenvalue (default 0.1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the subset draw (default 0)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace stores made with other parameters"
    )
    p.add_argument(
        "--no-install", action="store_true", help="never apt-get install dataset-fashion-mnist"
    )


def request_from_args(args: argparse.Namespace, layout: str):
    """The :class:`~deqntk_dist.pipeline.PrepareRequest` of :func:`add_data_arguments`."""
    from ..pipeline import PrepareRequest, default_preprocess
    from ..preprocess import PreprocessConfig, parse_steps

    base = default_preprocess(args.dataset)
    steps = base.steps if args.preprocess is None else parse_steps(args.preprocess)
    eps = base.zca_strength if args.zca_strength is None else args.zca_strength
    return PrepareRequest(
        dataset=args.dataset,
        source=args.source,
        n_train=args.n_train,
        n_test=args.n_test,
        preprocess=PreprocessConfig(steps=steps, zca_strength=eps),
        seed=args.seed,
        layout=layout,
    )


# --------------------------------------------------------------------------- flag hints
#: Library parameter (as the library's messages name it) -> the CLI flag that sets it.
PARAM_FLAGS = {
    "overwrite=True": "--overwrite",
    "allow_incomplete=True": "--allow-incomplete",
    "write_results=False": "--no-write",
    "recompute_mismatched=True": "--recompute-mismatched",
    "memory_budget": "--memory-budget",
    "memory_limit": "--memory-limit",
    "band_bytes": "--band-memory",
    "max_tiles": "--max-tiles",
    "max_in_flight": "--max-in-flight",
    "task_threads": "--task-threads",
    "val_fraction": "--val-fraction",
    "max_iter": "--max-iter",
    "kernels": "--kernels",
    "ridges": "--ridges",
    "solver": "--solver",
    "tile": "--tile",
    "chunk": "--chunk",
    "retries": "--retries",
    "rank": "--rank",
    "source": "--source",
    "stores": "--stores",
    "workdir": "--workdir",
    "scheduler": "--scheduler",
}
_HINT = re.compile(
    r"(?<![\w.\-/])("
    + "|".join(re.escape(k) for k in sorted(PARAM_FLAGS, key=len, reverse=True))
    + r")(?![\w\-])"
)


def flag_hints(message: str) -> str:
    """A library message with the parameter names it mentions as the CLI flags that set
    them (``pass overwrite=True`` -> ``pass --overwrite``; ``tile must be`` -> ``--tile
    must be``), where a name is followed by ``=``, ``must`` or ``has``."""

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if "=" in key:
            return PARAM_FLAGS[key]
        after = message[m.end() : m.end() + 6]
        if after.startswith((" must", " has ", "=")):
            return PARAM_FLAGS[key]
        return key

    return _HINT.sub(sub, message)
