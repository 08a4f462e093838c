"""Where a store lives: a local directory or any fsspec URL (``s3://``, ``gs://``, ...).

:class:`Location` is a small, immutable handle on a "directory" of a filesystem or object
store with the few whole-object operations the kernel store needs (atomic ``put``,
create-only ``put_if_absent``, ``get``, ``list``, ``delete``) and the zarr store of that
directory.  Local paths use plain ``os`` calls (temp file + ``os.replace``, hard links for
exclusive creation, optional direct I/O); remote URLs go through fsspec.

Credentials, region and endpoint of S3 come from the usual places of botocore: the
environment variables ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` (and
``AWS_ENDPOINT_URL_S3``), ``AWS_PROFILE``, or ``~/.aws/config`` and instance metadata.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, StoreError
from .chunkio import byte_view

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem
    from zarr.abc.store import Store

__all__ = ["Location", "storage_options"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
#: Protocols that name the local filesystem.
_LOCAL_PROTOCOLS = ("file", "local")
#: Protocols of S3 (s3fs), which support conditional (create-only) writes.
_S3_PROTOCOLS = ("s3", "s3a")
#: errno values of ``os.link`` on filesystems without hard links.
_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}

BytesLike = bytes | bytearray | memoryview | np.ndarray


def storage_options(url: str) -> dict[str, Any]:
    """The fsspec storage options used for ``url`` (by :meth:`Location.fs` and
    :meth:`Location.zarr_store`).

    Directory-listing caches are turned off (``use_listings_cache=False``): other processes
    write the same bucket, and a cached listing would hide their objects.  Nothing else is
    set: s3fs (through botocore >= 1.31) reads credentials, region and the endpoint
    (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``) from the environment by itself, and
    passing the endpoint explicitly would override the service-specific variable.

    Parameters
    ----------
    url : str
        A remote URL (``"scheme://..."``).

    Returns
    -------
    dict
        Keyword arguments for ``fsspec.filesystem(protocol, **options)``; JSON-serialisable.
    """
    protocol = _protocol(url)
    if protocol in _LOCAL_PROTOCOLS or protocol is None:
        return {}
    return {"use_listings_cache": False}


def _protocol(url: str) -> str | None:
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else None


def _clean_key(key: str, *, what: str = "key") -> str:
    """``key`` as ``'/'``-joined components; no empty, ``.`` or ``..`` parts, not absolute."""
    if not isinstance(key, str):
        raise InputError(f"{what} must be a str, got {type(key).__name__}")
    if key.startswith("/") or "\\" in key:
        raise InputError(f"{what} must be a relative '/'-separated key, got {key!r}")
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InputError(f"{what} must not contain '..', got {key!r}")
    return "/".join(parts)


@functools.lru_cache(maxsize=32)
def _filesystem(pid: int, protocol: str, options: str, env: tuple) -> AbstractFileSystem:
    """One fsspec filesystem per process, protocol, options and AWS environment (fsspec's
    own instance cache is skipped: an instance must not travel across ``fork``)."""
    import fsspec

    del pid, env  # cache keys only
    try:
        return fsspec.filesystem(protocol, skip_instance_cache=True, **json.loads(options))
    except ImportError as e:
        extra = " (pip install 'deqntk_dist[s3]')" if protocol in _S3_PROTOCOLS else ""
        raise StoreError(f"{protocol}:// needs a package that is not installed{extra}: {e}") from e


def _aws_env() -> tuple:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))


def _as_bytes_view(data: BytesLike, what: str = "data") -> memoryview:
    """A flat byte view of ``data`` (bytes-like or C-contiguous array), without copying."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise InputError(f"{what} must be C-contiguous to be written as raw bytes")
        return byte_view(data.reshape(-1).view(np.uint8))
    try:
        mv = memoryview(data)
    except TypeError:
        raise InputError(
            f"{what} must be bytes, a memoryview or an ndarray, got {type(data).__name__}"
        ) from None
    if not mv.c_contiguous:
        raise InputError(f"{what} must be C-contiguous to be written as raw bytes")
    return mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv


@dataclass(frozen=True)
class Location:
    """A directory of the local filesystem or a prefix of an fsspec filesystem.

    Parameters
    ----------
    url : str
        Normalised: an absolute local path (no scheme), or ``"scheme://bucket/key..."``
        without a trailing slash.  Use :meth:`parse` to build one from user input.

    Notes
    -----
    ``put`` replaces an object atomically (readers see the old or the new whole object,
    never a part); ``put_if_absent`` is exclusive locally (a hard link) and on S3 (a PUT
    with ``If-None-Match: *``), best effort elsewhere.  Names starting with ``"."`` are
    reserved for temp files and not listed.
    """

    url: str

    # ---------------------------------------------------------------- construction
    @classmethod
    def parse(cls, where: str | os.PathLike | Location, *, param: str = "where") -> Location:
        """A :class:`Location` from a local path, a ``file://`` URL or an fsspec URL.

        Parameters
        ----------
        where : str, os.PathLike or Location
            Local paths (relative ones are made absolute, ``~`` is expanded) and
            ``file://`` URLs give a local location; ``"s3://bucket/prefix"``,
            ``"gs://..."``, ``"memory://..."`` etc. a remote one.
        param : str
            The parameter name quoted in error messages.

        Returns
        -------
        Location

        Raises
        ------
        InputError
            Empty input, a URL without a path, an unknown protocol, ``..`` in a URL or a
            chained URL (``a::b://``).
        """
        if isinstance(where, Location):
            return where
        if isinstance(where, os.PathLike):
            where = os.fspath(where)
        if isinstance(where, bytes):
            where = os.fsdecode(where)
        if not isinstance(where, str):
            raise InputError(f"{param} must be a path or URL, got {type(where).__name__}")
        if not where.strip():
            raise InputError(f"{param} must not be empty")
        if "::" in where:
            raise InputError(f"{param}: chained fsspec URLs are not supported, got {where!r}")
        m = _SCHEME.match(where)
        if m is None:
            return cls(os.path.abspath(os.path.expanduser(where)))
        protocol, rest = m.group(1).lower(), m.group(2)
        if protocol in _LOCAL_PROTOCOLS:
            if not rest.strip("/"):
                if rest.startswith("/"):
                    return cls(os.path.sep)
                raise InputError(f"{param}: URL {where!r} has no path")
            return cls(os.path.abspath(rest))
        import fsspec

        if protocol not in fsspec.available_protocols():
            raise InputError(f"{param}: unknown protocol {protocol!r} in {where!r}")
        try:
            key = _clean_key(rest.strip("/"), what=param)
        except InputError as e:
            raise InputError(f"{param}: bad URL {where!r} ({e})") from None
        if not key:
            raise InputError(f"{param}: URL {where!r} has no bucket or path")
        return cls(f"{protocol}://{key}")

    def __str__(self) -> str:
        return self.url

    # ---------------------------------------------------------------- properties
    @property
    def protocol(self) -> str:
        """``"file"`` for local locations, else the URL scheme (``"s3"``, ...)."""
        return _protocol(self.url) or "file"

    @property
    def is_local(self) -> bool:
        """Whether this is a local path (no scheme)."""
        return _protocol(self.url) is None

    @property
    def local_path(self) -> Path:
        """The local directory as a :class:`~pathlib.Path`.

        Raises
        ------
        StoreError
            For a remote location.
        """
        if not self.is_local:
            raise StoreError(f"{self.url} is not a local path")
        return Path(self.url)

    @property
    def name(self) -> str:
        """The last path component (the bucket name for a bucket root)."""
        if self.is_local:
            return os.path.basename(self.url)
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        """The enclosing directory (itself for ``/`` and for a bucket root)."""
        if self.is_local:
            return Location(os.path.dirname(self.url))
        path = self.url.split("://", 1)[1]
        if "/" not in path:
            return self
        return Location(f"{self.protocol}://{path.rsplit('/', 1)[0]}")

    def child(self, key: str) -> Location:
        """The location ``key`` (relative, ``'/'``-separated) below this one."""
        key = _clean_key(key)
        if not key:
            return self
        if self.is_local:
            return Location(os.path.join(self.url, *key.split("/")))
        return Location(f"{self.url}/{key}")

    # ---------------------------------------------------------------- backends
    def fs(self) -> AbstractFileSystem:
        """The fsspec filesystem of this location (synchronous; cached per process,
        protocol, options and ``AWS_*`` environment).  A ``LocalFileSystem`` for local
        locations, which the methods here do not use."""
        options = json.dumps(storage_options(self.url), sort_keys=True)
        return _filesystem(os.getpid(), self.protocol, options, _aws_env())

    def zarr_store(self, *, read_only: bool) -> Store:
        """A zarr v3 store rooted here: ``LocalStore`` locally, else ``FsspecStore``
        (on an asynchronous filesystem with :func:`storage_options`)."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.url, read_only=read_only)
        return FsspecStore.from_url(
            self.url, read_only=read_only, storage_options=storage_options(self.url)
        )

    def _remote_path(self, key: str = "") -> str:
        """``bucket/prefix/key`` of a remote location: the filesystem's own path (the URL
        without its scheme for s3, with a leading ``/`` for ``memory://``)."""
        path = self.fs()._strip_protocol(self.url).rstrip("/")
        key = _clean_key(key)
        return f"{path}/{key}" if key else path

    def _local(self, key: str = "") -> str:
        key = _clean_key(key)
        return os.path.join(self.url, *key.split("/")) if key else self.url

    def _temp_name(self, dest: str) -> str:
        d, n = os.path.split(dest)
        return os.path.join(d, f".{n}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")

    # ---------------------------------------------------------------- queries
    def exists(self, key: str = "") -> bool:
        """Whether ``key`` is a file/object or a non-empty "directory" (prefix)."""
        if self.is_local:
            return os.path.exists(self._local(key))
        fs, path = self.fs(), self._remote_path(key)
        fs.invalidate_cache(path)
        return bool(fs.exists(path))

    def get(self, key: str) -> bytes | None:
        """The whole object ``key``, or None if there is none (or it is a directory)."""
        if self.is_local:
            try:
                with open(self._local(key), "rb") as f:
                    return f.read()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None
        try:
            return self.fs().cat_file(self._remote_path(key))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def list(self, prefix: str = "", *, dirs: bool = False) -> list[str]:
        """Sorted names of the objects directly under the "directory" ``prefix``.

        Not recursive; names starting with ``"."`` (temp files) are skipped; ``[]`` if
        ``prefix`` does not exist or is not a directory.  With ``dirs`` the names of
        sub-directories (common prefixes) are included too.
        """
        if self.is_local:
            try:
                with os.scandir(self._local(prefix)) as it:
                    names = [
                        e.name
                        for e in it
                        if not e.name.startswith(".") and (dirs or not e.is_dir())
                    ]
            except (FileNotFoundError, NotADirectoryError):
                return []
            return sorted(names)
        fs, path = self.fs(), self._remote_path(prefix)
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found: set[str] = set()
        for e in entries:
            name = e["name"].rstrip("/") if e.get("type") == "directory" else e["name"]
            if not name.startswith(path + "/"):  # ls of a file lists the file itself
                continue
            base = name[len(path) + 1 :]
            if not base or "/" in base or base.startswith("."):  # "dir/" markers
                continue
            if dirs or e.get("type") != "directory":
                found.add(base)
        return sorted(found)

    def size(self, key: str) -> int | None:
        """Size in bytes of the file/object ``key``; None if missing or a directory."""
        if self.is_local:
            try:
                st = os.stat(self._local(key))
            except (FileNotFoundError, NotADirectoryError):
                return None
            return None if os.path.isdir(self._local(key)) else st.st_size
        info = self._info(key)
        return None if info is None else int(info["size"])

    def mtime(self, key: str) -> float | None:
        """Modification time (unix seconds) of ``key``: ``st_mtime`` locally, the object's
        ``LastModified`` remotely (1 s resolution on S3); None if missing or unknown."""
        if self.is_local:
            try:
                return os.stat(self._local(key)).st_mtime
            except (FileNotFoundError, NotADirectoryError):
                return None
        info = self._info(key)
        if info is None:
            return None
        lm = next(
            (info[k] for k in ("LastModified", "mtime", "updated", "created") if info.get(k)),
            None,
        )
        if lm is None:
            return None
        if hasattr(lm, "timestamp"):
            return float(lm.timestamp())
        try:
            return float(lm)
        except (TypeError, ValueError):
            pass
        try:  # e.g. gcsfs: an ISO 8601 string
            return datetime.fromisoformat(str(lm).replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None

    def _info(self, key: str) -> dict | None:
        """fsspec ``info`` of the object ``key``; None if it is missing or a directory."""
        fs, path = self.fs(), self._remote_path(key)
        fs.invalidate_cache(path)
        try:
            info = fs.info(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return None if info.get("type") == "directory" else info

    def free_bytes(self) -> int | None:
        """Free bytes on the local filesystem (of the nearest existing parent); None for
        remote locations."""
        if not self.is_local:
            return None
        p = self.url
        while not os.path.exists(p):
            up = os.path.dirname(p)
            if up == p:
                return None
            p = up
        return shutil.disk_usage(p).free

    # ---------------------------------------------------------------- writes
    def put(self, key: str, data: BytesLike, *, direct: bool = False) -> None:
        """Write the whole object ``key`` atomically, replacing any previous one.

        Parameters
        ----------
        key : str
            Relative, ``'/'``-separated; local parent directories are created.
        data : bytes, memoryview or numpy.ndarray
            The bytes to write (an array's raw C-order bytes; it must be C-contiguous).
        direct : bool
            Locally, write the temp file with direct I/O where possible
            (:func:`~deqntk_dist.store.chunkio.write_file`); ignored remotely.

        Notes
        -----
        Locally a temp file ``.<name>.<pid>.<random>.tmp`` beside the target is written and
        renamed over it (``os.replace``); on any failure the temp file is removed.  No
        ``fsync``: atomic for readers, not durable across a power cut.  Remotely one PUT
        (a multipart upload above 100 MiB, which S3 also completes atomically).
        """
        mv = _as_bytes_view(data)
        if not self.is_local:
            self.fs().pipe_file(self._remote_path(_nonempty(key)), _body(data, mv))
            return
        dest = self._local(_nonempty(key))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = self._temp_name(dest)
        try:
            self._write_new(tmp, data, mv, direct=direct)
            os.replace(tmp, dest)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def put_if_absent(self, key: str, data: BytesLike) -> bool:
        """Create the object ``key`` only if it does not exist.

        Returns
        -------
        bool
            True if this call created it, False if it existed (its content is kept).

        Notes
        -----
        Locally exclusive and atomic: a temp file is hard-linked to the target
        (``os.link`` fails if it exists); where the filesystem has no hard links, an
        ``O_EXCL`` create (exclusive, but readers may see a partial file).  On S3 a PUT
        with ``If-None-Match: *`` (exclusive on AWS S3 and moto; S3-compatible servers that
        ignore the header make it last-writer-wins).  Other object stores without
        conditional writes: exists-then-put, which cannot be exclusive.
        """
        mv = _as_bytes_view(data)
        if not self.is_local:
            fs, path = self.fs(), self._remote_path(_nonempty(key))
            if self.protocol in _S3_PROTOCOLS:
                try:
                    fs.pipe_file(path, _body(data, mv), mode="create")
                except FileExistsError:
                    return False
                return True
            fs.invalidate_cache(path)
            if fs.exists(path):
                return False
            fs.pipe_file(path, _body(data, mv))
            return True
        dest = self._local(_nonempty(key))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = self._temp_name(dest)
        try:
            self._write_new(tmp, data, mv, direct=False)
            try:
                os.link(tmp, dest)
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in _NO_LINK:
                    raise
                return _create_exclusive(dest, mv)
            return True
        finally:
            _unlink_quietly(tmp)

    @staticmethod
    def _write_new(path: str, data: BytesLike, mv: memoryview, *, direct: bool) -> None:
        if direct:
            from .chunkio import write_file

            arr = data if isinstance(data, np.ndarray) else np.frombuffer(mv, dtype=np.uint8)
            write_file(Path(path), arr, direct=True)
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, mv)
        finally:
            os.close(fd)

    def delete(self, key: str) -> None:
        """Remove the file/object ``key``; a missing one is fine."""
        if self.is_local:
            try:
                os.unlink(self._local(_nonempty(key)))
            except FileNotFoundError:
                pass
            return
        fs, path = self.fs(), self._remote_path(_nonempty(key))
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(path)

    def delete_tree(self, key: str = "") -> None:
        """Remove ``key`` and everything below it (this whole location for ``""``); missing
        is fine.  Remotely only objects are removed, never the bucket itself."""
        if self.is_local:
            p = self._local(key)
            if os.path.isdir(p) and not os.path.islink(p):
                _rmtree(p)
            else:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            return
        fs, path = self.fs(), self._remote_path(key)
        fs.invalidate_cache(path)
        try:
            files = fs.find(path)
        except FileNotFoundError:
            files = []
        if files:
            fs.rm(files)
        fs.invalidate_cache(path)


def _nonempty(key: str) -> str:
    k = _clean_key(key)
    if not k:
        raise InputError("key must name an object, got an empty key")
    return k


def _body(data: BytesLike, mv: memoryview) -> bytes | bytearray:
    """A request body botocore accepts (bytes / bytearray; copies views and arrays)."""
    return data if isinstance(data, bytes | bytearray) else mv.tobytes()


def _write_all(fd: int, mv: memoryview) -> None:
    pos = 0
    while pos < len(mv):
        pos += os.write(fd, mv[pos:])


def _create_exclusive(dest: str, mv: memoryview) -> bool:
    """``O_EXCL`` create and write (for filesystems without hard links)."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        _write_all(fd, mv)
    except BaseException:
        os.close(fd)
        _unlink_quietly(dest)
        raise
    os.close(fd)
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rmtree(path: str) -> None:
    """``shutil.rmtree`` that tolerates entries removed concurrently."""

    def onexc(func, p, exc) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise exc

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=onexc)
    else:  # pragma: no cover - Python 3.11
        shutil.rmtree(path, onerror=lambda func, p, info: onexc(func, p, info[1]))
