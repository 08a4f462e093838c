"""Kernel store: a symmetric N x N Gram in a zarr v3 group, with a per-tile ledger.

Layout 2 (new stores; DESIGN.md §3; all keys relative to the group)
--------------------------------------------------------------------
``ntk``, ``nngp``       (N, N) float32 or float64, sharded: one shard per tile (tile x tile),
                        inner chunks ``chunk`` x ``chunk`` (attrs ``chunk``; 1024 or the tile
                        if smaller), no compression, fill value NaN.  Each shard is written
                        whole by one task (:mod:`.shards`).
``ledger/records``      (nb, nb, 512) uint8, one chunk (``c.I.J.0``) per tile I <= J: a JSON
                        record of its checksums, residual, iterations, time and identity
                        digest, written after the data (:mod:`.ledger`).
``labels``              (N,) int64 copy of the dataset's ``y`` (train rows first).

Layout 1 (older stores; read, resumed, verified and migrated)
-------------------------------------------------------------
``ntk``, ``nngp``       chunks (tile, tile), no compression, fill value NaN.
``ledger/<field>``      (nb, nb) on the tile grid, chunks (1, 1) so every tile writes its own
                        ledger files: ``done`` (bool), ``checksum`` (uint32 crc32 of the
                        chunk's values as written, C order little-endian), ``max_residual``,
                        ``iterations``, ``seconds`` (compute time of the tile), ``finished``
                        (unix time).  Tile (I, J), I <= J, writes entries [I, J] and [J, I]
                        (the mirror's own checksum), ``done`` last and only after the data.
                        ``identity`` (uint64 digest of the store identity and the tile's
                        geometry, :mod:`.identity`; 0 or absent: written by older software).

Both layouts
------------
``aux/self_cov``        CDEQ only: per-example self-covariances (N, H, W) float64, computed
                        once before the tiles; per row chunk ``aux/self_cov_checksum``
                        (crc32), ``aux/self_cov_identity`` (digest), ``aux/self_cov_done``.
``leases``              (nb, nb, 256) uint8: tile leases of running ``compute`` jobs
                        (:mod:`.lease`; local stores); all zero when no job runs.
``results/<kernel>``    written by ``solve`` (:mod:`.results`).
attrs                   ``format`` "deqntk-kernel-store", ``format_version`` (1 or 2),
                        ``chunk`` (layout 2), ``spec``,
                        ``dataset`` {path, fingerprint, n, n_train, name}, ``tile``, ``dtype``,
                        ``kernels``, ``options``, ``software`` {name, version}; ``labels``
                        attrs ``crc32``.
"""

from __future__ import annotations

import errno
import time
import uuid
from typing import Any, cast

import numpy as np
import zarr

from ..errors import (
    DeqntkError,
    IncompleteStoreError,
    InputError,
    StoreError,
    StoreNotFoundError,
)
from ..options import ComputeOptions
from ..plan import TilePlan
from ..spec import CDEQSpec, DEQSpec, spec_from_dict
from .chunkio import (
    byte_view,
    crc32,
    zarr_array,
)
from .dataset import DatasetStore, open_dataset_store
from .identity import aux_digest, identity_digest, store_identity, tile_digest
from .ledger import (
    LEDGER_FIELDS,
    RECORD_BYTES,
    RECORDS,
    ArrayLedger,
    RecordLedger,
    combined_checksum,
)
from .location import Location
from .shards import ShardGeometry
from .tileio import TileIO

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
#: The layout new stores get (2: one shard per tile, one ledger record per tile); layout 1
#: (one chunk per tile, a ledger file per field and tile half) is read, resumed and
#: verified, and ``deqntk migrate`` rewrites it as layout 2.
KERNEL_FORMAT_VERSION = 2
FORMAT_VERSIONS = (1, 2)
KERNEL_NAMES = ("ntk", "nngp")
DTYPES = ("float32", "float64")
#: Write errors that retrying cannot fix: reported at once, without dask's logs.
FATAL_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
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


def _recorded_options(raw: Any) -> ComputeOptions | None:
    """The ``compute_options`` record of a store's attrs (None: absent or malformed; it is
    a record of how the store was made, not part of its identity)."""
    if raw is None:
        return None
    try:
        return ComputeOptions.from_dict(raw)
    except (DeqntkError, TypeError):
        return None


class KernelStore(TileIO):
    """An opened kernel store: metadata, reader API and (when writable) tile writes.

    Use :func:`open_kernel_store` to read a store and :func:`create_kernel_store` to make
    one.  Attributes: ``path``, ``spec``, ``n``, ``n_train``, ``n_test``, ``tile``,
    ``dtype``, ``kernels``, ``options``, ``compute_options`` (the
    :class:`~deqntk_dist.options.ComputeOptions` of the job that created it, or None),
    ``dataset_path``, ``dataset_fingerprint``, ``plan``
    (:class:`~deqntk_dist.plan.TilePlan`), ``attrs``, ``identity`` and ``identity_digest``
    (what the attrs claim every tile was computed under, :mod:`.identity`).

    Raises
    ------
    StoreError
        Malformed attrs.
    """

    def __init__(self, path, root: zarr.Group, *, writable: bool):
        self.loc = Location.parse(path)
        self.path = str(self.loc)
        self._root = root
        self.writable = writable
        attrs: dict[str, Any] = dict(root.attrs)  # JSON, checked below
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
            self.compute_options = _recorded_options(attrs.get("compute_options"))
            self.plan = TilePlan(n=self.n, tile=self.tile)
            self.format_version = int(attrs.get("format_version", 1))
            if self.format_version not in FORMAT_VERSIONS:
                raise ValueError(f"format_version must be one of {FORMAT_VERSIONS}")
            self.geometry: ShardGeometry | None = None
            if self.format_version >= 2:
                self.geometry = ShardGeometry(self.tile, int(attrs["chunk"]), self.dtype)
        except (DeqntkError, KeyError, TypeError, ValueError) as exc:
            raise StoreError(
                f"kernel store attrs are malformed ({path}/zarr.json): {type(exc).__name__}: {exc}"
            ) from exc
        self.n_test = self.n - self.n_train
        #: what every tile must have been computed under (:mod:`.identity`)
        self.identity = store_identity(attrs)
        self.identity_digest = identity_digest(self.identity)
        self._ledger_impl = RecordLedger(self) if self.format_version >= 2 else ArrayLedger(self)

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
        return self.loc.exists(f"{key}/zarr.json")

    def to_dask(self, name: str):
        """``name`` as a ``dask.array`` with one block per chunk (a tile in layout 1, an
        inner chunk in layout 2; lazy, read on compute)."""
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
            done = self._ledger_impl.done_grid()[r0 // t : -(-r1 // t), c0 // t : -(-c1 // t)]
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
        if "aux" not in self._root or "self_cov" not in cast(zarr.Group, self._root["aux"]):
            return None
        return np.asarray(zarr_array(self._root, "aux/self_cov")[...])

    # ------------------------------------------------------------------------- ledger
    def _ledger(self, field: str) -> np.ndarray:
        """Ledger ``field`` on the (nb, nb) tile grid (both halves of every tile)."""
        return self._ledger_impl.grid(field)

    def ledger_fields(self) -> tuple[str, ...]:
        """The ledger fields this store has (``identity`` is missing from older stores until
        a resume adds it; checked on every call, as another process may add it)."""
        return self._ledger_impl.fields()

    def ledger(self) -> dict[str, np.ndarray]:
        """All ledger fields, each of shape (nb, nb) on the tile grid (in layout 2,
        ``checksum`` is 0: its records keep one checksum per kernel, see :meth:`record`)."""
        if isinstance(self._ledger_impl, RecordLedger):
            return self._ledger_impl.grids()
        return {f: self._ledger(f) for f in self.ledger_fields()}

    def record(self, i: int, j: int) -> dict | None:
        """Layout 2: the ledger record of tile (i, j) (None: not done, or malformed)."""
        if not isinstance(self._ledger_impl, RecordLedger):
            raise StoreError(f"{self.path}: layout {self.format_version} has no tile records")
        return self._ledger_impl.record(i, j)

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
        foreign: list[tuple[int, int]] = []
        legacy: list[tuple[int, int]] = []
        for i, j in done:
            want = self.tile_digest(i, j)
            have = {int(led["identity"][i, j]), int(led["identity"][j, i])}
            if have == {want}:
                continue
            (legacy if have == {0} else foreign).append((i, j))
        return foreign, legacy

    def ledger_entry_exists(self, field: str, bi: int, bj: int) -> bool | None:
        """Whether entry (bi, bj) of ``ledger/field`` (layout 2: the tile's record) was
        written; None where the layout does not tell (not an uncompressed store)."""
        return self._ledger_impl.entry_exists(field, bi, bj)

    def chunk_key(self, name: str, *index: int) -> str:
        """Key of chunk (layout 2: shard) ``index`` of array ``name`` ("/" chunk keys)."""
        return "/".join((name, "c", *map(str, index)))

    def missing_tiles(self) -> list[tuple[int, int]]:
        """Upper-triangle tiles ``(I, J)`` not marked done, in plan order."""
        done = self._ledger_impl.done_grid()
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
        """Create and delete a probe wherever a resume writes (the store, the kernel arrays,
        the ledger, the leases, the self-covariances), so a read-only or full filesystem (or
        a bucket without write access) is reported before any work starts.

        Raises
        ------
        StoreError
        """
        self._require_writable()
        keys = ["", *self.kernels, "ledger", "ledger/done", "leases", "aux/self_cov"]
        for key in keys:
            if key and not self.loc.exists(key):
                continue
            probe = f"{key}/.deqntk-probe-{uuid.uuid4().hex[:12]}".lstrip("/")
            try:
                self.loc.put(probe, b"\0")
                self.loc.delete(probe)
            except OSError as exc:
                raise StoreError(
                    f"kernel store {self.path} is not writable ({exc.strerror or exc} in "
                    f"{self.loc.child(key) if key else self.loc})"
                ) from exc

    def invalidate(self, *, tiles=(), aux_chunks=()) -> None:
        """Mark ``tiles`` (both halves) and self-covariance row chunks ``aux_chunks`` (indices)
        not done, so that ``compute`` runs them again."""
        self._require_writable()
        for i, j in tiles:
            self._ledger_impl.invalidate(i, j)
        for k in aux_chunks:
            self._root["aux/self_cov_done"][k] = False

    def tile_done(self, i: int, j: int) -> bool:
        """Whether tile ``(i, j)`` is marked done now (one ledger entry or record read)."""
        return self._ledger_impl.tile_done(i, j)

    def ledger_entry(self, field: str, i: int, j: int):
        """One ledger value of tile ``(i, j)`` (a single chunk or record read)."""
        if isinstance(self._ledger_impl, RecordLedger):
            rec = self._ledger_impl.record(i, j)
            if rec is None:
                return LEDGER_FIELDS[field][1]
            if field == "done":
                return True
            if field == "checksum":
                return combined_checksum(rec, upper=i <= j)
            return rec[field]
        return self._node(f"ledger/{field}")[i, j]

    def add_missing_arrays(self) -> list[str]:
        """Add the arrays introduced since this store was made (identity ledger, aux
        checksums, leases); returns their names.  See :func:`add_missing_arrays`."""
        self._require_writable()
        return add_missing_arrays(self._root, self.plan, self.format_version, self.loc)

    def write_tile(
        self,
        i: int,
        j: int,
        values: dict[str, np.ndarray],
        *,
        max_residual: float,
        iterations: int,
        seconds: float,
        finished: float | None = None,
        identity: int | None = None,
    ) -> dict[str, int]:
        """Write tile ``(i, j)`` (``i <= j``), its mirror, then its ledger entries.

        Parameters
        ----------
        i, j : int
            Tile indices with ``i <= j``.
        values : dict
            Kernel name -> float32 or float64 ndarray of shape (rows of block i, rows of
            block j); every kernel of the store must be present.  Values are rounded to the
            store dtype like ``astype``; in layout 1 an aligned C-contiguous block already
            in the store dtype is written without a copy.
        max_residual, iterations, seconds : float, int, float
            Convergence report and compute time, recorded in the ledger.
        finished, identity : float, int, optional
            When the tile was finished (default now) and its identity digest (default
            :meth:`tile_digest`); a migration keeps the ones the tile was written with.

        Returns
        -------
        dict
            ``{"checksum": crc of chunk (i, j), "mirror_checksum": crc of chunk (j, i),
            "identity": the tile's identity digest}`` (layout 1: the crc32 over all
            kernels' chunks, in ``kernels`` order; layout 2: over all kernels' shards).
        """
        self._require_writable()
        if not 0 <= i <= j < self.plan.n_blocks:
            raise InputError(
                f"tile must satisfy 0 <= i <= j < {self.plan.n_blocks}, got ({i}, {j})"
            )
        r0, r1 = self.plan.bounds(i)
        c0, c1 = self.plan.bounds(j)
        for name in self.kernels:
            if values[name].shape != (r1 - r0, c1 - c0):
                raise InputError(
                    f"tile ({i}, {j}) {name} must have shape {(r1 - r0, c1 - c0)}, "
                    f"got {values[name].shape}"
                )
        write = self._write_shards if self.geometry is not None else self._write_chunks
        sums = write(i, j, values)
        digest = self.tile_digest(i, j) if identity is None else int(identity)
        finished = time.time() if finished is None else float(finished)
        if isinstance(self._ledger_impl, RecordLedger):
            rec = {
                "v": 1,
                "tile": [i, j],
                "rows": [r0, r1],
                "cols": [c0, c1],
                "checksums": {k: list(v) for k, v in sums.items()},
                "max_residual": float(max_residual),
                "iterations": int(iterations),
                "seconds": float(seconds),
                "finished": finished,
                "identity": digest,
            }
            self._ledger_impl.write(i, j, rec)  # after the data: the tile is done
            crc = combined_checksum(rec, upper=True)
            crc_m = combined_checksum(rec, upper=False)
        else:
            crc, crc_m = sums["*"]
            self._ledger_impl.write(
                i,
                j,
                {
                    "checksum": (crc, crc_m),
                    "max_residual": (max_residual, max_residual),
                    "iterations": (iterations, iterations),
                    "seconds": (seconds, seconds),
                    "finished": (finished, finished),
                    "identity": (digest, digest),
                    "done": (True, True),
                },
            )
        return {"checksum": int(crc), "mirror_checksum": int(crc_m), "identity": digest}

    def write_self_covariance(self, start: int, stop: int, values: np.ndarray) -> None:
        """Write rows ``[start, stop)`` (one aux row chunk) of the CDEQ self-covariances."""
        self._require_writable()
        arr = zarr_array(self._root, "aux/self_cov")
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
            "self_cov_checksum": crc32(byte_view(values)),
            "self_cov_identity": aux_digest(self.identity_digest, start, stop),
            "self_cov_done": True,
        }
        for name, value in marks.items():  # data first, ``done`` last
            if self.has(f"aux/{name}"):
                zarr_array(self._root, f"aux/{name}")[k] = value

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
        foreign: list[int] = []
        legacy: list[int] = []
        for k, a, b in chunks:
            if not done[k] or int(ids[k]) == aux_digest(self.identity_digest, a, b):
                continue
            (legacy if int(ids[k]) == 0 else foreign).append(k)
        return foreign, legacy

    def self_covariance_missing(self) -> list[tuple[int, int]]:
        """Row chunks ``(start, stop)`` of ``aux/self_cov`` not yet written (CDEQ only)."""
        if "aux" not in self._root:
            return []
        flags = np.asarray(zarr_array(self._root, "aux/self_cov_done")[...])
        return [(a, b) for k, a, b in self.aux_chunks() if not flags[k]]

    def self_covariance_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the stored self-covariances, float64 (rows, H, W)."""
        return np.asarray(zarr_array(self._root, "aux/self_cov")[start:stop])


def _slice_range(name: str, s: slice, n: int) -> tuple[int, int]:
    if not isinstance(s, slice):
        raise InputError(f"{name} must be a slice, got {type(s).__name__}")
    start, stop, step = s.indices(n)
    if step != 1:
        raise InputError(f"{name} must be a contiguous slice (step 1), got step {step}")
    return start, max(start, stop)


def _open_group(loc: Location, *, writable: bool) -> zarr.Group:
    if not loc.exists("zarr.json"):
        if not loc.exists():
            raise StoreNotFoundError(f"kernel store not found: {loc}")
        raise StoreError(f"not a zarr group (kernel store expected; no zarr.json): {loc}")
    try:
        root = zarr.open_group(
            store=loc.zarr_store(read_only=not writable), mode="r+" if writable else "r"
        )
    except Exception as exc:
        raise StoreError(f"not a zarr group (kernel store expected): {loc}: {exc}") from exc
    fmt = root.attrs.get("format")
    if fmt != KERNEL_FORMAT:
        raise StoreError(
            f"not a deqntk kernel store (attrs['format'] must be {KERNEL_FORMAT!r}, "
            f"got {fmt!r}): {loc}"
        )
    version = root.attrs.get("format_version", -1)
    if version not in FORMAT_VERSIONS:
        newer = isinstance(version, int) and version > KERNEL_FORMAT_VERSION
        raise StoreError(
            f"kernel store format_version {version!r} is "
            f"{'newer than this software supports' if newer else 'not one of'} "
            f"({', '.join(map(str, FORMAT_VERSIONS))}): {loc}"
        )
    return root


def open_kernel_store(path, *, writable: bool = False) -> KernelStore:
    """Open a kernel store (read-only by default).

    Parameters
    ----------
    path : str, os.PathLike or Location
        A local path or a store URL (``s3://bucket/key.zarr``, any fsspec URL; credentials
        and endpoint from the usual environment variables).

    Raises
    ------
    StoreNotFoundError
        Nothing at ``path``.
    StoreError
        Not a kernel store, or a format version this software does not know.
    """
    loc = Location.parse(path, param="kernel store")
    return KernelStore(loc, _open_group(loc, writable=writable), writable=writable)


def add_missing_arrays(
    root: zarr.Group, plan: TilePlan, version: int = KERNEL_FORMAT_VERSION, loc=None
) -> list[str]:
    """Create the ledger, aux-checksum and lease arrays a store lacks (all of them for a new
    store; those introduced since for a store made by older software).  Layout 2 has one
    ledger array (``ledger/records``); leases are kept on local stores only.

    Returns
    -------
    list of str
        The arrays added.
    """
    added = []
    nb = plan.n_blocks
    ledger = cast(zarr.Group, root["ledger"]) if "ledger" in root else root.create_group("ledger")
    if version >= 2:
        if "records" not in ledger:
            ledger.create_array(
                "records", shape=(nb, nb, RECORD_BYTES), dtype="uint8",
                chunks=(1, 1, RECORD_BYTES), fill_value=0, compressors=None,
                chunk_key_encoding={"name": "default", "separator": "."},
            )  # fmt: skip
            added.append(RECORDS)
    else:
        for field, (fdtype, fill) in LEDGER_FIELDS.items():
            if field not in ledger:
                ledger.create_array(
                    field, shape=(nb, nb), dtype=fdtype, chunks=(1, 1), fill_value=fill,
                    compressors=None,
                )  # fmt: skip
                added.append(f"ledger/{field}")
    if "aux" in root:
        aux = cast(zarr.Group, root["aux"])
        chunks = zarr_array(aux, "self_cov_done").shape[0]
        for name, (fdtype, fill) in AUX_FIELDS.items():
            if name not in aux:
                aux.create_array(
                    name, shape=(chunks,), dtype=fdtype, chunks=(1,), fill_value=fill,
                    compressors=None,
                )  # fmt: skip
                added.append(f"aux/{name}")
    if "leases" not in root and (loc is None or loc.is_local):
        root.create_array(
            "leases", shape=(nb, nb, LEASE_BYTES), dtype="uint8", chunks=(1, 1, LEASE_BYTES),
            fill_value=0, compressors=None,
        )  # fmt: skip
        added.append("leases")
    return added
