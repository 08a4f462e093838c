"""The regression stage on a kernel store: rows to solve on, guarded reads, results
written back through :mod:`deqntk_dist.store.results`."""

from __future__ import annotations

import dataclasses
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IncompleteStoreError, InputError, SolveError, StoreError
from ..options import SolveOptions
from .krr import check_options, kernel_ridge
from .linalg import IndexedBlocks
from .report import SolveReport

__all__ = ["complete_rows", "solve_store"]


def complete_rows(store) -> tuple[np.ndarray, np.ndarray]:
    """Train and test rows of a partial store whose needed tiles are all done.

    Greedy over the tile rows in order: a tile row joins the training set when its
    diagonal tile and its tiles against every tile row already chosen are done; test rows
    are kept from tile rows whose tiles against all chosen training tile rows are done.

    Returns
    -------
    train_rows, test_rows : int64 arrays (sorted, global row indices)
    """
    done = np.asarray(store.ledger()["done"], dtype=bool)
    done = done & done.T
    plan, nt = store.plan, store.n_train
    chosen: list[int] = []
    for b in range(plan.n_blocks):
        r0, _ = plan.bounds(b)
        if r0 >= nt:
            break
        if done[b, b] and all(done[b, c] for c in chosen):
            chosen.append(b)
    parts = [np.arange(*plan.bounds(b)) for b in chosen]
    train = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    train = train[train < nt]
    tests = []
    for b in range(plan.n_blocks):
        r0, r1 = plan.bounds(b)
        if r1 > nt and chosen and all(done[b, c] for c in chosen):
            tests.append(np.arange(max(r0, nt), r1))
    test = np.concatenate(tests) if tests else np.zeros(0, np.int64)
    return train.astype(np.int64), test.astype(np.int64)


def solve_store(
    kernel_store_path,
    options: SolveOptions | None = None,
    *,
    write_results: bool = True,
    report_path=None,
    client=None,
    **fields: Any,
) -> SolveReport:
    """Kernel ridge regression on a kernel store; results written back into it.

    Parameters
    ----------
    kernel_store_path : str or Path
    options : SolveOptions, optional
        Kernel, ridges, solver and their knobs (default ``SolveOptions()``).
    **fields
        :class:`~deqntk_dist.options.SolveOptions` fields that replace those of
        ``options`` (``solve_store(path, ridges=[1e-3], solver="cg")``).  ``method`` is the
        earlier name of ``solver`` (deprecated).
    write_results : bool
        Write ``results/<kernel>`` into the store (a new version behind one pointer, see
        :mod:`.results`), with ``options.to_dict()`` in its attrs.
    report_path : str or Path, optional
        Also write the JSON report there (its directory must exist).
    client : distributed.Client, optional
        With ``solver="cg"``: solve on this Dask cluster (:mod:`.distributed`): the train
        block in row bands of ``band_bytes`` held by the workers (``keep_bands``; default:
        when they take at most half of the cluster's memory limit, else re-read from the
        store every iteration), a Nyström preconditioner built there, the driver holding
        only ``n x classes`` vectors.

    Returns
    -------
    SolveReport

    Raises
    ------
    IncompleteStoreError
        Missing tiles and ``allow_incomplete`` is False, or nothing complete to solve on.
    StoreError
        The store cannot be read, or the results cannot be written there (checked before
        the solve; a failure after it saves the results to a temporary directory named in
        the message).
    InputError
        Bad parameters, or ``report_path`` in a directory that does not exist or cannot be
        written (checked before the solve).
    SolveError
    """
    opts = _options(options, fields)
    kernel, ridges, method = opts.kernel, opts.ridges, opts.solver
    allow_incomplete, band_bytes = opts.allow_incomplete, opts.band_bytes
    val_fraction, seed, tol, max_iter, rank = (
        opts.val_fraction, opts.seed, opts.tol, opts.max_iter, opts.rank,
    )  # fmt: skip
    from ..store import open_kernel_store

    store = open_kernel_store(kernel_store_path)
    if kernel not in store.kernels:
        raise InputError(
            f"kernel must be one of {store.kernels} (in {store.path}), got {kernel!r}"
        )
    _check_destinations(store.path, kernel, write_results, report_path)
    labels = store.labels()
    if labels.shape != (store.n,):
        raise SolveError(
            f"label/kernel size mismatch: {store.path} has {store.n} kernel rows "
            f"but {labels.shape[0]} labels"
        )
    missing = store.missing_tiles()
    nt = store.n_train
    if missing and not allow_incomplete:
        shown = ", ".join(map(str, missing[:5]))
        raise IncompleteStoreError(
            f"{store.path}: {len(missing)} of {store.plan.n_tiles} tiles are not done "
            f"(e.g. {shown}); finish it with `deqntk compute` or pass allow_incomplete=True "
            "to solve on the complete blocks only"
        )
    if missing:
        train_rows, test_rows = complete_rows(store)
        if train_rows.size < 2:
            raise IncompleteStoreError(
                f"{store.path}: no complete train x train blocks to solve on "
                f"({len(missing)} tiles missing)"
            )
    else:
        train_rows, test_rows = np.arange(nt), np.arange(nt, store.n)
    n_classes = int(labels.max()) + 1 if labels.size else 1
    if client is not None:
        from .distributed import distributed_ridge

        if method != "cg":
            raise InputError(f"a Dask cluster needs solver='cg', got solver={method!r}")
        report = distributed_ridge(
            client, store, kernel, train_rows, test_rows, labels,
            ridges=check_options(ridges, val_fraction, tol, max_iter, rank),
            n_classes=n_classes, val_fraction=val_fraction, seed=seed, tol=tol,
            max_iter=max_iter, rank=rank, band_bytes=band_bytes, keep=opts.keep_bands,
        )  # fmt: skip
    else:
        arr = _GuardedArray(store.array(kernel), f"{store.path}/{kernel}")
        report = _in_process(
            arr, store, kernel, train_rows, test_rows, labels, n_classes, ridges, method,
            opts.memory_limit, val_fraction, seed, tol, max_iter, rank,
        )  # fmt: skip
    report = dataclasses.replace(report, store=store.path, incomplete=bool(missing))
    failed = []
    if write_results:
        from ..store.results import write_results as write_version

        arrays = {
            "alpha": report.alpha,
            "train_rows": train_rows,
            "test_rows": test_rows,
            "predictions": report.predictions
            if report.predictions is not None
            else np.zeros((0, report.n_classes)),
        }
        try:
            attrs = {"report": report.to_dict(), "options": opts.to_dict()}
            write_version(store.path, kernel, arrays, attrs)
        except OSError as exc:
            failed.append(f"results/{kernel} into {store.path} ({exc.strerror or exc})")
    if report_path is not None:
        try:
            report.write_json(report_path)
        except OSError as exc:
            failed.append(f"the report to {report_path} ({exc.strerror or exc})")
    if failed:
        where = _save_elsewhere(report, train_rows, test_rows)
        raise StoreError(f"could not write {' or '.join(failed)}; {where}")
    return report


def _options(options: SolveOptions | None, fields: dict[str, Any]) -> SolveOptions:
    """``options`` with ``fields`` replaced (``method``: the deprecated name of
    ``solver``)."""
    if "method" in fields:
        warnings.warn(
            "solve_store(method=...) is deprecated; use solver=...",
            DeprecationWarning,
            stacklevel=3,
        )
        fields["solver"] = fields.pop("method")
    return SolveOptions.resolve(options, fields)


def _in_process(
    arr, store, kernel, train_rows, test_rows, labels, n_classes, ridges, method,
    memory_limit, val_fraction, seed, tol, max_iter, rank,
) -> SolveReport:  # fmt: skip
    """:func:`kernel_ridge` on the store's train / test blocks, in this process."""
    K_train = IndexedBlocks(arr, train_rows, train_rows)
    K_test = IndexedBlocks(arr, test_rows, train_rows) if test_rows.size else None
    return kernel_ridge(
        K_train,
        labels[train_rows],
        K_test,
        labels[test_rows] if test_rows.size else None,
        ridges=ridges,
        method=method,
        memory_limit=memory_limit,
        val_fraction=val_fraction,
        seed=seed,
        tol=tol,
        max_iter=max_iter,
        rank=rank,
        block=store.tile * max(1, 512 // store.tile),
        n_classes=n_classes,
        kernel=kernel,
    )


class _GuardedArray:
    """A kernel array whose read failures (corrupt chunks) raise :class:`StoreError` naming
    the block, not tracebacks from the codec."""

    def __init__(self, arr, what: str):
        self.arr, self.what = arr, what
        self.shape, self.dtype, self.chunks = arr.shape, arr.dtype, arr.chunks

    def __getitem__(self, key):
        try:
            return self.arr[key]
        except Exception as exc:
            rows, cols = key
            raise StoreError(
                f"{self.what}[{rows.start}:{rows.stop}, {cols.start}:{cols.stop}] is "
                f"unreadable: {type(exc).__name__}: {exc}"
            ) from exc


def _check_destinations(store_path: str, kernel: str, write_results: bool, report_path) -> None:
    """Refuse, before any work, destinations the results could not be written to."""
    if write_results:
        from ..store.results import prepare_results

        try:
            prepare_results(store_path, kernel)
        except OSError as exc:
            raise StoreError(
                f"cannot write results into kernel store {store_path} ({exc.strerror or exc}"
                f"{': ' + str(exc.filename) if exc.filename else ''}); make it writable or "
                "pass write_results=False"
            ) from exc
    if report_path is not None:
        parent = Path(report_path).absolute().parent
        if not parent.is_dir():
            raise InputError(
                f"report must be a file in an existing directory, got {report_path} "
                f"({parent} does not exist)"
            )
        probe = parent / f".{Path(report_path).name}.probe-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"\0" * 4096)
        except OSError as exc:
            raise InputError(
                f"report must be a writable path, got {report_path} "
                f"({exc.strerror or exc} in {parent})"
            ) from exc
        finally:
            if probe.exists():
                probe.unlink()


def _save_elsewhere(report: SolveReport, train_rows, test_rows) -> str:
    """Save the report and arrays to a new temporary directory; a sentence saying where."""
    try:
        d = Path(tempfile.mkdtemp(prefix="deqntk-solve-"))
        report.write_json(d / "report.json")
        arrays = {"alpha": report.alpha, "train_rows": train_rows, "test_rows": test_rows}
        if report.predictions is not None:
            arrays["predictions"] = report.predictions
        np.savez(d / "results.npz", **arrays)
    except OSError as exc:
        return f"the result could not be saved elsewhere either ({exc})"
    return f"the result was saved to {d} (report.json, results.npz)"
