"""ONNX export of dcn_tvm's ops through `torch.onnx.export(..., dynamo=True)`.

- `dcn_tvm::deform_conv2d` becomes the standard `DeformConv` (opset >= 19): same offset layout
  ((dy, dx) pairs per kernel point and offset group), mask and bias inputs, the exporter's dynamic
  batch and spatial sizes. onnxruntime runs it on its CPU execution provider.
- `dcn_tvm::deform_roi_pool` has no standard operator: it becomes `dcn_tvm::DeformRoIPool`
  (custom domain `dcn_tvm`, version 1, schema in `DEFORM_ROI_POOL_SCHEMA`), which a runtime must
  implement itself (onnxruntime refuses a model holding one unless given such a custom op).
- `dcn_tvm::ms_deform_attn`, `dcn_tvm::dcnv3_core` and `dcn_tvm::dcnv4_core` have no operator of their own:
  they become standard ops (a Gather of the bilinear corners and a weighted MatMul), written in torch ops in
  dcn_tvm.ops.onnx_forms; every size is dynamic but the heads/groups, levels and points, and ms_deform_attn
  reads its level shapes and starts at run time.

A plain `torch.onnx.export(model, args, dynamo=True)` gives these nodes with no extra argument: the ops emit
them while the exporter traces them (dcn_tvm.ops.onnx_forms; DeformConv and DeformRoIPool through
torch.onnx.ops.symbolic). A graph that holds the ops themselves, a torch.export.ExportedProgram captured
outside an ONNX export, needs more: `to_onnx` decomposes its ms_deform_attn/dcnv3/dcnv4 calls
(`onnx_forms.decompositions()`, for `ExportedProgram.run_decompositions`) and translates its deform_conv2d and
deform_roi_pool calls (`onnx_translation_table()`, for `torch.onnx.export(custom_translation_table=...)`).
`to_onnx` is `torch.onnx.export` with both and dynamic batch and spatial sizes.
The TorchScript exporter (`dynamo=False`) is refused.
Needs onnx, onnxscript (and onnxruntime to run the result): `pip install dcn_tvm[export]`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import onnx
import torch
from onnxscript import opset19
from onnxscript.values import Op, Opset

from dcn_tvm.ops import onnx_forms

ONNX_OPSET = 19
"""The first opset with DeformConv."""
DOMAIN = onnx_forms.DOMAIN

_Schema = onnx.defs.OpSchema
DEFORM_ROI_POOL_SCHEMA = _Schema(
    "DeformRoIPool", DOMAIN, 1,
    doc="dcn_tvm.deform_roi_pool: (deformable) (position-sensitive) RoI pooling as the original "
        "DeformablePSROIPooling. Y[r, c, i, j] is the mean of the sampling_ratio² bilinear samples of bin (i, j) "
        "of RoI r that fall inside the image, read from channel (c * group_size + gi) * group_size + gj of "
        "image rois[r, 0], the bin moved by gamma * offset[r, 2*class:2*class+2, pi, pj] * (roi width, height) "
        "(x first; class = c // (C_out / num_classes)). Batch indices must lie in [0, N).",
    inputs=[
        _Schema.FormalParameter("X", "T", "input [N, C, H, W], C = C_out * group_size²"),
        _Schema.FormalParameter("rois", "T1", "[R, 5] rows (batch_index, x1, y1, x2, y2) in image pixels"),
        _Schema.FormalParameter("offset", "T", "[R, 2*num_classes, part_size, part_size] normalised offsets",
                                param_option=_Schema.FormalParameterOption.Optional),
    ],
    outputs=[_Schema.FormalParameter("Y", "T", "[R, C_out, output_size, output_size]")],
    type_constraints=[
        ("T", ["tensor(float16)", "tensor(bfloat16)", "tensor(float)", "tensor(double)"], "features"),
        ("T1", ["tensor(float16)", "tensor(bfloat16)", "tensor(float)", "tensor(double)"], "RoI boxes"),
    ],
    attributes=[
        _Schema.Attribute("output_size", _Schema.AttrType.INT, "k, bins per side"),
        _Schema.Attribute("spatial_scale", _Schema.AttrType.FLOAT, "input pixels per image pixel"),
        _Schema.Attribute("group_size", _Schema.AttrType.INT, "1: plain pooling; k: position-sensitive"),
        _Schema.Attribute("part_size", _Schema.AttrType.INT, "offset cells per side"),
        _Schema.Attribute("sampling_ratio", _Schema.AttrType.INT, "samples per bin side"),
        _Schema.Attribute("gamma", _Schema.AttrType.FLOAT, "offset scale"),
    ],
)
_DEFORM_ROI_POOL = Op(Opset(DOMAIN, 1), "DeformRoIPool", DEFORM_ROI_POOL_SCHEMA)


def _static(name: str, value) -> int:
    if not isinstance(value, int):
        raise ValueError(f"ONNX export needs a static {name}, got {value!r}")
    return value


def _deform_conv2d(input, offset, mask, weight, bias, stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int]):
    """dcn_tvm::deform_conv2d as DeformConv: weight [O, C/groups, KH, KW] and the channel counts are static."""
    attributes = onnx_forms.deform_conv_attributes(_static("input channels", input.shape[1]), weight.shape,
                                                   _static("offset channels", offset.shape[1]), stride, padding,
                                                   dilation)
    return opset19.DeformConv(input, weight, offset, bias, mask, **attributes)


def _deform_roi_pool(input, rois, offset, output_size: int, spatial_scale: float, group_size: int,
                     part_size: int, sampling_ratio: int, gamma: float):
    """dcn_tvm::deform_roi_pool as dcn_tvm::DeformRoIPool, its arguments as attributes."""
    return _DEFORM_ROI_POOL(input, rois, offset, **onnx_forms.deform_roi_pool_attributes(
        output_size, spatial_scale, group_size, part_size, sampling_ratio, gamma))


def onnx_translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """dcn_tvm's ops to their ONNX translations, for `torch.onnx.export(custom_translation_table=...)`."""
    return {torch.ops.dcn_tvm.deform_conv2d.default: _deform_conv2d,
            torch.ops.dcn_tvm.deform_roi_pool.default: _deform_roi_pool}


def dynamic_shapes(args: Sequence) -> tuple:
    """Every dimension but dim 1 (channels, box coordinates) of every tensor in `args` dynamic:
    batch and spatial sizes of images, the number of RoIs."""
    dynamic = torch.export.Dim.DYNAMIC
    return tuple({dim: dynamic for dim in range(arg.dim()) if dim != 1} if isinstance(arg, torch.Tensor) else None
                 for arg in args)


def to_onnx(model: torch.nn.Module, args: Sequence, f: str | os.PathLike | None = None, *,
            dynamic: bool = True, opset_version: int | None = None, **options) -> torch.onnx.ONNXProgram:
    """`torch.onnx.export(model, args, f, dynamo=True, ...)` with dcn_tvm's translations and decompositions.

    Args:
        model: an eval-mode module, or a torch.export.ExportedProgram (its ms_deform_attn, dcnv3 and dcnv4
            calls are decomposed first), using dcn_tvm ops.
        args: its positional example inputs.
        f: where to save the model, if given.
        dynamic: every dimension but dim 1 of every tensor argument is dynamic (see `dynamic_shapes`),
            unless `options` holds `dynamic_shapes`; False exports the example's sizes.
        opset_version: >= 19 (DeformConv); torch's default if None.
        options: further torch.onnx.export arguments; a `custom_translation_table` is merged in.

    Returns the torch.onnx.ONNXProgram (`.model_proto`, `.save(path)`).
    """
    if opset_version is not None and opset_version < ONNX_OPSET:
        raise ValueError(f"opset_version must be >= {ONNX_OPSET} (the first with DeformConv), got {opset_version}")
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    if isinstance(model, torch.export.ExportedProgram):
        model = model.run_decompositions(onnx_forms.decompositions())
    if dynamic and "dynamic_shapes" not in options:
        options["dynamic_shapes"] = dynamic_shapes(args)
    options["custom_translation_table"] = {**onnx_translation_table(), **options.get("custom_translation_table", {})}
    return torch.onnx.export(model, args, f, dynamo=True, opset_version=opset_version, **options)
