"""The ``deqntk`` subcommands: ``_add_<name>`` (arguments) and ``_cmd_<name>`` (handler).

Handlers build the option values (:mod:`deqntk_dist.options`) from the shared vocabulary
(:mod:`.vocabulary`) and call the package API, which validates and raises
:class:`~deqntk_dist.errors.DeqntkError` with a clear message on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError
from ..options import ComputeOptions
from .vocabulary import (
    add_band_arguments,
    add_data_arguments,
    add_resume_arguments,
    add_run_solve_arguments,
    add_runtime_arguments,
    add_solve_arguments,
    add_spec_arguments,
    add_store_arguments,
    compute_options_from_args,
    request_from_args,
    runtime_from_args,
    solve_options_from_args,
    spec_from_args,
)

__all__ = ["SUBCOMMANDS"]


# ------------------------------------------------------------------ compute / status / verify
def _add_compute(sub) -> None:
    p = sub.add_parser(
        "compute",
        help="compute a kernel store from a dataset store (resumes a partly done store)",
    )
    p.add_argument("dataset_store", help="dataset store (zarr group) to read rows from")
    p.add_argument("kernel_store", help="kernel store to create or finish")
    add_spec_arguments(p, kernel_alias=True)
    add_store_arguments(p)
    p.add_argument(
        "--task-threads",
        type=int,
        default=ComputeOptions.default("task_threads"),
        help="numba/BLAS threads per task (default 1; 0 leaves the worker's)",
    )
    help_ = ComputeOptions.meta("max_in_flight")["help"]
    p.add_argument("--max-in-flight", type=int, default=None, help=help_)
    d = ComputeOptions.default("retries")
    p.add_argument("--retries", type=int, default=d, help=f"dask retries per tile (default {d})")
    p.add_argument(
        "--layout",
        type=int,
        choices=ComputeOptions.meta("layout")["choices"],
        default=ComputeOptions.default("layout"),
        help=ComputeOptions.meta("layout")["help"],
    )
    d = ComputeOptions.default("chunk")
    p.add_argument(
        "--chunk", type=int, default=d, help=f"{ComputeOptions.meta('chunk')['help']} ({d})"
    )
    add_resume_arguments(p)
    p.set_defaults(func=_cmd_compute)


def _cmd_compute(args: argparse.Namespace) -> int:
    from ..compute import compute_kernel_store

    report = compute_kernel_store(
        args.dataset_store,
        args.kernel_store,
        spec_from_args(args),
        compute_options_from_args(args),
        runtime=runtime_from_args(args),
    )
    others = f", {report.tiles_by_others} by another job" if report.tiles_by_others else ""
    print(
        f"{report.store}: computed {report.tiles_computed} tiles{others} "
        f"({report.tiles_done_before} of {report.tiles_total} were done before) in "
        f"{report.seconds:.1f} s, {report.entries_per_second:.3g} entries/s, "
        f"{report.bytes_written / 1e9:.3g} GB written, max residual {report.max_residual:.2g}"
    )
    return 0


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="tiles done / total, residuals and time left of a store")
    p.add_argument("kernel_store")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    from ..store import open_kernel_store

    ks = open_kernel_store(args.kernel_store)
    st = ks.status()
    if args.json:
        print(json.dumps({**st, "spec": ks.spec.to_dict()}, indent=1))
        return 0
    eta = st["eta_seconds"]
    rate = st["entries_per_second"]
    print(f"store      {st['path']}")
    print(f"spec       {ks.spec}")
    print(f"kernels    {', '.join(st['kernels'])}  n={st['n']}  tile={st['tile']}  {st['dtype']}")
    print(
        f"tiles      {st['tiles_done']}/{st['tiles_total']} done"
        + ("  (complete)" if st["complete"] else "")
    )
    print(f"entries    {st['entries_done']}/{st['entries_total']}")
    print(f"residual   max {st['max_residual']}  iterations max {st['max_iterations']}")
    print(
        f"rate       {'?' if rate is None else f'{rate:.3g} entries/s'}  "
        f"time left {'unknown' if eta is None else f'{eta:.0f} s'}"
    )
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check a kernel store (checksums, symmetry, finiteness, ledger); exit 1 on problems",
    )
    p.add_argument("kernel_store")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..store import open_kernel_store, verify_kernel_store

    notes: list[str] = []
    problems = verify_kernel_store(args.kernel_store, notes=notes)
    for line in notes:
        print(f"NOTE: {line}")
    if problems:
        for line in problems:
            print(f"PROBLEM: {line}")
        print(f"{args.kernel_store}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    st = open_kernel_store(args.kernel_store).status()
    print(
        f"{st['path']}: OK ({st['tiles_total']} tiles, {st['n']} x {st['n']}, "
        f"{', '.join(st['kernels'])}, {st['dtype']})"
    )
    return 0


def _add_migrate(sub) -> None:
    p = sub.add_parser(
        "migrate",
        help="rewrite a layout-1 kernel store as layout 2 (resumable, verified at the end)",
    )
    p.add_argument("kernel_store", help="layout-1 kernel store")
    p.add_argument(
        "--out",
        default=None,
        help="where the layout-2 store goes (default: in place; the old store is kept as "
        "KERNEL_STORE.v1)",
    )
    d = ComputeOptions.default("chunk")
    p.add_argument("--chunk", type=int, default=d, help=f"inner chunk side (default {d})")
    p.set_defaults(func=_cmd_migrate)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from ..store.migrate import migrate_kernel_store

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rep = migrate_kernel_store(args.kernel_store, args.out, chunk=args.chunk, say=say)
    for line in rep.problems:
        print(f"PROBLEM: {line}")
    missing = rep.tiles_total - rep.tiles_copied - rep.tiles_done_before
    print(
        f"{rep.dest}: layout 2, {rep.tiles_copied} tiles copied"
        + (f" ({rep.tiles_done_before} were copied before)" if rep.tiles_done_before else "")
        + (f", {missing} not done (run compute to finish)" if missing else "")
        + f" in {rep.seconds:.1f} s"
        + (f"; the layout-1 store is kept as {rep.backup}" if rep.backup else "")
    )
    return 1 if rep.problems else 0


# ------------------------------------------------------------------------------------ solve
def _add_solve(sub) -> None:
    p = sub.add_parser(
        "solve",
        help="kernel ridge regression on a kernel store",
        description="Kernel ridge regression (K + lam tr(K)/n I) alpha = Y on the train block, "
        "lam chosen on a validation split of the training rows, predictions and accuracy on "
        "the test rows; results written into the store as results/<kernel>.",
    )
    p.add_argument("kernel_store")
    add_solve_arguments(p, kernel_flag=True, full=True)
    p.add_argument("--report", default=None, help="also write the JSON report to this file")
    p.add_argument(
        "--no-write", action="store_true", help="do not write results/<kernel> into the store"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    g = p.add_argument_group(
        "distributed solve (with --solver cg)",
        "block preconditioned CG on a Dask cluster: the train block in row bands held by "
        "the workers, the driver holding only n x classes vectors",
    )
    add_runtime_arguments(g, cluster_default=None)
    add_band_arguments(g)
    p.set_defaults(func=_cmd_solve)


def _cmd_solve(args: argparse.Namespace) -> int:
    from ..regression import solve_store

    options = solve_options_from_args(args, kernel=args.kernel, full=True)
    distributed = args.scheduler is not None or args.cluster is not None
    if distributed and options.solver != "cg":
        raise InputError(
            f"--scheduler / --cluster need --solver cg, got --solver {options.solver}"
        )

    def solve(client):
        return solve_store(
            args.kernel_store,
            options,
            write_results=not args.no_write,
            report_path=args.report,
            client=client,
        )

    if not distributed:
        return _print_solve(args, solve(None))
    from ..runtime import dask_client

    with dask_client(runtime_from_args(args, cluster=args.cluster or "local")) as client:
        rep = solve(client)
    return _print_solve(args, rep)


def _print_solve(args: argparse.Namespace, rep) -> int:
    if args.json:
        print(json.dumps(rep.to_dict(), indent=1))
        return 0
    acc = "n/a" if rep.accuracy is None else f"{rep.accuracy:.4f}"
    print(f"store      {rep.store}  kernel {rep.kernel}")
    print(f"rows       train {rep.n_train} (fit {rep.n_fit} + val {rep.n_val})  test {rep.n_test}")
    print(f"method     {rep.method} ({rep.method_reason})")
    if rep.val_accuracy is not None:
        grid = "  ".join(f"{r:g}:{a:.4f}" for r, a in zip(rep.ridges, rep.val_accuracy))
        print(f"validation {grid}")
    print(f"ridge      {rep.ridge:g} (shift {rep.shift:.6g})")
    print(f"residual   {rep.residual:.3g} after {rep.iterations} CG iterations")
    print(f"accuracy   test {acc}  train {rep.train_accuracy:.4f}")
    print(f"time       {rep.seconds:.1f} s  peak RSS {rep.peak_rss / 1e9:.2f} GB")
    return 0


# ------------------------------------------------------------------------------ prepare / run
def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="read a dataset, preprocess, write a dataset store")
    add_data_arguments(p, required=True)
    p.add_argument("--out", required=True, help="dataset store to write (zarr group)")
    p.add_argument(
        "--layout",
        choices=("flat", "image"),
        default="flat",
        help="rows as vectors (deq model, default) or images H x W x C (cdeq, deq --hflip)",
    )
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from ..pipeline import prepare_dataset

    request = request_from_args(args, args.layout)
    res = prepare_dataset(args.out, request, overwrite=args.overwrite, install=not args.no_install)
    ds = res.store
    verb = "reused (same parameters)" if res.reused else f"written in {res.seconds:.1f} s"
    print(
        f"{ds.path}: {verb}; {ds.name}, {ds.n_train} train + {ds.n_test} test rows of shape "
        f"{ds.feature_shape}, preprocessing {','.join(request.preprocess.steps) or 'none'}, "
        f"fingerprint {ds.fingerprint}"
    )
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run",
        help="prepare -> compute -> solve in a work directory, reusing finished stages",
    )
    add_data_arguments(p, required=False)
    add_spec_arguments(p, kernel_alias=False)
    p.add_argument(
        "--workdir",
        required=True,
        help="directory for dataset.zarr, kernel.zarr, solve.json, report.json",
    )
    p.add_argument(
        "--stores",
        default=None,
        help="put dataset.zarr and kernel.zarr here instead of in --workdir: a directory or "
        "a store URL such as s3://bucket/job (endpoint and credentials from the AWS_* "
        "environment variables)",
    )
    add_run_solve_arguments(p)
    add_store_arguments(p)
    add_resume_arguments(p)
    p.add_argument(
        "--plots",
        action="store_true",
        help="also write PNG figures next to report.json (as `deqntk report`; needs the "
        "[plots] extra)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from ..pipeline import format_report, run_pipeline

    work = Path(args.workdir)
    if work.exists() and not work.is_dir():
        raise InputError(f"--workdir must be a directory, got a file: {args.workdir}")
    spec = spec_from_args(args)
    request = request_from_args(args, "image" if args.model == "cdeq" or args.hflip else "flat")
    report = run_pipeline(
        args.workdir,
        request,
        spec,
        compute=compute_options_from_args(args),
        solve=solve_options_from_args(args, kernel=args.kernel, full=False),
        runtime=runtime_from_args(args),
        overwrite=args.overwrite,
        install=not args.no_install,
        stores=args.stores,
    )
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    if args.plots and not report.get("tiles_left"):
        _print_figures(args.workdir)
    return 0


# ----------------------------------------------------------------------------------- report
def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write PNG figures of a `deqntk run` work directory next to its report.json",
        description="Figures of what a run computed: a sampled Gram block ordered by class, "
        "the eigenvalue spectrum of the train block, validation accuracy and MSE against the "
        "ridge, per-class test accuracy (needs the [plots] extra: matplotlib).",
    )
    p.add_argument("workdir", help="work directory of `deqntk run` (holds report.json)")
    p.add_argument("--out", default=None, help="directory for the figures (default: WORKDIR)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    _print_figures(args.workdir, args.out)
    return 0


def _print_figures(workdir: str, out: str | None = None) -> None:
    from ..figures import write_figures

    for path in write_figures(workdir, out_dir=out):
        print(f"figure     {path}")


SUBCOMMANDS = (
    _add_compute,
    _add_status,
    _add_verify,
    _add_migrate,
    _add_solve,
    _add_prepare,
    _add_run,
    _add_report,
)
