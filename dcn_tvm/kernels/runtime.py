"""Load compiled kernel libraries with tvm_ffi and TVM's small runtime library, not the compiler."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path


@functools.cache
def load_tvm_runtime(fallback: Path | None = None, cuda: bool = False) -> None:
    """dlopen libtvm_runtime.so globally: exported kernels need its thread pool and workspace symbols;
    with `cuda`, also libtvm_runtime_cuda.so, which loads the kernels' device code.

    TVM's own copies are preferred where TVM is installed; otherwise `fallback` (a prebuilt
    package's runtime folder).
    """
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which libtvm_runtime.so links against)

    spec = importlib.util.find_spec("tvm")
    folders = []
    if spec is not None and spec.submodule_search_locations:
        folders.append(Path(next(iter(spec.submodule_search_locations))) / "lib")
    if fallback is not None:
        folders.append(fallback)
    names = ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if cuda else [])
    for folder in folders:
        if all((folder / name).exists() for name in names):
            for name in names:
                ctypes.CDLL(str(folder / name), mode=ctypes.RTLD_GLOBAL)
            return
    raise RuntimeError(f"{names} not found in {[str(f) for f in folders]}: install apache-tvm or a "
                       f"dcn_tvm prebuilt package")


def digest(handle, size: int | None = None) -> str | None:
    """The sha256 of an open binary file, or None if `size` is given and the file has another size."""
    if size is not None and os.fstat(handle.fileno()).st_size != size:
        return None
    handle.seek(0)
    return hashlib.file_digest(handle, "sha256").hexdigest()


def load_verified(path: Path, sha256: str, size: int | None = None):
    """The module of the kernel library at `path` if its bytes have this sha256 (and size), else None.

    The library is dlopened through /proc/self/fd from the very file descriptor that was hashed, so
    a file replaced at `path` between the check and the load is never the one loaded. Callers load
    libtvm_runtime.so first (`load_tvm_runtime`).
    """
    import tvm_ffi

    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return None
    with handle, tempfile.TemporaryDirectory(prefix="dcn_tvm_load_") as folder:
        if digest(handle, size) != sha256:
            return None
        link = Path(folder) / path.name  # tvm_ffi picks the loader by the name's suffix
        link.symlink_to(f"/proc/self/fd/{handle.fileno()}")
        return tvm_ffi.load_module(str(link))
