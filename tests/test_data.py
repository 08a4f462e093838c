"""Readers (IDX, CIFAR-10 python batches, npz/npy) and preprocessing (fitted on train only).

Every reader is tested on files written here in the exact public format, including broken
ones; preprocessing statistics are checked against independent numpy / scipy computations.
"""

from __future__ import annotations

import gzip
import io
import pickle
import re
import struct
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from deqntk_dist import data
from deqntk_dist.data import (
    FASHION_MNIST_DIR,
    RawDataset,
    ensure_fashion_mnist,
    load_cifar10,
    load_dataset,
    load_idx_dataset,
    load_npz,
    read_idx,
)
from deqntk_dist.errors import DatasetError, InputError
from deqntk_dist.preprocess import (
    PreprocessConfig,
    balanced_subset,
    fit_preprocessing,
    parse_steps,
    select_rows,
)


# ----------------------------------------------------------------------------------- writers
def idx_bytes(a: np.ndarray, code: int = 0x08) -> bytes:
    """Encode an array in the IDX format by hand (struct, not the reader's code path)."""
    dt = {0x08: ">u1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = bytes([0, 0, code, a.ndim]) + b"".join(struct.pack(">I", s) for s in a.shape)
    return head + a.astype(dt).tobytes()


def write_idx_dir(d: Path, rng, n_train=12, n_test=7, gz=True) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, a in arrays.items():
        raw = idx_bytes(a)
        if gz:
            (d / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (d / name).write_bytes(raw)
    return arrays


def cifar_batch(rng, n: int) -> dict:
    return {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_cifar_dir(d: Path, rng, n=4) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": cifar_batch(rng, n) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(rng, n + 1)
    for name, b in batches.items():
        (d / name).write_bytes(pickle.dumps(b, protocol=2))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"]}, protocol=2))
    return batches


# ---------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("code", [0x08, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_types_plain_and_gzip(tmp_path, code):
    rng = np.random.default_rng(code)
    a = rng.integers(0, 120, (3, 4, 5)).astype(np.float64 if code >= 0x0D else np.int64)
    (tmp_path / "a").write_bytes(idx_bytes(a, code))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(a, code)))
    for name in ("a", "a.gz"):
        got = read_idx(tmp_path / name)
        assert got.shape == (3, 4, 5)
        assert got.dtype.isnative
        np.testing.assert_array_equal(got, a)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b"\x00\x01" + b[2:], "wrong magic number"),
        (lambda b: b[:2] + b"\x07" + b[3:], "wrong magic number"),
        (lambda b: b[:3] + b"\x00" + b[4:], "wrong magic number"),
        (lambda b: b[:3], "truncated"),
        (lambda b: b[:9], "truncated inside its header"),
        (
            lambda b: b[:-5],
            "is truncated: header shape \\(2, 3, 4\\) needs 24 data bytes, found 19",
        ),
        (lambda b: b + b"\x00", "longer than its header says"),
        (lambda b: gzip.compress(b)[:-12], "corrupt or truncated gzip"),
    ],
)
def test_read_idx_broken_files(tmp_path, mutate, match):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "broken-idx3-ubyte"
    p.write_bytes(mutate(idx_bytes(a)))
    with pytest.raises(DatasetError, match=match) as exc:
        read_idx(p)
    assert "broken-idx3-ubyte" in str(exc.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_idx(tmp_path / "nope")


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_dataset_roundtrip(tmp_path, gz):
    arrays = write_idx_dir(tmp_path / "fm", np.random.default_rng(1), gz=gz)
    raw = load_idx_dataset(tmp_path / "fm", name="fashion-mnist")
    assert raw.name == "fashion-mnist"
    assert raw.x_train.shape == (12, 28, 28, 1) and raw.x_train.dtype == np.uint8
    np.testing.assert_array_equal(raw.x_train[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(raw.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert raw.y_train.dtype == np.int64
    assert raw.source["format"] == "idx" and len(raw.source["files"]) == 4


def test_load_idx_dataset_count_mismatch_and_missing(tmp_path):
    d = tmp_path / "m"
    write_idx_dir(d, np.random.default_rng(2))
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(6, np.uint8))))
    with pytest.raises(DatasetError, match="label/image count mismatch: 6 labels for 7 images"):
        load_idx_dataset(d)
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.*not found"):
        load_idx_dataset(d)
    with pytest.raises(DatasetError, match="must be a directory"):
        load_idx_dataset(tmp_path / "absent")


def test_load_idx_dataset_wrong_rank(tmp_path):
    d = tmp_path / "m"
    write_idx_dir(d, np.random.default_rng(3))
    (d / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros((12, 784), np.uint8)))
    )
    with pytest.raises(DatasetError, match="must have 3 dimensions"):
        load_idx_dataset(d)


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_matches_upstream_reader():
    """The installed package, against the upstream project's own reader (independent code)."""
    raw = load_dataset("fashion-mnist")
    assert raw.x_train.shape == (60000, 28, 28, 1) and raw.x_test.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(raw.y_train), np.full(10, 6000))
    with gzip.open(Path(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
        ref_labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    with gzip.open(Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")) as f:
        ref_images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 784)
    np.testing.assert_array_equal(raw.y_test, ref_labels)
    np.testing.assert_array_equal(raw.x_test.reshape(-1, 784), ref_images)


# -------------------------------------------------------------------------------------- CIFAR
def check_cifar(raw: RawDataset, batches: dict) -> None:
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    assert raw.x_train.shape == (20, 32, 32, 3) and raw.x_test.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(raw.y_train, sum((b[b"labels"] for b in train), []))
    np.testing.assert_array_equal(raw.y_test, batches["test_batch"][b"labels"])
    # the documented layout: row = 1024 red, 1024 green, 1024 blue values, row-major 32x32
    flat = train[1][b"data"][2]
    for i, j, c in [(0, 0, 0), (5, 17, 1), (31, 31, 2), (12, 3, 2)]:
        assert raw.x_train[4 + 2, i, j, c] == flat[c * 1024 + i * 32 + j]


def test_cifar_dir_nested_dir_and_tar(tmp_path):
    rng = np.random.default_rng(4)
    batches = write_cifar_dir(tmp_path / "cifar-10-batches-py", rng)
    check_cifar(load_cifar10(tmp_path / "cifar-10-batches-py"), batches)
    check_cifar(load_cifar10(tmp_path), batches)  # parent holding cifar-10-batches-py/
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    raw = load_cifar10(tgz)
    check_cifar(raw, batches)
    assert raw.source["format"] == "cifar10-python"
    assert load_dataset("cifar10", tgz).name == "cifar10"


def test_cifar_python2_style_pickle(tmp_path):
    """Batches pickled by numpy 1.x / Python 2 name numpy.core.multiarray._reconstruct."""
    rng = np.random.default_rng(5)
    batches = write_cifar_dir(tmp_path, rng)
    for name in batches:
        b = (tmp_path / name).read_bytes().replace(b"numpy._core.", b"numpy.core.")
        (tmp_path / name).write_bytes(b)
    assert b"numpy.core.multiarray" in (tmp_path / "test_batch").read_bytes()
    check_cifar(load_cifar10(tmp_path), batches)


def test_cifar_errors(tmp_path):
    rng = np.random.default_rng(6)
    d = tmp_path / "c"
    write_cifar_dir(d, rng)
    good = (d / "data_batch_3").read_bytes()
    (d / "data_batch_3").write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="data_batch_3.*truncated or corrupt"):
        load_cifar10(d)
    bad = cifar_batch(rng, 4)
    bad[b"labels"] = bad[b"labels"][:3]
    (d / "data_batch_3").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DatasetError, match="count mismatch: 3 labels for 4 images"):
        load_cifar10(d)
    bad = cifar_batch(rng, 4)
    bad[b"data"] = bad[b"data"][:, :3000]
    (d / "data_batch_3").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DatasetError, match=r"shape \(n, 3072\)"):
        load_cifar10(d)
    (d / "data_batch_3").write_bytes(pickle.dumps({b"data": eval}, protocol=2))
    with pytest.raises(DatasetError, match="not allowed"):
        load_cifar10(d)
    (d / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"lacks the batch file\(s\) \['data_batch_3'\]"):
        load_cifar10(d)
    with pytest.raises(DatasetError, match="does not exist"):
        load_cifar10(tmp_path / "nothing.tar.gz")


def test_cifar_corrupt_tar(tmp_path):
    rng = np.random.default_rng(7)
    write_cifar_dir(tmp_path / "cifar-10-batches-py", rng, n=50)
    tgz = tmp_path / "c.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    full = tgz.read_bytes()
    tgz.write_bytes(full[: len(full) // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_cifar10(tgz)
    with tarfile.open(tgz, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        payload = pickle.dumps(cifar_batch(rng, 2), protocol=2)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(DatasetError, match="lacks the batch file"):
        load_cifar10(tgz)


# ------------------------------------------------------------------------ hostile files
def _fuzz_script():
    """scripts/fuzz_readers.py as a module: its streamed bomb writers (a 1 GiB gzip bomb is a
    ~1 MB file written in well under a second, never 1 GiB in memory)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_readers.py"
    spec = importlib.util.spec_from_file_location("fuzz_readers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PEAK_PROBE = """
import json, resource, sys
from deqntk_dist import data
from deqntk_dist.errors import DeqntkError
out = {"base": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "cases": []}
for reader, path in json.loads(sys.argv[1]):
    try:
        res = getattr(data, reader)(path)
        outcome = "result " + str(getattr(res, "shape", getattr(getattr(res, "x_train", 0),
                                                                 "shape", "")))
    except DeqntkError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    except BaseException as exc:
        outcome = f"UNCLEAN {type(exc).__name__}: {exc}"
    out["cases"].append(outcome)
out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps(out))
"""


def _run_readers(cases: list[tuple[str, Path]]) -> tuple[list[str], float]:
    """Run reader functions on files in a fresh interpreter; outcomes and peak RSS growth (MiB)
    over the interpreter with deqntk_dist imported (the kernel's own count: ru_maxrss)."""
    import json
    import subprocess
    import sys

    arg = json.dumps([(reader, str(path)) for reader, path in cases])
    res = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE, arg], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out["cases"], out["peak"] - out["base"]


GIB_MIB = 1024  # bombs inflate to 1 GiB


def test_idx_inflation_bombs_and_header_overflow_are_refused_in_bounded_memory(tmp_path):
    """A 1 MB .gz IDX file that inflates to 1 GiB used to reach 1.2-2.3 GB RSS before being
    refused; dims (2**31, 2**31, 4) wrapped around int64 and 255 dims gave tracebacks."""
    fz = _fuzz_script()

    def header(dims, code=0x08):
        return bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)

    cases = []
    for name, dims in [
        ("small", (10, 28, 28)),
        ("huge", (2**31, 2**31, 4)),
        ("double", (2 * GIB_MIB, 1024, 1024)),
    ]:
        p = tmp_path / f"{name}-idx3-ubyte.gz"
        with open(p, "wb") as f:
            fz.write_gzip_bomb(f, header(dims), GIB_MIB)
        assert p.stat().st_size < 2 * 2**20
        cases.append(("read_idx", p))
    for name, raw in [
        ("wrap", header((2**31, 2**31, 4)) + bytes(64)),
        ("ndim255", header((1,) * 255) + bytes(1)),
        ("ndim33", header((1,) * 33) + bytes(1)),
    ]:
        (tmp_path / name).write_bytes(raw)
        cases.append(("read_idx", tmp_path / name))
    outcomes, grew = _run_readers(cases)
    assert "longer than its header says: header shape (10, 28, 28) needs 7840" in outcomes[0]
    assert (
        "declares 18446744073709551616 bytes of data, more than this machine's memory"
        in (outcomes[1])
    )
    want = "is truncated: header shape (2048, 1024, 1024) needs 2147483648 data bytes, found"
    assert f"{want} {GIB_MIB * 2**20}" in outcomes[2], outcomes[2]
    assert "declares 18446744073709551616 bytes" in outcomes[3]
    assert "declares 255 dimensions; at most 32" in outcomes[4]
    assert "declares 33 dimensions; at most 32" in outcomes[5]
    assert all(o.startswith("DatasetError: ") for o in outcomes), outcomes
    assert grew < 64, (grew, outcomes)


def test_cifar_inflation_bombs_and_array_gadgets_are_refused_in_bounded_memory(tmp_path):
    """A 2.2 MB tar.gz whose batch member inflates to 1 GiB (or whose first member does), a
    1 GiB batch file, and a 400 KB batch that constructs numpy.ndarray((200000, 3072))
    (which used to become 200,000 all-zero images with exit 0) are refused, in bounded
    memory, and the gadget's array is never allocated."""
    fz = _fuzz_script()
    rng = np.random.default_rng(41)
    good = {n: pickle.dumps(cifar_batch(rng, 3), protocol=2) for n in fz.CIFAR_NAMES}
    rest = fz._tar([(fz._info(f"cifar-10-batches-py/{n}", len(b)), b) for n, b in good.items()])
    cases = []
    for name in ("data_batch_1", "readme.html"):
        head = fz._info(f"cifar-10-batches-py/{name}", GIB_MIB * 2**20).tobuf(
            format=tarfile.GNU_FORMAT
        )
        p = tmp_path / f"bomb-{name}.tar.gz"
        with open(p, "wb") as f:
            fz.write_gzip_bomb(f, head, GIB_MIB, rest)
        assert p.stat().st_size < 3 * 2**20
        cases.append(("load_cifar10", p))
    sparse = tmp_path / "sparse"
    write_cifar_dir(sparse, rng)
    with open(sparse / "data_batch_2", "r+b") as f:
        f.truncate(GIB_MIB * 2**20)
    cases.append(("load_cifar10", sparse))
    gadget = tmp_path / "gadget"
    write_cifar_dir(gadget, rng)
    raw = fz.gadgets(tmp_path / "SENTINEL", 3)["numpy.ndarray((200000, 3072))"]
    assert 350_000 < len(raw) < 450_000
    (gadget / "data_batch_1").write_bytes(raw)
    cases.append(("load_cifar10", gadget))
    outcomes, grew = _run_readers(cases)
    limit = data._CIFAR_BATCH_MAX_BYTES
    assert (
        f"member 'cifar-10-batches-py/data_batch_1' is 1073741824 bytes, more than a "
        f"CIFAR-10 batch can hold ({limit})" in outcomes[0]
    ), outcomes[0]
    assert f"holds more than {data._CIFAR_TAR_MAX_BYTES} bytes of tar data" in outcomes[1]
    assert (
        f"data_batch_2' is 1073741824 bytes, more than the format can hold ({limit})"
        in (outcomes[2])
    )
    assert "global numpy.ndarray is not allowed" in outcomes[3] or ("calling a" in outcomes[3]), (
        outcomes[3]
    )
    assert all(o.startswith("DatasetError: ") for o in outcomes), outcomes
    assert grew < 100, (grew, outcomes)


def test_cifar_unpickler_builds_arrays_itself(tmp_path):
    """Gadgets never run (no sentinel file), stated shapes must match the bytes exactly, and
    the real layouts (protocols 0-5, Python 2 names) still read the same images."""
    fz = _fuzz_script()
    rng = np.random.default_rng(42)
    sentinel = tmp_path / "SENTINEL"
    for name, raw in fz.gadgets(sentinel, 3).items():
        d = tmp_path / name.replace(" ", "_").replace("/", "_")
        write_cifar_dir(d, rng)
        (d / "test_batch").write_bytes(raw)
        with pytest.raises(DatasetError, match="test_batch") as exc:
            load_cifar10(d)
        assert "Traceback" not in str(exc.value) and not sentinel.exists(), name
    for protocol in range(6):
        d = tmp_path / f"p{protocol}"
        batches = write_cifar_dir(d, rng)
        for n, b in batches.items():
            (d / n).write_bytes(pickle.dumps(b, protocol=protocol))
        check_cifar(load_cifar10(d), batches)


def test_npz_bombs_and_header_overflow_are_refused_in_bounded_memory(tmp_path):
    """Any extra member of an npz used to be read whole (a 1 MB deflated member inflates to
    1 GiB); a .npy header whose shape overflows int64 or exceeds memory gave MemoryError
    tracebacks.  Only the named arrays are read, each checked against its member's size."""
    fz = _fuzz_script()
    rng = np.random.default_rng(43)
    x, y = rng.normal(size=(10, 4)), rng.integers(0, 3, 10)
    arrays = [("x.npy", fz.npy_bytes(x)), ("y.npy", fz.npy_bytes(y))]
    fz.write_zip(tmp_path / "junk.npz", [*arrays, ("junk", (b"", GIB_MIB))])
    fz.write_zip(tmp_path / "tail.npz", [("x.npy", (fz.npy_bytes(x), GIB_MIB)), arrays[1]])
    huge = "{'descr': '<f8', 'fortran_order': False, 'shape': (2147483648, 2147483648, 4), }"
    fz.write_zip(tmp_path / "wrap.npz", [("x.npy", fz.npy_bytes(x, huge)), arrays[1]])
    big = "{'descr': '<f8', 'fortran_order': False, 'shape': (1099511627776,), }"
    fz.write_zip(tmp_path / "big.npz", [("x.npy", fz.npy_bytes(x, big)), arrays[1]])
    d = tmp_path / "npy"
    d.mkdir()
    (d / "x.npy").write_bytes(fz.npy_bytes(x, big))
    (d / "y.npy").write_bytes(fz.npy_bytes(y))
    names = ["junk.npz", "tail.npz", "wrap.npz", "big.npz"]
    outcomes, grew = _run_readers([("load_npz", tmp_path / n) for n in names] + [("load_npz", d)])
    assert outcomes[0] == "result (10, 4)", outcomes[0]
    assert (
        "member 'x.npy' is corrupt or not a numpy file: its header declares shape (10, 4)"
        in (outcomes[1])
    )
    for o in outcomes[2:]:
        assert o.startswith("DatasetError: ") and "its header declares shape (" in o, o
    assert grew < 64, (grew, outcomes)
    fz.write_zip(tmp_path / "many.npz", arrays + [(f"e{i}", b"") for i in range(1500)])
    with pytest.raises(DatasetError, match="lists 1502 entries, more than an npz holds"):
        load_npz(tmp_path / "many.npz")


def test_fuzz_readers_smoke():
    """A handful of seeded fuzz cases per reader (scripts/fuzz_readers.py): every one ends in
    a dataset or a DeqntkError, in bounded memory, and the script reports its figures."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_readers.py"
    res = subprocess.run(
        [
            sys.executable,
            str(script),
            "--cases",
            "6",
            "--seed",
            "7",
            "--bomb-mib",
            "64",
            "--max-case-mib",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["failures"] == 0
    for reader in ("idx", "cifar", "npz"):
        st = summary["stats"][reader]
        assert st["cases"] == 6 == st["result"] + st["error"], st
    assert re.search(
        r"peak RSS: this process [\d.]+ MiB, children \(workers\) [\d.]+ MiB", res.stdout
    )


# ---------------------------------------------------------------------------------------- npz
def test_npz_variants(tmp_path):
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(30, 6)), rng.integers(0, 3, 30)
    np.savez(tmp_path / "split.npz", x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
    raw = load_npz(tmp_path / "split.npz")
    np.testing.assert_array_equal(raw.x_test, x[20:])
    np.testing.assert_array_equal(raw.y_train, y[:20])
    np.savez(tmp_path / "ntrain.npz", x=x, y=y, n_train=np.int64(20))
    raw2 = load_npz(tmp_path / "ntrain.npz")
    np.testing.assert_array_equal(raw2.x_train, raw.x_train)
    np.testing.assert_array_equal(raw2.y_test, raw.y_test)
    np.savez(tmp_path / "xy.npz", x=x.reshape(30, 2, 3), y=y.astype(np.float64))
    raw3 = load_npz(tmp_path / "xy.npz")
    assert raw3.x_test is None and raw3.x_train.shape == (30, 2, 3, 1)
    assert raw3.y_train.dtype == np.int64
    d = tmp_path / "npy"
    d.mkdir()
    for k, v in dict(x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:]).items():
        np.save(d / f"{k}.npy", v)
    np.testing.assert_array_equal(load_dataset("npz", d).x_train, x[:20])


def test_npz_errors(tmp_path):
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(10, 4)), rng.integers(0, 3, 10)
    cases = {
        "keys.npz": (dict(a=x, b=y), "must hold arrays x_train"),
        "count.npz": (dict(x=x, y=y[:9]), "count mismatch: 9 labels for 10 images"),
        "labels.npz": (dict(x=x, y=y + 0.5), "integer class labels"),
        "neg.npz": (dict(x=x, y=y - 5), "labels >= 0"),
        "nan.npz": (dict(x=np.full((10, 4), np.nan), y=y), "non-finite"),
        "shape.npz": (dict(x=np.zeros((10, 2, 2, 2, 2)), y=y), "must have shape"),
        "ntrain.npz": (dict(x=x, y=y, n_train=np.int64(10)), "1 <= n_train < 10"),
        "obj.npz": (dict(x=np.array([object()] * 10), y=y), "corrupt or not a numpy file"),
        "feat.npz": (
            dict(x_train=x, y_train=y, x_test=x[:, :3], y_test=y),
            "x_test feature shape",
        ),
    }
    for name, (arrays, match) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(DatasetError, match=match):
            load_npz(tmp_path / name)
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "keys.npz").read_bytes()[:50])
    with pytest.raises(DatasetError, match="corrupt"):
        load_npz(tmp_path / "trunc.npz")
    with pytest.raises(DatasetError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")


def test_reader_labels_outside_class_range(tmp_path):
    """npz, IDX and CIFAR labels beyond the class bound are refused naming file, row, label."""
    rng = np.random.default_rng(31)
    x, y = rng.normal(size=(10, 4)), rng.integers(0, 3, 10)
    big = y.copy()
    big[6] = 10**9
    np.savez(tmp_path / "big.npz", x_train=x, y_train=y, x_test=x, y_test=big)
    with pytest.raises(DatasetError, match=r"'y_test' must be .*< 10000: row 6 holds label 10+"):
        load_npz(tmp_path / "big.npz")
    np.savez(tmp_path / "float.npz", x=x, y=np.where(np.arange(10) == 2, 1e300, y * 1.0))
    with pytest.raises(DatasetError, match=r"row 2 holds label 1e\+300"):
        load_npz(tmp_path / "float.npz")
    d = tmp_path / "idx"
    write_idx_dir(d, rng)
    labels = np.zeros(12, np.int64)
    labels[4] = 2**31 - 1
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels, 0x0C)))
    with pytest.raises(DatasetError, match=r"train-labels.*row 4 holds label 2147483647"):
        load_idx_dataset(d)
    c = tmp_path / "c"
    write_cifar_dir(c, rng)
    bad = cifar_batch(rng, 4)
    bad[b"labels"][3] = 10
    (c / "data_batch_2").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DatasetError, match=r"data_batch_2.*< 10: row 3 holds label 10"):
        load_cifar10(c)


def test_unknown_dataset_and_missing_source(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="dataset must be one of .*got 'imagenet'"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(DatasetError, match="needs a source path"):
        load_dataset("cifar10")
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "none"))
    with pytest.raises(
        DatasetError, match="apt-get install -y dataset-fashion-mnist.*pass it as source=DIR"
    ):
        ensure_fashion_mnist(install=False)


# ------------------------------------------------------------------------------- preprocessing
def test_parse_steps_and_config_errors():
    assert parse_steps("unit-norm, center") == ("center", "unit-norm")
    assert parse_steps("none") == ()
    with pytest.raises(InputError, match="preprocess steps must be among.*got whiten"):
        parse_steps("center,whiten")
    with pytest.raises(InputError, match="exclusive"):
        parse_steps("center,standardize")
    with pytest.raises(InputError, match="zca_strength must be a finite number >= 0, got -1"):
        PreprocessConfig(steps=("zca",), zca_strength=-1)


def test_statistics_fitted_on_train_only():
    rng = np.random.default_rng(10)
    train = rng.integers(0, 256, (50, 4, 4, 1), dtype=np.uint8)
    test = rng.integers(100, 256, (20, 4, 4, 1), dtype=np.uint8)
    for steps in [("center",), ("standardize",)]:
        fitted = fit_preprocessing(PreprocessConfig(steps=steps), train)
        tr, te = train.reshape(50, -1) / 255.0, test.reshape(20, -1) / 255.0
        mu = tr.mean(0)
        sd = tr.std(0) if "standardize" in steps else 1.0
        np.testing.assert_allclose(fitted.transform(test).reshape(20, -1), (te - mu) / sd)
        z = fitted.transform(train).reshape(50, -1)
        np.testing.assert_allclose(z.mean(0), 0, atol=1e-12)
        if "standardize" in steps:
            np.testing.assert_allclose(z.std(0), 1)
        assert abs(fitted.transform(test).mean()) > 0.1  # test rows are not re-centred
        assert fitted.to_attrs()["fitted_on"] == "train" and fitted.to_attrs()["n_fit"] == 50


def test_standardize_constant_feature_and_unit_norm():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(40, 5))
    x[:, 2] = 3.0
    fitted = fit_preprocessing(PreprocessConfig(steps=("standardize",)), x)
    z = fitted.transform(x)
    assert np.all(np.isfinite(z)) and np.all(z[:, 2] == 0)
    np.testing.assert_allclose(z[:, 0], (x[:, 0] - x[:, 0].mean()) / x[:, 0].std())
    x[7] = 0.0
    fitted = fit_preprocessing(PreprocessConfig(steps=("unit-norm",)), x)
    z = fitted.transform(x)
    norms = np.linalg.norm(z, axis=1)
    np.testing.assert_allclose(np.delete(norms, 7), np.sqrt(5))
    assert np.all(z[7] == 0)
    np.testing.assert_allclose(z[3] / np.linalg.norm(z[3]), x[3] / np.linalg.norm(x[3]))


def test_zca_output_covariance():
    rng = np.random.default_rng(12)
    A = rng.normal(size=(6, 6)) * np.array([3, 2, 1, 0.5, 0.2, 0.05])
    train = rng.normal(size=(400, 6)) @ A.T + 1.5
    fitted = fit_preprocessing(PreprocessConfig(steps=("zca",), zca_strength=0.0), train)
    z = fitted.transform(train)
    np.testing.assert_allclose(np.cov(z, rowvar=False, bias=True), np.eye(6), atol=1e-9)
    # ZCA is the symmetric inverse square root of the covariance (not another whitening)
    cov = np.cov(train, rowvar=False, bias=True)
    np.testing.assert_allclose(
        fitted.whitening, np.linalg.inv(scipy.linalg.sqrtm(cov)).real, rtol=1e-7, atol=1e-9
    )
    # regularised: output eigenvalues s / (s + eps mean(s)), s from an SVD of the train rows
    eps = 0.3
    fitted = fit_preprocessing(PreprocessConfig(steps=("zca",), zca_strength=eps), train)
    s = np.linalg.svd(train - train.mean(0), compute_uv=False) ** 2 / 400
    want = np.sort(s / (s + eps * s.mean()))
    z = fitted.transform(train)
    got = np.linalg.eigvalsh(np.cov(z, rowvar=False, bias=True))
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert fitted.to_attrs()["zca_strength"] == eps
    assert "zca_strength" not in PreprocessConfig(steps=("center",)).to_dict()


def test_zca_images_keep_shape_and_rank_deficient():
    rng = np.random.default_rng(13)
    imgs = rng.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    fitted = fit_preprocessing(
        PreprocessConfig(steps=("standardize", "zca", "unit-norm"), zca_strength=0.1), imgs
    )
    z = fitted.transform(imgs[:5])
    assert z.shape == (5, 4, 4, 3)
    np.testing.assert_allclose(np.linalg.norm(z.reshape(5, -1), axis=1), np.sqrt(48))
    with pytest.raises(DatasetError, match="use zca_strength > 0"):
        fit_preprocessing(PreprocessConfig(steps=("zca",), zca_strength=0.0), imgs)


@pytest.mark.parametrize("scale", [1e200, 1e-200, 2.0**1000])
@pytest.mark.parametrize(
    "steps",
    [
        ("unit-norm",),
        ("center", "unit-norm"),
        ("standardize", "unit-norm"),
        ("zca", "unit-norm"),
        ("standardize", "zca", "unit-norm"),
    ],
)
def test_preprocessing_of_extreme_magnitudes_is_scale_invariant(scale, steps):
    """Entries near 1e200 (squares overflow) or 1e-200 (squares underflow) used to give
    all-zero rows; the steps are scale invariant, so the result must equal the one on the
    same data at ordinary magnitude (computed independently by plain numpy)."""
    rng = np.random.default_rng(21)
    x = rng.normal(size=(40, 6)) + 0.5
    config = PreprocessConfig(steps=steps, zca_strength=0.1)
    if steps[0] == "zca" and scale > 1:  # covariance ~1e400: not representable, refused
        with pytest.raises(DatasetError, match="'zca': the training covariance overflows"):
            fit_preprocessing(config, x * scale)
        return
    big = fit_preprocessing(config, x * scale)
    got = big.transform(x * scale)
    np.testing.assert_allclose(got, fit_preprocessing(config, x).transform(x), rtol=1e-12)
    if steps == ("center", "unit-norm"):  # independent route, no deqntk code
        z = x - x.mean(0)
        np.testing.assert_allclose(
            got, z * np.sqrt(6) / np.linalg.norm(z, axis=1)[:, None], rtol=1e-12
        )
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.sqrt(6), rtol=1e-13)


def test_preprocessing_overflow_is_refused():
    """A step whose result is not representable raises DatasetError naming step and row."""
    x = np.array([[1.7e308, 1.0], [-1.7e308, 2.0], [-1.7e308, 3.0]])
    with pytest.raises(DatasetError, match="step 'center' overflows float64.*row 0"):
        fit_preprocessing(PreprocessConfig(steps=("center", "unit-norm")), x)
    fitted = fit_preprocessing(PreprocessConfig(steps=("center", "unit-norm")), x[1:])
    test = np.array([[1.0, 1.0], [1.7e308, 1.0]])
    with pytest.raises(DatasetError, match="step 'center' overflows float64.*row 11"):
        fitted.transform(test, first_row=10)
    rng = np.random.default_rng(22)
    with pytest.raises(DatasetError, match="'zca': the training covariance overflows"):
        fit_preprocessing(PreprocessConfig(steps=("zca",)), rng.normal(size=(20, 3)) * 1e200)
    tiny = fit_preprocessing(PreprocessConfig(steps=("standardize",)), np.array([[0.0], [1e-11]]))
    with pytest.raises(DatasetError, match="step 'standardize' overflows float64.*row 0"):
        tiny.transform(np.array([[1.7e308]]))


# --------------------------------------------------------------------------------- subsetting
def test_balanced_subset():
    y = np.repeat(np.arange(4), [50, 50, 50, 3])
    idx = balanced_subset(y, 40, seed=1)
    assert idx.size == 40 and np.all(np.diff(idx) > 0)
    counts = np.bincount(y[idx], minlength=4)
    np.testing.assert_array_equal(np.sort(counts), [3, 12, 12, 13])  # water filling
    np.testing.assert_array_equal(idx, balanced_subset(y, 40, seed=1))
    assert not np.array_equal(idx, balanced_subset(y, 40, seed=2))
    y = np.tile(np.arange(10), 30)
    np.testing.assert_array_equal(np.bincount(y[balanced_subset(y, 50)]), np.full(10, 5))
    assert balanced_subset(y, None).size == 300
    with pytest.raises(InputError, match="n_train must be <= the 300 rows available, got 301"):
        balanced_subset(y, 301, what="n_train")
    with pytest.raises(InputError, match="n_test must be a positive integer, got 0"):
        balanced_subset(y, 0, what="n_test")


def test_select_rows_drawn_split_is_disjoint():
    rng = np.random.default_rng(14)
    x = np.arange(100)[:, None] * np.ones((1, 3))
    raw = RawDataset(
        name="npz", x_train=x, y_train=rng.integers(0, 5, 100), x_test=None, y_test=None
    )
    xs, ys, xt, yt, sel = select_rows(raw, 30, 20, seed=3)
    assert xs.shape == (30, 3) and xt.shape == (20, 3) and sel["split"] == "drawn"
    assert not set(xs[:, 0]) & set(xt[:, 0])
    raw = replace(raw, x_test=x[:10], y_test=np.arange(10) % 5)
    xs, ys, xt, yt, sel = select_rows(raw, None, None)
    assert xs.shape[0] == 100 and xt.shape[0] == 10 and sel["split"] == "given"


def _fake_apt(tmp_path, monkeypatch, script: str) -> Path:
    """A stand-in `apt-get` on PATH (the real one must not run in tests)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text("#!/bin/sh\n" + script)
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setattr(data.os, "geteuid", lambda: 0)
    return apt


def test_ensure_fashion_mnist_installs_with_apt(tmp_path, monkeypatch):
    target = tmp_path / "share" / "fashion-mnist"
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(target))
    log = tmp_path / "apt.log"
    _fake_apt(
        tmp_path,
        monkeypatch,
        f'echo "$@" >> {log}\nmkdir -p {target}\ntouch {target}/train-images-idx3-ubyte.gz\n',
    )
    assert ensure_fashion_mnist() == target
    assert "install -y -q dataset-fashion-mnist" in log.read_text()


def test_ensure_fashion_mnist_apt_failure_and_non_root(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "none"))
    _fake_apt(tmp_path, monkeypatch, 'echo "E: Unable to locate package" >&2\nexit 100\n')
    with pytest.raises(
        DatasetError, match="apt-get failed .*Unable to locate package.*source=DIR"
    ):
        ensure_fashion_mnist()
    monkeypatch.setattr(data.os, "geteuid", lambda: 1000)
    with pytest.raises(DatasetError, match="is not installed in .*sudo apt-get install -y"):
        load_dataset("fashion-mnist")
