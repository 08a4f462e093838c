"""``deqntk_dist.figures.write_figures`` on a small real ``run_pipeline`` work directory:
valid PNGs of the documented size, not blank, and figures.json numbers recomputed
independently from the stores."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from deqntk_dist import DEQSpec, open_kernel_store  # noqa: E402
from deqntk_dist.errors import InputError, StoreNotFoundError  # noqa: E402
from deqntk_dist.figures import (  # noqa: E402
    PIXELS,
    PlotDependencyError,
    _read_sampled,
    _sample_rows,
    write_figures,
)
from deqntk_dist.options import ComputeOptions, SolveOptions  # noqa: E402
from deqntk_dist.pipeline import PrepareRequest, run_pipeline  # noqa: E402
from deqntk_dist.store.dataset import open_dataset_store  # noqa: E402
from deqntk_dist.store.results import read_results  # noqa: E402

SPEC = DEQSpec(sigma_w2=1.2, sigma_u2=1.0, sigma_b2=0.3)
RIDGES = [1e-4, 1e-3, 1e-2, 1e-1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def blobs(rng, n, d=10, k=4, spread=2.5):
    centres = rng.normal(size=(k, d)) * 2 + 1
    y = np.arange(n) % k
    return centres[y] + spread * rng.normal(size=(n, d)), y


def _run(work: Path, src: Path, client, ridges) -> dict:
    """``run_pipeline`` with tile 64 and the given ridges."""
    req = PrepareRequest(dataset="npz", source=src)
    compute = ComputeOptions(tile=64, progress=False)
    solve = SolveOptions(ridges=tuple(ridges))
    return run_pipeline(
        work, req, SPEC, compute=compute, solve=solve, client=client, log=lambda msg: None
    )


def _compute(ds, path: Path, client) -> None:
    """``compute_kernel_store`` with tile 32."""
    from deqntk_dist.compute import compute_kernel_store

    opts = ComputeOptions(tile=32, progress=False)
    compute_kernel_store(ds, path, SPEC, opts, client=client, log=lambda msg: None)


@pytest.fixture(scope="module")
def client():
    """An in-process LocalCluster (no worker processes to start), one tile at a time like
    the workers deqntk starts itself."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
        silence_logs=logging.ERROR,
    )  # fmt: skip
    cl = Client(cluster)
    yield cl
    cl.close()
    cluster.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory, client):
    """A finished `deqntk run` of 200 train + 100 test rows (4 classes), ridge validated."""
    tmp = tmp_path_factory.mktemp("figures")
    x, y = blobs(np.random.default_rng(0), 300)
    src = tmp / "blobs.npz"
    np.savez(src, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    work = tmp / "work"
    _run(work, src, client, RIDGES)
    return work


@pytest.fixture(scope="module")
def figures(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("figs")
    paths = write_figures(work, out_dir=out, sample=60, seed=1)
    return out, paths, json.loads((out / "figures.json").read_text())


def _stores(work: Path):
    paths = json.loads((work / "report.json").read_text())["paths"]
    return open_kernel_store(paths["kernel_store"]), open_dataset_store(paths["dataset_store"])


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which a valid PNG has first; its CRC checked."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert crc == zlib.crc32(kind + body)
    width, height = struct.unpack(">II", body[:8])
    assert data.rstrip(b"\0").endswith(b"IEND\xaeB`\x82"), f"{path} is truncated"
    return width, height


def assert_image(path: Path) -> None:
    from matplotlib.image import imread

    assert path.is_file() and path.stat().st_size > 1000
    assert png_size(path) == PIXELS
    img = imread(path)
    assert img.shape[:2] == (PIXELS[1], PIXELS[0])
    rgb = img[..., :3].astype(np.float64)
    assert rgb.var() > 1e-3, f"{path} is blank"
    assert np.unique(rgb.reshape(-1, 3), axis=0).shape[0] > 20, f"{path} has too few colours"


def test_files_are_images_of_the_documented_size(figures):
    out, paths, record = figures
    names = ["gram.png", "spectrum.png", "ridge.png", "classes.png", "figures.json"]
    assert [p.name for p in paths] == names and all(p.parent == out for p in paths)
    for p in paths[:-1]:
        assert_image(p)
    assert record["files"] == names[:-1] and record["pixels"] == list(PIXELS)
    assert {f["file"] for f in record["figures"].values()} == set(names[:-1])


def test_default_out_dir_is_the_workdir(work):
    paths = write_figures(work, sample=40)
    assert all(p.parent == work for p in paths) and (work / "figures.json").is_file()
    assert {p.name for p in paths} <= {p.name for p in work.iterdir()}


def test_per_class_accuracy_matches_the_stored_predictions(work, figures):
    _, _, record = figures
    ks, ds = _stores(work)
    res = read_results(ks.path, "ntk")
    pred = np.asarray(res["predictions"][...])
    rows = np.asarray(res["test_rows"][...])
    y = ds.y[rows]
    hit = pred.argmax(axis=1) == y
    want = {int(c): float(np.mean(hit[y == c])) for c in np.unique(y)}
    got = record["figures"]["classes"]
    assert dict(zip(got["classes"], got["accuracy"])) == pytest.approx(want, abs=0)
    assert got["count"] == [int((y == c).sum()) for c in np.unique(y)] == [25] * 4
    report = json.loads((work / "report.json").read_text())
    assert got["overall"] == pytest.approx(report["accuracy"], abs=1e-12)
    assert 0.5 < got["overall"] < 1  # the per-class numbers are not trivially all 1


def test_exact_spectrum_is_eigvalsh_of_the_train_block(work, figures):
    _, _, record = figures
    ks, _ = _stores(work)
    K = ks.train_train("ntk").astype(np.float64)
    want = np.linalg.eigvalsh(K)[::-1]
    spec = record["figures"]["spectrum"]
    assert spec["method"] == "exact" and spec["n"] == 200
    got = np.asarray(spec["eigenvalues"], dtype=np.float64)
    assert got.shape == (200,) and np.all(np.diff(got) <= 0)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * want[0])
    assert spec["largest"] == got[0]


@pytest.mark.parametrize("hold_bytes", [0, 2**30])
def test_lanczos_spectrum_agrees_with_the_exact_top_eigenvalues(work, tmp_path, hold_bytes):
    # a small threshold forces the Lanczos route; hold_bytes=0 streams the block from the
    # store on every product, and small bands force several reads per product
    write_figures(work, out_dir=tmp_path, sample=40, exact_limit=100, top_k=20, band_bytes=1,
                  hold_bytes=hold_bytes)  # fmt: skip
    record = json.loads((tmp_path / "figures.json").read_text())
    spec = record["figures"]["spectrum"]
    assert spec["method"] == "lanczos"
    ks, _ = _stores(work)
    want = np.linalg.eigvalsh(ks.train_train("ntk").astype(np.float64))[::-1][:20]
    np.testing.assert_allclose(spec["eigenvalues"], want, rtol=1e-6)
    assert_image(tmp_path / "spectrum.png")


def test_ridge_curve_is_the_solve_report(work, figures):
    _, _, record = figures
    solve = json.loads((work / "solve.json").read_text())["result"]
    curve = record["figures"]["ridge"]
    assert curve["validated"] and curve["ridges"] == RIDGES == solve["ridges"]
    assert curve["val_accuracy"] == solve["val_accuracy"]
    assert curve["val_mse"] == solve["val_mse"]
    assert curve["chosen"] == solve["ridge"] and curve["chosen"] in RIDGES


def test_gram_sample_is_per_class_seeded_and_read_from_the_store(work, figures):
    _, _, record = figures
    ks, ds = _stores(work)
    gram = record["figures"]["gram"]
    rows = np.asarray(gram["rows"])
    labels = ds.y[rows]
    assert rows.size == 60 and np.unique(rows).size == 60 and rows.max() < ks.n_train
    assert np.all(np.diff(labels) >= 0)  # ordered by class
    assert np.bincount(labels).tolist() == [15] * 4
    assert gram["boundaries"] == [15, 30, 45] and gram["classes"] == [0, 1, 2, 3]
    # the block drawn equals the store's train block at those rows / columns
    band = ks.array("ntk").chunks[0]
    full = ks.train_train("ntk").astype(np.float64)
    np.testing.assert_array_equal(_read_sampled(ks, "ntk", rows, band), full[np.ix_(rows, rows)])
    # seeded: same seed, same rows; other seed, other rows
    y = ds.y[: ks.n_train]
    np.testing.assert_array_equal(_sample_rows(y, 60, band, 1), rows)
    assert not np.array_equal(_sample_rows(y, 60, band, 2), rows)


def test_sample_reads_few_chunk_bands():
    """On a large train block the sample comes from a few chunk bands, not all of them."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=60_000)
    rows = _sample_rows(labels, 512, 1024, seed=3)
    counts = np.bincount(labels[rows], minlength=10)
    assert rows.size <= 512 and counts.min() >= 50 and counts.max() <= 52
    assert np.unique(rows // 1024).size <= 2  # about 100 rows per class in each 1024-row band
    # a class-sorted dataset needs more bands, but still gets its classes balanced
    rows = _sample_rows(np.sort(labels), 512, 1024, seed=3)
    assert np.bincount(np.sort(labels)[rows], minlength=10).min() >= 50
    # unbalanced classes: the small one gives all it has, the others share the rest
    labels = np.r_[np.zeros(10, int), np.ones(5000, int), np.full(5000, 2)]
    rows = _sample_rows(labels, 100, 256, seed=0)
    assert np.bincount(labels[rows]).tolist() == [10, 45, 45]
    assert _sample_rows(labels[:50], 100, 256, seed=0).tolist() == list(range(50))


def test_one_ridge_and_no_test_rows(tmp_path, client):
    """A store solved with one ridge (no validation) and without test rows: ridge.png says
    so and classes.png is skipped."""
    from deqntk_dist.regression import solve_store
    from deqntk_dist.store.dataset import write_dataset_store

    x, y = blobs(np.random.default_rng(1), 80, k=3)
    ds = write_dataset_store(tmp_path / "ds.zarr", x, y, n_train=80, name="blobs")
    _compute(ds, tmp_path / "k.zarr", client)
    solve = solve_store(tmp_path / "k.zarr", ridges=[1e-3])
    work = tmp_path / "work"
    work.mkdir()
    (work / "solve.json").write_text(json.dumps({"identity": {}, "result": solve.to_dict()}))
    paths = {
        "dataset_store": str(tmp_path / "ds.zarr"),
        "kernel_store": str(tmp_path / "k.zarr"),
        "solve_report": str(work / "solve.json"),
    }
    (work / "report.json").write_text(json.dumps({"solve_kernel": "ntk", "paths": paths}))
    out = write_figures(work)
    assert [p.name for p in out] == ["gram.png", "spectrum.png", "ridge.png", "figures.json"]
    for p in out[:-1]:
        assert_image(p)
    record = json.loads(out[-1].read_text())
    assert record["figures"]["classes"] == {"file": None, "skipped": "no test rows"}
    curve = record["figures"]["ridge"]
    assert not curve["validated"] and curve["ridges"] == [1e-3] and curve["chosen"] == 1e-3
    assert curve["val_accuracy"] is None
    assert record["figures"]["gram"]["rows"] == sorted(
        range(80), key=lambda i: (int(y[i]), i)
    )  # all rows (80 <= sample), ordered by class


def test_missing_report_names_the_path(tmp_path):
    with pytest.raises(InputError, match=r"report\.json.*" + str(tmp_path / "report.json")):
        write_figures(tmp_path)


def test_missing_store_names_the_path(work, tmp_path):
    report = json.loads((work / "report.json").read_text())
    gone = tmp_path / "gone" / "kernel.zarr"
    report["paths"]["kernel_store"] = str(gone)
    (tmp_path / "report.json").write_text(json.dumps(report))
    shutil.copy(work / "solve.json", tmp_path / "solve.json")
    with pytest.raises(StoreNotFoundError, match=str(gone)) as err:
        write_figures(tmp_path)
    assert str(tmp_path / "report.json") in str(err.value)
    assert not (tmp_path / "figures.json").exists()


def test_bad_parameters(work):
    with pytest.raises(InputError, match="sample must be an integer >= 1"):
        write_figures(work, sample=0)
    with pytest.raises(InputError, match="kernel must be"):
        write_figures(work, kernel="rbf")


def test_without_matplotlib_a_clear_import_error(work, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'deqntk_dist\[plots\]'") as err:
        write_figures(work)
    assert isinstance(err.value, PlotDependencyError)


def test_pyplot_is_never_imported(work, tmp_path):
    code = (
        "import sys; from deqntk_dist.figures import write_figures; "
        f"write_figures({str(work)!r}, out_dir={str(tmp_path)!r}, sample=30); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "gram.png").is_file()


def test_the_report_command_writes_the_figures(work, tmp_path, capsys):
    from deqntk_dist.cli import main

    assert main(["report", str(work), "--out", str(tmp_path)]) == 0
    printed = [line.split()[-1] for line in capsys.readouterr().out.splitlines()]
    names = ["gram.png", "spectrum.png", "ridge.png", "classes.png", "figures.json"]
    assert [Path(p).name for p in printed] == names
    for name in names[:-1]:
        assert_image(tmp_path / name)
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "report.json" in capsys.readouterr().err
