"""The per-thread-block limits every dcn_tvm CUDA kernel must respect: schedules size their tiles by
them, and every CUDA build is checked against them (dcn_tvm.kernels.resources)."""

from __future__ import annotations

#: Per thread block on every CUDA GPU since sm_70. Shared memory beyond 48 KiB needs dynamic shared
#: memory and an opt-in at launch, which dcn_tvm's kernels do not use: 48 KiB is their limit.
SHARED_MEMORY_BYTES = 48 * 1024
MAX_THREADS, MAX_THREADS_Z, MAX_REGISTERS = 1024, 64, 65536
