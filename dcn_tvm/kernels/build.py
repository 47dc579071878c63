"""Compile one KernelSpec with TVM: compute (dcn_tvm.compute) + default schedule (schedules/)."""

from __future__ import annotations

from dcn_tvm._tvm import tvm
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_config, target_kind


def prim_func(spec: KernelSpec):
    """The scheduled-to-be PrimFunc of a spec (symbolic sizes where the spec has None)."""
    te = tvm().te
    from dcn_tvm import schedules
    from dcn_tvm.compute import deform_conv2d as compute

    if spec.stage == "scatter":
        return compute.scatter_grad_input(spec.acc_dtype, atomic=target_kind(spec.target) == "cuda")
    sizes = [te.var(name) if value is None else value
             for name, value in (("batch", spec.batch), ("height", spec.height), ("width", spec.width))]
    make = getattr(compute, spec.stage)
    arguments, outputs = make(spec.geometry, *sizes, position_align=schedules.position_tile(target_kind(spec.target)))
    return te.create_prim_func(arguments + outputs)


def build(spec: KernelSpec):
    """Compile `spec` with its default schedule; returns the runtime module (function "main")."""
    from dcn_tvm import schedules

    kind = target_kind(spec.target)
    sch = tvm().s_tir.Schedule(prim_func(spec))
    schedules.apply(kind, spec.stage, sch)
    target = tvm().target.Target(target_config(spec.target))
    with target:
        executable = tvm().compile(sch.mod, target=target)
    if kind == "cuda" and len(executable.mod.imports) == 0:
        # TVM 0.27 silently emits host code for a PrimFunc whose loops are not bound to threads.
        raise RuntimeError(f"{spec.key}: the CUDA build has no device module; the schedule left stages unbound")
    return executable
