"""Default `cuda` schedules: every stage bound to threads, the forward GEMM tiled in shared memory.

The forward GEMM computes a BLOCK_CHANNELS x BLOCK_POSITIONS output tile per thread block; for each
reduction step the bilinear gather writes its columns tile straight into shared memory (the gather is
the tile load, no column buffer in global memory), the weight tile is staged beside it, and every
thread accumulates a THREAD_TILE x THREAD_TILE block in registers. Other stages use dlight's
fallback below (one thread per output element, reductions serial in the thread). Never compile an unscheduled function for CUDA:
`dcn_tvm.kernels.build` checks for the device module. Tuning samples the reduction step and the
threads per block (`common.decide`).
"""

from __future__ import annotations

from .common import bind_remaining, bind_threads, decide

#: The compute pads the positions to a multiple of this, so position tiles have no tails.
POSITION_TILE = 64
BLOCK_CHANNELS = 64
THREAD_TILE = 4
#: Reduction elements per shared-memory tile, and the tuning candidates.
REDUCTION_STEP, REDUCTION_STEP_CANDIDATES = 16, (4, 8, 16, 32)


def _threads() -> int:
    side = POSITION_TILE // THREAD_TILE
    return side * side


def _cooperative_load(sch, block, loop, depth: int) -> None:
    """Compute `block` under `loop` (the depth-th loop) and spread it over the block's threads."""
    sch.compute_at(block, loop)
    inner = sch.get_loops(block)[depth:]
    fused = sch.fuse(*inner) if len(inner) > 1 else inner[0]
    _, thread = sch.split(fused, [None, _threads()])
    sch.bind(thread, "threadIdx.x")


def _tiled_gemm(sch, block, batch, channel, position, reductions, shared_producer) -> None:
    side = POSITION_TILE // THREAD_TILE
    reduction = sch.fuse(*reductions) if len(reductions) > 1 else reductions[0]
    c_block, c_thread, c_inner = sch.split(channel, [None, side, THREAD_TILE])
    p_block, p_thread, p_inner = sch.split(position, [None, side, THREAD_TILE])
    r_outer, r_inner = sch.split(reduction, [None, decide(sch, REDUCTION_STEP_CANDIDATES, REDUCTION_STEP)])
    sch.reorder(batch, c_block, p_block, c_thread, p_thread, r_outer, r_inner, c_inner, p_inner)
    sch.bind(sch.fuse(batch, c_block, p_block), "blockIdx.x")
    thread = sch.fuse(c_thread, p_thread)
    sch.bind(thread, "threadIdx.x")
    accumulator = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulator, thread)
    weight_tile = sch.cache_read(block, 0, "shared")
    depth = 3  # blockIdx, threadIdx, r_outer
    _cooperative_load(sch, weight_tile, r_outer, depth)
    producer = sch.get_sblock(shared_producer)
    sch.set_scope(producer, 0, "shared")
    _cooperative_load(sch, producer, r_outer, depth)
    sch.unroll(r_inner)
    sch.decompose_reduction(block, r_outer)


def forward(sch) -> None:
    gemm = sch.get_sblock("deform_gemm")
    b, oc, p, rc, rkh, rkw = sch.get_loops(gemm)
    _tiled_gemm(sch, gemm, b, oc, p, [rc, rkh, rkw], "deform_columns")
    bind_remaining(sch)


def backward_data(sch) -> None:
    sch.compute_inline(sch.get_sblock("grad_output_padded"))
    bind_remaining(sch)


def backward_weight(sch) -> None:
    bind_remaining(sch)


def scatter(sch) -> None:
    """Every sample its own thread; the adds are atomic (see `scatter_grad_input`)."""
    bind_threads(sch, sch.get_loops(sch.get_sblock("scatter_grad_input")))


RULES = {
    "forward": forward,
    "backward_data": backward_data,
    "backward_weight": backward_weight,
    "scatter": scatter,
}
