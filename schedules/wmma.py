"""WMMA 16x16x16 tensor intrinsics (float16 or bfloat16 inputs, float32 accumulators) for
`Schedule.tensorize`, registered under `name(kind, dtype)`.

TVM 0.27 has float16 ones in `tvm.s_tir.tensor_intrin.cuda`, but no bfloat16 ones, and importing that
module parses about a hundred intrinsics with TVMScript (minutes on a loaded 2-core machine). These
are the same operations, row-major only: load A [16, 16] and B [16, 16] from shared memory into
fragments, fill the accumulator with zero, multiply-accumulate, store the accumulator to global or
shared memory.

Two TVM 0.27 quirks decide how they address memory. The store takes `address_of(C[0, 0])`, not
`access_ptr`: StorageRewrite may place a shared C in a freed shared array of another dtype (a float32
output tile in a float16 input tile) and keeps an access_ptr's element type, which LowerIntrin then
refuses. The loads keep `access_ptr`: `tvm_load_matrix_sync` is registered as only reading state, so
RemoveNoOp deletes a load whose arguments have no effect either (access_ptr is a special call
argument); the loads' shared tiles are allocated first, so no float32 array is free for them.
"""

from __future__ import annotations

import functools

#: The fragment edge (m = n = k), the input dtypes, and where accumulators can be stored.
SIZE = 16
DTYPES = ("float16", "bfloat16")
STORE_SCOPES = ("global", "shared")


def name(kind: str, dtype: str) -> str:
    return f"dcn_tvm_wmma_{kind}_{dtype}"


def _index(buffer, stride):
    """Which 16 x 16 fragment of a fragment buffer `buffer` (row stride `stride`) starts at its offset."""
    return buffer.elem_offset // stride // SIZE * (stride // SIZE) + buffer.elem_offset % stride // SIZE


@functools.cache
def register() -> None:
    """Register the intrinsics (once per process; `build.prim_func` imports the CUDA schedules, which
    call this, before any tuning record is replayed). Without the compiler (a prebuilt package's host,
    where the ops still read the CUDA schedules' position tile and layout) there is nothing to register."""
    try:
        from tvm.s_tir import TensorIntrin
        from tvm.script import tirx as T
    except ImportError:
        return

    n = SIZE
    shape = (n, n)

    def copy(dtype: str, source_scope: str, target_scope: str):
        """The description of a load or a store: C = A, 16 x 16, from one scope to another."""

        @T.prim_func(s_tir=True)
        def desc(a: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, shape, dtype, align=64, offset_factor=n, scope=source_scope)
            C = T.match_buffer(c, shape, dtype, align=64, offset_factor=n, scope=target_scope)
            with T.sblock("root"):
                T.reads(A[0:n, 0:n])
                T.writes(C[0:n, 0:n])
                for i, j in T.grid(n, n):
                    with T.sblock("copy"):
                        vi, vj = T.axis.remap("SS", [i, j])
                        C[vi, vj] = A[vi, vj]

        return desc

    def load(dtype: str, fragment_scope: str):
        @T.prim_func(s_tir=True)
        def impl(a: T.handle, c: T.handle) -> None:
            s1, s0, d1, d0 = T.int32(), T.int32(), T.int32(), T.int32()
            A = T.match_buffer(a, shape, dtype, align=64, offset_factor=n, scope="shared", strides=[s1, s0])
            C = T.match_buffer(c, shape, dtype, align=64, offset_factor=n, scope=fragment_scope, strides=[d1, d0])
            with T.sblock("root"):
                T.reads(A[0:n, 0:n])
                T.writes(C[0:n, 0:n])
                T.evaluate(T.tvm_load_matrix_sync(C.data, n, n, n, _index(C, d1), A.access_ptr("r", ptr_type=dtype),
                                                  s1, "row_major", dtype="void"))

        return copy(dtype, "shared", fragment_scope), impl

    def mma(dtype: str):
        @T.prim_func(s_tir=True)
        def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, shape, dtype, align=64, offset_factor=n, scope="wmma.matrix_a")
            B = T.match_buffer(b, shape, dtype, align=64, offset_factor=n, scope="wmma.matrix_b")
            C = T.match_buffer(c, shape, "float32", align=64, offset_factor=n, scope="wmma.accumulator")
            with T.sblock("root"):
                T.reads(C[0:n, 0:n], A[0:n, 0:n], B[0:n, 0:n])
                T.writes(C[0:n, 0:n])
                for i, j, k in T.grid(n, n, n):
                    with T.sblock(""):
                        vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                        C[vi, vj] = C[vi, vj] + T.Cast("float32", A[vi, vk]) * T.Cast("float32", B[vk, vj])

        @T.prim_func(s_tir=True)
        def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
            a1, a0, b1, b0, c1, c0 = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
            A = T.match_buffer(a, shape, dtype, align=64, offset_factor=n, scope="wmma.matrix_a", strides=[a1, a0])
            B = T.match_buffer(b, shape, dtype, align=64, offset_factor=n, scope="wmma.matrix_b", strides=[b1, b0])
            C = T.match_buffer(c, shape, "float32", align=64, offset_factor=n, scope="wmma.accumulator",
                               strides=[c1, c0])
            with T.sblock("root"):
                T.reads(C[0:n, 0:n], A[0:n, 0:n], B[0:n, 0:n])
                T.writes(C[0:n, 0:n])
                T.evaluate(T.tvm_mma_sync(C.data, _index(C, c1), A.data, _index(A, a1), B.data, _index(B, b1),
                                          C.data, _index(C, c1), dtype="void"))

        return desc, impl

    @T.prim_func(s_tir=True)
    def fill_desc(c: T.handle) -> None:
        C = T.match_buffer(c, shape, "float32", align=64, offset_factor=n, scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:n, 0:n])
            for i, j in T.grid(n, n):
                with T.sblock("init"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = T.float32(0)

    @T.prim_func(s_tir=True)
    def fill_impl(c: T.handle) -> None:
        d1, d0 = T.int32(), T.int32()
        C = T.match_buffer(c, shape, "float32", align=64, offset_factor=n, scope="wmma.accumulator", strides=[d1, d0])
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:n, 0:n])
            T.evaluate(T.tvm_fill_fragment(C.data, n, n, n, _index(C, d1), T.float32(0), dtype="void"))

    def store(scope: str):
        @T.prim_func(s_tir=True)
        def impl(a: T.handle, c: T.handle) -> None:
            s1, s0, d1, d0 = T.int32(), T.int32(), T.int32(), T.int32()
            A = T.match_buffer(a, shape, "float32", align=64, offset_factor=n, scope="wmma.accumulator",
                               strides=[d1, d0])
            C = T.match_buffer(c, shape, "float32", align=64, offset_factor=n, scope=scope, strides=[s1, s0])
            with T.sblock("root"):
                T.reads(A[0:n, 0:n])
                T.writes(C[0:n, 0:n])
                T.evaluate(T.tvm_store_matrix_sync(A.data, n, n, n, _index(A, d1), T.address_of(C[0, 0]), s1,
                                                   "row_major", dtype="void"))

        return copy("float32", "wmma.accumulator", scope), impl

    for dtype in DTYPES:
        TensorIntrin.register(name("load_a", dtype), *load(dtype, "wmma.matrix_a"), override=True)
        TensorIntrin.register(name("load_b", dtype), *load(dtype, "wmma.matrix_b"), override=True)
        TensorIntrin.register(name("mma", dtype), *mma(dtype), override=True)
    TensorIntrin.register(name("fill", "float32"), fill_desc, fill_impl, override=True)
    for scope in STORE_SCOPES:
        TensorIntrin.register(name(f"store_{scope}", "float32"), *store(scope), override=True)
