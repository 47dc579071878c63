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

Tensor cores: in float16 and bfloat16 the three GEMMs run on WMMA 16x16x16 fragments with float32
accumulators (`_gemm_on_fragments`) wherever a fragment fits the shape: 16 | output channels per group
and 16 | (input channels per group x kernel points), the axis K = (c, kh, kw) fused. A thread block
computes up to 64 x 64 outputs of one group, over 1 to 4 warps of up to 2 x 2 fragments each; per K
step its threads stage A and B in shared memory, row-major as the fragment loads want them:

- forward `deform_gemm` [O, positions] = weight [O, K] x columns [K, positions]: the columns stage
  iterates (batch, K, positions) and writes its tile straight into shared memory;
- backward `grad_columns` [K, positions] = weight^T [K, O] x grad_output [O, positions]: the weight is
  staged transposed; the accumulators go through a float32 tile in shared memory to the
  [N, C, KH, KW, P] output (a fragment's 16 rows of K span several (c, kh, kw) rows of it);
- backward `grad_weight_sum` [O, K] = grad_output [O, positions] x columns^T [positions, K], summed
  over the images in turn: the gather writes each step's columns straight into shared memory,
  transposed to [positions, K].

float32 at torch's float32 matmul precision "high" or "medium" (the function's `mma_tf32.PRECISION_ATTR`)
takes the same tiles on TF32 tensor cores (`mma_tf32`: PTX mma.sync m16n8k8, A and B read from the shared
tiles and rounded to TF32 by each lane, the accumulators in a warp buffer in the PTX fragment layout).

Other shapes and dtypes keep the CUDA-core schedules above (the backward ones one thread per element);
for shapes that fit, the tuning space holds both for each GEMM (`choose(..., GEMM_OPTIONS)`) and
samples the K step.
"""

from __future__ import annotations

from dcn_tvm.cuda_limits import SHARED_MEMORY_BYTES

from . import mma_tf32, wmma
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
#: Fragments per thread block along M and along N at most (2 x 2 fragments per warp where they fit),
#: and the K step candidates of a reduction step, in fragments (16 reduction elements each).
MAX_BLOCK_FRAGMENTS, K_STEP, K_STEP_CANDIDATES = 4, 4, (1, 2, 3, 4, 6, 8)
#: The structural choice of each GEMM stage where fragments fit (`common.choose`), default first.
GEMM_OPTIONS = ("tensor_core", "cuda_core")


wmma.register()
mma_tf32.register()


def _on_tensor_cores(sch, name: str, dtype: str, o_per_group: int, k_per_group: int) -> bool:
    """Whether GEMM `name` runs on tensor cores: its dtype has fragments (float32 at TF32 precision,
    `mma_tf32`), 16 divides the output channels per group and (input channels per group x kernel
    points), and the tuning space's choice (`name` among GEMM_OPTIONS) is tensor cores."""
    tf32 = dtype == "float32" and mma_tf32.precision(sch) in mma_tf32.TF32_PRECISIONS
    fits = (dtype in TENSOR_CORE_DTYPES or tf32) and o_per_group % FRAGMENT == 0 and k_per_group % FRAGMENT == 0
    return fits and choose(name, GEMM_OPTIONS, GEMM_OPTIONS[0]) == "tensor_core"


def _dtype(sch, block) -> str:
    """The dtype of the first buffer `block` reads (a GEMM's first operand)."""
    return str(sch.get(block).reads[0].source.dtype)


def _spread(sch, block, depth: int, warps: int) -> None:
    """Spread the loops of `block` below the depth-th over the thread block's warps x WARP lanes."""
    inner = sch.get_loops(block)[depth:]
    _, thread_y, thread_x = sch.split(sch.fuse(*inner) if len(inner) > 1 else inner[0], [None, warps, WARP])
    sch.bind(thread_y, "threadIdx.y")
    sch.bind(thread_x, "threadIdx.x")


def _gemm_on_fragments(sch, gemm, loops, fragments, k_steps, tiles, output_tile=None):
    """Schedule the GEMM block `gemm`, C[m, n] += A[m, k] B[k, n] with A and B its reads 0 and 1, on
    WMMA fragments. `loops` = (outer, m, n, serial, k): the spatial loops outside the GEMM (fused
    into the thread blocks with the m and n blocks), the loops of m and n, the reduction loops
    outside the K steps, and the loop of k. `fragments`: the fragments per thread block along m and
    along n (each divides that of a group, so a block never straddles two), over 2 warps where even;
    `k_steps`: the K step candidates in fragments (the first at most K_STEP is the default); `tiles`:
    the blocks that stage A and B in shared memory, computed per K step by every thread. The
    accumulators are stored to C in global memory, or with `output_tile` (the block that copies C
    onward) to C in shared memory, which every thread then copies out."""
    outer, m, n, serial, k = loops
    (m_fragments, n_fragments), dtype = fragments, _dtype(sch, gemm)
    m_warps, n_warps = (2 if count % 2 == 0 else 1 for count in fragments)
    warps = m_warps * n_warps
    default_step = max(step for step in k_steps if step <= K_STEP)
    m_block, m_warp, m_frag, m_inner = sch.split(m, [None, m_warps, m_fragments // m_warps, FRAGMENT])
    n_block, n_warp, n_frag, n_inner = sch.split(n, [None, n_warps, n_fragments // n_warps, FRAGMENT])
    k_outer, k_frag, k_inner = sch.split(k, [None, decide(sch, k_steps, default_step), FRAGMENT])
    # The m block varies fastest over the blocks (see `forward` on symbolic sizes).
    sch.reorder(*outer, n_block, m_block, m_warp, n_warp, *serial, k_outer, k_frag, m_frag, n_frag,
                m_inner, n_inner, k_inner)
    fragment_gemm = sch.blockize(m_inner)
    block = sch.fuse(*outer, n_block, m_block)
    sch.bind(block, "blockIdx.x")
    warp = sch.fuse(m_warp, n_warp)
    sch.bind(warp, "threadIdx.y")
    for tile in tiles:
        sch.compute_at(tile, k_outer, preserve_unit_loops=True)
        _spread(sch, tile, 3 + len(serial), warps)  # under blockIdx, threadIdx.y, the serial loops, k_outer
    tf32 = dtype == "float32"  # TF32 MMAs read A and B from shared memory, accumulate in a warp buffer
    fragments = [] if tf32 else [sch.cache_read(fragment_gemm, 0, "wmma.matrix_a"),
                                 sch.cache_read(fragment_gemm, 1, "wmma.matrix_b")]
    for fragment in fragments:
        sch.compute_at(fragment, k_frag)
    accumulator = sch.cache_write(fragment_gemm, 0, "warp" if tf32 else "wmma.accumulator")
    sch.reverse_compute_at(accumulator, warp)
    if tf32:
        sch.transform_layout(accumulator, ("read", 0), lambda *index: (
            *index[:-2], index[-2] // FRAGMENT, index[-1] // FRAGMENT,
            *mma_tf32.accumulator_lane(index[-2] % FRAGMENT, index[-1] % FRAGMENT)))
    if output_tile is not None:
        sch.reverse_compute_at(output_tile, block, preserve_unit_loops=True)
        _spread(sch, output_tile, 1, warps)
    init = sch.decompose_reduction(fragment_gemm, (serial or [k_outer])[0])
    for stage in (*fragments, accumulator):
        i, j = sch.get_loops(stage)[-2:]
        i_outer, i_inner = sch.split(i, [None, FRAGMENT])
        j_outer, j_inner = sch.split(j, [None, FRAGMENT])
        sch.reorder(i_outer, j_outer, i_inner, j_inner)
    store_scope = "global" if output_tile is None else "shared"
    init_fill = sch.get_loops(sch.get_child_blocks(init)[0])[-2]
    if tf32:
        sch.tensorize(sch.get_loops(accumulator)[-2], mma_tf32.name(f"store_{store_scope}"))
        sch.tensorize(init_fill, mma_tf32.name("fill"))
        sch.tensorize(sch.get_loops(gemm)[-3], mma_tf32.name("mma"))
        return
    sch.tensorize(sch.get_loops(fragments[0])[-2], wmma.name("load_a", dtype))
    sch.tensorize(sch.get_loops(fragments[1])[-2], wmma.name("load_b", dtype))
    sch.tensorize(sch.get_loops(accumulator)[-2], wmma.name(f"store_{store_scope}", "float32"))
    sch.tensorize(init_fill, wmma.name("fill", "float32"))
    sch.tensorize(sch.get_loops(gemm)[-3], wmma.name("mma", dtype))


def _block_fragments(per_group: int) -> int:
    """Fragments per thread block along an axis of `per_group` elements per group (16 divides it)."""
    return _largest_divisor(per_group // FRAGMENT, MAX_BLOCK_FRAGMENTS)


def _fused_k(kh_size: int, kw_size: int):
    """The fused reduction index K = (c, kh, kw) of the GEMMs, c-major as the weight stores it."""
    return lambda c, kh, kw: (c * kh_size + kh) * kw_size + kw


def _tensor_core_forward(sch, groups: int) -> None:
    """The forward GEMM on WMMA fragments (module docstring): M = output channels (blocks of up to 64
    within a group), N = 64 positions, K = (c, kh, kw) of the group."""
    gemm = sch.get_sblock("deform_gemm")
    columns = sch.get_sblock("deform_columns")
    fused_k = _fused_k(*(_extent(sch, loop) for loop in sch.get_loops(columns)[2:4]))
    sch.transform_layout(columns, ("write", 0), lambda b, c, kh, kw, p: (b, fused_k(c, kh, kw), p))
    sch.transform_block_layout(columns, lambda b, c, kh, kw, p: (b, fused_k(c, kh, kw), p))
    sch.transform_block_layout(gemm, lambda b, oc, p, rc, rkh, rkw: (b, oc, p, fused_k(rc, rkh, rkw)))
    weight_tile = sch.reindex(gemm, ("read", 0))  # [O, K]: the weight's own memory order
    for tile in (weight_tile, columns):
        sch.set_scope(tile, 0, "shared")
    batch, channel, position, k = sch.get_loops(gemm)
    fragments = (_block_fragments(_extent(sch, channel) // groups), POSITION_TILE // FRAGMENT)
    steps = divisors(_extent(sch, k) // FRAGMENT, K_STEP_CANDIDATES)
    _gemm_on_fragments(sch, gemm, ([batch], channel, position, [], k), fragments, steps, (weight_tile, columns))
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
    if _on_tensor_cores(sch, "forward_gemm", dtype, _extent(sch, channel) // groups, k_per_group):
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


def _tensor_core_backward_data(sch, groups: int) -> None:
    """grad_columns on WMMA fragments: M = (c, kh, kw) (blocks of up to 64 within a group), N = 64
    positions, K = the group's output channels. The weight is staged transposed ([M, K], A) and the
    padded grad_output as it is ([K, positions], B); the accumulators go through a [M, 64] float32
    tile in shared memory to the [N, C, KH, KW, P] output, whose rows a fragment's 16 do not fit."""
    gemm = sch.get_sblock("grad_columns")
    fused_k = _fused_k(*(_extent(sch, loop) for loop in sch.get_loops(gemm)[2:4]))
    sch.transform_block_layout(gemm, lambda b, c, kh, kw, p, ro: (b, fused_k(c, kh, kw), p, ro))
    weight_tile = sch.reindex(gemm, ("read", 0))  # [C*KH*KW, O/groups]
    sch.set_scope(weight_tile, 0, "shared")
    grad_tile = sch.cache_read(gemm, 1, "shared")
    sch.compute_inline(sch.get_sblock("grad_output_padded"))
    output_tile = sch.reindex(gemm, ("write", 0))  # [N, C*KH*KW, P] -> grad_columns
    sch.set_scope(gemm, 0, "shared")
    batch, ck, position, k = sch.get_loops(gemm)
    fragments = (_block_fragments(_extent(sch, ck) // groups), POSITION_TILE // FRAGMENT)
    steps = divisors(_extent(sch, k) // FRAGMENT, K_STEP_CANDIDATES)
    _gemm_on_fragments(sch, gemm, ([batch], ck, position, [], k), fragments, steps, (weight_tile, grad_tile),
                       output_tile)
    bind_remaining(sch)


def backward_data(sch) -> None:
    """grad_columns on tensor cores where they apply (`_tensor_core_backward_data`), else one thread
    per element with its reduction serial; every other stage one thread per element."""
    gemm = sch.get_sblock("grad_columns")
    _, c, kh, kw, _, ro = sch.get_loops(gemm)
    c_per_group = int(sch.get(gemm).reads[0].source.shape[1])
    k_per_group = c_per_group * _extent(sch, kh) * _extent(sch, kw)
    if _on_tensor_cores(sch, "backward_data_gemm", _dtype(sch, gemm), _extent(sch, ro), k_per_group):
        _tensor_core_backward_data(sch, _extent(sch, c) // c_per_group)
        return
    sch.compute_inline(sch.get_sblock("grad_output_padded"))
    bind_remaining(sch)


def _tensor_core_backward_weight(sch, groups: int) -> None:
    """grad_weight_sum on WMMA fragments: M = output channels, N = (c, kh, kw) (blocks of up to 64
    within a group each), K = the positions of every image in turn. The padded grad_output is staged
    as it is ([M, positions], A); the gather writes the columns of each K step straight into shared
    memory, transposed to [positions, N] (B)."""
    gemm = sch.get_sblock("grad_weight_sum")
    columns = sch.get_sblock("deform_columns")
    fused_k = _fused_k(*(_extent(sch, loop) for loop in sch.get_loops(columns)[2:4]))
    sch.transform_layout(columns, ("write", 0), lambda b, c, kh, kw, p: (b, p, fused_k(c, kh, kw)))
    sch.transform_block_layout(columns, lambda b, c, kh, kw, p: (b, fused_k(c, kh, kw), p))
    sch.set_scope(columns, 0, "shared")
    grad_tile = sch.cache_read(gemm, 0, "shared", consumer_blocks=[gemm])
    sch.compute_inline(sch.get_sblock("grad_output_padded"))
    channel, ck, batch, position = sch.get_loops(gemm)
    fragments = (_block_fragments(_extent(sch, channel) // groups), _block_fragments(_extent(sch, ck)))
    steps = divisors(POSITION_TILE // FRAGMENT, K_STEP_CANDIDATES)
    _gemm_on_fragments(sch, gemm, ([], channel, ck, [batch], position), fragments, steps, (grad_tile, columns))
    bind_remaining(sch)


def backward_weight(sch) -> None:
    """grad_weight_sum on tensor cores where they apply (`_tensor_core_backward_weight`), else one
    thread per element with its reductions serial; every other stage one thread per element."""
    gemm = sch.get_sblock("grad_weight_sum")
    channel, ck, _, _ = sch.get_loops(gemm)
    _, c, kh, kw, _ = sch.get_loops(sch.get_sblock("deform_columns"))
    groups = _extent(sch, c) // (_extent(sch, ck) // (_extent(sch, kh) * _extent(sch, kw)))
    o_per_group = _extent(sch, channel) // groups
    if _on_tensor_cores(sch, "backward_weight_gemm", _dtype(sch, gemm), o_per_group, _extent(sch, ck)):
        _tensor_core_backward_weight(sch, groups)
        return
    bind_remaining(sch)


def scatter(sch) -> None:
    """Every sample its own thread, adding atomically; the deterministic scatter (no atomics) one thread
    per (image, channel) plane (see `scatter_grad_input`)."""
    bind_threads(sch, sch.get_loops(sch.get_sblock("scatter_grad_input")))


RULES = {
    "forward": forward,
    "backward_data": backward_data,
    "backward_weight": backward_weight,
    "scatter": scatter,
}
