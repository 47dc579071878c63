"""The one gateway to the TVM compiler.

Only the compile path goes through here (`dcn_tvm.kernels.build`, and the compute/ and schedules/
modules it drives); running a kernel needs `tvm_ffi` alone. The import is lazy, so importing
`dcn_tvm` or calling a cached kernel never loads the compiler.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile


class CompilerUnavailable(RuntimeError):
    """Raised when a kernel must be compiled but the TVM compiler is not installed."""


@functools.cache
def tvm():
    """The `tvm` module, imported on first use."""
    try:
        with _cache_home_without_a_home():
            import tvm as module
    except ImportError as error:
        raise CompilerUnavailable(
            "compiling a dcn_tvm kernel needs the TVM compiler: pip install 'apache-tvm==0.27.0.post1'"
        ) from error
    return module


@contextlib.contextmanager
def _cache_home_without_a_home():
    """`import tvm` asks for the home directory (tvm.contrib.pickle_memoize's cache folder, which dcn_tvm
    never uses) and raises where there is none (an arbitrary container uid with no HOME and no passwd
    entry): point XDG_CACHE_HOME at a folder name in the temporary directory for the import alone."""
    if "XDG_CACHE_HOME" in os.environ or os.path.expanduser("~") != "~":
        yield
        return
    os.environ["XDG_CACHE_HOME"] = os.path.join(tempfile.gettempdir(), f"dcn_tvm-{os.geteuid()}-unused")
    try:
        yield
    finally:
        del os.environ["XDG_CACHE_HOME"]


def submodule(name: str):
    """A TVM submodule that `import tvm` does not load, e.g. "s_tir.tensor_intrin.cuda"."""
    import importlib

    return importlib.import_module(f"{tvm().__name__}.{name}")
