"""Kernel resolution: in-process cache -> prebuilt packages -> on-disk cache -> compile (then store
on disk) -> an error naming the spec and the commands that would provide it.

Disk entries are written atomically (export to a temporary file in the same folder, then rename)
under an exclusive file lock, so several processes asking for the same spec compile it once and
never see a half-written library.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from dcn_tvm import env
from dcn_tvm._tvm import CompilerUnavailable
from dcn_tvm.kernels.runtime import load_function
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_kind
from dcn_tvm.prebuilt import loader as prebuilt

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
    digest = hashlib.sha256()
    for package in ("dcn_tvm.compute", "dcn_tvm.schedules"):
        folder = Path(next(iter(importlib.util.find_spec(package).submodule_search_locations)))
        for source in sorted(folder.glob("*.py")):
            digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()[:12]


def cache_path(spec: KernelSpec) -> Path:
    """Where the compiled library of `spec` lives on disk; the path carries the versions, the target
    and which schedule it was compiled with (default, or a tuned record), so tuning invalidates it."""
    from dcn_tvm.tuning.records import schedule_tag

    versions = f"dcn_tvm-{_version('dcn_tvm')}_tvm-{_version('apache-tvm')}_{_code_fingerprint()}"
    return env.cache_dir() / versions / spec.target / f"{spec.key}_{schedule_tag(spec)}.so"


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(spec: KernelSpec):
    from dcn_tvm.kernels.build import build

    log.info("dcn_tvm: compiling %s", spec.key)
    return build(spec)


def _compile_to_disk(spec: KernelSpec, path: Path):
    executable = _compile(spec)
    fd, temporary = tempfile.mkstemp(prefix=path.stem, suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    try:
        executable.export_library(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return load_function(path)


class KernelUnavailable(RuntimeError):
    """No prebuilt package or cache has the kernel, and the TVM compiler is not installed."""


def _unavailable(spec: KernelSpec) -> KernelUnavailable:
    from dcn_tvm.tuning.workloads import of_spec

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
        path = cache_path(spec)
        if path.exists():
            return load_function(path)
        with _file_lock(path):
            if path.exists():  # another process compiled it while we waited
                return load_function(path)
            return _compile_to_disk(spec, path)
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
    return kernel
