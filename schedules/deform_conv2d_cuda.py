"""Default `cuda` schedules: every stage bound to threads, the forward GEMM tiled in shared memory.

The forward GEMM computes a channel block x POSITION_TILE output tile per thread block; for each
reduction step the bilinear gather writes its columns tile straight into shared memory (the gather is
the tile load, no column buffer in global memory), the weight tile is staged beside it, and every
thread accumulates a (channel tile x THREAD_TILE positions) block in registers.

The tiles are exactly what the schedule means, because TVM sizes a shared tile by the bounds of the
indices it reads: a channel block is a divisor of the output channels per group (so a block reads
one group's input channels, never the next group's), and a reduction step is a number of whole
input channels times the whole kernel window (splitting the fused (c, kh, kw) axis would make every
step touch partial channels on both sides). Other stages use the fallback below (one thread per
output element, reductions serial in the thread). Never compile an unscheduled function for CUDA:
`dcn_tvm.kernels.build` checks for the device module and the resource limits. Tuning samples the
channels per reduction step and the threads per block (`common.decide`).
"""

from __future__ import annotations

from dcn_tvm.cuda_limits import SHARED_MEMORY_BYTES

from .common import bind_remaining, bind_threads, decide, divisors

#: The compute pads the positions to a multiple of this, so position tiles have no tails.
POSITION_TILE = 64
#: Positions per thread's register tile (POSITION_TILE // THREAD_TILE threads along positions).
THREAD_TILE = 4
#: Output channels per thread block at most: the block is the largest divisor of the channels per
#: group up to this, in register tiles of the largest of CHANNEL_TILES dividing it.
MAX_BLOCK_CHANNELS, CHANNEL_TILES = 64, (4, 3, 2, 1)
#: Reduction elements per shared-memory step to aim for by default, and the tuning candidates
#: (input channels per step, each with the whole kernel window).
REDUCTION_STEP, CHANNEL_STEP_CANDIDATES = 32, (1, 2, 4, 8, 16)


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _largest_divisor(value: int, at_most: int) -> int:
    return max(d for d in range(1, min(value, at_most) + 1) if value % d == 0)


def _cooperative_load(sch, block, loop, depth: int, threads: int) -> None:
    """Compute `block` under `loop` (the depth-th loop) and spread it over the block's threads.
    Unit loops are kept, so a tuning trace replays whatever step it samples (one input channel per
    step would otherwise drop a loop and change what get_loops returns)."""
    sch.compute_at(block, loop, preserve_unit_loops=True)
    inner = sch.get_loops(block)[depth:]
    fused = sch.fuse(*inner) if len(inner) > 1 else inner[0]
    _, thread = sch.split(fused, [None, threads])
    sch.bind(thread, "threadIdx.x")


def _reduction_step(sch, rc, rkh, rkw, element_bytes: int):
    """Split the reduction (rc, rkh, rkw) into (outer loops, step loops): a step holds whole kernel
    rows (all of them unless the tiles would not fit in shared memory) of a tunable number of input
    channels, all dividing their loops, so every step's tiles are full. `element_bytes`: the shared
    memory one reduction element of a step takes (a weight column and a columns row)."""
    budget = SHARED_MEMORY_BYTES // element_bytes  # reduction elements per step that fit
    kh_size, kw_size = _extent(sch, rkh), _extent(sch, rkw)
    rows = _largest_divisor(kh_size, max(budget // kw_size, 1))
    if rows < kh_size:
        kh_outer, kh_step = sch.split(rkh, [None, rows])
        return [rc, kh_outer], [kh_step, rkw]
    points = kh_size * kw_size
    fitting = [d for d in divisors(_extent(sch, rc), CHANNEL_STEP_CANDIDATES) if d * points <= budget]
    default = max([d for d in fitting if d * points <= REDUCTION_STEP], default=fitting[0])
    rc_outer, rc_step = sch.split(rc, [None, decide(sch, fitting, default)])
    return [rc_outer], [rc_step, rkh, rkw]


def forward(sch) -> None:
    """The GEMM tiled as the module docstring says (a group of 8 output channels gets blocks of 2 x 16
    threads); the sampling tables and the output one thread per element."""
    gemm = sch.get_sblock("deform_gemm")
    columns = sch.get_sblock("deform_columns")
    batch, channel, position, rc, rkh, rkw = sch.get_loops(gemm)
    groups = _extent(sch, sch.get_loops(columns)[1]) // _extent(sch, rc)
    block_channels = _largest_divisor(_extent(sch, channel) // groups, MAX_BLOCK_CHANNELS)
    channel_tile = next(t for t in CHANNEL_TILES if block_channels % t == 0)
    side = POSITION_TILE // THREAD_TILE
    threads = block_channels // channel_tile * side

    c_block, c_thread, c_inner = sch.split(channel, [None, block_channels // channel_tile, channel_tile])
    p_block, p_thread, p_inner = sch.split(position, [None, side, THREAD_TILE])
    dtype = sch.get(columns).writes[0].source.dtype
    element_bytes = (block_channels + POSITION_TILE) * dtype.bits // 8
    outer, step = _reduction_step(sch, rc, rkh, rkw, element_bytes)
    # The channel block varies fastest over the blocks: with symbolic sizes, c_block = fused % blocks is
    # bounded, where fused % (blocks * positions) // positions would leave the tiles unbounded.
    sch.reorder(batch, p_block, c_block, c_thread, p_thread, *outer, *step, c_inner, p_inner)
    sch.bind(sch.fuse(batch, p_block, c_block), "blockIdx.x")
    thread = sch.fuse(c_thread, p_thread)
    sch.bind(thread, "threadIdx.x")
    accumulator = sch.cache_write(gemm, 0, "local")
    sch.reverse_compute_at(accumulator, thread)
    weight_tile = sch.cache_read(gemm, 0, "shared")
    depth = 2 + len(outer)  # blockIdx, threadIdx, the outer reduction loops
    _cooperative_load(sch, weight_tile, outer[-1], depth, threads)
    sch.set_scope(columns, 0, "shared")
    _cooperative_load(sch, columns, outer[-1], depth, threads)
    for loop in step:
        sch.unroll(loop)
    sch.decompose_reduction(gemm, outer[0])
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
