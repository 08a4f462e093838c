"""The report of a regression: :class:`SolveReport` (frozen), written as JSON."""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SolveReport"]


@dataclass(frozen=True)
class SolveReport:
    """Outcome of :func:`kernel_ridge` / :func:`solve_store` (``to_dict`` is the JSON report).

    ``alpha`` (n_train, n_classes) and ``predictions`` (n_test, n_classes) are float64;
    ``val_rows`` are the held-out training rows (positions in the train block).
    """

    kernel: str | None
    method: str
    method_requested: str
    method_reason: str
    ridge: float
    shift: float
    ridges: list
    val_accuracy: list | None
    val_mse: list | None
    accuracy: float | None
    train_accuracy: float
    n_train: int
    n_fit: int
    n_val: int
    n_test: int
    n_classes: int
    residual: float
    iterations: int
    converged: bool
    tol: float
    memory_limit: int
    peak_rss: int
    seconds: float
    stages: dict
    detail: dict
    store: str | None = None
    incomplete: bool = False
    alpha: np.ndarray | None = field(default=None, repr=False)
    predictions: np.ndarray | None = field(default=None, repr=False)
    val_rows: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("alpha", "predictions", "val_rows"):
            d.pop(key)
        return json.loads(json.dumps(d, default=_jsonable))

    def write_json(self, path) -> None:
        """Write :meth:`to_dict` to ``path`` atomically (temporary file + rename)."""
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            os.replace(tmp, p)
        finally:
            if tmp.exists():
                tmp.unlink()


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(pred, axis=1) == labels)) if labels.size else math.nan
