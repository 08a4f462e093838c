"""``deqntk prepare`` / ``deqntk run``: dataset store content, stage reuse, end to end."""

from __future__ import annotations

import gzip
import json
import re
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from deqntk_dist import DEQSpec, kernel_matrix, open_kernel_store
from deqntk_dist.cli import main
from deqntk_dist.errors import DatasetError, DatasetWarning, InputError, StoreMismatchError
from deqntk_dist.pipeline import PrepareRequest, prepare_dataset
from deqntk_dist.preprocess import PreprocessConfig
from deqntk_dist.store.dataset import open_dataset_store
from deqntk_dist.store.results import read_results


def blobs(rng, n, d=12, k=3, spread=0.6):
    """k Gaussian clusters in d dimensions (labels 0..k-1), offset from the origin."""
    centres = rng.normal(size=(k, d)) * 2 + 1
    y = np.arange(n) % k
    return centres[y] + spread * rng.normal(size=(n, d)), y


@pytest.fixture
def npz_source(tmp_path):
    rng = np.random.default_rng(0)
    x, y = blobs(rng, 150)
    path = tmp_path / "blobs.npz"
    np.savez(path, x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])
    return path, x, y


def test_prepare_store_content(tmp_path, npz_source):
    src, x, y = npz_source
    req = PrepareRequest(
        dataset="npz",
        source=src,
        n_train=60,
        n_test=30,
        seed=3,
        preprocess=PreprocessConfig(steps=("center", "unit-norm")),
    )
    res = prepare_dataset(tmp_path / "ds.zarr", req)
    ds = res.store
    assert not res.reused and (ds.n_train, ds.n_test, ds.feature_shape) == (60, 30, (12,))
    xs = ds.rows(0, ds.n)
    np.testing.assert_allclose(np.linalg.norm(xs, axis=1), np.sqrt(12), rtol=1e-6)
    np.testing.assert_array_equal(np.bincount(ds.y[:60]), [20, 20, 20])
    np.testing.assert_array_equal(np.bincount(ds.y[60:]), [10, 10, 10])
    pre = ds.attrs["preprocessing"]
    assert pre["fitted_on"] == "train" and pre["n_fit"] == 60 and pre["layout"] == "flat"
    assert ds.attrs["source"]["request"] == req.to_dict()


def test_prepare_fits_on_train_rows_only(tmp_path, npz_source):
    """Train rows of the store do not depend on the test rows; test rows use train stats."""
    src, x, y = npz_source
    cfg = PreprocessConfig(steps=("standardize",))
    a = prepare_dataset(
        tmp_path / "a.zarr", PrepareRequest(dataset="npz", source=src, preprocess=cfg, n_test=None)
    ).store
    b = prepare_dataset(
        tmp_path / "b.zarr", PrepareRequest(dataset="npz", source=src, preprocess=cfg, n_test=12)
    ).store
    np.testing.assert_array_equal(a.rows(0, 100), b.rows(0, 100))
    mu, sd = x[:100].mean(0), x[:100].std(0)
    np.testing.assert_allclose(a.rows(0, 100), (x[:100] - mu) / sd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.rows(100, 150), (x[100:] - mu) / sd, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a.y, y)


def test_prepare_huge_magnitudes_equal_scaled_down_data(tmp_path, npz_source):
    """float64 inputs near 1e200 used to become an all-zero store with exit 0 (the norms of
    center,unit-norm overflowed): the store must equal the one of the data scaled down."""
    _, x, y = npz_source
    stores = {}
    for scale in (1.0, 1e200):
        src = tmp_path / f"x{scale:g}.npz"
        np.savez(
            src, x_train=x[:100] * scale, y_train=y[:100], x_test=x[100:] * scale, y_test=y[100:]
        )
        req = PrepareRequest(dataset="npz", source=src, n_train=60, n_test=30)
        stores[scale] = prepare_dataset(tmp_path / f"ds{scale:g}.zarr", req).store
    a, b = (stores[s].rows(0, 90) for s in (1.0, 1e200))
    assert np.all(np.isfinite(b)) and np.all(np.linalg.norm(b, axis=1) > 3)
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    # not representable: refused, and nothing is written
    bad = x.copy()
    bad[:100, 0], bad[100:, 0] = -1.7e308, 1.7e308  # test rows overflow once centred
    src = tmp_path / "bad.npz"
    np.savez(src, x_train=bad[:100], y_train=y[:100], x_test=bad[100:], y_test=y[100:])
    req = PrepareRequest(dataset="npz", source=src, n_train=60, n_test=30)
    with pytest.raises(DatasetError, match="step 'center' overflows float64 .*in row 60:"):
        prepare_dataset(tmp_path / "bad.zarr", req)
    assert sorted(p.name for p in tmp_path.iterdir() if "bad" in p.name) == ["bad.npz"]


def test_prepare_warns_about_test_classes_absent_from_training(tmp_path, npz_source):
    """Test rows of a class no training row has can never be predicted (accuracy 0 on them,
    silently): prepare warns, on a fresh store and on a reused one, and the CLI shows it."""
    _, x, y = npz_source
    y_test = y[100:].copy()
    y_test[:7] = 5  # a class absent from the training rows (labels 0..2)
    src = tmp_path / "unseen.npz"
    np.savez(src, x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y_test)
    req = PrepareRequest(dataset="npz", source=src)
    msg = r"test class\(es\) 5 \(7 of 50 test rows\) never occur in the training rows"
    with pytest.warns(DatasetWarning, match=msg):
        prepare_dataset(tmp_path / "ds.zarr", req)
    with pytest.warns(DatasetWarning, match=msg):
        assert prepare_dataset(tmp_path / "ds.zarr", req).reused
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when every test class is trained on
        prepare_dataset(tmp_path / "ok.zarr", PrepareRequest(dataset="npz", source=npz_source[0]))
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "deqntk"),
            "prepare",
            "--dataset",
            "npz",
            "--source",
            str(src),
            "--out",
            str(tmp_path / "cli.zarr"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "deqntk prepare: warning: " in res.stderr and re.search(msg, res.stderr), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # one line, no source line


def test_prepare_reuse_mismatch_overwrite(tmp_path, npz_source):
    src = npz_source[0]
    out = tmp_path / "ds.zarr"
    req = PrepareRequest(dataset="npz", source=src, n_train=30)
    first = prepare_dataset(out, req)
    again = prepare_dataset(out, req)
    assert again.reused and again.store.fingerprint == first.store.fingerprint
    other = PrepareRequest(dataset="npz", source=src, n_train=45)
    with pytest.raises(StoreMismatchError, match="n_train: stored 30, requested 45"):
        prepare_dataset(out, other)
    assert open_dataset_store(out).n_train == 30  # untouched
    assert prepare_dataset(out, other, overwrite=True).store.n_train == 45


def test_prepare_request_errors(tmp_path, npz_source):
    src = npz_source[0]
    with pytest.raises(
        InputError, match=r"n_train must be a positive integer or None \(all rows\), got 0"
    ):
        PrepareRequest(dataset="npz", source=src, n_train=0)
    with pytest.raises(InputError, match="layout must be one of flat, image, got 'grid'"):
        PrepareRequest(dataset="npz", source=src, layout="grid")
    with pytest.raises(InputError, match="layout 'image' .* needs image rows"):
        prepare_dataset(
            tmp_path / "x.zarr", PrepareRequest(dataset="npz", source=src, layout="image")
        )
    assert not (tmp_path / "x.zarr").exists()


def test_cli_prepare_idx_images(tmp_path, capsys):
    """IDX files written here, image layout (CDEQ) and flat layout through the CLI."""
    rng = np.random.default_rng(1)
    src = tmp_path / "idx"
    src.mkdir()
    for stem, shape in [
        ("train-images-idx3-ubyte", (40, 6, 6)),
        ("t10k-images-idx3-ubyte", (20, 6, 6)),
    ]:
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        head = bytes([0, 0, 8, 3]) + b"".join(struct.pack(">I", s) for s in shape)
        (src / (stem + ".gz")).write_bytes(gzip.compress(head + a.tobytes()))
    for stem, n in [("train-labels-idx1-ubyte", 40), ("t10k-labels-idx1-ubyte", 20)]:
        lab = (np.arange(n) % 4).astype(np.uint8)
        (src / stem).write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", n) + lab.tobytes())
    rc = main(
        [
            "prepare",
            "--dataset",
            "mnist",
            "--source",
            str(src),
            "--out",
            str(tmp_path / "img.zarr"),
            "--layout",
            "image",
            "--n-train",
            "16",
            "--preprocess",
            "standardize,zca,unit-norm",
            "--zca-strength",
            "0.5",
        ]
    )
    assert rc == 0
    assert "16 train + 20 test rows of shape (6, 6, 1)" in capsys.readouterr().out
    ds = open_dataset_store(tmp_path / "img.zarr")
    assert ds.x.shape == (36, 6, 6, 1)
    assert ds.attrs["preprocessing"]["zca_strength"] == 0.5
    rc = main(
        [
            "prepare",
            "--dataset",
            "mnist",
            "--source",
            str(src),
            "--out",
            str(tmp_path / "img.zarr"),
            "--n-train",
            "16",
        ]
    )
    assert rc == 2
    assert "already exists with other parameters" in capsys.readouterr().err
    rc = main(
        ["prepare", "--dataset", "svhn", "--source", str(src), "--out", str(tmp_path / "s.zarr")]
    )
    assert rc == 2
    assert (
        "dataset must be one of fashion-mnist, mnist, cifar10, npz, got 'svhn'"
        in capsys.readouterr().err
    )


# ------------------------------------------------------------------------------- end to end
def direct_ridge(X, y, n_train, spec, ridge):
    """In-memory route: untiled kernel (cast like the float32 store), LU solve, predictions."""
    K = kernel_matrix(spec, X.astype(np.float64)).ntk.astype(np.float32).astype(np.float64)
    Ktt, Kst = K[:n_train, :n_train], K[n_train:, :n_train]
    Y = np.full((n_train, int(y.max()) + 1), -0.1)
    Y[np.arange(n_train), y[:n_train]] = 0.9
    shift = ridge * np.trace(Ktt) / n_train
    alpha = np.linalg.solve(Ktt + shift * np.eye(n_train), Y)
    pred = Kst @ alpha
    return pred, float(np.mean(pred.argmax(1) == y[n_train:]))


@pytest.mark.slow
@pytest.mark.cluster
def test_run_end_to_end_matches_direct_computation(tmp_path, capsys):
    rng = np.random.default_rng(5)
    x, y = blobs(rng, 240, d=10, k=4, spread=2.5)
    src = tmp_path / "hard.npz"
    np.savez(src, x_train=x[:160], y_train=y[:160], x_test=x[160:], y_test=y[160:])
    work = tmp_path / "work"
    argv = [
        "run",
        "--dataset",
        "npz",
        "--source",
        str(src),
        "--n-train",
        "120",
        "--n-test",
        "60",
        "--workdir",
        str(work),
        "--tile",
        "64",
        "--workers",
        "2",
        "--sigma-w2",
        "1.2",
        "--sigma-u2",
        "1.0",
        "--sigma-b2",
        "0.3",
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads((work / "report.json").read_text())
    assert report["n_train"] == 120 and report["n_test"] == 60
    assert report["stages"]["compute"]["tiles_computed"] == 6  # 3 x 3 grid, upper triangle
    assert f"accuracy:  {report['accuracy']:.4f}" in out and str(work / "kernel.zarr") in out

    ds = open_kernel_store(work / "kernel.zarr").dataset()
    spec = DEQSpec(sigma_w2=1.2, sigma_u2=1.0, sigma_b2=0.3)
    pred, acc = direct_ridge(ds.rows(0, ds.n), ds.y, ds.n_train, spec, report["ridge"])
    assert report["accuracy"] == acc
    assert 0.5 < acc < 1.0  # a task where the ridge matters, not a trivially separable one
    got = read_results(work / "kernel.zarr", "ntk")["predictions"][...]  # the current version
    np.testing.assert_allclose(got, pred, rtol=1e-6, atol=1e-8)

    # rerun: every stage reused, same answer; --plots adds the figures next to the report
    assert main([*argv, "--plots"]) == 0
    figures = [line.split()[-1] for line in capsys.readouterr().out.splitlines()
               if line.startswith("figure")]  # fmt: skip
    assert [p for p in figures if p.endswith(".png")] == [
        str(work / name) for name in ("gram.png", "spectrum.png", "ridge.png", "classes.png")
    ]
    assert all((work / name).stat().st_size > 1000 for name in ("gram.png", "classes.png"))
    again = json.loads((work / "report.json").read_text())
    assert all(st["reused"] for st in again["stages"].values())
    assert again["accuracy"] == report["accuracy"]
    capsys.readouterr()

    # other kernel parameters in the same workdir: refused, then redone with --overwrite
    other = [a if a != "1.2" else "0.8" for a in argv]
    assert main(other) == 2
    assert "belongs to another spec" in capsys.readouterr().err
    assert main([*other, "--overwrite", "--ridges", "1e-3"]) == 0
    third = json.loads((work / "report.json").read_text())
    assert third["stages"]["prepare"]["reused"] and not third["stages"]["compute"]["reused"]
    assert third["ridge"] == 1e-3
    spec = DEQSpec(sigma_w2=0.8, sigma_u2=1.0, sigma_b2=0.3)
    assert third["accuracy"] == direct_ridge(ds.rows(0, ds.n), ds.y, ds.n_train, spec, 1e-3)[1]


@pytest.mark.slow
@pytest.mark.cluster
def test_run_pooled_flipped_cdeq_end_to_end(tmp_path, capsys):
    """``deqntk run --model cdeq --readout lap --pool-size 3 --hflip``: the store is the
    untiled kernel at the float32-store tolerance and the accuracy is the direct one."""
    from deqntk_dist import CDEQSpec

    rng = np.random.default_rng(3)
    x, y = blobs(rng, 60, d=36, k=3, spread=2.0)
    imgs = x.reshape(60, 6, 6, 1)
    src = tmp_path / "img.npz"
    np.savez(src, x_train=imgs[:40], y_train=y[:40], x_test=imgs[40:], y_test=y[40:])
    work = tmp_path / "work"
    argv = ["run", "--dataset", "npz", "--source", str(src), "--workdir", str(work)]
    argv += ["--model", "cdeq", "--readout", "lap", "--pool-size", "3", "--hflip"]
    argv += ["--tile", "16", "--workers", "2", "--ridges", "1e-3", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "readout=lap, pool_size=3, hflip" in out
    report = json.loads((work / "report.json").read_text())
    assert report["kernel"]["pool_size"] == 3 and report["kernel"]["hflip"] is True
    ks = open_kernel_store(work / "kernel.zarr")
    assert ks.options == {"tol": 1e-9} and ks.spec.readout == "lap"
    ds = ks.dataset()
    X = ds.rows(0, ds.n)
    spec = CDEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1, readout="lap", pool_size=3,
                    hflip=True)  # fmt: skip
    assert ks.spec == spec  # the CLI's cdeq defaults
    want = {"ntk": np.empty((ds.n, ds.n), np.float32)}
    kernel_matrix(spec, X, out=want)
    np.testing.assert_array_equal(ks.array("ntk")[...], want["ntk"])
    n = ds.n_train
    K = want["ntk"].astype(np.float64)
    Y = np.full((n, 3), -0.1)
    Y[np.arange(n), ds.y[:n]] = 0.9
    alpha = np.linalg.solve(K[:n, :n] + 1e-3 * np.trace(K[:n, :n]) / n * np.eye(n), Y)
    acc = float(np.mean((K[n:, :n] @ alpha).argmax(1) == ds.y[n:]))
    assert report["accuracy"] == acc


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--model", "deq", "--pool-size", "3"], "--readout and --pool-size apply to --model"),
        (["--model", "cdeq", "--readout", "lap", "--pool-size", "4"], "pool_size must be an odd"),
        (["--model", "cdeq", "--pool-size", "3"], "only used with readout='lap'"),
        (["--model", "deq", "--tol", "1e-9"], "--tol applies to --model cdeq"),
    ],
)
def test_cli_pooling_errors(tmp_path, capsys, npz_source, extra, needle):
    src, _, _ = npz_source
    argv = ["run", "--dataset", "npz", "--source", str(src), "--workdir", str(tmp_path / "w")]
    assert main([*argv, *extra]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.cluster
def test_run_max_tiles_stops_after_the_compute_stage(tmp_path, capsys, npz_source):
    src, _, _ = npz_source
    argv = ["run", "--dataset", "npz", "--source", str(src), "--workdir", str(tmp_path / "w")]
    argv += ["--tile", "32", "--workers", "1", "--no-progress"]
    assert main([*argv, "--max-tiles", "2"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    # 150 rows in tiles of 32: a 5 x 5 grid, 15 upper-triangle tiles
    assert report["tiles_left"] == 15 - 2 and report["accuracy"] is None
    assert "13 tiles left: rerun to finish" in out
    assert main(argv) == 0  # the rerun finishes the store and solves
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert report["tiles_left"] == 0 and 0 <= report["accuracy"] <= 1
    assert report["stages"]["compute"]["resumed_tiles"] == 2


def test_bad_dashboard_address_is_a_one_line_error(tmp_path, capsys, npz_source):
    src, _, _ = npz_source
    argv = ["run", "--dataset", "npz", "--source", str(src), "--workdir", str(tmp_path / "w")]
    assert main([*argv, "--dashboard-address", "no-port-here"]) == 2
    err = capsys.readouterr().err
    assert "dashboard_address" in err and len(err.strip().splitlines()) == 1
