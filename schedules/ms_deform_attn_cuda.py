"""Default `cuda` schedules for ms_deform_attn: one thread per output element of every gather.

The corner stages (sample_index, sample_weight) are inlined into the gathers that read them: a thread
recomputes its corners from the sample's pixel position (sample_pixels, one thread per coordinate)
rather than reading a table from memory. Inlining the pixel positions too would repeat their per-level
expressions in every corner of every gradient: the backward then took minutes to compile. The forward gives every
(image, query, head, channel) a thread that sums the L x P x 4 corners in a register and stores the
output once; the backward gives every corner of every sample a thread for its dot product over
head_dim, then one thread per gradient element. The value-gradient scatter gives every (image, query,
head, level, point, channel) a thread that adds its four corners atomically (queries share pixels); the
deterministic scatter (no atomics) every (image, head, channel) one thread that adds all of its samples in order.
The threads per block are tunable (`common.bind_threads`).
"""

from __future__ import annotations

from .common import adds_atomically, bind_remaining, bind_threads, stage_names

#: The corner stages, inlined into their consumers.
SAMPLE_STAGES = ("sample_weight", "sample_index")


def _inline_samples(sch) -> None:
    for name in SAMPLE_STAGES:
        if name in stage_names(sch):
            sch.compute_inline(sch.get_sblock(name))


def _reduce_in_registers(sch, name: str) -> None:
    """Stage `name`: one thread per output element, accumulating in a register that it then stores. The
    store is bound first and the reduction computed at its thread: bound the other way round, the
    store would cover every thread of the last block, past the end of the output."""
    block = sch.get_sblock(name)
    store = sch.cache_write(block, 0, "local")
    sch.compute_at(block, bind_threads(sch, sch.get_loops(store)))


def forward(sch) -> None:
    """The output's cast is done by the thread that summed it (no [N, Lq, M, D] intermediate)."""
    _inline_samples(sch)
    _reduce_in_registers(sch, "sampled_sum")
    sch.reverse_compute_inline(sch.get_sblock("output"))
    bind_remaining(sch)


def backward(sch) -> None:
    _inline_samples(sch)
    _reduce_in_registers(sch, "corner_dots")
    bind_remaining(sch)


def scatter(sch) -> None:
    """Every (image, head, query, level, point, channel) its own thread, its four corners in a loop; without
    atomics, every (image, head, channel) its own thread, the (query, level, point, corner) loops in it."""
    block = sch.get_sblock("scatter_grad_value")
    n, m, q, level, p, c, d = sch.get_loops(block)
    if adds_atomically(sch, block):
        sch.reorder(n, m, q, level, p, d, c)
        bind_threads(sch, [n, m, q, level, p, d])
    else:
        sch.reorder(n, m, d, q, level, p, c)
        bind_threads(sch, [n, m, d])


RULES = {"forward": forward, "backward": backward, "scatter": scatter}
