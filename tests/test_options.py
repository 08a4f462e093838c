"""ComputeOptions / SolveOptions: validation, round trips (also through store attrs)."""

import json

import numpy as np
import pytest

from deqntk_dist.errors import InputError
from deqntk_dist.options import ComputeOptions, SolveOptions


def test_defaults_round_trip_through_json():
    for cls in (ComputeOptions, SolveOptions):
        o = cls()
        assert cls.from_dict(json.loads(json.dumps(o.to_dict()))) == o


def test_values_are_normalised_and_round_trip():
    c = ComputeOptions(kernels="ntk", memory_budget="1GiB", tile=256, dtype="float64", tol=1e-11)
    assert c.kernels == ("ntk",) and c.memory_budget == 2**30
    d = json.loads(json.dumps(c.to_dict()))
    assert d["kernels"] == ["ntk"] and ComputeOptions.from_dict(d) == c
    s = SolveOptions(ridges=[1e-3, 1e-2], memory_limit="2GB", solver="cg", band_bytes="16MiB")
    assert s.ridges == (1e-3, 1e-2) and s.memory_limit == 2 * 10**9 and s.band_bytes == 2**24
    assert SolveOptions.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.replace(kernel="nngp").kernel == "nngp" and s.kernel == "ntk"


@pytest.mark.parametrize(
    "cls, kw, needle",
    [
        (ComputeOptions, {"kernels": "ntk,foo"}, "kernels must be a non-empty list"),
        (ComputeOptions, {"kernels": ["ntk", "ntk"]}, "distinct"),
        (ComputeOptions, {"kernels": []}, "kernels must be a non-empty list"),
        (ComputeOptions, {"tile": 0}, "tile must be an integer >= 1, got 0"),
        (ComputeOptions, {"tile": 2.5}, "tile must be an integer"),
        (ComputeOptions, {"tile": True}, "tile must be an integer"),
        (ComputeOptions, {"dtype": "float16"}, "dtype must be one of"),
        (ComputeOptions, {"tol": 0.5}, "tol must be a finite number in (0, 0.001]"),
        (ComputeOptions, {"memory_budget": "1G"}, "memory_budget has the ambiguous unit"),
        (ComputeOptions, {"memory_budget": 1000}, "memory_budget must be at least 1 MiB"),
        (ComputeOptions, {"retries": -1}, "retries must be an integer >= 0"),
        (ComputeOptions, {"task_threads": 0}, "task_threads must be an integer >= 1"),
        (ComputeOptions, {"layout": 3}, "layout must be one of 1, 2"),
        (ComputeOptions, {"progress": "yes"}, "progress must be True or False"),
        (SolveOptions, {"kernel": "cntk"}, "kernel must be one of 'ntk', 'nngp'"),
        (SolveOptions, {"solver": "lu"}, "solver must be one of 'auto', 'cholesky', 'cg'"),
        (SolveOptions, {"ridges": [1e-3, -1]}, "ridges must be a non-empty list of numbers > 0"),
        (SolveOptions, {"ridges": ["a"]}, "ridges must be a list of positive numbers"),
        (SolveOptions, {"ridges": [float("inf")]}, "ridges must be"),
        (SolveOptions, {"val_fraction": 0.7}, "val_fraction must be a finite number in (0, 0.5]"),
        (SolveOptions, {"max_iter": 0}, "max_iter must be an integer >= 1"),
        (SolveOptions, {"band_bytes": 10}, "band_bytes must be at least 1 MiB"),
        (SolveOptions, {"memory_limit": "lots"}, "memory_limit must be a size"),
        (SolveOptions, {"keep_bands": 1}, "keep_bands must be True or False"),
    ],
)
def test_bad_values_name_the_field_and_the_value(cls, kw, needle):
    with pytest.raises(InputError) as e:
        cls(**kw)
    assert needle in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)


def test_from_dict_and_replace_refuse_unknown_fields():
    with pytest.raises(InputError, match="unknown SolveOptions field.*lambdas"):
        SolveOptions.from_dict({"lambdas": [1e-3]})
    with pytest.raises(InputError, match="unknown ComputeOptions field.*what"):
        ComputeOptions().replace(what=("ntk",))
    with pytest.raises(InputError, match="must come from a dict"):
        SolveOptions.from_dict(["ntk"])


def test_solve_options_round_trip_through_the_results_attrs(tmp_path, rng):
    """The options a solve ran with are stored in ``results/<kernel>`` and read back equal."""
    from deqntk_dist import DEQSpec, write_dataset_store
    from deqntk_dist.kernels import kernel_matrix
    from deqntk_dist.regression import solve_store
    from deqntk_dist.store import create_kernel_store
    from deqntk_dist.store.results import read_results

    n, nt = 60, 40
    x = rng.normal(size=(n, 5))
    y = rng.integers(0, 3, n)
    ds = write_dataset_store(tmp_path / "ds", x, y, n_train=nt, name="t")
    spec = DEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1)
    ks = create_kernel_store(tmp_path / "ks", ds, spec, tile=n, kernels=("ntk",))
    K = kernel_matrix(spec, ds.rows(0, n)).ntk
    ks.write_tile(0, 0, {"ntk": K}, max_residual=0.0, iterations=1, seconds=0.0)
    opts = SolveOptions(ridges=(1e-3, 1e-2), solver="cholesky", seed=3)
    solve_store(ks.path, opts)
    res = read_results(ks.path, "ntk")
    stored = res.attrs["options"]
    assert SolveOptions.from_dict(stored) == opts


def test_compute_options_round_trip_through_the_store_attrs(tmp_path, rng):
    """The ComputeOptions of the job that created a store are kept in its attrs and read
    back equal; a resumed store keeps the record of its creation; a hostile record is
    ignored (it is not part of the identity), the store still opens."""
    import logging

    import zarr
    from distributed import Client, LocalCluster

    from deqntk_dist import DEQSpec, open_kernel_store, write_dataset_store
    from deqntk_dist.compute import compute_kernel_store
    from deqntk_dist.store import verify_kernel_store

    n = 40
    ds = write_dataset_store(tmp_path / "ds", rng.normal(size=(n, 4)), np.zeros(n, int),
                             n_train=n, name="t")  # fmt: skip
    spec = DEQSpec(sigma_w2=1.0, sigma_u2=1.0, sigma_b2=0.1)
    opts = ComputeOptions(kernels=("ntk",), tile=16, max_tiles=2, retries=1, progress=False)
    cluster = LocalCluster(n_workers=1, processes=False, threads_per_worker=1,
                           dashboard_address=None, silence_logs=logging.ERROR)  # fmt: skip
    with cluster, Client(cluster) as cl:
        compute_kernel_store(ds, tmp_path / "ks", spec, opts, client=cl)
        assert open_kernel_store(tmp_path / "ks").compute_options == opts
        compute_kernel_store(ds, tmp_path / "ks", spec, opts.replace(max_tiles=None), client=cl)
    ks = open_kernel_store(tmp_path / "ks")
    assert ks.is_complete() and ks.compute_options == opts
    root = zarr.open_group(str(tmp_path / "ks"), mode="r+")
    for hostile in ({"tile": -5}, {"rm -rf": 1}, "ntk", [1, 2]):
        root.attrs["compute_options"] = hostile
        assert open_kernel_store(tmp_path / "ks").compute_options is None
    assert verify_kernel_store(tmp_path / "ks") == []
