"""Storage: everything that knows the on-disk (or in-bucket) layout of deqntk's stores.

- :mod:`.location`: a store's place, a local path or a URL (``s3://...``), with whole-object
  writes; every read and write below goes through it.
- :mod:`.dataset`: the dataset store (input rows, labels, fingerprint).
- :mod:`.core`: the kernel store (layouts 1 and 2, reader API, tile writes, open);
  :mod:`.create`; :mod:`.shards` (layout-2 shard bytes); :mod:`.ledger` (per-tile ledger,
  both layouts); :mod:`.chunkio` (checksums, aligned buffers, direct I/O);
  :mod:`.identity` (identity digests, the one kernels rule); :mod:`.lease` (tile leases);
  :mod:`.resume`; :mod:`.verify`; :mod:`.migrate` (layout 1 -> 2).
- :mod:`.results`: the solver's results group inside a kernel store.

Nothing outside this package writes zarr.
"""

from .chunkio import (
    DIRECT_ALIGN,
    DIRECT_MIN_BYTES,
    AlignedBuffers,
    aligned_empty,
    cast_and_mirror,
    checksum,
    crc32,
    write_file,
)
from .core import (
    AUX_ROWS,
    DTYPES,
    KERNEL_FORMAT,
    KERNEL_FORMAT_VERSION,
    KERNEL_NAMES,
    LEDGER_FIELDS,
    KernelStore,
    add_missing_arrays,
    open_kernel_store,
)
from .create import check_dataset_shape, create_kernel_store
from .location import Location
from .verify import verify_kernel_store

__all__ = [
    "AUX_ROWS",
    "DIRECT_ALIGN",
    "DIRECT_MIN_BYTES",
    "DTYPES",
    "KERNEL_FORMAT",
    "KERNEL_FORMAT_VERSION",
    "KERNEL_NAMES",
    "LEDGER_FIELDS",
    "AlignedBuffers",
    "KernelStore",
    "Location",
    "add_missing_arrays",
    "aligned_empty",
    "cast_and_mirror",
    "check_dataset_shape",
    "checksum",
    "crc32",
    "create_kernel_store",
    "open_kernel_store",
    "verify_kernel_store",
    "write_file",
]
