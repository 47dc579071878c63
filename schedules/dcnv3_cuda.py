"""Default `cuda` schedules for dcnv3 (DCNv3 and DCNv4's aggregation): one thread per output element.

The sampling tables are inlined into their readers (a thread recomputes its sample's corners: a few
dozen flops against global-memory round trips); every other stage gets one thread per element of its
spatial loops, a reduction (the aggregate over the points, the corner dot products over the group's
channels) running serially in its thread. The scatter gives every (sample, channel) its own thread,
adding the four corners atomically; neighbouring threads add neighbouring channels. The deterministic
scatter (no atomics) gives every (image, group, channel) one thread that adds all of its samples in order.
"""

from __future__ import annotations

from .common import THREADS, adds_atomically, bind_threads, count_iters, stage_names

#: Inlined into their readers; grad_sample too (each of a sample's three gradients is a thread of the
#: outputs).
INLINED = ("sample_positions", "sample_rows", "sample_cols", "sample_weights", "grad_sample")


def stages(sch) -> None:
    names = stage_names(sch)
    for name in [name for name in INLINED if name in names]:
        sch.compute_inline(sch.get_sblock(name))
    if "grad_offset_mask" in names:  # DCNv4: one kernel, a sample's corner dots in the thread of each of its
        output = sch.get_sblock("grad_offset_mask")  # three gradients (TVM 0.27's CSE hoisted an index
        thread = bind_threads(sch, sch.get_loops(output))  # expression of two kernels into the host)
        dots = sch.get_sblock("corner_dots")
        sch.compute_at(dots, thread)
        for index in range(len(sch.get(dots).writes)):  # a thread's own registers
            sch.set_scope(dots, index, "local")
        return
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        _bind(sch, sch.get_loops(block)[:count_iters(sch, block, reduction=False)])


def _bind(sch, loops) -> None:
    """bind_threads, or one block of exactly the loops' threads where they are static and fewer than a
    block (TVM 0.27 leaves the thread variables of a partial single block unbound: a build error)."""
    extents = [sch.get(loop).extent for loop in loops]
    if all(hasattr(e, "value") for e in extents) and _product(extents) < THREADS:
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        sch.bind(fused, "threadIdx.x")
    else:
        bind_threads(sch, loops)


def _product(extents) -> int:
    total = 1
    for extent in extents:
        total *= int(extent.value)
    return total


def scatter(sch) -> None:
    """A thread per (sample, channel), adding the four corners in turn; without atomics a thread per
    (image, group, channel), the (row, column, point, corner) loops in it. A thread computes a
    sample's position once for its four corners, in registers."""
    block = sch.get_sblock("scatter_grad_input")
    b, g, y, x, p, corner, c = sch.get_loops(block)
    positions = sch.get_sblock("sample_positions")
    if adds_atomically(sch, block):
        sch.reorder(c, corner)
        sch.compute_at(positions, bind_threads(sch, [b, g, y, x, p, c]))
    else:
        sch.reorder(b, g, c, y, x, p, corner)
        bind_threads(sch, [b, g, c])
        sch.compute_at(positions, p)
    sch.set_scope(positions, 0, "local")


RULES = {"forward": stages, "backward": stages, "scatter": scatter}
