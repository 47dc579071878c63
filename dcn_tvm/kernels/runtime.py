"""Load compiled kernel libraries with tvm_ffi and TVM's small runtime library, not the compiler.

Kernels need TVM's runtime libraries dlopened globally first (`load_tvm_runtime`, or a prebuilt
package's verified copies through `load_runtime_verified`), once per process.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

from dcn_tvm.forksafe import ForkSafeLock

#: The runtime libraries dlopened in this process, by name.
_loaded: set[str] = set()
_lock = ForkSafeLock()


def runtime_names(cuda: bool) -> list[str]:
    """The runtime libraries kernels need: libtvm_runtime.so (thread pool, workspace symbols), and for
    CUDA kernels libtvm_runtime_cuda.so (it loads their device code)."""
    return ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if cuda else [])


def installed_runtime(cuda: bool = False) -> Path | None:
    """The lib folder of the installed TVM if it holds the runtime libraries (found without importing
    the compiler), else None."""
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return folder if all((folder / name).exists() for name in runtime_names(cuda)) else None


def load_tvm_runtime(cuda: bool = False) -> None:
    """dlopen the installed TVM's runtime libraries globally (those not loaded yet)."""
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which libtvm_runtime.so links against)

    names = runtime_names(cuda)
    with _lock:
        missing = [name for name in names if name not in _loaded]
        if not missing:
            return
        folder = installed_runtime(cuda)
        if folder is None:
            raise RuntimeError(f"{names} not found: install apache-tvm or a dcn_tvm prebuilt package")
        for name in missing:
            ctypes.CDLL(str(folder / name), mode=ctypes.RTLD_GLOBAL)
            _loaded.add(name)


def load_runtime_verified(path: Path, sha256: str) -> bool:
    """dlopen a prebuilt package's copy of a runtime library globally, from the very descriptor whose
    bytes were hashed; False (nothing loaded) if they do not have this sha256. A name already loaded
    in this process is not loaded again."""
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which libtvm_runtime.so links against)

    with _lock:
        if path.name in _loaded:
            return True
        with _verified(path, sha256) as link:
            if link is None:
                return False
            ctypes.CDLL(str(link), mode=ctypes.RTLD_GLOBAL)
        _loaded.add(path.name)
        return True


def digest(handle, size: int | None = None) -> str | None:
    """The sha256 of an open binary file, or None if `size` is given and the file has another size."""
    if size is not None and os.fstat(handle.fileno()).st_size != size:
        return None
    handle.seek(0)
    sha256 = hashlib.sha256()  # not hashlib.file_digest: Python 3.11+
    for block in iter(lambda: handle.read(1 << 20), b""):
        sha256.update(block)
    return sha256.hexdigest()


@contextlib.contextmanager
def _verified(path: Path, sha256: str, size: int | None = None):
    """A path to load the library at `path` through if its bytes have this sha256 (and size), else None:
    a link to the very descriptor that was hashed (/proc/self/fd), so a file replaced at `path` between
    the check and the load is never the one loaded. The link is named as the file (tvm_ffi picks the
    loader by the suffix), in a fresh folder (dlopen takes a name it has loaded before for that library)."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        yield None
        return
    with handle, tempfile.TemporaryDirectory(prefix="dcn_tvm_load_") as folder:
        if digest(handle, size) != sha256:
            yield None
            return
        link = Path(folder) / path.name
        link.symlink_to(f"/proc/self/fd/{handle.fileno()}")
        yield link


def load_verified(path: Path, sha256: str, size: int | None = None):
    """The module of the kernel library at `path` if its bytes have this sha256 (and size), else None;
    loaded from the descriptor that was hashed. Callers load the runtime libraries first."""
    import tvm_ffi

    with _verified(path, sha256, size) as link:
        return None if link is None else tvm_ffi.load_module(str(link))
