"""A simulated GPU for the tests: dcn_tvm's CUDA-scheduled kernels, run on an OpenCL CPU device (PoCL).

A kernel is lowered exactly as a CUDA build lowers it (`{"kind": "cuda", "arch": "sm_90"}`, TVM's default
TIR pipeline), so thread binding, barriers, shared and local scopes, storage reuse and tail predicates are
the ones a GPU would run. After the host/device split:

- the device kernels are finalised for OpenCL instead of CUDA (only intrinsic names differ), printed by
  TVM's OpenCL codegen and built by PoCL; `T.cuda.atomic_add` is lowered to a compare-and-swap loop
  (32- or 64-bit, so float64 adds stay atomic);
- the host function, taken just before MakePackedAPI, is interpreted: it binds the arguments' shapes,
  allocates its intermediate buffers and launches the kernels with its grid and block sizes and its
  argument order.

Teeth: every buffer the host allocates, every output argument and every shared or local array starts as
NaN (floats) or -1 (ints), and every global buffer sits between guard bytes that are checked after each
launch; a kernel over sm_90's limits (1024 threads, 48 KiB static shared memory per block) is refused.
PoCL runs the work-items of a group one after the other between barriers, so a missing barrier makes a
work-item read a NaN another one had not yet replaced (loop bounds are made opaque to PoCL, whose
implicit loop barriers would otherwise hide it). `Mutation` drops barriers or makes the atomic adds
plain, to show that the tests notice.

Tensor cores: the WMMA fragment operations (`tvm_fill_fragment`, `tvm_load_matrix_sync`, `tvm_mma_sync`,
`tvm_store_matrix_sync`) have no OpenCL form. A fragment becomes per-warp storage in shared (__local)
memory, NaN-poisoned like every array, holding each 16 x 16 fragment row-major; each operation is done
by the warp's 32 lanes cooperatively (lane l handles elements l, l + 32, ...), between barriers (all warps
of a block reach the same call sites, as the tensor-core schedules guarantee). A warp is 32 consecutive
work-items of the flattened local id, as on the GPU. `Mutation` can load the fragments transposed or
with a wrong leading dimension.

TF32 tensor cores (schedules/mma_tf32.py): the accumulators are "warp" buffers, which LowerWarpMemory turns
into each lane's registers with warps of 32 as for sm_90. A PTX `mma.sync.m16n8k8` tf32 is emulated per warp:
between barriers the lanes write their A and B registers to per-warp __local scratch at the positions the
PTX fragment layout gives them, then each lane computes its four accumulators from the operands truncated to
TF32 (the hardware ignores their 13 low mantissa bits). `Mutation` can assume another A layout, or drop the
kernels' own rounding to TF32 (the MMA then truncates).

Half types: float16 and bfloat16 are stored as float32 (PoCL has no fp16, TVM's OpenCL codegen no
bfloat16): their arguments travel as float32, and every conversion to them in a kernel rounds to the
nearest float16 (`vstore_half_rte`) or bfloat16 (round to nearest even on the top 16 bits, as CUDA's
`__float2bfloat16`), so the arithmetic is theirs. The sm_90 pipeline keeps bfloat16 native (CUDA's
`nv_bfloat16`; TVM's BF16 legalize passes, which would store it as uint16, leave CUDA alone), so a
bfloat16 kernel is lowered with float16 as a stand-in for its one 16-bit type (the same spec built in
float16 where that prints as its TVMScript renamed, else its TVMScript renamed, checked to round-trip
exactly) and printed as float16 is, with bfloat16's rounding. TVM may give a float16 intermediate the
storage of a float32 one (twice the elements in the same bytes): a host buffer with a float16 view is
allocated twice its bytes.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from dataclasses import dataclass, replace

import numpy as np
import pyopencl as cl
import torch
import tvm
import tvm_ffi
from tvm import tirx
from tvm.tirx.build import split_host_device_mods

from dcn_tvm.kernels.build import prim_func, scheduled
from dcn_tvm.kernels.resources import block_threads
from dcn_tvm.kernels.spec import KernelSpec

TARGET = {"kind": "cuda", "arch": "sm_90"}
MAX_THREADS = 1024
MAX_STATIC_SHARED_BYTES = 48 * 1024
MAX_GRID = {"x": 2**31 - 1, "y": 65535, "z": 65535}
#: Guard bytes on either side of every global buffer (a multiple of PoCL's 128-byte base alignment).
GUARD = 1024
#: NaN as float32 and float64, -2049 as int32: an out-of-bounds read yields NaN or a wild index.
GUARD_PATTERN = b"\xff\xf7\xff\xff"
#: Poison of unwritten memory: NaN as float32/float64, -1 as int32.
POISON = 0xFF

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32)
#: Stored as float32 on the device.
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Mutation:
    """Deliberate bugs, to check that the tests catch them: drop every barrier, drop the n-th barrier of
    the device code (in source order), make the atomic adds plain read-modify-writes, load fragments
    transposed (a TF32 MMA: A's registers in another order) or with another leading dimension, or drop
    the rounding of TF32 operands."""

    drop_barriers: bool = False
    drop_barrier: int | None = None
    plain_adds: bool = False
    transposed_fragments: bool = False
    fragment_stride: int | None = None
    unrounded_tf32: bool = False


_mutation = contextvars.ContextVar("gpusim_mutation", default=Mutation())


@contextlib.contextmanager
def mutated(**bugs):
    """Kernels built inside this context carry the given `Mutation`."""
    token = _mutation.set(Mutation(**bugs))
    try:
        yield
    finally:
        _mutation.reset(token)


# ---------------------------------------------------------------------------------------------- lowering

def _lower_atomic_add(call):
    """OpenCL lowering of `T.cuda.atomic_add(address, value)`: a call to one of the helpers in _PRELUDE."""
    dtype = call.args[1].ty.dtype
    name = ("gpusim_plain_add_f" if _mutation.get().plain_adds else "gpusim_atomic_add_f") + str(dtype.bits)
    return tirx.call_extern(str(dtype), name, *call.args)


tirx.op.register_intrin_lowering("tirx.cuda.atomic_add", "opencl", f=_lower_atomic_add, level=99)

#: The 16 x 16 x 16 fragment shape, the one the emulation knows.
FRAGMENT_SHAPE = (16, 16, 16)


def _fragment_shape(call, first: int):
    shape = tuple(int(a.value) for a in call.args[first:first + 3])
    if shape != FRAGMENT_SHAPE:
        raise NotImplementedError(f"{call.op.name} on {shape} fragments")


def _lower_matrix_sync(name):
    """`tvm_load_matrix_sync` / `tvm_store_matrix_sync(fragment, m, n, k, index, pointer, stride,
    layout)` as `gpusim_wmma_load/store(fragment, index, pointer, stride, transposed)`."""

    def lower_call(call):
        _fragment_shape(call, 1)
        fragment, index, pointer, stride, layout = call.args[0], call.args[4], call.args[5], call.args[6], call.args[7]
        if layout.value != "row_major":
            raise NotImplementedError(f"{call.op.name} with layout {layout.value}")
        mutation = _mutation.get()
        if mutation.fragment_stride is not None and name == "load":
            stride = tirx.const(mutation.fragment_stride, "int32")
        transposed = int(mutation.transposed_fragments and name == "load")
        return tirx.call_extern("int32", f"gpusim_wmma_{name}", fragment, index, pointer, stride, transposed)

    return lower_call


def _lower_fill(call):
    _fragment_shape(call, 1)
    return tirx.call_extern("int32", "gpusim_wmma_fill", call.args[0], call.args[4], call.args[5])


def _lower_mma(call):
    return tirx.call_extern("int32", "gpusim_wmma_mma", *call.args)


def _lower_ptx_mma(call):
    """`ptx_legacy.mma(shape, layouts, dtypes, a, a_offset, b, b_offset, c, c_offset, saturate)`: only
    m16n8k8 row.col tf32 x tf32 + f32, as `gpusim_mma_tf32(a, b, c, swapped)` on the lane's registers."""
    shape, layouts, dtypes = call.args[0].value, [a.value for a in call.args[1:3]], [a.value for a in call.args[3:6]]
    if (shape, layouts, dtypes) != ("m16n8k8", ["row", "col"], ["tf32", "tf32", "fp32"]):
        raise NotImplementedError(f"ptx mma {shape} {layouts} {dtypes}")
    a, a_offset, b, b_offset, c, c_offset = call.args[6:12]
    swapped = int(_mutation.get().transposed_fragments)
    return tirx.call_extern("int32", "gpusim_mma_tf32", a, a_offset, b, b_offset, c, c_offset, swapped)


def _lower_mma_fill(call):
    size, pointer, offset = call.args
    return tirx.call_extern("int32", "gpusim_mma_fill", size, pointer, offset)


def _lower_mma_store(call):
    """`mma_store_legacy(16, 16, destination, accumulator, offset, stride)`: the lane's 8 registers."""
    if (int(call.args[0].value), int(call.args[1].value)) != (16, 16):
        raise NotImplementedError(f"mma_store of {call.args[0]} x {call.args[1]}")
    return tirx.call_extern("int32", "gpusim_mma_store", *call.args[2:])


for _op, _lowering in (("ptx_legacy.mma", _lower_ptx_mma), ("mma_fill_legacy", _lower_mma_fill),
                       ("mma_store_legacy", _lower_mma_store),
                       ("tvm_load_matrix_sync", _lower_matrix_sync("load")),
                       ("tvm_store_matrix_sync", _lower_matrix_sync("store")),
                       ("tvm_fill_fragment", _lower_fill), ("tvm_mma_sync", _lower_mma)):
    tirx.op.register_intrin_lowering(f"tirx.{_op}", "opencl", f=_lowering, level=99)

_PRELUDE = """\
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#pragma OPENCL EXTENSION cl_khr_int64_base_atomics : enable
inline float gpusim_atomic_add_f32(volatile __global float* address, float value) {
  volatile __global int* bits = (volatile __global int*)address;
  int expected, seen = *bits;
  do {
    expected = seen;
    seen = atomic_cmpxchg(bits, expected, as_int(as_float(expected) + value));
  } while (seen != expected);
  return as_float(seen);
}
inline double gpusim_atomic_add_f64(volatile __global double* address, double value) {
  volatile __global long* bits = (volatile __global long*)address;
  long expected, seen = *bits;
  do {
    expected = seen;
    seen = atom_cmpxchg(bits, expected, as_long(as_double(expected) + value));
  } while (seen != expected);
  return as_double(seen);
}
inline float gpusim_plain_add_f32(__global float* address, float value) {
  float old = *address; *address = old + value; return old;
}
inline double gpusim_plain_add_f64(__global double* address, double value) {
  double old = *address; *address = old + value; return old;
}
inline float gpusim_round_half(float value) {
  ushort bits;
  vstore_half_rte(value, 0, (half*)&bits);
  return vload_half(0, (const half*)&bits);
}
inline float gpusim_round_bfloat16(float value) {
  uint bits = as_uint(value);
  return isnan(value) ? value : as_float((bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u);
}
#define GPUSIM_FLAT_ID ((int)(get_local_id(0) + get_local_size(0) * (get_local_id(1) + get_local_size(1) \
                                                                     * get_local_id(2))))
#define GPUSIM_WARP (GPUSIM_FLAT_ID / 32)
#define GPUSIM_LANE_ELEMENTS(e) for (int e = GPUSIM_FLAT_ID % 32; e < 256; e += 32)
#define GPUSIM_AT(e, stride, transposed) ((transposed) ? (e) % 16 * (stride) + (e) / 16 : (e) / 16 * (stride) + (e) % 16)
#define gpusim_wmma_fill(fragment, index, value) do { barrier(CLK_LOCAL_MEM_FENCE); \
  GPUSIM_LANE_ELEMENTS(e) (fragment)[(index) * 256 + e] = (value); barrier(CLK_LOCAL_MEM_FENCE); } while (0)
#define gpusim_wmma_load(fragment, index, pointer, stride, transposed) do { barrier(CLK_LOCAL_MEM_FENCE); \
  GPUSIM_LANE_ELEMENTS(e) (fragment)[(index) * 256 + e] = (pointer)[GPUSIM_AT(e, stride, transposed)]; \
  barrier(CLK_LOCAL_MEM_FENCE); } while (0)
#define gpusim_wmma_store(fragment, index, pointer, stride, transposed) do { barrier(CLK_LOCAL_MEM_FENCE); \
  GPUSIM_LANE_ELEMENTS(e) (pointer)[GPUSIM_AT(e, stride, transposed)] = (fragment)[(index) * 256 + e]; \
  barrier(CLK_LOCAL_MEM_FENCE); } while (0)
#define gpusim_wmma_mma(d, di, a, ai, b, bi, c, ci) do { barrier(CLK_LOCAL_MEM_FENCE); \
  GPUSIM_LANE_ELEMENTS(e) { \
    float sum = (c)[(ci) * 256 + e]; \
    for (int k = 0; k < 16; ++k) sum += (a)[(ai) * 256 + e / 16 * 16 + k] * (b)[(bi) * 256 + k * 16 + e % 16]; \
    (d)[(di) * 256 + e] = sum; \
  } barrier(CLK_LOCAL_MEM_FENCE); } while (0)
#define GPUSIM_LANE (GPUSIM_FLAT_ID % 32)
#define GPUSIM_TF32_BITS(x) as_float(as_uint(x) & 0xFFFFE000u)
#define gpusim_mma_fill(size, c, ci) do { for (int r = 0; r < (size); ++r) (c)[(ci) + r] = 0.0f; } while (0)
#define gpusim_mma_store(pointer, c, ci, stride) do { for (int r = 0; r < 8; ++r) \
  (pointer)[(GPUSIM_LANE / 4 + 8 * (r % 4 / 2)) * (stride) + 8 * (r / 4) + 2 * (GPUSIM_LANE % 4) + r % 2] \
    = (c)[(ci) + r]; } while (0)
#define gpusim_mma_tf32(a, ai, b, bi, c, ci, swapped) do { \
  __local float* gpusim_a = gpusim_fragment_mma + GPUSIM_WARP * 192; \
  __local float* gpusim_b = gpusim_a + 128; \
  int g = GPUSIM_LANE / 4, t = GPUSIM_LANE % 4; \
  barrier(CLK_LOCAL_MEM_FENCE); \
  for (int r = 0; r < 4; ++r) \
    gpusim_a[((swapped) ? g + 8 * (r / 2) : g + 8 * (r % 2)) * 8 + ((swapped) ? t + 4 * (r % 2) : t + 4 * (r / 2))] \
      = (a)[(ai) + r]; \
  for (int r = 0; r < 2; ++r) gpusim_b[(t + 4 * r) * 8 + g] = (b)[(bi) + r]; \
  barrier(CLK_LOCAL_MEM_FENCE); \
  for (int r = 0; r < 4; ++r) { \
    int i = g + 8 * (r / 2), j = 2 * t + r % 2; \
    float sum = (c)[(ci) + r]; \
    for (int k = 0; k < 8; ++k) sum += GPUSIM_TF32_BITS(gpusim_a[i * 8 + k]) * GPUSIM_TF32_BITS(gpusim_b[k * 8 + j]); \
    (c)[(ci) + r] = sum; \
  } \
  barrier(CLK_LOCAL_MEM_FENCE); } while (0)
"""
#: Scratch of the emulated TF32 MMAs: per warp, A [16, 8] and B [8, 8] (as the fragments' registers say).
_MMA_SCRATCH = 192


def lower(func):
    """(host PrimFunc before MakePackedAPI, finalised device IRModule) of a scheduled PrimFunc, through
    the default pipeline for sm_90, as `dcn_tvm.kernels.build.compile_functions` compiles it."""
    target = tvm.target.Target(TARGET)
    module = tvm.IRModule({tvm.ir.GlobalVar("main"): func.with_attr("global_symbol", "main")})
    seen = {}

    @tvm.instrument.pass_instrument
    class _BeforePackedAPI:
        def run_before_pass(self, mod, info):
            if info.name == "tirx.MakePackedAPI":
                seen["host"] = mod["main"]

    pipeline, _, finalize_device = tvm.tirx.get_tir_pipeline("default")
    with tvm.transform.PassContext(instruments=[_BeforePackedAPI()]), target:
        bound = tvm.tirx.transform.BindTarget(target.with_host(tvm.target.Target("llvm")))(module)
        lowered = pipeline(bound)
    _, devices = split_host_device_mods(lowered)
    if len(devices) != 1:
        raise RuntimeError(f"expected one device module, got {len(devices)}: a stage is not bound to threads")
    (device,) = devices.values()
    # Warps of 32, as CUDA's: LowerWarpMemory gives a "warp" buffer's lane its registers, as for sm_90.
    opencl = tvm.target.Target({"kind": "opencl", "thread_warp_size": 32})
    device = tvm.tirx.transform.Apply(lambda f: f.with_attr("target", opencl))(device)
    with opencl:
        device = finalize_device()(device)
    return seen["host"], device


_LOCAL_ARRAY = re.compile(r"^  (__local )?(float|double|int|half) (\w+)\[(\d+)\];$", re.M)
_SIZES = {"float": 4, "double": 8, "int": 4, "half": 2}
_FILL = {"float": "NAN", "double": "NAN", "int": "-1"}
#: Prefix of the emulated fragments' per-block arrays (registers on a GPU: not shared memory there).
_FRAGMENTS = "gpusim_fragment_"
_FRAGMENT_CALL = re.compile(r"gpusim_wmma_(?:fill|load|store)\((\w+),|gpusim_wmma_mma\((\w+), [^,]+, (\w+), [^,]+, (\w+),")
#: The codegen's float16 preamble: enable cl_khr_fp16 or cl_amd_fp16, else #error.
_HALF_PRAGMA = re.compile(r"^#ifdef cl_khr_fp16\n(?:(?!#endif).*\n)*#endif\n", re.M)


def _split_kernels(source: str) -> list[str]:
    """The source in chunks, each starting at a kernel definition (the first chunk: what precedes)."""
    return re.split(r"(?=^__kernel void \w+\([^;]*\) \{$)", source, flags=re.M)


def _emulate_fragments(source: str, threads: dict[str, int]) -> str:
    """Turn each kernel's fragment arrays (what the wmma calls name; private arrays of one fragment
    set as printed) into per-warp slices of one __local array (`threads`: per kernel, for the warps)."""
    out = []
    for text in _split_kernels(source):
        names = {name for match in _FRAGMENT_CALL.finditer(text) for name in match.groups() if name}
        kernel = re.match(r"__kernel void (\w+)\(", text)
        if names:
            if threads[kernel.group(1)] % 32:
                raise NotImplementedError(f"{kernel.group(1)}: {threads[kernel.group(1)]} threads, not whole warps")
            warps = threads[kernel.group(1)] // 32

            def per_warp(match):
                if match.group(3) not in names:
                    return match.group(0)
                name, size = match.group(3), int(match.group(4))
                return (f"  __local float {_FRAGMENTS}{name}[{size * warps}];\n"
                        f"  __local float* {name} = {_FRAGMENTS}{name} + GPUSIM_WARP * {size};")

            text = _LOCAL_ARRAY.sub(per_warp, text)
        out.append(text)
    return "".join(out)


def _emulate_mma(source: str, threads: dict[str, int]) -> str:
    """Give each kernel that calls gpusim_mma_tf32 its per-warp scratch (`_MMA_SCRATCH` floats a warp)."""
    out = []
    for text in _split_kernels(source):
        kernel = re.match(r"__kernel void (\w+)\([^;]*\) \{\n", text)
        if kernel and "gpusim_mma_tf32(" in text:
            if threads[kernel.group(1)] % 32:
                raise NotImplementedError(f"{kernel.group(1)}: {threads[kernel.group(1)]} threads, not whole warps")
            scratch = f"  __local float {_FRAGMENTS}mma[{threads[kernel.group(1)] // 32 * _MMA_SCRATCH}];\n"
            text = text[:kernel.end()] + scratch + text[kernel.end():]
        out.append(text)
    return "".join(out)


def _half_as_float(source: str, rounding: str) -> str:
    """float16 stored as float32, every conversion to float16 rounded by the function `rounding`."""
    source = _HALF_PRAGMA.sub("", source).replace("convert_half(", f"{rounding}(")
    if re.search(r"\bhalf\d", source):
        raise NotImplementedError("float16 vectors in the device code")
    return re.sub(r"\bhalf\b", "float", source)


def _poison_arrays(source: str, synchronised: bool) -> str:
    """Fill every kernel-scope shared (__local) and local array with NaN / -1 before the kernel runs.

    `synchronised`: the work-group shares the shared fill and then meets at a barrier. Without it (the
    kernels' own barriers dropped) every work-item fills all of the shared arrays and the kernel keeps
    no barrier at all: PoCL then runs each work-item from start to end in turn (it adds implicit loop
    barriers only to kernels that have barriers), so a work-item reads NaN where another one had to
    write first.
    """
    out = []
    for text in _split_kernels(source):
        arrays = list(_LOCAL_ARRAY.finditer(text))
        if not arrays:
            out.append(text)
            continue
        fills = []
        for match in arrays:
            shared, kind, name, size = match.group(1), match.group(2), match.group(3), int(match.group(4))
            start, step = ("get_local_id(0)", "get_local_size(0)") if shared and synchronised else ("0", "1")
            fills.append(f"  for (int gpusim_i = {start}; gpusim_i < {size}; gpusim_i += {step}) "
                         f"{name}[gpusim_i] = {_FILL[kind]};")
        if synchronised and any(m.group(1) for m in arrays):
            fills.append("  barrier(CLK_LOCAL_MEM_FENCE);")
        end = arrays[-1].end()
        out.append(text[:end] + "\n" + "\n".join(fills) + text[end:])
    return "".join(out)


def _shared_bytes(source: str) -> dict[str, int]:
    """Static shared memory per kernel, from the printed __local arrays (the codegen repeats every
    kernel's prototype before each definition: a kernel's figure is the largest over its chunks)."""
    usage: dict[str, int] = {}
    for text in re.split(r"(?=^__kernel void )", source, flags=re.M):
        name = re.match(r"__kernel void (\w+)\(", text)
        if name:
            used = sum(_SIZES[m.group(2)] * int(m.group(4)) for m in _LOCAL_ARRAY.finditer(text)
                       if m.group(1) and not m.group(3).startswith(_FRAGMENTS))
            usage[name.group(1)] = max(used, usage.get(name.group(1), 0))
    return usage


#: The TF32 rounding of schedules.mma_tf32 as printed (`+ (uint)4096)`, half of the 13 dropped bits).
_TF32_ROUNDING = re.compile(r"(\+ )\(uint\)4096\)")
_BARRIER = re.compile(r"^\s*barrier\(CLK_LOCAL_MEM_FENCE\);\n", re.M)
_COUNTED_LOOP = re.compile(r"for \(int (\w+) = 0; \1 < ([^;]+); \+\+\1\)")


def _opaque_trip_counts(source: str) -> str:
    """Add a zero PoCL cannot prove uniform (`get_local_id(0) >> 30`) to every loop bound. PoCL puts an
    implicit barrier around every uniform innermost loop of a kernel that has barriers (to vectorise
    across work-items), which would make a missing barrier before or after such a loop harmless."""
    return _COUNTED_LOOP.sub(lambda m: f"for (int {m[1]} = 0; {m[1]} < ({m[2]}) + (((int)get_local_id(0)) >> 30); "
                                       f"++{m[1]})", source)


def bfloat16_as_float16(func, float16_twin=None):
    """(`func` with bfloat16 renamed float16, True), or (`func`, False) without bfloat16. A kernel has
    one 16-bit float type, so float16 is free to stand in for bfloat16 (see the module docstring).
    `float16_twin()`, where given, builds the kernel for float16: it is taken if its TVMScript is `func`'s
    with the type renamed, which needs no parse (TVM 0.27 does not read some symbolic kernels back exactly)."""
    text = func.script()
    if not re.search(r"\bbfloat16\b", text):
        return func, False
    if re.search(r"\bfloat16\b", text):
        raise NotImplementedError("a kernel with both float16 and bfloat16")
    renamed = re.sub(r"\bbfloat16\b", "float16", text)
    if float16_twin is not None:
        twin = float16_twin()
        if twin.script() == renamed:
            return twin, True
    if not tvm_ffi.structural_equal(tvm.script.from_source(text), func):
        raise NotImplementedError("the kernel does not round-trip through TVMScript")
    return tvm.script.from_source(renamed), True


def printed_source(device) -> str:
    """The OpenCL C of the device kernels as TVM's codegen prints it."""
    return tvm.get_global_func("target.build.opencl")(device, tvm.target.Target({"kind": "opencl"})).inspect_source()


def opencl_source(device, bfloat16: bool = False) -> str:
    """The OpenCL C of the device kernels, with the atomics' and fragments' helpers, float16 as
    float32 (rounded as bfloat16 where it stands in for bfloat16), poisoned arrays and the mutation."""
    threads = {gv.name_hint: block_threads(func) for gv, func in device.functions.items()}
    rounding = "gpusim_round_bfloat16" if bfloat16 else "gpusim_round_half"
    source = _half_as_float(_emulate_mma(_emulate_fragments(printed_source(device), threads), threads), rounding)
    mutation = _mutation.get()
    if mutation.unrounded_tf32:
        rounded = _TF32_ROUNDING.subn(r"\1(uint)0)", source)
        if "gpusim_mma_tf32(" in source and not rounded[1]:
            raise ValueError("the TF32 kernels round nothing")
        source = rounded[0]
    barriers = list(_BARRIER.finditer(source))
    if (mutation.drop_barriers or mutation.drop_barrier is not None) and not barriers:
        raise ValueError("the kernels have no barrier to drop")
    if mutation.drop_barriers:
        source = _BARRIER.sub("", source)
    elif mutation.drop_barrier is not None:
        dropped = barriers[mutation.drop_barrier]
        source = source[:dropped.start()] + source[dropped.end():]
    source = _poison_arrays(_opaque_trip_counts(source), synchronised=not mutation.drop_barriers)
    return _PRELUDE + source


# ------------------------------------------------------------------------------------ host interpreter

_BINARY = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
    "FloorDiv": lambda a, b: a // b, "FloorMod": lambda a, b: a % b,
    "Div": lambda a, b: int(a / b) if isinstance(a, int) else a / b,
    "Mod": lambda a, b: int(math.fmod(a, b)), "Min": min, "Max": max,
    "EQ": lambda a, b: a == b, "NE": lambda a, b: a != b, "LT": lambda a, b: a < b,
    "LE": lambda a, b: a <= b, "GT": lambda a, b: a > b, "GE": lambda a, b: a >= b,
    "And": lambda a, b: a and b, "Or": lambda a, b: a or b,
}


def evaluate(expr, scope: dict):
    """Value of a host scalar expression; `scope` maps a Var's hash to its value."""
    kind = type(expr).__name__
    if kind in ("IntImm", "FloatImm"):
        return expr.value
    if kind == "Var":
        if hash(expr) not in scope:
            raise NotImplementedError(f"host variable {expr} is not bound")
        return scope[hash(expr)]
    if kind in _BINARY:
        return _BINARY[kind](evaluate(expr.a, scope), evaluate(expr.b, scope))
    if kind == "Not":
        return not evaluate(expr.a, scope)
    if kind == "Select":
        return evaluate(expr.true_value if evaluate(expr.condition, scope) else expr.false_value, scope)
    if kind == "Cast":
        return np.dtype(str(expr.ty.dtype)).type(evaluate(expr.value, scope)).item()
    raise NotImplementedError(f"host expression {kind}: {expr}")


class _Memory:
    """Global buffers on the OpenCL device, each between guard bytes."""

    def __init__(self, context, queue):
        self.context, self.queue, self.parents = context, queue, []

    def allocate(self, nbytes: int, fill: bytes | None):
        total = GUARD + max(nbytes, 1) + GUARD
        host = np.frombuffer((GUARD_PATTERN * (total // 4 + 1))[:total], np.uint8).copy()
        if fill is not None:
            host[GUARD:GUARD + nbytes] = np.frombuffer(fill, np.uint8)
        parent = cl.Buffer(self.context, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=host)
        self.parents.append((parent, nbytes))
        return parent.get_sub_region(GUARD, max(nbytes, 1))

    def check_guards(self, launch: str) -> None:
        expected = np.frombuffer((GUARD_PATTERN * (GUARD // 4)), np.uint8)
        for index, (parent, nbytes) in enumerate(self.parents):
            front, back = np.empty(GUARD, np.uint8), np.empty(GUARD, np.uint8)
            cl.enqueue_copy(self.queue, front, parent, src_offset=0)
            cl.enqueue_copy(self.queue, back, parent, src_offset=GUARD + max(nbytes, 1))
            tail = (GUARD + max(nbytes, 1)) % 4  # the pattern continues across the buffer
            pattern = np.frombuffer((GUARD_PATTERN * (GUARD // 4 + 2))[tail:tail + GUARD], np.uint8)
            if not (np.array_equal(front, expected) and np.array_equal(back, pattern)):
                raise AssertionError(f"{launch} wrote outside global buffer {index} ({nbytes} bytes)")


class Kernel:
    """A CUDA-scheduled PrimFunc, callable like a compiled dcn_tvm kernel on CPU torch tensors.

    `outputs`: indices of the arguments the kernel only writes (poisoned before the call).
    """

    def __init__(self, func, outputs=(), name: str = "kernel", float16_twin=None):
        self.name = name
        func, bfloat16 = bfloat16_as_float16(func, float16_twin)
        self.host, device = lower(func)
        self.params = {gv.name_hint: [_param_kind(p) for p in f.params] for gv, f in device.functions.items()}
        self.source = opencl_source(device, bfloat16)
        for kernel, used in _shared_bytes(printed_source(device)).items():
            if used > MAX_STATIC_SHARED_BYTES:
                raise ResourceError(f"{name}: {kernel} declares {used} bytes of static shared memory; "
                                    f"sm_90 allows {MAX_STATIC_SHARED_BYTES}")
        self.outputs = set(outputs)
        self.view_dtypes = _view_dtypes(self.host.body)
        context, _ = _device()
        self.program, self.kernels = _program(context, self.source), {}

    @property
    def fragment_operations(self) -> set[str]:
        """The emulated WMMA operations its kernels call (fill, load, mma, store): tensor cores on a GPU."""
        return set(re.findall(r"\bgpusim_wmma_(fill|load|mma|store)\(", self.source[len(_PRELUDE):]))

    @property
    def tf32_operations(self) -> set[str]:
        """The emulated TF32 MMA operations its kernels call (mma_tf32, mma_fill, mma_store)."""
        return set(re.findall(r"\bgpusim_(mma_tf32|mma_fill|mma_store)\(", self.source[len(_PRELUDE):]))

    def __call__(self, *tensors):
        context, queue = _device()
        params = self.host.params
        if len(tensors) != len(params):
            raise TypeError(f"{self.name} takes {len(params)} arguments, got {len(tensors)}")
        scope, buffers, memory = {}, {}, _Memory(context, queue)
        arrays = []
        for index, (buffer, tensor) in enumerate(zip(params, tensors)):
            self._bind_shape(buffer, tensor, scope)
            if tensor.dtype not in _DTYPES or not tensor.is_contiguous():
                raise TypeError(f"{self.name}: argument {index} must be a contiguous (b)float16/32/64 or int32 "
                                f"tensor")
            array = tensor.detach().float().numpy() if tensor.dtype in _HALF_DTYPES else tensor.detach().numpy()
            poison = bytes([POISON]) * array.nbytes if index in self.outputs else array.tobytes()
            buffers[hash(buffer)] = memory.allocate(array.nbytes, poison)
            arrays.append(array)
        self._run(self.host.body, scope, buffers, memory, queue)
        for buffer, tensor, array in zip(params, tensors, arrays):
            result = np.empty_like(array)
            cl.enqueue_copy(queue, result, buffers[hash(buffer)])
            tensor.copy_(torch.from_numpy(result))
        queue.finish()

    def _bind_shape(self, buffer, tensor, scope):
        if len(buffer.shape) != tensor.dim():
            raise TypeError(f"{self.name}: {buffer.name} has rank {len(buffer.shape)}, got {tuple(tensor.shape)}")
        for dim, size in zip(buffer.shape, tensor.shape):
            if type(dim).__name__ == "Var" and hash(dim) not in scope:
                scope[hash(dim)] = int(size)
            elif evaluate(dim, scope) != size:
                raise ValueError(f"{self.name}: {buffer.name} must have shape {list(buffer.shape)}, "
                                 f"got {tuple(tensor.shape)}")

    def _run(self, stmt, scope, buffers, memory, queue):
        kind = type(stmt).__name__
        if kind == "SeqStmt":
            for child in stmt.seq:
                self._run(child, scope, buffers, memory, queue)
        elif kind == "Bind":
            scope[hash(stmt.var)] = evaluate(stmt.value, scope)
        elif kind == "AllocBuffer":
            buffer = stmt.buffer
            if buffer.scope() != "global":
                raise NotImplementedError(f"host allocation in scope {buffer.scope()}")
            # TVM sized the storage for every view laid over it; a float16 view takes twice its bytes here.
            stretch = max(_itemsize(dtype) // np.dtype(dtype).itemsize
                          for dtype in (str(buffer.dtype), *self.view_dtypes.get(hash(buffer), ())))
            elements = math.prod(evaluate(d, scope) for d in buffer.shape)
            nbytes = elements * np.dtype(str(buffer.dtype)).itemsize * stretch
            buffers[hash(buffer)] = memory.allocate(nbytes, bytes([POISON]) * nbytes)
        elif kind == "DeclBuffer":
            if int(getattr(stmt.buffer, "elem_offset", 0) or 0) != 0:
                raise NotImplementedError(f"view {stmt.buffer.name} with an element offset")
            buffers[hash(stmt.buffer)] = buffers[hash(_data_of(stmt.data))]
        elif kind == "Evaluate" and getattr(stmt.value, "op", None) is not None \
                and stmt.value.op.name == "tirx.call_ffi_kernel":
            self._launch(stmt.value, scope, buffers, memory, queue)
        else:
            raise NotImplementedError(f"host statement {kind}: {stmt}")

    def _launch(self, call, scope, buffers, memory, queue):
        name = call.args[0].value
        tags = list(call.attrs.launch_params)
        if any(not tag.startswith(("blockIdx.", "threadIdx.")) for tag in tags):
            raise NotImplementedError(f"{name}: launch parameters {tags} (dynamic shared memory?)")
        values = [evaluate(a, scope) for a in call.args[len(call.args) - len(tags):]]
        arguments = call.args[1:len(call.args) - len(tags)]
        extent = {tag: value for tag, value in zip(tags, values)}
        grid = [extent.get(f"blockIdx.{axis}", 1) for axis in "xyz"]
        block = [extent.get(f"threadIdx.{axis}", 1) for axis in "xyz"]
        if math.prod(block) > MAX_THREADS or min(grid + block) < 1 or any(
                g > MAX_GRID[axis] for g, axis in zip(grid, "xyz")):
            raise ResourceError(f"{self.name}: {name} launched with grid {grid} and block {block}")
        kernel = self.kernels.setdefault(name, cl.Kernel(self.program, name))
        params = self.params[name]
        if len(params) != len(arguments):
            raise RuntimeError(f"{name}: {len(arguments)} arguments for {len(params)} parameters")
        for index, (dtype, argument) in enumerate(zip(params, arguments)):
            if dtype == "handle":
                kernel.set_arg(index, buffers[hash(_data_of(argument))])
            else:
                kernel.set_arg(index, np.dtype(dtype).type(evaluate(argument, scope)))
        dims = 3 if grid[2] * block[2] > 1 else 2 if grid[1] * block[1] > 1 else 1
        cl.enqueue_nd_range_kernel(queue, kernel, [g * b for g, b in zip(grid, block)][:dims], block[:dims])
        queue.finish()
        memory.check_guards(f"{self.name}: {name}")


class ResourceError(RuntimeError):
    """A kernel needs more than an sm_90 block offers."""


def _data_of(expr):
    """The buffer of a `buffer_data(buffer)` expression."""
    if type(expr).__name__ != "Call" or expr.op.name != "tirx.buffer_data":
        raise NotImplementedError(f"buffer argument {expr}")
    return expr.args[0]


def _param_kind(param) -> str:
    """"handle" for a device kernel's pointer parameter, else its scalar dtype."""
    return "handle" if type(param.ty).__name__ == "PointerType" else str(param.ty.dtype)


def _view_dtypes(body) -> dict[int, set[str]]:
    """The dtypes of the buffers that `body`'s DeclBuffer statements lay over each buffer, by the hash of
    the buffer that owns the storage (views of views included)."""
    dtypes, owner = {}, {}

    def visit(stmt):
        if type(stmt).__name__ == "SeqStmt":
            for child in stmt.seq:
                visit(child)
        elif type(stmt).__name__ == "DeclBuffer":
            source = hash(_data_of(stmt.data))
            owner[hash(stmt.buffer)] = owner.get(source, source)
            dtypes.setdefault(owner[hash(stmt.buffer)], set()).add(str(stmt.buffer.dtype))

    visit(body)
    return dtypes


def _itemsize(dtype) -> int:
    """Bytes of an element on the device: float16 (and bfloat16, see `bfloat16_as_float16`) is stored as
    float32."""
    return 4 if str(dtype) == "float16" else np.dtype(str(dtype)).itemsize


# -------------------------------------------------------------------------------------- device, cache

_state: dict = {}


def available() -> str | None:
    """None when an OpenCL device is there, else why not."""
    try:
        _device()
    except Exception as error:  # noqa: BLE001 - any failure means no device
        return f"no OpenCL device ({type(error).__name__}: {error})"
    return None


def _device():
    if "context" not in _state:
        devices = [d for p in cl.get_platforms() for d in p.get_devices()]
        if not devices:
            raise RuntimeError("no OpenCL device")
        _state["context"] = cl.Context([devices[0]])
        _state["queue"] = cl.CommandQueue(_state["context"])
    return _state["context"], _state["queue"]


def _program(context, source: str):
    programs = _state.setdefault("programs", {})
    if source not in programs:
        programs[source] = cl.Program(context, source).build()
    return programs[source]


def get_kernel(spec: KernelSpec) -> Kernel:
    """The simulated kernel of a spec (scheduled as a CUDA build schedules it), cached per mutation."""
    kernels = _state.setdefault("kernels", {})
    key = (spec.key, _mutation.get())
    if key not in kernels:
        func = scheduled(spec)
        kernels[key] = Kernel(func, outputs=_pure_outputs(spec), name=spec.key, float16_twin=_float16_twin(spec))
    return kernels[key]


def _float16_twin(spec: KernelSpec):
    """For a bfloat16 spec, a function that schedules the same kernel in float16; else None."""
    if spec.geometry is None or spec.geometry.dtype != "bfloat16":
        return None
    return lambda: scheduled(replace(spec, geometry=replace(spec.geometry, dtype="float16")))


def _pure_outputs(spec: KernelSpec) -> set[int]:
    """Arguments that `te.create_prim_func` made from the stage's outputs: those its blocks write. The
    scatter stages add into their last argument, which the caller zero-fills."""
    if spec.stage == "scatter":
        return set()
    func = prim_func(spec)
    sch = tvm.s_tir.Schedule(func)
    written = {hash(region.source) for block in sch.get_child_blocks(sch.get_sblock("root"))
               for region in sch.get(block).writes}
    return {index for index, buffer in enumerate(func.params) if hash(buffer) in written}


def simulating(monkeypatch, *modules, target: str = "cuda-sm_90"):
    """A context manager factory for a fixture: inside the context, the ops of `modules` (dcn_tvm.ops
    submodules) on CPU tensors build KernelSpecs for `target` and run them on the simulated GPU."""

    @contextlib.contextmanager
    def gpu():
        with monkeypatch.context() as patch:
            for module in modules:
                patch.setattr(module, "target_key", lambda device: target)
                patch.setattr(module, "get_kernel", get_kernel)
            yield

    return gpu
