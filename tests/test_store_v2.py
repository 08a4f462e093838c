"""Layout 2: one shard and one ledger record per tile; plain-zarr consumers; verify of
damaged shards and records; migrate from layout 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from deqntk_dist import DEQSpec, kernel_matrix, open_kernel_store, write_dataset_store
from deqntk_dist.errors import InputError, StoreMismatchError
from deqntk_dist.store import create_kernel_store, verify_kernel_store
from deqntk_dist.store.migrate import migrate_kernel_store
from deqntk_dist.store.shards import inner_chunk

SPEC = DEQSpec(sigma_w2=1.2, sigma_u2=0.9, sigma_b2=0.1)
N, NTRAIN, TILE, CHUNK = 90, 70, 32, 8


@pytest.fixture
def ds(tmp_path, rng):
    x = rng.normal(size=(N, 5))
    return write_dataset_store(
        tmp_path / "ds", x, rng.integers(0, 4, N), n_train=NTRAIN, name="toy"
    )


@pytest.fixture
def full(ds):
    return kernel_matrix(SPEC, ds.rows(0, N))


def _fill(store, full, tiles=None):
    for i, j in tiles if tiles is not None else store.plan.tiles():
        r0, r1 = store.plan.bounds(i)
        c0, c1 = store.plan.bounds(j)
        store.write_tile(
            i,
            j,
            {k: getattr(full, k)[r0:r1, c0:c1] for k in store.kernels},
            max_residual=1e-12,
            iterations=7,
            seconds=0.5,
        )


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_v2_store_equals_untiled_and_plain_zarr_reads_it(tmp_path, ds, full, dtype):
    ks = create_kernel_store(
        tmp_path / "ks", ds, SPEC, tile=TILE, dtype=dtype, kernels=("ntk", "nngp"), chunk=CHUNK
    )
    assert ks.format_version == 2 and ks.geometry.chunk == CHUNK
    _fill(ks, full)
    ntk, nngp = full.ntk.astype(dtype), full.nngp.astype(dtype)
    np.testing.assert_array_equal(ks.array("ntk")[...], ntk)  # bitwise
    np.testing.assert_array_equal(ks.array("nngp")[...], nngp)
    assert verify_kernel_store(ks.path) == []
    assert ks.status()["complete"] and ks.to_dask("ntk").chunksize == (CHUNK, CHUNK)
    # one file per shard and one ledger record per tile: 2 kernels x (2 shards) + 1 record
    nb = ks.plan.n_blocks
    shards = [p for p in _files(tmp_path / "ks" / "ntk") if p.name != "zarr.json"]
    records = [p for p in _files(tmp_path / "ks" / "ledger" / "records") if p.name != "zarr.json"]
    assert len(shards) == nb * nb and len(records) == ks.plan.n_tiles
    # a consumer with zarr and dask only (no deqntk import) reads shards, inner chunks and
    # ledger records
    np.save(tmp_path / "ntk.npy", ntk)
    code = f"""
import json, sys
import numpy as np, zarr, dask.array as da
g = zarr.open_group({str(tmp_path / "ks")!r}, mode="r")
a = g["ntk"]
assert a.shards == ({TILE}, {TILE}) and a.chunks == ({CHUNK}, {CHUNK}), (a.shards, a.chunks)
want = np.load({str(tmp_path / "ntk.npy")!r})
assert np.array_equal(da.from_zarr(a).compute(), want)
assert np.array_equal(da.from_zarr(a)[13:29, 41:77].compute(), want[13:29, 41:77])
rec = json.loads(bytes(g["ledger/records"][0, 1]).rstrip(b"\\0"))
assert rec["tile"] == [0, 1] and rec["iterations"] == 7
assert set(rec["checksums"]) == {{"ntk", "nngp"}}
assert g.attrs["format_version"] == 2 and g.attrs["chunk"] == {CHUNK}
assert not any(m.startswith("deqntk") for m in sys.modules)
print("consumer ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "consumer ok" in out.stdout, out.stderr


def test_v2_partial_store_reads_and_resumes(tmp_path, ds, full):
    ks = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE, chunk=CHUNK)
    _fill(ks, full, tiles=[(0, 0), (1, 2)])
    ks = open_kernel_store(ks.path)
    assert ks.missing_tiles() == [(0, 1), (0, 2), (1, 1), (2, 2)]
    assert ks.tile_done(2, 1) and not ks.tile_done(0, 1)
    led = ks.ledger()
    assert led["done"][2, 1] and led["iterations"][1, 2] == 7 and led["identity"][0, 0] != 0
    got = ks.array("ntk")[...]
    np.testing.assert_array_equal(got[64:, 32:64], full.ntk[64:, 32:64].astype("f4"))
    assert np.isnan(got[:32, 32:64]).all()  # unwritten shards read as NaN
    again = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE, chunk=16)  # its own chunk
    assert again.geometry.chunk == CHUNK
    _fill(again, full, tiles=ks.missing_tiles())
    assert verify_kernel_store(ks.path) == []


def test_verify_catches_damaged_shards_and_records(tmp_path, ds, full):
    ks = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE, chunk=CHUNK)
    _fill(ks, full)
    root = tmp_path / "ks"
    assert verify_kernel_store(ks.path) == []
    # a flipped byte inside an inner chunk (the 6th of shard (0, 1))
    shard = root / "ntk" / "c" / "0" / "1"
    good = shard.read_bytes()
    raw = bytearray(good)
    raw[5 * CHUNK * CHUNK * 4 + 17] ^= 0x08
    shard.write_bytes(bytes(raw))
    problems = verify_kernel_store(ks.path)
    assert "tile (0, 1) ntk: checksum mismatch (shard ntk/c/0/1 changed)" in problems
    assert "tile (0, 1) ntk: shard (1, 0) is not its transpose" in problems
    shard.write_bytes(good)
    # a damaged shard index: an offset changed (crc32c then fails), and an index rewritten
    # consistently (crc32c fixed up) that points elsewhere
    import google_crc32c

    raw = bytearray(good)
    idx0 = len(raw) - 4 - 16 * (TILE // CHUNK) ** 2
    raw[idx0] ^= 0x40
    shard.write_bytes(bytes(raw))
    problems = verify_kernel_store(ks.path)
    assert any("ntk/c/0/1: shard index damaged (its crc32c" in p for p in problems), problems
    crc = google_crc32c.value(bytes(raw[idx0:-4]))
    raw[-4:] = crc.to_bytes(4, "little")
    shard.write_bytes(bytes(raw))
    problems = verify_kernel_store(ks.path)
    assert any("shard index damaged (offsets differ" in p for p in problems), problems
    # zarr itself follows the shifted offset and returns other values without a word
    got = np.asarray(zarr.open_array(str(root / "ntk"), mode="r")[0:32, 32:64])
    assert not np.array_equal(got, full.ntk[0:32, 32:64].astype("f4"))
    shard.write_bytes(good)
    # a missing ledger record: the tile is not done, and its orphaned data are named
    rec = root / "ledger" / "records" / "c.1.2.0"
    kept = rec.read_bytes()
    rec.unlink()
    problems = verify_kernel_store(ks.path)
    assert problems == [
        "1 tiles have data but no ledger record (a record deleted, or a writer stopped "
        "between the data and its record): (1, 2)",
        "1 of 6 tiles not done: (1, 2)",
    ]
    assert open_kernel_store(ks.path).missing_tiles() == [(1, 2)]
    # a malformed record (not JSON, or naming another tile) counts as not done
    rec.write_bytes(b"\xff" * len(kept))
    assert "tile (1, 2): ledger record malformed (ledger/records)" in verify_kernel_store(ks.path)
    assert not open_kernel_store(ks.path).tile_done(1, 2)
    rec.write_bytes(kept.replace(b'"tile":[1,2]', b'"tile":[0,2]'))
    assert not open_kernel_store(ks.path).tile_done(1, 2)
    rec.write_bytes(kept)
    # an edited record identity: a foreign tile
    doc = json.loads(kept.rstrip(b"\0"))
    doc["identity"] += 1
    rec.write_bytes(json.dumps(doc).encode().ljust(len(kept), b"\0"))
    problems = verify_kernel_store(ks.path)
    assert any("another identity" in p and "(1, 2)" in p for p in problems), problems
    rec.write_bytes(kept)
    assert verify_kernel_store(ks.path) == []


def test_edited_sharding_metadata_is_refused(tmp_path, ds, full):
    ks = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE, chunk=CHUNK)
    _fill(ks, full, tiles=[(0, 0)])
    meta = tmp_path / "ks" / "ntk" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["codecs"][0]["configuration"]["chunk_shape"] = [16, 16]
    meta.write_text(json.dumps(doc))
    problems = verify_kernel_store(ks.path)
    assert any("is not sharded as layout 2 requires" in p for p in problems), problems
    with pytest.raises(StoreMismatchError, match="not sharded as layout 2 requires"):
        _fill(open_kernel_store(ks.path, writable=True), full, tiles=[(0, 1)])


def test_inner_chunk_choices_and_errors():
    assert inner_chunk(6656) == 832 and inner_chunk(512) == 512 and inner_chunk(4096) == 1024
    assert inner_chunk(6656, 512) == 512 and inner_chunk(96, 1024) == 96
    with pytest.raises(InputError, match="chunk 1024 does not fit tile 1031"):
        inner_chunk(1031)
    with pytest.raises(InputError, match="chunk must be an integer >= 1, got 0"):
        inner_chunk(64, 0)


def test_layout_1_stores_keep_working_and_migrate(tmp_path, ds, full, monkeypatch):
    """A half-done layout-1 store migrates (stopped part-way, then resumed) to layout 2 with
    the same values and ledger, and compute-style writes finish it."""
    v1 = create_kernel_store(
        tmp_path / "ks", ds, SPEC, tile=TILE, kernels=("ntk", "nngp"), layout=1
    )
    assert v1.format_version == 1 and not (tmp_path / "ks" / "ledger" / "records").exists()
    _fill(v1, full, tiles=[(0, 0), (0, 1), (1, 2), (2, 2)])
    before = open_kernel_store(v1.path).ledger()
    # one tile whose bytes changed on disk is not carried over
    chunk = tmp_path / "ks" / "nngp" / "c" / "2" / "2"
    raw = bytearray(chunk.read_bytes())
    raw[40] ^= 1
    chunk.write_bytes(bytes(raw))
    from deqntk_dist.store import core

    calls = {"n": 0}
    real = core.KernelStore.write_tile

    def stop_after_two(self, *a, **kw):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(core.KernelStore, "write_tile", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        migrate_kernel_store(v1.path, say=lambda m: None)
    monkeypatch.setattr(core.KernelStore, "write_tile", real)
    assert (tmp_path / "ks.v2-partial").is_dir()  # the old store is untouched meanwhile
    said = []
    rep = migrate_kernel_store(v1.path, say=said.append)
    assert (rep.tiles_done_before, rep.tiles_copied, rep.tiles_skipped) == (2, 1, [(2, 2)])
    assert rep.problems == [] and rep.backup == str(tmp_path / "ks.v1")
    assert "no longer match their checksum" in said[0]
    v2 = open_kernel_store(tmp_path / "ks")
    assert v2.format_version == 2 and open_kernel_store(rep.backup).format_version == 1
    after = v2.ledger()
    for t in [(0, 0), (0, 1), (1, 2)]:
        for f in ("identity", "finished", "iterations", "max_residual", "done"):
            assert after[f][t] == before[f][t], (t, f)
    assert v2.missing_tiles() == [(0, 2), (1, 1), (2, 2)]
    _fill(open_kernel_store(v2.path, writable=True), full, tiles=v2.missing_tiles())
    assert verify_kernel_store(v2.path) == []
    np.testing.assert_array_equal(v2.array("nngp")[...], full.nngp.astype("f4"))
    with pytest.raises(InputError, match="source must be a layout-1 kernel store"):
        migrate_kernel_store(v2.path)


def test_migrate_cli_to_a_new_path(tmp_path, ds, full):
    from deqntk_dist.cli import main

    v1 = create_kernel_store(tmp_path / "ks", ds, SPEC, tile=TILE, layout=1)
    _fill(v1, full)
    assert main(["migrate", v1.path, "--out", str(tmp_path / "new"), "--chunk", "16"]) == 0
    v2 = open_kernel_store(tmp_path / "new")
    assert v2.geometry.chunk == 16 and verify_kernel_store(v2.path) == []
    np.testing.assert_array_equal(
        v2.array("ntk")[...], open_kernel_store(v1.path).array("ntk")[...]
    )
    assert os.path.isdir(v1.path)
