"""Scratch tensors of the backward ops: the intermediates between their kernels, reused call after call.

A backward's column gradient is large (N x C x KH x KW x P accumulators: 36 MiB for a 8x128x32x32
layer, 75 MiB for 2x256x64x64) and lives only inside the op. On the CPU a fresh allocation of that
size is a fresh mmap whose pages the kernel faults in one by one: measured on a 2-core AMD EPYC, 21 ms
to allocate and fill 36 MiB against 1.6 ms to fill it again. So each thread keeps one buffer per name,
grown to the largest size asked for, and hands out views of it. On CUDA torch's caching allocator
already reuses memory: there a scratch tensor is a plain allocation.

What a thread keeps is bounded by DCN_TVM_SCRATCH_MIB (dcn_tvm.env; 0 keeps nothing): a request that
would take its buffers past the bound is a plain allocation. `release_scratch` frees every thread's
buffers (dcn_tvm.release_scratch). Buffers are allocated outside inference mode, so that a backward
run under torch.inference_mode() leaves them usable by ordinary ones.

A view is valid until the same thread asks for the same name again: callers use it within one op
call and never return it.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch

from dcn_tvm import env
from dcn_tvm.forksafe import ForkSafeLock


class _Buffers:
    """One thread's buffers."""

    def __init__(self):
        self.by_key: dict[tuple[str, torch.dtype], torch.Tensor] = {}


_local = threading.local()
_every_thread = weakref.WeakSet()  # each live thread's _Buffers (a thread's end frees its own)
_lock = ForkSafeLock()


def _thread_buffers() -> dict[tuple[str, torch.dtype], torch.Tensor]:
    """The calling thread's buffers, by (name, dtype)."""
    held = getattr(_local, "held", None)
    if held is None:
        held = _local.held = _Buffers()
        with _lock:
            _every_thread.add(held)
    return held.by_key


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def scratch(name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape` for the intermediate `name` of the calling op."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    held, key, numel = _thread_buffers(), (name, dtype), math.prod(shape)
    buffer = held.get(key)
    if buffer is None or buffer.numel() < numel:
        with _lock:  # against release_scratch emptying `held` meanwhile
            others = sum(_nbytes(b) for k, b in held.items() if k != key)
            if others + numel * dtype.itemsize > env.scratch_limit_bytes():
                return torch.empty(shape, dtype=dtype)
            with torch.inference_mode(False):
                buffer = held[key] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def held_buffers() -> list[torch.Tensor]:
    """The buffers the calling thread keeps (1-D tensors)."""
    return list(_thread_buffers().values())


def release_scratch() -> int:
    """Free the scratch buffers of every thread (views still in use stay valid until dropped), e.g. after
    a large one-off backward; later backward calls allocate again. Returns the bytes released."""
    with _lock:
        released = sum(_nbytes(b) for held in _every_thread for b in held.by_key.values())
        for held in _every_thread:
            held.by_key.clear()
    return released
