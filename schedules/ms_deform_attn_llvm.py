"""Default `llvm` schedules for ms_deform_attn: queries in parallel, head_dim in vectors.

Every (image, query) is a parallel task. Inside it, for one head at a time, the corner tables
(sample_index, sample_weight: L x P x 4 entries) are computed into registers/stack, then every corner
adds a weighted vector of head_dim values into an accumulator of head_dim lanes; the cast to the
output dtype follows in the same task. The backward dots are reductions over head_dim per corner
(vector multiplies, a horizontal sum), computed per (image, query) into a small local table that the
location and weight gradients read. The value-gradient scatter gives every (image, head) slab of
grad_value to one task: plain adds, no two tasks ever meet.

Tuning samples (`common.decide`) the queries per parallel task.
"""

from __future__ import annotations

from .common import bound_loops, decide, divisors, vectorize_own_loop

#: Queries per parallel task: the default, and the tuning candidates (dividing the query count).
QUERY_BLOCK, QUERY_BLOCK_CANDIDATES = 1, (1, 2, 4, 8, 16)


def _query_tasks(sch, *blocks):
    """The image and query loops of `blocks` (stages with those two loops first) fused and merged into one
    parallel task loop (queries blocked when tuned); returns it."""
    loops = [sch.get_loops(block)[:2] for block in blocks]
    extent = getattr(sch.get(loops[0][1]).extent, "value", None)
    block = decide(sch, divisors(extent, QUERY_BLOCK_CANDIDATES) if extent else (1,), QUERY_BLOCK)
    tasks = []
    for n, q in loops:
        task = sch.fuse(n, q)
        if block != QUERY_BLOCK:
            task, _ = sch.split(task, [None, block])
        tasks.append(task)
    task = sch.merge(*tasks) if len(tasks) > 1 else tasks[0]
    sch.parallel(task)
    return task


def forward(sch) -> None:
    total = sch.get_sblock("sampled_sum")
    n, q, m, d, rl, rp, rc = sch.get_loops(total)
    sch.reorder(n, q, m, rl, rp, rc, d)
    _query_tasks(sch, total)
    accumulator = sch.cache_write(total, 0, "local")
    sch.reverse_compute_at(accumulator, m)
    for name in ("sample_weight", "sample_index", "sample_pixels"):
        sch.compute_at(sch.get_sblock(name), m)
    sch.unroll(rc)
    sch.vectorize(d)
    vectorize_own_loop(sch, sch.decompose_reduction(total, rl))
    vectorize_own_loop(sch, accumulator)
    output = sch.get_sblock("output")
    sch.reverse_compute_at(output, m)
    vectorize_own_loop(sch, output)


def _lanes(sch, block, extent: int) -> int:
    """Vector lanes for a loop of `extent` over the accumulator dtype of `block`: the widest power of two
    up to one AVX-512 register dividing it."""
    bits = sch.get(block).writes[0].source.dtype.bits
    return next(lanes for lanes in (512 // bits, 256 // bits, 128 // bits, 2, 1) if extent % lanes == 0)


def backward(sch) -> None:
    """Both gradient stages in one task per (image, query), which first computes the query's corner dots:
    each a vector of partial sums over head_dim (rfactor), then their horizontal sum."""
    dots = sch.get_sblock("corner_dots")
    reduction = sch.get_loops(dots)[-1]
    lanes = _lanes(sch, dots, int(sch.get(reduction).extent))
    partial = sch.rfactor(sch.split(reduction, [None, lanes])[1], factor_axis=6)
    task = _query_tasks(sch, sch.get_sblock("grad_attention_weights"), sch.get_sblock("grad_sampling_locations"))
    for block in (dots, partial, sch.get_sblock("sample_index"), sch.get_sblock("sample_pixels")):
        sch.compute_at(block, task)
    lane, *_, outer = bound_loops(sch, partial)  # rfactor puts the lane iterator first, head_dim / lanes last
    inner = [i for i in (outer, lane) if i is not None]  # no loop where head_dim is 1 or a single vector
    loops = _innermost(sch, partial, inner)
    if lane is not None:
        sch.vectorize(loops[lane])
    vectorize_own_loop(sch, sch.decompose_reduction(partial, loops[inner[0]] if inner else loops[-1]))
    lane = bound_loops(sch, dots)[0]  # the sum over the lanes
    if lane is not None:
        _innermost(sch, dots, [lane])


def _innermost(sch, block, positions: list[int]) -> list:
    """Reorder the loops of `block` under its task loop (the first) so that those at `positions` (in
    sch.get_loops order) come innermost, in the given order; returns the loops."""
    loops = sch.get_loops(block)
    sch.reorder(*[loop for i, loop in enumerate(loops) if i > 0 and i not in positions],
                *[loops[i] for i in positions])
    return loops


def scatter(sch) -> None:
    """One task per (image, head) slab, the head_dim adds a vector."""
    block = sch.get_sblock("scatter_grad_value")
    n, m, q, level, p, c, d = sch.get_loops(block)
    sch.parallel(sch.fuse(n, m))
    sch.unroll(level)  # the level's sizes and start become constants
    sch.unroll(c)
    sch.vectorize(d)


RULES = {"forward": forward, "backward": backward, "scatter": scatter}
