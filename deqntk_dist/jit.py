"""numba code generation settings of the package: full-width vectors on AVX-512 hosts.

LLVM tunes recent Intel server CPUs (Skylake-X to Emerald Rapids) with ``prefer-256-bit``,
so loops it vectorises use 256-bit registers even where 512-bit ones exist.  The CDEQ slice
solver is a chain of short vectorisable passes over each slice; on this project's machines
(Emerald Rapids) 512-bit vectors make its dual maps 1.45x and its format conversions 1.7x
faster (``scripts/bench_conv.py``).  :func:`prefer_wide_vectors` drops the tuning flag
through ``NUMBA_CPU_FEATURES`` before numba builds its code generator.

It changes no result: the vectorised loops neither reassociate nor contract (fused
multiply-adds are explicit), so a lane of a 512-bit loop computes the same bits as one of a
256-bit loop (``tests/test_conv_slices.py`` compares).  The setting is left alone
when the user set ``NUMBA_CPU_FEATURES`` or ``NUMBA_CPU_NAME`` (or
``DEQNTK_WIDE_VECTORS=0``), when the host has no AVX-512, and when numba has already built
its code generator in this process (it reads the features once).
"""

from __future__ import annotations

import os
import sys

__all__ = ["prefer_wide_vectors"]

_ENV = "NUMBA_CPU_FEATURES"


def _codegen_built() -> bool:
    """Whether numba's CPU target (and so its code generator) exists in this process."""
    registry = sys.modules.get("numba.core.registry")
    target = getattr(registry, "cpu_target", None)
    return target is not None and "_toplevel_target_context" in vars(target)


def prefer_wide_vectors() -> bool:
    """Set ``NUMBA_CPU_FEATURES`` to the host's features without ``prefer-256-bit``.

    Returns
    -------
    bool
        True when the setting was made (or already made by this function, e.g. inherited
        by a worker process from its parent).
    """
    if os.environ.get("DEQNTK_WIDE_VECTORS", "1") == "0" or os.environ.get("NUMBA_CPU_NAME"):
        return False
    current = os.environ.get(_ENV)
    if current is not None:
        return current.endswith(",-prefer-256-bit")
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features().flatten()
    except Exception:  # noqa: BLE001 -- no host information: keep numba's defaults
        return False
    if "+avx512f" not in features.split(",") or _codegen_built():
        return False
    os.environ[_ENV] = features + ",-prefer-256-bit"
    config = sys.modules.get("numba.core.config")
    if config is not None:  # numba imported, nothing compiled yet (it also re-reads the env)
        config.CPU_FEATURES = os.environ[_ENV]  # type: ignore[attr-defined]
    return True


prefer_wide_vectors()
