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
   example); an all-zero example stays zero.

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

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Apply the fitted steps.

        Parameters
        ----------
        x : ndarray, shape (n, *feature_shape)

        Returns
        -------
        ndarray of float64, same shape as ``x``
        """
        shape = x.shape
        z = np.asarray(x, dtype=np.float64).reshape(shape[0], -1) * self.input_scale
        if self.mean is not None:
            z = z - self.mean
        if self.std is not None:
            z = z / self.std
        if self.whitening is not None:
            z = (z - self.zca_mean) @ self.whitening
        if "unit-norm" in self.config.steps:
            norms = np.sqrt(np.einsum("ij,ij->i", z, z))
            scale = np.divide(
                np.sqrt(z.shape[1]), norms, out=np.zeros_like(norms), where=norms > 0
            )
            z = z * scale[:, None]
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
    mean = std = whitening = zca_mean = eigenvalues = None
    steps = config.steps
    if "center" in steps or "standardize" in steps:
        mean = z.mean(axis=0)
        z = z - mean
    if "standardize" in steps:
        std = z.std(axis=0)
        std[std <= 1e-12 * max(1.0, float(std.max(initial=0.0)))] = 1.0
        z = z / std
    if "zca" in steps:
        zca_mean = z.mean(axis=0)
        zc = z - zca_mean
        cov = (zc.T @ zc) / zc.shape[0]
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
