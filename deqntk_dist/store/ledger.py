"""The per-tile ledger of a kernel store, in its two layouts.

Layout v1 (:class:`ArrayLedger`): one (nb, nb) array per field under ``ledger/``, chunks
(1, 1), so a tile writes 2 x 7 one-element files (its own and its mirror's entries).

Layout v2 (:class:`RecordLedger`): one record per tile, chunk ``(I, J)`` (I <= J) of the
uint8 array ``ledger/records`` (shape (nb, nb, RECORD_BYTES), chunk key ``c.I.J.0``): the
UTF-8 JSON object

``{"v": 1, "tile": [I, J], "rows": [r0, r1], "cols": [c0, c1],
"checksums": {kernel: [crc32 of shard (I, J), crc32 of shard (J, I)]},
"max_residual": float, "iterations": int, "seconds": float, "finished": unix time,
"identity": uint64 tile digest}``

zero-padded to RECORD_BYTES.  It is written after the tile's shards, so a record that
exists means the data and their checksums are in place; a tile without one is not done.
A record that does not parse, or names another tile, counts as absent (the tile is
computed again; ``verify`` reports it).

Both present the same grid view (:meth:`grid`, fields :data:`LEDGER_FIELDS`) to the
reader, status and verification code.
"""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import StoreError
from .chunkio import crc32, zarr_array

if TYPE_CHECKING:
    from .core import KernelStore

__all__ = ["LEDGER_FIELDS", "RECORD_BYTES", "ArrayLedger", "RecordLedger", "parse_record"]

#: ledger field -> (dtype, fill value); ``done`` is written last.  ``identity`` (the tile's
#: :func:`~.identity.tile_digest`, 0 = written without one) is absent from v1 stores made
#: before it was introduced.
LEDGER_FIELDS: dict[str, tuple[str, Any]] = {
    "checksum": ("uint32", 0),
    "max_residual": ("float64", math.nan),
    "iterations": ("int32", -1),
    "seconds": ("float64", math.nan),
    "finished": ("float64", math.nan),
    "identity": ("uint64", 0),
    "done": ("bool", False),
}
#: bytes of one v2 ledger record (JSON, zero-padded)
RECORD_BYTES = 512
RECORDS = "ledger/records"
#: chunk keys of ``ledger/records`` ("." separator: every record directly under it)
_RECORD_NAME = re.compile(r"c\.(\d+)\.(\d+)\.0")


class ArrayLedger:
    """Layout v1: one one-element chunk file per field and tile half."""

    def __init__(self, store: KernelStore):
        self.s = store

    def fields(self) -> tuple[str, ...]:
        s = self.s
        return tuple(f for f in LEDGER_FIELDS if f != "identity" or s.has("ledger/identity"))

    def grid(self, field: str) -> np.ndarray:
        s = self.s
        arr = s._node(f"ledger/{field}")
        nb = s.plan.n_blocks
        if tuple(arr.shape) != (nb, nb):
            raise StoreError(
                f"{s.path}: ledger/{field} has shape {tuple(arr.shape)}, but the attrs (n = "
                f"{s.n}, tile = {s.tile}) give a {nb} x {nb} tile grid: the attrs or the "
                "ledger were changed"
            )
        return np.asarray(arr[...])

    def done_grid(self) -> np.ndarray:
        return self.grid("done")

    def tile_done(self, i: int, j: int) -> bool:
        s = self.s
        name = "ledger/done"
        if s._raw_chunks(name):  # the one-byte chunk file, without zarr's machinery
            raw = s.loc.get(f"{name}/c/{i}/{j}")
            return raw is not None and raw[:1] not in (b"", b"\0")
        return bool(s._node(name)[i, j])

    def entry_exists(self, field: str, bi: int, bj: int) -> bool | None:
        name = f"ledger/{field}"
        if not self.s._raw_chunks(name):
            return None
        return self.s.loc.exists(f"{name}/c/{bi}/{bj}")

    def put(self, field: str, bi: int, bj: int, value) -> None:
        """Entry (bi, bj) of ``field``: its one-element chunk file (the bytes zarr writes)
        where the layout allows, else through zarr."""
        s = self.s
        name = f"ledger/{field}"
        if not s._raw_chunks(name):
            zarr_array(s._root, name)[bi, bj] = value
            return
        item = np.array([value], dtype=np.dtype(LEDGER_FIELDS[field][0]).newbyteorder("<"))
        s.loc.put(f"{name}/c/{bi}/{bj}", item)

    def write(self, i: int, j: int, entries: dict[str, tuple]) -> None:
        """Both halves' entries, ``done`` last, the mirror's entry first."""
        fields = self.fields()
        for field, (upper, lower) in entries.items():
            if field not in fields:
                continue
            if i != j:
                self.put(field, j, i, lower)
            self.put(field, i, j, upper)

    def invalidate(self, i: int, j: int) -> None:
        self.put("done", i, j, False)  # the upper half decides: missing at once
        if i != j:
            self.put("done", j, i, False)


def parse_record(raw: bytes | None, i: int, j: int) -> dict | None:
    """The record of tile (i, j) from its chunk bytes; None when absent or malformed."""
    if raw is None:
        return None
    try:
        rec = json.loads(bytes(raw).rstrip(b"\0").decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("tile") != [i, j]:
        return None
    try:
        checks = rec["checksums"]
        ok = isinstance(checks, dict) and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(c, int) for c in v)
            for v in checks.values()
        )
        ok = ok and isinstance(rec["identity"], int) and isinstance(rec["iterations"], int)
        for key in ("max_residual", "seconds", "finished"):
            float(rec[key])
    except (KeyError, TypeError, ValueError):
        return None
    return rec if ok else None


def combined_checksum(rec: dict, *, upper: bool) -> int:
    """One crc32 for a tile half: over the kernels' shard crc32s (4 bytes each, little
    endian, in the record's kernel order), as :meth:`KernelStore.write_tile` returns."""
    crc = 0
    for up, lo in rec["checksums"].values():
        crc = crc32((up if upper else lo).to_bytes(4, "little"), crc)
    return crc


class RecordLedger:
    """Layout v2: one record per tile (see the module docstring)."""

    def __init__(self, store: KernelStore):
        self.s = store

    def fields(self) -> tuple[str, ...]:
        return tuple(LEDGER_FIELDS)

    def _key(self, i: int, j: int) -> str:
        return f"{RECORDS}/c.{i}.{j}.0"

    def _done_tiles(self) -> list[tuple[int, int]]:
        """Tiles (I <= J) whose record object exists (one listing, no reads)."""
        nb = self.s.plan.n_blocks
        out = []
        for name in self.s.loc.list(RECORDS):
            m = _RECORD_NAME.fullmatch(name)
            if m and int(m[1]) <= int(m[2]) < nb:
                out.append((int(m[1]), int(m[2])))
        return sorted(out)

    def records(self) -> dict[tuple[int, int], dict | None]:
        """Every present record, parsed (None: present but malformed)."""
        tiles = self._done_tiles()
        loc = self.s.loc

        def read(t):
            return parse_record(loc.get(self._key(*t)), *t)

        if loc.is_local or len(tiles) < 8:
            got = [read(t) for t in tiles]
        else:
            with ThreadPoolExecutor(16) as pool:
                got = list(pool.map(read, tiles))
        return dict(zip(tiles, got))

    def grids(self) -> dict[str, np.ndarray]:
        """All fields as (nb, nb) grids, both halves filled from each record."""
        nb = self.s.plan.n_blocks
        out = {f: np.full((nb, nb), fill, dtype=dt) for f, (dt, fill) in LEDGER_FIELDS.items()}
        for (i, j), rec in self.records().items():
            if rec is None:
                continue
            out["checksum"][i, j] = combined_checksum(rec, upper=True)
            out["checksum"][j, i] = combined_checksum(rec, upper=i == j)
            for a, b in {(i, j), (j, i)}:
                out["done"][a, b] = True
                out["identity"][a, b] = rec["identity"] & (2**64 - 1)
                out["iterations"][a, b] = rec["iterations"]
                for f in ("max_residual", "seconds", "finished"):
                    out[f][a, b] = float(rec[f])
        return out

    def grid(self, field: str) -> np.ndarray:
        if field == "done":
            return self.done_grid()
        return self.grids()[field]

    def done_grid(self) -> np.ndarray:
        """Done tiles from a listing; a record's contents are checked by ``verify`` and by
        :meth:`tile_done` (before a tile is skipped)."""
        nb = self.s.plan.n_blocks
        done = np.zeros((nb, nb), dtype=bool)
        for i, j in self._done_tiles():
            done[i, j] = done[j, i] = True
        return done

    def record(self, i: int, j: int) -> dict | None:
        i, j = min(i, j), max(i, j)
        return parse_record(self.s.loc.get(self._key(i, j)), i, j)

    def tile_done(self, i: int, j: int) -> bool:
        return self.record(i, j) is not None

    def entry_exists(self, field: str, bi: int, bj: int) -> bool | None:
        return self.s.loc.exists(self._key(min(bi, bj), max(bi, bj)))

    def write(self, i: int, j: int, rec: dict) -> None:
        raw = json.dumps(rec, separators=(",", ":")).encode()
        if len(raw) > RECORD_BYTES:
            raise StoreError(f"ledger record of tile ({i}, {j}) exceeds {RECORD_BYTES} bytes")
        buf = np.zeros(RECORD_BYTES, dtype=np.uint8)
        buf[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        self.s.loc.put(self._key(i, j), buf)

    def invalidate(self, i: int, j: int) -> None:
        self.s.loc.delete(self._key(min(i, j), max(i, j)))
