import os

import numpy as np
import pytest
import zarr

from deqntk_dist import open_dataset_store, write_dataset_store
from deqntk_dist.errors import DatasetError, StoreError
from deqntk_dist.store.dataset import MAX_CLASSES, dataset_store_from_file


def _data(rng, n=37, shape=(6,)):
    return rng.normal(size=(n, *shape)), rng.integers(0, 10, n)


def test_roundtrip_and_plain_zarr(tmp_path, rng):
    x, y = _data(rng)
    ds = write_dataset_store(
        tmp_path / "ds",
        x,
        y,
        n_train=30,
        name="toy",
        preprocessing={"scale": 1.0},
        source={"file": "x.npz"},
    )
    again = open_dataset_store(tmp_path / "ds")
    for s in (ds, again):
        assert (s.n, s.n_train, s.n_test, s.name) == (37, 30, 7, "toy")
        assert s.feature_shape == (6,)
        np.testing.assert_array_equal(s.rows(0, 37), x.astype(np.float32))
        np.testing.assert_array_equal(s.rows(5, 9), x[5:9].astype(np.float32))
        np.testing.assert_array_equal(s.y, y)
        assert s.y.dtype == np.int64 and s.rows(0, 2).dtype == np.float32
    assert ds.fingerprint == again.fingerprint
    # readable without this package
    g = zarr.open_group(str(tmp_path / "ds"), mode="r")
    assert g.attrs["format"] == "deqntk-dataset" and g.attrs["n_train"] == 30
    assert g.attrs["preprocessing"] == {"scale": 1.0}
    np.testing.assert_array_equal(g["x"][...], x.astype(np.float32))
    # nothing temporary left behind
    assert sorted(os.listdir(tmp_path)) == ["ds"]


def test_images_and_fingerprint_sensitivity(tmp_path, rng):
    x, y = _data(rng, n=12, shape=(5, 5, 2))
    a = write_dataset_store(tmp_path / "a", x, y, n_train=10, name="img")
    assert a.feature_shape == (5, 5, 2)
    x2 = x.copy()
    x2[3, 1, 1, 0] += 1e-3
    b = write_dataset_store(tmp_path / "b", x2, y, n_train=10, name="img")
    c = write_dataset_store(tmp_path / "c", x, y, n_train=9, name="img")
    y2 = y.copy()
    y2[0] += 1
    d = write_dataset_store(tmp_path / "d", x, y2, n_train=10, name="img")
    assert len({a.fingerprint, b.fingerprint, c.fingerprint, d.fingerprint}) == 4


def test_exists_and_overwrite(tmp_path, rng):
    x, y = _data(rng)
    write_dataset_store(tmp_path / "ds", x, y, n_train=30, name="one")
    with pytest.raises(StoreError, match="already exists"):
        write_dataset_store(tmp_path / "ds", x, y, n_train=30, name="two")
    ds = write_dataset_store(
        tmp_path / "ds", x[:20], y[:20], n_train=10, name="two", overwrite=True
    )
    assert open_dataset_store(tmp_path / "ds").n == 20 and ds.name == "two"
    assert sorted(os.listdir(tmp_path)) == ["ds"]


@pytest.mark.parametrize(
    ("change", "word"),
    [
        (lambda x, y: (x[:, :, None], y), "shape"),
        (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 40, np.nan, x), y), "row 6"),
        (lambda x, y: (x, y[:-1]), "y must have shape"),
        (lambda x, y: (x, y + 0.5), "integer"),
        (lambda x, y: (x.astype(bool), y), "numeric"),
    ],
)
def test_bad_arrays(tmp_path, rng, change, word):
    x, y = change(*_data(rng))
    with pytest.raises(DatasetError, match=word):
        write_dataset_store(tmp_path / "ds", x, y, n_train=10, name="bad")
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    "label, shown", [(10**9, "1000000000"), (-3, "-3"), (1e300, r"1e\+300"), (10_000, "10000")]
)
def test_labels_outside_class_range_are_refused(tmp_path, rng, label, shown):
    """One label of 10**9 used to pass prepare and compute, then the regression asked for a
    2.18 TiB one-hot matrix: labels must lie in [0, MAX_CLASSES), the bad row is named."""
    x, y = _data(rng)
    y = y.astype(np.float64 if isinstance(label, float) else np.int64)
    y[17] = label
    with pytest.raises(DatasetError, match=rf"< {MAX_CLASSES}: row 17 holds label {shown}\b"):
        write_dataset_store(tmp_path / "ds", x, y, n_train=10, name="bad")
    assert not (tmp_path / "ds").exists()
    y[17] = MAX_CLASSES - 1
    ds = write_dataset_store(tmp_path / "ds", x, y, n_train=10, name="ok")
    assert ds.y[17] == MAX_CLASSES - 1 == 9999


@pytest.mark.parametrize("n_train", [0, 38, 2.0])
def test_bad_n_train(tmp_path, rng, n_train):
    x, y = _data(rng)
    with pytest.raises(DatasetError, match="n_train"):
        write_dataset_store(tmp_path / "ds", x, y, n_train=n_train, name="bad")


def test_rows_range_and_missing_store(tmp_path, rng):
    ds = write_dataset_store(tmp_path / "ds", *_data(rng), n_train=30, name="toy")
    with pytest.raises(DatasetError, match="row range"):
        ds.rows(30, 40)
    with pytest.raises(StoreError, match="not found"):
        open_dataset_store(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    zarr.open_group(str(tmp_path / "plain"), mode="w")
    with pytest.raises(StoreError, match="not a deqntk dataset store"):
        open_dataset_store(tmp_path / "plain")


def test_from_npz(tmp_path, rng):
    x, y = _data(rng)
    np.savez(tmp_path / "toy.npz", x=x, y=y, n_train=25)
    ds = dataset_store_from_file(tmp_path / "toy.npz", tmp_path / "ds")
    assert (ds.n_train, ds.name) == (25, "toy")
    np.testing.assert_array_equal(ds.y, y)
    np.savez(tmp_path / "bad.npz", a=x)
    with pytest.raises(DatasetError, match="'x' and 'y'"):
        dataset_store_from_file(tmp_path / "bad.npz", tmp_path / "ds2")
    with pytest.raises(DatasetError, match="not found"):
        dataset_store_from_file(tmp_path / "none.npz", tmp_path / "ds3")


def _crafted_npy(a: np.ndarray, shape: str) -> bytes:
    """``.npy`` bytes of ``a`` whose header claims another shape (hand-written header)."""
    text = f"{{'descr': '{a.dtype.str}', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * ((-(10 + len(text) + 1)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode() + a.tobytes()


@pytest.mark.parametrize("shape", ["(1099511627776,)", "(2147483648, 2147483648, 4)"])
def test_from_file_refuses_headers_that_lie(tmp_path, rng, shape):
    """A header claiming 8 TiB (numpy: MemoryError traceback) or a shape whose product wraps
    int64 is refused from the header, before any array is allocated."""
    import zipfile

    x, y = _data(rng)
    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as zf:
        zf.writestr("x.npy", _crafted_npy(x, shape))
        zf.writestr("y.npy", _crafted_npy(y, f"({y.size},)"))
    with pytest.raises(DatasetError, match=r"member 'x.npy' is corrupt .*declares shape"):
        dataset_store_from_file(tmp_path / "lie.npz", tmp_path / "ds")
    (tmp_path / "lie.npy").write_bytes(_crafted_npy(x, shape))
    with pytest.raises(DatasetError, match=r"lie.npy' is corrupt .*declares shape"):
        dataset_store_from_file(tmp_path / "lie.npy", tmp_path / "ds")
    np.savez(tmp_path / "nt.npz", x=x, y=y, n_train=np.arange(3))
    with pytest.raises(DatasetError, match="n_train must be an integer scalar"):
        dataset_store_from_file(tmp_path / "nt.npz", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
