"""Chunk I/O of the kernel store: checksums, page-aligned buffers, direct-I/O file writes,
the cast-and-transpose of a tile into its chunk and its mirror."""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numba as nb
import numpy as np

if TYPE_CHECKING:
    import zarr

try:  # the same CRC-32 (zlib's polynomial), ~7x faster with SIMD; zlib's otherwise
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency
    from zlib import crc32

__all__ = [
    "DIRECT_ALIGN",
    "DIRECT_MIN_BYTES",
    "AlignedBuffers",
    "aligned_empty",
    "byte_view",
    "cast_and_mirror",
    "checksum",
    "crc32",
    "write_file",
    "zarr_array",
]


def checksum(values: np.ndarray) -> int:
    """crc32 of an array's values in C order (the bytes a chunk holds as written)."""
    a = np.ascontiguousarray(values)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return crc32(byte_view(a))


def byte_view(a: np.ndarray) -> memoryview:
    """``memoryview(a).cast("B")``: the bytes of C-contiguous ``a``, without copying."""
    # numpy's stubs give ndarray ``__buffer__`` only for Python >= 3.12, so for the 3.11
    # target mypy does not see that ndarray has the buffer protocol (it does)
    return memoryview(a).cast("B")  # type: ignore[arg-type]


def zarr_array(group: zarr.Group, key: str) -> zarr.Array:
    """Node ``key`` of ``group`` typed as an array (zarr types ``group[key]`` as an array
    or a group; the store layouts have an array at every key this is used for)."""
    return cast("zarr.Array", group[key])


@nb.njit(cache=True, nogil=True)
def _cast_mirror(src, up, lo):
    """``up = src`` and ``lo = src.T`` (cast to their dtype), in 32-row stripes."""
    n, m = src.shape
    B = 32
    for i0 in range(0, n, B):
        i1 = min(i0 + B, n)
        for i in range(i0, i1):
            for j in range(m):
                up[i, j] = src[i, j]
        for j0 in range(0, m, B):
            j1 = min(j0 + B, m)
            for j in range(j0, j1):
                for i in range(i0, i1):
                    lo[j, i] = up[i, j]


#: Direct-I/O alignment (bytes) of buffers, file offsets and lengths.
DIRECT_ALIGN = 4096
#: Chunks smaller than this are written through the page cache.
DIRECT_MIN_BYTES = 1 << 20


def aligned_empty(shape: tuple[int, ...], dtype, align: int = DIRECT_ALIGN) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes].view(dtype).reshape(shape)


class AlignedBuffers:
    """Reused page-aligned arrays for tiles, by key; the ``keep`` most recently used are
    kept (full tiles and the edge tiles of a row), so steady state allocates nothing.

    Each thread gets its own arrays: a worker with several threads writes several tiles
    at once, and an array handed to two of them would mix their values."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._local = threading.local()

    def get(self, key, shapes: dict, dtype):
        """``{name: array of shape}`` for ``key`` (made with :func:`aligned_empty` once per
        thread)."""
        bufs: OrderedDict | None = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = OrderedDict()
        if key in bufs:
            bufs.move_to_end(key)
            return bufs[key]
        while len(bufs) >= self.keep:
            bufs.popitem(last=False)
        bufs[key] = {k: aligned_empty(shape, dtype) for k, shape in shapes.items()}
        return bufs[key]


def _direct_io_enabled() -> bool:
    """dask config ``deqntk.direct-io`` (default true; ``DASK_DEQNTK__DIRECT_IO=false``)."""
    from ..config import setting

    return bool(setting("direct-io"))


def write_file(path: Path, data: np.ndarray, *, direct: bool = True) -> bool:
    """Write the bytes of C-contiguous ``data`` to a new file ``path``.

    With ``direct`` the aligned head goes to the device with ``O_DIRECT`` (no page cache:
    no copy and no page-cache growth, which on a VM costs more than the tile's own
    compute), the unaligned tail through the page cache.  Falls back to a plain write where
    the filesystem or the buffer does not allow direct I/O.

    Returns
    -------
    bool
        Whether direct I/O was used.
    """
    mv = byte_view(data)
    head = len(mv) - len(mv) % DIRECT_ALIGN
    use = (
        direct
        and hasattr(os, "O_DIRECT")
        and len(mv) >= DIRECT_MIN_BYTES
        and data.ctypes.data % DIRECT_ALIGN == 0
    )
    fd = -1
    if use:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError:  # e.g. tmpfs: EINVAL
            use = False
    if fd < 0:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        if use:
            try:
                done = _write_all(fd, mv[:head], 0)
            except OSError:  # the filesystem refused the direct write: start over
                use = False
                done = 0
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        _write_all(fd, mv[done:], done)
    finally:
        os.close(fd)
    return use


def _write_all(fd: int, mv: memoryview, offset: int) -> int:
    """``pwrite`` all of ``mv`` at ``offset``; returns ``offset + len(mv)``."""
    pos = 0
    while pos < len(mv):
        pos += os.pwrite(fd, mv[pos:], offset + pos)
    return offset + pos


def _io_pool() -> ThreadPoolExecutor:
    """Two threads that write a tile's chunk and its mirror at the same time (one pool per
    process: a pool inherited through ``fork`` has no threads)."""
    return _io_pool_of(os.getpid())


@functools.lru_cache(maxsize=1)
def _io_pool_of(pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(2, thread_name_prefix="deqntk-io")


@nb.njit(cache=True, nogil=True)
def _transpose_into(src, lo):
    """``lo = src.T`` in 32 x 32 blocks."""
    n, m = src.shape
    B = 32
    for i0 in range(0, n, B):
        i1 = min(i0 + B, n)
        for j0 in range(0, m, B):
            j1 = min(j0 + B, m)
            for j in range(j0, j1):
                for i in range(i0, i1):
                    lo[j, i] = src[i, j]


def cast_and_mirror(block: np.ndarray, dtype, out=None) -> tuple[np.ndarray, np.ndarray]:
    """A tile cast to ``dtype`` and its transpose, both C-contiguous.

    Rounds exactly like ``block.astype(dtype)`` (IEEE round to nearest even).  ``out`` may
    pass reusable ``(up, lo)`` buffers of the right shapes and dtype (no page faults).
    """
    src = np.ascontiguousarray(block)
    if out is None:
        out = (np.empty(src.shape, dtype=dtype), np.empty(src.shape[::-1], dtype=dtype))
    up, lo = out
    _cast_mirror(src, up, lo)
    return up, lo
