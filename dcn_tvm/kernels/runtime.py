"""Load compiled kernel libraries with tvm_ffi and TVM's small runtime library, not the compiler."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path


@functools.cache
def load_tvm_runtime(fallback: Path | None = None, cuda: bool = False) -> None:
    """dlopen libtvm_runtime.so globally: exported kernels need its thread pool and workspace symbols;
    with `cuda`, also libtvm_runtime_cuda.so, which loads the kernels' device code.

    TVM's own copies are preferred where TVM is installed; otherwise `fallback` (a prebuilt
    package's runtime folder).
    """
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


def load_function(path: Path, name: str = "main"):
    """The function `name` of the kernel library at `path`."""
    import tvm_ffi

    load_tvm_runtime()
    return tvm_ffi.load_module(str(path.resolve()))[name]
