"""``migrate``: rewrite a layout-1 kernel store as layout 2 (one shard and one ledger record
per tile), resumably, and verify the result.

Every finished tile of the old store is read once, checked against its recorded crc32 and
written as a layout-2 tile with the ledger values it had (residual, iterations, time,
finish time and identity digest: a tile never claims an identity it was not computed
under).  Tiles that are not done, or whose bytes no longer match their checksum, stay
missing in the new store, for ``compute`` to finish.  CDEQ self-covariances and solver
results are copied.  A migration that is stopped resumes where it stopped: tiles whose
record exists in the new store are skipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, StoreError
from .chunkio import byte_view, crc32
from .core import KERNEL_FORMAT_VERSION, KernelStore, _software, open_kernel_store
from .create import make_kernel_store
from .identity import normal_spec
from .location import Location
from .shards import DEFAULT_CHUNK, inner_chunk
from .verify import verify_kernel_store

__all__ = ["MigrateReport", "migrate_kernel_store"]


@dataclass
class MigrateReport:
    """What :func:`migrate_kernel_store` did."""

    source: str
    dest: str
    tiles_total: int
    tiles_copied: int = 0
    tiles_done_before: int = 0
    tiles_skipped: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    seconds: float = 0.0
    backup: str | None = None


def migrate_kernel_store(
    source,
    dest=None,
    *,
    chunk: int = DEFAULT_CHUNK,
    say: Callable[[str], None] = print,
) -> MigrateReport:
    """Rewrite layout-1 store ``source`` as layout 2.

    Parameters
    ----------
    source : str, os.PathLike or Location
        A layout-1 kernel store.
    dest : str, os.PathLike or Location, optional
        Where the layout-2 store goes.  Default (local stores only): in place; the new
        store is built at ``<source>.v2-partial`` and, once it verifies, ``source`` is
        renamed to ``<source>.v1`` (kept: delete it when satisfied) and the new store takes
        its name.
    chunk : int
        Side of the new store's inner chunks (:func:`~.shards.inner_chunk`).

    Returns
    -------
    MigrateReport
        ``problems`` lists what ``verify`` found in the new store besides tiles that were
        not done in the old one; the in-place swap happens only when it is empty.

    Raises
    ------
    InputError
        ``source`` is not layout 1, or no ``dest`` for a store that is not local.
    StoreError
        Unreadable source, unwritable destination.
    """
    t0 = time.perf_counter()
    src = open_kernel_store(source)
    if src.format_version >= KERNEL_FORMAT_VERSION:
        raise InputError(
            f"source must be a layout-1 kernel store, got layout {src.format_version}: {src.path}"
        )
    in_place = dest is None
    if in_place:
        if not src.loc.is_local:
            raise InputError(f"dest is required for a store that is not local: {src.path}")
        dest = Location.parse(src.loc.url + ".v2-partial")
    dst_loc = Location.parse(dest, param="dest")
    if dst_loc.url == src.loc.url:
        raise InputError(f"dest must differ from source, got {dst_loc}")
    want = {
        **src.attrs,
        "spec": normal_spec(src.attrs.get("spec")),
        "format_version": KERNEL_FORMAT_VERSION,
        "chunk": inner_chunk(src.tile, chunk),
        "software": _software(),
    }
    aux_shape, aux_rows = None, 1024
    if src.has("aux/self_cov"):
        sc = src._node("aux/self_cov")
        aux_shape, aux_rows = tuple(sc.shape[1:3]), int(sc.chunks[0])
    dst = make_kernel_store(dst_loc, src.plan, want, src.labels(), aux_shape, aux_rows)
    if dst.format_version != KERNEL_FORMAT_VERSION:
        raise StoreError(f"dest {dst.path} exists with layout {dst.format_version}")
    rep = MigrateReport(source=src.path, dest=dst.path, tiles_total=src.plan.n_tiles)
    led = src.ledger()
    have = dst._ledger_impl.done_grid()
    for i, j in src.plan.tiles():
        if have[i, j]:
            rep.tiles_done_before += 1
            continue
        if not led["done"][i, j]:
            continue
        values = _checked_tile(src, led, i, j)
        if values is None:
            rep.tiles_skipped.append((i, j))
            continue
        ident = int(led["identity"][i, j]) if "identity" in led else 0
        dst.write_tile(
            i,
            j,
            values,
            max_residual=float(led["max_residual"][i, j]),
            iterations=int(led["iterations"][i, j]),
            seconds=float(led["seconds"][i, j]),
            finished=float(led["finished"][i, j]),
            identity=ident,
        )
        rep.tiles_copied += 1
    if rep.tiles_skipped:
        say(
            f"deqntk: {len(rep.tiles_skipped)} tiles of {src.path} no longer match their "
            f"checksum and were not copied (compute will redo them): {rep.tiles_skipped[:5]}"
        )
    _copy_aux(src, dst)
    _copy_tree(src.loc, dst.loc, "results")
    notes: list[str] = []
    problems = verify_kernel_store(dst.loc, notes=notes)
    rep.problems = [p for p in problems if " tiles not done: " not in p]
    rep.seconds = time.perf_counter() - t0
    if in_place and not rep.problems:
        backup = src.loc.url + ".v1"
        if os.path.exists(backup):
            raise StoreError(f"cannot keep the old store as {backup}: it exists; move it away")
        os.rename(src.loc.url, backup)
        os.rename(dst.loc.url, src.loc.url)
        rep.dest, rep.backup = src.path, backup
    return rep


def _checked_tile(src: KernelStore, led: dict, i: int, j: int) -> dict | None:
    """The tile's values per kernel, None when its bytes no longer match its checksum."""
    r0, r1 = src.plan.bounds(i)
    c0, c1 = src.plan.bounds(j)
    values, crc = {}, 0
    try:
        for name in src.kernels:
            v = np.ascontiguousarray(src.array(name)[r0:r1, c0:c1])
            crc = crc32(byte_view(v), crc)
            values[name] = v
    except Exception:
        return None
    return values if crc == int(led["checksum"][i, j]) else None


def _copy_aux(src: KernelStore, dst: KernelStore) -> None:
    """Self-covariance row chunks that are done and match their checksum (and identity)."""
    if not src.has("aux/self_cov"):
        return
    done = np.asarray(src._node("aux/self_cov_done")[...])
    sums = (
        np.asarray(src._node("aux/self_cov_checksum")[...])
        if src.has("aux/self_cov_checksum")
        else None
    )
    foreign, _ = src.aux_identity_check()
    todo = {(a, b) for a, b in dst.self_covariance_missing()}
    for k, a, b in src.aux_chunks():
        if not done[k] or k in foreign or (a, b) not in todo:
            continue
        rows = np.ascontiguousarray(src.self_covariance_rows(a, b), dtype="<f8")
        if sums is not None and int(sums[k]) and crc32(byte_view(rows)) != sums[k]:
            continue
        dst.write_self_covariance(a, b, rows)


def _copy_tree(src: Location, dst: Location, key: str) -> None:
    """Every object under ``key`` (e.g. solver results), byte for byte."""
    for name in src.list(key):
        dst.put(f"{key}/{name}", src.get(f"{key}/{name}") or b"")
    for name in src.list(key, dirs=True):
        if src.get(f"{key}/{name}") is None:  # a directory
            _copy_tree(src, dst, f"{key}/{name}")
