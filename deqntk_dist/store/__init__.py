"""Kernel store: a symmetric N x N Gram in a zarr v3 group, with a per-tile ledger.

The package keeps the names of the former ``store`` module: :mod:`.core` (layout, reader
API, tile writes, open), :mod:`.create`, :mod:`.chunkio` (checksums, aligned buffers,
direct-I/O chunk files), :mod:`.identity` (identity digests) and :mod:`.verify`.
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
