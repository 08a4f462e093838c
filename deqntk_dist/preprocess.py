"""Preprocessing as in kernel-method papers, fitted on the training rows only.

Steps, always applied in this order (a step not asked for is skipped):

1. ``scale``: integer pixel data are divided by 255 (implicit for uint8 inputs).
2. ``center``: subtract the per-feature training mean;
   ``standardize``: subtract the mean and divide by the per-feature training standard
   deviation (features constant on the training rows are only centred).
3. ``zca``: regularised ZCA whitening ``W = U diag((s + eps mean(s))^-1/2) U^T`` of the
   training covariance ``U diag(s) U^T`` (``eps`` is the strength; images are whitened
   over all H*W*C features and keep their shape).
4. ``unit-norm``: each example scaled to Euclidean norm ``sqrt(d)`` (d = features per
   example); an all-zero example stays zero.  Examples whose squared norm would overflow or
   underflow float64 (entries beyond ~1e154 or below ~1e-136) are divided by their largest
   magnitude first, so the result is the same as for the data scaled into range.

Statistics are computed without overflow where the result is representable (a mean or
standard deviation of entries near 1e308).  A step whose output is not representable
(non-finite: e.g. centring entries of opposite sign near 1e308, or a ZCA covariance of entries
beyond ~1e154 without ``standardize`` first) raises :class:`~deqntk_dist.errors.DatasetError`
naming the step and the row: a dataset is never silently turned into zeros or infinities.

The fitted statistics are kept on :class:`FittedPreprocessing`; their description (steps,
parameters, the rows they were fitted on and a SHA-256 digest of the fitted arrays) goes
into the dataset store's attrs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DatasetError, InputError

__all__ = [
    "STEPS",
    "FittedPreprocessing",
    "PreprocessConfig",
    "balanced_subset",
    "fit_preprocessing",
    "parse_steps",
    "select_rows",
]

#: Preprocessing steps in the order they are applied.
STEPS = ("center", "standardize", "zca", "unit-norm")


def parse_steps(text: str | None) -> tuple[str, ...]:
    """``"center,unit-norm"`` -> ``("center", "unit-norm")``; ``"none"``/``""`` -> ``()``."""
    if text is None or text.strip().lower() in ("", "none"):
        return ()
    steps = tuple(s.strip().lower().replace("_", "-") for s in text.split(",") if s.strip())
    return PreprocessConfig(steps=steps).steps


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """Which preprocessing steps to apply and their parameters.

    Parameters
    ----------
    steps : tuple of str
        Subset of ``STEPS`` (any order; applied in canonical order). ``center`` and
        ``standardize`` are exclusive (standardize centres too).
    zca_strength : float
        ZCA regulariser ``eps >= 0``, relative to the mean eigenvalue of the covariance.
    """

    steps: tuple[str, ...] = ("center", "unit-norm")
    zca_strength: float = 0.1

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        unknown = [s for s in steps if s not in STEPS]
        if unknown:
            raise InputError(
                f"preprocess steps must be among {', '.join(STEPS)}, got {', '.join(unknown)}"
            )
        if "center" in steps and "standardize" in steps:
            raise InputError(
                "preprocess steps 'center' and 'standardize' are exclusive (standardize also "
                f"centres), got {', '.join(steps)}"
            )
        object.__setattr__(self, "steps", tuple(s for s in STEPS if s in steps))
        eps = self.zca_strength
        if (
            isinstance(eps, bool)
            or not isinstance(eps, int | float)
            or not eps >= 0
            or not np.isfinite(eps)
        ):
            raise InputError(f"zca_strength must be a finite number >= 0, got {eps!r}")
        object.__setattr__(self, "zca_strength", float(eps))

    def to_dict(self) -> dict[str, Any]:
        """Steps, and the ZCA strength when ZCA is one of them."""
        out: dict[str, Any] = {"steps": list(self.steps)}
        if "zca" in self.steps:
            out["zca_strength"] = self.zca_strength
        return out


@dataclass(frozen=True)
class FittedPreprocessing:
    """Statistics fitted on the training rows; :meth:`transform` applies them to any rows.

    Attributes
    ----------
    config : PreprocessConfig
    input_scale : float
        Factor applied first (1/255 for integer pixel data, else 1).
    mean : ndarray, shape (D,) or None
    std : ndarray, shape (D,) or None
        Divisors of ``standardize`` (1 where a feature is constant).
    whitening : ndarray, shape (D, D) or None
        Symmetric ZCA matrix.
    zca_mean : ndarray, shape (D,) or None
        Mean removed before whitening (of the data after steps 1-2).
    n_fit : int
        Number of training rows the statistics come from.
    """

    config: PreprocessConfig
    input_scale: float
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    whitening: np.ndarray | None = None
    zca_mean: np.ndarray | None = None
    n_fit: int = 0
    eigenvalues: np.ndarray | None = field(default=None, repr=False)

    def transform(self, x: np.ndarray, *, first_row: int = 0) -> np.ndarray:
        """Apply the fitted steps.

        Parameters
        ----------
        x : ndarray, shape (n, *feature_shape)
        first_row : int
            Row number of ``x[0]`` in the caller's numbering (used in error messages).

        Returns
        -------
        ndarray of float64, same shape as ``x``

        Raises
        ------
        DatasetError
            A step's output is not representable in float64 (non-finite) for some row.
        """
        shape = x.shape
        z = np.asarray(x, dtype=np.float64).reshape(shape[0], -1) * self.input_scale
        _check_finite(z, "the input", first_row)
        with np.errstate(over="ignore", invalid="ignore"):
            if self.mean is not None:
                z = z - self.mean
                _check_finite(z, "center" if self.std is None else "standardize", first_row)
            if self.std is not None:
                z = z / self.std
                _check_finite(z, "standardize", first_row)
            if self.whitening is not None:
                assert self.zca_mean is not None  # fitted together with the whitening
                z = (z - self.zca_mean) @ self.whitening
                _check_finite(z, "zca", first_row)
        if "unit-norm" in self.config.steps:
            z = _unit_norm(z)
            _check_finite(z, "unit-norm", first_row)
        return z.reshape(shape)

    def digest(self) -> str:
        """SHA-256 over the fitted arrays (to tell two fits apart in the store attrs)."""
        h = hashlib.sha256(repr((self.config.to_dict(), self.input_scale)).encode())
        for a in (self.mean, self.std, self.whitening, self.zca_mean):
            h.update(b"-" if a is None else np.ascontiguousarray(a, dtype="<f8").tobytes())
        return h.hexdigest()

    def to_attrs(self) -> dict[str, Any]:
        """JSON-serialisable description for the dataset store's ``preprocessing`` attr."""
        out = {
            **self.config.to_dict(),
            "input_scale": self.input_scale,
            "fitted_on": "train",
            "n_fit": self.n_fit,
            "digest": self.digest(),
        }
        if self.eigenvalues is not None:
            s = self.eigenvalues
            out["zca_eigenvalue_max"] = float(s.max())
            out["zca_eigenvalue_mean"] = float(s.mean())
        return out


#: Squared norms outside [_SQ_MIN, _SQ_MAX] may have lost digits to underflow (entries
#: below ~1e-136 square to subnormals) or overflowed: those rows are normalised by their
#: largest magnitude first.
_SQ_MIN = 2.0**-900
_SQ_MAX = 2.0**1000


def _check_finite(z: np.ndarray, step: str, first_row: int = 0) -> None:
    """DatasetError naming ``step`` and the first row of ``z`` that holds NaN or inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = z.sum()
    if np.isfinite(total) or np.isfinite(z).all():  # a finite sum proves every entry finite
        return
    row = int(np.argwhere(~np.isfinite(z))[0, 0])
    if step == "the input":
        raise DatasetError(f"the input holds NaN or inf in row {first_row + row}")
    raise DatasetError(
        f"preprocessing step {step!r} overflows float64 (gives inf or NaN) in row "
        f"{first_row + row}: the data are too large for it to be representable; rescale the "
        "data (e.g. divide by its largest absolute value)"
    )


def _unit_norm(z: np.ndarray) -> np.ndarray:
    """Rows scaled to Euclidean norm sqrt(d) without overflow or underflow (zero rows stay)."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        sq = np.einsum("ij,ij->i", z, z)
    norms = np.sqrt(sq)
    scale = np.divide(np.sqrt(z.shape[1]), norms, out=np.zeros_like(norms), where=norms > 0)
    out = z * scale[:, None]
    careful = np.flatnonzero(~((sq >= _SQ_MIN) & (sq <= _SQ_MAX)))
    if careful.size:
        rows = z[careful]
        peak = np.max(np.abs(rows), axis=1)
        nonzero = peak > 0
        u = rows[nonzero] / peak[nonzero, None]  # largest magnitude 1: no over/underflow
        rows[nonzero] = u * (np.sqrt(z.shape[1]) / np.sqrt(np.einsum("ij,ij->i", u, u)))[:, None]
        rows[~nonzero] = 0.0
        out[careful] = rows
    return out


def _column_scale(z: np.ndarray) -> np.ndarray:
    """Largest magnitude per column (1 where a column is all zero)."""
    g = np.maximum(z.max(axis=0), -z.min(axis=0))
    g[g == 0] = 1.0
    return g


def _mean(z: np.ndarray) -> np.ndarray:
    """Per-column mean; entries near 1e308 are scaled first so the sum cannot overflow."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean = z.mean(axis=0)
    if not np.isfinite(mean).all():
        g = _column_scale(z)
        mean = (z / g).mean(axis=0) * g
    return mean


def _std(z: np.ndarray) -> np.ndarray:
    """Per-column standard deviation; columns with entries beyond 2^±400 (whose squares over-
    or underflow) are scaled to 1 first."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        std = z.std(axis=0)
    g = _column_scale(z)
    cols = np.flatnonzero(~((g >= 2.0**-400) & (g <= 2.0**400)))
    if cols.size:
        std[cols] = (z[:, cols] / g[cols]).std(axis=0) * g[cols]
    return std


def fit_preprocessing(config: PreprocessConfig, x_train: np.ndarray) -> FittedPreprocessing:
    """Fit the preprocessing statistics on the training rows.

    Parameters
    ----------
    config : PreprocessConfig
    x_train : ndarray, shape (n, *feature_shape)
        Raw training rows (uint8 pixels or real values).

    Returns
    -------
    FittedPreprocessing
    """
    if not isinstance(config, PreprocessConfig):
        raise InputError(f"config must be a PreprocessConfig, got {type(config).__name__}")
    x_train = np.asarray(x_train)
    if x_train.ndim < 2 or x_train.shape[0] < 2:
        raise InputError(
            f"x_train must have shape (n, ...) with n >= 2 rows to fit on, got {x_train.shape}"
        )
    scale = 1.0 / 255.0 if np.issubdtype(x_train.dtype, np.integer) else 1.0
    z = x_train.reshape(x_train.shape[0], -1).astype(np.float64) * scale
    _check_finite(z, "the input")
    mean = std = whitening = zca_mean = eigenvalues = None
    steps = config.steps
    if "center" in steps or "standardize" in steps:
        mean = _mean(z)
        with np.errstate(over="ignore", invalid="ignore"):
            z = z - mean
        _check_finite(z, "standardize" if "standardize" in steps else "center")
    if "standardize" in steps:
        std = _std(z)
        # constant features (relative to the largest spread: scale invariant) are only centred
        top = float(std.max(initial=0.0))
        std[std <= 1e-12 * (max(1.0, top) if 2.0**-400 <= top else top)] = 1.0
        z = z / std
    if "zca" in steps:
        zca_mean = _mean(z)
        with np.errstate(over="ignore", invalid="ignore"):
            zc = z - zca_mean
        _check_finite(zc, "zca")
        # entries beyond 2^±400 are scaled to 1 first: their squares over- or underflow
        g = float(np.max(np.abs(zc), initial=0.0))
        g = 1.0 if g == 0 or 2.0**-400 <= g <= 2.0**400 else g
        y = zc if g == 1.0 else zc / g
        cov = (y.T @ y) / y.shape[0]
        s, U = np.linalg.eigh((cov + cov.T) / 2)
        s = np.clip(s, 0.0, None)
        reg = config.zca_strength * float(s.mean())
        if np.any(s + reg <= 0):
            raise DatasetError(
                "zca with zca_strength=0 needs a full-rank training covariance; this one has "
                f"{int(np.sum(s <= 0))} zero eigenvalue(s) (D={s.size}, n={zc.shape[0]}): "
                "use zca_strength > 0"
            )
        whitening = (U / np.sqrt(s + reg)) @ U.T
        whitening = (whitening + whitening.T) / 2
        eigenvalues = s
        if g != 1.0:
            whitening = whitening / g  # cov = g^2 cov(y): same eigenvectors, s scaled by g^2
            with np.errstate(over="ignore", under="ignore"):
                eigenvalues = s * g * g
            if not np.isfinite(eigenvalues).all() or not np.isfinite(whitening).all():
                raise DatasetError(
                    "preprocessing step 'zca': the training covariance overflows float64 "
                    f"(largest magnitude after the previous steps {g:.3g}); use 'standardize' "
                    "before 'zca' or rescale the data"
                )
    return FittedPreprocessing(
        config=config,
        input_scale=scale,
        mean=mean,
        std=std,
        whitening=whitening,
        zca_mean=zca_mean,
        n_fit=int(x_train.shape[0]),
        eigenvalues=eigenvalues,
    )


# ---------------------------------------------------------------------------------- subsetting
def _quotas(available: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class counts summing to n, as equal as availability allows (water filling)."""
    k = available.size
    quota = np.zeros(k, dtype=np.int64)
    remaining = n
    open_ = available > 0
    while remaining > 0:
        idx = np.flatnonzero(open_ & (quota < available))
        share, extra = divmod(remaining, idx.size)
        give = np.full(idx.size, share, dtype=np.int64)
        give[rng.permutation(idx.size)[:extra]] += 1
        give = np.minimum(give, available[idx] - quota[idx])
        quota[idx] += give
        remaining -= int(give.sum())
    return quota


def balanced_subset(y: np.ndarray, n: int | None, *, seed: int = 0, what: str = "n") -> np.ndarray:
    """Class-balanced random subset of row indices, reproducible from the seed.

    Each class gets ``n // k`` rows (the remainder goes to classes drawn with the seed);
    a class with too few rows gives all it has and the others make up the difference.

    Parameters
    ----------
    y : ndarray of int, shape (m,)
    n : int or None
        Number of rows; ``None`` means all ``m`` rows.
    seed : int
    what : str
        Parameter name used in error messages (e.g. ``"n_train"``).

    Returns
    -------
    ndarray of int64, shape (n,), sorted ascending
    """
    y = np.asarray(y)
    m = y.shape[0]
    if n is None or n == m:
        return np.arange(m, dtype=np.int64)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise InputError(f"{what} must be a positive integer, got {n!r}")
    if n > m:
        raise InputError(f"{what} must be <= the {m} rows available, got {n}")
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(y, return_inverse=True)
    available = np.bincount(inverse, minlength=classes.size)
    quota = _quotas(available, int(n), rng)
    picked = [
        rng.choice(np.flatnonzero(inverse == c), size=int(q), replace=False)
        for c, q in enumerate(quota)
        if q
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def select_rows(raw, n_train: int | None, n_test: int | None, *, seed: int = 0):
    """Class-balanced train/test subsets of a :class:`~deqntk_dist.data.RawDataset`.

    Without a separate test split (npz ``x``/``y``), ``n_test`` rows (default a fifth)
    are drawn class-balanced as the test set and the training rows from the rest.

    Returns
    -------
    x_train, y_train, x_test, y_test : ndarrays
    selection : dict
        The seed and the index digests, for the store attrs.
    """
    x, y = raw.x_train, raw.y_train
    if raw.x_test is None:
        n_test_eff = max(1, y.shape[0] // 5) if n_test is None else n_test
        test_idx = balanced_subset(y, n_test_eff, seed=seed + 1, what="n_test")
        rest = np.setdiff1d(np.arange(y.shape[0]), test_idx)
        if rest.size == 0:
            raise InputError(f"n_test must leave training rows, got {n_test_eff} of {y.shape[0]}")
        train_idx = rest[balanced_subset(y[rest], n_train, seed=seed, what="n_train")]
        xs, ys, xt, yt = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
        split = "drawn"
    else:
        train_idx = balanced_subset(y, n_train, seed=seed, what="n_train")
        test_idx = balanced_subset(raw.y_test, n_test, seed=seed + 1, what="n_test")
        xs, ys = x[train_idx], y[train_idx]
        xt, yt = raw.x_test[test_idx], raw.y_test[test_idx]
        split = "given"

    def _digest(idx):
        return hashlib.sha256(np.ascontiguousarray(idx, dtype="<i8").tobytes()).hexdigest()

    selection = {
        "seed": seed,
        "split": split,
        "class_balanced": True,
        "train_indices_sha256": _digest(train_idx),
        "test_indices_sha256": _digest(test_idx),
    }
    return xs, ys, xt, yt, selection
