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

from ..errors import InputError, StoreError, StoreMismatchError
from ..plan import TilePlan, cdeq_pair_seconds, check_plan_size, fc_pair_seconds
from ..spec import CDEQSpec, DEQSpec
from .chunkio import byte_view, crc32
from .core import (
    AUX_ROWS,
    DTYPES,
    FORMAT_VERSIONS,
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
from .dataset import DatasetStore
from .identity import identity_digest, kernels_cover, normal_spec, store_identity, tile_digest
from .location import Location
from .shards import DEFAULT_CHUNK, inner_chunk

__all__ = ["check_dataset_shape", "create_kernel_store", "make_kernel_store"]


def _expected_attrs(dataset: DatasetStore, spec, tile, dtype, kernels, options, layout) -> dict:
    return {
        "format": KERNEL_FORMAT,
        "format_version": layout,
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
    layout: int = KERNEL_FORMAT_VERSION,
    chunk: int = DEFAULT_CHUNK,
    compute_options: dict | None = None,
) -> KernelStore:
    """Create a kernel store for ``dataset`` (or reopen a compatible existing one).

    On a local disk the empty layout (arrays, ledger, attrs) is built in a temporary
    directory and renamed into place, so a store either exists completely or not at all; on
    an object store the attrs that make it a kernel store are written last.

    Parameters
    ----------
    path : str, os.PathLike or Location
        A local path or a store URL (``s3://bucket/ks.zarr``).
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
    layout : {1, 2}
        Store layout (``format_version``): 2 (one shard and one ledger record per tile) or
        1 (one chunk and 14 ledger files per tile; for comparisons and older readers).
    compute_options : dict, optional
        ``ComputeOptions.to_dict()`` of the job that creates the store, kept in its attrs
        as ``compute_options`` (a record, not part of its identity; a reopened store keeps
        its own).
    chunk : int
        Layout 2: side of the inner (consumer) chunks, at most this and a divisor of the
        tile (:func:`~.shards.inner_chunk`).  An existing store keeps its own.

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
    if layout not in FORMAT_VERSIONS:
        raise InputError(
            f"layout must be one of {', '.join(map(str, FORMAT_VERSIONS))}, got {layout!r}"
        )
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
    want = _expected_attrs(dataset, spec, plan.tile, dtype, kernels, options or {}, layout)
    loc = Location.parse(path, param="kernel store")
    if loc.exists():
        return _reopen(loc, want, asked)
    if layout >= 2:
        want["chunk"] = inner_chunk(plan.tile, chunk)
    if compute_options is not None:
        want["compute_options"] = dict(compute_options)
    if loc.is_local and not Path(loc.url).parent.is_dir():
        raise StoreError(
            f"parent directory of the kernel store does not exist: {Path(loc.url).parent}"
        )
    if isinstance(spec, CDEQSpec):
        pair_seconds = cdeq_pair_seconds(spec, dataset.feature_shape)
    else:
        pair_seconds = fc_pair_seconds(spec)
    check_plan_size(
        plan.n,
        plan.tile,
        pair_seconds=pair_seconds,
        files_per_tile=(
            2 * len(kernels) + 1 if layout >= 2 else 2 * (len(kernels) + len(LEDGER_FIELDS))
        ),
    )
    # CDEQ datasets are (n, H, W, C) (check_dataset_shape)
    aux_shape = (dataset.x.shape[1], dataset.x.shape[2]) if isinstance(spec, CDEQSpec) else None
    return make_kernel_store(loc, plan, want, dataset.y, aux_shape, aux_rows, asked=asked)


def make_kernel_store(
    loc: Location,
    plan: TilePlan,
    want: dict,
    labels: np.ndarray,
    aux_shape: tuple[int, int] | None,
    aux_rows: int = AUX_ROWS,
    *,
    asked: int | None = None,
) -> KernelStore:
    """Make the empty store ``want`` (validated attrs) at ``loc``, or reopen the one a
    concurrent creator made there first; see :func:`create_kernel_store`."""
    asked = plan.tile if asked is None else asked
    if not loc.is_local:
        try:
            _build(loc, plan, want, labels, aux_shape, aux_rows)
        except OSError as exc:
            raise StoreError(f"cannot create kernel store at {loc}: {exc}") from exc
        return open_kernel_store(loc, writable=True)
    p = Path(loc.url)
    tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:12]}"
    raced = False
    try:
        _build(Location.parse(tmp), plan, want, labels, aux_shape, aux_rows)
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
        return _reopen(loc, want, asked)
    return open_kernel_store(p, writable=True)


def _build(
    loc: Location,
    plan: TilePlan,
    want: dict,
    labels: np.ndarray,
    aux_shape: tuple[int, int] | None,
    aux_rows: int,
) -> None:
    """The empty store at ``loc`` (attrs ``want``, ``labels`` (n,), CDEQ self-covariances of
    ``aux_shape`` (H, W) per row); its attrs (what makes it a kernel store) last."""
    root = zarr.open_group(store=loc.zarr_store(read_only=False), mode="w-", zarr_format=3)
    n = plan.n
    dtype = want["dtype"]
    for name in want["kernels"]:
        layout = (
            {"chunks": (want["chunk"],) * 2, "shards": (plan.tile,) * 2}
            if want["format_version"] >= 2
            else {"chunks": (plan.tile, plan.tile)}
        )
        root.create_array(
            name, shape=(n, n), dtype=dtype, compressors=None, fill_value=math.nan, **layout
        )
    arr = root.create_array("labels", shape=(n,), dtype="int64", chunks=(n,))
    y = np.ascontiguousarray(labels, dtype="<i8")
    arr[...] = y
    arr.attrs["crc32"] = crc32(byte_view(y))
    if aux_shape is not None:
        aux = root.create_group("aux")
        H, W = aux_shape
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
    add_missing_arrays(root, plan, want["format_version"], loc)
    root.attrs.update(want)


def _reopen(p: Location, want: dict, asked: int) -> KernelStore:
    """Open the existing store at ``p`` for writing if its settings are ``want``'s (its
    layout and chunk are its own)."""
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


def _tiles_computed_under(p: Location, root: zarr.Group, want: dict) -> bool:
    """Whether the store has finished tiles and all carry digests of ``want``'s identity."""
    try:
        ks = KernelStore(p, root, writable=False)
        if ks.tile != want["tile"] or "identity" not in ks.ledger_fields():
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
