"""`dcn-tvm` / `python -m dcn_tvm`: the command line.

Each command lives in its own module exposing `configure(parser)` and `run(args) -> int`; modules are
imported only when their command runs, so `dcn-tvm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "tune": ("dcn_tvm.tuning.cli", "autotune workloads with MetaSchedule into tuning_logs/"),
    "build": ("dcn_tvm.prebuilt.cli", "compile tuned kernels into a package that loads without the compiler"),
    "show": ("dcn_tvm.tuning.show", "which schedule each stage of a workload uses, and its generated code"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dcn-tvm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    for name, (module, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        if argv[:1] == [name]:  # only the chosen command's module is imported
            importlib.import_module(module).configure(sub)
            sub.set_defaults(run=importlib.import_module(module).run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
