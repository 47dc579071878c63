"""Every DCN_TVM_* environment variable, in one place (the README's table mirrors this one).

| variable            | default                      | meaning                                              |
|---------------------|------------------------------|------------------------------------------------------|
| DCN_TVM_CACHE_DIR   | ~/.cache/dcn_tvm             | on-disk cache of compiled kernels                    |
|                     | (no home: <temp>/dcn_tvm-UID)| (used only if no other user can write it)            |
| DCN_TVM_NO_DISK_CACHE | 0                          | 1: compile in every process, never read/write disk   |
| DCN_TVM_SHAPES      | auto                         | auto: a layer's first size gets its own kernels, and |
|                     |                              | its second switches it to kernels for every size;    |
|                     |                              | static: one kernel per shape; dynamic: one kernel per|
|                     |                              | layer for every batch/height/width                   |
| DCN_TVM_PREBUILT    | (none)                       | prebuilt package folders (os.pathsep-separated),     |
|                     |                              | searched before installed packages and the caches    |
| DCN_TVM_ALLOW_VERSION_MISMATCH | 0                 | 1: load a prebuilt package built with other versions |
|                     |                              | (with a warning) instead of refusing it              |
| DCN_TVM_TUNING_LOGS | the checkout's tuning_logs/, | tuned schedules (`dcn-tvm tune` records) that builds |
|                     | else <cache dir>/tuning_logs | use; the default of `dcn-tvm tune --logs`            |
| DCN_TVM_SCRATCH_MIB | 256                          | MiB of backward scratch each thread may keep between |
|                     |                              | calls (dcn_tvm.ops.scratch); 0 keeps none            |
| DCN_TVM_LOCK_TIMEOUT | 120                         | seconds to wait for another process's lock on a disk |
|                     |                              | cache entry, then compile in memory (inf: forever)   |
| DCN_TVM_KERNELS_IN_MEMORY | 128                    | kernels each process keeps loaded; the least recently|
|                     |                              | used beyond it are unloaded (reloaded on next use)   |

Boolean variables take 1/0, true/false, yes/no or on/off in any case (empty means unset); any other
value is a ValueError, never silently false.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """DCN_TVM_CACHE_DIR, else ~/.cache/dcn_tvm; where the home directory is unknown (no HOME and no
    passwd entry: an arbitrary container uid), <temp dir>/dcn_tvm-<uid> (the kernel cache checks that
    no other user can write it)."""
    if os.environ.get("DCN_TVM_CACHE_DIR"):
        return Path(os.environ["DCN_TVM_CACHE_DIR"])
    try:
        return Path.home() / ".cache" / "dcn_tvm"
    except RuntimeError:
        return Path(tempfile.gettempdir()) / f"dcn_tvm-{os.geteuid()}"


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
             "off": False, "": False}


def _flag(name: str) -> bool:
    value = os.environ.get(name, "")
    if value.lower() not in _BOOLEANS:
        raise ValueError(f"{name}={value!r} is not a boolean: use 1/0, true/false, yes/no or on/off (any case; "
                         f"empty means unset)")
    return _BOOLEANS[value.lower()]


def tuning_logs_dir() -> Path:
    """Where tuning records are read (and written by default): DCN_TVM_TUNING_LOGS, else the
    repository's tuning_logs/ when running from a checkout, else a folder in the cache directory."""
    if os.environ.get("DCN_TVM_TUNING_LOGS"):
        return Path(os.environ["DCN_TVM_TUNING_LOGS"])
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "tuning_logs").is_dir():
        return checkout / "tuning_logs"
    return cache_dir() / "tuning_logs"


def disk_cache_enabled() -> bool:
    return not _flag("DCN_TVM_NO_DISK_CACHE")


SHAPE_POLICIES = ("auto", "static", "dynamic")


def shapes_policy() -> str:
    """DCN_TVM_SHAPES: "auto" (default), "static" or "dynamic" (see dcn_tvm.ops.shapes)."""
    value = os.environ.get("DCN_TVM_SHAPES") or "auto"
    if value not in SHAPE_POLICIES:
        raise ValueError(f"DCN_TVM_SHAPES must be one of {SHAPE_POLICIES}, got {value!r}")
    return value


def prebuilt_paths() -> list[str]:
    return [p for p in os.environ.get("DCN_TVM_PREBUILT", "").split(os.pathsep) if p]


def allow_version_mismatch() -> bool:
    return _flag("DCN_TVM_ALLOW_VERSION_MISMATCH")


def scratch_limit_bytes() -> int:
    """The bytes of backward scratch each thread may keep (DCN_TVM_SCRATCH_MIB, a whole number of MiB)."""
    value = os.environ.get("DCN_TVM_SCRATCH_MIB") or "256"
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"DCN_TVM_SCRATCH_MIB={value!r} is not a whole number of MiB (>= 0)")
    return int(value) << 20


def lock_timeout() -> float:
    """Seconds to wait for another process's lock on a disk cache entry (DCN_TVM_LOCK_TIMEOUT, default 120)."""
    value = os.environ.get("DCN_TVM_LOCK_TIMEOUT", "")
    try:
        seconds = float(value) if value else 120.0
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"DCN_TVM_LOCK_TIMEOUT={value!r} is not a number of seconds >= 0 (inf waits forever)")
    return seconds


def kernels_in_memory() -> int:
    """How many kernels a process keeps loaded (DCN_TVM_KERNELS_IN_MEMORY, default 128)."""
    value = os.environ.get("DCN_TVM_KERNELS_IN_MEMORY", "")
    if not value:
        return 128
    if not (value.isdigit() and int(value) >= 1):
        raise ValueError(f"DCN_TVM_KERNELS_IN_MEMORY={value!r} is not a whole number >= 1")
    return int(value)
