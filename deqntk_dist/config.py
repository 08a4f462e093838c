"""deqntk's runtime settings in dask's config, with their defaults defined once.

The defaults live in ``deqntk.yaml`` next to this module and are registered with
:func:`dask.config.update_defaults` on import, so every reader gets them through
:func:`setting` (or ``dask.config.get("deqntk.<key>")``) and no code repeats a default.
A site file (``cluster/deqntk.yaml`` in ``$DASK_CONFIG``) or ``DASK_DEQNTK__<KEY>``
environment variables override them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.config
import yaml

__all__ = ["DEFAULTS", "setting"]

#: The package defaults (the ``deqntk`` section of ``deqntk.yaml``).
DEFAULTS: dict[str, Any] = yaml.safe_load(
    (Path(__file__).with_name("deqntk.yaml")).read_text(encoding="utf-8")
)
dask.config.update_defaults(DEFAULTS)


def setting(key: str) -> Any:
    """The value of ``deqntk.<key>`` (the package default unless the user set one)."""
    return dask.config.get(f"deqntk.{key}")
