"""`dcn-tvm show`: for each stage of a workload, which schedule a build uses and the code it generates.

    dcn-tvm show --target llvm --workload deform_conv2d:n=1,c=64,h=32,w=32,o=64,k=3,pad=1 --stage forward
    dcn-tvm show --target nvidia/nvidia-h100 --workload deform_conv2d:n=1,c=64,h=32,w=32,o=64,k=3,pad=1
    dcn-tvm show --target llvm --workload ... --format asm

Per stage: the kernel key; where the library would take the kernel from (a prebuilt package that has
exactly this kernel, else a build with the tuned record or the default schedule); the generated source
(CUDA C for CUDA targets, LLVM IR or assembly for CPUs), built as the library builds it (no GPU needed
for a CUDA target); and for CUDA, where nvcc is on PATH, what ptxas allocates per kernel: registers per
thread, static shared memory and spilled bytes.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from dcn_tvm.kernels.workloads import STAGE_NAMES
from dcn_tvm.tuning.cli import _workload


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 1)[1]
    parser.add_argument("--target", default="auto",
                        help="llvm (this CPU), cuda (this GPU), auto, a TVM tag such as nvidia/nvidia-h100, or a "
                             "TVM target JSON dict (as for tune)")
    parser.add_argument("--workload", required=True, metavar="OP:KEY=VALUE,...", type=_workload,
                        help="a workload string, as for tune")
    parser.add_argument("--stage", action="append", choices=STAGE_NAMES,
                        help="show only this stage (repeatable; default: every stage)")
    parser.add_argument("--format", choices=("ll", "asm"), default="ll",
                        help="CPU targets: LLVM IR (ll, default) or assembly (asm)")


def origin(spec) -> str:
    """Where the library takes the kernel of `spec` from: "prebuilt <package>", "tuned" or "default"."""
    from dcn_tvm.kernels import prebuilt
    from dcn_tvm.kernels.build import which_schedule

    for package in prebuilt.packages():
        if spec.workload_key in package.manifest["kernels"]:
            return f"prebuilt {package.root}"
    return which_schedule(spec)


def generated(spec, cpu_format: str = "ll") -> tuple[str, dict]:
    """(the source of `spec`'s kernel as the library builds it, {kernel: ptxas usage} for CUDA where nvcc is
    present, else {})."""
    from dcn_tvm.kernels import resources
    from dcn_tvm.kernels.build import compile_functions, scheduled
    from dcn_tvm.kernels.targets import target_config, target_kind

    executable = compile_functions({"main": scheduled(spec)}, spec.target)
    if target_kind(spec.target) != "cuda":
        return executable.mod.inspect_source(cpu_format), {}
    source = executable.mod.imports[0].inspect_source("cuda")
    usage = resources.ptxas_usage(source, target_config(spec.target)["arch"]) if shutil.which("nvcc") else {}
    return source, usage


def report(workload, target: str, stages=None, cpu_format: str = "ll") -> str:
    """The text `dcn-tvm show` prints for a workload on a target key."""
    lines = [f"# {workload} on {target}"]
    for task in workload.tasks(target):
        spec = task.spec
        if stages and spec.stage not in stages:
            continue
        source, usage = generated(spec, cpu_format)
        lines += ["", f"## {spec.stage}: {spec.key}", f"schedule: {origin(spec)}"]
        for kernel, used in sorted(usage.items()):
            lines.append(f"ptxas: {kernel}: {used['registers']} registers/thread, {used['shared']} B shared, "
                         f"{used['spill_stores']} B spill stores, {used['spill_loads']} B spill loads")
        if target.startswith("cuda") and not usage:
            lines.append("ptxas: nvcc is not on PATH: no register and shared-memory counts")
        lines += ["", source.rstrip()]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from dcn_tvm.tuning.target import resolve

    try:
        target = resolve(args.target)
    except ValueError as error:
        print(f"dcn-tvm show: error: {error}", file=sys.stderr)
        return 2
    print(report(args.workload, target, args.stage, args.format), end="")
    return 0
