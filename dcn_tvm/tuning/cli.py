"""`dcn-tvm tune`: autotune workloads with MetaSchedule into tuning_logs/.

    dcn-tvm tune --target llvm --preset tiny --trials 64
    dcn-tvm tune --target nvidia/nvidia-h100 --preset resnet101-dcn --trials 2000 \\
        --rpc-tracker tracker.lan:9190 --rpc-key h100
    dcn-tvm tune --workload deform_conv2d:n=1,c=64,h=32,w=32,o=64,k=3,pad=1 --stage forward
"""

from __future__ import annotations

import argparse
import sys

from dcn_tvm.kernels.workloads import PRESETS, STAGE_NAMES, Workload

#: MetaSchedule's cost models `tune` can rank candidates with (xgb needs xgboost, mlp torch).
COST_MODELS = ("xgb", "mlp", "random")


def _workload(text: str) -> Workload:
    """--workload's type: a bad string is argparse's usage error (exit code 2), not a traceback."""
    try:
        return Workload.parse(text)
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 1)[1]
    parser.add_argument("--target", default="auto",
                        help="llvm (this CPU), cuda (this GPU), auto (default: cuda if a GPU is visible, else "
                             "llvm), a TVM tag such as nvidia/nvidia-h100, or a TVM target JSON dict")
    parser.add_argument("--preset", action="append", default=[], choices=sorted(PRESETS),
                        help="a named set of workloads (repeatable)")
    parser.add_argument("--workload", action="append", default=[], metavar="OP:KEY=VALUE,...", type=_workload,
                        help="a workload string, e.g. deform_conv2d:n=1,c=64,h=32,w=32,o=64,k=3,pad=1 (repeatable)")
    parser.add_argument("--stage", action="append", choices=STAGE_NAMES,
                        help="tune only this stage (repeatable; default: every tunable stage)")
    parser.add_argument("--trials", type=int, default=64,
                        help="measurements in all, split evenly over the kernels (default: 64)")
    parser.add_argument("--logs", help="records folder (default: DCN_TVM_TUNING_LOGS, else the repository's "
                                       "tuning_logs/)")
    parser.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on the devices registered at this "
                                                                   "TVM RPC tracker")
    parser.add_argument("--rpc-key", metavar="KEY", help="the tracker key of the devices to measure on")
    parser.add_argument("--cost-model", choices=COST_MODELS, default="xgb",
                        help="MetaSchedule's cost model ranking the candidates: xgb (default; needs xgboost), "
                             "mlp (needs torch) or random")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from dcn_tvm import tune
    from dcn_tvm.tuning.store import RecordsFolderError, RecordsVersionError
    from dcn_tvm.tuning.report import table
    from dcn_tvm.tuning.tuner import Interrupted, MeasurementError

    if bool(args.rpc_tracker) != bool(args.rpc_key):
        print("dcn-tvm tune: error: --rpc-tracker and --rpc-key go together", file=sys.stderr)
        return 2
    try:
        results = tune.run(args.workload, args.preset, args.target, args.trials, args.logs, args.stage,
                           args.rpc_tracker, args.rpc_key, progress=not args.no_progress,
                           cost_model=args.cost_model)
    except (ValueError, RecordsVersionError, RecordsFolderError, MeasurementError) as error:
        print(f"dcn-tvm tune: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"dcn-tvm tune: {stop}; what it measured is recorded: the same command resumes", file=sys.stderr)
        return 128 + stop.signum
    print(table(results), end="")
    print(f"records and report: {results[0].folder.parent}")
    return 0
