"""Default `llvm` schedules for dcnv3 (DCNv3 and DCNv4's aggregation): channels-last, vectors of a group's
channels, one parallel task per output row.

Every sample of group g reads the same GC contiguous channels of its four corner pixels, so the
gathers and the scatter's adds are vectors of the group's channels (GC = 16 in InternImage and
FlashInternImage: one AVX-512 register of float32). The sampling tables of a position are computed
just before its samples are read and stay in L1; no stage of the full output's size is materialised
besides the outputs. The backward's corner dot products over a group's channels are vectors of partial
sums (rfactor), then horizontal sums, four corners at a time. The scatter runs one task per (image,
group): the group's input-gradient channels receive from its own samples only, so the adds need no
atomics; it computes the positions of a pixel's samples once, before their corners.
"""

from __future__ import annotations

from .common import bound_loops, stage_names, vectorize_own_loop

#: Lanes of the corner dot products' partial sums: measured on AMD EPYC Zen 1 (AVX2), InternImage-T's first
#: stage (16 channels a group), one thread: 4 lanes 72 ms, 8 lanes 90, 16 lanes 110 (scalar: 135); four
#: partial vectors of four lanes make one 4 x 4 transpose for the horizontal sums.
DOT_LANES = 4

#: The sampling tables of the forward and backward graphs, inlined into their readers: they are
#: invariant in the channel vector, so each is computed once per sample and corner.
TABLES = ("sample_rows", "sample_cols", "sample_weights")


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _tables_at(sch, loop) -> None:
    """The sampling tables inlined, the positions of the samples computed under `loop`."""
    for name in sorted(set(TABLES) & stage_names(sch)):
        sch.compute_inline(sch.get_sblock(name))
    positions = sch.get_sblock("sample_positions")
    sch.compute_at(positions, loop)
    sch.unroll(sch.get_loops(positions)[-1])


def forward(sch) -> None:
    """Parallel over (n, ho); per (wo, g) the tables of the group's points, then their weighted sum
    over the points as vectors of the group's channels, then the cast into the output."""
    output = sch.get_sblock("output")
    aggregate = sch.get_sblock("aggregate")
    n, y, x, g, c = sch.get_loops(aggregate)[:5]
    sch.parallel(sch.fuse(n, y))
    sch.reverse_compute_at(output, g)
    _tables_at(sch, g)
    c, p = sch.get_loops(aggregate)[-2:]
    sch.reorder(p, c)
    sch.vectorize(c)
    sch.decompose_reduction(aggregate, p)
    vectorize_own_loop(sch, output)


def backward(sch) -> None:
    """Parallel over (n, ho); per wo: the positions, then per sample the four corner dot products over
    its group's channels (vectors of DOT_LANES partial sums, then their horizontal sums), the gradients
    of every sample, and their place in the outputs."""
    dots = sch.get_sblock("corner_dots")
    channels = sch.get_loops(dots)[-1]
    lanes = next(lanes for lanes in (DOT_LANES, 2, 1) if _extent(sch, channels) % lanes == 0)
    partial = sch.rfactor(sch.split(channels, [None, lanes])[1], factor_axis=6)
    if "grad_offset_mask" in stage_names(sch):  # DCNv4: one output
        n, y, x, channels = sch.get_loops(sch.get_sblock("grad_offset_mask"))
        sch.parallel(sch.fuse(n, y))
        # A loop over each group's 3P channels: a channel's group and point become loop variables, not
        # divisions by 3P (stage 1 of InternImage-T, one thread, Zen 1: 93 -> 81 ms); unrolled, constants
        # (stage 1, 4 x 27 channels padded to 112: 81-85 -> 72-78 ms, DCNv3's time; stage 2, 8 x 27 = 216 with
        # no padding: no change).
        points, gradients = sch.get(sch.get_sblock("grad_sample")).writes[0].source.shape[-2:]
        sch.unroll(sch.split(channels, [None, int(points) * int(gradients)])[1])
    else:  # DCNv3: two outputs, their loops merged
        outputs = [sch.get_sblock(name) for name in ("grad_offset", "grad_mask")]
        sch.parallel(sch.merge(*[sch.fuse(*sch.get_loops(block)[:2]) for block in outputs]))
        x = sch.merge(*[sch.get_loops(block)[1] for block in outputs])
    for block in (sch.get_sblock("grad_sample"), dots):
        sch.compute_at(block, x)
    sch.unroll(sch.get_loops(sch.get_sblock("grad_sample"))[-1])
    # The horizontal sums of a sample (loops g, p, corner, lane), its partial sums computed just before.
    lane, _, _, _, *sample = bound_loops(sch, dots)  # lane, n, y, x, g, p, corner; None: no loop
    loops, sample = sch.get_loops(dots), [i for i in sample if i is not None]
    if lane is not None:
        sch.reorder(*[loops[i] for i in sample], loops[lane])
    sch.compute_at(partial, loops[sample[-2]] if len(sample) > 1 else x)
    _tables_at(sch, x)
    lane, *_, corner, outer = bound_loops(sch, partial)  # rfactor puts the lane iterator first
    loops = sch.get_loops(partial)
    inner = [loops[i] for i in (outer, lane) if i is not None]  # no loop for an extent of 1
    sch.reorder(loops[corner], *inner)
    sch.unroll(loops[corner])
    if lane is not None:
        sch.vectorize(loops[lane])
    if inner:
        sch.decompose_reduction(partial, inner[0])


def scatter(sch) -> None:
    """One task per (image, group); per output pixel the positions of the group's points, then their
    corners' adds, vectors of the group's channels, the points unrolled (InternImage-T's first stage,
    one thread, Zen 1: 97-112 -> 74-78 ms, from a sample's position recomputed at every corner in a loop
    over the points)."""
    block = sch.get_sblock("scatter_grad_input")
    b, g, _, x, points, corner, c = sch.get_loops(block)
    sch.parallel(sch.fuse(b, g))
    sch.compute_at(sch.get_sblock("sample_positions"), x)
    sch.unroll(points)
    sch.unroll(corner)
    sch.vectorize(c)


RULES = {"forward": forward, "backward": backward, "scatter": scatter}
