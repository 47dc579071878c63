"""Kernel resolution: in-process cache -> prebuilt packages -> on-disk cache -> compile (then store
on disk) -> an error naming the spec and the commands that would provide it.

A disk entry is a library and its checksum file (size and sha256), each written atomically (staged
in the same folder, then renamed) under an exclusive file lock, so several processes asking for the
same spec compile it once. A library is loaded only if it matches its checksum (`runtime.load_verified`);
a damaged one (truncated, emptied, overwritten) is recompiled with a warning. With a warning, kernels
are compiled in memory instead where the cache cannot be used: a folder that cannot be written
(read-only, or not creatable); a folder or entry another user could have planted (owned by another
user than this one or root, or writable by everyone, on the way from / to the entry; a sticky folder
such as /tmp may be world-writable); an entry whose lock another process holds for longer than
DCN_TVM_LOCK_TIMEOUT (stopped, or stuck; the wait names it and its pid). Staged files left by a
killed writer are removed when their folder is next written.

In memory, a process keeps the DCN_TVM_KERNELS_IN_MEMORY most recently used kernels; a dropped one is
unloaded once no caller holds it, and resolved again when next asked for. A kernel just compiled and
stored is served from its stored library: the compiler's in-memory module takes about 20 times the
memory (2.4 MiB against 0.1 MiB for a small CPU convolution).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import stat
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path

from dcn_tvm import env
from dcn_tvm._tvm import CompilerUnavailable
from dcn_tvm.forksafe import ForkSafeLock
from dcn_tvm.kernels import prebuilt, threads
from dcn_tvm.kernels.runtime import digest, load_tvm_runtime, load_verified
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_kind

log = logging.getLogger("dcn_tvm")
#: Staged files older than this (seconds) belong to a writer that died: a live one renames its own in seconds.
STALE_STAGING_AGE = 600
_kernels: OrderedDict[str, object] = OrderedDict()  # least recently used first
_dropped: set[str] | None = set()  # keys dropped from _kernels, until one is needed again (said once)
_lock = ForkSafeLock()  # unheld again in a forked child (dcn_tvm.forksafe)
_entry_locks: set = set()  # the .lock files this process holds open


def _after_fork_in_child() -> None:
    """Close the child's copies of the entry lock files a thread of the parent held at the fork: that
    thread does not exist in the child, and the parent's locks stay held until the parent releases them."""
    for handle in _entry_locks:
        handle.close()
    _entry_locks.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


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


class _OpenToOthers(Exception):
    """A cache entry that another user could have changed."""


def _open_to_others(path: Path) -> str | None:
    """How another user could change `path` (owned by them, or writable by everyone), or None.
    Paths that cannot be reached are None (nothing loads from them); a symlink's own mode means
    nothing, its owner does."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if info.st_uid not in (0, os.geteuid()):
        return f"{path} is owned by uid {info.st_uid}"
    sticky_folder = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
    if info.st_mode & stat.S_IWOTH and not stat.S_ISLNK(info.st_mode) and not sticky_folder:
        return f"{path} is writable by everyone"
    return None


def _untrusted(folder: Path) -> str | None:
    """Why another user could have planted entries in `folder`: it, or a folder on the way to it
    (as written and with symlinks resolved), is open to others; else None."""
    absolute = Path(os.path.abspath(folder))
    resolved = absolute.resolve()
    for place in dict.fromkeys([absolute, *absolute.parents, resolved, *resolved.parents]):
        problem = _open_to_others(place)
        if problem is not None:
            return problem
    return None


def _unpinned(module):
    """`module`, no longer kept loaded for the life of the process (tvm_ffi's default): unloaded once
    nothing references it. Its functions reference it; CUDA modules stay pinned, as a kernel may still
    be running on the device when its last reference goes."""
    import tvm_ffi

    tvm_ffi.get_global_func("ffi.ModuleGlobalsRemove")(module)
    return module


def _load(library: Path):
    """The kernel of a disk entry whose library matches its checksum file, else None (never loaded).
    An entry (library or checksum file) that another user could have changed is refused: _OpenToOthers."""
    for path in (library, checksum_path(library)):
        problem = _open_to_others(path.resolve())
        if problem is not None:
            raise _OpenToOthers(problem)
    try:
        record = json.loads(checksum_path(library).read_text())
        size, sha256 = record["size"], record["sha256"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    load_tvm_runtime()
    module = load_verified(library, sha256, size)
    if module is None:
        return None
    if target_kind(library.parent.name) != "cuda":
        module = _unpinned(module)
    return module["main"]


def _remove_stale_staging(folder: Path) -> None:
    """Remove the staged files of writers killed mid-write (older than STALE_STAGING_AGE)."""
    cutoff = time.time() - STALE_STAGING_AGE
    for path in [*folder.glob("*.so.tmp"), *folder.glob("*.json.tmp")]:
        with contextlib.suppress(OSError):
            if path.lstat().st_mtime < cutoff:
                path.unlink()


def _store(executable, library: Path) -> None:
    """Write a disk entry: the library, then its checksum file, each staged and renamed into place."""
    _remove_stale_staging(library.parent)
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


def _holder(handle) -> str:
    """Who holds a lock file: the pid its holder wrote into it, and whether that process is stopped."""
    handle.seek(0)
    pid = handle.read().strip()
    if not pid.isdigit():
        return "another process"
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return f"process {pid}"
    return f"process {pid}" + (" (stopped)" if state in ("T", "t") else "")


def _acquire(handle, path: Path) -> None:
    """flock `handle` exclusively, waiting at most DCN_TVM_LOCK_TIMEOUT seconds and saying for whom;
    TimeoutError after that."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    timeout, holder = env.lock_timeout(), _holder(handle)
    log.warning("dcn_tvm: waiting for %s, held by %s; giving up after %g s (DCN_TVM_LOCK_TIMEOUT)", path, holder,
                timeout)
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.1)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{path} is still held by {holder} after {timeout:g} s") from None


def _lock_entry(library: Path):
    """An exclusive lock on a disk entry: its open .lock file, holding this process's pid; release it
    with `_unlock`. OSError if the folder cannot be written, TimeoutError (see `_acquire`)."""
    library.parent.mkdir(parents=True, exist_ok=True)
    path = library.with_suffix(".lock")
    handle = open(path, "a+")
    try:
        _acquire(handle, path)
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except OSError:
        handle.close()
        raise
    _entry_locks.add(handle)
    return handle


def _unlock(handle) -> None:
    _entry_locks.discard(handle)
    handle.close()


def _compile(spec: KernelSpec):
    from dcn_tvm.kernels.build import build

    log.info("dcn_tvm: compiling %s", spec.key)
    return build(spec)


def _warn_unwritable(spec: KernelSpec, library: Path, error: OSError) -> None:
    warnings.warn(f"dcn_tvm: cannot write the kernel cache {library.parent} ({error}); compiling {spec.key} in "
                  f"memory, again in every process: point DCN_TVM_CACHE_DIR at a writable folder", stacklevel=2)


def _warn_untrusted(problem: str) -> None:
    warnings.warn(f"dcn_tvm: not using the kernel cache: {problem}, so another user could have planted "
                  f"libraries there; compiling kernels in memory, again in every process: point "
                  f"DCN_TVM_CACHE_DIR at a folder only you (or root) can write", stacklevel=3)


def _from_disk(spec: KernelSpec, library: Path):
    """The kernel from its verified disk entry, else compiled and stored there."""
    problem = _untrusted(library.parent)
    if problem is not None:
        _warn_untrusted(problem)
        return _compile(spec)["main"]
    try:
        kernel = _load(library)
        if kernel is not None:
            return kernel
        lock = _lock_entry(library)
    except _OpenToOthers as error:
        _warn_untrusted(str(error))
        return _compile(spec)["main"]
    except TimeoutError as error:
        warnings.warn(f"dcn_tvm: {error} (stopped, or stuck?); compiling {spec.key} in memory: resume or end that "
                      f"process, or raise DCN_TVM_LOCK_TIMEOUT", stacklevel=2)
        return _compile(spec)["main"]
    except OSError as error:
        _warn_unwritable(spec, library, error)
        return _compile(spec)["main"]
    try:
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
        kernel = _load(library)  # a loaded library takes a small part of the compiler's in-memory module
        return executable["main"] if kernel is None else kernel
    finally:
        _unlock(lock)


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


def _keep(key: str, kernel) -> None:
    """Add a kernel to the in-process cache, dropping the least recently used beyond the bound."""
    global _dropped
    if _dropped is not None and key in _dropped:
        log.warning("dcn_tvm: %s was dropped from the %d kernels this process keeps (DCN_TVM_KERNELS_IN_MEMORY) "
                    "and is needed again: raise the bound if this repeats", key, env.kernels_in_memory())
        _dropped = None
    _kernels[key] = kernel
    while len(_kernels) > env.kernels_in_memory():
        dropped, _ = _kernels.popitem(last=False)
        if _dropped is not None:
            _dropped.add(dropped)


def get_kernel(spec: KernelSpec):
    """The callable kernel for `spec`, compiling it at most once per machine."""
    key = spec.key
    kernel = _kernels.get(key)
    if kernel is not None:
        with contextlib.suppress(KeyError):  # another thread may have dropped it just now
            _kernels.move_to_end(key)
    else:
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                kernel = _resolve(spec)
                _keep(key, kernel)
    threads.follow_torch(spec.target)
    return kernel
