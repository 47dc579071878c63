"""ONNX export of dcn_tvm's ops through `torch.onnx.export(..., dynamo=True)`.

- `dcn_tvm::deform_conv2d` becomes the standard `DeformConv` (opset >= 19): same offset layout
  ((dy, dx) pairs per kernel point and offset group), mask and bias inputs, the exporter's dynamic
  batch and spatial sizes. onnxruntime runs it on its CPU execution provider.
- `dcn_tvm::deform_roi_pool` has no standard operator: it becomes `dcn_tvm::DeformRoIPool`
  (custom domain `dcn_tvm`, version 1, schema in `DEFORM_ROI_POOL_SCHEMA`), which a runtime must
  implement itself (onnxruntime refuses a model holding one unless given such a custom op).
- `dcn_tvm::ms_deform_attn`, `dcn_tvm::dcnv3_core` and `dcn_tvm::dcnv4_core` have no operator of their own:
  they become standard ops, GridSample (bilinear, zeros, align_corners=0) at the sampling positions and the
  weighted sum of the samples (`_ms_deform_attn`, `_dcnv3_core`), through this module's translation table
  (`to_onnx`); they have no ONNX form for a plain `torch.onnx.export` yet. ms_deform_attn: per level a
  GridSample of the value's [N*M, D, H, W] view; its level count and points must be static.

For the first two, a plain `torch.onnx.export(model, args, dynamo=True)` gives these nodes with no extra argument: the ops
emit them while the exporter traces them (dcn_tvm.ops.onnx_forms, through torch.onnx.ops.symbolic).
The translation table here maps the torch ops to the same nodes where a graph holds the ops themselves:
a torch.export.ExportedProgram captured outside an ONNX export, or an op that has no ONNX form of its
own yet. `to_onnx` is `torch.onnx.export` with this table and dynamic batch and spatial sizes;
`onnx_translation_table()` gives the table to pass to `torch.onnx.export` yourself.
The TorchScript exporter (`dynamo=False`) is refused.
Needs onnx, onnxscript (and onnxruntime to run the result): `pip install dcn_tvm[export]`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
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


def _ints(*values: int):
    """An int64 ONNX constant of `values`."""
    return opset19.Constant(value_ints=list(values))


def _ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """dcn_tvm::ms_deform_attn as GridSample per level and a weighted sum; value [N, S, M, D] ->
    [N, Lq, M*D]. Levels L and points P are static (sampling_locations [N, Lq, M, L, P, 2])."""
    op = opset19
    levels, points = _static("levels", sampling_locations.shape[3]), _static("points", sampling_locations.shape[4])
    batch = op.Shape(value, start=0, end=1)
    queries = op.Shape(sampling_locations, start=1, end=2)
    head_dim = op.Shape(value, start=3, end=4)
    planes = op.Transpose(value, perm=[0, 2, 3, 1])  # [N, M, D, S]
    two = op.CastLike(op.Constant(value_float=2.0), sampling_locations)
    one = op.CastLike(op.Constant(value_float=1.0), sampling_locations)
    grids = op.Transpose(op.Sub(op.Mul(sampling_locations, two), one), perm=[0, 2, 1, 3, 4, 5])  # [N, M, Lq, L, P, 2]
    samples = []
    for level in range(levels):
        size = op.Gather(spatial_shapes, _ints(level), axis=0)  # [1, 2]: (H, W)
        start = op.Gather(level_start_index, _ints(level), axis=0)
        end = op.Add(start, op.ReduceProd(size, _ints(1), keepdims=0))
        plane = op.Slice(planes, start, end, _ints(3))  # [N, M, D, H*W]
        plane = op.Reshape(plane, op.Concat(_ints(-1), head_dim, op.Reshape(size, _ints(2)), axis=0))
        grid_shape = op.Concat(_ints(-1), queries, _ints(points, 2), axis=0)  # [N*M, Lq, P, 2]
        grid = op.Reshape(op.Gather(grids, _ints(level), axis=3), grid_shape)
        samples.append(op.GridSample(plane, grid, align_corners=0, mode="bilinear", padding_mode="zeros"))
    stacked = op.Concat(*samples, axis=3)  # [N*M, D, Lq, L*P]
    weights = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])
    weights = op.Reshape(weights, op.Concat(_ints(-1, 1), queries, _ints(levels * points), axis=0))
    summed = op.ReduceSum(op.Mul(stacked, weights), _ints(3), keepdims=0)  # [N*M, D, Lq]
    summed = op.Reshape(summed, op.Concat(batch, _ints(-1), queries, axis=0))  # [N, M*D, Lq]
    return op.Transpose(summed, perm=[0, 2, 1])


def _dcnv3_aggregate(input, offset, mask, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int,
                     pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
                     offset_scale: float, remove_center: bool):
    """The aggregation of dcn_tvm.compute.dcnv3 in standard ops: offset as [N, Ho, Wo, G, P, 2] (x, y),
    mask as [N, Ho, Wo, G, P]; -> [N, Ho, Wo, G*GC]. Sizes other than G, GC and P are dynamic."""
    op = opset19
    points = [(i, j) for i in range(kernel_w) for j in range(kernel_h)
              if not (remove_center and (i, j) == (kernel_w // 2, kernel_h // 2))]
    half_h, half_w = dilation_h * (kernel_h - 1) // 2, dilation_w * (kernel_w - 1) // 2
    grid = _floats([[i * dilation_w - half_w, j * dilation_h - half_h] for i, j in points])
    size = op.Shape(input)
    height, width = op.Slice(size, [1], [2]), op.Slice(size, [2], [3])
    out_size = op.Shape(mask)
    out_h, out_w = op.Slice(out_size, [1], [2]), op.Slice(out_size, [2], [3])
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)

    def centres(count, stride, pad, half):
        steps = op.Cast(op.Range(zero, op.Squeeze(count, [0]), one), to=onnx.TensorProto.FLOAT)
        return op.Add(op.Mul(steps, op.Constant(value_float=float(stride))), op.Constant(value_float=float(half - pad)))

    centre_x = op.Reshape(centres(out_w, stride_w, pad_w, half_w), [1, 1, -1, 1, 1, 1])
    centre_y = op.Reshape(centres(out_h, stride_h, pad_h, half_h), [1, -1, 1, 1, 1, 1])
    centre = op.Concat(op.Add(centre_x, op.Mul(centre_y, op.Constant(value_float=0.0))),
                       op.Add(centre_y, op.Mul(centre_x, op.Constant(value_float=0.0))), axis=-1)  # [1, Ho, Wo, 1, 1, 2]
    offset32 = op.Cast(offset, to=onnx.TensorProto.FLOAT)
    positions = op.Add(centre, op.Mul(op.Add(grid, offset32), op.Constant(value_float=float(offset_scale))))
    extent = op.Cast(op.Concat(width, height, axis=0), to=onnx.TensorProto.FLOAT)  # (W, H)
    normalised = op.Sub(op.Div(op.Add(op.Mul(positions, op.Constant(value_float=2.0)), op.Constant(value_float=1.0)),
                               extent), op.Constant(value_float=1.0))
    batch = op.Slice(size, [0], [1])
    # [N, Ho, Wo, G, P, 2] -> [N, G, Ho*Wo, P, 2] -> [N*G, Ho*Wo, P, 2]
    sample_grid = op.Reshape(op.Transpose(normalised, perm=[0, 3, 1, 2, 4, 5]), [-1, 0, 0, len(points), 2],
                             allowzero=0)
    sample_grid = op.Reshape(sample_grid, op.Concat(op.Mul(batch, _ints(group)), _ints(-1, len(points), 2), axis=0))
    planes = op.Reshape(op.Transpose(op.Reshape(input, op.Concat(batch, height, width, _ints(group, group_channels),
                                                                  axis=0)), perm=[0, 3, 4, 1, 2]),
                        op.Concat(op.Mul(batch, _ints(group)), _ints(group_channels), height, width, axis=0))
    samples = op.GridSample(planes, op.CastLike(sample_grid, planes), mode="bilinear", padding_mode="zeros",
                            align_corners=0)  # [N*G, GC, Ho*Wo, P]
    weights = op.Reshape(op.Transpose(mask, perm=[0, 3, 1, 2, 4]), op.Concat(op.Mul(batch, _ints(group)),
                                                                             _ints(1, -1, len(points)), axis=0))
    total = op.ReduceSum(op.Mul(samples, op.CastLike(weights, samples)), [-1], keepdims=0)  # [N*G, GC, Ho*Wo]
    total = op.Reshape(total, op.Concat(batch, _ints(group * group_channels), out_h, out_w, axis=0))
    return op.Transpose(total, perm=[0, 2, 3, 1])


def _floats(rows):
    """A float32 ONNX constant of nested lists."""
    return opset19.Constant(value=onnx.numpy_helper.from_array(np.array(rows, dtype="float32")))


def _dcnv3_core(input, offset, mask, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int,
                pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int, offset_scale: float,
                remove_center: bool):
    """dcn_tvm::dcnv3_core as GridSample and a weighted sum (`_dcnv3_aggregate`)."""
    points = kernel_h * kernel_w - int(remove_center)
    offset = opset19.Reshape(offset, [0, 0, 0, group, points, 2])
    mask = opset19.Reshape(mask, [0, 0, 0, group, points])
    return _dcnv3_aggregate(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                            dilation_w, group, group_channels, offset_scale, remove_center)


def _dcnv4_core(input, offset_mask, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int,
                pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int, offset_scale: float,
                remove_center: bool):
    """dcn_tvm::dcnv4_core: DCNv4's packed offset_mask split into offset and mask, then `_dcnv3_aggregate`."""
    points = kernel_h * kernel_w - int(remove_center)
    used = opset19.Slice(offset_mask, [0], [group * points * 3], [3])
    per_group = opset19.Reshape(used, [0, 0, 0, group, 3 * points])
    offset = opset19.Reshape(opset19.Slice(per_group, [0], [2 * points], [4]), [0, 0, 0, group, points, 2])
    mask = opset19.Slice(per_group, [2 * points], [3 * points], [4])
    return _dcnv3_aggregate(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                            dilation_w, group, group_channels, offset_scale, remove_center)


def onnx_translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """dcn_tvm's ops to their ONNX translations, for `torch.onnx.export(custom_translation_table=...)`."""
    return {torch.ops.dcn_tvm.deform_conv2d.default: _deform_conv2d,
            torch.ops.dcn_tvm.deform_roi_pool.default: _deform_roi_pool,
            torch.ops.dcn_tvm.ms_deform_attn.default: _ms_deform_attn,
            torch.ops.dcn_tvm.dcnv3_core.default: _dcnv3_core,
            torch.ops.dcn_tvm.dcnv4_core.default: _dcnv4_core}


def dynamic_shapes(args: Sequence) -> tuple:
    """Every dimension but dim 1 (channels, box coordinates) of every tensor in `args` dynamic:
    batch and spatial sizes of images, the number of RoIs."""
    dynamic = torch.export.Dim.DYNAMIC
    return tuple({dim: dynamic for dim in range(arg.dim()) if dim != 1} if isinstance(arg, torch.Tensor) else None
                 for arg in args)


def to_onnx(model: torch.nn.Module, args: Sequence, f: str | os.PathLike | None = None, *,
            dynamic: bool = True, opset_version: int | None = None, **options) -> torch.onnx.ONNXProgram:
    """`torch.onnx.export(model, args, f, dynamo=True, ...)` with dcn_tvm's translations.

    Args:
        model: an eval-mode module (or torch.export.ExportedProgram) using dcn_tvm ops.
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
    if dynamic and "dynamic_shapes" not in options:
        options["dynamic_shapes"] = dynamic_shapes(args)
    options["custom_translation_table"] = {**onnx_translation_table(), **options.get("custom_translation_table", {})}
    return torch.onnx.export(model, args, f, dynamo=True, opset_version=opset_version, **options)
