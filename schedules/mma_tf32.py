"""TF32 tensor-core intrinsics (PTX `mma.sync.m16n8k8.row.col.f32.tf32.tf32.f32`) for float32 GEMMs at
torch's float32 matmul precision "high" or "medium", on the 16 x 16 x 16 tiles of the WMMA schedules.

TVM 0.27's WMMA codegen has no float32 fragments, so the accumulator is a "warp" buffer [32 lanes, 8]
(TVM's LowerWarpMemory makes it 8 registers per lane) laid out as the PTX fragments of two m16n8 halves
(`accumulator_lane`); A [16, 16] and B [16, 16] are read from shared memory by each lane at its fragment
positions (`a_lane`, `b_lane`), rounded to TF32 (round to nearest, ties away from zero, on the 13 low
mantissa bits: what `cvt.rna.tf32.f32` does; the MMA itself would ignore those bits), and multiplied
as 2 x 2 m16n8k8 MMAs with float32 accumulators.
"""

from __future__ import annotations

import functools

#: The PrimFunc attribute naming a float32 GEMM precision other than "highest" (KernelSpec.precision),
#: and the precisions that run on TF32 tensor cores.
PRECISION_ATTR = "dcn_tvm_float32_precision"
TF32_PRECISIONS = ("high", "medium")
SIZE, LANES, REGISTERS = 16, 32, 8
STORE_LAYOUT = "tirx.index_map.shared_16x16_to_ldmatrix_32x8_layout"


def precision(sch) -> str:
    """The float32 GEMM precision the scheduled function asks for ("highest" unless PRECISION_ATTR)."""
    attrs = sch.mod["main"].attrs
    return str(attrs[PRECISION_ATTR]) if attrs is not None and PRECISION_ATTR in attrs else "highest"


def a_lane(i, j):
    """(lane, register) of A[i, j] (i < 16 rows of M, j < 16 of K: two k8 halves of 4 registers)."""
    return 4 * (i % 8) + j % 4, 4 * (j // 8) + i // 8 + 2 * (j % 8 // 4)


def b_lane(i, j):
    """(lane, register) of B[i, j] (i < 16 of K, j < 16 of N: per n8 half, two k8 halves of 2)."""
    return 4 * (j % 8) + i % 4, 4 * (j // 8) + 2 * (i // 8) + i % 8 // 4


def accumulator_lane(i, j):
    """(lane, register) of C[i, j] (16 x 16: per n8 half, the 4 registers of an m16n8 fragment)."""
    return 4 * (i % 8) + j % 8 // 2, 4 * (j // 8) + 2 * (i // 8) + j % 2


def give_way_to_tvm_intrinsics() -> None:
    """Import TVM's own tensor intrinsics (MetaSchedule's TuneContext and builder import them), which
    register the STORE_LAYOUT map under the same name as `register` does (the same map): drop ours first,
    or TVM's registration fails as a duplicate."""
    import sys

    import tvm_ffi

    if "tvm.s_tir.tensor_intrin.cuda" not in sys.modules and \
            tvm_ffi.get_global_func(STORE_LAYOUT, allow_missing=True) is not None:
        tvm_ffi.remove_global_func(STORE_LAYOUT)
    import tvm.s_tir.tensor_intrin  # noqa: F401


def name(kind: str) -> str:
    return f"dcn_tvm_mma_tf32_{kind}"


@functools.cache
def register() -> None:
    """Register the intrinsics once per process (nothing to do without the compiler)."""
    try:
        import tvm_ffi
        from tvm.s_tir import TensorIntrin
        from tvm.script import tirx as T
    except ImportError:
        return

    n, shape, warp = SIZE, (SIZE, SIZE), (LANES, REGISTERS)
    # The CUDA codegen of mma_store_legacy asks for the accumulator layout under this name (registered by
    # tvm.s_tir.tensor_intrin.cuda, whose import takes minutes; its map is accumulator_lane).
    if tvm_ffi.get_global_func(STORE_LAYOUT, allow_missing=True) is None:
        tvm_ffi.register_global_func(STORE_LAYOUT, lambda index: tvm_ffi.convert(accumulator_lane(*index)))

    def tf32(value):
        """float32 rounded to TF32: to nearest, ties away from zero, at mantissa bit 13."""
        bits = T.reinterpret("uint32", value)
        return T.reinterpret("float32", (bits + T.uint32(0x1000)) & T.uint32(0xFFFFE000))

    @T.prim_func(s_tir=True)
    def mma_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, shape, "float32", align=64, offset_factor=1, scope="shared")
        B = T.match_buffer(b, shape, "float32", align=64, offset_factor=1, scope="shared")
        C = T.match_buffer(c, warp, "float32", align=64, offset_factor=1, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:LANES, 0:REGISTERS], A[0:n, 0:n], B[0:n, 0:n])
            T.writes(C[0:LANES, 0:REGISTERS])
            for i, j, k in T.grid(n, n, n):
                with T.sblock(""):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    lane, register = T.meta_var(accumulator_lane(vi, vj))
                    C[lane, register] = C[lane, register] + A[vi, vk] * B[vk, vj]

    @T.prim_func(s_tir=True)
    def mma_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        a1, a0, b1, b0 = T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, shape, "float32", align=64, offset_factor=1, scope="shared", strides=[a1, a0])
        B = T.match_buffer(b, shape, "float32", align=64, offset_factor=1, scope="shared", strides=[b1, b0])
        C = T.match_buffer(c, warp, "float32", align=64, offset_factor=1, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:LANES, 0:REGISTERS], A[0:n, 0:n], B[0:n, 0:n])
            T.writes(C[0:LANES, 0:REGISTERS])
            for lane in T.thread_binding(0, LANES, "threadIdx.x"):
                a_registers = T.decl_buffer((REGISTERS,), "float32", scope="local")
                b_registers = T.decl_buffer((REGISTERS,), "float32", scope="local")
                for r in T.unroll(REGISTERS):  # the inverse of a_lane and b_lane for this lane
                    a_registers[r] = tf32(A[lane // 4 + 8 * (r % 2), 8 * (r // 4) + lane % 4 + 4 * (r % 4 // 2)])
                    b_registers[r] = tf32(B[8 * (r % 4 // 2) + lane % 4 + 4 * (r % 2), 8 * (r // 4) + lane // 4])
                for n_half, k_half in T.grid(2, 2):
                    T.evaluate(T.ptx_legacy.mma(
                        "m16n8k8", "row", "col", "tf32", "tf32", "fp32", a_registers.data, 4 * k_half,
                        b_registers.data, 4 * n_half + 2 * k_half, C.data,
                        C.elem_offset + lane * REGISTERS + 4 * n_half, False, dtype="float32"))

    @T.prim_func(s_tir=True)
    def fill_desc(c: T.handle) -> None:
        C = T.match_buffer(c, warp, "float32", align=64, offset_factor=1, scope="warp")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:LANES, 0:REGISTERS])
            for i, j in T.grid(n, n):
                with T.sblock("init"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    lane, register = T.meta_var(accumulator_lane(vi, vj))
                    C[lane, register] = T.float32(0)

    @T.prim_func(s_tir=True)
    def fill_impl(c: T.handle) -> None:
        C = T.match_buffer(c, warp, "float32", align=64, offset_factor=1, scope="warp")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:LANES, 0:REGISTERS])
            for lane in T.thread_binding(0, LANES, "threadIdx.x"):
                T.evaluate(T.cuda.mma_fill_legacy(REGISTERS, C.data, C.elem_offset, dtype="float32"))

    def store(scope: str):
        @T.prim_func(s_tir=True)
        def desc(a: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, warp, "float32", align=64, offset_factor=1, scope="warp")
            C = T.match_buffer(c, shape, "float32", align=64, offset_factor=1, scope=scope)
            with T.sblock("root"):
                T.reads(A[0:LANES, 0:REGISTERS])
                T.writes(C[0:n, 0:n])
                for i, j in T.grid(n, n):
                    with T.sblock("store"):
                        vi, vj = T.axis.remap("SS", [i, j])
                        lane, register = T.meta_var(accumulator_lane(vi, vj))
                        C[vi, vj] = A[lane, register]

        @T.prim_func(s_tir=True)
        def impl(a: T.handle, c: T.handle) -> None:
            s1, s0 = T.int32(), T.int32()
            A = T.match_buffer(a, warp, "float32", align=64, offset_factor=1, scope="warp")
            C = T.match_buffer(c, shape, "float32", align=64, offset_factor=1, scope=scope, strides=[s1, s0])
            with T.sblock("root"):
                T.reads(A[0:LANES, 0:REGISTERS])
                T.writes(C[0:n, 0:n])
                for lane in T.thread_binding(0, LANES, "threadIdx.x"):
                    T.evaluate(T.cuda.mma_store_legacy(n, n, C.access_ptr("w"), A.data, A.elem_offset, s1,
                                                       dtype="float32"))

        return desc, impl

    TensorIntrin.register(name("mma"), mma_desc, mma_impl, override=True)
    TensorIntrin.register(name("fill"), fill_desc, fill_impl, override=True)
    for scope in ("global", "shared"):
        TensorIntrin.register(name(f"store_{scope}"), *store(scope), override=True)
