"""Every DCN_TVM_* environment variable, in one place (the README's table mirrors this one).

| variable            | default                      | meaning                                              |
|---------------------|------------------------------|------------------------------------------------------|
| DCN_TVM_CACHE_DIR   | ~/.cache/dcn_tvm             | on-disk cache of compiled kernels                    |
| DCN_TVM_NO_DISK_CACHE | 0                          | 1: compile in every process, never read/write disk   |
| DCN_TVM_SHAPES      | static                       | static: one kernel per shape; dynamic: one kernel per|
|                     |                              | layer for every batch/height/width                   |
| DCN_TVM_PREBUILT    | (none)                       | prebuilt package folders (os.pathsep-separated),     |
|                     |                              | searched before installed packages and the caches    |
| DCN_TVM_ALLOW_VERSION_MISMATCH | 0                 | 1: load a prebuilt package built with other versions |
|                     |                              | (with a warning) instead of refusing it              |
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("DCN_TVM_CACHE_DIR") or Path.home() / ".cache" / "dcn_tvm")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") in ("1", "true", "yes")


def disk_cache_enabled() -> bool:
    return not _flag("DCN_TVM_NO_DISK_CACHE")


def dynamic_shapes() -> bool:
    value = os.environ.get("DCN_TVM_SHAPES", "static")
    if value not in ("static", "dynamic"):
        raise ValueError(f"DCN_TVM_SHAPES must be 'static' or 'dynamic', got {value!r}")
    return value == "dynamic"


def prebuilt_paths() -> list[str]:
    return [p for p in os.environ.get("DCN_TVM_PREBUILT", "").split(os.pathsep) if p]


def allow_version_mismatch() -> bool:
    return _flag("DCN_TVM_ALLOW_VERSION_MISMATCH")
