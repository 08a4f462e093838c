"""Figures of a finished ``deqntk run``: the Gram matrix, its spectrum, the ridge validation
curve and the per-class test accuracy, as PNG files plus the plotted numbers as JSON.

:func:`write_figures` reads a work directory written by
:func:`~deqntk_dist.pipeline.run_pipeline` (``report.json`` names the dataset store, the
kernel store and ``solve.json``; the stores may be local or ``s3://...``) through the
package's readers and writes, next to ``report.json`` (or into ``out_dir``):

``gram.png``      a class-ordered sample of the train Gram block, class boundaries marked;
``spectrum.png``  the eigenvalues of the train block, sorted, normalised by the largest;
``ridge.png``     validation accuracy and MSE against the relative ridge, the chosen one marked;
``classes.png``   per-class test accuracy from the stored predictions (only with test rows);
``figures.json``  the files and every number plotted.

matplotlib (the ``plots`` extra) is imported only here, and only its object-oriented API
(:class:`matplotlib.figure.Figure` on an Agg canvas) is used: pyplot's global state is never
touched, so this is safe in servers, notebooks and threads.  Every figure is
:data:`FIG_SIZE` inches at :data:`DPI` dots per inch, i.e. :data:`PIXELS` pixels.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import (
    DeqntkError,
    IncompleteStoreError,
    InputError,
    StoreError,
    StoreMismatchError,
    StoreNotFoundError,
)

__all__ = [
    "DEFAULT_SAMPLE",
    "DPI",
    "EXACT_LIMIT",
    "FIG_SIZE",
    "PIXELS",
    "TOP_K",
    "PlotDependencyError",
    "write_figures",
]

#: Figure size in inches and resolution: every PNG is exactly :data:`PIXELS` (width, height).
FIG_SIZE = (6.4, 4.8)
DPI = 100
PIXELS = (640, 480)
#: Default number of train rows (and columns) in the Gram figure.
DEFAULT_SAMPLE = 512
#: Largest train block whose spectrum is computed exactly (dense ``eigvalsh``).
EXACT_LIMIT = 4096
#: Eigenvalues computed by Lanczos above :data:`EXACT_LIMIT`.
TOP_K = 100
_HOLD_BYTES = 2 * 2**30  # largest train block (float64) the Lanczos route holds in memory
_BAND_BYTES = 64 * 2**20  # float64 bytes of one row band of the train block in memory

_MATPLOTLIB_HINT = "matplotlib is needed for plots: pip install 'deqntk_dist[plots]'"


class PlotDependencyError(DeqntkError, ImportError):
    """matplotlib (the ``plots`` extra) is not installed."""


def _matplotlib():
    """``(Figure, FigureCanvasAgg)``; :class:`PlotDependencyError` when matplotlib is absent."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotDependencyError(_MATPLOTLIB_HINT) from exc
    return Figure, FigureCanvasAgg


# ------------------------------------------------------------------------------ the run
@dataclass(frozen=True)
class _Run:
    """What the figures are drawn from."""

    report_path: Path
    report: dict
    solve: dict  # the ``result`` of solve.json
    kernel: str
    store: Any  # KernelStore
    dataset: Any  # DatasetStore


def _load_run(workdir: Path, kernel: str | None) -> _Run:
    """Open ``workdir/report.json`` and everything it names (clear errors naming paths)."""
    from .store import open_kernel_store
    from .store.dataset import open_dataset_store

    report_path = workdir / "report.json"
    if not report_path.is_file():
        raise InputError(
            f"workdir must hold the report.json written by `deqntk run`; not found: {report_path}"
        )
    try:
        report = json.loads(report_path.read_text())
        paths = report["paths"]
        names = {key: str(paths[key]) for key in ("dataset_store", "kernel_store")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"{report_path} is not a `deqntk run` report (needs paths.dataset_store and "
            f"paths.kernel_store): {type(exc).__name__}: {exc}"
        ) from exc
    if report.get("tiles_left"):
        raise IncompleteStoreError(
            f"{report_path}: the kernel store {names['kernel_store']} has "
            f"{report['tiles_left']} tiles left and was not solved; rerun `deqntk run` to "
            "finish it before drawing figures"
        )
    try:
        ds = open_dataset_store(names["dataset_store"])
        ks = open_kernel_store(names["kernel_store"])
    except StoreNotFoundError as exc:
        raise StoreNotFoundError(f"{exc} (named by {report_path})") from exc
    if ks.dataset_fingerprint != ds.fingerprint or ks.n != ds.n or ks.n_train != ds.n_train:
        raise StoreMismatchError(
            f"kernel store {ks.path} was not computed from dataset store {ds.path} "
            f"(both named by {report_path})"
        )
    kernel = kernel or str(report.get("solve_kernel") or "ntk")
    if kernel not in ks.kernels:
        raise InputError(f"kernel must be one of {ks.kernels} (in {ks.path}), got {kernel!r}")
    missing = ks.missing_tiles()
    if missing:
        raise IncompleteStoreError(
            f"{ks.path}: {len(missing)} tiles are not done (e.g. {missing[0]}); finish the "
            "store with `deqntk run` / `deqntk compute` before drawing figures"
        )
    solve_path = Path(str(paths.get("solve_report") or workdir / "solve.json"))
    try:
        solve = json.loads(solve_path.read_text())["result"]
    except FileNotFoundError:
        raise InputError(
            f"the solve report named by {report_path} is missing: {solve_path}"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"{solve_path} is not a `deqntk run` solve report: {type(exc).__name__}: {exc}"
        ) from exc
    return _Run(report_path, report, solve, kernel, ks, ds)


# --------------------------------------------------------------------- reading the Gram
def _chunk_rows(store, kernel: str) -> int:
    """Row side of the array's (inner) chunks: the unit the store reads at once."""
    chunks: Any = getattr(store.array(kernel), "chunks", None)
    try:
        return max(1, int(chunks[0]))
    except (TypeError, IndexError, ValueError):
        return max(1, int(store.tile))


def _class_quotas(counts: np.ndarray, sample: int) -> np.ndarray:
    """Rows per class, as equal as the class sizes allow, summing to at most ``sample``."""
    quota = np.zeros(counts.size, dtype=np.int64)
    left = sample
    order = np.argsort(counts, kind="stable")  # small classes first: their leftovers spread
    for pos, c in enumerate(order):
        share = left // (counts.size - pos)
        quota[c] = min(int(counts[c]), share)
        left -= quota[c]
    return quota


def _sample_rows(labels: np.ndarray, sample: int, band: int, seed: int) -> np.ndarray:
    """Train rows of the Gram figure, ordered by class (then row).

    All rows when there are at most ``sample``; otherwise about ``sample / n_classes`` per
    class, drawn (seeded) from as few chunk-aligned row bands as hold enough rows of every
    class, the bands taken in a random order: a store reads whole chunks, so the figure
    reads only the chunks of those bands, not the whole Gram.
    """
    n = labels.size
    if n <= sample:
        rows = np.arange(n)
    else:
        rng = np.random.default_rng(seed)
        classes, codes = np.unique(labels, return_inverse=True)
        quota = _class_quotas(np.bincount(codes, minlength=classes.size), sample)
        band_of = np.arange(n) // band
        have = np.zeros(classes.size, dtype=np.int64)
        chosen = np.zeros(band_of[-1] + 1, dtype=bool)
        for b in rng.permutation(chosen.size):
            chosen[b] = True
            have += np.bincount(codes[band_of == b], minlength=classes.size)
            if np.all(have >= quota):
                break
        pool = chosen[band_of]
        parts = [
            rng.choice(np.flatnonzero(pool & (codes == c)), size=int(q), replace=False)
            for c, q in enumerate(quota)
            if q
        ]
        rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return rows[np.lexsort((rows, labels[rows]))].astype(np.int64)


def _read_sampled(store, kernel: str, idx: np.ndarray, band: int) -> np.ndarray:
    """``K[idx][:, idx]`` (float64), reading per chunk band only the span of sampled rows."""
    m = idx.size
    out = np.empty((m, m), dtype=np.float64)
    groups = []
    for b in np.unique(idx // band):
        pos = np.flatnonzero(idx // band == b)
        groups.append((pos, idx[pos]))
    for rpos, ridx in groups:
        r0 = int(ridx.min())
        for cpos, cidx in groups:
            c0 = int(cidx.min())
            blk = store.block(
                kernel, slice(r0, int(ridx.max()) + 1), slice(c0, int(cidx.max()) + 1), check=False
            )
            out[np.ix_(rpos, cpos)] = blk[np.ix_(ridx - r0, cidx - c0)]
    return out


def _band_rows(n: int, band: int, band_bytes: int) -> int:
    """Rows per band of an ``n``-column float64 read: a multiple of the chunk rows."""
    rows = max(1, band_bytes // max(1, 8 * n))
    return max(band, rows // band * band)


def _train_spectrum(
    store,
    kernel: str,
    *,
    exact_limit: int,
    top_k: int,
    band: int,
    band_bytes: int,
    hold_bytes: int = _HOLD_BYTES,
) -> tuple[np.ndarray, str]:
    """Eigenvalues of the train block, largest first, and the route (``exact`` /
    ``lanczos``).  The Lanczos route multiplies by the block held in memory (float64) when
    it takes at most ``hold_bytes``, else read from the store in row bands on every product
    (never more than one band in memory)."""
    from scipy.linalg import eigvalsh

    n = store.n_train
    step = _band_rows(n, band, band_bytes)

    def bands():
        """``(r0, r1, K[r0:r1, :n])`` of the train block, one row band at a time."""
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            yield r0, r1, store.block(kernel, slice(r0, r1), slice(0, n), check=False)

    def whole() -> np.ndarray:
        K = np.empty((n, n), dtype=np.float64)
        for r0, r1, blk in bands():
            K[r0:r1] = blk
        return K

    if n <= exact_limit:
        return eigvalsh(whole())[::-1].copy(), "exact"
    from scipy.sparse.linalg import LinearOperator, eigsh

    # the block fits: read it once and multiply in memory
    held = whole() if n * n * 8 <= hold_bytes else None

    def matmat(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        if held is not None:
            return held @ v
        out = np.empty((n, *v.shape[1:]), dtype=np.float64)
        for r0, r1, blk in bands():
            out[r0:r1] = blk.astype(np.float64, copy=False) @ v
        return out

    op = LinearOperator((n, n), matvec=matmat, matmat=matmat, dtype=np.float64)
    k = max(1, min(int(top_k), n - 1))
    vals = eigsh(op, k=k, which="LA", return_eigenvectors=False, tol=0)
    return np.sort(vals)[::-1].copy(), "lanczos"


# -------------------------------------------------------------------------------- plots
def _new_figure(Figure, Canvas):
    fig = Figure(figsize=FIG_SIZE, dpi=DPI, layout="constrained")  # layout keeps the size
    Canvas(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG of exactly :data:`PIXELS` (atomically: temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _class_runs(sorted_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start positions and labels of the runs of equal labels."""
    if not sorted_labels.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    return starts, sorted_labels[starts]


def _gram_figure(fig, K: np.ndarray, labels: np.ndarray, kernel: str, n_train: int) -> dict:
    starts, classes = _class_runs(labels)
    m = K.shape[0]
    ax = fig.add_subplot()
    im = ax.imshow(K, cmap="viridis", interpolation="nearest", origin="upper")
    for s in starts[1:]:
        ax.axhline(s - 0.5, color="white", lw=0.8)
        ax.axvline(s - 0.5, color="white", lw=0.8)
    centres = (starts + np.r_[starts[1:], m]) / 2 - 0.5
    if classes.size <= 20:
        ax.set_xticks(centres, [str(int(c)) for c in classes])
        ax.set_yticks(centres, [str(int(c)) for c in classes])
    ax.set_xlabel("train rows, by class")
    ax.set_ylabel("train rows, by class")
    what = "all" if m == n_train else f"{m} sampled of"
    ax.set_title(f"{kernel.upper()} train Gram block ({what} {n_train} rows)")
    fig.colorbar(im, ax=ax, label=f"{kernel.upper()} value")
    return {"boundaries": [int(s) for s in starts[1:]], "classes": [int(c) for c in classes]}


def _spectrum_figure(fig, vals: np.ndarray, method: str, kernel: str, n: int) -> None:
    ax = fig.add_subplot()
    top = float(vals[0]) if vals.size else 0.0
    positive = vals > 0
    if top > 0 and positive.any():
        idx = np.flatnonzero(positive) + 1
        ax.semilogy(idx, vals[positive] / top, ".-", ms=3, lw=0.8)
    else:
        ax.text(0.5, 0.5, "no positive eigenvalue", ha="center", transform=ax.transAxes)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index i (largest first)")
    ax.set_ylabel(r"$\lambda_i / \lambda_{max}$")
    ax.grid(True, which="both", alpha=0.3)
    if method == "exact":
        title = f"spectrum of the {kernel.upper()} train block: all {n} (exact eigvalsh)"
    else:
        title = f"spectrum of the {kernel.upper()} train block: top {vals.size} of {n} (Lanczos)"
    ax.set_title(title, fontsize=10)
    dropped = int((~positive).sum())
    if dropped:
        ax.text(
            0.98, 0.98, f"{dropped} non-positive not shown", ha="right", va="top",
            transform=ax.transAxes, fontsize=8,
        )  # fmt: skip


def _ridge_figure(fig, solve: dict) -> dict:
    ridges = [float(r) for r in solve.get("ridges") or []]
    chosen = solve.get("ridge")
    acc, mse = solve.get("val_accuracy"), solve.get("val_mse")
    validated = bool(acc) and bool(mse) and len(ridges) > 1
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_xlabel(r"relative ridge $\lambda$ (shift $\lambda\,\mathrm{tr}(K)/n$)")
    if validated:
        ax.plot(ridges, acc, "o-", color="tab:blue", label="validation accuracy")
        ax.set_ylabel("validation accuracy", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(ridges, mse, "s--", color="tab:red", label="validation MSE")
        ax2.set_ylabel("validation MSE", color="tab:red")
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize=8)
        title = f"ridge chosen on {solve.get('n_val', '?')} validation rows"
    else:
        ax.set_ylabel("validation accuracy")
        ax.text(
            0.5, 0.6, "one ridge given: no validation", ha="center", va="center",
            transform=ax.transAxes, fontsize=12, bbox={"fc": "white", "ec": "none"},
        )  # fmt: skip
        title = "ridge used as given"
    if chosen is not None:
        ax.axvline(float(chosen), color="k", ls=":", lw=1.2)
        ax.text(
            float(chosen), 0.02, f" chosen {float(chosen):g}", transform=ax.get_xaxis_transform(),
            fontsize=9,
        )  # fmt: skip
        if not validated:
            lo, hi = float(chosen) / 10, float(chosen) * 10
            ax.set_xlim(lo, hi)
    ax.set_title(title)
    return {
        "ridges": ridges,
        "val_accuracy": [float(a) for a in acc] if acc else None,
        "val_mse": [float(e) for e in mse] if mse else None,
        "chosen": None if chosen is None else float(chosen),
        "validated": validated,
    }


def _class_accuracy(run: _Run) -> dict | None:
    """Per-class test accuracy from ``results/<kernel>`` (None without test rows)."""
    from .store.results import read_results

    if run.dataset.n_test == 0:
        return None
    g: Any = read_results(run.store.path, run.kernel)
    if g is None:
        raise StoreError(
            f"{run.store.path}: results/{run.kernel} is missing (no solve results); rerun "
            "`deqntk run` or `deqntk solve`"
        )
    try:
        pred = np.asarray(g["predictions"][...], dtype=np.float64)
        rows = np.asarray(g["test_rows"][...], dtype=np.int64)
        stored = dict(g.attrs.get("report") or {})
    except Exception as exc:
        raise StoreError(
            f"{run.store.path}: results/{run.kernel} is unreadable: {type(exc).__name__}: {exc}"
        ) from exc
    if rows.size == 0:
        return None
    if pred.ndim != 2 or pred.shape[0] != rows.size or rows.max() >= run.dataset.n:
        raise StoreError(
            f"{run.store.path}: results/{run.kernel} holds predictions of shape {pred.shape} "
            f"for {rows.size} test rows (of {run.dataset.n} rows)"
        )
    y = run.dataset.y[rows]
    hit = np.argmax(pred, axis=1) == y
    classes, counts = np.unique(y, return_counts=True)
    acc = [float(hit[y == c].mean()) for c in classes]
    return {
        "classes": [int(c) for c in classes],
        "accuracy": acc,
        "count": [int(k) for k in counts],
        "overall": float(hit.mean()),
        "results_ridge": stored.get("ridge"),
    }


def _classes_figure(fig, data: dict) -> None:
    ax = fig.add_subplot()
    x = np.arange(len(data["classes"]))
    bars = ax.bar(x, data["accuracy"], color="tab:blue")
    ax.axhline(data["overall"], color="k", ls="--", lw=1, label=f"all: {data['overall']:.3f}")
    ax.set_xticks(x, [str(c) for c in data["classes"]])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"per-class test accuracy ({sum(data['count'])} test rows)")
    if len(x) <= 20:
        for bar, k in zip(bars, data["count"]):
            ax.annotate(
                f"n={k}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center", va="bottom", fontsize=7,
            )  # fmt: skip
    ax.legend(loc="lower right")


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _finite(values) -> list:
    """JSON-safe floats (NaN / inf as None)."""
    return [float(v) if math.isfinite(float(v)) else None for v in values]


# --------------------------------------------------------------------------------- API
def write_figures(
    workdir: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    kernel: str | None = None,
    exact_limit: int = EXACT_LIMIT,
    top_k: int = TOP_K,
    band_bytes: int = _BAND_BYTES,
    hold_bytes: int = _HOLD_BYTES,
) -> list[Path]:
    """Draw the figures of a finished ``deqntk run`` work directory as PNG files.

    Parameters
    ----------
    workdir : str or os.PathLike
        A work directory of :func:`~deqntk_dist.pipeline.run_pipeline`: its ``report.json``
        names the dataset store, the kernel store (local paths or store URLs) and
        ``solve.json``.
    out_dir : str or os.PathLike, optional
        Where the files go (created if missing); default: ``workdir``.
    sample : int
        At most this many train rows (and the same columns) in ``gram.png``, drawn per
        class (equal shares where the classes are large enough) from randomly chosen
        chunk-aligned row bands, so only the chunks of those bands are read.
    seed : int
        Seed of that draw.
    kernel : {"ntk", "nngp"}, optional
        Kernel of ``gram.png`` / ``spectrum.png`` (default: the one the run solved with,
        which is also the one of ``ridge.png`` and ``classes.png``).
    exact_limit : int
        Train blocks of at most this many rows get their whole spectrum exactly
        (``scipy.linalg.eigvalsh`` on the block in memory); larger ones the ``top_k``
        largest eigenvalues by Lanczos (``scipy.sparse.linalg.eigsh``) on the block held in
        memory (float64) when it takes at most ``hold_bytes``, else on an operator that
        reads the block from the store in row bands on every product (slow on a large
        store, but never more than one band in memory).
    top_k : int
        Eigenvalues computed on the Lanczos route.
    band_bytes : int
        Bytes (float64) of one row band read from the store for the spectrum.
    hold_bytes : int
        Largest train block (float64 bytes) the Lanczos route holds in memory.

    Returns
    -------
    list of pathlib.Path
        The files written: ``gram.png``, ``spectrum.png``, ``ridge.png``, ``classes.png``
        (only when the run has test rows) and, last, ``figures.json``, which lists the
        figures and holds the numbers plotted: the sampled rows and class boundaries, the
        eigenvalues (largest first, not normalised) and their route, the validation curve
        and chosen ridge, and the per-class test accuracies with their row counts.  Every
        PNG is :data:`PIXELS` pixels (:data:`FIG_SIZE` inches at :data:`DPI` dpi).

    Raises
    ------
    PlotDependencyError
        matplotlib is not installed (an :class:`ImportError`).
    InputError
        No ``report.json`` in ``workdir``, an unreadable report or solve report, or bad
        parameters.
    StoreNotFoundError
        A store named by the report does not exist.
    StoreMismatchError
        The kernel store was not computed from the report's dataset store.
    IncompleteStoreError
        The kernel store has tiles left (the run was stopped by ``max_tiles``).
    StoreError
        A store or its solve results cannot be read.

    Examples
    --------
    >>> from deqntk_dist.figures import write_figures
    >>> paths = write_figures("work", sample=256)  # doctest: +SKIP
    >>> [p.name for p in paths]  # doctest: +SKIP
    ['gram.png', 'spectrum.png', 'ridge.png', 'classes.png', 'figures.json']
    """
    sample = _check_int("sample", sample, 1)
    seed = _check_int("seed", seed, 0)
    exact_limit = _check_int("exact_limit", exact_limit, 0)
    top_k = _check_int("top_k", top_k, 1)
    band_bytes = _check_int("band_bytes", band_bytes, 1)
    hold_bytes = _check_int("hold_bytes", hold_bytes, 0)
    if kernel is not None and kernel not in ("ntk", "nngp"):
        raise InputError(f"kernel must be 'ntk', 'nngp' or None, got {kernel!r}")
    Figure, Canvas = _matplotlib()

    work = Path(workdir).expanduser().absolute()
    run = _load_run(work, kernel)
    out = Path(out_dir).expanduser().absolute() if out_dir is not None else work
    out.mkdir(parents=True, exist_ok=True)
    ks, nt = run.store, run.store.n_train
    band = _chunk_rows(ks, run.kernel)
    written: list[Path] = []
    record: dict[str, Any] = {
        "workdir": str(work),
        "kernel_store": ks.path,
        "kernel": run.kernel,
        "pixels": list(PIXELS),
        "dpi": DPI,
        "figures": {},
    }

    # 1. sampled Gram block, ordered by class
    train_labels = run.dataset.y[:nt]
    rows = _sample_rows(train_labels, sample, band, seed)
    block = _read_sampled(ks, run.kernel, rows, band)
    fig = _new_figure(Figure, Canvas)
    marks = _gram_figure(fig, block, train_labels[rows], run.kernel, nt)
    written.append(_save(fig, out / "gram.png"))
    record["figures"]["gram"] = {
        "file": "gram.png", "n_train": nt, "sample": sample, "seed": seed,
        "rows": rows.tolist(), **marks,
    }  # fmt: skip

    # 2. spectrum of the train block
    vals, method = _train_spectrum(
        ks, run.kernel, exact_limit=exact_limit, top_k=top_k, band=band,
        band_bytes=band_bytes, hold_bytes=hold_bytes,
    )  # fmt: skip
    fig = _new_figure(Figure, Canvas)
    _spectrum_figure(fig, vals, method, run.kernel, nt)
    written.append(_save(fig, out / "spectrum.png"))
    record["figures"]["spectrum"] = {
        "file": "spectrum.png", "method": method, "n": nt, "eigenvalues": _finite(vals),
        "largest": float(vals[0]) if vals.size else None,
    }  # fmt: skip
    record["solve_eigenvalues"] = None  # the solve report records no spectrum

    # 3. validation curve
    fig = _new_figure(Figure, Canvas)
    curve = _ridge_figure(fig, run.solve)
    written.append(_save(fig, out / "ridge.png"))
    record["figures"]["ridge"] = {"file": "ridge.png", **curve}

    # 4. per-class test accuracy
    data = _class_accuracy(run)
    if data is None:
        record["figures"]["classes"] = {"file": None, "skipped": "no test rows"}
    else:
        fig = _new_figure(Figure, Canvas)
        _classes_figure(fig, data)
        written.append(_save(fig, out / "classes.png"))
        record["figures"]["classes"] = {"file": "classes.png", **data}

    record["files"] = [p.name for p in written]
    path = out / "figures.json"
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    written.append(path)
    return written
