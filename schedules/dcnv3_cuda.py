"""Default `cuda` schedules for dcnv3 (DCNv3 and DCNv4's aggregation): one thread per output element.

The sampling tables are inlined into their readers (a thread recomputes its sample's corners: a few
dozen flops against global-memory round trips); every other stage gets one thread per element of its
spatial loops, a reduction (the aggregate over the points, the corner dot products over the group's
channels) running serially in its thread. The scatter gives every (sample, channel) its own thread,
adding the four corners atomically; neighbouring threads add neighbouring channels.
"""

from __future__ import annotations

from .common import bind_threads, count_iters, stage_names

TABLES = ("sample_positions", "sample_rows", "sample_cols", "sample_weights")


def stages(sch) -> None:
    for name in sorted(set(TABLES) & stage_names(sch)):  # the backward graph has no sample_weights
        sch.compute_inline(sch.get_sblock(name))
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        bind_threads(sch, sch.get_loops(block)[:count_iters(sch, block, reduction=False)])


def scatter(sch) -> None:
    """A thread per (sample, channel), adding the four corners in turn."""
    *sample, corner, c = sch.get_loops(sch.get_sblock("scatter_grad_input"))
    sch.reorder(c, corner)
    bind_threads(sch, [*sample, c])


RULES = {"forward": stages, "backward": stages, "scatter": scatter}
