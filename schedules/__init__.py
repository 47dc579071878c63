"""Default schedules: one module per (operator, target kind), `<op>_<kind>.py`, needing no tuning records.

Each module has `RULES` (stage name -> rule scheduling an `s_tir.Schedule` in place, finding the
compute's stages by name) and may set `POSITION_TILE`, the multiple the compute pads its output
position axis to so the rule's tiles have no tails, and `COMPUTE_OPTIONS`, further keyword arguments
of the operator's `compute.prim_func` (which graph the rules expect, e.g. `forward_layout`).
"""

from __future__ import annotations

import importlib

KINDS = ("llvm", "cuda")


def _module(op: str, kind: str):
    if kind not in KINDS:
        raise ValueError(f"no default schedule for target kind {kind!r}; expected one of {KINDS}")
    return importlib.import_module(f"{__name__}.{op}_{kind}")


def position_tile(op: str, kind: str) -> int:
    return getattr(_module(op, kind), "POSITION_TILE", 1)


def compute_options(op: str, kind: str) -> dict:
    return dict(getattr(_module(op, kind), "COMPUTE_OPTIONS", {}))


def apply(op: str, kind: str, stage: str, sch) -> None:
    _module(op, kind).RULES[stage](sch)
