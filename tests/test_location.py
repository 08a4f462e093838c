"""Storage locations: local paths and fsspec URLs (a real S3 API from a moto server)."""

import errno
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from deqntk_dist.errors import InputError, StoreError
from deqntk_dist.store import location as location_mod
from deqntk_dist.store.location import Location, storage_options


@pytest.fixture(params=["local", "s3", "memory"])
def loc(request, tmp_path):
    """A fresh empty location: a local directory, a prefix of a new bucket on the moto
    server, or a path of fsspec's in-memory filesystem (a remote without conditional
    writes)."""
    if request.param == "local":
        yield Location.parse(tmp_path / "root")
    elif request.param == "s3":
        yield Location.parse(request.getfixturevalue("s3_server").bucket() + "/root")
    else:
        loc = Location.parse(f"memory://test-{uuid.uuid4().hex}/root")
        yield loc
        loc.delete_tree()


def _raw_names(loc, prefix):
    """Everything directly under ``prefix``, hidden names included."""
    if loc.is_local:
        return sorted(os.listdir(loc.child(prefix).url))
    fs = loc.fs()
    fs.invalidate_cache()
    path = fs._strip_protocol(loc.child(prefix).url)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


# ------------------------------------------------------------------ parse and paths


def test_parse_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Location.parse("a/b/").url == str(tmp_path / "a" / "b")
    assert Location.parse("./a/../c").url == str(tmp_path / "c")
    assert Location.parse(tmp_path / "x").url == str(tmp_path / "x")
    assert Location.parse(f"file://{tmp_path}/y/").url == str(tmp_path / "y")
    assert Location.parse(f"FILE://{tmp_path}").url == str(tmp_path)
    assert Location.parse("file:///").url == "/"
    loc = Location.parse("rel")
    assert loc.is_local and loc.protocol == "file" and str(loc) == str(tmp_path / "rel")
    assert Location.parse(loc) is loc
    assert loc.local_path == tmp_path / "rel"
    assert Location.parse("~").url == os.path.expanduser("~")


def test_parse_remote():
    assert Location.parse("s3://bucket/a/b/").url == "s3://bucket/a/b"
    assert Location.parse("S3://bucket//a/./b").url == "s3://bucket/a/b"
    assert Location.parse("s3://bucket").url == "s3://bucket"
    loc = Location.parse("gs://bkt/x")
    assert not loc.is_local and loc.protocol == "gs" and str(loc) == "gs://bkt/x"
    assert Location.parse("memory://m/x").url == "memory://m/x"
    with pytest.raises(StoreError):
        _ = loc.local_path


@pytest.mark.parametrize(
    "bad", ["", "  ", "s3://", "s3:///", "memory://", "file://", "nope://b/x", "s3://b/../c"]
)
def test_parse_bad(bad):
    with pytest.raises(InputError, match="store"):
        Location.parse(bad, param="store")
    with pytest.raises(ValueError):
        Location.parse(bad)


def test_parse_bad_types():
    with pytest.raises(InputError, match="where"):
        Location.parse(3)
    with pytest.raises(InputError, match="chained"):
        Location.parse("simplecache::s3://b/x")


def test_name_parent_child(tmp_path):
    loc = Location.parse(tmp_path / "root")
    assert loc.name == "root"
    assert loc.parent.url == str(tmp_path)
    assert loc.child("a/b").url == str(tmp_path / "root" / "a" / "b")
    assert loc.child("a/b").name == "b"
    assert loc.child("") == loc
    assert Location.parse("/").parent.url == "/"
    s3 = Location.parse("s3://bkt/p/q")
    assert s3.name == "q" and s3.parent.url == "s3://bkt/p"
    assert s3.parent.parent.url == "s3://bkt" and s3.parent.parent.name == "bkt"
    assert s3.parent.parent.parent.url == "s3://bkt"
    assert s3.child("x//y/").url == "s3://bkt/p/q/x/y"
    for bad in ["/abs", "../up", "a/../../b", "a\\b"]:
        with pytest.raises(InputError):
            s3.child(bad)
    with pytest.raises(InputError):
        s3.child(5)


def test_storage_options():
    assert storage_options("s3://b/x") == {"use_listings_cache": False}
    assert storage_options("/local/path") == {}
    assert storage_options("file:///local") == {}


def test_fs_cached_per_process(monkeypatch):
    loc = Location.parse("memory://cache/x")
    fs = loc.fs()
    assert loc.fs() is fs
    assert Location.parse("memory://other").fs() is fs
    monkeypatch.setattr(location_mod.os, "getpid", lambda: -1)
    assert loc.fs() is not fs


def test_fs_local(tmp_path):
    assert Location.parse(tmp_path).fs().protocol[0] == "file"


# ------------------------------------------------------------------ object operations


def test_put_get_bytes(loc):
    assert loc.get("x") is None
    loc.put("x", b"hello")
    assert loc.get("x") == b"hello"
    loc.put("deep/er/y", bytearray(b"world"))
    assert loc.get("deep/er/y") == b"world"
    loc.put("e", b"")
    assert loc.get("e") == b"" and loc.size("e") == 0
    assert loc.get("deep") is None  # a directory is no object


def test_put_get_array(loc, rng):
    a = rng.standard_normal((17, 33)).astype(np.float32)
    loc.put("a", a)
    assert loc.get("a") == a.tobytes()
    assert loc.size("a") == a.nbytes
    b = np.arange(12, dtype=">i8").reshape(3, 4)
    loc.put("b", memoryview(b))
    assert loc.get("b") == b.tobytes()
    big = np.arange(300_000, dtype=np.float64)  # > 1 MiB: direct I/O where possible
    loc.put("big", big, direct=True)
    assert np.array_equal(np.frombuffer(loc.get("big"), dtype=np.float64), big)
    loc.put("small", b"abc", direct=True)
    assert loc.get("small") == b"abc"


def test_put_bad_input(loc):
    a = np.zeros((4, 4))
    with pytest.raises(InputError, match="C-contiguous"):
        loc.put("x", a[:, ::2])
    with pytest.raises(InputError):
        loc.put("x", "a string")
    with pytest.raises(InputError):
        loc.put("", b"x")
    with pytest.raises(InputError):
        loc.put("../x", b"x")
    with pytest.raises(InputError):
        loc.put_if_absent("/x", b"x")
    assert loc.list("") == []


def test_put_replaces_whole_object(loc):
    loc.put("k", b"a much longer first content")
    loc.put("k", b"2nd")
    assert loc.get("k") == b"2nd"
    assert loc.size("k") == 3
    assert _raw_names(loc, "") == ["k"]  # no temp files left


def test_put_if_absent(loc):
    assert loc.put_if_absent("m/once", b"first")
    assert not loc.put_if_absent("m/once", b"second")
    assert loc.get("m/once") == b"first"
    assert loc.put_if_absent("m/arr", np.arange(3))
    assert loc.get("m/arr") == np.arange(3).tobytes()
    assert _raw_names(loc, "m") == ["arr", "once"]


def test_list(loc):
    for k in ["a/y", "a/x", "a/sub/z", "a/.hidden", "top"]:
        loc.put(k, b"1")
    assert loc.list("a") == ["x", "y"]
    assert loc.list("a/") == ["x", "y"]
    assert loc.list("a", dirs=True) == ["sub", "x", "y"]
    assert loc.list("a/sub") == ["z"]
    assert loc.list("") == ["top"]
    assert loc.list("", dirs=True) == ["a", "top"]
    assert loc.list("missing") == []
    assert loc.list("a/x") == []  # a file is no directory
    assert loc.list("a/s") == []  # no prefix matching of names


def test_delete(loc):
    loc.put("d/x", b"1")
    loc.put("d/y", b"2")
    loc.delete("d/x")
    assert loc.get("d/x") is None
    assert loc.list("d") == ["y"]
    loc.delete("d/x")  # missing is fine
    loc.delete("nothing/here")
    with pytest.raises(InputError):
        loc.delete("")


def test_delete_tree(loc):
    for k in ["a/x", "a/b/y", "ab/z", "c"]:
        loc.put(k, b"1")
    loc.delete_tree("a")
    assert not loc.exists("a")
    assert loc.get("a/b/y") is None
    assert loc.get("ab/z") == b"1"
    loc.delete_tree("a")  # missing is fine
    loc.delete_tree("c")  # a single object
    assert loc.get("c") is None
    assert loc.list("", dirs=True) == ["ab"]
    loc.delete_tree()
    assert not loc.exists()
    assert loc.list("", dirs=True) == []


def test_delete_tree_keeps_bucket(s3_server):
    bucket = Location.parse(s3_server.bucket())
    bucket.put("p/x", b"1")
    bucket.put("y", b"1")
    bucket.delete_tree()
    assert bucket.list("", dirs=True) == []
    assert bucket.exists()  # the bucket itself
    bucket.put("again", b"ok")
    assert bucket.get("again") == b"ok"


def test_exists(loc):
    assert not loc.exists()
    assert not loc.exists("p")
    loc.put("p/q/r", b"1")
    assert loc.exists()
    assert loc.exists("p") and loc.exists("p/q") and loc.exists("p/q/r")
    assert not loc.exists("p/q/r2")
    assert not loc.exists("p/q/r/s")


def test_size_mtime(loc):
    t0 = time.time()
    loc.put("s", b"12345")
    assert loc.size("s") == 5
    assert loc.size("missing") is None
    loc.put("dir/f", b"1")
    assert loc.size("dir") is None
    m = loc.mtime("s")
    assert m is not None and abs(m - t0) < 60
    assert loc.mtime("missing") is None


def test_free_bytes(loc, tmp_path):
    if loc.is_local:
        assert loc.child("not/yet/made").free_bytes() > 0
    else:
        assert loc.free_bytes() is None


# ------------------------------------------------------------------ zarr


def test_zarr_roundtrip(loc, rng):
    import zarr

    data = rng.standard_normal((10, 12))
    z = zarr.create_array(
        store=loc.child("z").zarr_store(read_only=False),
        shape=data.shape,
        chunks=(4, 5),
        dtype="f8",
        attributes={"k": 1},
    )
    z[:] = data
    assert "zarr.json" in loc.list("z")
    again = Location.parse(str(loc)).child("z").zarr_store(read_only=True)
    z2 = zarr.open_array(store=again, mode="r")
    assert z2.attrs["k"] == 1
    np.testing.assert_array_equal(z2[:], data)
    with pytest.raises((ValueError, PermissionError, OSError)):
        z2[0, 0] = 1.0


# ------------------------------------------------------------------ failures (local)


def test_put_failure_leaves_no_temp(tmp_path, monkeypatch):
    loc = Location.parse(tmp_path / "root")
    loc.put("k", b"old")

    def boom(*a, **k):
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(location_mod.os, "replace", boom)
    with pytest.raises(OSError, match="injected"):
        loc.put("k", b"new")
    with pytest.raises(OSError, match="injected"):
        loc.put("k2", np.ones(1 << 18), direct=True)
    assert sorted(os.listdir(loc.url)) == ["k"]
    assert loc.get("k") == b"old"


def test_put_if_absent_failure_leaves_no_temp(tmp_path, monkeypatch):
    loc = Location.parse(tmp_path / "root")

    def boom(*a, **k):
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(location_mod.os, "link", boom)
    with pytest.raises(OSError, match="injected"):
        loc.put_if_absent("k", b"x")
    assert os.listdir(loc.url) == []


def test_put_if_absent_without_hard_links(tmp_path, monkeypatch):
    loc = Location.parse(tmp_path / "root")

    def no_links(*a, **k):
        raise OSError(errno.EPERM, "no hard links here")

    monkeypatch.setattr(location_mod.os, "link", no_links)
    assert loc.put_if_absent("k", b"first")
    assert not loc.put_if_absent("k", b"second")
    assert loc.get("k") == b"first"
    assert os.listdir(loc.url) == ["k"]


# ------------------------------------------------------------------ other processes

_CHILD = """
import sys
from deqntk_dist.store.location import Location
loc = Location.parse(sys.argv[1])
if sys.argv[2] == "put":
    loc.put(sys.argv[3], sys.argv[4].encode())
elif sys.argv[2] == "delete":
    loc.delete(sys.argv[3])
print(loc.list("d"), loc.get("d/x"))
"""


def _child(loc, *args):
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, str(loc), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_other_process_writes_are_seen(where, tmp_path, request):
    if where == "local":
        loc = Location.parse(tmp_path / "root")
    else:
        loc = Location.parse(request.getfixturevalue("s3_server").bucket() + "/root")
    assert loc.list("d") == [] and not loc.exists("d")  # would fill a listing cache
    assert _child(loc, "put", "d/x", "from child") == "['x'] b'from child'"
    assert loc.list("d") == ["x"]
    assert loc.exists("d") and loc.exists("d/x")
    assert loc.get("d/x") == b"from child"
    assert loc.size("d/x") == 10
    loc.put("d/y", b"parent")
    assert loc.list("d") == ["x", "y"]  # a non-empty listing, which a cache would keep
    assert _child(loc, "put", "d/z", "new") == "['x', 'y', 'z'] b'from child'"
    assert loc.list("d") == ["x", "y", "z"]
    assert loc.exists("d/z") and loc.get("d/z") == b"new"
    assert _child(loc, "put", "d/x", "second") == "['x', 'y', 'z'] b'second'"
    assert loc.get("d/x") == b"second" and loc.size("d/x") == 6
    assert _child(loc, "delete", "d/x") == "['y', 'z'] None"
    assert loc.list("d") == ["y", "z"] and not loc.exists("d/x")
    assert loc.get("d/x") is None and loc.size("d/x") is None


def _forked_put(url):
    loc = Location.parse(url)
    loc.put("f/child", b"forked")
    assert loc.list("f") == ["child", "parent"]


def test_fork_after_use(s3_server):
    """A filesystem made before ``fork`` is not reused in the child (its event loop
    thread does not survive the fork)."""
    import multiprocessing

    loc = Location.parse(s3_server.bucket())
    loc.put("f/parent", b"1")
    assert loc.list("f") == ["parent"]
    p = multiprocessing.get_context("fork").Process(target=_forked_put, args=(str(loc),))
    p.start()
    p.join(120)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child hung")
    assert p.exitcode == 0
    assert loc.list("f") == ["child", "parent"]
    assert loc.get("f/child") == b"forked"


def test_same_process_new_instance(loc):
    assert loc.list("d") == []
    other = Location.parse(str(loc))
    other.put("d/x", b"1")
    assert loc.list("d") == ["x"]
    assert loc.exists("d/x")
