"""Create a kernel store (or reopen a compatible one): the empty layout, built aside and
renamed into place."""

from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr

from ..dataset import DatasetStore
from ..errors import InputError, StoreError, StoreMismatchError
from ..plan import TilePlan, cdeq_pair_seconds, check_plan_size, fc_pair_seconds
from ..spec import CDEQSpec, DEQSpec
from .chunkio import crc32
from .core import (
    AUX_ROWS,
    DTYPES,
    KERNEL_FORMAT,
    KERNEL_FORMAT_VERSION,
    KERNEL_NAMES,
    LEDGER_FIELDS,
    KernelStore,
    _open_group,
    _software,
    add_missing_arrays,
    open_kernel_store,
)
from .identity import identity_digest, kernels_cover, normal_spec, store_identity, tile_digest

__all__ = ["check_dataset_shape", "create_kernel_store"]


def _expected_attrs(dataset: DatasetStore, spec, tile, dtype, kernels, options) -> dict:
    return {
        "format": KERNEL_FORMAT,
        "format_version": KERNEL_FORMAT_VERSION,
        "spec": spec.to_dict(),
        "dataset": {
            "path": dataset.path,
            "fingerprint": dataset.fingerprint,
            "n": dataset.n,
            "n_train": dataset.n_train,
            "name": dataset.name,
        },
        "tile": int(tile),
        "dtype": dtype,
        "kernels": list(kernels),
        "options": dict(options),
        "software": _software(),
    }


def _mismatches(have: dict, want: dict) -> list[str]:
    out = []
    have = {**have, "spec": normal_spec(have.get("spec"))}
    for key in ("spec", "tile", "dtype", "kernels", "options"):
        same = (
            kernels_cover(have.get(key), want[key])
            if key == "kernels"
            else have.get(key) == want[key]
        )
        if not same:
            out.append(f"{key}: store has {have.get(key)!r}, requested {want[key]!r}")
    hd, wd = have.get("dataset", {}), want["dataset"]
    for key in ("fingerprint", "n", "n_train"):
        if hd.get(key) != wd[key]:
            out.append(
                f"dataset {key}: store has {hd.get(key)!r}, dataset store {wd['path']} has "
                f"{wd[key]!r}"
            )
    return out


def check_dataset_shape(dataset: DatasetStore, spec: DEQSpec | CDEQSpec) -> None:
    """Refuse a dataset whose rows the spec cannot take (images for CDEQ and for hflip).

    Raises
    ------
    InputError
    """
    ndims = (2, 4) if isinstance(spec, DEQSpec) and not spec.hflip else (4,)
    if len(dataset.x.shape) not in ndims:
        what = f"a {spec.kind} spec" + (" with hflip" if spec.hflip else "")
        raise InputError(
            f"{what} needs dataset inputs with {' or '.join(map(str, ndims))} dimensions, got "
            f"x of shape {tuple(dataset.x.shape)} in {dataset.path}"
        )


def create_kernel_store(
    path,
    dataset: DatasetStore,
    spec: DEQSpec | CDEQSpec,
    *,
    tile: int,
    dtype: str = "float32",
    kernels=("ntk",),
    options: dict | None = None,
    aux_rows: int = AUX_ROWS,
) -> KernelStore:
    """Create a kernel store for ``dataset`` (or reopen a compatible existing one).

    The empty layout (arrays, ledger, attrs) is built in a temporary directory and renamed
    into place, so a store either exists completely or not at all.

    Parameters
    ----------
    path : str or Path
    dataset : DatasetStore
    spec : DEQSpec or CDEQSpec
    tile : int
        Tile side (chunk side of the kernel arrays).
    dtype : {"float32", "float64"}
    kernels : sequence of {"ntk", "nngp"}
    options : dict, optional
        Kernel options passed to every tile (part of the store's identity).
    aux_rows : int
        Rows per chunk (and per task) of the CDEQ self-covariances.

    Returns
    -------
    KernelStore
        Writable.

    Raises
    ------
    StoreMismatchError
        An existing store at ``path`` has another spec, dataset, tile, dtype, kernels or
        options.
    StoreError
        ``path`` exists but is not a kernel store, or cannot be written.
    """
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    kernels = tuple(kernels)
    if (
        not kernels
        or any(k not in KERNEL_NAMES for k in kernels)
        or len(set(kernels)) != len(kernels)
    ):
        raise InputError(
            f"kernels must be a non-empty subset of {', '.join(KERNEL_NAMES)}, got {kernels!r}"
        )
    kernels = tuple(k for k in KERNEL_NAMES if k in kernels)
    if not isinstance(spec, DEQSpec | CDEQSpec):
        raise InputError(f"spec must be a DEQSpec or CDEQSpec, got {type(spec).__name__}")
    check_dataset_shape(dataset, spec)
    asked = TilePlan(n=dataset.n, tile=tile).tile
    plan = TilePlan(n=dataset.n, tile=min(asked, dataset.n))  # one tile covers all rows
    want = _expected_attrs(dataset, spec, plan.tile, dtype, kernels, options or {})
    p = Path(path).absolute()
    if p.exists():
        return _reopen(p, want, asked)
    if not p.parent.is_dir():
        raise StoreError(f"parent directory of the kernel store does not exist: {p.parent}")
    if isinstance(spec, CDEQSpec):
        pair_seconds = cdeq_pair_seconds(spec, dataset.feature_shape)
    else:
        pair_seconds = fc_pair_seconds(spec)
    check_plan_size(
        plan.n,
        plan.tile,
        pair_seconds=pair_seconds,
        files_per_tile=2 * (len(kernels) + len(LEDGER_FIELDS)),
    )
    tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:12]}"
    raced = False
    try:
        root = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        n = plan.n
        for name in kernels:
            root.create_array(
                name,
                shape=(n, n),
                dtype=dtype,
                chunks=(plan.tile, plan.tile),
                compressors=None,
                fill_value=math.nan,
            )
        labels = root.create_array("labels", shape=(n,), dtype="int64", chunks=(n,))
        y = np.ascontiguousarray(dataset.y, dtype="<i8")
        labels[...] = y
        labels.attrs["crc32"] = crc32(memoryview(y).cast("B"))
        if isinstance(spec, CDEQSpec):
            aux = root.create_group("aux")
            H, W = dataset.x.shape[1:3]
            aux.create_array(
                "self_cov",
                shape=(n, H, W),
                dtype="float64",
                chunks=(aux_rows, H, W),
                compressors=None,
                fill_value=math.nan,
            )
            aux.create_array(
                "self_cov_done",
                shape=(-(-n // aux_rows),),
                dtype="bool",
                chunks=(1,),
                fill_value=False,
            )
        add_missing_arrays(root, plan)
        root.attrs.update(want)
        try:
            os.rename(tmp, p)
        except OSError:
            if not p.exists():
                raise
            raced = True  # another process created the store meanwhile: reopen theirs
    except OSError as exc:
        raise StoreError(f"cannot create kernel store at {p}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if raced:
        return _reopen(p, want, asked)
    return open_kernel_store(p, writable=True)


def _reopen(p: Path, want: dict, asked: int) -> KernelStore:
    """Open the existing store at ``p`` for writing if its settings are ``want``'s."""
    root = _open_group(p, writable=True)
    have = dict(root.attrs)
    n, old_tile = want["dataset"]["n"], have.get("tile")
    if isinstance(old_tile, int) and old_tile > n and asked >= n:
        want = {**want, "tile": old_tile}  # made before tiles were clamped to n: the same plan
    problems = _mismatches(have, want)
    if problems:
        hint = ""
        if _tiles_computed_under(p, root, want):
            hint = (
                "\n  (its finished tiles were computed with the requested settings: the "
                "store's attrs were changed after they were written; restore them)"
            )
        raise StoreMismatchError(
            f"kernel store {p} was made with different settings; use another path or "
            "delete it:\n  " + "\n  ".join(problems) + hint
        )
    return KernelStore(p, root, writable=True)


def _tiles_computed_under(p: Path, root: zarr.Group, want: dict) -> bool:
    """Whether the store has finished tiles and all carry digests of ``want``'s identity."""
    try:
        ks = KernelStore(p, root, writable=False)
        if ks.tile != want["tile"] or not ks.has("ledger/identity"):
            return False
        done, ids = ks._ledger("done"), ks._ledger("identity")
        digest = identity_digest(store_identity(want))
        tiles = [t for t in ks.plan.tiles() if done[t]]
        bounds = ks.plan.bounds
        return bool(tiles) and all(
            int(ids[i, j]) == tile_digest(digest, i, j, bounds(i), bounds(j)) for i, j in tiles
        )
    except Exception:  # a hint only
        return False
