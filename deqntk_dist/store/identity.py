"""Identity digests: what a kernel store's tiles were computed under.

A store's *identity* is everything that determines its values: the normalised spec (fields
added by later versions at their defaults, so old and new spellings of one spec agree), the
dataset fingerprint and sizes, the tile side, the dtype, the kernels and the kernel options.
Every tile writes into the ledger a digest of that identity and of its own geometry
(:func:`tile_digest`), every CDEQ self-covariance chunk one of the identity and its rows
(:func:`aux_digest`); ``verify`` and ``compute`` compare them with the digest of what the
store's attrs claim now, so a store whose attrs were edited after its tiles were written
(or a resume that mixed two kernels) is reported, never silently kept.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from ..errors import DeqntkError
from ..spec import spec_from_dict

__all__ = [
    "IDENTITY_VERSION",
    "aux_digest",
    "identity_digest",
    "kernels_cover",
    "normal_spec",
    "store_identity",
    "tile_digest",
]

#: Version of the digest recipe (part of every digest).
IDENTITY_VERSION = 1


def kernels_cover(stored, asked) -> bool:
    """The one rule for kernels: a store serves a request for any subset of its kernels
    (``asked`` None means "whatever the store has").  A resume computes the store's own
    kernels, so a tile marked done always holds every kernel the store declares."""
    return asked is None or set(asked) <= set(stored or ())


def normal_spec(data: Any) -> Any:
    """A stored spec dict with the fields added since (e.g. ``hflip``) at their defaults."""
    try:
        return spec_from_dict(data).to_dict()
    except (DeqntkError, TypeError, AttributeError, KeyError):
        return data


def _canonical(value: Any) -> Any:
    """JSON-ready value in which equal settings are spelled alike (every number a float,
    tuples as lists), so ``1`` and ``1.0`` give one digest, as they compare equal."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    return str(value)


def store_identity(attrs: dict) -> dict[str, Any]:
    """The identity of a store from its attrs (or from the attrs a new store will get)."""
    ds = attrs.get("dataset") or {}
    return {
        "spec": normal_spec(attrs.get("spec")),
        "dataset": {k: ds.get(k) for k in ("fingerprint", "n", "n_train")},
        "tile": attrs.get("tile"),
        "dtype": attrs.get("dtype"),
        "kernels": list(attrs.get("kernels") or []),
        "options": dict(attrs.get("options") or {}),
    }


def identity_digest(identity: dict) -> str:
    """blake2b-128 hex digest of an identity (canonical JSON)."""
    text = json.dumps(
        {"v": IDENTITY_VERSION, **_canonical(identity)}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _digest64(text: str) -> int:
    value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return value or 1  # 0 is the ledger's fill value: "written without a digest"


def tile_digest(identity: str, i: int, j: int, rows: tuple, cols: tuple) -> int:
    """uint64 ledger digest of tile ``(i, j)`` (rows, cols: its ranges) under ``identity``
    (an :func:`identity_digest`); never 0."""
    return _digest64(f"tile:{identity}:{i}:{j}:{rows[0]}:{rows[1]}:{cols[0]}:{cols[1]}")


def aux_digest(identity: str, start: int, stop: int) -> int:
    """uint64 digest of the self-covariance rows ``[start, stop)`` under ``identity``."""
    return _digest64(f"self_cov:{identity}:{start}:{stop}")
