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

Tensor cores: in float16 and bfloat16 the forward GEMM runs on WMMA 16x16x16 fragments with float32
accumulators (`_tensor_core_forward`) wherever a fragment fits the shape: 16 | output channels per
group and 16 | (input channels per group x kernel points), the reduction axis K = (c, kh, kw) fused.
The columns stage iterates (batch, K, positions) and writes a [K, 64 positions] tile of each
reduction step straight into shared memory, row-major with leading dimension 64, which is the B
fragment's layout; the weight is staged as a [block channels, K step] row-major tile (A fragment).
Other shapes and dtypes keep the CUDA-core GEMM above; for shapes that fit, the tuning space holds
both (`choose("forward_gemm", ...)`) and samples the K step.
"""

from __future__ import annotations

from dcn_tvm.cuda_limits import SHARED_MEMORY_BYTES

from . import wmma
from .common import bind_remaining, bind_threads, choose, decide, divisors

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


#: Fragment edge of the WMMA intrinsics (m16n16k16), threads per warp, and the tensor-core dtypes.
FRAGMENT, WARP, TENSOR_CORE_DTYPES = wmma.SIZE, 32, wmma.DTYPES
#: Output channels per block at most (in fragments of 16; 2 x 2 fragments per warp where they fit),
#: and the K step candidates of a reduction step, in fragments (16 reduction elements each).
MAX_TENSOR_CORE_CHANNELS, K_STEP, K_STEP_CANDIDATES = 64, 4, (1, 2, 3, 4, 6, 8)


wmma.register()


def _tensor_core_fits(sch, dtype: str, o_per_group: int, k_per_group: int) -> bool:
    return dtype in TENSOR_CORE_DTYPES and o_per_group % FRAGMENT == 0 and k_per_group % FRAGMENT == 0


def _tensor_core_forward(sch, groups: int) -> None:
    """The forward GEMM on WMMA fragments (module docstring): a block of (block channels x 64
    positions) outputs, 2 warps along the positions and 1 or 2 along the channels, each warp
    accumulating (block channels / warps along channels) x 32 outputs in 16 x 16 fragments; per
    reduction step of K_STEP x 16 elements, the threads gather the columns tile and stage the weight
    tile into shared memory, then every warp loads its A and B fragments and multiplies."""
    gemm = sch.get_sblock("deform_gemm")
    columns = sch.get_sblock("deform_columns")
    dtype = str(sch.get(columns).writes[0].source.dtype)
    kh_size, kw_size = (_extent(sch, loop) for loop in sch.get_loops(columns)[2:4])

    def fused_k(c, kh, kw):
        return (c * kh_size + kh) * kw_size + kw

    sch.transform_layout(columns, ("write", 0), lambda b, c, kh, kw, p: (b, fused_k(c, kh, kw), p))
    sch.transform_block_layout(columns, lambda b, c, kh, kw, p: (b, fused_k(c, kh, kw), p))
    sch.transform_block_layout(gemm, lambda b, oc, p, rc, rkh, rkw: (b, oc, p, fused_k(rc, rkh, rkw)))
    weight_tile = sch.reindex(gemm, ("read", 0))  # [O, K]: the weight's own memory order
    batch, channel, position, k = sch.get_loops(gemm)
    block_channels = _largest_divisor(_extent(sch, channel) // groups // FRAGMENT,
                                      MAX_TENSOR_CORE_CHANNELS // FRAGMENT) * FRAGMENT
    channel_warps = 2 if block_channels % (2 * FRAGMENT) == 0 else 1
    position_warps = 2
    warps = channel_warps * position_warps
    k_fragments = _extent(sch, k) // FRAGMENT
    steps = divisors(k_fragments, K_STEP_CANDIDATES)
    default_step = max(d for d in steps if d <= K_STEP)

    c_block, c_warp, c_frag, c_inner = sch.split(
        channel, [None, channel_warps, block_channels // FRAGMENT // channel_warps, FRAGMENT])
    p_block, p_warp, p_frag, p_inner = sch.split(
        position, [None, position_warps, POSITION_TILE // FRAGMENT // position_warps, FRAGMENT])
    k_outer, k_frag, k_inner = sch.split(k, [None, decide(sch, steps, default_step), FRAGMENT])
    sch.reorder(batch, p_block, c_block, c_warp, p_warp, k_outer, k_frag, c_frag, p_frag, c_inner, p_inner, k_inner)
    fragments = sch.blockize(c_inner)
    sch.bind(sch.fuse(batch, p_block, c_block), "blockIdx.x")
    warp = sch.fuse(c_warp, p_warp)
    sch.bind(warp, "threadIdx.y")

    for tile in (weight_tile, columns):
        sch.set_scope(tile, 0, "shared")
        sch.compute_at(tile, k_outer, preserve_unit_loops=True)
        inner = sch.get_loops(tile)[4:]  # under blockIdx, threadIdx.y, k_outer
        _, thread_y, thread_x = sch.split(sch.fuse(*inner) if len(inner) > 1 else inner[0], [None, warps, WARP])
        sch.bind(thread_y, "threadIdx.y")
        sch.bind(thread_x, "threadIdx.x")
    a_fragment = sch.cache_read(fragments, 0, "wmma.matrix_a")
    b_fragment = sch.cache_read(fragments, 1, "wmma.matrix_b")
    for fragment in (a_fragment, b_fragment):
        sch.compute_at(fragment, k_frag)
    accumulator = sch.cache_write(fragments, 0, "wmma.accumulator")
    sch.reverse_compute_at(accumulator, warp)
    init = sch.decompose_reduction(fragments, k_outer)
    for block in (a_fragment, b_fragment, accumulator):
        i, j = sch.get_loops(block)[-2:]
        i_outer, i_inner = sch.split(i, [None, FRAGMENT])
        j_outer, j_inner = sch.split(j, [None, FRAGMENT])
        sch.reorder(i_outer, j_outer, i_inner, j_inner)
    sch.tensorize(sch.get_loops(a_fragment)[-2], wmma.name("load_a", dtype))
    sch.tensorize(sch.get_loops(b_fragment)[-2], wmma.name("load_b", dtype))
    sch.tensorize(sch.get_loops(accumulator)[-2], wmma.name("store", "float32"))
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], wmma.name("fill", "float32"))
    sch.tensorize(sch.get_loops(gemm)[-3], wmma.name("mma", dtype))
    bind_remaining(sch)


def forward(sch) -> None:
    """The GEMM tiled as the module docstring says (a group of 8 output channels gets blocks of 2 x 16
    threads), or on tensor cores where they apply; the sampling tables and the output one thread per
    element."""
    gemm = sch.get_sblock("deform_gemm")
    columns = sch.get_sblock("deform_columns")
    batch, channel, position, rc, rkh, rkw = sch.get_loops(gemm)
    groups = _extent(sch, sch.get_loops(columns)[1]) // _extent(sch, rc)
    dtype = str(sch.get(columns).writes[0].source.dtype)
    k_per_group = _extent(sch, rc) * _extent(sch, rkh) * _extent(sch, rkw)
    if _tensor_core_fits(sch, dtype, _extent(sch, channel) // groups, k_per_group) and \
            choose("forward_gemm", ("tensor_core", "cuda_core"), "tensor_core") == "tensor_core":
        _tensor_core_forward(sch, groups)
        return
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
