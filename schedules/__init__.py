"""Default schedules, one rule per (op stage, target kind); they need no tuning records.

`apply(kind, stage, sch)` schedules in place; `position_tile(kind)` is the padding the compute must
give the output-position axis so the rule's tiles have no tails.
"""

from __future__ import annotations

from . import cpu, cuda

_BY_KIND = {"llvm": cpu, "cuda": cuda}


def _module(kind: str):
    if kind not in _BY_KIND:
        raise ValueError(f"no default schedule for target kind {kind!r}; expected one of {sorted(_BY_KIND)}")
    return _BY_KIND[kind]


def position_tile(kind: str) -> int:
    return _module(kind).POSITION_TILE


def apply(kind: str, stage: str, sch) -> None:
    _module(kind).RULES[stage](sch)
