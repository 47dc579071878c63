"""Schedule helpers shared by the rules of every operator.

A rule is both the default schedule and a tuning space, with two kinds of knobs:

- `decide` (tile factors): the rule's fixed default normally, and a MetaSchedule sample
  (`sample_categorical`) inside `sampling()`, which the search varies within one design space;
- `choose` (structure: loop orders, where a stage is computed): Python branches a trace cannot
  replay with another value, so `design_spaces` runs the rule once per combination of choices and
  each combination is a design space of its own.

Every sample starts at its default, so the default schedule is one point of the space.
"""

from __future__ import annotations

import contextvars
import itertools
from contextlib import contextmanager

_DATA_PAR, _COMM_REDUCE = 0, 2  # tirx.IterVar kinds
_sampling = contextvars.ContextVar("dcn_tvm_schedule_sampling", default=False)
#: Inside design_spaces: (the choices to take, the knobs met so far as name -> options).
_choices = contextvars.ContextVar("dcn_tvm_schedule_choices", default=None)


@contextmanager
def sampling():
    """Within this context `decide` samples its candidates: the rules describe a tuning space."""
    token = _sampling.set(True)
    try:
        yield
    finally:
        _sampling.reset(token)


def decide(sch, candidates, default: int):
    """A tile factor: `default`, or inside `sampling()` a categorical sample over `candidates` and
    `default` (an ExprRV, which `split` takes like an int). Every candidate must be valid: give only
    divisors where a tail would hurt."""
    options = sorted({int(c) for c in candidates} | {int(default)})
    if not _sampling.get() or len(options) == 1:
        return default
    return sch.sample_categorical(options, [1.0 / len(options)] * len(options), decision=options.index(default))


def choose(name: str, options, default):
    """A structural choice of the rule: `default`, or inside `design_spaces` the option it assigns
    to `name`. Options must not depend on other choices."""
    state = _choices.get()
    if state is None:
        return default
    taken, knobs = state
    knobs[name] = tuple(dict.fromkeys([default, *options]))
    return taken.get(name, default)


@contextmanager
def _choosing(taken: dict, knobs: dict):
    """Within this context `choose` takes the options in `taken` and notes every knob in `knobs`."""
    token = _choices.set((taken, knobs))
    try:
        yield
    finally:
        _choices.reset(token)


def design_spaces(rule, sch) -> list:
    """Copies of `sch`, one per combination of the `choose` knobs of `rule`, each scheduled by `rule`
    with its tile factors sampled (`decide`); the combination of defaults comes first."""
    knobs: dict = {}
    first = sch.copy()
    with sampling():
        with _choosing({}, knobs):
            rule(first)
        spaces = [first]
        names = list(knobs)
        for values in itertools.islice(itertools.product(*(knobs[n] for n in names)), 1, None):
            space = sch.copy()
            with _choosing(dict(zip(names, values)), {}):
                rule(space)
            spaces.append(space)
    return spaces


def divisors(value, candidates) -> list[int]:
    """The candidates dividing the static `value`, in the given order."""
    return [c for c in candidates if int(value) % c == 0]


def count_iters(sch, block, reduction: bool) -> int:
    """Number of reduction (or spatial) block iterators of `block`."""
    kind = _COMM_REDUCE if reduction else _DATA_PAR
    return sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == kind)


def adds_atomically(sch, block) -> bool:
    """Whether `block`, a gradient scatter, adds with T.cuda.atomic_add (its body a call) rather than a
    plain `+=` (its body a store: the deterministic scatter, whose threads own what they write)."""
    return type(sch.get(block).body).__name__ == "Evaluate"


def stage_names(sch) -> set[str]:
    """The names of the root stages of `sch`."""
    return {sch.get(block).name_hint for block in sch.get_child_blocks(sch.get_sblock("root"))}


def bound_loops(sch, block) -> list:
    """The position in `sch.get_loops(block)` of the loop of every block iterator of `block` (its binding is
    that loop's variable), or None where it has none: compute_at makes no loop for an iterator of extent 1,
    and a fused loop binds several."""
    loops = [sch.get(loop) for loop in sch.get_loops(block)]
    name = sch.get(block).name_hint
    realize = next(stmt for stmt in getattr(loops[-1].body, "seq", [loops[-1].body]) if stmt.block.name_hint == name)
    return [next((i for i, loop in enumerate(loops) if loop.loop_var.same_as(value)), None)
            for value in realize.iter_values]


def vectorize_own_loop(sch, block) -> None:
    """Vectorise the innermost loop of `block`, a stage moved under another's loops (reverse_compute_at,
    decompose_reduction), when that loop is its own: a vector of extent 1 gets no loop there, and the loop
    above is shared with other stages (head_dim or group channels of 1)."""
    loop = sch.get_loops(block)[-1]
    if len(sch.get_child_blocks(loop)) == 1:
        sch.vectorize(loop)


def channels_last_copy(sch, name: str, lanes: int) -> None:
    """Stage `name`, an [N, H, W, C] copy of an [N, C, H, W] tensor, in parallel blocks of `lanes`
    channels (dividing C): each task reads a few input planes front to back (a handful of pages, not
    one per channel) and writes vectors."""
    block = sch.get_sblock(name)
    n, y, x, c = sch.get_loops(block)
    c_outer, c_lane = sch.split(c, [None, lanes])
    sch.reorder(n, c_outer, y, x, c_lane)
    sch.parallel(sch.fuse(n, c_outer))
    sch.vectorize(c_lane)


def parallel_outer(sch, name: str, inner: int = 1) -> None:
    """Fuse every loop of stage `name` but the `inner` innermost ones and run them in parallel."""
    block = sch.get_sblock(name)
    loops = sch.get_loops(block)
    outer = loops[: max(len(loops) - inner, 1)]
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


#: Threads per block of the one-thread-per-element stages, and the tuning candidates.
THREADS, THREAD_CANDIDATES = 256, (64, 128, 256, 512, 1024)


def bind_threads(sch, loops):
    """Fuse `loops` and spread them over blocks of THREADS threads (tunable); returns the thread loop."""
    fused = loops[0]
    for loop in loops[1:]:  # pairwise: TVM 0.27's fuse of more loops folds an int32 constant past 2^31
        fused = sch.fuse(fused, loop)
    blocks, threads = sch.split(fused, [None, decide(sch, THREAD_CANDIDATES, THREADS)])
    sch.bind(blocks, "blockIdx.x")
    sch.bind(threads, "threadIdx.x")
    return threads


def bind_remaining(sch) -> None:
    """Bind every root stage not yet on the GPU: spatial loops fused over blocks x THREADS threads."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        if any(sch.get(loop).thread_binding is not None for loop in loops):
            continue
        bind_threads(sch, loops[: max(count_iters(sch, block, reduction=False), 1)])
