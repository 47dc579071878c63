"""Default `llvm` schedules for deform_roi_pool: every stage parallel over its outer loops.

Each output element is a short reduction (S x S samples, 4 gathers each), so the stages parallelise
over their spatial loops and keep the reductions serial inside. The gathers run in parallel over
(channel, bin) with a serial RoI loop inside: every RoI reads the same input plane back to back
while it is in cache (RoI-major order sweeps the whole input once per RoI), and the parallel index
splits by constants only (fusing the symbolic RoI count in would cost integer divisions per bin).
"""

from __future__ import annotations

from .common import count_iters, parallel_outer

#: The stages that gather from the input, with the RoI loop first (compute order).
GATHERS = ("pool_sum", "grad_offset_bins")


def stages(sch) -> None:
    """Every root stage parallel over its fused spatial loops, its reduction loops serial inside."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        name, reductions = sch.get(block).name_hint, count_iters(sch, block, reduction=True)
        if name in GATHERS:
            roi, *others = sch.get_loops(block)[: -reductions]
            sch.reorder(*others, roi)
            sch.parallel(sch.fuse(*others))
        else:
            parallel_outer(sch, name, inner=reductions)


def scatter(sch) -> None:
    """One thread per input channel: the channels partition the writes (no atomics)."""
    parallel_outer(sch, "scatter_grad_input", inner=0)


RULES = {"forward": stages, "backward": stages, "scatter": scatter}
