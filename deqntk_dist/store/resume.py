"""Checks and repairs before ``compute`` resumes a store, run before any cluster starts."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import StoreError, StoreMismatchError
from .chunkio import byte_view, crc32
from .core import KernelStore
from .dataset import DatasetStore

__all__ = ["MAX_CHUNK_BYTES", "prepare_resume"]

#: Largest chunk a resume writes; stores made by older software with a tile far larger
#: than n pad every chunk to tile x tile.
MAX_CHUNK_BYTES = 2 * 2**30


def prepare_resume(
    ks: KernelStore,
    dataset: DatasetStore,
    *,
    recompute_mismatched: bool = False,
    say: Callable[[str], None] = print,
) -> None:
    """Make a writable store ready for its missing tiles, or refuse it with a clear error.

    In order: the kernel arrays' metadata must read and the store must be writable
    (probed); arrays introduced since an older store
    was made are added; the labels must match the dataset's (legacy stores get their
    checksum, labels changed on disk are restored from the dataset store, whose fingerprint
    the store matches); finished tiles and self-covariance chunks computed under another
    identity than the attrs claim are refused, or with ``recompute_mismatched`` marked not
    done so that they are computed again; a shortage of disk space is announced.

    Raises
    ------
    StoreError
        Not writable; a legacy chunk too large to write.
    StoreMismatchError
        Tiles computed under another identity (and ``recompute_mismatched`` is false).
    """
    for name in ks.kernels:
        ks.array(name)  # a StoreError when its metadata cannot be read
    ks.check_writable()
    chunk = ks.tile * ks.tile * ks.dtype.itemsize
    if ks.tile > ks.n and chunk > MAX_CHUNK_BYTES and not ks.is_complete():
        raise StoreError(
            f"kernel store {ks.path} was made by older software with tile {ks.tile} > n = "
            f"{ks.n}: every chunk is padded to {ks.tile} x {ks.tile} ({chunk / 2**30:.3g} GiB); "
            f"delete it and compute again (a tile is now at most n)"
        )
    added = [a for a in ks.add_missing_arrays() if a != "leases"]
    if added:
        say(
            f"deqntk: {ks.path}: made by older software; added {', '.join(added)} (its "
            "finished tiles keep no identity digest)"
        )
    _check_labels(ks, dataset, say)
    foreign, _ = ks.identity_check()
    aux_foreign, _ = ks.aux_identity_check()
    if foreign or aux_foreign:
        what = f"{len(foreign)} finished tiles" + (
            f" and {len(aux_foreign)} self-covariance row chunks" if aux_foreign else ""
        )
        if not recompute_mismatched:
            shown = ", ".join(map(str, foreign[:5]))
            raise StoreMismatchError(
                f"kernel store {ks.path}: {what} were computed under another identity than "
                "its attrs claim (the spec, dataset, tile, dtype, kernels or options in its "
                f"zarr.json changed after they were written{', e.g. ' + shown if shown else ''}"
                "); restore the attrs, delete the store, or pass "
                "recompute_mismatched=True to compute them again"
            )
        say(f"deqntk: {ks.path}: {what} were computed under another identity: recomputing")
        ks.invalidate(tiles=foreign, aux_chunks=aux_foreign)
    _check_space(ks, say)


def _check_labels(ks: KernelStore, dataset: DatasetStore, say) -> None:
    labels = ks._node("labels")
    want = np.ascontiguousarray(dataset.y, dtype="<i8")
    crc = crc32(byte_view(want))
    try:
        have = ks.labels()
    except StoreError:
        have = None
    recorded = labels.attrs.get("crc32")
    if have is not None and np.array_equal(have, want):
        if recorded != crc:
            labels.attrs["crc32"] = crc
        return
    labels[...] = want
    labels.attrs["crc32"] = crc
    say(f"deqntk: {ks.path}: labels changed on disk; restored from {dataset.path}")


def _check_space(ks: KernelStore, say) -> None:
    missing = ks.missing_tiles()
    need = sum(1 if i == j else 2 for i, j in missing) * ks.tile**2 * ks.dtype.itemsize
    need *= len(ks.kernels)
    free = ks.loc.free_bytes()
    if free is not None and need > free:
        say(
            f"deqntk: warning: {free / 1e9:.3g} GB free where {ks.path} is, the "
            f"{len(missing)} missing tiles need {need / 1e9:.3g} GB"
        )
