"""The CPU kernels run on torch's thread count: TVM's thread pool follows `torch.get_num_threads()`.

TVM's runtime keeps one thread pool per calling thread, sized once from TVM_NUM_THREADS or half the
hardware threads on x86 (it assumes hyper-threading: on 2 vCPUs without it, one thread while torch
uses two), and binds the caller to the first of those cores. Before every CPU kernel call,
`follow_torch` compares the count it configured on this thread with torch's (a thread-local read and
`torch.get_num_threads()`) and, when they differ, reconfigures the pool through the runtime's
`runtime.config_threadpool` (no compiler needed): as many workers as torch has threads, each free to
run on every CPU this process may use (so the caller is never pinned). TVM_NUM_THREADS, when set,
overrides torch's count.

Idle TVM workers sleep instead of spinning (TVM_THREAD_POOL_SPIN_COUNT=0 unless set before the first
kernel call): between two kernels torch runs its own operators on the same cores, and workers spinning
300,000 rounds each time took those cores from torch's threads (measured in docs/benchmarks.md).
"""

from __future__ import annotations

import os
import threading

import torch

_SHARE_ALL_CORES = -3  # TVM's ThreadGroup::kSpecifyThreadShareAllCore: each worker may run on every listed CPU
_configured = threading.local()  # .setting: (TVM_NUM_THREADS, torch's count) this thread's pool follows
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")  # read by TVM when a pool's workers start


def follow_torch(target: str) -> None:
    """Size this thread's TVM pool before a kernel of `target` (a target key) runs: TVM_NUM_THREADS if set,
    else torch's thread count, at most the CPUs this process may use. A no-op for GPU targets; after the
    first call, two reads unless the count changed."""
    if not target.startswith("llvm"):
        return
    setting = (os.environ.get("TVM_NUM_THREADS"), torch.get_num_threads())
    if getattr(_configured, "setting", None) == setting:
        return
    import tvm_ffi

    configure = tvm_ffi.get_global_func("runtime.config_threadpool", allow_missing=True)
    if configure is None:  # the runtime is not loaded yet: no pool to configure
        return
    cpus = [str(cpu) for cpu in sorted(os.sched_getaffinity(0))]
    count = int(setting[0]) if setting[0] else setting[1]
    configure(_SHARE_ALL_CORES, max(1, min(count, len(cpus))), cpus)
    _configured.setting = setting


def pool_size() -> int:
    """The worker count of this thread's TVM pool, as the runtime reports it."""
    import tvm_ffi

    return tvm_ffi.get_global_func("runtime.NumThreads")()
