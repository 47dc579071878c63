"""Compile one KernelSpec with TVM: compute (dcn_tvm.compute) + tuned or default schedule (schedules/)."""

from __future__ import annotations

import importlib

from dcn_tvm._tvm import tvm
from dcn_tvm.kernels import resources
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_config, target_kind


def prim_func(spec: KernelSpec):
    """The PrimFunc of a spec, from `dcn_tvm.compute.<op>` (symbolic sizes where the spec has None)."""
    from dcn_tvm import schedules
    from dcn_tvm.schedules.mma_tf32 import PRECISION_ATTR

    te = tvm().te
    compute = importlib.import_module(f"dcn_tvm.compute.{spec.op}")
    kind = target_kind(spec.target)
    # int64: a kernel for every size must index past 2^31 elements (see dcn_tvm.compute.indexing).
    sizes = [te.var(name, "int64") if value is None else value for name, value in spec.sizes]
    func = compute.prim_func(spec.stage, spec.geometry, sizes, acc_dtype=spec.acc_dtype,
                             position_align=schedules.position_tile(spec.op, kind),
                             atomic=kind == "cuda" and not spec.deterministic,
                             **schedules.compute_options(spec.op, kind))
    # The schedules read the precision from the function (schedules.mma_tf32.precision), and tuning records hash it.
    return func if spec.precision == "highest" else func.with_attr(PRECISION_ATTR, spec.precision)


def scheduled(spec: KernelSpec):
    """The PrimFunc of `spec` scheduled by its tuned record for exactly this kernel and target
    (dcn_tvm.kernels.records) if there is one, else by the default schedule from schedules/."""
    from dcn_tvm import schedules
    from dcn_tvm.kernels.records import tuned_schedule

    func = prim_func(spec)
    sch = tuned_schedule(spec, func)
    if sch is None:
        sch = tvm().s_tir.Schedule(func)
        with tvm().target.Target(target_config(spec.target)):  # rules may size tiles to the target's vectors
            schedules.apply(spec.op, target_kind(spec.target), spec.stage, sch)
    return sch.mod["main"]


def which_schedule(spec: KernelSpec) -> str:
    """"tuned" if building `spec` now would use a tuned record (from env.tuning_logs_dir()), else "default"."""
    from dcn_tvm.kernels.records import tuned_schedule

    return "default" if tuned_schedule(spec, prim_func(spec)) is None else "tuned"


def compile_functions(functions: dict, target_key: str):
    """Compile {symbol: scheduled PrimFunc} for one target into one runtime module. A CUDA build is
    refused (KernelResourceError) when a kernel exceeds a per-block limit (dcn_tvm.kernels.resources);
    its device kernels are named <symbol>_kernel[_i]."""
    ir = tvm().ir
    module = ir.IRModule({ir.GlobalVar(name): func.with_attr("global_symbol", name) for name, func in functions.items()})
    target = tvm().target.Target(target_config(target_key))
    with target:
        if target_kind(target_key) != "cuda":
            return tvm().compile(module, target=target)
        executable, kernels = resources.compile_cuda(module, target)
        if len(executable.mod.imports) == 0:
            # TVM 0.27 silently emits host code for a PrimFunc whose loops are not bound to threads.
            raise RuntimeError(f"{sorted(functions)}: the CUDA build has no device module; "
                               f"a schedule left stages unbound")
        resources.check(kernels, executable.mod.imports[0].inspect_source("cuda"), target_config(target_key)["arch"])
    return executable


def build(spec: KernelSpec):
    """Compile `spec` alone; returns the runtime module (its function is "main")."""
    try:
        return compile_functions({"main": scheduled(spec)}, spec.target)
    except resources.KernelResourceError as error:
        raise resources.KernelResourceError(f"{spec.key}: {error}") from None
