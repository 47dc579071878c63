"""`dcn-tvm build`: compile workloads (tuned schedules where recorded) into a prebuilt package."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="llvm",
                        help="llvm (x86-64-v3 and -v4 libraries), cuda (this GPU's arch) or cuda-sm_XX")
    parser.add_argument("--preset", action="append", default=[], help="a tuning preset, e.g. tiny (repeatable)")
    parser.add_argument("--workload", action="append", default=[],
                        help="a workload string, e.g. deform_conv2d:n=1,c=64,h=32,w=32,... (repeatable)")
    parser.add_argument("--logs", type=Path, default=None, help="tuning records folder (default: tuning_logs/)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder to write the package into: new, empty, or a package built before (replaced)")


def run(args: argparse.Namespace) -> int:
    from dcn_tvm.kernels.targets import target_kind
    from dcn_tvm.kernels.workloads import resolve
    from dcn_tvm.prebuilt.build import CudaSourceError, PackageFolderError, build_package
    from dcn_tvm.tuning.target import resolve as resolve_target

    def error(message: str) -> int:
        print(f"dcn-tvm build: error: {message}", file=sys.stderr)
        return 2

    if not args.preset and not args.workload:
        return error("give at least one --preset or --workload")
    if args.logs is not None:
        if not args.logs.is_dir():
            return error(f"--logs {args.logs}: no such folder of tuning records")
        os.environ["DCN_TVM_TUNING_LOGS"] = str(args.logs)
    try:
        target = resolve_target(args.target)
        specs = [task.spec for workload in resolve(args.preset, args.workload) for task in workload.tasks(target)]
    except ValueError as problem:
        return error(str(problem))
    start = time.perf_counter()
    try:
        package = build_package(specs, "llvm" if target_kind(target) == "llvm" else target, args.out,
                                progress=lambda message: print(f"[{time.perf_counter() - start:6.1f}s] {message}"))
    except (PackageFolderError, CudaSourceError) as problem:
        return error(str(problem))
    print(f"wrote {package}; install it with: pip install {args.out}")
    return 0
