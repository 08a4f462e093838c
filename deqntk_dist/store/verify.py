"""``verify``: check a kernel store's ledger, chunks, checksums and symmetry."""

from __future__ import annotations

import numpy as np

from .chunkio import crc32
from .core import KernelStore, open_kernel_store

__all__ = ["verify_kernel_store"]


def verify_kernel_store(path) -> list[str]:
    """Check a kernel store; return a list of problems (empty when it is sound).

    Checks: the ledger is consistent (both halves of every tile agree, done tiles have a
    finite residual and time); every done tile's chunk and mirror chunk decode, match their
    recorded crc32, are finite and are exact transposes (diagonal tiles exactly symmetric);
    every tile is done; the labels match the store size.
    """
    store = open_kernel_store(path)
    problems: list[str] = []
    try:
        led = store.ledger()
    except Exception as exc:
        return [f"ledger unreadable: {exc}"]
    plan = store.plan
    if store.labels().shape != (store.n,):
        problems.append(f"labels must have shape ({store.n},), got {store.labels().shape}")
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
        problems.extend(_verify_tile(store, i, j, led))
    if not_done:
        shown = ", ".join(map(str, not_done[:10]))
        more = "" if len(not_done) <= 10 else f" (first 10 of {len(not_done)})"
        problems.append(f"{len(not_done)} of {plan.n_tiles} tiles not done: {shown}{more}")
    return problems


def _verify_tile(store: KernelStore, i: int, j: int, led: dict) -> list[str]:
    r0, r1 = store.plan.bounds(i)
    c0, c1 = store.plan.bounds(j)
    problems = []
    crc = crc_m = 0
    for name in store.kernels:
        arr = store.array(name)
        try:
            up = np.ascontiguousarray(arr[r0:r1, c0:c1])
            lo = up if i == j else np.ascontiguousarray(arr[c0:c1, r0:r1])
        except Exception as exc:
            problems.append(f"tile ({i}, {j}) {name}: chunk unreadable: {exc}")
            return problems
        crc = crc32(memoryview(up).cast("B"), crc)
        if i != j:
            crc_m = crc32(memoryview(lo).cast("B"), crc_m)
        if not np.isfinite(up).all() or not np.isfinite(lo).all():
            problems.append(f"tile ({i}, {j}) {name}: non-finite values")
        if not np.array_equal(up, lo.T):
            what = "not exactly symmetric" if i == j else f"chunk ({j}, {i}) is not its transpose"
            problems.append(f"tile ({i}, {j}) {name}: {what}")
    if i == j:
        crc_m = crc
    if crc != int(led["checksum"][i, j]):
        problems.append(f"tile ({i}, {j}): checksum mismatch (chunk bytes changed on disk)")
    if crc_m != int(led["checksum"][j, i]):
        problems.append(f"tile ({j}, {i}) (mirror): checksum mismatch (chunk bytes changed)")
    return problems
