"""Schedule helpers shared by the rules of every operator."""

from __future__ import annotations

_DATA_PAR, _COMM_REDUCE = 0, 2  # tirx.IterVar kinds


def count_iters(sch, block, reduction: bool) -> int:
    """Number of reduction (or spatial) block iterators of `block`."""
    kind = _COMM_REDUCE if reduction else _DATA_PAR
    return sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == kind)


def parallel_outer(sch, name: str, inner: int = 1) -> None:
    """Fuse every loop of stage `name` but the `inner` innermost ones and run them in parallel."""
    block = sch.get_sblock(name)
    loops = sch.get_loops(block)
    outer = loops[: max(len(loops) - inner, 1)]
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def bind_remaining(sch) -> None:
    """Bind every root stage not yet on the GPU: spatial loops fused over blocks x 256 threads."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        if any(sch.get(loop).thread_binding is not None for loop in loops):
            continue
        spatial = count_iters(sch, block, reduction=False)
        fused = sch.fuse(*loops[:spatial]) if spatial > 1 else loops[0]
        blocks, threads = sch.split(fused, [None, 256])
        sch.bind(blocks, "blockIdx.x")
        sch.bind(threads, "threadIdx.x")
