"""Autotuning with TVM MetaSchedule: `dcn-tvm tune`, `dcn_tvm.tune.from_model`, and the records in
tuning_logs/ that builds pick up automatically (tuned record for the exact kernel and target, else
the default schedule from schedules/). A tool: it imports the layers below and nothing imports it.

    target.py     --target values to target keys
    store.py      writing tuning_logs/<target-key>/<op>/ (read by builds with dcn_tvm.kernels.records)
    tuner.py      the MetaSchedule search over the rules of schedules/, resumable
    report.py     the end-of-run table and the Markdown report with its plot
    cli.py        `dcn-tvm tune`

Workload strings, presets and the kernels of a workload are in dcn_tvm.kernels.workloads; the Python
entry points (`run`, `from_model`, `which_schedule`) in dcn_tvm.tune.
"""
