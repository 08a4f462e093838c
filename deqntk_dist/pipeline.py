"""The end-to-end job: prepare (dataset store) -> compute (kernel store) -> solve -> report.

Each stage leaves a durable result in the work directory and is reused when the job is
run again with the same parameters:

``DIR/dataset.zarr``  dataset store; reused when its recorded request (dataset, source,
                      sizes, seed, preprocessing, layout) equals the new one.
``DIR/kernel.zarr``   kernel store; computation skipped when it is complete (the compute
                      stage itself resumes a partial store tile by tile).
``DIR/solve.json``    regression report; reused when it belongs to the same kernel store
                      (spec, dataset fingerprint) and solve parameters.
``DIR/report.json``   the job report printed at the end.

Stored results made with *different* parameters are never mixed in: the job stops with a
:class:`~deqntk_dist.errors.StoreMismatchError` unless ``overwrite`` is given, which
replaces the stale stage and everything downstream of it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import DATASETS, load_dataset
from .errors import DatasetWarning, InputError, StoreError, StoreMismatchError
from .options import ComputeOptions, SolveOptions
from .preprocess import PreprocessConfig, fit_preprocessing, select_rows
from .store.dataset import DatasetStore, open_dataset_store, write_dataset_store
from .store.location import Location

__all__ = [
    "DEFAULT_PREPROCESS",
    "LAYOUTS",
    "PrepareRequest",
    "PrepareResult",
    "default_preprocess",
    "format_report",
    "prepare_dataset",
    "run_pipeline",
    "warn_unseen_test_classes",
]

#: ``flat``: rows of shape (D,) for the FC DEQ-NTK; ``image``: (H, W, C) for the CDEQ-NTK.
LAYOUTS = ("flat", "image")

#: Default preprocessing per dataset (from the validation sweep, see scripts/sweep_hparams.py).
DEFAULT_PREPROCESS = {
    "fashion-mnist": PreprocessConfig(steps=("unit-norm",)),
    "mnist": PreprocessConfig(steps=("unit-norm",)),
    "cifar10": PreprocessConfig(steps=("standardize", "zca", "unit-norm"), zca_strength=0.1),
    "npz": PreprocessConfig(steps=("center", "unit-norm")),
}

_ROW_CHUNK = 8192  # rows transformed at a time (bounds the float64 temporaries)


def default_preprocess(dataset: str) -> PreprocessConfig:
    """The default :class:`PreprocessConfig` of a dataset name."""
    if dataset not in DEFAULT_PREPROCESS:
        raise InputError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    return DEFAULT_PREPROCESS[dataset]


def _check_count(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InputError(f"{name} must be a positive integer or None (all rows), got {value!r}")
    return int(value)


@dataclass(frozen=True, kw_only=True)
class PrepareRequest:
    """Everything that determines a dataset store's content.

    Parameters
    ----------
    dataset : {"fashion-mnist", "mnist", "cifar10", "npz"}
    source : str, optional
        Path of the files (absolute once validated); ``None`` for the installed Fashion-MNIST.
    n_train, n_test : int, optional
        Class-balanced subset sizes (``None``: all rows of the split).
    preprocess : PreprocessConfig, optional
        ``None`` means :func:`default_preprocess` of the dataset.
    seed : int
        Seed of the subset draw.
    layout : {"flat", "image"}
        Row shape written to the store: ``(D,)`` (FC kernel) or ``(H, W, C)`` (CDEQ).
    """

    dataset: str
    source: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    preprocess: PreprocessConfig | None = None
    seed: int = 0
    layout: str = "flat"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise InputError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.source is not None:
            object.__setattr__(self, "source", str(Path(self.source).expanduser().absolute()))
        object.__setattr__(self, "n_train", _check_count("n_train", self.n_train))
        object.__setattr__(self, "n_test", _check_count("n_test", self.n_test))
        if self.preprocess is None:
            object.__setattr__(self, "preprocess", default_preprocess(self.dataset))
        elif not isinstance(self.preprocess, PreprocessConfig):
            raise InputError(
                f"preprocess must be a PreprocessConfig, got {type(self.preprocess).__name__}"
            )
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int | np.integer)
            or self.seed < 0
        ):
            raise InputError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.layout not in LAYOUTS:
            raise InputError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")

    @property
    def preprocessing(self) -> PreprocessConfig:
        """The preprocessing (the dataset's default filled in when none was given)."""
        assert self.preprocess is not None  # __post_init__ filled it in
        return self.preprocess

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "source": self.source,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "preprocess": self.preprocessing.to_dict(),
            "seed": int(self.seed),
            "layout": self.layout,
        }


@dataclass(frozen=True)
class PrepareResult:
    """Outcome of :func:`prepare_dataset`: the store, whether it was reused, seconds taken."""

    store: DatasetStore
    reused: bool
    seconds: float
    request: dict = field(default_factory=dict)


def _stored_request(path) -> dict | None:
    try:
        return open_dataset_store(path).attrs.get("source", {}).get("request")
    except StoreError:
        return None


def _diff(have: dict | None, want: dict) -> str:
    if have is None:
        return "it is not a dataset store written by `deqntk prepare`"
    keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    return "; ".join(f"{k}: stored {have.get(k)!r}, requested {want.get(k)!r}" for k in keys)


def warn_unseen_test_classes(y: np.ndarray, n_train: int, where: str) -> np.ndarray:
    """Warn (:class:`DatasetWarning`) about test labels that no training row has.

    Kernel regression can only predict classes it was trained on, so every test row of such
    a class counts as an error in the accuracy.

    Returns
    -------
    ndarray of int64
        The unseen classes (empty when there are none).
    """
    y = np.asarray(y)
    test = y[n_train:]
    unseen = np.setdiff1d(np.unique(test), np.unique(y[:n_train]))
    if unseen.size:
        rows = int(np.isin(test, unseen).sum())
        shown = ", ".join(str(int(c)) for c in unseen[:20]) + (", ..." if unseen.size > 20 else "")
        warnings.warn(
            f"{where}: test class(es) {shown} ({rows} of {test.size} test rows) never occur in "
            "the training rows: the regression cannot predict them, so these rows count as "
            "errors in the accuracy",
            DatasetWarning,
            stacklevel=3,
        )
    return unseen.astype(np.int64)


def prepare_dataset(
    out, request: PrepareRequest, *, overwrite: bool = False, install: bool = True
) -> PrepareResult:
    """Read, subset, preprocess and write a dataset store (or reuse an identical one).

    Parameters
    ----------
    out : path or store URL
        Destination of the dataset store (zarr v3 group).
    request : PrepareRequest
    overwrite : bool
        Replace an existing store written with other parameters.
    install : bool
        Allow installing Fashion-MNIST with apt-get when it is missing.

    Returns
    -------
    PrepareResult

    Warns
    -----
    DatasetWarning
        Test rows of classes that no training row has (they cannot be predicted).

    Raises
    ------
    DatasetError
        Unreadable source files, unknown dataset, labels outside ``[0, MAX_CLASSES)``.
    InputError
        Bad sizes / preprocessing / layout for this dataset.
    StoreMismatchError
        ``out`` holds a store made with other parameters and ``overwrite`` is false.
    """
    t0 = time.perf_counter()
    out = Location.parse(out, param="out")
    want = request.to_dict()
    if out.exists():
        have = _stored_request(out)
        if have == want:
            store = open_dataset_store(out)
            warn_unseen_test_classes(store.y, store.n_train, f"dataset store {out}")
            return PrepareResult(store, True, time.perf_counter() - t0, want)
        if not overwrite:
            raise StoreMismatchError(
                f"dataset store {out} already exists with other parameters ({_diff(have, want)});"
                " pass overwrite=True to replace it or choose another path"
            )
    raw = load_dataset(request.dataset, request.source, install=install)
    if request.layout == "image" and len(raw.feature_shape) != 3:
        raise InputError(
            f"layout 'image' (the CDEQ kernel) needs image rows (H, W, C); dataset "
            f"{request.dataset!r} has rows of shape {raw.feature_shape}"
        )
    xs, ys, xt, yt, selection = select_rows(
        raw, request.n_train, request.n_test, seed=request.seed
    )
    warn_unseen_test_classes(np.concatenate([ys, yt]), ys.shape[0], f"dataset {raw.name}")
    fitted = fit_preprocessing(request.preprocessing, xs)
    feature_shape = (
        raw.feature_shape if request.layout == "image" else (int(np.prod(raw.feature_shape)),)
    )
    x = np.empty((xs.shape[0] + xt.shape[0], *feature_shape), dtype=np.float32)
    pos = 0
    for part in (xs, xt):
        for i in range(0, part.shape[0], _ROW_CHUNK):
            rows = fitted.transform(part[i : i + _ROW_CHUNK], first_row=pos)
            x[pos : pos + rows.shape[0]] = rows.reshape(rows.shape[0], *feature_shape)
            pos += rows.shape[0]
    preprocessing = {**fitted.to_attrs(), "layout": request.layout, "selection": selection}
    source = {**raw.source, "request": want}
    store = write_dataset_store(
        out,
        x,
        np.concatenate([ys, yt]),
        n_train=int(xs.shape[0]),
        name=raw.name,
        preprocessing=preprocessing,
        source=source,
        overwrite=overwrite,
    )
    return PrepareResult(store, False, time.perf_counter() - t0, want)


# ---------------------------------------------------------------------------------------- run
def _kernel_store_state(
    path: Location, spec, dataset: DatasetStore, compute: ComputeOptions
) -> str:
    """``absent``, ``complete``, ``partial`` or ``mismatch`` (other spec, data, kernels,
    dtype or slice tolerance)."""
    if not path.exists():
        return "absent"
    from .store import open_kernel_store
    from .store.identity import kernels_cover

    try:
        ks = open_kernel_store(path)
    except StoreError:
        return "mismatch"
    if (
        ks.spec != spec
        or ks.n != dataset.n
        or ks.dataset_fingerprint != dataset.fingerprint
        or not kernels_cover(ks.kernels, compute.kernels)
        or (compute.dtype is not None and ks.dtype.name != compute.dtype)
        or (compute.tol is not None and ks.options.get("tol") != compute.tol)
    ):
        return "mismatch"
    return "complete" if ks.is_complete() else "partial"


def _remove(path: Path | Location) -> None:
    """Delete a stale store or file (renamed first on a local disk, so a crash never leaves
    half of it; on an object store its root metadata goes first, so a crash leaves no
    store that looks whole)."""
    if isinstance(path, Location):
        if not path.is_local:
            path.delete("zarr.json")
            path.delete_tree()
            return
        path = path.local_path
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink()


def _write_json(path: Path, payload: dict) -> None:
    """Atomic JSON write (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    return str(obj)


def run_pipeline(
    workdir,
    request: PrepareRequest,
    spec,
    *,
    compute: ComputeOptions | None = None,
    solve: SolveOptions | None = None,
    runtime=None,
    client=None,
    overwrite: bool = False,
    install: bool = True,
    log=None,
    stores=None,
) -> dict[str, Any]:
    """prepare -> compute -> solve in ``workdir``, reusing finished stages; returns the report.

    Parameters
    ----------
    workdir : path
        Created if missing; holds ``solve.json`` and ``report.json``, and ``dataset.zarr``
        and ``kernel.zarr`` unless ``stores`` says otherwise.
    request : PrepareRequest
        Dataset, subset sizes and preprocessing (``layout`` must fit the spec: ``flat`` for
        a DEQSpec, ``image`` for a CDEQSpec or a DEQSpec with ``hflip``).
    spec : DEQSpec or CDEQSpec
    compute : ComputeOptions, optional
        The kernel store and its scheduling, as for
        :func:`deqntk_dist.compute.compute_kernel_store` (with ``max_tiles`` an unfinished
        store ends the run after the compute stage, with a report saying so).
    solve : SolveOptions, optional
        The regression stage, as for :func:`deqntk_dist.regression.solve_store`; its
        kernel must be among ``compute.kernels``.
    runtime, client
        Where the compute stage runs (default: a LocalCluster).
    overwrite : bool
        Replace stored stages made with other parameters (and everything downstream).
    install : bool
        Allow installing Fashion-MNIST with apt-get.
    log : callable, optional
        Receives one-line progress messages (default: stderr).
    stores : path or store URL, optional
        Where ``dataset.zarr`` and ``kernel.zarr`` go instead (e.g. ``s3://bucket/job``).

    Returns
    -------
    dict
        The report, also written to ``workdir/report.json``.
    """
    import sys

    from .spec import CDEQSpec, DEQSpec

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not isinstance(spec, DEQSpec | CDEQSpec):
        raise InputError(f"spec must be a DEQSpec or CDEQSpec, got {type(spec).__name__}")
    want_layout = "image" if isinstance(spec, CDEQSpec) or spec.hflip else "flat"
    if request.layout != want_layout:
        what = f"the {spec.kind} kernel" + (" with hflip" if spec.hflip else "")
        raise InputError(f"layout must be {want_layout!r} for {what}, got {request.layout!r}")
    compute = ComputeOptions.resolve(compute, param="compute")
    solve = SolveOptions.resolve(solve, param="solve")
    kernels, solve_kernel = compute.kernels, solve.kernel
    if kernels is not None and solve_kernel not in kernels:
        raise InputError(
            f"kernels must include the solve kernel {solve_kernel!r}, got {list(kernels)}"
        )
    work = Path(workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    where = Location.parse(work if stores is None else stores, param="stores")
    dataset_path, kernel_path = where.child("dataset.zarr"), where.child("kernel.zarr")
    solve_path, report_path = work / "solve.json", work / "report.json"
    paths: dict[str, Location | Path] = {
        "dataset_store": dataset_path,
        "kernel_store": kernel_path,
        "solve_report": solve_path,
        "report": report_path,
    }
    t_start = time.perf_counter()
    stages: dict[str, dict[str, Any]] = {}

    # 1. prepare
    have = _stored_request(dataset_path) if dataset_path.exists() else None
    if dataset_path.exists() and have != request.to_dict():
        if not overwrite:
            raise StoreMismatchError(
                f"dataset store {dataset_path} was prepared with other parameters "
                f"({_diff(have, request.to_dict())}); pass overwrite=True to redo the job in "
                f"{work} or use another workdir"
            )
        for key in ("kernel_store", "solve_report"):
            _remove(paths[key])
    say(f"deqntk run: prepare {request.dataset} -> {dataset_path}")
    prep = prepare_dataset(dataset_path, request, overwrite=overwrite, install=install)
    ds = prep.store
    stages["prepare"] = {"seconds": round(prep.seconds, 3), "reused": prep.reused}

    # 2. compute
    state = _kernel_store_state(kernel_path, spec, ds, compute)
    if state == "mismatch":
        if not overwrite:
            raise StoreMismatchError(
                f"kernel store {kernel_path} belongs to another spec, dataset, "
                "kernels, dtype or tolerance; pass overwrite=True to recompute it or use another "
                "workdir"
            )
        _remove(kernel_path)
        _remove(solve_path)
        state = "absent"
    t0 = time.perf_counter()
    if state == "complete":
        stages["compute"] = {"seconds": 0.0, "reused": True}
    else:
        from .compute import compute_kernel_store

        say(f"deqntk run: compute {spec.kind} kernel store -> {kernel_path}")
        rep = compute_kernel_store(
            ds, kernel_path, spec, compute, client=client, runtime=runtime, log=say
        )
        stages["compute"] = {
            "seconds": round(time.perf_counter() - t0, 3),
            "reused": False,
            "resumed_tiles": rep.tiles_done_before,
            "tiles_computed": rep.tiles_computed,
            "tiles_total": rep.tiles_total,
            "entries_per_second": rep.entries_per_second,
            "max_residual": rep.max_residual,
            "workers": rep.workers,
        }
        _remove(solve_path)  # new kernel values: an older solve is stale
    from .store import open_kernel_store

    ks = open_kernel_store(kernel_path)
    stages["compute"]["tile"] = ks.tile

    # 3. solve
    identity = {
        "spec": spec.to_dict(),
        "dataset_fingerprint": ds.fingerprint,
        "solve": solve.to_dict(),
    }
    record = None
    missing = len(ks.missing_tiles())
    if missing:  # --max-tiles stopped the compute stage: nothing to solve yet
        say(f"deqntk run: {missing} tiles left in {kernel_path}; rerun to finish")
        record = {"identity": identity, "result": {}}
        stages["solve"] = {"seconds": 0.0, "reused": False, "skipped": "kernel store incomplete"}
    if record is None and solve_path.exists():
        try:
            old = json.loads(solve_path.read_text())
        except (OSError, ValueError):
            old = None
        if old is not None and old.get("identity") == identity:
            record = old
            stages["solve"] = {"seconds": 0.0, "reused": True}
    if record is None:
        say(f"deqntk run: solve ({solve_kernel}) -> {solve_path}")
        t0 = time.perf_counter()
        result = _solve(kernel_path, solve)
        record = {"identity": identity, "result": result}
        _write_json(solve_path, record)
        stages["solve"] = {"seconds": round(time.perf_counter() - t0, 3), "reused": False}

    result = record["result"]
    report = {
        "kernel": spec.to_dict(),
        "dataset": ds.name,
        "n_train": ds.n_train,
        "n_test": ds.n_test,
        "feature_shape": list(ds.feature_shape),
        "preprocessing": request.preprocessing.to_dict(),
        "solve_kernel": solve_kernel,
        "accuracy": result.get("accuracy"),
        "ridge": result.get("ridge"),
        "solver_route": result.get("method"),
        "tiles_left": missing,
        "stages": stages,
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "paths": {k: str(v) for k, v in paths.items()},
        "request": request.to_dict(),
        "options": {"compute": compute.to_dict(), "solve": solve.to_dict()},
    }
    _write_json(report_path, report)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The short human-readable report printed by ``deqntk run``."""
    k = report["kernel"]
    params = ", ".join(f"{n}={k[n]}" for n in ("sigma_w2", "sigma_u2", "sigma_b2") if n in k)
    extra = ""
    if k["kind"] == "cdeq":
        extra = f", filter_size={k['filter_size']}, readout={k['readout']}"
        if k.get("readout") == "lap":
            extra += f", pool_size={k['pool_size']}"
    if k.get("hflip"):
        extra += ", hflip"
    lines = [
        f"kernel:    {k['kind']} ({k.get('activation', 'relu')}, {params}{extra}); "
        f"regression on the {report['solve_kernel']}",
        f"data:      {report['dataset']}, {report['n_train']} train + {report['n_test']} test "
        f"rows of shape {tuple(report['feature_shape'])}, preprocessing "
        f"{','.join(report['preprocessing']['steps']) or 'none'}",
    ]
    for name, st in report["stages"].items():
        what = "reused" if st.get("reused") else f"{st['seconds']:.1f} s"
        if st.get("skipped"):
            what = f"skipped ({st['skipped']})"
        if name == "compute" and not st.get("reused"):
            rate = st.get("entries_per_second") or 0
            what += f" ({st['tiles_computed']} tiles of {st['tile']}, {rate:.3g} entries/s)"
        lines.append(f"{name + ':':<10} {what}")
    acc = report["accuracy"]
    lam = report.get("ridge")
    if report.get("tiles_left"):
        lines.append(f"accuracy:  n/a ({report['tiles_left']} tiles left: rerun to finish)")
    elif acc is None:
        lines.append("accuracy:  n/a (no test rows)")
    else:
        lines.append(f"accuracy:  {acc:.4f}" + (f" (ridge={lam:g})" if lam is not None else ""))
    for key, path in report["paths"].items():
        lines.append(f"{key + ':':<15}{path}")
    lines.append(f"total:     {report['total_seconds']:.1f} s")
    return "\n".join(lines)


def _solve(kernel_store, options: SolveOptions) -> dict[str, Any]:
    """Run the regression stage on a complete kernel store; its JSON report as a dict."""
    from .regression import solve_store

    return solve_store(kernel_store, options).to_dict()
