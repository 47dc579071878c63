"""Default `cuda` schedules for deform_roi_pool: one thread per output element of every stage.

The stages are gathers with short serial reductions (S x S samples, or a class's channels times
the samples), so one thread per output element is the natural mapping (the threads per block
are tunable); reductions accumulate in a
register and store once. Never compile an unscheduled function for CUDA: `dcn_tvm.kernels.build`
checks for the device module.
"""

from __future__ import annotations

from .common import bind_remaining, bind_threads, count_iters


def _reductions_in_registers(sch) -> None:
    """Every reduction stage: one thread per output element, accumulating in registers (one per
    output of the stage: grad_offset_bins sums x and y together)."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        reductions = count_iters(sch, block, reduction=True)
        if reductions:
            thread = bind_threads(sch, sch.get_loops(block)[:-reductions])
            stores = [sch.cache_write(block, index, "local") for index in range(len(sch.get(block).writes))]
            for store in stores:
                sch.reverse_compute_at(store, thread)


def stages(sch) -> None:
    """forward and backward: reductions first, then every other stage one thread per element."""
    _reductions_in_registers(sch)
    bind_remaining(sch)


def scatter(sch) -> None:
    """Every (RoI, output channel, bin, sample) its own thread, adding atomically; the deterministic
    scatter (no atomics) one thread per input channel."""
    bind_threads(sch, sch.get_loops(sch.get_sblock("scatter_grad_input")))


RULES = {"forward": stages, "backward": stages, "scatter": scatter}
