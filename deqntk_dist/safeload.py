"""Bounded reading of untrusted dataset files (used by :mod:`deqntk_dist.data`).

A dataset file may be truncated, corrupt or crafted.  The readers built on these helpers
never hold more than what the format can legitimately hold:

* a declared size (an IDX header, an ``.npy`` header, a tar member) is checked with exact
  Python integers against what the file really holds *before* memory is set aside for it,
  and never exceeds this machine's RAM;
* compressed streams (gzip, bzip2, xz) are read incrementally through a byte cap, so an
  inflation bomb is refused after at most the cap has been inflated (and none of it kept);
* CIFAR-10 pickles go through :func:`load_array_pickle`, a pure-Python unpickler that runs
  only the opcodes the format uses, counts them, and turns numpy's reconstruction calls
  into :class:`PickledArray` placeholders: the pickle can state a shape, but the array is
  built by the reader from a byte string whose length matches it exactly.

Anything else raises :class:`~deqntk_dist.errors.DatasetError` naming the file.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import math
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np
import psutil

from .errors import DatasetError

__all__ = [
    "DECOMPRESSION_ERRORS",
    "MAX_DIMS",
    "NPY_MAX_HEADER",
    "NPZ_ERRORS",
    "NPZ_MAX_ENTRIES",
    "TAR_META_MAX",
    "BoundedTarInfo",
    "CappedReader",
    "PickledArray",
    "PickledDtype",
    "TarLimitError",
    "check_declared_size",
    "load_array_pickle",
    "open_stream",
    "read_exactly",
    "read_npy_files",
    "read_npy_header",
    "read_npz_arrays",
    "skip_bytes",
]

#: Exceptions a corrupt compressed stream raises while it is read.
DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)

#: Most dimensions an array read from a file may have (numpy 1.x's limit).
MAX_DIMS = 32

_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))
_CHUNK = 1 << 20


def check_declared_size(label: str, nbytes: int, what: str = "data") -> None:
    """DatasetError when a header declares more bytes than this machine has memory."""
    limit = psutil.virtual_memory().total
    if nbytes > limit:
        raise DatasetError(
            f"{label} declares {nbytes} bytes of {what}, more than this machine's memory "
            f"({limit} bytes): its header is corrupt"
        )


def open_stream(path: Path, label: str) -> tuple[io.BufferedIOBase, str | None]:
    """Open ``path`` for reading, decompressing gzip / bzip2 / xz on the fly (by magic).

    Returns
    -------
    stream, compression
        ``compression`` is ``"gzip"``, ``"bzip2"``, ``"xz"`` or ``None`` (a plain file).
    """
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by the caller through the stream
    except FileNotFoundError:
        raise DatasetError(f"{label} does not exist") from None
    except OSError as exc:
        raise DatasetError(f"cannot read {label}: {exc}") from None
    try:
        head = raw.read(6)
        raw.seek(0)
    except OSError as exc:
        raw.close()
        raise DatasetError(f"cannot read {label}: {exc}") from None
    kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb"), kind
    if kind == "bzip2":
        return bz2.BZ2File(raw, mode="rb"), kind
    if kind == "xz":
        return lzma.LZMAFile(raw, mode="rb"), kind
    return raw, None


def read_exactly(stream: io.BufferedIOBase, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at the end of the stream); ``n`` is a small header size."""
    parts, got = [], 0
    while got < n:
        part = stream.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def skip_bytes(stream: io.BufferedIOBase, limit: int) -> int:
    """Read and discard up to ``limit`` bytes in 1 MiB pieces; returns how many there were."""
    got = 0
    while got < limit:
        part = stream.read(min(_CHUNK, limit - got))
        if not part:
            break
        got += len(part)
    return got


class CappedReader:
    """A ``read()``-only view of a stream that refuses to deliver more than ``cap`` bytes.

    Parameters
    ----------
    stream : binary file object
    cap : int
        Most bytes the whole stream may hold; reading beyond raises DatasetError.
    label, what : str
        Used in the error: ``"{label} holds more than {cap} bytes of {what}"``.
    """

    def __init__(self, stream: io.BufferedIOBase, cap: int, label: str, what: str):
        self.stream, self.cap, self.label, self.what = stream, int(cap), label, what
        self.count = 0

    def read(self, n: int | None = -1) -> bytes:
        room = self.cap + 1 - self.count
        n = room if n is None or n < 0 or n > room else n
        data = self.stream.read(n)
        self.count += len(data)
        if self.count > self.cap:
            raise DatasetError(
                f"{self.label} holds more than {self.cap} bytes of {self.what}, more than the "
                "format can hold (a corrupt file or a decompression bomb)"
            )
        return data


# ------------------------------------------------------------------------------------- tar
#: Largest pax / GNU long-name header accepted in a tar archive (real ones: ~100 bytes).
TAR_META_MAX = 16 * 1024


class TarLimitError(tarfile.TarError):
    """A tar header asks for something this reader refuses (not a corrupt archive)."""


class BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses oversized extended headers and sparse members before reading.

    ``tarfile`` reads a pax or GNU long-name header's payload whole, whatever size it
    declares; sparse maps are read block after block.  Neither occurs in dataset archives.
    """

    _EXTENDED = (
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    )

    def _proc_member(self, tarfile_):
        if self.type in self._EXTENDED and self.size > TAR_META_MAX:
            raise TarLimitError(
                f"member {self.name[:100]!r} has an extended header of {self.size} bytes "
                f"(at most {TAR_META_MAX} accepted)"
            )
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise TarLimitError(f"member {self.name[:100]!r} is a sparse file (not supported)")
        return super()._proc_member(tarfile_)

    def _no_sparse(self, *args, **kwargs):
        raise TarLimitError(f"member {self.name[:100]!r} is a sparse file (not supported)")

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _no_sparse


# ------------------------------------------------------------------------------------- npy
#: Largest ``.npy`` header accepted (numpy writes ~128 bytes; its own default limit is 10000).
NPY_MAX_HEADER = 10_000


def read_npy_header(stream: IO[bytes], label: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and header length of an ``.npy`` stream positioned at its start.

    Object (pickled) arrays, more than :data:`MAX_DIMS` dimensions and headers larger than
    :data:`NPY_MAX_HEADER` are refused with DatasetError.
    """
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(stream, max_header_size=NPY_MAX_HEADER)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(stream, max_header_size=NPY_MAX_HEADER)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
        offset = stream.tell()
    except MemoryError:  # pragma: no cover - the header size is bounded
        raise
    except Exception as exc:  # numpy parses the header text: ValueError, SyntaxError,
        # tokenize.TokenError, ... all mean a corrupt header
        raise DatasetError(f"{label} is corrupt or not a numpy file: {exc}") from None
    if dtype.hasobject:
        raise DatasetError(
            f"{label} is corrupt or not a numpy file: it holds an object array (a pickle), "
            "which is refused"
        )
    if len(shape) > MAX_DIMS:
        raise DatasetError(f"{label} has {len(shape)} dimensions (at most {MAX_DIMS})")
    return tuple(shape), dtype, offset


#: Most entries an npz (zip) file may list: zipfile keeps one object per entry in memory.
NPZ_MAX_ENTRIES = 1000
#: Exceptions reading a corrupt ``.npz`` / ``.npy`` raises (mapped to DatasetError).
NPZ_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    zlib.error,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,
    RuntimeError,
)


def _npy_checked(stream: IO[bytes], size: int, label: str) -> int:
    """Data bytes of an ``.npy`` stream whose header must match the ``size`` it holds."""
    shape, dtype, offset = read_npy_header(stream, label)
    nbytes = math.prod(shape) * dtype.itemsize
    if offset + nbytes != size:
        raise DatasetError(
            f"{label} is corrupt or not a numpy file: its header declares shape {shape} of "
            f"{dtype} ({nbytes} data bytes after a {offset}-byte header), the file holds "
            f"{size} bytes"
        )
    return nbytes


def read_npy_files(files: list[Path], where: str) -> dict[str, np.ndarray]:
    """``{stem: array}`` of ``.npy`` files, each header checked against the file's size and
    the total against this machine's memory before any data is read (no pickles)."""
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            total += _npy_checked(fh, f.stat().st_size, f"npy file {str(f)!r}")
    check_declared_size(where, total, "array data")
    arrays = {}
    for f in files:
        with open(f, "rb") as fh:
            arrays[f.stem] = np.lib.format.read_array(
                fh, allow_pickle=False, max_header_size=NPY_MAX_HEADER
            )
    return arrays


def read_npz_arrays(
    path: Path, keys: tuple[str, ...], where: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays named ``keys`` of an ``.npz`` (zip) file, and every array name it lists.

    Other members are never read.  The entry count (at most :data:`NPZ_MAX_ENTRIES`) is
    checked before zipfile lists the entries, each array's header against its member's size
    (a compressed member inflates to at most that size), and the total against memory.
    Corrupt files raise one of :data:`NPZ_ERRORS` (callers map them to DatasetError).
    """
    if not zipfile.is_zipfile(path):
        raise DatasetError(f"{where} is corrupt or not a numpy file: not a zip archive")
    end_record = getattr(zipfile, "_EndRecData", None)  # entry count before zipfile lists them
    if end_record is not None:
        with open(path, "rb") as fh:
            # a private CPython constant, which typeshed does not list
            entries = end_record(fh)[zipfile._ECD_ENTRIES_TOTAL]  # type: ignore[attr-defined]
        if entries > NPZ_MAX_ENTRIES:
            raise DatasetError(
                f"{where} lists {entries} entries, more than an npz holds ({NPZ_MAX_ENTRIES})"
            )
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
        wanted = [infos[k] for k in keys if k in infos]
        total = 0
        for info in wanted:
            with zf.open(info) as member:
                total += _npy_checked(member, info.file_size, f"{where} member {info.filename!r}")
        check_declared_size(where, total, "array data")
        arrays = {}
        for info in wanted:
            with zf.open(info) as member:
                arrays[info.filename[:-4]] = np.lib.format.read_array(
                    member, allow_pickle=False, max_header_size=NPY_MAX_HEADER
                )
    return arrays, sorted(infos)


# ---------------------------------------------------------------------------------- pickle
#: dtypes a pickled array may have (numpy names, byte order set by the dtype's state).
_PICKLE_DTYPES = frozenset(
    ["u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "uint8", "int64", "int32"]
)


class _NdarrayClass:
    """Stands in for ``numpy.ndarray`` in a pickle: only a marker, never called."""


_NDARRAY = _NdarrayClass()


class PickledDtype:
    """A dtype named by a pickle (``numpy.dtype('u1', False, True)`` + its state)."""

    def __init__(self, name: Any, align: Any = False, copy: Any = True):
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        if not isinstance(name, str) or name not in _PICKLE_DTYPES:
            raise pickle.UnpicklingError(f"dtype {str(name)[:40]!r} is not allowed")
        self.dtype = np.dtype(name)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2:
            raise pickle.UnpicklingError("malformed dtype state")
        order = state[1].decode("ascii", "replace") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "=", "|"):
            raise pickle.UnpicklingError(f"malformed dtype byte order {str(order)[:10]!r}")
        if self.dtype.itemsize > 1 and order in "<>":
            self.dtype = self.dtype.newbyteorder("<" if order == "<" else ">")


class PickledArray:
    """An array described by a pickle: shape, dtype and a byte string of exactly that size.

    Nothing is allocated from the stated shape; :meth:`to_numpy` views the bytes.
    """

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None
        self.fortran = False
        self.data: bytes | bytearray = b""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed ndarray state")
        shape, dtype, fortran, data = state[-4:]
        self._set(shape, dtype, bool(fortran), data)

    def _set(self, shape: Any, dtype: Any, fortran: bool, data: Any) -> None:
        if (
            not isinstance(shape, tuple)
            or len(shape) > MAX_DIMS
            or not all(type(s) is int and s >= 0 for s in shape)
        ):
            raise pickle.UnpicklingError("an ndarray shape must be a tuple of integers >= 0")
        if not isinstance(dtype, PickledDtype):
            raise pickle.UnpicklingError("an ndarray dtype must be a plain numeric dtype")
        if not isinstance(data, bytes | bytearray):
            raise pickle.UnpicklingError(
                "ndarray data must be a byte string (object arrays are refused)"
            )
        need = math.prod(shape) * dtype.dtype.itemsize
        if len(data) != need:
            raise pickle.UnpicklingError(
                f"an ndarray of shape {shape} and dtype {dtype.dtype} needs {need} bytes, the "
                f"pickle holds {len(data)}"
            )
        self.shape, self.dtype, self.fortran, self.data = shape, dtype.dtype, fortran, data

    def to_numpy(self) -> np.ndarray:
        """A read-only view of the bytes with the stated shape (native byte order copy)."""
        if self.shape is None or self.dtype is None:
            raise pickle.UnpicklingError("an ndarray without state")
        a = np.frombuffer(self.data, dtype=self.dtype).reshape(
            self.shape, order="F" if self.fortran else "C"
        )
        return a.astype(self.dtype.newbyteorder("="), copy=False)


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> PickledArray:
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
    return PickledArray()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> PickledArray:
    arr = PickledArray()
    arr._set(tuple(shape) if isinstance(shape, list) else shape, dtype, order == "F", buf)
    return arr


def _scalar(dtype: Any, data: Any = b"") -> int | float:
    if not isinstance(dtype, PickledDtype) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar of a non-numeric dtype")
    if len(data) != dtype.dtype.itemsize:
        raise pickle.UnpicklingError("numpy scalar of the wrong size")
    return np.frombuffer(data, dtype=dtype.dtype)[0].item()


def _encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode(str, 'latin1')``: how Python 3 pickles bytes at protocol <= 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only as (str, 'latin1')")
    return text.encode("latin1")


_GLOBALS = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): PickledDtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _encode,
}
_CALLABLES = (_reconstruct, _frombuffer, _scalar, _encode, PickledDtype)

# Opcodes of protocols 0-5 that build plain data (no class instantiation, no extensions,
# no persistent ids, no out-of-band buffers).  REDUCE and BUILD are replaced below.
_OPCODES = (
    "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 "
    "LONG LONG1 FLOAT BINFLOAT STRING BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES "
    "BINBYTES8 BYTEARRAY8 UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 EMPTY_LIST LIST "
    "APPEND APPENDS EMPTY_DICT DICT SETITEM SETITEMS EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 "
    "GLOBAL STACK_GLOBAL PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET LONG_BINGET"
).split()


class _Dispatch(dict):
    def __missing__(self, key: int):
        raise pickle.UnpicklingError(f"pickle opcode {bytes([key])!r} is not allowed")


def _counted(fn):
    def op(self) -> None:
        self._ops += 1
        if self._ops > self._max_ops:
            raise pickle.UnpicklingError(
                f"the pickle runs more than {self._max_ops} opcodes (the format needs fewer)"
            )
        fn(self)

    return op


class _ArrayUnpickler(pickle._Unpickler):
    """Pure-Python unpickler restricted to plain data and numpy array placeholders."""

    dispatch = _Dispatch()
    stack: list[Any]  # set by pickle._Unpickler.load (a private class typeshed leaves bare)

    def __init__(self, file: IO[bytes], max_ops: int):
        super().__init__(file, encoding="bytes")
        self._ops, self._max_ops = 0, int(max_ops)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(
                f"global {str(module)[:60]}.{str(name)[:60]} is not allowed"
            ) from None

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is c for c in _CALLABLES) or not isinstance(args, tuple):
            raise pickle.UnpicklingError(f"calling a {type(func).__name__} is not allowed")
        self.stack[-1] = func(*args)

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, PickledArray | PickledDtype):
            raise pickle.UnpicklingError(f"setting the state of a {type(inst).__name__}")
        inst.__setstate__(state)


for _name in _OPCODES:
    _code = getattr(pickle, _name)[0]
    _ArrayUnpickler.dispatch[_code] = _counted(pickle._Unpickler.dispatch[_code])
_ArrayUnpickler.dispatch[pickle.REDUCE[0]] = _counted(_ArrayUnpickler.load_reduce)
_ArrayUnpickler.dispatch[pickle.BUILD[0]] = _counted(_ArrayUnpickler.load_build)


def load_array_pickle(raw: bytes, max_ops: int) -> Any:
    """Unpickle ``raw`` allowing only plain data and numpy arrays (as :class:`PickledArray`).

    Raises
    ------
    pickle.UnpicklingError (or another Exception from malformed data)
        Any global other than numpy's array reconstruction, any call other than those,
        more than ``max_ops`` opcodes, or a stated array size that its bytes do not match.
    """
    return _ArrayUnpickler(io.BytesIO(raw), max_ops).load()
