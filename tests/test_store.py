"""Kernel store layout, reader API, mismatch errors and verify (tiles written in-process)."""

import os

import dask.array as da
import numpy as np
import pytest
import zarr

from deqntk_dist import DEQSpec, kernel_matrix, open_kernel_store, write_dataset_store
from deqntk_dist.errors import IncompleteStoreError, StoreError, StoreMismatchError
from deqntk_dist.store import create_kernel_store, verify_kernel_store

SPEC = DEQSpec(sigma_w2=1.2, sigma_u2=0.9, sigma_b2=0.1)
N, NTRAIN, TILE = 45, 33, 16


@pytest.fixture
def ds(tmp_path, rng):
    x = rng.normal(size=(N, 7))
    return write_dataset_store(
        tmp_path / "ds", x, rng.integers(0, 4, N), n_train=NTRAIN, name="toy"
    )


def _fill(store, ds, tiles=None):
    X = ds.rows(0, ds.n)
    for i, j in tiles if tiles is not None else store.plan.tiles():
        r0, r1 = store.plan.bounds(i)
        c0, c1 = store.plan.bounds(j)
        res = kernel_matrix(SPEC, X[r0:r1]) if i == j else kernel_matrix(SPEC, X[r0:r1], X[c0:c1])
        store.write_tile(
            i,
            j,
            {"ntk": res.ntk, "nngp": res.nngp},
            max_residual=res.max_residual,
            iterations=res.iterations,
            seconds=0.01,
        )


@pytest.mark.parametrize("layout", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_reader_api_matches_untiled_kernel(tmp_path, ds, dtype, layout):
    store = create_kernel_store(
        tmp_path / "ks", ds, SPEC, tile=TILE, dtype=dtype, kernels=("nngp", "ntk"), layout=layout
    )
    assert store.kernels == ("ntk", "nngp")
    _fill(store, ds)
    full = kernel_matrix(SPEC, ds.rows(0, N))
    ntk, nngp = full.ntk.astype(dtype), full.nngp.astype(dtype)
    ks = open_kernel_store(tmp_path / "ks")
    assert (ks.n, ks.n_train, ks.n_test, ks.tile, ks.dtype) == (N, NTRAIN, N - NTRAIN, TILE, dtype)
    assert ks.spec == SPEC and ks.dataset().fingerprint == ds.fingerprint
    np.testing.assert_array_equal(ks.array("ntk")[...], ntk)
    np.testing.assert_array_equal(ks.to_dask("nngp").compute(), nngp)
    assert ks.to_dask("ntk").chunksize == (TILE, TILE)  # a tile is smaller than a chunk
    np.testing.assert_array_equal(ks.block("ntk", slice(3, 40), slice(17, 45)), ntk[3:40, 17:45])
    np.testing.assert_array_equal(ks.train_train("ntk"), ntk[:NTRAIN, :NTRAIN])
    np.testing.assert_array_equal(ks.test_train("nngp"), nngp[NTRAIN:, :NTRAIN])
    np.testing.assert_array_equal(ks.test_test("ntk"), ntk[NTRAIN:, NTRAIN:])
    np.testing.assert_array_equal(ks.labels(), ds.y)
    st = ks.status()
    assert st["complete"] and st["tiles_done"] == st["tiles_total"] == 6
    assert st["entries_done"] == N * N and st["max_residual"] < 1e-10
    assert ks.is_complete() and ks.missing_tiles() == []
    assert verify_kernel_store(tmp_path / "ks") == []
    # plain zarr / dask without this package
    g = zarr.open_group(str(tmp_path / "ks"), mode="r")
    assert g.attrs["format"] == "deqntk-kernel-store" and g.attrs["tile"] == TILE
    assert (
        g.attrs["spec"] == SPEC.to_dict() and g.attrs["dataset"]["fingerprint"] == ds.fingerprint
    )
    np.testing.assert_array_equal(da.from_zarr(g["ntk"]).compute(), ntk)
    if layout == 1:
        assert g["ledger/done"][...].all()
    else:
        assert (np.asarray(g["ledger/records"][...])[np.triu_indices(3)] > 0).any(axis=-1).all()


def test_partial_store_status_and_guarded_reads(tmp_path, ds):
    store = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE)
    _fill(store, ds, tiles=[(0, 0), (1, 2)])
    ks = open_kernel_store(tmp_path / "ks")
    assert ks.missing_tiles() == [(0, 1), (0, 2), (1, 1), (2, 2)]
    st = ks.status()
    assert (st["tiles_done"], st["entries_done"]) == (2, 16 * 16 + 2 * 16 * 13)
    assert not st["complete"]
    full = kernel_matrix(SPEC, ds.rows(0, N)).ntk.astype(np.float32)
    np.testing.assert_array_equal(ks.block("ntk", slice(32, 45), slice(16, 32)), full[32:, 16:32])
    with pytest.raises(IncompleteStoreError, match=r"\(0, 1\)"):
        ks.block("ntk", slice(0, 10), slice(0, 20))
    with pytest.raises(IncompleteStoreError):
        ks.train_train("ntk")
    # unwritten entries read as NaN, never as plausible zeros
    assert np.isnan(ks.block("ntk", slice(0, 5), slice(20, 25), check=False)).all()
    problems = verify_kernel_store(tmp_path / "ks")
    assert len(problems) == 1 and "4 of 6 tiles not done" in problems[0]


def test_reopen_mismatches_are_errors(tmp_path, ds, rng):
    create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE)
    again = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE)
    assert again.tile == TILE
    other = write_dataset_store(
        tmp_path / "ds2", rng.normal(size=(N, 7)), np.zeros(N, int), n_train=NTRAIN, name="toy"
    )
    cases = [
        ({"spec": DEQSpec(sigma_w2=1.3, sigma_u2=0.9, sigma_b2=0.1)}, "spec"),
        ({"dataset": other}, "dataset fingerprint"),
        ({"tile": 8}, "tile"),
        ({"dtype": "float64"}, "dtype"),
        ({"kernels": ("ntk", "nngp")}, "kernels"),
    ]
    for change, word in cases:
        kw = {"dataset": ds, "spec": SPEC, "tile": TILE, **change}
        with pytest.raises(StoreMismatchError, match=word):
            create_kernel_store(tmp_path / "ks", kw.pop("dataset"), kw.pop("spec"), **kw)


def test_store_written_before_the_pooling_fields_reopens(tmp_path, ds):
    """A spec stored without ``hflip`` (older software) is the same spec, not a mismatch."""
    create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE)
    root = zarr.open_group(str(tmp_path / "ks"), mode="r+")
    old = dict(root.attrs["spec"])
    del old["hflip"]
    root.attrs["spec"] = old
    assert create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE).spec == SPEC
    assert open_kernel_store(tmp_path / "ks").spec == SPEC
    root.attrs["spec"] = {**old, "sigma_w2": 1.0}
    with pytest.raises(StoreMismatchError, match="sigma_w2"):
        create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE)


def test_verify_reports_corrupted_chunks_and_ledger(tmp_path, ds):
    store = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE, layout=1)
    _fill(store, ds)
    assert verify_kernel_store(tmp_path / "ks") == []
    chunk = tmp_path / "ks" / "ntk" / "c" / "0" / "1"
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0x01  # one flipped bit in one float
    chunk.write_bytes(bytes(raw))
    problems = verify_kernel_store(tmp_path / "ks")
    assert any("tile (0, 1)" in p and "checksum" in p for p in problems)
    assert any("tile (0, 1) ntk" in p and "transpose" in p for p in problems)
    # truncated mirror chunk of another tile: unreadable
    mirror = tmp_path / "ks" / "ntk" / "c" / "2" / "1"
    mirror.write_bytes(mirror.read_bytes()[:50])
    assert any(
        "tile (1, 2) ntk" in p and "unreadable" in p for p in verify_kernel_store(tmp_path / "ks")
    )
    # ledger halves disagreeing
    zarr.open_array(str(tmp_path / "ks" / "ledger" / "done"), mode="r+")[2, 0] = False
    assert any("disagree" in p for p in verify_kernel_store(tmp_path / "ks"))


def test_missing_and_foreign_paths(tmp_path, ds):
    with pytest.raises(StoreError, match="not found"):
        open_kernel_store(tmp_path / "none")
    with pytest.raises(StoreError, match="not a deqntk kernel store"):
        open_kernel_store(ds.path)
    with pytest.raises(StoreError, match="parent directory"):
        create_kernel_store(tmp_path / "a" / "b", ds, SPEC, tile=TILE)


def test_read_only_destination(tmp_path, ds):
    if os.geteuid() == 0:
        dest = "/sys/deqntk-kernel-store"  # root ignores permission bits; sysfs refuses mkdir
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        dest = ro / "ks"
    with pytest.raises(StoreError, match="cannot create kernel store"):
        create_kernel_store(dest, ds, SPEC, tile=TILE)
    assert not os.path.exists(dest)


def test_read_only_open_refuses_writes(tmp_path, ds):
    create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE)
    ks = open_kernel_store(tmp_path / "ks")
    with pytest.raises(StoreError, match="read-only"):
        ks.write_tile(0, 0, {}, max_residual=0.0, iterations=1, seconds=0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cast_and_mirror_rounds_like_astype(rng, dtype):
    from deqntk_dist.store import cast_and_mirror

    a = rng.random((37, 70)) * np.exp(rng.normal(size=(37, 70)) * 40)
    a[0, :5] = [np.inf, -np.inf, 1e-320, 7e38, -0.0]
    a[1, 0] = np.nan
    with np.errstate(over="ignore"):
        ref = a.astype(dtype)
    up, lo = cast_and_mirror(a, dtype)
    assert up.flags.c_contiguous and lo.flags.c_contiguous and lo.shape == (70, 37)
    bits = np.uint32 if dtype == np.float32 else np.uint64
    np.testing.assert_array_equal(up.view(bits), ref.view(bits))
    np.testing.assert_array_equal(lo.view(bits), np.ascontiguousarray(ref.T).view(bits))


def test_direct_chunk_files_are_the_bytes_zarr_writes(tmp_path, ds, monkeypatch):
    from deqntk_dist.store import KernelStore

    fast = create_kernel_store(
        tmp_path / "fast", ds, SPEC, tile=TILE, kernels=("ntk", "nngp"), layout=1
    )
    assert fast._raw_chunks("ntk")
    assert all(fast._raw_chunks(f"ledger/{f}") for f in ("done", "checksum", "max_residual"))
    _fill(fast, ds)
    monkeypatch.setattr(KernelStore, "_raw_chunks", lambda self, name: False)
    ref = create_kernel_store(
        tmp_path / "ref", ds, SPEC, tile=TILE, kernels=("ntk", "nngp"), layout=1
    )
    _fill(ref, ds)  # through zarr's own writer
    for name in ("ntk", "nngp"):
        files = sorted(
            p.relative_to(tmp_path / "ref")
            for p in (tmp_path / "ref" / name).rglob("*")
            if p.is_file()
        )
        assert len(files) == 1 + 9  # zarr.json + 3 x 3 chunks (edge chunks padded)
        for rel in files:
            if rel.name != "zarr.json":
                assert (tmp_path / "fast" / rel).read_bytes() == (
                    tmp_path / "ref" / rel
                ).read_bytes()
    assert not list((tmp_path / "fast").rglob("*.partial"))
    # the ledger files written directly read back through zarr like zarr's own
    fast_root, ref_root = zarr.open_group(fast.path, mode="r"), zarr.open_group(ref.path, mode="r")
    for field in ("done", "checksum", "iterations", "max_residual", "seconds"):
        np.testing.assert_array_equal(
            fast_root[f"ledger/{field}"][:], ref_root[f"ledger/{field}"][:]
        )
    assert fast_root["ledger/done"][:].all()


def _direct_io_supported(directory) -> bool:
    """Whether an aligned 1 MiB O_DIRECT write works in ``directory`` (probed directly)."""
    import mmap

    if not hasattr(os, "O_DIRECT"):
        return False
    probe = os.path.join(directory, ".probe")
    buf = mmap.mmap(-1, 1 << 20)  # page-aligned
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    try:
        os.write(fd, buf)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)


@pytest.mark.parametrize("side", [512, 520])  # 1 MiB exactly; an unaligned 256-byte tail
def test_write_file_direct_and_fallbacks(tmp_path, rng, side):
    from deqntk_dist.store import aligned_empty, write_file

    data = aligned_empty((side, side), np.float32)
    data[:] = rng.random((side, side))
    assert data.ctypes.data % 4096 == 0
    dirs = [tmp_path] + ([p] if (p := "/dev/shm") and os.path.isdir(p) else [])
    for d in dirs:
        sub = os.path.join(d, f"deqntk-test-{os.getpid()}-{side}")
        os.makedirs(sub, exist_ok=True)
        try:
            path = os.path.join(sub, "chunk")
            used = write_file(path, data)
            assert used == _direct_io_supported(sub)
            with open(path, "rb") as f:
                assert f.read() == data.tobytes()
            # an unaligned buffer and direct=False go through the page cache, same bytes
            odd = np.empty(data.size + 1, np.float32)[1:].reshape(data.shape)
            odd[:] = data
            for arr, kw in ((odd, {}), (data, {"direct": False})):
                assert write_file(path, arr, **kw) is False
                with open(path, "rb") as f:
                    assert f.read() == data.tobytes()
        finally:
            for name in os.listdir(sub):
                os.unlink(os.path.join(sub, name))
            os.rmdir(sub)


def test_direct_io_chunks_with_padding_equal_zarr(tmp_path, rng, monkeypatch):
    """Chunks over 1 MiB (written with O_DIRECT where the filesystem allows), an edge
    chunk padded with NaN: the same files as zarr's writer, and verify passes."""
    from deqntk_dist.store import KernelStore

    n, tile = 1100, 520
    x = rng.normal(size=(n, 5))
    dsb = write_dataset_store(tmp_path / "dsb", x, rng.integers(0, 3, n), n_train=900, name="b")
    X = dsb.rows(0, n)

    def fill(store):
        for i, j in store.plan.tiles():
            r0, r1 = store.plan.bounds(i)
            c0, c1 = store.plan.bounds(j)
            res = kernel_matrix(SPEC, X[r0:r1], None if i == j else X[c0:c1])
            store.write_tile(i, j, {"ntk": res.ntk}, max_residual=0.0, iterations=1, seconds=0.0)

    fast = create_kernel_store(tmp_path / "fast", dsb, SPEC, tile=tile, kernels=("ntk",))
    fill(fast)
    assert verify_kernel_store(fast.path) == []
    monkeypatch.setattr(KernelStore, "_raw_chunks", lambda self, name: False)
    ref = create_kernel_store(tmp_path / "ref", dsb, SPEC, tile=tile, kernels=("ntk",))
    fill(ref)
    chunks = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref/ntk/c").rglob("*"))
    files = [c for c in chunks if (tmp_path / "ref" / c).is_file()]
    assert len(files) == 9
    for rel in files:
        assert (tmp_path / "fast" / rel).read_bytes() == (tmp_path / "ref" / rel).read_bytes()
    full = kernel_matrix(SPEC, X).ntk.astype(np.float32)
    np.testing.assert_array_equal(
        open_kernel_store(fast.path).block("ntk", slice(0, n), slice(0, n)), full
    )


def test_checksum_is_zlib_crc32(rng):
    """The ledger checksum (zlib-ng's SIMD crc32) is zlib's CRC-32, chained as well."""
    import zlib

    from deqntk_dist.store import checksum, crc32

    for shape, dtype in [((3,), np.float32), ((517, 33), np.float64), ((1024, 1024), "<f4")]:
        a = rng.random(shape).astype(dtype)
        assert checksum(a) == zlib.crc32(a.tobytes())
        b = rng.random(shape).astype(dtype)
        assert crc32(b.tobytes(), crc32(a.tobytes())) == zlib.crc32(b.tobytes(), checksum(a))
    big = rng.random((64, 64)).astype(">f8")  # big-endian input: checksummed as written (<)
    assert checksum(big) == zlib.crc32(big.astype("<f8").tobytes())


def test_tile_writes_work_in_a_forked_child(tmp_path, ds):
    """The I/O thread pool is per process: a child forked after the parent wrote tiles
    (so its pool has no threads) still writes, instead of waiting forever."""
    import multiprocessing as mp

    store = create_kernel_store(tmp_path / "k", ds, SPEC, tile=TILE, kernels=("ntk", "nngp"))
    tiles = store.plan.tiles()
    _fill(store, ds, [(0, 1)])  # both I/O threads start here
    tiles.remove((0, 1))
    X = ds.rows(0, ds.n)
    # computed here: numba's OpenMP pool refuses to run in a forked child at all
    values = {}
    for i, j in tiles:
        r0, r1 = store.plan.bounds(i)
        c0, c1 = store.plan.bounds(j)
        res = kernel_matrix(SPEC, X[r0:r1], None if i == j else X[c0:c1])
        values[i, j] = {"ntk": res.ntk, "nngp": res.nngp}

    def child():
        ks = open_kernel_store(store.path, writable=True)
        for (i, j), v in values.items():
            ks.write_tile(i, j, v, max_residual=0.0, iterations=1, seconds=0.01)

    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    proc.join(60)
    if proc.is_alive():  # pragma: no cover - the failure this test guards against
        proc.kill()
        pytest.fail("tile writes in a forked child hung")
    assert proc.exitcode == 0
    assert verify_kernel_store(store.path) == []


# --------------------------------------------------------------- identity digests (issue 12)
def _edit_attrs(path, **changes):
    root = zarr.open_group(str(path), mode="r+")
    for key, value in changes.items():
        root.attrs[key] = value


def test_verify_binds_tiles_to_the_spec_dataset_and_settings(tmp_path, ds):
    """Editing the spec, the dataset fingerprint, the options or the tile in zarr.json after
    the tiles were written is reported: every tile carries the digest of its identity."""
    store = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE, layout=1)
    _fill(store, ds)
    assert verify_kernel_store(store.path) == []
    root = zarr.open_group(store.path, mode="r")
    spec, dsattrs = dict(root.attrs["spec"]), dict(root.attrs["dataset"])
    for key, value in [
        ("spec", {**spec, "sigma_w2": 1.0}),
        ("dataset", {**dsattrs, "fingerprint": "0" * 32}),
        ("options", {"n_nodes": 80}),
    ]:
        _edit_attrs(store.path, **{key: value})
        problems = verify_kernel_store(store.path)
        assert len(problems) == 1, problems
        assert "6 finished tiles were computed under another identity" in problems[0]
        _edit_attrs(store.path, spec=spec, dataset=dsattrs, options={})
        assert verify_kernel_store(store.path) == []
    # the normalised spec decides: a spec stored without the fields added since is the same
    _edit_attrs(store.path, spec={k: v for k, v in spec.items() if k != "hflip"})
    assert verify_kernel_store(store.path) == []
    # a ledger identity entry copied from another tile is foreign too
    ident = zarr.open_array(str(tmp_path / "ks" / "ledger" / "identity"), mode="r+")
    ident[0, 1] = ident[0, 2]
    assert any("(0, 1)" in p and "another identity" in p for p in verify_kernel_store(store.path))


def test_verify_reports_edited_labels_and_self_covariances(tmp_path, ds, rng):
    from deqntk_dist import CDEQSpec
    from deqntk_dist.kernels import self_covariance

    store = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE)
    _fill(store, ds)
    labels = zarr.open_array(str(tmp_path / "ks" / "labels"), mode="r+")
    labels[3] = labels[3] + 1
    assert verify_kernel_store(store.path) == [
        f"labels changed on disk (crc32 {_crc(labels[...])}, recorded {labels.attrs['crc32']})"
    ]
    spec = CDEQSpec(sigma_w2=1.2, sigma_u2=1.0, sigma_b2=0.1, readout="lap", pool_size=3)
    n = 12
    x = rng.normal(size=(n, 5, 4, 1))
    dsc = write_dataset_store(tmp_path / "dsc", x, rng.integers(0, 3, n), n_train=9, name="im")
    ks = create_kernel_store(tmp_path / "kc", dsc, spec, tile=8, aux_rows=8, options={"tol": 1e-9})
    sc = self_covariance(spec, dsc.rows(0, n))
    ks.write_self_covariance(0, 8, sc[:8])
    ks.write_self_covariance(8, 12, sc[8:])
    X = dsc.rows(0, n)
    for i, j in ks.plan.tiles():
        r0, r1 = ks.plan.bounds(i)
        c0, c1 = ks.plan.bounds(j)
        res = kernel_matrix(
            spec, X[r0:r1], None if i == j else X[c0:c1], tol=1e-9,
            self_x=sc[r0:r1], self_y=None if i == j else sc[c0:c1],
        )  # fmt: skip
        ks.write_tile(i, j, {"ntk": res.ntk}, max_residual=0.0, iterations=1, seconds=0.0)
    assert verify_kernel_store(ks.path) == []
    # an older spelling (no hflip) of the CDEQ spec gives the same identity
    stored = dict(zarr.open_group(ks.path).attrs["spec"])
    _edit_attrs(ks.path, spec={k: v for k, v in stored.items() if k != "hflip"})
    assert verify_kernel_store(ks.path) == []
    aux = zarr.open_array(str(tmp_path / "kc" / "aux" / "self_cov"), mode="r+")
    aux[9, 0, 0] = aux[9, 0, 0] * 2
    assert verify_kernel_store(ks.path) == [
        "self-covariance rows [8, 12): checksum mismatch (changed)"
    ]
    _edit_attrs(ks.path, spec={**stored, "pool_size": 5})
    problems = verify_kernel_store(ks.path)
    assert any("rows [0, 8) were computed under another identity" in p for p in problems)
    assert any("3 finished tiles were computed under another identity" in p for p in problems)


def _crc(values) -> int:
    import zlib

    return zlib.crc32(np.ascontiguousarray(values, dtype="<i8").tobytes())


def _make_legacy(path):
    """Strip what older software did not write: identity ledger, leases, label checksum."""
    import shutil

    for sub in ("ledger/identity", "leases"):
        shutil.rmtree(os.path.join(path, sub))
    labels = zarr.open_array(os.path.join(path, "labels"), mode="r+")
    labels.attrs.pop("crc32")


def test_store_without_identity_digests_opens_verifies_with_a_note(tmp_path, ds):
    store = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE, layout=1)
    _fill(store, ds, tiles=[(0, 0), (0, 1)])
    _make_legacy(store.path)
    ks = open_kernel_store(store.path)
    assert "identity" not in ks.ledger() and ks.missing_tiles() == [(0, 2), (1, 1), (1, 2), (2, 2)]
    notes = []
    problems = verify_kernel_store(store.path, notes=notes)
    assert problems == ["4 of 6 tiles not done: (0, 2), (1, 1), (1, 2), (2, 2)"]
    assert any("written without identity digests" in n for n in notes)
    assert any("labels written without a checksum" in n for n in notes)
    # tiles written into it (older layout) still verify
    _fill(open_kernel_store(store.path, writable=True), ds, tiles=[(0, 2), (1, 1), (1, 2), (2, 2)])
    assert verify_kernel_store(store.path) == []


def test_verify_names_what_is_wrong_with_the_ledger_and_metadata(tmp_path, ds):
    store = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE, layout=1)
    _fill(store, ds)
    root = tmp_path / "ks"
    # a deleted ledger checksum entry: not "chunk bytes changed"
    os.unlink(root / "ledger" / "checksum" / "c" / "0" / "1")
    problems = verify_kernel_store(store.path)
    assert problems == [
        "tile (0, 1): ledger checksum entry missing (ledger/checksum/c/0/1 was deleted); "
        "its data cannot be checked"
    ]
    # a changed checksum entry while the chunk equals its mirror's transpose
    zarr.open_array(str(root / "ledger" / "checksum"), mode="r+")[0, 1] = 12345
    assert verify_kernel_store(store.path) == [
        "tile (0, 1): ledger checksum entry changed (the chunk data are intact: they equal the "
        "transpose of the other half, whose checksum matches)"
    ]
    _fill(store, ds, tiles=[(0, 1)])
    assert verify_kernel_store(store.path) == []
    # a deleted data chunk file
    os.unlink(root / "ntk" / "c" / "2" / "1")
    assert verify_kernel_store(store.path) == ["tile (1, 2) ntk: chunk file ntk/c/2/1 missing"]
    _fill(store, ds, tiles=[(1, 2)])
    # corrupt labels chunk and array metadata: reported, never a traceback
    chunk = next(p for p in (root / "labels" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"garbage")
    problems = verify_kernel_store(store.path)
    assert len(problems) == 1 and "labels are unreadable" in problems[0]
    (root / "ntk" / "zarr.json").write_text("{not json")
    problems = verify_kernel_store(store.path)
    assert any("kernel array 'ntk' unreadable" in p and "ntk/zarr.json" in p for p in problems)
    with pytest.raises(StoreError, match="labels are unreadable"):
        open_kernel_store(store.path).labels()
    (root / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="not a zarr group"):
        verify_kernel_store(store.path)


def test_a_full_disk_while_leasing_a_tile_is_a_store_error_and_leaves_nothing(
    tmp_path, monkeypatch
):
    import errno
    from pathlib import Path

    from deqntk_dist.errors import StoreError
    from deqntk_dist.store.lease import TileLeases

    leases = TileLeases(tmp_path)
    assert leases.acquire(0, 1) == (True, None)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(
        StoreError,
        match=r"lease of tile \(2, 3\).*No space left on device; "
        r"finished tiles are kept in the store",
    ):
        leases.acquire(2, 3)
    monkeypatch.undo()
    assert not leases.path(2, 3).exists()
    leases.release_all()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
