"""``verify``: check a kernel store's ledger, identity digests, chunks, checksums, symmetry,
labels and CDEQ self-covariances."""

from __future__ import annotations

import numpy as np

from ..errors import StoreError
from .chunkio import byte_view, crc32
from .core import KernelStore, open_kernel_store
from .ledger import RecordLedger
from .shards import decode_shard

__all__ = ["verify_kernel_store"]

#: Tiles named in one summary line.
_SHOWN = 10


def _some(tiles: list) -> str:
    shown = ", ".join(map(str, tiles[:_SHOWN]))
    return shown + ("" if len(tiles) <= _SHOWN else f" (first {_SHOWN} of {len(tiles)})")


def verify_kernel_store(path, *, notes: list[str] | None = None) -> list[str]:
    """Check a kernel store; return a list of problems (empty when it is sound).

    Checks: the kernel arrays' and the labels' metadata read; the labels match their
    recorded crc32; the ledger is consistent (both halves of every tile agree, done tiles
    have a finite residual and time, a checksum entry); every done tile carries the
    identity digest of the spec, dataset, tile, dtype, kernels and options the attrs claim
    (:mod:`.identity`); every done tile's chunk and mirror chunk exist, decode, match their
    recorded crc32, are finite and are exact transposes (diagonal tiles exactly symmetric);
    CDEQ self-covariance chunks are done, finite, non-negative and match their checksum
    and identity; every tile is done.

    Parameters
    ----------
    path : str or Path
    notes : list, optional
        Receives remarks that are not problems, e.g. that the store was written by older
        software without identity digests (its tiles cannot be tied to its attrs).

    Raises
    ------
    StoreError
        Not a kernel store (missing, no readable root metadata, malformed attrs).
    """
    store = open_kernel_store(path)
    notes = [] if notes is None else notes
    problems: list[str] = []
    arrays = {}
    for name in store.kernels:
        try:
            arr = store.array(name)
        except Exception as exc:
            problems.append(f"kernel array {name!r} unreadable: {exc}")
            continue
        if store.geometry is not None:
            problem = store.shard_layout_problem(name)
            if problem:
                problems.append(problem)
            else:
                arrays[name] = arr
        elif tuple(arr.shape) != (store.n, store.n) or tuple(arr.chunks) != (store.tile,) * 2:
            problems.append(
                f"kernel array {name!r} has chunks {tuple(arr.chunks)}, but the attrs' tile is "
                f"{store.tile} (shape {tuple(arr.shape)}, n = {store.n})"
            )
        else:
            arrays[name] = arr
    problems.extend(_verify_labels(store, notes))
    try:
        led = store.ledger()
    except StoreError as exc:
        return [*problems, str(exc)]
    except Exception as exc:
        return [*problems, f"ledger unreadable: {exc}"]
    problems.extend(_verify_aux(store, notes))
    foreign, legacy = store.identity_check(led)
    if foreign:
        problems.append(
            f"{len(foreign)} finished tiles were computed under another identity than the "
            "store's attrs claim (its spec, dataset, tile, dtype, kernels or options were "
            f"changed after they were written): {_some(foreign)}"
        )
    if "identity" not in led:
        notes.append(
            "written without identity digests (older software): its tiles cannot be tied "
            "to the spec, dataset and settings in its attrs"
        )
    elif legacy:
        notes.append(f"{len(legacy)} tiles written without identity digests (older software)")
    plan = store.plan
    if store.geometry is not None:
        return problems + _verify_records(store, arrays)
    not_done = []
    for i, j in plan.tiles():
        done_u, done_l = bool(led["done"][i, j]), bool(led["done"][j, i])
        if done_u != done_l:
            problems.append(f"tile ({i}, {j}): ledger halves disagree (done {done_u}/{done_l})")
        if not done_u:
            not_done.append((i, j))
            continue
        if not np.isfinite(led["max_residual"][i, j]) or not np.isfinite(led["seconds"][i, j]):
            problems.append(f"tile ({i}, {j}): done but residual/seconds missing in the ledger")
        problems.extend(_verify_tile(store, arrays, i, j, led))
    if not_done:
        problems.append(f"{len(not_done)} of {plan.n_tiles} tiles not done: {_some(not_done)}")
    return problems


def _verify_records(store: KernelStore, arrays: dict) -> list[str]:
    """Layout 2: every tile's record and its shards."""
    problems: list[str] = []
    ledger = store._ledger_impl
    assert isinstance(ledger, RecordLedger)  # layout 2 (the caller checks)
    records = ledger.records()
    not_done, orphans = [], []
    for i, j in store.plan.tiles():
        if (i, j) not in records:
            not_done.append((i, j))
            if any(store.loc.exists(store.chunk_key(k, i, j)) for k in store.kernels):
                orphans.append((i, j))
            continue
        rec = records[i, j]
        if rec is None:
            not_done.append((i, j))
            problems.append(f"tile ({i}, {j}): ledger record malformed (ledger/records)")
            continue
        if not (np.isfinite(rec["max_residual"]) and np.isfinite(rec["seconds"])):
            problems.append(f"tile ({i}, {j}): done but residual/seconds missing in the ledger")
        problems.extend(_verify_shards(store, arrays, i, j, rec))
    if orphans:
        problems.append(
            f"{len(orphans)} tiles have data but no ledger record (a record deleted, or a "
            f"writer stopped between the data and its record): {_some(orphans)}"
        )
    if not_done:
        problems.append(
            f"{len(not_done)} of {store.plan.n_tiles} tiles not done: {_some(not_done)}"
        )
    return problems


def _verify_shards(store: KernelStore, arrays: dict, i: int, j: int, rec: dict) -> list[str]:
    """Layout 2: both shards of tile (i, j) of every kernel: present, the recorded crc32,
    the index the geometry gives, finite values, exact transposes."""
    geom = store.geometry
    assert geom is not None
    r0, r1 = store.plan.bounds(i)
    c0, c1 = store.plan.bounds(j)
    problems: list[str] = []
    halves = [((i, j), (r1 - r0, c1 - c0))]
    if i != j:
        halves.append(((j, i), (c1 - c0, r1 - r0)))
    for name in store.kernels:
        if name not in arrays:
            return problems  # reported once, above
        sums = rec["checksums"].get(name)
        if sums is None:
            problems.append(f"tile ({i}, {j}) {name}: no checksum in its ledger record")
            continue
        vals = {}
        for k, (t, (a, b)) in enumerate(halves):
            key = store.chunk_key(name, *t)
            what = f"tile ({i}, {j}) {name}" + (" (mirror)" if k else "")
            raw = store.loc.get(key)
            if raw is None:
                problems.append(f"{what}: shard {key} missing")
                continue
            if crc32(raw) != sums[k]:
                problems.append(f"{what}: checksum mismatch (shard {key} changed)")
            try:
                vals[t] = decode_shard(raw, geom, a, b)
            except StoreError as exc:
                problems.append(f"{what}: {key}: {exc}")
        if len(vals) != len(halves):
            continue
        up = vals[i, j]
        lo = vals[j, i] if i != j else up
        if not np.isfinite(up).all() or not np.isfinite(lo).all():
            problems.append(f"tile ({i}, {j}) {name}: non-finite values")
        if not np.array_equal(up, lo.T):
            what = "not exactly symmetric" if i == j else f"shard ({j}, {i}) is not its transpose"
            problems.append(f"tile ({i}, {j}) {name}: {what}")
    return problems


def _verify_labels(store: KernelStore, notes: list[str]) -> list[str]:
    try:
        y = store.labels()
    except Exception as exc:
        return [str(exc)]
    if y.shape != (store.n,):
        return [f"labels must have shape ({store.n},), got {y.shape}"]
    recorded = store._node("labels").attrs.get("crc32")
    if recorded is None:
        notes.append("labels written without a checksum (older software)")
        return []
    got = crc32(byte_view(np.ascontiguousarray(y, dtype="<i8")))
    if got != int(recorded):
        return [f"labels changed on disk (crc32 {got}, recorded {int(recorded)})"]
    return []


def _verify_aux(store: KernelStore, notes: list[str]) -> list[str]:
    """CDEQ self-covariances: done, finite, >= 0, checksum and identity per row chunk."""
    chunks = store.aux_chunks()
    if not chunks:
        return []
    problems: list[str] = []
    try:
        arr = store._node("aux/self_cov")
        done = np.asarray(store._node("aux/self_cov_done")[...])
        sums = (
            np.asarray(store._node("aux/self_cov_checksum")[...])
            if store.has("aux/self_cov_checksum")
            else None
        )
        foreign, legacy = store.aux_identity_check()
    except Exception as exc:
        return [f"self-covariances unreadable: {exc}"]
    if sums is None:
        notes.append("self-covariances written without checksums (older software)")
    missing = [(a, b) for k, a, b in chunks if not done[k]]
    if missing:
        problems.append(f"{len(missing)} self-covariance row chunks not done: {_some(missing)}")
    for k in foreign:
        a, b = chunks[k][1:]
        problems.append(
            f"self-covariance rows [{a}, {b}) were computed under another identity than the "
            "store's attrs claim"
        )
    if legacy and sums is not None:
        notes.append(f"{len(legacy)} self-covariance row chunks written without digests")
    for k, a, b in chunks:
        if not done[k]:
            continue
        try:
            rows = np.ascontiguousarray(arr[a:b], dtype="<f8")
        except Exception as exc:
            problems.append(f"self-covariance rows [{a}, {b}) unreadable: {exc}")
            continue
        if not (np.isfinite(rows).all() and (rows >= 0).all()):
            problems.append(f"self-covariance rows [{a}, {b}): values not finite and >= 0")
        if sums is not None and int(sums[k]) and crc32(byte_view(rows)) != sums[k]:
            problems.append(f"self-covariance rows [{a}, {b}): checksum mismatch (changed)")
    return problems


def _verify_tile(store: KernelStore, arrays: dict, i: int, j: int, led: dict) -> list[str]:
    r0, r1 = store.plan.bounds(i)
    c0, c1 = store.plan.bounds(j)
    problems: list[str] = []
    crc = crc_m = 0
    consistent = True  # every chunk equals the transpose of its mirror
    for name in store.kernels:
        if name not in arrays:
            return problems  # reported once, above
        for a, b in ((i, j), (j, i)):
            if store._raw_chunks(name) and not store.loc.exists(store.chunk_key(name, a, b)):
                problems.append(f"tile ({i}, {j}) {name}: chunk file {name}/c/{a}/{b} missing")
                return problems
        arr = arrays[name]
        try:
            up = np.ascontiguousarray(arr[r0:r1, c0:c1])
            lo = up if i == j else np.ascontiguousarray(arr[c0:c1, r0:r1])
        except Exception as exc:
            problems.append(f"tile ({i}, {j}) {name}: chunk unreadable: {exc}")
            return problems
        crc = crc32(byte_view(up), crc)
        if i != j:
            crc_m = crc32(byte_view(lo), crc_m)
        if not np.isfinite(up).all() or not np.isfinite(lo).all():
            problems.append(f"tile ({i}, {j}) {name}: non-finite values")
        if not np.array_equal(up, lo.T):
            consistent = False
            what = "not exactly symmetric" if i == j else f"chunk ({j}, {i}) is not its transpose"
            problems.append(f"tile ({i}, {j}) {name}: {what}")
    if i == j:
        crc_m = crc
    halves = [((i, j), crc, "tile"), ((j, i), crc_m, "mirror")] if i != j else [((i, j), crc, "")]
    ok = {t: got == int(led["checksum"][t]) for t, got, _ in halves}
    for t, _, role in halves:
        if ok[t]:
            continue
        name = f"tile {t}" if role != "mirror" else f"tile {t} (mirror)"
        if store.ledger_entry_exists("checksum", *t) is False:
            problems.append(
                f"{name}: ledger checksum entry missing (ledger/checksum/c/{t[0]}/{t[1]} was "
                "deleted); its data cannot be checked"
            )
        elif i != j and consistent and all(ok[u] for u, _, _ in halves if u != t):
            # the chunk is the exact transpose of its mirror, whose checksum holds
            problems.append(
                f"{name}: ledger checksum entry changed (the chunk data are intact: they equal "
                "the transpose of the other half, whose checksum matches)"
            )
        else:
            problems.append(f"{name}: checksum mismatch (chunk bytes changed on disk)")
    return problems
