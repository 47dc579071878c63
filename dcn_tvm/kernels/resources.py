"""CUDA launch limits (dcn_tvm.cuda_limits), checked on every CUDA build: a kernel that could not
launch is never built.

TVM compiles a kernel with any tile size; the GPU refuses it only at launch. Two checks close the gap:

- on the lowered device TIR, always: the static shared memory and the threads of each thread block;
- with ptxas, where nvcc is on PATH: the generated CUDA source assembled for the target's arch, which
  refuses what no GPU of that arch can hold and reports each kernel's registers and shared memory.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from dcn_tvm._tvm import tvm
from dcn_tvm.cuda_limits import MAX_REGISTERS, MAX_THREADS, MAX_THREADS_Z, SHARED_MEMORY_BYTES

#: What MetaSchedule's VerifyGPUCode checks while tuning (dcn_tvm.tuning.target): the same limits.
TUNING_LIMITS = {"max_shared_memory_per_block": SHARED_MEMORY_BYTES, "registers_per_block": MAX_REGISTERS,
                 "max_threads_per_block": MAX_THREADS}
#: nvcc's options as TVM compiles CUDA (tvm.support.nvcc), so ptxas allocates the registers it will.
NVCC_OPTIONS = ("-O3", "--use_fast_math", "--expt-relaxed-constexpr")
_DEVICE_KERNEL = 2  # calling_conv of a device kernel launch


class KernelResourceError(RuntimeError):
    """A CUDA kernel exceeds a per-block limit of its target, so it could never launch."""


def compile_cuda(module, target):
    """`tvm.compile` for a CUDA target, also returning the lowered device kernels (name -> PrimFunc),
    read by a pass instrument under the caller's pass context."""
    kernels = {}

    @tvm().instrument.pass_instrument
    class DeviceKernels:
        """Keeps the last lowered form of every device kernel."""

        def run_after_pass(self, mod, _info):
            for gvar, func in mod.functions.items():
                if func.attrs is not None and func.attrs.get("calling_conv") == _DEVICE_KERNEL:
                    kernels[gvar.name_hint] = func

    outer = tvm().transform.PassContext.current()
    context = tvm().transform.PassContext(outer.opt_level, outer.required_pass, outer.disabled_pass,
                                          [*outer.instruments, DeviceKernels()], outer.config)
    with context:
        executable = tvm().compile(module, target=target)
    return executable, kernels


def _kib(size: int) -> str:
    return f"{size / 1024:.1f} KiB"


def _thread_extents(stmt, extents: dict) -> dict:
    """{threadIdx tag: largest extent} of the thread bindings in `stmt` (the lowered body of a kernel)."""
    if (isinstance(stmt, tvm().tirx.stmt.AttrStmt) and stmt.attr_key == "thread_extent"
            and stmt.node.thread_tag.startswith("threadIdx")):
        tag = stmt.node.thread_tag
        extents[tag] = max(extents.get(tag, 0), _static(stmt.value, tag))
    for field in ("body", "then_case", "else_case"):
        child = getattr(stmt, field, None)
        if child is not None:
            _thread_extents(child, extents)
    for child in getattr(stmt, "seq", ()):
        _thread_extents(child, extents)
    return extents


def _static(value, tag: str) -> int:
    if not isinstance(value, tvm().tirx.IntImm):
        raise KernelResourceError(f"the {tag} extent {value} is not static, so its limit cannot be checked")
    return int(value)


def block_threads(func) -> int:
    """Threads per block of a lowered device kernel, after checking each dimension's limit."""
    extents = _thread_extents(func.body, {})
    threads = 1
    for axis, limit in (("x", MAX_THREADS), ("y", MAX_THREADS), ("z", MAX_THREADS_Z)):
        extent = extents.get(f"threadIdx.{axis}", 1)
        if extent > limit:
            raise KernelResourceError(f"{extent} threads along threadIdx.{axis}, more than the {limit} allowed")
        threads *= extent
    if threads > MAX_THREADS:
        raise KernelResourceError(f"{threads} threads per block, more than the {MAX_THREADS} allowed")
    return threads


def check_lowered(kernels: dict) -> dict[str, int]:
    """Check the shared memory and threads of lowered device kernels (name -> PrimFunc); returns
    {name: threads per block}. Raises KernelResourceError naming the first kernel over a limit."""
    threads = {}
    for name, func in kernels.items():
        allocated = tvm().s_tir.analysis.calculate_allocated_bytes(func)["main"]
        shared = sum(int(size) for scope, size in allocated.items() if scope.startswith("shared"))
        try:
            if shared > SHARED_MEMORY_BYTES:
                raise KernelResourceError(f"{_kib(shared)} of shared memory per block, more than the "
                                          f"{_kib(SHARED_MEMORY_BYTES)} a block can have without the dynamic opt-in")
            threads[name] = block_threads(func)
        except KernelResourceError as error:
            raise KernelResourceError(f"CUDA kernel {name}: {error}") from None
    return threads


_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_USAGE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REFUSED = re.compile(r"uses too much|too many resources")


def ptxas_usage(source: str, arch: str) -> dict[str, dict[str, int]]:
    """{kernel: {"registers": per thread, "shared": static bytes, "spill_stores", "spill_loads": bytes}} of a
    CUDA source as ptxas assembles it for `arch` ("sm_90"); KernelResourceError if ptxas refuses a kernel's resources, RuntimeError if
    nvcc cannot compile the source at all."""
    with tempfile.TemporaryDirectory(prefix="dcn_tvm_ptxas_") as scratch:
        path = Path(scratch) / "kernels.cu"
        path.write_text(source)
        command = ["nvcc", "-cubin", f"-arch={arch}", *NVCC_OPTIONS, "--ptxas-options=-v",
                   "-o", str(path.with_suffix(".cubin")), str(path)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        errors = "\n".join(line for line in result.stderr.splitlines() if "error" in line) or result.stderr
        if _REFUSED.search(result.stderr):
            raise KernelResourceError(f"ptxas refuses a kernel for {arch}:\n{errors}")
        raise RuntimeError(f"nvcc cannot compile the generated CUDA source for {arch}:\n{errors}")
    usage, kernel, spills = {}, None, (0, 0)
    for line in result.stderr.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            kernel, spills = entry.group(1), (0, 0)
        spilled = _SPILLS.search(line)
        if spilled:
            spills = int(spilled.group(1)), int(spilled.group(2))
        used = _USAGE.search(line)
        if used and kernel is not None:
            usage[kernel] = {"registers": int(used.group(1)), "shared": int(used.group(2) or 0),
                             "spill_stores": spills[0], "spill_loads": spills[1]}
    return usage


def check_assembled(source: str, arch: str, threads: dict[str, int]) -> dict[str, dict[str, int]]:
    """Check the kernels of a CUDA source with ptxas against the per-block limits (`threads` from
    check_lowered); returns ptxas_usage. A no-op returning {} where nvcc is not on PATH."""
    if shutil.which("nvcc") is None:
        return {}
    usage = ptxas_usage(source, arch)
    for name, used in usage.items():
        registers = used["registers"] * threads[name]
        if used["shared"] > SHARED_MEMORY_BYTES:
            raise KernelResourceError(f"CUDA kernel {name}: ptxas allocates {_kib(used['shared'])} of shared "
                                      f"memory, more than {_kib(SHARED_MEMORY_BYTES)}")
        if registers > MAX_REGISTERS:
            raise KernelResourceError(f"CUDA kernel {name}: {used['registers']} registers x {threads[name]} threads "
                                      f"= {registers} registers per block, more than {MAX_REGISTERS}")
    return usage


def check(kernels: dict, source: str, arch: str) -> None:
    """Both checks on one CUDA build: its lowered device kernels (name -> PrimFunc, from compile_cuda)
    and its CUDA source for `arch`. Raises KernelResourceError naming the first kernel over a limit."""
    if not kernels:
        raise RuntimeError("no lowered device kernel was seen, so the CUDA limits cannot be checked")
    check_assembled(source, arch, check_lowered(kernels))
