"""Autotuning with TVM MetaSchedule: `dcn-tvm tune`, `dcn_tvm.tune.from_model`, and the records in
tuning_logs/ that builds pick up automatically (tuned record for the exact kernel and target, else
the default schedule from schedules/).

    workloads.py  workload strings, presets, the kernels (KernelSpecs) of a workload
    target.py     --target values to target keys
    records.py    tuning_logs/<target-key>/<op>/: metadata.json + records.jsonl, read by builds
    tuner.py      the MetaSchedule search over the rules of schedules/, resumable
    report.py     the end-of-run table and the Markdown report with its plot
    cli.py        `dcn-tvm tune`

The Python entry points (`run`, `from_model`) are in dcn_tvm.tune.
"""

from __future__ import annotations

from dcn_tvm.kernels.spec import KernelSpec


def which_schedule(spec: KernelSpec) -> str:
    """"tuned" if building `spec` now would use a tuned record (from env.tuning_logs_dir()), else "default"."""
    from dcn_tvm.kernels.build import prim_func
    from dcn_tvm.tuning.records import tuned_schedule

    return "default" if tuned_schedule(spec, prim_func(spec)) is None else "tuned"
