"""``deqntk`` console script.

Each subcommand has its own ``_add_<name>`` (arguments) and ``_cmd_<name>`` (handler)
functions; handlers validate nothing themselves beyond argparse and call the package API,
which raises :class:`~deqntk_dist.errors.DeqntkError` with a clear message on bad input.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings

from .errors import DatasetWarning, DeqntkError, InputError
from .spec import READOUTS

__all__ = ["main", "build_parser"]


def _add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """Kernel hyperparameters shared by ``compute`` and ``run``."""
    p.add_argument(
        "--kernel",
        choices=("deq", "cdeq"),
        default="deq",
        help="fully-connected DEQ-NTK or convolutional CDEQ-NTK (default deq)",
    )
    p.add_argument(
        "--sigma-w2",
        type=float,
        default=None,
        help="weight variance (default: the tuned value for the kernel)",
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
    p.add_argument(
        "--tol",
        type=float,
        default=None,
        help="cdeq: relative fixed-point residual of every slice (default 1e-9 for float32 "
        "stores, 1e-13 for float64)",
    )


def spec_from_args(args: argparse.Namespace):
    """Build a DEQSpec / CDEQSpec from parsed ``_add_spec_arguments`` options."""
    from .errors import InputError
    from .spec import CDEQSpec, DEQSpec

    defaults = DEFAULT_HYPERPARAMETERS[args.kernel]
    kw = {
        "sigma_w2": defaults["sigma_w2"] if args.sigma_w2 is None else args.sigma_w2,
        "sigma_u2": defaults["sigma_u2"] if args.sigma_u2 is None else args.sigma_u2,
        "sigma_b2": defaults["sigma_b2"] if args.sigma_b2 is None else args.sigma_b2,
        "activation": args.activation,
        "hflip": args.hflip,
    }
    if args.kernel == "cdeq":
        pool = args.pool_size
        if args.readout == "lap" and pool is None:
            pool = DEFAULT_POOL_SIZE
        return CDEQSpec(**kw, filter_size=args.filter_size, readout=args.readout, pool_size=pool)
    if args.pool_size is not None or args.readout != "flatten":
        raise InputError(
            "--readout and --pool-size apply to --kernel cdeq, got "
            f"--readout {args.readout} --pool-size {args.pool_size} with --kernel deq"
        )
    return DEQSpec(**kw)


def options_from_args(args: argparse.Namespace) -> dict | None:
    """Kernel options of ``compute`` / ``run`` (None: the store's, or the defaults)."""
    from .errors import InputError

    if args.tol is None:
        return None
    if args.kernel != "cdeq":
        raise InputError(f"--tol applies to --kernel cdeq, got --tol {args.tol} with deq")
    return {"tol": args.tol}


#: Default lap window side (chosen by the validation sweep in the README).
DEFAULT_POOL_SIZE = 5
#: Default hyperparameters per kernel (chosen by the validation sweep in the README).
DEFAULT_HYPERPARAMETERS = {
    "deq": {"sigma_w2": 1.0, "sigma_u2": 1.0, "sigma_b2": 0.1},
    "cdeq": {"sigma_w2": 1.0, "sigma_u2": 1.0, "sigma_b2": 0.1},
}


def _add_runtime_arguments(p, *, cluster_default: str | None) -> None:
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


def _add_store_arguments(p: argparse.ArgumentParser) -> None:
    """Kernel-store and runtime options shared by ``compute`` and ``run``."""
    _add_runtime_arguments(p, cluster_default="local")
    p.add_argument(
        "--what",
        type=_parse_what,
        default=None,
        help="kernels to store: ntk, nngp or ntk,nngp (default: ntk,nngp, or the "
        "existing store's)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="tile side (default: from --memory-budget, or the existing store's)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=None,
        help="store dtype (default float32, or the existing store's)",
    )
    p.add_argument(
        "--memory-budget",
        type=_parse_bytes,
        default=None,
        help="bytes per tile on a worker, e.g. 1GiB (default: half the worker "
        "memory limit, at most 2GiB)",
    )


def _float_list(option: str, text: str | None) -> list[float] | None:
    """Parse a comma list of numbers given to ``option`` (None stays None)."""
    from .errors import InputError

    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{option} must be a comma list of numbers, got {text!r}") from None


# ------------------------------------------------------------------ compute / status / verify
def _parse_what(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in ("ntk", "nngp")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"must be ntk, nngp or ntk,nngp; got {text!r}")
    return names


def _parse_bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(float(t))
    except ValueError:
        msg = f"must be a size like 2GiB or 512M, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _add_compute(sub) -> None:
    p = sub.add_parser(
        "compute",
        help="compute a kernel store from a dataset store (resumes a partly done store)",
    )
    p.add_argument("dataset_store", help="dataset store (zarr group) to read rows from")
    p.add_argument("kernel_store", help="kernel store to create or finish")
    _add_spec_arguments(p)
    _add_store_arguments(p)
    p.add_argument(
        "--task-threads",
        type=int,
        default=1,
        help="numba/BLAS threads per task (default 1; 0 leaves the worker's)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="tiles submitted at once (default 2 x worker threads)",
    )
    p.add_argument("--retries", type=int, default=2, help="dask retries per tile (default 2)")
    p.add_argument(
        "--layout",
        type=int,
        choices=(1, 2),
        default=2,
        help="layout of a new store: 2 (default; one shard and one ledger record per tile) "
        "or 1 (one chunk and 14 ledger files per tile); an existing store keeps its own",
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=1024,
        help="layout 2: side of the inner chunks readers fetch (default 1024, or a divisor "
        "of the tile)",
    )
    _add_resume_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_cmd_compute)


def _add_resume_arguments(p: argparse.ArgumentParser) -> None:
    """How much of a store to compute, and what to do with tiles of another identity."""
    p.add_argument(
        "--max-tiles",
        type=int,
        default=None,
        help="compute at most this many tiles in this run (the rest stay for a later run)",
    )
    p.add_argument(
        "--recompute-mismatched",
        action="store_true",
        help="recompute finished tiles computed under another identity than the store's "
        "attrs claim (edited attrs) instead of refusing the store",
    )


def _cmd_compute(args: argparse.Namespace) -> int:
    from .compute import compute_kernel_store
    from .runtime import RuntimeConfig

    spec = spec_from_args(args)
    runtime = RuntimeConfig(
        scheduler=args.scheduler,
        cluster=args.cluster,
        workers=args.workers,
        dashboard_address=args.dashboard_address,
    )
    report = compute_kernel_store(
        args.dataset_store,
        args.kernel_store,
        spec,
        kernels=args.what,
        tile=args.tile,
        dtype=args.dtype,
        options=options_from_args(args),
        runtime=runtime,
        memory_budget=args.memory_budget,
        max_in_flight=args.max_in_flight,
        retries=args.retries,
        task_threads=None if args.task_threads == 0 else args.task_threads,
        max_tiles=args.max_tiles,
        recompute_mismatched=args.recompute_mismatched,
        progress=not args.no_progress,
        layout=args.layout,
        chunk=args.chunk,
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
    import json

    from .store import open_kernel_store

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
    from .store import open_kernel_store, verify_kernel_store

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
    p.add_argument("--chunk", type=int, default=1024, help="inner chunk side (default 1024)")
    p.set_defaults(func=_cmd_migrate)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from .store.migrate import migrate_kernel_store

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
    p.add_argument("--kernel", choices=("ntk", "nngp"), default="ntk", help="default ntk")
    p.add_argument(
        "--ridge",
        default=None,
        help="comma list of relative ridges lam, e.g. 1e-4,1e-3,1e-2 (default 1e-5..1e-1; "
        "one value skips the validation)",
    )
    p.add_argument("--method", choices=("auto", "cholesky", "cg"), default="auto")
    p.add_argument(
        "--memory-limit", default=None, help="e.g. 16GB (default 75%% of the machine memory)"
    )
    p.add_argument("--val-fraction", type=float, default=0.2, help="default 0.2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-10, help="relative residual (1e-10)")
    p.add_argument("--max-iter", type=int, default=500, help="CG iterations per solve")
    p.add_argument("--rank", type=int, default=512, help="Nystrom rank for --method cg")
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="solve a partial store on the rows whose tiles are all done",
    )
    p.add_argument("--report", default=None, help="also write the JSON report to this file")
    p.add_argument(
        "--no-write", action="store_true", help="do not write results/<kernel> into the store"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    g = p.add_argument_group(
        "distributed solve (with --method cg)",
        "block preconditioned CG on a Dask cluster: the train block in row bands held by "
        "the workers, the driver holding only n x classes vectors",
    )
    _add_runtime_arguments(g, cluster_default=None)
    g.add_argument(
        "--band-memory",
        type=_parse_bytes,
        default=256 * 2**20,
        help="bytes of one row band of the train block (default 256MiB)",
    )
    g.add_argument(
        "--stream-bands",
        action="store_true",
        help="re-read the bands from the store every iteration instead of holding them",
    )
    p.set_defaults(func=_cmd_solve)


def _cmd_solve(args: argparse.Namespace) -> int:
    ridges = _float_list("--ridge", args.ridge)
    distributed = args.scheduler is not None or args.cluster is not None
    if distributed and args.method != "cg":
        raise InputError(f"--scheduler / --cluster need --method cg, got --method {args.method}")
    if not distributed:
        return _print_solve(args, _solve(args, ridges, None))
    from .runtime import RuntimeConfig, dask_client

    runtime = RuntimeConfig(
        scheduler=args.scheduler,
        cluster=args.cluster or "local",
        workers=args.workers,
        dashboard_address=args.dashboard_address,
    )
    with dask_client(runtime) as client:
        rep = _solve(args, ridges, client)
    return _print_solve(args, rep)


def _solve(args: argparse.Namespace, ridges, client):
    from .regression import solve_store

    return solve_store(
        args.kernel_store,
        kernel=args.kernel,
        ridges=ridges,
        method=args.method,
        memory_limit=args.memory_limit,
        allow_incomplete=args.allow_incomplete,
        val_fraction=args.val_fraction,
        seed=args.seed,
        tol=args.tol,
        max_iter=args.max_iter,
        rank=args.rank,
        write_results=not args.no_write,
        report_path=args.report,
        client=client,
        band_bytes=args.band_memory,
        keep_bands=False if args.stream_bands else None,
    )


def _print_solve(args: argparse.Namespace, rep) -> int:
    import json

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
def _add_data_arguments(p: argparse.ArgumentParser, *, required: bool) -> None:
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


def _request_from_args(args: argparse.Namespace, layout: str):
    from .pipeline import PrepareRequest, default_preprocess
    from .preprocess import PreprocessConfig, parse_steps

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


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="read a dataset, preprocess, write a dataset store")
    _add_data_arguments(p, required=True)
    p.add_argument("--out", required=True, help="dataset store to write (zarr group)")
    p.add_argument(
        "--layout",
        choices=("flat", "image"),
        default="flat",
        help="rows as vectors (deq kernel, default) or images H x W x C (cdeq, deq --hflip)",
    )
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .pipeline import prepare_dataset

    request = _request_from_args(args, args.layout)
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
    _add_data_arguments(p, required=False)
    _add_spec_arguments(p)
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
    p.add_argument(
        "--solve-kernel",
        choices=("ntk", "nngp"),
        default="ntk",
        help="kernel used by the regression (default ntk)",
    )
    p.add_argument(
        "--lambdas",
        default=None,
        help="comma list of relative ridges lam, chosen on a validation split of the training "
        "rows (default: the solver's grid 1e-5..1e-1; one value is used as given)",
    )
    p.add_argument(
        "--solve-method",
        choices=("auto", "cholesky", "cg"),
        default="auto",
        help="regression solver route (default auto: by memory)",
    )
    _add_store_arguments(p)
    _add_resume_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .errors import InputError
    from .pipeline import format_report, run_pipeline
    from .runtime import RuntimeConfig

    work = Path(args.workdir)
    if work.exists() and not work.is_dir():
        raise InputError(f"--workdir must be a directory, got a file: {args.workdir}")
    lambdas = _float_list("--lambdas", args.lambdas)
    spec = spec_from_args(args)
    request = _request_from_args(args, "image" if args.kernel == "cdeq" or args.hflip else "flat")
    runtime = RuntimeConfig(
        scheduler=args.scheduler,
        cluster=args.cluster,
        workers=args.workers,
        dashboard_address=args.dashboard_address,
    )
    report = run_pipeline(
        args.workdir,
        request,
        spec,
        kernels=args.what,
        solve_kernel=args.solve_kernel,
        lambdas=lambdas,
        solve_method=args.solve_method,
        tile=args.tile,
        dtype=args.dtype,
        options=options_from_args(args),
        runtime=runtime,
        memory_budget=args.memory_budget,
        max_tiles=args.max_tiles,
        recompute_mismatched=args.recompute_mismatched,
        overwrite=args.overwrite,
        install=not args.no_install,
        progress=not args.no_progress,
        stores=args.stores,
    )
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


# ------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The full ``deqntk`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="deqntk",
        description="NTK / NNGP Gram matrices of infinitely deep equilibrium models",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_compute,
        _add_status,
        _add_verify,
        _add_migrate,
        _add_solve,
        _add_prepare,
        _add_run,
    ):
        add(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """An error message on one line (multi-line details joined with "; ")."""
    out = ""
    for part in (p.strip() for p in str(exc).splitlines()):
        if part:
            out += ("" if not out else " " if out.endswith(":") else "; ") + part
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for a clear user error)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning(args.command)
        return _dispatch(args)


def _one_line_warning(command: str):
    """Print the package's warnings as ``deqntk CMD: warning: ...`` (others as usual)."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DatasetWarning):
            print(f"deqntk {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def _quiet_interrupt(signum, frame):
    """SIGINT: silence the dask/tornado loggers *before* the KeyboardInterrupt is raised
    (a ``sync`` call cut short logs a callback traceback on the event loop thread at once),
    so that Ctrl-C ends with the one ``interrupted`` line."""
    from .runtime import silence_dask_logs

    silence_dask_logs()
    raise KeyboardInterrupt


def _dispatch(args: argparse.Namespace) -> int:
    previous = None
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        previous = signal.signal(signal.SIGINT, _quiet_interrupt)
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except DeqntkError as exc:
        print(f"deqntk {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the filesystem refused (permissions, full disk, not a directory)
        print(f"deqntk {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deqntk {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
