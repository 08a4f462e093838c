"""Layout v2 shards: every tile of a kernel array is one zarr v3 shard, written whole.

A shard (zarr's ``sharding_indexed`` codec, index at the end) holds the tile's inner chunks
(``chunk x chunk``, the consumer-sized read unit), each the raw little-endian C-order values
(``bytes`` codec, no compression), stored one after the other in C order of the inner
chunk grid, followed by the shard index: ``(tile/chunk)**2`` pairs of little-endian uint64
``(offset, nbytes)`` (``2**64 - 1`` twice for an inner chunk that lies wholly outside the
array) and the crc32c of those index bytes (``crc32c`` index codec).  Inner chunks that
reach past the array's edge are padded with the fill value (NaN), as zarr pads them.

Because nothing is compressed, a tile's shard is a pure function of its values: the bytes
are built here in one pass (cast, inner-chunk reorder and, for the mirror, transpose), and
``verify`` can check the index against the one geometry allows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import google_crc32c
import numba as nb
import numpy as np

from ..errors import InputError, StoreError
from .chunkio import _transpose_into

__all__ = [
    "DEFAULT_CHUNK",
    "MAX_UINT64",
    "ShardGeometry",
    "decode_shard",
    "fill_shards",
    "inner_chunk",
]

#: Default side of the inner (consumer) chunks of a v2 store.
DEFAULT_CHUNK = 1024
#: The shard index's mark of an absent inner chunk (offset and length).
MAX_UINT64 = 2**64 - 1


def inner_chunk(tile: int, want: int = DEFAULT_CHUNK) -> int:
    """Inner chunk side for a tile: the tile itself when it is at most ``want``, else the
    largest divisor of the tile that is at most ``want`` (zarr needs the shard side to be a
    multiple of the chunk side).

    Raises
    ------
    InputError
        ``want`` < 1, or the tile's largest divisor <= ``want`` is under ``want / 4`` (e.g.
        a prime tile): such chunks would be tiny.
    """
    if not (isinstance(want, int | np.integer) and not isinstance(want, bool) and want >= 1):
        raise InputError(f"chunk must be an integer >= 1, got {want!r}")
    want = int(want)
    if tile <= want:
        return int(tile)
    best = max(d for d in range(1, want + 1) if tile % d == 0)
    if 4 * best < want:
        raise InputError(
            f"chunk {want} does not fit tile {tile}: the tile's largest divisor <= {want} is "
            f"{best}; choose a tile that is a multiple of {want // 4 or 1} or more (e.g. "
            f"{tile - tile % want or want}), or another chunk"
        )
    return best


@dataclass(frozen=True)
class ShardGeometry:
    """The shard layout of a v2 kernel array: tile (shard) side, inner chunk side, dtype.

    A tile of ``rows x cols`` values (edge tiles are smaller than ``tile``) occupies the
    first ``ceil(rows/chunk) x ceil(cols/chunk)`` inner chunks of its shard.
    """

    tile: int
    chunk: int
    dtype: np.dtype

    def __post_init__(self) -> None:
        if self.tile % self.chunk:
            raise InputError(f"tile {self.tile} must be a multiple of chunk {self.chunk}")
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def per_side(self) -> int:
        """Inner chunks per shard side."""
        return self.tile // self.chunk

    def grid(self, rows: int, cols: int) -> tuple[int, int]:
        """Inner chunks ``(along rows, along cols)`` that hold values of a rows x cols tile."""
        return -(-rows // self.chunk), -(-cols // self.chunk)

    def data_bytes(self, rows: int, cols: int) -> int:
        nr, nc = self.grid(rows, cols)
        return nr * nc * self.chunk**2 * self.dtype.itemsize

    def nbytes(self, rows: int, cols: int) -> int:
        """Bytes of the whole shard object (data, index, index crc32c)."""
        return self.data_bytes(rows, cols) + 16 * self.per_side**2 + 4

    def index(self, rows: int, cols: int) -> bytes:
        """The shard index (with its crc32c) of a rows x cols tile."""
        return _index(self.per_side, self.chunk**2 * self.dtype.itemsize, *self.grid(rows, cols))


@functools.lru_cache(maxsize=64)
def _index(per: int, chunk_bytes: int, nr: int, nc: int) -> bytes:
    idx = np.full((per, per, 2), MAX_UINT64, dtype="<u8")
    k = np.arange(nr * nc, dtype="<u8").reshape(nr, nc)
    idx[:nr, :nc, 0] = k * np.uint64(chunk_bytes)
    idx[:nr, :nc, 1] = chunk_bytes
    raw = idx.tobytes()
    return raw + np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()


@nb.njit(cache=True, nogil=True)
def _fill(src, up, lo, mirror):
    """``up[p, q]`` = inner chunk (p, q) of ``src`` (NaN past its edge), cast to up's dtype;
    with ``mirror``, ``lo[q, p] = up[p, q].T`` (the mirror tile's inner chunks)."""
    r, cc = src.shape
    nr, nc, c = up.shape[0], up.shape[1], up.shape[2]
    for p in range(nr):
        for q in range(nc):
            for a in range(c):
                i = p * c + a
                for b in range(c):
                    j = q * c + b
                    if i < r and j < cc:
                        up[p, q, a, b] = src[i, j]
                    else:
                        up[p, q, a, b] = np.nan
            if mirror:
                _transpose_into(up[p, q], lo[q, p])


def fill_shards(
    block: np.ndarray, geom: ShardGeometry, up: np.ndarray, lo: np.ndarray | None
) -> None:
    """Write the shard object(s) of a tile into byte buffers.

    Parameters
    ----------
    block : ndarray, shape (rows, cols), float32 or float64
        The tile's values (rounded to the store dtype like ``astype``).
    geom : ShardGeometry
    up : ndarray of uint8, shape (geom.nbytes(rows, cols),)
        Receives the tile's shard.
    lo : ndarray of uint8, shape (geom.nbytes(cols, rows),), or None
        Receives the mirror tile's shard (its transpose); None for a diagonal tile.
    """
    rows, cols = block.shape
    c = geom.chunk
    nr, nc = geom.grid(rows, cols)
    src = np.ascontiguousarray(block)
    dt = geom.dtype.newbyteorder("<")
    d_up = geom.data_bytes(rows, cols)
    up_v = up[:d_up].view(dt).reshape(nr, nc, c, c)
    if lo is None:
        _fill(src, up_v, up_v, False)
    else:
        lo_v = lo[:d_up].view(dt).reshape(nc, nr, c, c)
        _fill(src, up_v, lo_v, True)
        lo[d_up:] = np.frombuffer(geom.index(cols, rows), dtype=np.uint8)
    up[d_up:] = np.frombuffer(geom.index(rows, cols), dtype=np.uint8)


def decode_shard(raw: bytes | memoryview, geom: ShardGeometry, rows: int, cols: int) -> np.ndarray:
    """The values of a rows x cols tile from its shard object, checking its size and index.

    Returns
    -------
    ndarray, shape (rows, cols), the store dtype

    Raises
    ------
    StoreError
        The object has the wrong size, its index fails its crc32c or differs from the one the
        geometry gives (a damaged shard index).
    """
    raw = memoryview(raw).cast("B")
    want = geom.nbytes(rows, cols)
    if len(raw) != want:
        raise StoreError(f"shard has {len(raw)} bytes, a {rows} x {cols} tile needs {want}")
    d = geom.data_bytes(rows, cols)
    idx = bytes(raw[d:])
    if google_crc32c.value(idx[:-4]) != int.from_bytes(idx[-4:], "little"):
        raise StoreError("shard index damaged (its crc32c does not match)")
    if idx != geom.index(rows, cols):
        raise StoreError("shard index damaged (offsets differ from the tile's layout)")
    nr, nc = geom.grid(rows, cols)
    c = geom.chunk
    v = np.frombuffer(raw[:d], dtype=geom.dtype.newbyteorder("<")).reshape(nr, nc, c, c)
    return v.transpose(0, 2, 1, 3).reshape(nr * c, nc * c)[:rows, :cols].astype(geom.dtype)
