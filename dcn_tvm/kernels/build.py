"""Compile one KernelSpec with TVM: compute (dcn_tvm.compute) + default schedule (schedules/)."""

from __future__ import annotations

import importlib

from dcn_tvm._tvm import tvm
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_config, target_kind


def prim_func(spec: KernelSpec):
    """The PrimFunc of a spec, from `dcn_tvm.compute.<op>` (symbolic sizes where the spec has None)."""
    from dcn_tvm import schedules

    te = tvm().te
    compute = importlib.import_module(f"dcn_tvm.compute.{spec.op}")
    kind = target_kind(spec.target)
    sizes = [te.var(name) if value is None else value for name, value in spec.sizes]
    return compute.prim_func(spec.stage, spec.geometry, sizes, acc_dtype=spec.acc_dtype,
                             position_align=schedules.position_tile(spec.op, kind), atomic=kind == "cuda")


def build(spec: KernelSpec):
    """Compile `spec` with its default schedule; returns the runtime module (function "main")."""
    from dcn_tvm import schedules

    kind = target_kind(spec.target)
    sch = tvm().s_tir.Schedule(prim_func(spec))
    schedules.apply(spec.op, kind, spec.stage, sch)
    target = tvm().target.Target(target_config(spec.target))
    with target:
        executable = tvm().compile(sch.mod, target=target)
    if kind == "cuda" and len(executable.mod.imports) == 0:
        # TVM 0.27 silently emits host code for a PrimFunc whose loops are not bound to threads.
        raise RuntimeError(f"{spec.key}: the CUDA build has no device module; the schedule left stages unbound")
    return executable
