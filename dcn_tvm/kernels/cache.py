"""Kernel resolution: in-process cache -> prebuilt packages -> on-disk cache -> compile (then store
on disk) -> an error naming the spec and the commands that would provide it.

A disk entry is a library and its checksum file (size and sha256), each written atomically (staged
in the same folder, then renamed) under an exclusive file lock, so several processes asking for the
same spec compile it once. A library is loaded only if it matches its checksum (`runtime.load_verified`);
a damaged one (truncated, emptied, overwritten) is recompiled with a warning, and a cache folder
that cannot be written (read-only, or not creatable) means compiling in memory, with a warning.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path

from dcn_tvm import env
from dcn_tvm._tvm import CompilerUnavailable
from dcn_tvm.kernels import prebuilt, threads
from dcn_tvm.kernels.runtime import digest, load_tvm_runtime, load_verified
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_kind

log = logging.getLogger("dcn_tvm")
_kernels: dict[str, object] = {}
_lock = threading.Lock()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def _code_fingerprint() -> str:
    """Hash of the compute and schedule sources: editing either invalidates the cached kernels."""
    fingerprint = hashlib.sha256()
    for package in ("dcn_tvm.compute", "dcn_tvm.schedules"):
        folder = Path(next(iter(importlib.util.find_spec(package).submodule_search_locations)))
        for source in sorted(folder.glob("*.py")):
            fingerprint.update(source.name.encode() + source.read_bytes())
    return fingerprint.hexdigest()[:12]


def cache_path(spec: KernelSpec) -> Path:
    """Where the compiled library of `spec` lives on disk; the path carries the versions, the target
    and which schedule it was compiled with (default, or a tuned record), so tuning invalidates it."""
    from dcn_tvm.kernels.records import schedule_tag

    versions = f"dcn_tvm-{_version('dcn_tvm')}_tvm-{_version('apache-tvm')}_{_code_fingerprint()}"
    return env.cache_dir() / versions / spec.target / f"{spec.key}_{schedule_tag(spec)}.so"


def checksum_path(library: Path) -> Path:
    """The checksum file of a disk entry: {"size", "sha256"} of its library."""
    return library.with_suffix(".sha256.json")


def _load(library: Path):
    """The kernel of a disk entry whose library matches its checksum file, else None (never loaded)."""
    try:
        record = json.loads(checksum_path(library).read_text())
        size, sha256 = record["size"], record["sha256"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    load_tvm_runtime()
    module = load_verified(library, sha256, size)
    return None if module is None else module["main"]


def _store(executable, library: Path) -> None:
    """Write a disk entry: the library, then its checksum file, each staged and renamed into place."""
    staged = []
    try:
        for path in (library, checksum_path(library)):
            fd, temporary = tempfile.mkstemp(prefix=path.stem, suffix=path.suffix + ".tmp", dir=path.parent)
            os.close(fd)
            staged.append(temporary)
        executable.export_library(staged[0])
        with open(staged[0], "rb") as handle:
            record = {"size": os.fstat(handle.fileno()).st_size, "sha256": digest(handle)}
        Path(staged[1]).write_text(json.dumps(record) + "\n")
        os.replace(staged[0], library)
        os.replace(staged[1], checksum_path(library))
    finally:
        for temporary in staged:
            if os.path.exists(temporary):
                os.remove(temporary)


def _lock_entry(library: Path):
    """An exclusive lock on a disk entry: its open .lock file (closing it releases the lock)."""
    library.parent.mkdir(parents=True, exist_ok=True)
    handle = open(library.with_suffix(".lock"), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:
        handle.close()
        raise
    return handle


def _compile(spec: KernelSpec):
    from dcn_tvm.kernels.build import build

    log.info("dcn_tvm: compiling %s", spec.key)
    return build(spec)


def _warn_unwritable(spec: KernelSpec, library: Path, error: OSError) -> None:
    warnings.warn(f"dcn_tvm: cannot write the kernel cache {library.parent} ({error}); compiling {spec.key} in "
                  f"memory, again in every process: point DCN_TVM_CACHE_DIR at a writable folder", stacklevel=2)


def _from_disk(spec: KernelSpec, library: Path):
    """The kernel from its verified disk entry, else compiled and stored there."""
    kernel = _load(library)
    if kernel is not None:
        return kernel
    try:
        lock = _lock_entry(library)
    except OSError as error:
        _warn_unwritable(spec, library, error)
        return _compile(spec)["main"]
    with lock:
        kernel = _load(library)  # another process may have compiled it while we waited
        if kernel is not None:
            return kernel
        if library.exists():
            warnings.warn(f"dcn_tvm: the cached kernel {library} does not match its checksum file (damaged, or "
                          f"left half-written); recompiling it", stacklevel=2)
        executable = _compile(spec)
        try:
            _store(executable, library)
        except OSError as error:
            _warn_unwritable(spec, library, error)
        return executable["main"]


class KernelUnavailable(RuntimeError):
    """No prebuilt package or cache has the kernel, and the TVM compiler is not installed."""


def _unavailable(spec: KernelSpec) -> KernelUnavailable:
    from dcn_tvm.kernels.workloads import of_spec

    kind = target_kind(spec.target)
    workload = of_spec(spec) if spec.geometry is not None else spec.op
    return KernelUnavailable(
        f"no kernel for {spec.key}: no prebuilt package provides it (DCN_TVM_PREBUILT="
        f"{os.pathsep.join(env.prebuilt_paths()) or 'unset'}; installed: "
        f"{[str(p.root) for p in prebuilt.packages()] or 'none'}), it is not in the disk cache, and the TVM "
        f"compiler is not installed. Either install it (pip install 'dcn_tvm[tune]') to compile on first use, "
        f"or, on a machine that has it, build a package that covers this shape:\n"
        f"  dcn-tvm tune --target {kind} --workload '{workload}'\n"
        f"  dcn-tvm build --target {kind} --workload '{workload}' --out DIR"
    )


def _resolve(spec: KernelSpec):
    kernel = prebuilt.find_kernel(spec)
    if kernel is not None:
        return kernel
    try:
        if not env.disk_cache_enabled():
            return _compile(spec)["main"]
        return _from_disk(spec, cache_path(spec))
    except CompilerUnavailable as error:
        raise _unavailable(spec) from error


def get_kernel(spec: KernelSpec):
    """The callable kernel for `spec`, compiling it at most once per machine."""
    key = spec.key
    kernel = _kernels.get(key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                kernel = _kernels[key] = _resolve(spec)
    threads.follow_torch(spec.target)
    return kernel
