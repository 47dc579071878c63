"""Autotune from Python: the engine of `dcn-tvm tune`, and `from_model`.

    import dcn_tvm.tune
    dcn_tvm.tune.run(presets=["tiny"], target="llvm", trials=64)
    dcn_tvm.tune.from_model(model, (images,), trials=256)      # tunes every dcn_tvm op the model calls
    dcn_tvm.tune.which_schedule(spec)                            # "tuned" or "default"

Tuned records land in `logs` (default: env.tuning_logs_dir(), which builds read), so the next
compile of a tuned kernel uses its tuned schedule. See dcn_tvm.tuning for the details.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dcn_tvm import env
from dcn_tvm.kernels.build import which_schedule
from dcn_tvm.kernels.workloads import Workload, from_geometry, resolve
from dcn_tvm.ops import dcnv3 as dcnv3_op
from dcn_tvm.ops import deform_conv2d as conv_op
from dcn_tvm.ops import deform_roi_pool as roi_op
from dcn_tvm.ops import ms_deform_attn as msda_op
from dcn_tvm.tuning.tuner import Result

__all__ = ["Result", "call_workload", "from_model", "record", "run", "which_schedule"]


def run(workloads=(), presets=(), target: str = "auto", trials: int = 64, logs: str | Path | None = None,
        stages=None, rpc_tracker: str | None = None, rpc_key: str | None = None, progress: bool = True,
        report: bool = True, cost_model: str = "xgb") -> list[Result]:
    """Tune `workloads` (strings or Workload objects) and the kernels of `presets` for `target`
    (llvm, cuda, auto, a TVM tag or JSON dict), `trials` in all, into `logs`; only `stages` if given;
    guided by MetaSchedule's `cost_model` (xgb, mlp or random).

    Writes <logs>/<target-key>/report.md (+ report.png) when `report`. Returns one Result per kernel.
    """
    from dcn_tvm.tuning import report as reports
    from dcn_tvm.tuning import target as targets
    from dcn_tvm.tuning.tuner import tune

    strings = [w for w in workloads if isinstance(w, str)]
    chosen = [w for w in workloads if isinstance(w, Workload)] + resolve(presets, strings)
    key = targets.resolve(target)
    root = Path(logs or env.tuning_logs_dir())
    results = tune(chosen, key, trials, root, stages=stages, rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                   progress=progress, cost_model=cost_model)
    if report:
        reports.write(root / key)
    return results


def _deform_conv2d(input, offset, mask, weight, bias, stride, padding, dilation) -> Workload:
    n, _, h, w = input.shape
    return from_geometry("deform_conv2d", conv_op.geometry(input, offset, weight, mask, stride, padding, dilation),
                         n=n, h=h, w=w)


def _deform_roi_pool(input, rois, offset, *parameters) -> Workload:
    n, _, h, w = input.shape
    return from_geometry("deform_roi_pool", roi_op.geometry(input, rois, offset, *parameters), r=rois.shape[0], n=n,
                         h=h, w=w)


def _ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> Workload:
    geo = msda_op.geometry(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, q = sampling_locations.shape[:2]
    return from_geometry("ms_deform_attn", geo, n=n, q=q)


def _dcnv3(input: torch.Tensor, sampling: list, parameters: tuple, packed: bool) -> Workload:
    n, h, w, _ = input.shape
    return from_geometry("dcnv3", dcnv3_op.geometry(input, sampling, parameters, packed), n=n, h=h, w=w)


#: The workload of a call of each tunable operator, by the operator's name, from the call's arguments.
_WORKLOADS = {
    "dcn_tvm::deform_conv2d": _deform_conv2d,
    "dcn_tvm::deform_roi_pool": _deform_roi_pool,
    "dcn_tvm::ms_deform_attn": _ms_deform_attn,
    "dcn_tvm::dcnv3_core": lambda input, offset, mask, *parameters: _dcnv3(input, [offset, mask], parameters, False),
    "dcn_tvm::dcnv4_core": lambda input, offset_mask, *parameters: _dcnv3(input, [offset_mask], parameters, True),
}


def call_workload(op: str, *args) -> Workload:
    """The workload of one call of the torch op named `op` (a key of _WORKLOADS, e.g.
    "dcn_tvm::ms_deform_attn") with its positional arguments, built by the op's own checks."""
    return _WORKLOADS[op](*args)


class _Recorder(TorchDispatchMode):
    """Notes the workload of every dcn_tvm operator call that passes through the dispatcher."""

    def __init__(self):
        super().__init__()
        self.workloads: list[Workload] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in _WORKLOADS:
            self.workloads.append(call_workload(func._schema.name, *args))
        return func(*args, **(kwargs or {}))


def record(model: torch.nn.Module, example_inputs) -> list[Workload]:
    """The workloads of `model(*example_inputs)`, each once, in call order (runs the model once,
    without gradients; deform_roi_pool workloads take this run's RoI count)."""
    recorder = _Recorder()
    with torch.no_grad(), recorder:
        model(*example_inputs)
    return list(dict.fromkeys(recorder.workloads))


def from_model(model: torch.nn.Module, example_inputs, target: str | None = None, **options) -> list[Result]:
    """Run `model(*example_inputs)` once, record every deformable op's shape and tune those.

    `target` defaults to the device of the first tensor input (cpu: llvm, cuda: cuda); `options` are
    those of `run` (trials, logs, stages, rpc_tracker, rpc_key, progress, report, cost_model).
    """
    if target is None:
        device = next(x.device for x in example_inputs if isinstance(x, torch.Tensor))
        target = "cuda" if device.type == "cuda" else "llvm"
    return run(record(model, example_inputs), target=target, **options)
