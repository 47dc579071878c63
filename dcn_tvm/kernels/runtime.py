"""Load compiled kernel libraries with tvm_ffi and TVM's small runtime library, not the compiler."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path


@functools.cache
def load_tvm_runtime() -> None:
    """dlopen libtvm_runtime.so globally: exported kernels need its thread pool and workspace symbols."""
    spec = importlib.util.find_spec("tvm")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        candidates = [root / "lib" / "libtvm_runtime.so", root / "libtvm_runtime.so"]
    for path in candidates:
        if path.exists():
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            return
    raise RuntimeError(f"libtvm_runtime.so not found (looked in {[str(p) for p in candidates]})")


def load_function(path: Path, name: str = "main"):
    """The function `name` of the kernel library at `path`."""
    import tvm_ffi

    load_tvm_runtime()
    return tvm_ffi.load_module(str(path.resolve()))[name]
