"""``deqntk`` console script.

Each subcommand has its own ``_add_<name>`` (arguments) and ``_cmd_<name>`` (handler)
functions; handlers validate nothing themselves beyond argparse and call the package API,
which raises :class:`~deqntk_dist.errors.DeqntkError` with a clear message on bad input.
"""

from __future__ import annotations

import argparse
import sys

from .errors import DeqntkError

__all__ = ["main", "build_parser"]


def _add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """Kernel hyperparameters shared by ``compute`` and ``run``."""
    p.add_argument("--kernel", choices=("deq", "cdeq"), default="deq",
                   help="fully-connected DEQ-NTK or convolutional CDEQ-NTK (default deq)")
    p.add_argument("--sigma-w2", type=float, default=None,
                   help="weight variance (default: the tuned value for the kernel)")
    p.add_argument("--sigma-u2", type=float, default=None, help="input-injection variance")
    p.add_argument("--sigma-b2", type=float, default=None, help="bias variance")
    p.add_argument("--activation", default="relu", help="relu | erf | tanh | gelu")
    p.add_argument("--filter-size", type=int, default=3, help="CDEQ filter side (odd)")
    p.add_argument("--readout", choices=("flatten", "gap"), default="flatten",
                   help="CDEQ readout (default flatten)")


def spec_from_args(args: argparse.Namespace):
    """Build a DEQSpec / CDEQSpec from parsed ``_add_spec_arguments`` options."""
    from .spec import CDEQSpec, DEQSpec

    defaults = DEFAULT_HYPERPARAMETERS[args.kernel]
    kw = {
        "sigma_w2": defaults["sigma_w2"] if args.sigma_w2 is None else args.sigma_w2,
        "sigma_u2": defaults["sigma_u2"] if args.sigma_u2 is None else args.sigma_u2,
        "sigma_b2": defaults["sigma_b2"] if args.sigma_b2 is None else args.sigma_b2,
        "activation": args.activation,
    }
    if args.kernel == "cdeq":
        return CDEQSpec(**kw, filter_size=args.filter_size, readout=args.readout)
    return DEQSpec(**kw)


#: Default hyperparameters per kernel (chosen by the validation sweep in the README).
DEFAULT_HYPERPARAMETERS = {
    "deq": {"sigma_w2": 1.0, "sigma_u2": 1.0, "sigma_b2": 0.1},
    "cdeq": {"sigma_w2": 1.0, "sigma_u2": 1.0, "sigma_b2": 0.1},
}


# ------------------------------------------------------------------ compute / status / verify
def _add_compute(sub) -> None:
    p = sub.add_parser("compute", help="compute a kernel store from a dataset store")
    p.add_argument("dataset_store")
    p.add_argument("kernel_store")
    _add_spec_arguments(p)
    p.set_defaults(func=_cmd_compute)


def _cmd_compute(args: argparse.Namespace) -> int:
    raise NotImplementedError("compute: implemented with the kernel store (issue 3)")


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="tiles done / total of a kernel store")
    p.add_argument("kernel_store")
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    raise NotImplementedError("status: implemented with the kernel store (issue 3)")


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check a kernel store (checksums, symmetry, ledger)")
    p.add_argument("kernel_store")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    raise NotImplementedError("verify: implemented with the kernel store (issue 3)")


# ------------------------------------------------------------------------------------ solve
def _add_solve(sub) -> None:
    p = sub.add_parser("solve", help="kernel ridge regression on a kernel store")
    p.add_argument("kernel_store")
    p.set_defaults(func=_cmd_solve)


def _cmd_solve(args: argparse.Namespace) -> int:
    raise NotImplementedError("solve: implemented with the regression stage (issue 4)")


# ------------------------------------------------------------------------------ prepare / run
def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="read a dataset, preprocess, write a dataset store")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    raise NotImplementedError("prepare: implemented with the dataset readers (issue 5)")


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="prepare -> compute -> solve, with a report")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    raise NotImplementedError("run: implemented with the end-to-end job (issue 5)")


# ------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The full ``deqntk`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="deqntk",
        description="NTK / NNGP Gram matrices of infinitely deep equilibrium models",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_compute, _add_status, _add_verify, _add_solve, _add_prepare, _add_run):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for a clear user error)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DeqntkError as exc:
        print(f"deqntk {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deqntk {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
