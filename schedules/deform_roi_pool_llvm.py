"""Default `llvm` schedules for deform_roi_pool: every stage parallel over its outer loops.

Each output element is a short reduction (S x S samples, 4 gathers each), so the stages parallelise
over their spatial loops and keep the reductions serial inside. The gathers run in parallel over
(channel, bin) with a serial RoI loop inside: every RoI reads the same input plane back to back
while it is in cache (RoI-major order sweeps the whole input once per RoI), and the parallel index
splits by constants only (fusing the symbolic RoI count in would cost integer divisions per bin).

Plain (group_size 1) pooling runs channels-last (COMPUTE_OPTIONS, dcn_tvm.geometry.roi_pool.resolve_layout):
all channels of a sample share its pixels and weights, so the input copied to [N, H, W, C'] (C' padded to
a multiple of 16) turns the four corner gathers, and the scatter's four corner adds, into vector
operations over a chunk of channels; the chunks run in parallel.
"""

from __future__ import annotations

import itertools

from .common import channels_last_copy, count_iters, divisors, parallel_outer, stage_names

#: The stages that gather from the input, with the RoI loop first (compute order).
GATHERS = ("pool_sum", "grad_offset_bins")
#: float32 lanes of the widest vector every x86-64 target here has (AVX2), and the channel chunks
#: tried, largest first: a chunk's input slab, H x W x chunk, should stay in L2.
VECTOR, CHUNKS = 8, (64, 32, 16, 8)
#: The graphs: channels-last for group_size 1 (dcn_tvm.geometry.roi_pool.resolve_layout).
COMPUTE_OPTIONS = {"layout": "auto"}


def _shape(buffer) -> list[int | None]:
    return [int(d) if hasattr(d, "value") else None for d in buffer.shape]


def _channels_last_pool(sch) -> tuple[str, ...]:
    """The channels-last graph (group_size 1, see dcn_tvm.compute.deform_roi_pool.forward): the input
    copied to [N, H, W, C'] a vector of channels at a time, pool_sum [R, k, k, C'] vectorised over
    chunks of channels that run in parallel (each chunk's slab of the input stays in cache over every
    RoI), the output read back VECTOR channels at a time. Returns the stages it scheduled, none for
    the channels-first graph."""
    if "input_channels_last" not in stage_names(sch):
        return ()
    channels_last_copy(sch, "input_channels_last", VECTOR)
    copy = sch.get_sblock("input_channels_last")
    block = sch.get_sblock("pool_sum")
    r, i, j, c, rb, ra = sch.get_loops(block)
    chunk = divisors(_extent(sch, c), CHUNKS)[0]
    outer, middle, lanes = sch.split(c, [None, chunk // VECTOR, VECTOR])
    sch.reorder(outer, r, i, j, rb, ra, middle, lanes)
    sch.parallel(outer)
    sch.vectorize(lanes)  # before decompose_reduction: vectorize wants the block with its init
    init = sch.decompose_reduction(block, rb)
    sch.vectorize(sch.get_loops(init)[-1])
    output = sch.get_sblock("output")
    r, c, i, j = sch.get_loops(output)
    sch.reorder(r, i, j, c)
    sch.parallel(r)
    return tuple(sch.get(b).name_hint for b in (copy, init, block, output))


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _parallel_static(sch, loops) -> None:
    """Run `loops` (a stage's spatial loops) in parallel over the fused leading loops of constant
    extent, or over the first loop alone where it is symbolic (the RoI count): fusing a symbolic
    extent in costs an integer division by it per element."""
    static = list(itertools.takewhile(lambda loop: hasattr(sch.get(loop).extent, "value"), loops))
    sch.parallel(sch.fuse(*static) if len(static) > 1 else (static or loops)[0])


def stages(sch, done=()) -> None:
    """Every root stage not in `done` in parallel, its reductions serial inside: the gathers over
    (channel, bin) with the RoIs inside, the others over their leading constant loops (_parallel_static)."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        name, reductions = sch.get(block).name_hint, count_iters(sch, block, reduction=True)
        if name in done:
            continue
        if name in GATHERS:
            roi, *others = sch.get_loops(block)[: -reductions]
            sch.reorder(*others, roi)
            sch.parallel(sch.fuse(*others))
        else:
            _parallel_static(sch, sch.get_loops(block)[: len(sch.get_loops(block)) - reductions])


#: The sampling tables ([NC', k, k, R, S, 2], see dcn_tvm.compute.deform_roi_pool).
TABLES = ("sample_rows", "sample_row_weights", "sample_cols", "sample_col_weights")


def _tables_per_roi(sch) -> tuple[str, ...]:
    """Where every output channel has its own offset class (class-aware deformable PS pooling), no
    two channels share a table entry: compute each RoI's entries inside the gather, just before they
    are used, instead of writing all the tables out and reading them back. Returns the stages moved."""
    gather = sch.get_sblock("pool_sum")
    classes = _shape(sch.get(sch.get_sblock(TABLES[0])).writes[0].source)[0]
    if classes != _shape(sch.get(gather).writes[0].source)[1]:
        return ()
    stages(sch, done=TABLES)  # the gather's loops: (channel, bin) in parallel, RoIs inside
    roi = sch.get_loops(gather)[1]
    for name in TABLES:
        sch.compute_at(sch.get_sblock(name), roi)
    return TABLES


def forward(sch) -> None:
    done = _channels_last_pool(sch)
    if not done and _tables_per_roi(sch):
        return
    stages(sch, done=done)


def scatter(sch) -> None:
    """Channels-first: one thread per input channel; channels-last: one per chunk of channels, each add
    a vector of them. Either way the channels partition the writes (no atomics)."""
    block = sch.get_sblock("scatter_grad_input")
    loops = sch.get_loops(block)
    if len(loops) == 1:
        parallel_outer(sch, "scatter_grad_input", inner=0)
        return
    sch.parallel(loops[0])
    sch.vectorize(loops[-1])


RULES = {"forward": forward, "backward": stages, "scatter": scatter}
