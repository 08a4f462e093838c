"""The tile write engine of a kernel store: whole shards (layout 2) or whole chunks (layout
1), built from a tile's values in one compiled pass and written on I/O threads (direct I/O
on local disks, whole-object PUTs elsewhere).  :class:`TileIO` is a mixin of
:class:`~.core.KernelStore`; it uses the store's ``loc``, ``plan``, ``kernels``, ``dtype``,
``geometry`` and ``_root``."""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import StoreMismatchError
from .chunkio import (
    DIRECT_ALIGN,
    DIRECT_MIN_BYTES,
    AlignedBuffers,
    _direct_io_enabled,
    _io_pool,
    _transpose_into,
    byte_view,
    cast_and_mirror,
    crc32,
    zarr_array,
)
from .shards import ShardGeometry, fill_shards

if TYPE_CHECKING:
    import zarr

    from ..plan import TilePlan
    from .location import Location

__all__ = ["TileIO"]


class TileIO:
    """Tile writes of :class:`~.core.KernelStore` (see the module docstring)."""

    # set by KernelStore.__init__ (annotations only: no class attributes)
    loc: Location
    path: str
    plan: TilePlan
    kernels: tuple[str, ...]
    dtype: np.dtype
    n: int
    tile: int
    geometry: ShardGeometry | None
    _root: zarr.Group

    if TYPE_CHECKING:  # defined by KernelStore

        def array(self, name: str) -> zarr.Array: ...

        def chunk_key(self, name: str, *index: int) -> str: ...

    def shard_layout_problem(self, name: str) -> str | None:
        """Layout 2: why array ``name``'s zarr metadata is not the sharded layout the attrs
        give (shard = tile, inner chunk = ``chunk``, uncompressed little-endian values,
        index with crc32c at the end), or None when it is."""
        geom = self.geometry
        assert geom is not None
        key = ("_layout", name)
        cache: dict[Any, Any] = self.__dict__
        if key not in cache:
            arr = self.array(name)
            codecs: tuple[Any, ...] = getattr(arr.metadata, "codecs", ())
            sh: Any = codecs[0] if len(codecs) == 1 else None  # checked by type name below
            want_shape = (geom.chunk, geom.chunk)
            problem = None
            if tuple(arr.shape) != (self.n, self.n) or arr.shards != (self.tile, self.tile):
                problem = (
                    f"array {name!r} has shape {tuple(arr.shape)} and shards {arr.shards}, the "
                    f"attrs give ({self.n}, {self.n}) and tile {self.tile}"
                )
            elif (
                type(sh).__name__ != "ShardingCodec"
                or tuple(sh.chunk_shape) != want_shape
                or [type(c).__name__ for c in sh.codecs] != ["BytesCodec"]
                or [type(c).__name__ for c in sh.index_codecs] != ["BytesCodec", "Crc32cCodec"]
                or str(getattr(sh.index_location, "value", sh.index_location)) != "end"
                or any(
                    str(getattr(c.endian, "value", c.endian)) != "little"
                    for c in (sh.codecs[0], sh.index_codecs[0])
                )
                or arr.dtype != self.dtype
            ):
                problem = (
                    f"array {name!r} is not sharded as layout 2 requires (inner chunks "
                    f"{want_shape}, bytes codec, crc32c index at the end, dtype "
                    f"{self.dtype.name}): {name}/zarr.json was changed"
                )
            cache[key] = problem
        return cache[key]

    def _write_shards(self, i: int, j: int, values: dict) -> dict[str, tuple[int, int]]:
        """Layout 2: each kernel's shard (i, j) and mirror shard (j, i), whole objects
        written on I/O threads while the next one is built; returns their crc32s."""
        geom = self.geometry
        assert geom is not None
        for name in self.kernels:
            problem = self.shard_layout_problem(name)
            if problem:
                raise StoreMismatchError(f"{self.path}: {problem}")
        sums = {}
        pending: list[Future[None]] = []
        for name in self.kernels:
            block = values[name]
            rows, cols = block.shape
            bufs = self.__dict__.setdefault("_shard_bufs", AlignedBuffers(keep=4))
            shapes = {"up": (geom.nbytes(rows, cols),)}
            if i != j:
                shapes["lo"] = (geom.nbytes(cols, rows),)
            b = bufs.get((name, rows, cols, i == j), shapes, np.uint8)
            for w in pending:  # a buffer is reused only once its write is done
                w.result()
            pending = []
            fill_shards(block, geom, b["up"], b.get("lo"))
            pending.append(self._submit_object(self.chunk_key(name, i, j), b["up"]))
            crc = crc32(memoryview(b["up"]))
            crc_m = crc
            if i != j:
                pending.append(self._submit_object(self.chunk_key(name, j, i), b["lo"]))
                crc_m = crc32(memoryview(b["lo"]))
            sums[name] = (int(crc), int(crc_m))
        for w in pending:
            w.result()
        return sums

    def _submit_object(self, key: str, data: np.ndarray) -> Future[None]:
        """Write object ``key`` whole on an I/O thread (direct I/O on local disks)."""
        if "_direct" not in self.__dict__:
            self.__dict__["_direct"] = _direct_io_enabled() and self.loc.is_local
        direct = self.__dict__["_direct"] and data.nbytes >= DIRECT_MIN_BYTES
        return _io_pool().submit(self.loc.put, key, data, direct=direct)

    def _write_chunks(self, i: int, j: int, values: dict) -> dict[str, tuple[int, int]]:
        """Layout 1: each kernel's chunk (i, j) and mirror chunk (j, i); returns
        ``{"*": (crc over all chunks (i, j), crc over all chunks (j, i))}``."""
        crc = crc_m = 0
        for name in self.kernels:
            block = values[name]
            # a block already in the store dtype and aligned is written as it is
            ready = (
                block.dtype == self.dtype
                and block.flags.c_contiguous
                and block.ctypes.data % DIRECT_ALIGN == 0
            )
            # chunk files go out on I/O threads while this thread makes the mirror and the
            # checksums (pwrite, crc32 and the compiled transpose release the GIL)
            if i == j:
                cast = block if ready else self._scratch(block.shape)[0]
                if not ready:
                    np.copyto(cast, block, casting="same_kind")
                writes = [self._submit_chunk(name, i, j, cast, 0)]
                crc = crc32(byte_view(cast), crc)
            else:
                if ready:
                    cast, mirror = block, self._scratch(block.shape)[1]
                    writes = [self._submit_chunk(name, i, j, cast, 0)]
                    _transpose_into(block, mirror)
                else:
                    cast, mirror = cast_and_mirror(block, self.dtype, self._scratch(block.shape))
                    writes = [self._submit_chunk(name, i, j, cast, 0)]
                writes.append(self._submit_chunk(name, j, i, mirror, 1))
                crc = crc32(byte_view(cast), crc)
                crc_m = crc32(byte_view(mirror), crc_m)
            for w in writes:
                if w is not None:
                    w.result()
        if i == j:
            crc_m = crc
        return {"*": (crc, crc_m)}

    def _scratch(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Reused (up, lo) cast buffers for tiles of ``shape``."""
        bufs = self.__dict__.setdefault("_scratch_bufs", AlignedBuffers())
        b = bufs.get(shape, {"up": shape, "lo": shape[::-1]}, self.dtype)
        return b["up"], b["lo"]

    def _raw_chunks(self, name: str) -> bool:
        """Whether chunk ``name`` files are the raw little-endian C-order values (bytes codec
        only, "/" chunk keys, no sharding), so whole chunks can be written without zarr."""
        key = ("_raw", name)
        cache: dict[Any, Any] = self.__dict__
        if key not in cache:
            meta = self._root[name].metadata
            codecs: tuple[Any, ...] = getattr(meta, "codecs", ())
            enc: Any = getattr(meta, "chunk_key_encoding", None)  # checked by type name below
            cache[key] = (
                len(codecs) == 1
                and type(codecs[0]).__name__ == "BytesCodec"
                and (
                    str(getattr(codecs[0].endian, "value", codecs[0].endian)) == "little"
                    or (
                        codecs[0].endian is None
                        and zarr_array(self._root, name).dtype.itemsize == 1
                    )
                )
                and type(enc).__name__ == "DefaultChunkKeyEncoding"
                and enc.separator == "/"
                and np.little_endian
            )
        return cache[key]

    def _put_chunk(self, name: str, bi: int, bj: int, data: np.ndarray, *, slot: int = 0) -> None:
        """Write chunk (bi, bj) of ``name`` whole; ``data`` is C-contiguous, store dtype.

        Uncompressed chunks are written directly (exactly the bytes zarr writes: the
        values, edge chunks padded with the NaN fill value), which is ~2x faster than a zarr
        write of the same chunk; anything else goes through zarr.
        """
        r0, r1 = self.plan.bounds(bi)
        c0, c1 = self.plan.bounds(bj)
        if not self._raw_chunks(name):
            zarr_array(self._root, name)[r0:r1, c0:c1] = data
            return
        t = self.tile
        if data.shape != (t, t):
            pads = self.__dict__.setdefault("_pad_bufs", AlignedBuffers())
            full = pads.get(slot, {"full": (t, t)}, self.dtype)["full"]  # one per writer
            full.fill(np.nan)
            full[: r1 - r0, : c1 - c0] = data
            data = full
        if "_direct" not in self.__dict__:
            self.__dict__["_direct"] = _direct_io_enabled() and self.loc.is_local
        direct = self.__dict__["_direct"] and data.nbytes >= DIRECT_MIN_BYTES
        self.loc.put(self.chunk_key(name, bi, bj), np.ascontiguousarray(data), direct=direct)

    def _submit_chunk(
        self, name: str, bi: int, bj: int, data: np.ndarray, slot: int
    ) -> Future[None] | None:
        """:meth:`_put_chunk` on an I/O thread for raw chunk files (returns its future),
        else at once (returns None)."""
        if not self._raw_chunks(name):
            self._put_chunk(name, bi, bj, data)
            return None
        return _io_pool().submit(self._put_chunk, name, bi, bj, data, slot=slot)
