"""Tile leases: a ``compute`` job claims each tile before it submits it, so a second job on
the same store takes the tiles that are neither done nor leased instead of computing every
tile again.

A lease is chunk ``(I, J)`` of the store's ``leases`` array (uint8, ``LEASE_BYTES`` per
tile): a file created exclusively (``O_EXCL``) holding the owner's token, host, process id
and process start time as JSON, zero-padded.  The owner renews it (the file's mtime) from a
heartbeat thread every ``ttl / 4`` seconds and deletes it when the tile is done.  A lease is
*stale*, and is taken over, when it has not been renewed for ``ttl`` seconds (dask config
``deqntk.lease-ttl``, default 120) or when its owner ran on this host and that process is
gone; so a killed job never holds a tile for long.  Leases only avoid double work: two jobs
that both compute a tile (a lease taken over from a job that was alive after all) write the
same bytes, each chunk by an atomic rename.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import StoreError
from .core import FATAL_WRITE_ERRNOS, LEASE_BYTES

__all__ = ["LeaseOwner", "NoLeases", "TileLeases", "lease_ttl", "leases_for"]


def lease_ttl() -> float:
    """Seconds without renewal after which a lease is stale (``deqntk.lease-ttl``)."""
    from ..config import setting

    return float(setting("lease-ttl"))


@dataclass(frozen=True)
class LeaseOwner:
    """Who holds a lease: a token per job, and the job's host, pid and process start time."""

    token: str
    host: str
    pid: int
    start: float

    @classmethod
    def this_process(cls) -> LeaseOwner:
        import psutil

        return cls(
            token=uuid.uuid4().hex,
            host=socket.gethostname()[:64],
            pid=os.getpid(),
            start=round(psutil.Process().create_time(), 3),
        )

    def to_bytes(self) -> bytes:
        raw = json.dumps(asdict(self), separators=(",", ":")).encode()
        if len(raw) > LEASE_BYTES:  # pragma: no cover - host is truncated to 64 characters
            raise ValueError(f"lease record longer than {LEASE_BYTES} bytes: {raw!r}")
        return raw.ljust(LEASE_BYTES, b"\0")

    def describe(self) -> str:
        return f"{self.host} pid {self.pid}"


def _parse(raw: bytes) -> LeaseOwner | None:
    try:
        d = json.loads(raw.rstrip(b"\0").decode())
        return LeaseOwner(str(d["token"]), str(d["host"]), int(d["pid"]), float(d["start"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None  # being written (empty), or not ours to read


def _gone(owner: LeaseOwner) -> bool:
    """Whether the owner ran on this host and that process no longer exists."""
    if owner.host != socket.gethostname()[:64]:
        return False
    import psutil

    try:
        return abs(psutil.Process(owner.pid).create_time() - owner.start) > 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # pragma: no cover - e.g. access denied: assume alive
        return False


class TileLeases:
    """The leases one job holds on a store (``owner``), with a renewing heartbeat thread.

    Parameters
    ----------
    store_path : str or Path
        Kernel store with a ``leases`` array.
    owner : LeaseOwner, optional
        Default: a new owner for this process.
    ttl : float, optional
        Staleness limit in seconds (default :func:`lease_ttl`).
    """

    def __init__(self, store_path, owner: LeaseOwner | None = None, ttl: float | None = None):
        self.root = Path(store_path, "leases", "c")
        self.owner = owner or LeaseOwner.this_process()
        self.ttl = lease_ttl() if ttl is None else float(ttl)
        self._record = self.owner.to_bytes()
        self._held: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, i: int, j: int) -> Path:
        return self.root / str(i) / str(j) / "0"

    # ----------------------------------------------------------------- one lease
    def _read(self, i: int, j: int) -> tuple[LeaseOwner | None, float] | None:
        """``(owner, seconds since renewal)`` of tile ``(i, j)``'s lease, None if none."""
        path = self.path(i, j)
        try:
            with open(path, "rb") as f:
                raw = f.read(LEASE_BYTES + 1)
                age = time.time() - os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return _parse(raw), age

    def _ours(self, i: int, j: int) -> bool:
        state = self._read(i, j)
        return state is not None and state[0] is not None and state[0].token == self.owner.token

    def holder(self, i: int, j: int) -> tuple[LeaseOwner | None, bool] | None:
        """``(owner, stale)`` of tile ``(i, j)``'s lease, or None when there is none."""
        state = self._read(i, j)
        if state is None:
            return None
        owner, age = state
        return owner, age > self.ttl or (owner is not None and _gone(owner))

    def acquire(self, i: int, j: int) -> tuple[bool, LeaseOwner | None]:
        """Lease tile ``(i, j)`` for this job.

        Returns
        -------
        (bool, LeaseOwner or None)
            Whether this job holds the lease now; if not, who does (None: unknown).
        """
        path = self.path(i, j)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The lease is recorded as held *before* its file can exist, and the file appears
        # whole (a hard link of a written temp file): a Ctrl-C at any point leaves either
        # no file or a complete one that release_all() removes.
        with self._lock:
            self._held.add((i, j))
        tmp = path.with_name(f"0.new-{uuid.uuid4().hex[:12]}")
        try:
            tmp.write_bytes(self._record)
            taken, other = self._create(path, tmp, i, j)
        except OSError as exc:
            self.release(i, j)
            if exc.errno not in FATAL_WRITE_ERRNOS:
                raise
            raise StoreError(
                f"cannot write the lease of tile ({i}, {j}) in {path.parent}: "
                f"{exc.strerror or exc}; finished tiles are kept in the store"
            ) from exc
        except BaseException:
            self.release(i, j)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        if not taken:
            with self._lock:
                self._held.discard((i, j))
        return taken, other

    def _create(self, path: Path, tmp: Path, i: int, j: int) -> tuple[bool, LeaseOwner | None]:
        other = None
        for _ in range(4):
            try:
                os.link(tmp, path)
            except FileExistsError:
                state = self.holder(i, j)
                if state is None:
                    continue  # released meanwhile: try again
                other, stale = state
                if other is not None and other.token == self.owner.token:
                    return True, None  # ours already (e.g. a retried task)
                if not stale:
                    return False, other
                # stale: move it aside (one taker wins the rename), then create ours
                aside = path.with_name(f"0.stale-{uuid.uuid4().hex[:12]}")
                try:
                    os.rename(path, aside)
                    aside.unlink()
                except FileNotFoundError:
                    pass
                continue
            return True, None
        return False, other

    def release(self, i: int, j: int) -> None:
        """Give up tile ``(i, j)``'s lease if this job holds it (forgotten only once its file
        is gone, so that an interrupt in between leaves it to :meth:`release_all`)."""
        if self._ours(i, j):
            try:
                self.path(i, j).unlink()
            except FileNotFoundError:
                pass
        with self._lock:
            self._held.discard((i, j))

    def release_all(self) -> None:
        with self._lock:
            held = list(self._held)
        for t in held:
            self.release(*t)

    def renew(self) -> None:
        """Touch every lease this job holds (a lease taken over by another job is dropped)."""
        with self._lock:
            held = list(self._held)
        for t in held:
            if not self._ours(*t):
                with self._lock:
                    self._held.discard(t)
                continue
            try:
                os.utime(self.path(*t))
            except OSError:
                pass

    # ----------------------------------------------------------------- heartbeat
    def __enter__(self) -> TileLeases:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, name="deqntk-lease-heartbeat", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release_all()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except Exception:  # pragma: no cover - never let the heartbeat die
                pass


class NoLeases:
    """Leases on an object store: none.  Object stores give no exclusive create here, so
    two jobs on one bucket store may compute a tile twice; they write the same bytes, each
    shard and record a whole-object PUT, so no tile is lost or mixed."""

    def acquire(self, i: int, j: int) -> tuple[bool, LeaseOwner | None]:
        return True, None

    def release(self, i: int, j: int) -> None:
        pass

    def release_all(self) -> None:
        pass

    def renew(self) -> None:
        pass

    def __enter__(self) -> NoLeases:
        return self

    def __exit__(self, *exc) -> None:
        pass


def leases_for(store) -> TileLeases | NoLeases:
    """The tile leases of a kernel store: lease files on a local disk, none elsewhere."""
    return TileLeases(store.loc.url) if store.loc.is_local else NoLeases()
