"""Bounded fuzz run of the dataset readers (IDX, CIFAR-10 python batches, npz / npy).

Every case builds a file (or a directory / archive) from a seeded generator -- a valid file,
a mutated one (truncated at a random offset, random bytes flipped), or a crafted one (IDX
header dimensions that overflow, gzip / tar.gz / zip inflation bombs, pickle gadgets such as
``os.system``, ``eval``, ``numpy.ndarray`` with a huge shape, ``builtins.getattr`` chains,
opcode floods) -- and runs the reader on it in a worker process.  A case passes when the
reader returns a dataset or raises a :class:`~deqntk_dist.errors.DeqntkError`; any other
exception, a crash or hang of the worker, a gadget that ran, or a case that raised the
worker's peak RSS by more than ``--max-case-mib`` is a failure, printed with its case.

Usage::

    .venv/bin/python scripts/fuzz_readers.py --cases 2000 --seed 0
    .venv/bin/python scripts/fuzz_readers.py --seconds 60 --readers cifar

Prints the cases tried per reader (clean results, clean errors, failures), the peak RSS of
this process and of its children (the workers), and the wall time; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import bz2
import functools
import io
import json
import lzma
import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import numpy as np

MIB = 1 << 20
READERS = ("idx", "cifar", "npz")
CIFAR_NAMES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


# ---------------------------------------------------------------------- bombs (streamed)
@functools.cache
def _zero_block() -> bytes:
    """Raw deflate of 1 MiB of zeros ending in a full flush: it can be repeated verbatim."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(bytes(MIB)) + c.flush(zlib.Z_FULL_FLUSH)


@functools.cache
def _zeros_crc(n_mib: int, start: int) -> int:
    crc, zeros = start, bytes(MIB)
    for _ in range(n_mib):
        crc = zlib.crc32(zeros, crc)
    return crc


def _deflate_pieces(prefix: bytes, n_mib: int, suffix: bytes = b""):
    """Raw deflate pieces of ``prefix + n_mib MiB of zeros + suffix``, with crc and size."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    c2 = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = c2.compress(suffix) + c2.flush()
    crc = zlib.crc32(suffix, _zeros_crc(n_mib, zlib.crc32(prefix)))
    return head, tail, crc, len(prefix) + n_mib * MIB + len(suffix)


def write_gzip_bomb(f, prefix: bytes, n_mib: int, suffix: bytes = b"") -> None:
    """One gzip member holding ``prefix``, ``n_mib`` MiB of zeros and ``suffix`` (~1 KB/MiB)."""
    head, tail, crc, size = _deflate_pieces(prefix, n_mib, suffix)
    f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + head)
    block = _zero_block()
    for _ in range(n_mib):
        f.write(block)
    f.write(tail + struct.pack("<II", crc, size & 0xFFFFFFFF))


def write_zip(path: Path, members: list[tuple[str, bytes | tuple[bytes, int]]]) -> None:
    """A zip of stored members (``bytes``) and deflated zero bombs (``(prefix, n_mib)``)."""
    central, n = [], 0
    with open(path, "wb") as f:
        for name, payload in members:
            offset, raw_name = f.tell(), name.encode()
            if isinstance(payload, bytes):
                method, crc, usize = 0, zlib.crc32(payload), len(payload)
                pieces, csize = [payload], len(payload)
            else:
                head, tail, crc, usize = _deflate_pieces(payload[0], payload[1])
                method = 8
                pieces = [head, *([_zero_block()] * payload[1]), tail]
                csize = sum(len(p) for p in pieces)
            f.write(
                struct.pack(
                    "<IHHHHHIIIHH",
                    0x04034B50,
                    20,
                    0,
                    method,
                    0,
                    0,
                    crc,
                    csize,
                    usize,
                    len(raw_name),
                    0,
                )
                + raw_name
            )
            for p in pieces:
                f.write(p)
            central.append(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII",
                    0x02014B50,
                    20,
                    20,
                    0,
                    method,
                    0,
                    0,
                    crc,
                    csize,
                    usize,
                    len(raw_name),
                    0,
                    0,
                    0,
                    0,
                    0,
                    offset,
                )
                + raw_name
            )
            n += 1
        start = f.tell()
        for c in central:
            f.write(c)
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, f.tell() - start, start, 0))


def idx_bytes(a: np.ndarray, code: int) -> bytes:
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = bytes([0, 0, code, a.ndim]) + b"".join(struct.pack(">I", s) for s in a.shape)
    return head + a.astype(dt).tobytes()


def npy_bytes(a: np.ndarray, header: str | None = None) -> bytes:
    """``.npy`` bytes of ``a``; ``header`` replaces the header dict text (a crafted one)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    raw = buf.getvalue()
    if header is None:
        return raw
    hlen = struct.unpack("<H", raw[8:10])[0]
    text = header.encode("latin1")
    text += b" " * ((-(10 + len(text) + 1)) % 64) + b"\n"
    return raw[:8] + struct.pack("<H", len(text)) + text + raw[10 + hlen :]


# -------------------------------------------------------------------------- pickle gadgets
def _g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _s(text: str) -> bytes:
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _b(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def _i(v: int) -> bytes:
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _t(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


_U1 = (
    _g("numpy", "dtype")
    + _t(_s("u1"), b"\x89", b"\x88")
    + b"R"
    + _t(_i(3), _s("|"), b"N", b"N", b"N", _i(-1), _i(-1), _i(0))
    + b"b"
)


def _batch(data: bytes, labels: bytes) -> bytes:
    return b"\x80\x02}(" + _s("data") + data + _s("labels") + labels + b"u."


def _labels(n: int) -> bytes:
    return b"](" + b"K\x00" * n + b"e"


def _array_pickle(a: np.ndarray) -> bytes:
    return pickle.dumps(a, protocol=2)[2:-1]  # without PROTO and STOP


def gadgets(sentinel: Path, n: int) -> dict[str, bytes]:
    """Crafted CIFAR batches; none may run code, allocate from a stated shape, or pass."""
    touch = f"__import__('os').system('touch {sentinel}')"
    shell = f"touch {sentinel}"
    arr = _array_pickle(np.zeros((n, 3072), np.uint8))
    huge = _t(_i(200_000), _i(3072))
    return {
        "os.system": _batch(_g("os", "system") + _t(_s(shell)) + b"R", _labels(n)),
        "posix.system": _batch(_g("posix", "system") + _t(_s(shell)) + b"R", _labels(n)),
        "builtins.eval": _batch(_g("builtins", "eval") + _t(_s(touch)) + b"R", _labels(n)),
        "__builtin__.eval": _batch(_g("__builtin__", "eval") + _t(_s(touch)) + b"R", _labels(n)),
        "getattr chain": _batch(
            _g("builtins", "getattr")
            + _t(
                _g("builtins", "getattr") + _t(_g("numpy", "ndarray"), _s("__class__")) + b"R",
                _s("__subclasses__"),
            )
            + b"R"
            + b")R",
            _labels(n),
        ),
        "numpy.ndarray((200000, 3072))": _batch(
            _g("numpy", "ndarray") + _t(huge, _s("uint8")) + b"R", _labels(200_000)
        ),
        "_reconstruct + huge state": _batch(
            _g("numpy.core.multiarray", "_reconstruct")
            + _t(_g("numpy", "ndarray"), _t(_i(0)), _b(b"b"))
            + b"R"
            + _t(_i(1), huge, _U1, b"\x89", _b(bytes(64)))
            + b"b",
            _labels(n),
        ),
        "_frombuffer huge shape": _batch(
            _g("numpy._core.numeric", "_frombuffer")
            + _t(_b(bytes(16)), _U1, _t(_i(2**31 - 1), _i(2**31 - 1)), _s("C"))
            + b"R",
            _labels(n),
        ),
        "_frombuffer int64 overflow": _batch(
            _g("numpy._core.numeric", "_frombuffer")
            + _t(_b(bytes(16)), _U1, _t(_i(2**62), _i(2**62), _i(4)), _s("C"))
            + b"R",
            _labels(n),
        ),
        "dtype object": _batch(
            _g("numpy", "dtype") + _t(_s("O8"), b"\x89", b"\x88") + b"R", _labels(n)
        ),
        "_codecs.encode zlib": _batch(
            _g("_codecs", "encode") + _t(_s("x" * 1000), _s("zlib")) + b"R", _labels(n)
        ),
        "numpy scalar as data": _batch(
            _g("numpy.core.multiarray", "scalar") + _t(_U1, _b(b"\x07")) + b"R", _labels(n)
        ),
        "REDUCE on a list": _batch(b"]" + _t(_i(1)) + b"R", _labels(n)),
        "BUILD on a function": _batch(_g("_codecs", "encode") + b"}" + b"b", _labels(n)),
        "EMPTY_DICT flood": _batch(b"(" + b"}" * 300_000 + b"l", _labels(n)),
        "MARK flood": _batch(b"(" * 300_000 + b")", _labels(n)),
        "LONG huge digits": _batch(b"L" + b"9" * 100_000 + b"L\n", _labels(n)),
        "BINBYTES8 2**62": b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc.",
        "FRAME 2**40": b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"}.",
        "INST object": _batch(b"(i__builtin__\nobject\n", _labels(n)),
        "NEWOBJ": _batch(_g("builtins", "object") + b")\x81", _labels(n)),
        "PERSID": _batch(b"Pfoo\n", _labels(n)),
        "EXT1": _batch(b"\x82\x01", _labels(n)),
        "GET missing memo": _batch(b"h\x05", _labels(n)),
        "recursive labels": b"\x80\x02}(" + _s("data") + arr + _s("labels") + b"]q\x00(h\x00eu.",
        "labels as strings": _batch(arr, b"](" + _s("1") * n + b"e"),
        "labels huge ints": _batch(arr, b"](" + _i(10**40) * n + b"e"),
        "data int64": _batch(_array_pickle(np.zeros((n, 3072), np.int64)), _labels(n)),
        "data 3071 columns": _batch(_array_pickle(np.zeros((n, 3071), np.uint8)), _labels(n)),
        "data as bytes": _batch(_b(bytes(3072 * n)), _labels(n)),
        "not a dict": b"\x80\x02]q\x00.",
    }


# ------------------------------------------------------------------------- case builders
def _mutate(rng: np.random.Generator, raw: bytes) -> tuple[str, bytes]:
    """Truncate at a random offset, flip random bytes, or append junk."""
    kind = rng.integers(3)
    if kind == 0 or not raw:
        cut = int(rng.integers(0, max(1, len(raw))))
        return f"truncated at {cut}/{len(raw)}", raw[:cut]
    if kind == 1:
        b = bytearray(raw)
        k = int(rng.integers(1, 9))
        head = rng.random() < 0.5
        where = rng.integers(0, min(len(b), 64) if head else len(b), size=k)
        for w in where:
            b[w] = int(rng.integers(256))
        return f"{k} bytes flipped at {sorted(int(w) for w in where)}", bytes(b)
    junk = rng.bytes(int(rng.integers(1, 64)))
    return f"{len(junk)} junk bytes appended", raw + junk


def _compress(rng: np.random.Generator, raw: bytes) -> tuple[str, bytes]:
    kind = rng.choice(["plain", "gzip", "gzip", "bz2", "xz"])
    if kind == "gzip":
        import gzip

        return kind, gzip.compress(raw, 1)
    if kind == "bz2":
        return kind, bz2.compress(raw)
    if kind == "xz":
        return kind, lzma.compress(raw)
    return kind, raw


def idx_case(rng, work: Path, bomb_mib: int):
    from deqntk_dist.data import load_idx_dataset, read_idx

    code = int(rng.choice([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E]))
    shape = tuple(int(s) for s in rng.integers(1, 9, size=int(rng.integers(1, 4))))
    raw = idx_bytes(rng.integers(0, 100, shape), code)
    path = work / "f-idx3-ubyte"
    mode = rng.integers(8)
    if mode == 0:
        desc, data = "valid", raw
    elif mode in (1, 2):
        desc, data = _mutate(rng, raw)
    elif mode == 3:  # header dimension overflow / many dimensions
        ndim = int(rng.choice([3, 4, 33, 64, 255]))
        dims = [
            int(rng.choice([0, 1, 2**31, 2**32 - 1, int(rng.integers(2**32))]))
            for _ in range(ndim)
        ]
        desc = f"header dims {dims[:6]}{'...' if ndim > 6 else ''} (ndim {ndim})"
        data = bytes([0, 0, code, ndim]) + b"".join(struct.pack(">I", d) for d in dims) + raw[4:]
    elif mode == 4:  # gzip inflation bomb after a small / huge / near header
        declared = rng.choice(["small", "huge", "2x"])
        dims = {
            "small": (10, 28, 28),
            "huge": (2**31, 2**31, 4),
            "2x": (2 * bomb_mib, 1024, 1024),
        }[declared]
        head = bytes([0, 0, 0x08, 3]) + b"".join(struct.pack(">I", d) for d in dims)
        with open(path, "wb") as f:
            write_gzip_bomb(f, head, bomb_mib)
        return f"gzip bomb {bomb_mib} MiB, header declares {dims}", lambda: read_idx(path)
    elif mode == 5:
        kind, packed = _compress(rng, raw)
        how, data = _mutate(rng, packed)
        desc = f"{kind} stream {how}"
    elif mode == 6:
        kind, data = _compress(rng, raw)
        desc = f"valid {kind}"
    else:  # a dataset directory with one file mutated
        d = work / "idx"
        d.mkdir()
        n = int(rng.integers(1, 6))
        files = {
            "train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n, 4, 4)), 0x08),
            "train-labels-idx1-ubyte": idx_bytes(rng.integers(0, 10, n), 0x08),
            "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n, 4, 4)), 0x08),
            "t10k-labels-idx1-ubyte": idx_bytes(rng.integers(0, 10, n), 0x08),
        }
        victim = str(rng.choice(sorted(files)))
        how, files[victim] = _mutate(rng, files[victim])
        for name, content in files.items():
            (d / name).write_bytes(content)
        return f"directory, {victim} {how}", lambda: load_idx_dataset(d)
    path.write_bytes(data)
    return desc, lambda: read_idx(path)


def _cifar_batch(rng, protocol: int) -> bytes:
    n = int(rng.integers(1, 6))
    batch = {
        b"batch_label": b"fuzz",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"f{i}.png".encode() for i in range(n)],
    }
    return pickle.dumps(batch, protocol=protocol)


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def _info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info


def cifar_case(rng, work: Path, bomb_mib: int):
    from deqntk_dist.data import load_cifar10

    sentinel = work.parent / "GADGET-RAN"
    batches = {n: _cifar_batch(rng, int(rng.integers(0, 6))) for n in CIFAR_NAMES}
    victim = str(rng.choice(CIFAR_NAMES))
    mode = rng.integers(9)
    desc = "valid"
    if mode in (1, 2):
        desc, batches[victim] = _mutate(rng, batches[victim])
        desc = f"{victim} {desc}"
    elif mode in (3, 4):
        table = gadgets(sentinel, 3)
        name = str(rng.choice(sorted(table)))
        desc, batches[victim] = f"{victim} gadget {name}", table[name]
    if mode <= 4 and rng.random() < 0.5:  # as a directory
        d = work / "cifar-10-batches-py"
        d.mkdir()
        for n, raw in batches.items():
            (d / n).write_bytes(raw)
        return f"dir, {desc}", lambda: load_cifar10(work)
    if mode == 5:  # a batch file far beyond what a batch can hold (sparse on disk)
        d = work / "c"
        d.mkdir()
        for n, raw in batches.items():
            (d / n).write_bytes(raw)
        with open(d / victim, "r+b") as f:
            f.truncate(bomb_mib * MIB)
        return f"dir, {victim} sparse {bomb_mib} MiB", lambda: load_cifar10(d)
    members = [(_info(f"cifar-10-batches-py/{n}", len(raw)), raw) for n, raw in batches.items()]
    path = work / "cifar-10-python.tar.gz"
    if mode == 6:  # crafted archive structure
        kind = str(
            rng.choice(
                [
                    "bomb member",
                    "bomb readme",
                    "many members",
                    "pax header",
                    "long names",
                    "sparse",
                    "symlink",
                    "directory",
                ]
            )
        )
        desc = f"tar: {kind}"
        if kind in ("bomb member", "bomb readme"):
            name = f"cifar-10-batches-py/{victim if kind == 'bomb member' else 'readme.html'}"
            head = _info(name, bomb_mib * MIB).tobuf(format=tarfile.GNU_FORMAT)
            rest = _tar(members)
            with open(path, "wb") as f:
                write_gzip_bomb(f, head, bomb_mib, rest)
            return f"{desc} ({bomb_mib} MiB gzip bomb)", lambda: load_cifar10(path)
        if kind == "many members":
            members = [(_info(f"x{i}"), b"") for i in range(1500)] + members
        elif kind == "pax header":
            info = _info(f"cifar-10-batches-py/{victim}", len(batches[victim]))
            info.pax_headers = {"comment": "x" * 40_000}
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(info, io.BytesIO(batches[victim]))
            members = []
            raw_tar = buf.getvalue()
        elif kind == "long names":
            members = [(_info("a/" * 5000 + str(i)), b"") for i in range(40)] + members
        elif kind == "sparse":
            members = [
                (_info(f"cifar-10-batches-py/{victim}", 10, tarfile.GNUTYPE_SPARSE), bytes(10))
            ] + members
        elif kind == "symlink":
            link = _info(f"cifar-10-batches-py/{victim}", 0, tarfile.SYMTYPE)
            link.linkname = "/etc/passwd"
            members = [(link, b"")] + [m for m in members if not m[0].name.endswith(victim)]
        else:
            members = [(_info(f"cifar-10-batches-py/{victim}", 0, tarfile.DIRTYPE), b"")] + [
                m for m in members if not m[0].name.endswith(victim)
            ]
        if members:
            raw_tar = _tar(members)
    else:
        raw_tar = _tar(members)
    if mode == 7:
        import gzip

        packed = gzip.compress(raw_tar, 1)
        how, packed = _mutate(rng, packed)
        desc = f"tar.gz {how}"
    elif mode == 8:
        how, packed = _mutate(rng, raw_tar)
        desc = f"plain tar {how}"
    else:
        kind, packed = _compress(rng, raw_tar)
        desc = f"{kind} tar, {desc}"
    path.write_bytes(packed)
    return desc, lambda: load_cifar10(path)


def npz_case(rng, work: Path, bomb_mib: int):
    from deqntk_dist.data import load_npz

    n, d = int(rng.integers(2, 12)), int(rng.integers(1, 6))
    x = rng.normal(size=(n, d)) if rng.random() < 0.7 else rng.integers(0, 9, (n, d))
    y = rng.integers(0, 4, n)
    layout = rng.integers(3)
    if layout == 0:
        arrays = {"x_train": x, "y_train": y, "x_test": x[: n // 2 + 1], "y_test": y[: n // 2 + 1]}
    elif layout == 1:
        arrays = {"x": x, "y": y, "n_train": np.int64(max(1, n - 2))}
    else:
        arrays = {"x": x, "y": y}
    path = work / "data.npz"
    mode = rng.integers(9)
    members = [(f"{k}.npy", npy_bytes(np.asarray(v))) for k, v in arrays.items()]
    victim = int(rng.integers(len(members)))
    name = members[victim][0]
    if mode == 0:
        desc = "valid"
    elif mode in (1, 2):
        buf = io.BytesIO()
        (np.savez_compressed if rng.random() < 0.5 else np.savez)(buf, **arrays)
        desc, raw = _mutate(rng, buf.getvalue())
        path.write_bytes(raw)
        return f"npz {desc}", lambda: load_npz(path)
    elif mode == 3:  # crafted .npy header
        shape = rng.choice(
            [
                "(2147483648, 2147483648, 4)",
                "(4611686018427387904,)",
                "(10**30,)",
                "(" + "1, " * 40 + ")",
                "(-5,)",
                "(3, 'a')",
            ]
        )
        descr = str(rng.choice(["<f8", "|O", "[('a', '<f8')]", "<U4", "|b1"]))
        header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape}, }}"
        if "[" in descr:
            header = header.replace(repr(descr), descr)
        members[victim] = (name, npy_bytes(np.asarray(arrays[name[:-4]]), header))
        desc = f"{name} header {header}"
    elif mode == 4:  # a deflated bomb: junk member, or an array whose header says less
        if rng.random() < 0.5:
            members.append(("readme.npy" if rng.random() < 0.5 else "junk", (b"", bomb_mib)))
            desc = f"extra {bomb_mib} MiB bomb member"
        else:
            members[victim] = (name, (npy_bytes(np.zeros((n, d))), bomb_mib))
            desc = f"{name} followed by a {bomb_mib} MiB bomb"
    elif mode == 5:
        members += [(f"e{i}", b"") for i in range(1500)]
        desc = "1500 extra entries"
    elif mode == 6:  # labels
        bad = rng.choice([10**9, -1, 2**63 - 1])
        key = "y_test" if "y_test" in arrays else "y"
        yy = np.asarray(arrays[key]).astype(np.int64)
        yy[-1] = bad
        members = [(k, npy_bytes(yy) if k == f"{key}.npy" else v) for k, v in members]
        desc = f"label {bad}"
    elif mode == 7:  # directory of .npy files, one mutated
        dd = work / "npy"
        dd.mkdir()
        for k, raw in members:
            (dd / k).write_bytes(raw)
        how, raw = _mutate(rng, members[victim][1])
        (dd / name).write_bytes(raw)
        return f"npy directory, {name} {how}", lambda: load_npz(dd)
    else:
        (work / "single.npy").write_bytes(members[victim][1])
        return "a single .npy", lambda: load_npz(work / "single.npy")
    write_zip(path, members)
    return desc, lambda: load_npz(path)


CASES = {"idx": idx_case, "cifar": cifar_case, "npz": npz_case}


# -------------------------------------------------------------------------------- worker
def _maxrss_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def worker(seed: int, bomb_mib: int) -> None:
    """Read case requests from stdin, one JSON line each; answer begin/end lines."""
    from deqntk_dist.errors import DeqntkError

    root = Path(tempfile.mkdtemp(prefix="deqntk-fuzz-"))
    sentinel = root / "GADGET-RAN"
    out = sys.stdout
    try:
        for line in sys.stdin:
            req = json.loads(line)
            reader, index = req["reader"], int(req["index"])
            rng = np.random.default_rng([seed, READERS.index(reader), index])
            work = root / f"{reader}-{index}"
            work.mkdir()
            before = _maxrss_mib()
            try:
                desc, run = CASES[reader](rng, work, bomb_mib)
            except Exception:
                desc, run = "builder failed", None
            print(json.dumps({"begin": desc}), file=out, flush=True)
            result = {"outcome": "result", "detail": ""}
            if run is None:
                result = {"outcome": "failure", "detail": traceback.format_exc()[-2000:]}
            else:
                try:
                    ds = run()
                    result["detail"] = type(ds).__name__
                except DeqntkError as exc:
                    result = {"outcome": "error", "detail": f"{type(exc).__name__}: {exc}"[:300]}
                except Exception:
                    result = {"outcome": "failure", "detail": traceback.format_exc()[-2000:]}
            if sentinel.exists():
                result = {"outcome": "failure", "detail": "a pickle gadget ran code"}
                sentinel.unlink()
            result["rss_increase_mib"] = round(_maxrss_mib() - before, 1)
            shutil.rmtree(work, ignore_errors=True)
            print(json.dumps(result), file=out, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -------------------------------------------------------------------------------- parent
class Worker:
    """The worker process, and a thread that queues its answer lines (for timeouts)."""

    def __init__(self, args):
        import queue
        import threading

        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--seed",
            str(args.seed),
            "--bomb-mib",
            str(args.bomb_mib),
        ]
        env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for text in self.proc.stdout:
            self.lines.put(text)
        self.lines.put("")

    def line(self, timeout: float) -> dict | None:
        import queue

        try:
            text = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        return json.loads(text) if text else None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=200, help="cases per reader (default 200)")
    p.add_argument("--seconds", type=float, default=None, help="wall-time bound of the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--readers", default=",".join(READERS))
    p.add_argument("--bomb-mib", type=int, default=1024, help="inflated size of the bombs")
    p.add_argument(
        "--max-case-mib",
        type=float,
        default=256,
        help="a case that raises the worker's peak RSS by more fails",
    )
    p.add_argument("--case-timeout", type=float, default=120)
    p.add_argument("--verbose", action="store_true", help="print every case and its outcome")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.seed, args.bomb_mib)
        return 0
    readers = [r for r in args.readers.split(",") if r]
    unknown = set(readers) - set(READERS)
    if unknown or args.cases < 0:
        p.error(f"--readers must be among {', '.join(READERS)}; --cases >= 0")
    t0 = time.monotonic()
    stats = {
        r: {"cases": 0, "result": 0, "error": 0, "failure": 0, "max_rss_increase_mib": 0.0}
        for r in readers
    }
    failures: list[str] = []
    w = Worker(args)
    try:
        for index in range(args.cases):
            for reader in readers:
                if args.seconds is not None and time.monotonic() - t0 > args.seconds:
                    raise StopIteration
                w.proc.stdin.write(json.dumps({"reader": reader, "index": index}) + "\n")
                w.proc.stdin.flush()
                begin = w.line(args.case_timeout)
                end = w.line(args.case_timeout) if begin is not None else None
                st = stats[reader]
                st["cases"] += 1
                desc = (begin or {}).get("begin", "?")
                if end is None:
                    rc = w.proc.poll()
                    how = "hung" if rc is None else f"worker died (exit status {rc})"
                    end = {"outcome": "failure", "detail": how, "rss_increase_mib": 0.0}
                    w.close()
                    w = Worker(args)
                if end["rss_increase_mib"] > args.max_case_mib:
                    end = {
                        **end,
                        "outcome": "failure",
                        "detail": f"peak RSS +{end['rss_increase_mib']} MiB; {end['detail']}",
                    }
                st["max_rss_increase_mib"] = max(
                    st["max_rss_increase_mib"], end["rss_increase_mib"]
                )
                st[end["outcome"]] += 1
                if args.verbose:
                    print(
                        f"[{reader} #{index}] {desc} -> {end['outcome']}: {end['detail'][:200]}",
                        flush=True,
                    )
                if end["outcome"] == "failure":
                    failures.append(f"[{reader} #{index}] {desc}\n{end['detail']}")
                    print(f"FAILURE [{reader} #{index}] {desc}\n{end['detail']}", flush=True)
    except StopIteration:
        pass
    finally:
        w.proc.stdin.close()
        w.proc.wait(timeout=60)
    wall = time.monotonic() - t0
    print(
        f"fuzz_readers: seed {args.seed}, bombs {args.bomb_mib} MiB, "
        f"{args.cases} cases per reader asked, wall {wall:.1f} s"
    )
    for reader, st in stats.items():
        print(
            f"  {reader:6s} cases {st['cases']:6d}  clean results {st['result']:5d}  "
            f"clean DeqntkError {st['error']:5d}  failures {st['failure']:3d}  "
            f"largest per-case peak-RSS increase {st['max_rss_increase_mib']:.1f} MiB"
        )
    print(
        f"peak RSS: this process {_maxrss_mib():.1f} MiB, "
        f"children (workers) {_maxrss_mib(resource.RUSAGE_CHILDREN):.1f} MiB"
    )
    print(
        json.dumps(
            {
                "wall_s": round(wall, 1),
                "stats": stats,
                "failures": len(failures),
                "peak_rss_self_mib": round(_maxrss_mib(), 1),
                "peak_rss_children_mib": round(_maxrss_mib(resource.RUSAGE_CHILDREN), 1),
            }
        )
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
