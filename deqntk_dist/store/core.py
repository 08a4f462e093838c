"""Kernel store: a symmetric N x N Gram in a zarr v3 group, with a per-tile ledger.

Layout (DESIGN.md §3; all paths relative to the group)
------------------------------------------------------
``ntk``, ``nngp``       (N, N) float32 or float64, chunks (tile, tile), no compression,
                        fill value NaN (an unwritten chunk reads as NaN, never as zeros).
``labels``              (N,) int64 copy of the dataset's ``y`` (train rows first).
``ledger/<field>``      (nb, nb) on the tile grid, chunks (1, 1) so every tile writes its own
                        ledger files: ``done`` (bool), ``checksum`` (uint32 crc32 of the
                        chunk's values as written, C order little-endian), ``max_residual``,
                        ``iterations``, ``seconds`` (compute time of the tile), ``finished``
                        (unix time).  Tile (I, J), I <= J, writes entries [I, J] and [J, I]
                        (the mirror's own checksum), ``done`` last and only after the data.
                        ``identity`` (uint64 digest of the store identity and the tile's
                        geometry, :mod:`.identity`; 0 or absent: written by older software).
``aux/self_cov``        CDEQ only: per-example self-covariances (N, H, W) float64, computed
                        once before the tiles; per row chunk ``aux/self_cov_checksum``
                        (crc32), ``aux/self_cov_identity`` (digest), ``aux/self_cov_done``.
``leases``              (nb, nb, 256) uint8: tile leases of running ``compute`` jobs
                        (:mod:`.lease`); all zero when no job runs.
``results/<kernel>``    written by ``solve`` (:mod:`deqntk_dist.results`).
attrs                   ``format`` "deqntk-kernel-store", ``format_version``, ``spec``,
                        ``dataset`` {path, fingerprint, n, n_train, name}, ``tile``, ``dtype``,
                        ``kernels``, ``options``, ``software`` {name, version}; ``labels``
                        attrs ``crc32``.
"""

from __future__ import annotations

import errno
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..dataset import DatasetStore, open_dataset_store
from ..errors import (
    DeqntkError,
    IncompleteStoreError,
    InputError,
    StoreError,
)
from ..plan import TilePlan
from ..spec import CDEQSpec, DEQSpec, spec_from_dict
from .chunkio import (
    DIRECT_ALIGN,
    DIRECT_MIN_BYTES,
    AlignedBuffers,
    _direct_io_enabled,
    _io_pool,
    _transpose_into,
    aligned_empty,
    cast_and_mirror,
    crc32,
    write_file,
)
from .identity import aux_digest, identity_digest, store_identity, tile_digest

__all__ = [
    "KERNEL_FORMAT",
    "KERNEL_FORMAT_VERSION",
    "KERNEL_NAMES",
    "LEDGER_FIELDS",
    "KernelStore",
    "add_missing_arrays",
    "open_kernel_store",
]

KERNEL_FORMAT = "deqntk-kernel-store"
KERNEL_FORMAT_VERSION = 1
KERNEL_NAMES = ("ntk", "nngp")
DTYPES = ("float32", "float64")
#: ledger field -> (dtype, fill value); ``done`` is written last.  ``identity`` (the tile's
#: :func:`~.identity.tile_digest`, 0 = written without one) is absent from stores made
#: before it was introduced.
#: Write errors that retrying cannot fix: reported at once, without dask's logs.
FATAL_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
LEDGER_FIELDS: dict[str, tuple[str, Any]] = {
    "checksum": ("uint32", 0),
    "max_residual": ("float64", math.nan),
    "iterations": ("int32", -1),
    "seconds": ("float64", math.nan),
    "finished": ("float64", math.nan),
    "identity": ("uint64", 0),
    "done": ("bool", False),
}
#: rows per chunk of the auxiliary per-example arrays
AUX_ROWS = 1024
#: per aux row chunk: array -> (dtype, fill value); ``self_cov_done`` is written last.
AUX_FIELDS: dict[str, tuple[str, Any]] = {
    "self_cov_checksum": ("uint32", 0),
    "self_cov_identity": ("uint64", 0),
    "self_cov_done": ("bool", False),
}
#: bytes of one tile lease record (``leases`` array, see :mod:`.lease`)
LEASE_BYTES = 256


def _software() -> dict[str, str]:
    from .. import __version__

    return {"name": "deqntk_dist", "version": __version__}


class KernelStore:
    """An opened kernel store: metadata, reader API and (when writable) tile writes.

    Use :func:`open_kernel_store` to read a store and :func:`create_kernel_store` to make
    one.  Attributes: ``path``, ``spec``, ``n``, ``n_train``, ``n_test``, ``tile``,
    ``dtype``, ``kernels``, ``options``, ``dataset_path``, ``dataset_fingerprint``, ``plan``
    (:class:`~deqntk_dist.plan.TilePlan`), ``attrs``, ``identity`` and ``identity_digest``
    (what the attrs claim every tile was computed under, :mod:`.identity`).

    Raises
    ------
    StoreError
        Malformed attrs.
    """

    def __init__(self, path: Path, root: zarr.Group, *, writable: bool):
        self.path = str(path)
        self._root = root
        self.writable = writable
        attrs = dict(root.attrs)
        self.attrs = attrs
        try:
            self.spec: DEQSpec | CDEQSpec = spec_from_dict(attrs["spec"])
            ds = attrs["dataset"]
            self.n = int(ds["n"])
            self.n_train = int(ds["n_train"])
            self.dataset_path = str(ds["path"])
            self.dataset_fingerprint = str(ds["fingerprint"])
            self.tile = int(attrs["tile"])
            self.dtype = np.dtype(attrs["dtype"])
            self.kernels = tuple(attrs["kernels"])
            self.options = dict(attrs.get("options") or {})
            self.plan = TilePlan(n=self.n, tile=self.tile)
        except (DeqntkError, KeyError, TypeError, ValueError) as exc:
            raise StoreError(
                f"kernel store attrs are malformed ({path}/zarr.json): {type(exc).__name__}: {exc}"
            ) from exc
        self.n_test = self.n - self.n_train
        #: what every tile must have been computed under (:mod:`.identity`)
        self.identity = store_identity(attrs)
        self.identity_digest = identity_digest(self.identity)

    def __repr__(self) -> str:
        return (
            f"KernelStore({self.path!r}, kernels={self.kernels}, n={self.n}, tile={self.tile}, "
            f"dtype={self.dtype.name})"
        )

    # ------------------------------------------------------------------------ reading
    def array(self, name: str) -> zarr.Array:
        """The zarr array ``name`` ("ntk" or "nngp"), shape (n, n).

        Raises
        ------
        InputError
            Not one of the store's kernels.
        StoreError
            Its metadata (``<name>/zarr.json``) cannot be read.
        """
        if name not in self.kernels:
            raise InputError(f"kernel name must be one of {self.kernels}, got {name!r}")
        return self._node(name)

    def _node(self, key: str):
        """Array or group ``key`` of the store, a :class:`StoreError` if it cannot be read."""
        try:
            return self._root[key]
        except KeyError:
            raise StoreError(f"{self.path}: {key!r} is missing from the kernel store") from None
        except Exception as exc:
            raise StoreError(
                f"{self.path}: {key}/zarr.json is unreadable: {type(exc).__name__}: {exc}"
            ) from exc

    def has(self, key: str) -> bool:
        """Whether array or group ``key`` exists (metadata file present)."""
        if isinstance(self._root.store, zarr.storage.LocalStore):
            return (Path(self.path) / key / "zarr.json").exists()
        return key in self._root

    def to_dask(self, name: str):
        """``name`` as a ``dask.array`` with one block per tile (lazy, read on compute)."""
        import dask.array as da

        return da.from_zarr(self.array(name))

    def block(self, name: str, rows: slice, cols: slice, *, check: bool = True) -> np.ndarray:
        """Entries ``K[rows, cols]`` as an ndarray of the store dtype.

        Parameters
        ----------
        name : {"ntk", "nngp"}
        rows, cols : slice
            Contiguous ranges (step 1).
        check : bool
            Raise :class:`IncompleteStoreError` if a tile under the block is not done.
        """
        arr = self.array(name)
        r0, r1 = _slice_range("rows", rows, self.n)
        c0, c1 = _slice_range("cols", cols, self.n)
        if check and r1 > r0 and c1 > c0:
            t = self.tile
            done = self._ledger("done")[r0 // t : -(-r1 // t), c0 // t : -(-c1 // t)]
            if not done.all():
                bi, bj = np.argwhere(~done)[0]
                raise IncompleteStoreError(
                    f"{self.path}: block rows [{r0}, {r1}) x cols [{c0}, {c1}) of {name!r} "
                    f"covers tiles that are not done, e.g. ({r0 // t + bi}, {c0 // t + bj}); "
                    "run `deqntk compute` again to finish the store"
                )
        return np.asarray(arr[r0:r1, c0:c1])

    def train_train(self, name: str = "ntk") -> np.ndarray:
        """``K[:n_train, :n_train]``, shape (n_train, n_train)."""
        return self.block(name, slice(0, self.n_train), slice(0, self.n_train))

    def test_train(self, name: str = "ntk") -> np.ndarray:
        """``K[n_train:, :n_train]``, shape (n_test, n_train)."""
        return self.block(name, slice(self.n_train, self.n), slice(0, self.n_train))

    def test_test(self, name: str = "ntk") -> np.ndarray:
        """``K[n_train:, n_train:]``, shape (n_test, n_test)."""
        return self.block(name, slice(self.n_train, self.n), slice(self.n_train, self.n))

    def labels(self) -> np.ndarray:
        """int64 labels of all n rows (train rows first), shape (n,).

        Raises
        ------
        StoreError
            The labels array or its chunk cannot be read.
        """
        arr = self._node("labels")
        try:
            return np.asarray(arr[...], dtype=np.int64)
        except Exception as exc:
            raise StoreError(
                f"{self.path}: labels are unreadable: {type(exc).__name__}: {exc}"
            ) from exc

    def dataset(self) -> DatasetStore:
        """Open the dataset store this kernel store was computed from."""
        return open_dataset_store(self.dataset_path)

    def self_covariance(self) -> np.ndarray | None:
        """The stored CDEQ self-covariances, shape (n, H, W), or None for DEQ stores."""
        if "aux" not in self._root or "self_cov" not in self._root["aux"]:
            return None
        return np.asarray(self._root["aux/self_cov"][...])

    # ------------------------------------------------------------------------- ledger
    def _ledger(self, field: str) -> np.ndarray:
        arr = self._node(f"ledger/{field}")
        nb = self.plan.n_blocks
        if tuple(arr.shape) != (nb, nb):
            raise StoreError(
                f"{self.path}: ledger/{field} has shape {tuple(arr.shape)}, but the attrs (n = "
                f"{self.n}, tile = {self.tile}) give a {nb} x {nb} tile grid: the attrs or the "
                "ledger were changed"
            )
        return np.asarray(arr[...])

    def ledger_fields(self) -> tuple[str, ...]:
        """The ledger fields this store has (``identity`` is missing from older stores until
        a resume adds it; checked on every call, as another process may add it)."""
        return tuple(f for f in LEDGER_FIELDS if f != "identity" or self.has("ledger/identity"))

    def ledger(self) -> dict[str, np.ndarray]:
        """All ledger arrays, each of shape (nb, nb) on the tile grid."""
        return {f: self._ledger(f) for f in self.ledger_fields()}

    def tile_digest(self, i: int, j: int) -> int:
        """The identity digest tile ``(i, j)`` must carry in ``ledger/identity``."""
        return tile_digest(self.identity_digest, i, j, self.plan.bounds(i), self.plan.bounds(j))

    def identity_check(self, led: dict | None = None) -> tuple[list, list]:
        """Finished tiles ``(I, J)`` (I <= J) that were computed under another identity than
        the attrs claim (either half's digest differs), and those written without a digest
        (older software; all finished tiles when the ledger has no ``identity``)."""
        led = self.ledger() if led is None else led
        done = [t for t in self.plan.tiles() if led["done"][t]]
        if "identity" not in led:
            return [], done
        foreign, legacy = [], []
        for i, j in done:
            want = self.tile_digest(i, j)
            have = {int(led["identity"][i, j]), int(led["identity"][j, i])}
            if have == {want}:
                continue
            (legacy if have == {0} else foreign).append((i, j))
        return foreign, legacy

    def ledger_entry_exists(self, field: str, bi: int, bj: int) -> bool | None:
        """Whether entry (bi, bj) of ``ledger/field`` was written (its chunk file exists);
        None where the layout does not tell (not a local uncompressed store)."""
        name = f"ledger/{field}"
        if not self._raw_chunks(name):
            return None
        return self.chunk_path(name, bi, bj).exists()

    def chunk_path(self, name: str, *index: int) -> Path:
        """File of chunk ``index`` of array ``name`` (local store, "/" chunk keys)."""
        return Path(self.path, name, "c", *map(str, index))

    def missing_tiles(self) -> list[tuple[int, int]]:
        """Upper-triangle tiles ``(I, J)`` not marked done, in plan order."""
        done = self._ledger("done")
        return [(i, j) for i, j in self.plan.tiles() if not done[i, j]]

    def is_complete(self) -> bool:
        """True when every tile is marked done (see :func:`verify_kernel_store`)."""
        return not self.missing_tiles()

    def status(self) -> dict[str, Any]:
        """Progress summary.

        Returns
        -------
        dict
            ``tiles_done``, ``tiles_total``, ``entries_done``, ``entries_total``,
            ``complete``, ``max_residual``, ``max_iterations``, ``tile_seconds`` (sum),
            ``entries_per_second`` (wall-clock rate over the finished tiles' time span) and
            ``eta_seconds`` (remaining entries at that rate; None when unknown).
        """
        led = self.ledger()
        tiles = self.plan.tiles()
        done = [t for t in tiles if led["done"][t]]
        entries_total = self.n * self.n
        entries_done = sum(self.plan.entries(t) for t in done)
        out: dict[str, Any] = {
            "path": self.path,
            "kernels": list(self.kernels),
            "n": self.n,
            "tile": self.tile,
            "dtype": self.dtype.name,
            "tiles_done": len(done),
            "tiles_total": len(tiles),
            "entries_done": int(entries_done),
            "entries_total": int(entries_total),
            "complete": len(done) == len(tiles),
            "max_residual": None,
            "max_iterations": None,
            "tile_seconds": 0.0,
            "entries_per_second": None,
            "eta_seconds": 0.0 if len(done) == len(tiles) else None,
        }
        if done:
            idx = tuple(np.array(done).T)
            res = led["max_residual"][idx]
            out["max_residual"] = float(np.nanmax(res)) if np.isfinite(res).any() else None
            out["max_iterations"] = int(led["iterations"][idx].max())
            secs = led["seconds"][idx]
            out["tile_seconds"] = float(np.nansum(secs))
            fin = led["finished"][idx]
            span = float(np.nanmax(fin) - np.nanmin(fin - secs)) if np.isfinite(fin).any() else 0
            if span > 0:
                rate = entries_done / span
                out["entries_per_second"] = rate
                if not out["complete"]:
                    out["eta_seconds"] = (entries_total - entries_done) / rate
        return out

    # ------------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"kernel store opened read-only: {self.path}")

    def check_writable(self) -> None:
        """Create and delete a probe file wherever a resume writes (the store directory,
        the kernel arrays, the ledger, the leases, the self-covariances), so a read-only or
        full filesystem is reported before any work starts.

        Raises
        ------
        StoreError
        """
        self._require_writable()
        keys = ["", *self.kernels, "ledger/done", "leases", "aux/self_cov"]
        for key in keys:
            d = Path(self.path, key)
            if key and not d.is_dir():
                continue
            probe = d / f".deqntk-probe-{uuid.uuid4().hex[:12]}"
            try:
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, b"\0")
                finally:
                    os.close(fd)
                    probe.unlink()
            except OSError as exc:
                raise StoreError(
                    f"kernel store {self.path} is not writable ({exc.strerror or exc} in {d})"
                ) from exc

    def invalidate(self, *, tiles=(), aux_chunks=()) -> None:
        """Mark ``tiles`` (both halves) and self-covariance row chunks ``aux_chunks`` (indices)
        not done, so that ``compute`` runs them again."""
        self._require_writable()
        for i, j in tiles:
            self._put_ledger("done", i, j, False)  # the upper half decides: missing at once
            if i != j:
                self._put_ledger("done", j, i, False)
        for k in aux_chunks:
            self._root["aux/self_cov_done"][k] = False

    def tile_done(self, i: int, j: int) -> bool:
        """Whether tile ``(i, j)`` is marked done now (one ledger entry read)."""
        name = "ledger/done"
        if self._raw_chunks(name):  # the one-byte chunk file, without zarr's machinery
            try:
                with open(self.chunk_path(name, i, j), "rb") as f:
                    return f.read(1) not in (b"", b"\0")
            except FileNotFoundError:
                return False
        return bool(self._node(name)[i, j])

    def ledger_entry(self, field: str, i: int, j: int):
        """One ledger value of tile ``(i, j)`` (a single chunk read)."""
        return self._node(f"ledger/{field}")[i, j]

    def add_missing_arrays(self) -> list[str]:
        """Add the arrays introduced since this store was made (identity ledger, aux
        checksums, leases); returns their names.  See :func:`add_missing_arrays`."""
        self._require_writable()
        return add_missing_arrays(self._root, self.plan)

    def write_tile(
        self,
        i: int,
        j: int,
        values: dict[str, np.ndarray],
        *,
        max_residual: float,
        iterations: int,
        seconds: float,
    ) -> dict[str, int]:
        """Write tile ``(i, j)`` (``i <= j``), its mirror, then its ledger entries.

        Parameters
        ----------
        i, j : int
            Tile indices with ``i <= j``.
        values : dict
            Kernel name -> float32 or float64 ndarray of shape (rows of block i, rows of
            block j); every kernel of the store must be present.  Values are rounded to the
            store dtype like ``astype``; an aligned C-contiguous block already in the store
            dtype is written without a copy.
        max_residual, iterations, seconds : float, int, float
            Convergence report and compute time, recorded in the ledger.

        Returns
        -------
        dict
            ``{"checksum": crc of chunk (i, j), "mirror_checksum": crc of chunk (j, i),
            "identity": the tile's identity digest}`` (the crc32 over all kernels' chunks, in
            ``kernels`` order).
        """
        self._require_writable()
        if not 0 <= i <= j < self.plan.n_blocks:
            raise InputError(
                f"tile must satisfy 0 <= i <= j < {self.plan.n_blocks}, got ({i}, {j})"
            )
        r0, r1 = self.plan.bounds(i)
        c0, c1 = self.plan.bounds(j)
        crc = crc_m = 0
        for name in self.kernels:
            block = values[name]
            if block.shape != (r1 - r0, c1 - c0):
                raise InputError(
                    f"tile ({i}, {j}) {name} must have shape {(r1 - r0, c1 - c0)}, "
                    f"got {block.shape}"
                )
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
                crc = crc32(memoryview(cast).cast("B"), crc)
            else:
                if ready:
                    cast, mirror = block, self._scratch(block.shape)[1]
                    writes = [self._submit_chunk(name, i, j, cast, 0)]
                    _transpose_into(block, mirror)
                else:
                    cast, mirror = cast_and_mirror(block, self.dtype, self._scratch(block.shape))
                    writes = [self._submit_chunk(name, i, j, cast, 0)]
                writes.append(self._submit_chunk(name, j, i, mirror, 1))
                crc = crc32(memoryview(cast).cast("B"), crc)
                crc_m = crc32(memoryview(mirror).cast("B"), crc_m)
            for w in writes:
                if w is not None:
                    w.result()
        if i == j:
            crc_m = crc
        digest = self.tile_digest(i, j)
        entries = {
            "checksum": (crc, crc_m),
            "max_residual": (max_residual, max_residual),
            "iterations": (iterations, iterations),
            "seconds": (seconds, seconds),
            "finished": (time.time(),) * 2,
            "identity": (digest, digest),
            "done": (True, True),
        }
        fields = self.ledger_fields()
        # the data is in place: now the ledger, ``done`` last, the mirror's entry first
        for field, (upper, lower) in entries.items():
            if field not in fields:
                continue
            if i != j:
                self._put_ledger(field, j, i, lower)
            self._put_ledger(field, i, j, upper)
        return {"checksum": int(crc), "mirror_checksum": int(crc_m), "identity": digest}

    def _scratch(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Reused (up, lo) cast buffers for tiles of ``shape``."""
        bufs = self.__dict__.setdefault("_scratch_bufs", AlignedBuffers())
        b = bufs.get(shape, {"up": shape, "lo": shape[::-1]}, self.dtype)
        return b["up"], b["lo"]

    def _raw_chunks(self, name: str) -> bool:
        """Whether chunk ``name`` files are the raw little-endian C-order values (local store,
        bytes codec only, "/" chunk keys), so whole chunks can be written without zarr."""
        key = ("_raw", name)
        if key not in self.__dict__:
            meta = self._root[name].metadata
            codecs = getattr(meta, "codecs", ())
            enc = getattr(meta, "chunk_key_encoding", None)
            self.__dict__[key] = (
                isinstance(self._root.store, zarr.storage.LocalStore)
                and len(codecs) == 1
                and type(codecs[0]).__name__ == "BytesCodec"
                and (
                    str(getattr(codecs[0].endian, "value", codecs[0].endian)) == "little"
                    or (codecs[0].endian is None and self._root[name].dtype.itemsize == 1)
                )
                and type(enc).__name__ == "DefaultChunkKeyEncoding"
                and enc.separator == "/"
                and np.little_endian
            )
        return self.__dict__[key]

    def _put_ledger(self, field: str, bi: int, bj: int, value) -> None:
        """Ledger entry (bi, bj) of ``field``: its one-element chunk file (the bytes zarr
        writes) where the layout allows, else through zarr."""
        name = f"ledger/{field}"
        if not self._raw_chunks(name):
            self._root[name][bi, bj] = value
            return
        item = np.array([value], dtype=np.dtype(LEDGER_FIELDS[field][0]).newbyteorder("<"))
        self._write_chunk_file(name, bi, bj, item, direct=False)

    def _put_chunk(self, name: str, bi: int, bj: int, data: np.ndarray, *, slot: int = 0) -> None:
        """Write chunk (bi, bj) of ``name`` whole; ``data`` is C-contiguous, store dtype.

        Uncompressed local chunks are written directly (exactly the bytes zarr writes: the
        values, edge chunks padded with the NaN fill value), which is ~2x faster than a zarr
        write of the same chunk; anything else goes through zarr.
        """
        r0, r1 = self.plan.bounds(bi)
        c0, c1 = self.plan.bounds(bj)
        if not self._raw_chunks(name):
            self._root[name][r0:r1, c0:c1] = data
            return
        t = self.tile
        if data.shape != (t, t):
            pads = self.__dict__.setdefault("_pad_bufs", {})
            full = pads.get(slot)
            if full is None:  # one per concurrent writer (``slot``)
                full = pads[slot] = aligned_empty((t, t), self.dtype)
            full.fill(np.nan)
            full[: r1 - r0, : c1 - c0] = data
            data = full
        if "_direct" not in self.__dict__:
            self.__dict__["_direct"] = _direct_io_enabled()
        direct = self.__dict__["_direct"]
        used = self._write_chunk_file(name, bi, bj, np.ascontiguousarray(data), direct=direct)
        if direct and not used and data.nbytes >= DIRECT_MIN_BYTES:
            self.__dict__["_direct"] = False  # not on this filesystem: stop trying

    def _submit_chunk(self, name: str, bi: int, bj: int, data: np.ndarray, slot: int):
        """:meth:`_put_chunk` on an I/O thread for raw chunk files (returns its future),
        else at once (returns None)."""
        if not self._raw_chunks(name):
            self._put_chunk(name, bi, bj, data)
            return None
        return _io_pool().submit(self._put_chunk, name, bi, bj, data, slot=slot)

    def _write_chunk_file(
        self, name: str, bi: int, bj: int, data: np.ndarray, *, direct: bool
    ) -> bool:
        """Replace chunk file (bi, bj) of array ``name`` whole: a temp file beside it, then
        an atomic rename, so a reader never sees part of a chunk.  Returns whether direct
        I/O was used (:func:`write_file`)."""
        path = Path(self.path) / name / "c" / str(bi) / str(bj)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
        try:
            used = write_file(tmp, data, direct=direct)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return used

    def write_self_covariance(self, start: int, stop: int, values: np.ndarray) -> None:
        """Write rows ``[start, stop)`` (one aux row chunk) of the CDEQ self-covariances."""
        self._require_writable()
        arr = self._root["aux/self_cov"]
        rows = arr.chunks[0]
        if start % rows or not (stop == min(start + rows, self.n)):
            raise InputError(
                f"self-covariance rows must be one aux chunk [k*{rows}, "
                f"min((k+1)*{rows}, n)), got [{start}, {stop})"
            )
        values = np.ascontiguousarray(values, dtype="<f8")
        if values.shape != (stop - start, *arr.shape[1:]):
            raise InputError(
                f"self-covariance rows [{start}, {stop}) must have shape "
                f"{(stop - start, *arr.shape[1:])}, got {values.shape}"
            )
        arr[start:stop] = values
        k = start // rows
        marks = {
            "self_cov_checksum": crc32(memoryview(values).cast("B")),
            "self_cov_identity": aux_digest(self.identity_digest, start, stop),
            "self_cov_done": True,
        }
        for name, value in marks.items():  # data first, ``done`` last
            if self.has(f"aux/{name}"):
                self._root[f"aux/{name}"][k] = value

    def aux_chunks(self) -> list[tuple[int, int, int]]:
        """``(k, start, stop)`` of every self-covariance row chunk (CDEQ stores; else [])."""
        if not self.has("aux/self_cov"):
            return []
        rows = self._node("aux/self_cov").chunks[0]
        return [(k, a, min(a + rows, self.n)) for k, a in enumerate(range(0, self.n, rows))]

    def aux_identity_check(self) -> tuple[list[int], list[int]]:
        """Written self-covariance chunks (indices) computed under another identity, and
        those written without a digest (older software)."""
        chunks = self.aux_chunks()
        if not chunks:
            return [], []
        done = np.asarray(self._node("aux/self_cov_done")[...])
        if not self.has("aux/self_cov_identity"):
            return [], [k for k, _, _ in chunks if done[k]]
        ids = np.asarray(self._node("aux/self_cov_identity")[...])
        foreign, legacy = [], []
        for k, a, b in chunks:
            if not done[k] or int(ids[k]) == aux_digest(self.identity_digest, a, b):
                continue
            (legacy if int(ids[k]) == 0 else foreign).append(k)
        return foreign, legacy

    def self_covariance_missing(self) -> list[tuple[int, int]]:
        """Row chunks ``(start, stop)`` of ``aux/self_cov`` not yet written (CDEQ only)."""
        if "aux" not in self._root:
            return []
        flags = np.asarray(self._root["aux/self_cov_done"][...])
        return [(a, b) for k, a, b in self.aux_chunks() if not flags[k]]

    def self_covariance_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the stored self-covariances, float64 (rows, H, W)."""
        return np.asarray(self._root["aux/self_cov"][start:stop])


def _slice_range(name: str, s: slice, n: int) -> tuple[int, int]:
    if not isinstance(s, slice):
        raise InputError(f"{name} must be a slice, got {type(s).__name__}")
    start, stop, step = s.indices(n)
    if step != 1:
        raise InputError(f"{name} must be a contiguous slice (step 1), got step {step}")
    return start, max(start, stop)


def _open_group(path: Path, *, writable: bool) -> zarr.Group:
    if not path.exists():
        raise StoreError(f"kernel store not found: {path}")
    try:
        root = zarr.open_group(str(path), mode="r+" if writable else "r")
    except Exception as exc:
        raise StoreError(f"not a zarr group (kernel store expected): {path}: {exc}") from exc
    fmt = root.attrs.get("format")
    if fmt != KERNEL_FORMAT:
        raise StoreError(
            f"not a deqntk kernel store (attrs['format'] must be {KERNEL_FORMAT!r}, "
            f"got {fmt!r}): {path}"
        )
    version = int(root.attrs.get("format_version", -1))
    if version > KERNEL_FORMAT_VERSION:
        raise StoreError(
            f"kernel store format_version {version} is newer than this software supports "
            f"({KERNEL_FORMAT_VERSION}): {path}"
        )
    return root


def open_kernel_store(path, *, writable: bool = False) -> KernelStore:
    """Open a kernel store (read-only by default).

    Raises
    ------
    StoreError
        Missing path, not a kernel store, or a newer format version.
    """
    p = Path(path).absolute()
    return KernelStore(p, _open_group(p, writable=writable), writable=writable)


def add_missing_arrays(root: zarr.Group, plan: TilePlan) -> list[str]:
    """Create the ledger, aux-checksum and lease arrays a store lacks (all of them for a new
    store; those introduced since for a store made by older software).

    Returns
    -------
    list of str
        The arrays added.
    """
    added = []
    nb = plan.n_blocks
    ledger = root["ledger"] if "ledger" in root else root.create_group("ledger")
    for field, (fdtype, fill) in LEDGER_FIELDS.items():
        if field not in ledger:
            ledger.create_array(
                field, shape=(nb, nb), dtype=fdtype, chunks=(1, 1), fill_value=fill,
                compressors=None,
            )  # fmt: skip
            added.append(f"ledger/{field}")
    if "aux" in root:
        aux = root["aux"]
        chunks = aux["self_cov_done"].shape[0]
        for name, (fdtype, fill) in AUX_FIELDS.items():
            if name not in aux:
                aux.create_array(
                    name, shape=(chunks,), dtype=fdtype, chunks=(1,), fill_value=fill,
                    compressors=None,
                )  # fmt: skip
                added.append(f"aux/{name}")
    if "leases" not in root:
        root.create_array(
            "leases", shape=(nb, nb, LEASE_BYTES), dtype="uint8", chunks=(1, 1, LEASE_BYTES),
            fill_value=0, compressors=None,
        )  # fmt: skip
        added.append("leases")
    return added
