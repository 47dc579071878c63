"""The ops' ONNX forms, emitted while `torch.onnx.export(..., dynamo=True)` traces them: a plain export
of a model holding dcn_tvm layers needs no extra argument (torch's own extension point,
`torch.onnx.ops.symbolic`: the traced graph holds the ONNX node itself; nothing here imports onnx).

- deform_conv2d: the standard `DeformConv` (opset >= 19), same offset layout, mask and bias inputs.
- deform_roi_pool: `dcn_tvm::DeformRoIPool` (custom domain, version 1; schema in dcn_tvm.export).

The TorchScript exporter (`dynamo=False`) is refused with a clear error. dcn_tvm.export's translation
table gives the same nodes for graphs captured outside an ONNX export (a torch.export.ExportedProgram).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DOMAIN = "dcn_tvm"


def exporting() -> bool:
    """Whether torch.onnx.export(..., dynamo=True) is tracing this call; the TorchScript exporter is refused."""
    if not torch.onnx.is_in_onnx_export():
        return False
    if torch.jit.is_tracing():
        raise RuntimeError("dcn_tvm's ops export to ONNX through torch.onnx.export(..., dynamo=True) (torch's "
                           "default), not the TorchScript exporter (dynamo=False), which torch deprecates")
    return True


def deform_conv_attributes(channels: int, weight_shape: Sequence[int], offset_channels: int, stride: Sequence[int],
                           padding: Sequence[int], dilation: Sequence[int]) -> dict:
    """DeformConv's attributes for input channels C, weight [O, C/groups, KH, KW] and offset channels
    2*offset_groups*KH*KW."""
    _, per_group, kh, kw = weight_shape
    return dict(dilations=list(dilation), group=channels // per_group, kernel_shape=[kh, kw],
                offset_group=offset_channels // (2 * kh * kw), pads=[padding[0], padding[1], padding[0], padding[1]],
                strides=list(stride))


def deform_conv2d(input: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor, bias: Tensor,
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """DeformConv(X, W, offset, B, mask) -> [N, O, OH, OW]."""
    attributes = deform_conv_attributes(input.shape[1], weight.shape, offset.shape[1], stride, padding, dilation)
    return torch.onnx.ops.symbolic("DeformConv", (input, weight, offset, bias, mask), attributes, dtype=input.dtype,
                                   shape=(input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]),
                                   version=19)


def deform_roi_pool_attributes(output_size: int, spatial_scale: float, group_size: int, part_size: int,
                               sampling_ratio: int, gamma: float) -> dict:
    return dict(output_size=output_size, spatial_scale=spatial_scale, group_size=group_size, part_size=part_size,
                sampling_ratio=sampling_ratio, gamma=gamma)


def deform_roi_pool(input: Tensor, rois: Tensor, offset: Tensor | None, output_size: int, spatial_scale: float,
                    group_size: int, part_size: int, sampling_ratio: int, gamma: float) -> Tensor:
    """dcn_tvm::DeformRoIPool(X, rois, offset) -> [R, C / group_size², k, k]."""
    attributes = deform_roi_pool_attributes(output_size, spatial_scale, group_size, part_size, sampling_ratio, gamma)
    shape = (rois.shape[0], input.shape[1] // (group_size * group_size), output_size, output_size)
    return torch.onnx.ops.symbolic(f"{DOMAIN}::DeformRoIPool", (input, rois, offset), attributes, dtype=input.dtype,
                                   shape=shape, version=1)
