"""Scratch tensors of the backward ops: the intermediates between their kernels, reused call after call.

A backward's column gradient is large (N x C x KH x KW x P accumulators: 36 MiB for a 8x128x32x32
layer, 75 MiB for 2x256x64x64) and lives only inside the op. On the CPU a fresh allocation of that
size is a fresh mmap whose pages the kernel faults in one by one: measured on a 2-core AMD EPYC, 21 ms
to allocate and fill 36 MiB against 1.6 ms to fill it again. So each thread keeps one buffer per name,
grown to the largest size asked for, and hands out views of it. On CUDA torch's caching allocator
already reuses memory: there a scratch tensor is a plain allocation.

A view is valid until the same thread asks for the same name again: callers use it within one op
call and never return it.
"""

from __future__ import annotations

import math
import threading

import torch

_buffers = threading.local()


def scratch(name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape` for the intermediate `name` of the calling op."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    held = getattr(_buffers, "held", None)
    if held is None:
        held = _buffers.held = {}
    numel = math.prod(shape)
    buffer = held.get((name, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = held[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)
