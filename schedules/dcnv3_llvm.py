"""Default `llvm` schedules for dcnv3 (DCNv3 and DCNv4's aggregation): channels-last, vectors of a group's
channels, one parallel task per output row.

Every sample of group g reads the same GC contiguous channels of its four corner pixels, so the
gathers and the scatter's adds are vectors of the group's channels (GC = 16 in InternImage and
FlashInternImage: one AVX-512 register of float32). The sampling tables of a position are computed
just before its samples are read and stay in L1; no stage of the full output's size is materialised
besides the outputs. The scatter runs one task per (image, group): the group's input-gradient channels
receive from its own samples only, so the adds need no atomics.
"""

from __future__ import annotations

from .common import stage_names, vectorize_own_loop

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
    """Parallel over (n, ho); per wo: the positions, the corner dot products over each group's
    channels, the gradients of every sample, and their place in the outputs."""
    if "grad_offset_mask" in stage_names(sch):  # DCNv4: one output, its producers moved under its loops
        n, y, x, _ = sch.get_loops(sch.get_sblock("grad_offset_mask"))
        sch.parallel(sch.fuse(n, y))
        for name in ("grad_sample", "corner_dots"):
            sch.compute_at(sch.get_sblock(name), x)
        _tables_at(sch, x)
        sch.unroll(sch.get_loops(sch.get_sblock("grad_sample"))[-1])
    else:  # DCNv3: two outputs, moved under their producers' loops
        n, y, x = sch.get_loops(sch.get_sblock("corner_dots"))[:3]
        sch.parallel(sch.fuse(n, y))
        _tables_at(sch, x)
        for name in ("grad_sample", "grad_offset", "grad_mask"):
            sch.reverse_compute_at(sch.get_sblock(name), x)
        sch.unroll(sch.get_loops(sch.get_sblock("grad_sample"))[-1])


def scatter(sch) -> None:
    """One task per (image, group), the adds vectors of the group's channels."""
    block = sch.get_sblock("scatter_grad_input")
    b, g, *_, corner, c = sch.get_loops(block)
    sch.parallel(sch.fuse(b, g))
    sch.unroll(corner)
    sch.vectorize(c)


RULES = {"forward": forward, "backward": backward, "scatter": scatter}
