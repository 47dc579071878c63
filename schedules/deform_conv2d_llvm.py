"""Default `llvm` schedules: parallel over cores, vectorised, no tuning needed.

Each rule takes an `s_tir.Schedule` of the PrimFunc built by `dcn_tvm.compute` and finds the stages
by name. The GEMM-like stages use register-blocked micro-kernels that accumulate in registers while
the reduction streams through L1/L2: the forward (channels-last graph) a tile of positions x vectors
of output channels, the backward a block of channels x vectors of positions.
Tuning samples (`common.decide`) the channel block, the register tile and the positions per
parallel task; the defaults below are one point of that space.
"""

from __future__ import annotations

from .common import choose, decide, divisors, parallel_outer

#: Positions per tile; the compute pads P to a multiple of this, so tiles never have tails.
POSITION_TILE = 32
#: The forward graph: channels-last stages where every input pixel is sampled about once per kernel
#: point (dcn_tvm.compute.deform_conv2d.resolve_forward_layout); the rules schedule either graph.
COMPUTE_OPTIONS = {"forward_layout": "auto"}
#: Bytes per vector register (AVX-512); narrower ISAs split the vectors, which LLVM does well.
VECTOR_BYTES = 64
#: Register-block heights: the default is the first dividing the channels, tuning tries every divisor.
CHANNEL_BLOCKS, CHANNEL_BLOCK_CANDIDATES = (8, 6, 4, 3, 2), (1, 2, 3, 4, 6, 8, 12, 16)
#: POSITION_TILE tiles per parallel task when tuning (the default is 1).
TASK_TILE_CANDIDATES = (1, 2, 3, 4, 5, 6, 8)
#: Vectors per register tile when tuning (the default fills POSITION_TILE).
CHUNK_CANDIDATES = (1, 2, 4)
#: Gather loop orders (`choose`): each channel over every kernel point, or each kernel point over
#: every channel. Which is faster depends on the channel count and the cache sizes.
GATHER_ORDERS = ("channels_outer", "points_outer")
#: Where the corner sums of the offset/mask gradients accumulate (`choose`, see _grad_corner_weights).
CORNER_SUM_ORDERS = ("registers", "memory")


def _lanes(sch, block) -> int:
    """Vector lanes for the accumulator dtype of `block` (16 for float32, 8 for float64)."""
    dtype = sch.get(block).writes[0].source.dtype
    return VECTOR_BYTES * 8 // dtype.bits


def _extent(sch, loop) -> int | None:
    """The static extent of `loop`, None when symbolic."""
    return getattr(sch.get(loop).extent, "value", None)


def _divisor(value, candidates) -> int:
    """The first candidate dividing the static `value` (1 if none does)."""
    return next(iter(divisors(value, candidates)), 1)


def _channel_block(sch, loop) -> int:
    """Output channels per register block: default the first of CHANNEL_BLOCKS dividing the loop."""
    extent = _extent(sch, loop)
    return decide(sch, divisors(extent, CHANNEL_BLOCK_CANDIDATES), _divisor(extent, CHANNEL_BLOCKS))


def _split_positions(sch, loop, lanes):
    """Split the padded position loop into (task, tile, chunk, lane).

    A parallel task covers POSITION_TILE positions by default; a register tile is `chunk` x `lane`
    positions, all of POSITION_TILE by default (tile = 1). Every candidate divides the padded
    position count, so no loop has a tail; a symbolic count keeps the default task.
    """
    extent = _extent(sch, loop)
    tiles = divisors(extent // POSITION_TILE, TASK_TILE_CANDIDATES) if extent else []
    task = decide(sch, [POSITION_TILE * t for t in tiles], POSITION_TILE)
    chunks = decide(sch, divisors(POSITION_TILE // lanes, CHUNK_CANDIDATES), POSITION_TILE // lanes)
    p_task, p_in = sch.split(loop, [None, task])
    return (p_task, *sch.split(p_in, [None, chunks, lanes]))


def _microkernel(sch, block, parallel_loops, channel_loop, position_loop, reduction_loops, unrolled=()):
    """Tile `channel_loop` x `position_loop` into a register block and put the reduction inside it.

    Loop order: parallel(parallel_loops, position task) / channel block / position tile / reduction /
    unrolled / channel in block / position vector chunks (unrolled) / vector lanes.
    Returns the fused parallel loop (where callers compute the gather).
    """
    p_task, p_tile, p_chunk, p_lane = _split_positions(sch, position_loop, _lanes(sch, block))
    c_outer, c_inner = sch.split(channel_loop, [None, _channel_block(sch, channel_loop)])
    sch.reorder(*parallel_loops, p_task, c_outer, p_tile, *reduction_loops, *unrolled, c_inner, p_chunk, p_lane)
    fused = sch.fuse(*parallel_loops, p_task)
    sch.parallel(fused)
    accumulator = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulator, p_tile)
    for loop in (*unrolled, c_inner, p_chunk):
        sch.unroll(loop)
    sch.vectorize(p_lane)
    sch.decompose_reduction(block, reduction_loops[0])
    return fused


def _corner_major(b, g, kh, kw, p, t):
    """Layout of a per-corner table [.., P, corner] stored as [.., corner, P] (contiguous vectors of P)."""
    return b, g, kh, kw, t, p


def _stage_names(sch) -> set[str]:
    return {sch.get(block).name_hint for block in sch.get_child_blocks(sch.get_sblock("root"))}


def _sampling_tables(sch, corner_major: bool = False) -> None:
    """Every sampling table present (the unmasked one exists only with a mask) in parallel.

    `corner_major` stores the internal tables [.., corner, P] instead of [.., P, corner], so that the
    gather reads them with contiguous vector loads (tables the kernel returns keep their layout).
    """
    for name in _stage_names(sch):
        if not name.startswith("sample_"):
            continue
        if corner_major and name != "sample_coords":
            block = sch.get_sblock(name)
            sch.transform_layout(block, ("write", 0), _corner_major)
            b, g, kh, kw, p, t = sch.get_loops(block)
            sch.reorder(t, p)
            sch.parallel(sch.fuse(b, g, kh, kw))
        else:
            parallel_outer(sch, name, inner=2)


def _target_vector_bytes() -> int:
    """Bytes per vector register of the current target (the host's when none is current): 64 with
    AVX-512, 32 with AVX2, else 16."""
    from dcn_tvm._tvm import tvm

    target = tvm().target.Target.current(allow_none=True) or tvm().target.Target.from_device(tvm().cpu())
    has = tvm().target.codegen.llvm_cpu_has_features
    return next((size for feature, size in (("avx512f", 64), ("avx2", 32)) if has(feature, target)), 16)


#: Columns of one parallel task (positions x KH*KW*C) stay under this many bytes by default (half an
#: L2 of 512 KiB), so that a task's columns and the weight panel they meet share the L2.
TASK_COLUMN_BYTES = 256 * 1024
#: Positions per task and register-tile rows (positions) when tuning; the vectors of output channels
#: per tile are fixed, the weight's packed layout follows them.
CL_TASK_CANDIDATES, CL_ROW_CANDIDATES = (8, 16, 32, 64, 96, 128), (2, 4, 8)
#: How the forward GEMM reduces (`choose`): the whole KH*KW*C in registers per task, or kernel point
#: by kernel point into memory (for many channels, where a whole-K task holds too few positions).
GEMM_REDUCTIONS = ("whole", "per_point")


def _forward_channels_last(sch) -> None:
    """The channels-last forward: position tasks in parallel, each gathering its columns (contiguous
    channel vectors, no hardware gathers) and multiplying them by the weight, packed in panels of the
    register tile's width, in register tiles of `rows` positions x `vectors` vectors of output
    channels (a broadcast column value times weight vectors); the output stage transposes [N, P, O]
    to NCHW. Tile sizes follow the target's vector registers (see _target_vector_bytes)."""
    _sampling_tables(sch)
    parallel_outer(sch, "input_channels_last", inner=2)
    gemm = sch.get_sblock("deform_gemm_channels_last")
    b, p, g, oc, rkh, rkw, rc = sch.get_loops(gemm)
    vector_bytes = _target_vector_bytes()
    width = vector_bytes * 8 // sch.get(gemm).writes[0].source.dtype.bits
    o_size, p_size, k_size = _extent(sch, oc), _extent(sch, p), _extent(sch, rc) * _extent(sch, rkh) * _extent(sch, rkw)
    lanes = next(v for v in (width, width // 2, width // 4, 2, 1) if o_size % v == 0)
    # Accumulators + weight vectors + one broadcast fit the register file (16 vector registers
    # without AVX-512, 32 with it).
    registers = 32 if vector_bytes == 64 else 16
    vectors = _divisor(o_size // lanes, (3, 2, 1) if registers == 16 else (4, 3, 2, 1))
    rows = _divisor(POSITION_TILE, (8,) if registers == 32 and vectors <= 2 else (4,))
    rows = decide(sch, divisors(POSITION_TILE, CL_ROW_CANDIDATES), rows)
    # The weight in panels [G, O / block, KH, KW, C/G, block]: a register tile streams one contiguous
    # panel (rows of O floats would put every k of a panel in the same few cache sets).
    block = vectors * lanes
    packed = sch.get_sblock("weight_packed")
    sch.transform_layout(packed, ("write", 0), lambda g, i, j, c, o: (g, o // block, i, j, c, o % block))
    parallel_outer(sch, "weight_packed", inner=2)
    tasks = divisors(p_size or POSITION_TILE, CL_TASK_CANDIDATES)  # a symbolic P is a multiple of POSITION_TILE
    item = sch.get(gemm).writes[0].source.dtype.bits // 8
    points = _extent(sch, rkh) * _extent(sch, rkw)
    whole = [t for t in tasks if t <= POSITION_TILE and t * k_size * item <= TASK_COLUMN_BYTES]
    whole_k = choose("gemm_reduction", GEMM_REDUCTIONS, "whole" if POSITION_TILE in whole else "per_point") == "whole"
    # "whole": a task gathers its columns [task, KH, KW, C] at once and each register tile holds its
    # sums over the whole reduction. "per_point" (many channels): a task gathers one kernel point
    # [task, C] at a time and the tiles accumulate in memory over the points, so that many more
    # positions share each weight panel.
    fitting = whole if whole_k else [t for t in tasks if t * k_size // points * item <= TASK_COLUMN_BYTES]
    p_task, p_in = sch.split(p, [None, decide(sch, tasks, (fitting or [min(tasks)])[-1])])
    p_tile, p_row = sch.split(p_in, [None, rows])
    o_outer, o_vector, o_lane = sch.split(oc, [None, vectors, lanes])
    if whole_k:
        sch.reorder(b, p_task, g, o_outer, p_tile, rkh, rkw, rc, p_row, o_vector, o_lane)
    else:
        sch.reorder(b, p_task, rkh, rkw, g, o_outer, p_tile, rc, p_row, o_vector, o_lane)
    fused = sch.fuse(b, p_task)
    if whole_k:
        sch.reverse_compute_at(sch.cache_write(gemm, 0, "local"), p_tile)
    sch.parallel(fused)
    sch.unroll(p_row)
    sch.unroll(o_vector)
    sch.vectorize(o_lane)
    sch.decompose_reduction(gemm, rkh)
    columns = sch.get_sblock("deform_columns_channels_last")
    sch.compute_at(columns, fused if whole_k else rkw)
    c = sch.get_loops(columns)[-1]
    c_lanes = next(v for v in (width, width // 2, width // 4, 2, 1) if _extent(sch, c) % v == 0)
    if c_lanes > 1:
        sch.vectorize(sch.split(c, [None, c_lanes])[1])
    parallel_outer(sch, "output", inner=2)


def _forward_channels_first(sch) -> None:
    """Tables at root; the gather of one position task (all channels) computed inside the GEMM's
    parallel loop, so the columns never exist beyond one L2-sized task."""
    _sampling_tables(sch, corner_major=True)
    gemm = sch.get_sblock("deform_gemm")
    b, oc, p, rc, rkh, rkw = sch.get_loops(gemm)
    tile_loop = _microkernel(sch, gemm, [b], oc, p, [rc, rkh, rkw])
    columns = sch.get_sblock("deform_columns")
    sch.compute_at(columns, tile_loop)
    gather = sch.get_loops(columns)[1:]  # under the parallel loop; unit loops are left out
    if choose("gather_order", GATHER_ORDERS, "channels_outer") == "points_outer" and len(gather) == 4:
        c, kh, kw, p = gather
        sch.reorder(kh, kw, c, p)
    parallel_outer(sch, "output", inner=2)


def forward(sch) -> None:
    """Whichever forward graph the compute built (dcn_tvm.compute.deform_conv2d.resolve_forward_layout)."""
    (_forward_channels_last if "deform_gemm_channels_last" in _stage_names(sch) else _forward_channels_first)(sch)


def _grad_corner_weights(sch) -> None:
    """The channel sum of each corner, vectorised over positions.

    `registers`: each parallel task owns a few position vectors and keeps their four corner sums in
    registers over all channels; `memory`: each task owns a kernel point, channels outermost, the sums
    accumulated in memory (fewer, longer tasks).
    """
    block = sch.get_sblock("grad_corner_weights")
    sch.transform_layout(block, ("write", 0), _corner_major)
    b, g, kh, kw, p, t, rc = sch.get_loops(block)
    lanes = _lanes(sch, block)
    if choose("corner_sums", CORNER_SUM_ORDERS, "registers") == "registers":
        chunks = decide(sch, divisors(POSITION_TILE // lanes, CHUNK_CANDIDATES), POSITION_TILE // lanes)
        p_task, p_chunk, p_lane = sch.split(p, [None, chunks, lanes])
        sch.reorder(b, g, kh, kw, p_task, rc, t, p_chunk, p_lane)
        sch.parallel(sch.fuse(b, g, kh, kw, p_task))
        accumulator = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(accumulator, sch.get_loops(block)[0])
        sch.unroll(t)
        sch.unroll(p_chunk)
        # p_lane is left to LLVM's loop vectoriser, which emits hardware gathers; TVM's `vectorize`
        # splits the indirect loads into one scalar load per lane (1.2x slower here).
    else:
        p_vector, p_lane = sch.split(p, [None, lanes])
        sch.reorder(b, g, kh, kw, rc, p_vector, t, p_lane)
        sch.parallel(sch.fuse(b, g, kh, kw))
        sch.unroll(t)
        sch.vectorize(p_lane)
    sch.decompose_reduction(block, rc)


def backward_data(sch) -> None:
    """grad_columns as a register-blocked GEMM; the corner sums for the offset/mask gradients."""
    names = _stage_names(sch)
    # Read once per gradient element: computed where they are used.
    for name in ("sample_weights_unmasked", "sample_weights_dy", "sample_weights_dx"):
        if name in names:
            sch.compute_inline(sch.get_sblock(name))
    _sampling_tables(sch)
    # Materialised, not inlined: inlined, its p // OW, p % OW indexing defeats vector loads.
    parallel_outer(sch, "grad_output_padded", inner=1)
    gcol = sch.get_sblock("grad_columns")
    b, c, kh, kw, p, ro = sch.get_loops(gcol)
    # Register block: the KH*KW kernel points of one channel share each grad_output vector. Position
    # tasks outermost, so a task's grad_output stays in L2 while every channel reads it.
    p_task, p_tile, p_chunk, p_lane = _split_positions(sch, p, _lanes(sch, gcol))
    sch.reorder(b, p_task, c, p_tile, ro, kh, kw, p_chunk, p_lane)
    sch.parallel(sch.fuse(b, p_task))
    accumulator = sch.cache_write(gcol, 0, "local")
    sch.reverse_compute_at(accumulator, p_tile)
    for loop in (kh, kw, p_chunk):
        sch.unroll(loop)
    sch.vectorize(p_lane)
    sch.decompose_reduction(gcol, ro)
    _grad_corner_weights(sch)
    for name in ("grad_offset", "grad_mask"):
        if name in names:
            parallel_outer(sch, name, inner=2)


def backward_weight(sch) -> None:
    """grad_weight[o, (c, kh, kw)] = sum over (n, p) of grad_output[n, o, p] * columns[n, (c, kh, kw), p].

    The columns are materialised position-major ([N, P, C, KH, KW], by transform_layout) so that a
    register block of output channels x a vector of (c, kh, kw) accumulates over all positions with
    contiguous vector loads and broadcast grad_output values.
    """
    _sampling_tables(sch)
    columns = sch.get_sblock("deform_columns")
    sch.transform_layout(columns, ("write", 0), lambda b, c, kh, kw, p: (b, p, c, kh, kw))
    b, c, kh, kw, p = sch.get_loops(columns)
    if choose("gather_order", GATHER_ORDERS, "channels_outer") == "points_outer":
        sch.reorder(b, p, kh, kw, c)
    else:
        sch.reorder(b, p, c, kh, kw)
    sch.parallel(sch.fuse(b, p))
    parallel_outer(sch, "grad_output_padded", inner=1)

    gw = sch.get_sblock("grad_weight_sum")
    oc, ck, rb, rp = sch.get_loops(gw)
    lanes, ck_extent = _lanes(sch, gw), _extent(sch, ck)
    tile = _divisor(ck_extent, (2 * lanes, lanes, 8, 4, 2))
    width = min(lanes, tile)
    chunks = decide(sch, divisors(ck_extent // width, CHUNK_CANDIDATES), tile // width)
    o_outer, o_inner = sch.split(oc, [None, _channel_block(sch, oc)])
    ck_outer, ck_chunk, ck_lane = sch.split(ck, [None, chunks, width])
    # (c, kh, kw) strips outermost: consecutive tasks reuse one strip of columns from L2.
    sch.reorder(ck_outer, o_outer, rb, rp, o_inner, ck_chunk, ck_lane)
    sch.parallel(sch.fuse(ck_outer, o_outer))
    accumulator = sch.cache_write(gw, 0, "local")
    sch.reverse_compute_at(accumulator, sch.get_loops(gw)[0])
    sch.unroll(o_inner)
    sch.unroll(ck_chunk)
    sch.vectorize(ck_lane)
    sch.decompose_reduction(gw, rb)
    parallel_outer(sch, "grad_weight", inner=1)
    bias = sch.get_sblock("grad_bias_sum")
    sch.parallel(sch.get_loops(bias)[0])


def scatter(sch) -> None:
    """One thread per (image, channel) plane: the planes partition the writes (no atomics)."""
    block = sch.get_sblock("scatter_grad_input")
    b, c, *_ = sch.get_loops(block)
    sch.parallel(sch.fuse(b, c))


RULES = {
    "forward": forward,
    "backward_data": backward_data,
    "backward_weight": backward_weight,
    "scatter": scatter,
}
