"""Default `llvm` schedules: parallel over cores, vectorised, no tuning needed.

Each rule takes an `s_tir.Schedule` of the PrimFunc built by `dcn_tvm.compute` and finds the stages
by name. The GEMM-like stages use register-blocked micro-kernels that accumulate in registers while
the reduction streams through L1/L2: the forward (channels-last graph) a tile of positions x vectors
of output channels, the backward a block of channels x vectors of positions.
Tuning samples (`common.decide`) the channel block, the register tile and the positions per
parallel task; the defaults below are one point of that space.
"""

from __future__ import annotations

from .common import channels_last_copy, choose, decide, divisors, parallel_outer, stage_names

#: Positions per tile; the compute pads P to a multiple of this, so tiles never have tails.
POSITION_TILE = 32
#: The graphs: channels-last stages where every input pixel is sampled about once per kernel point
#: (dcn_tvm.geometry.conv.resolve_layout); the rules schedule either graph of every stage.
COMPUTE_OPTIONS = {"layout": "auto"}
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


def _channel_block(sch, loop, at_most: int = CHANNEL_BLOCKS[0]) -> int:
    """Output channels per register block: default the first of CHANNEL_BLOCKS up to `at_most`
    dividing the loop."""
    extent = _extent(sch, loop)
    return decide(sch, divisors(extent, CHANNEL_BLOCK_CANDIDATES),
                  _divisor(extent, [block for block in CHANNEL_BLOCKS if block <= at_most]))


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


def _sampling_tables(sch, corner_major: bool = False) -> None:
    """Every sampling table present (the unmasked one exists only with a mask) in parallel.

    `corner_major` stores the internal tables [.., corner, P] instead of [.., P, corner], so that the
    gather reads them with contiguous vector loads (tables the kernel returns keep their layout).
    """
    for name in stage_names(sch):
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


def _vector_width(sch, block) -> int:
    """Lanes of one vector register of the current target for the dtype `block` writes."""
    return _target_vector_bytes() * 8 // sch.get(block).writes[0].source.dtype.bits


def _lanes_dividing(sch, block, extent: int) -> int:
    """The widest vector of at most a register's lanes (a power of two) that divides `extent`."""
    width = _vector_width(sch, block)
    return next(v for v in (width, width // 2, width // 4, 2, 1) if extent % v == 0)


def _vector_registers() -> int:
    """Vector registers of the current target: 32 with AVX-512, else 16."""
    return 32 if _target_vector_bytes() == 64 else 16


def _vector_tile(sch, block, vector_extent: int) -> tuple[int, int]:
    """(lanes, vectors): the vectors of a register tile along an axis of `vector_extent`, as many as
    leave room for the accumulators of a few broadcast rows."""
    lanes = _lanes_dividing(sch, block, vector_extent)
    return lanes, _divisor(vector_extent // lanes, (3, 2, 1) if _vector_registers() == 16 else (4, 3, 2, 1))


def _register_tile(sch, block, vector_extent: int) -> tuple[int, int, int]:
    """(lanes, vectors, rows) of a register tile of `rows` positions (broadcast values) x `vectors`
    vectors (_vector_tile): accumulators, the vectors and one broadcast fit the register file.
    `rows` is tunable."""
    lanes, vectors = _vector_tile(sch, block, vector_extent)
    rows = _divisor(POSITION_TILE, (8,) if _vector_registers() == 32 and vectors <= 2 else (4,))
    return lanes, vectors, decide(sch, divisors(POSITION_TILE, CL_ROW_CANDIDATES), rows)


def _channels_last_input(sch) -> None:
    """input_channels_last [N, H, W, C] in blocks of the widest channel vector dividing C."""
    block = sch.get_sblock("input_channels_last")
    channels = _extent(sch, sch.get_loops(block)[-1])
    channels_last_copy(sch, "input_channels_last", _lanes_dividing(sch, block, channels))


#: Edge of the square tiles the transposing stages copy (both sides stay within a few cache lines).
TRANSPOSE_TILE = 16


def _weight_panels(sch, name: str, block: int) -> None:
    """Stage `name` [G, KH, KW, X, Y] (the weight with its vector axis Y last) stored in panels
    [G, Y / block, KH, KW, X, block], so that a register tile streams one contiguous panel (rows of
    Y floats would put every step of a panel in the same few cache sets). Copied panel by panel with
    the weight's own rows in the inner loops (the plain order read and wrote a page per element)."""
    packed = sch.get_sblock(name)
    sch.transform_layout(packed, ("write", 0), lambda g, i, j, x, y: (g, y // block, i, j, x, y % block))
    g, i, j, x, y = sch.get_loops(packed)
    inner = _divisor(block, (TRANSPOSE_TILE,))
    y_outer, y_tile, y_inner = sch.split(y, [None, block // inner, inner])
    sch.reorder(g, y_outer, x, y_tile, i, j, y_inner)
    sch.parallel(sch.fuse(g, y_outer))


def _output_from_channels_last(sch) -> None:
    """The output [N, O, OH, OW] from the GEMM's [N, P, G, O/G] in square tiles of positions x
    channels (a gather per vector of positions was 4x slower)."""
    block = sch.get_sblock("output")
    b, oc, y, x = sch.get_loops(block)
    p_outer, p_inner = sch.split(sch.fuse(y, x), [None, TRANSPOSE_TILE])
    o_outer, o_inner = sch.split(oc, [None, TRANSPOSE_TILE])
    sch.reorder(b, o_outer, p_outer, p_inner, o_inner)
    sch.parallel(sch.fuse(b, o_outer))


def _forward_channels_last(sch) -> None:
    """The channels-last forward: position tasks in parallel, each gathering its columns (contiguous
    channel vectors, no hardware gathers) and multiplying them by the weight, packed in panels of the
    register tile's width, in register tiles of `rows` positions x `vectors` vectors of output
    channels (a broadcast column value times weight vectors); the output stage transposes [N, P, O]
    to NCHW. Tile sizes follow the target's vector registers (see _target_vector_bytes)."""
    _sampling_tables(sch)
    _channels_last_input(sch)
    gemm = sch.get_sblock("deform_gemm_channels_last")
    b, p, g, oc, rkh, rkw, rc = sch.get_loops(gemm)
    o_size, p_size, k_size = _extent(sch, oc), _extent(sch, p), _extent(sch, rc) * _extent(sch, rkh) * _extent(sch, rkw)
    lanes, vectors, rows = _register_tile(sch, gemm, o_size)
    _weight_panels(sch, "weight_packed", vectors * lanes)
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
    _vectorize_innermost(sch, columns)
    _output_from_channels_last(sch)


def _vectorize_innermost(sch, block) -> None:
    """Vectorise the innermost loop of `block` (channels) by the widest vector dividing it."""
    loop = sch.get_loops(block)[-1]
    lanes = _lanes_dividing(sch, block, _extent(sch, loop))
    if lanes > 1:
        sch.vectorize(sch.split(loop, [None, lanes])[1])


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
    """Whichever forward graph the compute built (dcn_tvm.geometry.conv.resolve_layout)."""
    (_forward_channels_last if "deform_gemm_channels_last" in stage_names(sch) else _forward_channels_first)(sch)


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


def _derivative_tables_and_grad_output(sch) -> None:
    """The backward_data stages both graphs share: the derivative tables inlined where they are used
    (each is read once per gradient element), the other tables in parallel, and grad_output padded."""
    names = stage_names(sch)
    for name in ("sample_weights_unmasked", "sample_weights_dy", "sample_weights_dx"):
        if name in names:
            sch.compute_inline(sch.get_sblock(name))
    _sampling_tables(sch)
    # Materialised, not inlined: inlined, its p // OW, p % OW indexing defeats vector loads.
    parallel_outer(sch, "grad_output_padded", inner=1)


def _offset_and_mask_gradients(sch) -> None:
    for name in ("grad_offset", "grad_mask"):
        if name in stage_names(sch):
            parallel_outer(sch, name, inner=2)


#: Loop orders of the channels-last column-gradient GEMM within a position task (`choose`).
CL_GEMM_ORDERS = ("points_outer", "channels_outer")


def _backward_data_channels_last(sch) -> None:
    """The column gradient [N, P, KH, KW, G, C/G] as a GEMM vectorised over input channels, in
    parallel position tasks: register tiles of `rows` positions (broadcast grad_output values) x
    `vectors` vectors of channels of the transposed weight, packed in panels of the tile's width and
    summed over all output channels in registers. The corner sums are dot products of contiguous
    channel vectors of the column gradient and the channels-last input, the four corners of a
    position at once (the channel axis split into vector lanes by rfactor).

    (The corner sums cannot join the GEMM's tasks, where its tile is in L2: TVM moves a consumer under
    a loop only with all its producers, and the sampling tables they read are outputs at root.)"""
    _derivative_tables_and_grad_output(sch)
    _channels_last_input(sch)
    gcol = sch.get_sblock("grad_columns_channels_last")
    b, p, kh, kw, g, c, ro = sch.get_loops(gcol)
    lanes, vectors, rows = _register_tile(sch, gcol, _extent(sch, c))
    _weight_panels(sch, "weight_transposed", vectors * lanes)
    tasks = divisors(_extent(sch, p) or POSITION_TILE, CL_TASK_CANDIDATES)
    p_task, p_in = sch.split(p, [None, decide(sch, tasks, POSITION_TILE)])
    p_tile, p_row = sch.split(p_in, [None, rows])
    c_outer, c_vector, c_lane = sch.split(c, [None, vectors, lanes])
    # Within a task: kernel points outermost (a grad_output row serves every channel panel of a point
    # while it is in L1) or channel panels outermost (a weight panel serves every point).
    if choose("gemm_order", CL_GEMM_ORDERS, "points_outer") == "points_outer":
        sch.reorder(b, p_task, kh, kw, g, c_outer, p_tile, ro, p_row, c_vector, c_lane)
    else:
        sch.reorder(b, p_task, g, c_outer, kh, kw, p_tile, ro, p_row, c_vector, c_lane)
    sch.parallel(sch.fuse(b, p_task))
    sch.reverse_compute_at(sch.cache_write(gcol, 0, "local"), p_tile)
    sch.unroll(p_row)
    sch.unroll(c_vector)
    sch.vectorize(c_lane)
    sch.decompose_reduction(gcol, ro)

    corners = sch.get_sblock("grad_corner_weights")
    b, g, kh, kw, p, t, rc = sch.get_loops(corners)
    sch.parallel(sch.fuse(b, g, kh, kw))
    lanes = _lanes_dividing(sch, corners, _extent(sch, rc))
    if lanes > 1:
        rc_outer, rc_lane = sch.split(rc, [None, lanes])
        partial = sch.rfactor(rc_lane, factor_axis=6)  # [N, OG, KH, KW, P, 4, lanes]: lanes innermost
        # Per position: the column vector is read once for the four corners, whose partial sums
        # (a vector each) stay in registers over the channels.
        *_, position, t, rc_outer, rc_lane = sch.get_loops(partial)
        sch.reorder(rc_outer, t, rc_lane)
        sch.reverse_compute_at(sch.cache_write(partial, 0, "local"), position)
        sch.reverse_compute_at(corners, position)  # the lanes summed while they are in registers
        sch.unroll(t)
        sch.vectorize(rc_lane)
        sch.decompose_reduction(partial, rc_outer)
    _offset_and_mask_gradients(sch)


def backward_data(sch) -> None:
    """Whichever backward_data graph the compute built (dcn_tvm.geometry.conv.resolve_layout)."""
    (_backward_data_channels_last if "grad_columns_channels_last" in stage_names(sch) else
     _backward_data_channels_first)(sch)


def _backward_data_channels_first(sch) -> None:
    """grad_columns as a register-blocked GEMM; the corner sums for the offset/mask gradients."""
    _derivative_tables_and_grad_output(sch)
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
    _offset_and_mask_gradients(sch)


#: Positions per reduction chunk of the channels-last weight gradient when tuning (a chunk's columns
#: strip is gathered once and shared by every output-channel block).
CL_CHUNK_CANDIDATES = (32, 64, 128, 256, 512)
#: A chunk's columns strip stays under this many bytes by default (in L2 beside the grad_output rows).
CHUNK_COLUMN_BYTES = 128 * 1024
#: Loop orders of the channels-last weight gradient (`choose`): the reduction's chunks outside the
#: parallel strips, or inside them.
CL_REDUCTION_ORDERS = ("chunks_outer", "strips_outer")


def _backward_weight_channels_last(sch) -> None:
    """grad_weight_sum [O, KH, KW, C/G] as a GEMM vectorised over input channels: for each chunk of
    positions, strips (kernel point, `vectors` x `lanes` channels) in parallel, each gathering its
    columns [chunk, strip] once (contiguous channel vectors) and multiplying them into register tiles
    of `rows` output channels (broadcast grad_output values) x the strip, which accumulate in memory
    over the chunks."""
    _sampling_tables(sch)
    _channels_last_input(sch)
    parallel_outer(sch, "grad_output_padded", inner=1)
    ws = sch.get_sblock("grad_weight_sum_channels_last")
    oc, kh, kw, c, rb, rp = sch.get_loops(ws)
    lanes, vectors = _vector_tile(sch, ws, _extent(sch, c))
    # Rows of output channels: as many accumulators as the register file holds beside the vectors.
    rows = _channel_block(sch, oc, at_most=(_vector_registers() - vectors - 2) // vectors)
    strip = vectors * lanes
    item = sch.get(ws).writes[0].source.dtype.bits // 8
    chunks = divisors(_extent(sch, rp) or POSITION_TILE, CL_CHUNK_CANDIDATES)
    fitting = [size for size in chunks if size * strip * item <= CHUNK_COLUMN_BYTES] or chunks[:1]
    p_chunk, p_in = sch.split(rp, [None, decide(sch, chunks, fitting[-1])])
    o_outer, o_row = sch.split(oc, [None, rows])
    c_strip, c_vector, c_lane = sch.split(c, [None, vectors, lanes])
    if choose("reduction_order", CL_REDUCTION_ORDERS, "chunks_outer") == "chunks_outer":
        # Chunk by chunk, the strips in parallel: a chunk's input rows stay in cache for every strip.
        sch.reorder(rb, p_chunk, kh, kw, c_strip, o_outer, p_in, o_row, c_vector, c_lane)
        strips = sch.fuse(kh, kw, c_strip)
        sch.parallel(strips)
        gather_at = strips
    else:
        # Strips in parallel, each over every chunk: one parallel region, no barrier per chunk.
        sch.reorder(kh, kw, c_strip, rb, p_chunk, o_outer, p_in, o_row, c_vector, c_lane)
        sch.parallel(sch.fuse(kh, kw, c_strip))
        gather_at = p_chunk
    sch.unroll(o_row)
    sch.unroll(c_vector)
    sch.vectorize(c_lane)
    sch.decompose_reduction(ws, rb)
    columns = sch.get_sblock("deform_columns_channels_last")
    sch.compute_at(columns, gather_at)
    _vectorize_innermost(sch, columns)
    parallel_outer(sch, "grad_weight", inner=1)
    sch.parallel(sch.get_loops(sch.get_sblock("grad_bias_sum"))[0])


def backward_weight(sch) -> None:
    """Whichever backward_weight graph the compute built (dcn_tvm.geometry.conv.resolve_layout)."""
    (_backward_weight_channels_last if "grad_weight_sum_channels_last" in stage_names(sch) else
     _backward_weight_channels_first)(sch)


def _backward_weight_channels_first(sch) -> None:
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


def scatter_channels_last(sch) -> None:
    """One thread per (image, offset group, chunk of channels); each corner add a channel vector."""
    block = sch.get_sblock("scatter_grad_input")
    b, g, chunk, *_, lane = sch.get_loops(block)
    sch.parallel(sch.fuse(b, g, chunk))
    sch.vectorize(lane)
    b, g, rest, *_ = sch.get_loops(sch.get_sblock("scatter_grad_input_tail"))
    sch.parallel(sch.fuse(b, g, rest))


RULES = {
    "forward": forward,
    "backward_data": backward_data,
    "backward_weight": backward_weight,
    "scatter": scatter,
    "scatter_channels_last": scatter_channels_last,
}
