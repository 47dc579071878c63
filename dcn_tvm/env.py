"""Every DCN_TVM_* environment variable, in one place (the README's table mirrors this one).

| variable            | default                      | meaning                                              |
|---------------------|------------------------------|------------------------------------------------------|
| DCN_TVM_CACHE_DIR   | ~/.cache/dcn_tvm             | on-disk cache of compiled kernels                    |
| DCN_TVM_NO_DISK_CACHE | 0                          | 1: compile in every process, never read/write disk   |
| DCN_TVM_SHAPES      | static                       | static: one kernel per shape; dynamic: one kernel per|
|                     |                              | layer for every batch/height/width                   |
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("DCN_TVM_CACHE_DIR") or Path.home() / ".cache" / "dcn_tvm")


def disk_cache_enabled() -> bool:
    return os.environ.get("DCN_TVM_NO_DISK_CACHE", "0") not in ("1", "true", "yes")


def dynamic_shapes() -> bool:
    value = os.environ.get("DCN_TVM_SHAPES", "static")
    if value not in ("static", "dynamic"):
        raise ValueError(f"DCN_TVM_SHAPES must be 'static' or 'dynamic', got {value!r}")
    return value == "dynamic"
