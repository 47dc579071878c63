"""The ops' ONNX forms, emitted while `torch.onnx.export(..., dynamo=True)` traces them: a plain export
of a model holding dcn_tvm layers needs no extra argument (torch's own extension point,
`torch.onnx.ops.symbolic`: the traced graph holds the ONNX node itself; nothing here imports onnx).

- deform_conv2d: the standard `DeformConv` (opset >= 19), same offset layout, mask and bias inputs.
- deform_roi_pool: `dcn_tvm::DeformRoIPool` (custom domain, version 1; schema in dcn_tvm.export).
- ms_deform_attn, dcnv3_core, dcnv4_core: no operator of their own. They are written here in torch ops
  the exporter translates to standard ONNX (a Gather per row of bilinear corners, a weighted MatMul),
  every size dynamic but the heads/groups, levels and points; ms_deform_attn reads its level shapes and
  starts at run time. These forms take the ops' own arguments, so they also decompose the ops in a graph
  captured outside an ONNX export (`decompositions`).

The TorchScript exporter (`dynamo=False`) is refused with a clear error. For a graph captured outside an
ONNX export (a torch.export.ExportedProgram), dcn_tvm.export's translation table gives the first two the
same nodes and `decompositions()` replaces the other three by their forms here.
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


def _node(op: str, inputs: Sequence[Tensor | None], attributes: dict, like: Tensor, shape: Sequence,
          version: int) -> Tensor:
    """The ONNX node `op` as the exporter traces it (torch.onnx.ops.symbolic): its stand-in output of `shape`
    with `like`'s dtype and device. torch makes it on the CPU, where a CUDA model's next layer would refuse it;
    the move is a no-op on the CPU."""
    return torch.onnx.ops.symbolic(op, inputs, attributes, dtype=like.dtype, shape=shape,
                                   version=version).to(like.device)


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
    return _node("DeformConv", (input, weight, offset, bias, mask), attributes, input,
                 (input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]), version=19)


def deform_roi_pool_attributes(output_size: int, spatial_scale: float, group_size: int, part_size: int,
                               sampling_ratio: int, gamma: float) -> dict:
    return dict(output_size=output_size, spatial_scale=spatial_scale, group_size=group_size, part_size=part_size,
                sampling_ratio=sampling_ratio, gamma=gamma)


def deform_roi_pool(input: Tensor, rois: Tensor, offset: Tensor | None, output_size: int, spatial_scale: float,
                    group_size: int, part_size: int, sampling_ratio: int, gamma: float) -> Tensor:
    """dcn_tvm::DeformRoIPool(X, rois, offset) -> [R, C / group_size², k, k]."""
    attributes = deform_roi_pool_attributes(output_size, spatial_scale, group_size, part_size, sampling_ratio, gamma)
    shape = (rois.shape[0], input.shape[1] // (group_size * group_size), output_size, output_size)
    return _node(f"{DOMAIN}::DeformRoIPool", (input, rois, offset), attributes, input, shape, version=1)


def _accumulator(tensor: Tensor) -> torch.dtype:
    """float32 for the half types, else the tensor's own dtype (float64 stays float64)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _weighted_bilinear_sum(rows: Tensor, base: Tensor, x: Tensor, y: Tensor, height: Tensor | int,
                           width: Tensor | int, weights: Tensor) -> Tensor:
    """The weighted sum over the last axis of bilinear samples of images stored as rows, in x's dtype.

    Pixel (i, j) of an image is rows[base + i*width + j], its centre at (x, y) = (j, i); a corner outside
    height x width reads zero, a NaN or inf point nothing. rows [R, C]; base, x, y, height, width and weights
    broadcast to [*B, K] -> [*B, C]. One Gather and MatMul per row of corners (measured on Deformable DETR's
    encoder in onnxruntime: one for all four corners peaks at 1.8x the memory, one per corner takes 1.3x the time).
    """
    base, x, y, weights = torch.broadcast_tensors(base, x, y, weights.to(x.dtype))
    x0, y0 = x.floor(), y.floor()
    total = None
    for corner_y in (y0, y0 + 1):
        indices, corner_weights = [], []
        for corner_x in (x0, x0 + 1):
            inside = (corner_x >= 0) & (corner_x < width) & (corner_y >= 0) & (corner_y < height)
            bilinear = (1 - (x - corner_x).abs()) * (1 - (y - corner_y).abs())
            corner_weights.append(torch.where(inside, bilinear * weights, 0))
            indices.append(base + torch.where(inside, corner_y, 0).long() * width
                           + torch.where(inside, corner_x, 0).long())
        index = torch.cat(indices, -1)
        samples = rows.index_select(0, index.flatten()).view(*index.shape, rows.shape[1]).to(x.dtype)  # [*B, 2K, C]
        row_sum = (torch.cat(corner_weights, -1).unsqueeze(-2) @ samples).squeeze(-2)
        total = row_sum if total is None else total + row_sum
    return total


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """dcn_tvm::ms_deform_attn in standard ops: value [N, S, M, D] -> [N, Lq, M*D]; the level shapes
    [L, 2] and starts [L] are read at run time; they may be on the CPU beside a value on the GPU."""
    spatial_shapes, level_start_index = spatial_shapes.to(value.device), level_start_index.to(value.device)
    n, s, heads, head_dim = value.shape
    _, queries, _, levels, _, _ = sampling_locations.shape
    rows = value.permute(0, 2, 1, 3).reshape(-1, head_dim)  # row (n*M + m)*S + s
    height, width = spatial_shapes[:, :1], spatial_shapes[:, 1:]  # [L, 1], against [N, Lq, M, L, P]
    plane = torch.arange(n, device=value.device).view(n, 1, 1, 1, 1) * heads \
        + torch.arange(heads, device=value.device).view(1, 1, heads, 1, 1)
    base = plane * s + level_start_index.view(levels, 1)
    locations = sampling_locations.to(_accumulator(value))
    x, y = locations[..., 0] * width - 0.5, locations[..., 1] * height - 0.5  # [N, Lq, M, L, P]
    base, x, y, height, width = (t.flatten(3) for t in torch.broadcast_tensors(base, x, y, height, width))
    total = _weighted_bilinear_sum(rows, base, x, y, height, width, attention_weights.flatten(3))  # [N, Lq, M, D]
    return total.reshape(n, queries, heads * head_dim).to(value.dtype)


def _dcnv3_aggregate(input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int,
                     stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
                     group_channels: int, offset_scale: float, remove_center: bool) -> Tensor:
    """The aggregation of dcn_tvm.compute.dcnv3 in standard ops: input [N, H, W, G*GC], offset
    [N, Ho, Wo, G, P, 2] (x, y), mask [N, Ho, Wo, G, P] -> [N, Ho, Wo, G*GC]."""
    n, height, width, _ = input.shape
    _, out_h, out_w, _, _, _ = offset.shape
    device = input.device
    # Point p is kernel cell q = p (+ 1 past the centre with remove_center), column q // KH, row q % KH.
    cell = torch.arange(_points(kernel_h, kernel_w, remove_center), device=device)
    if remove_center:
        cell = cell + (cell >= (kernel_w // 2) * kernel_h + kernel_h // 2).long()
    half_h, half_w = dilation_h * (kernel_h - 1) // 2, dilation_w * (kernel_w - 1) // 2
    grid = torch.stack([cell // kernel_h * dilation_w - half_w, cell % kernel_h * dilation_h - half_h], -1)  # [P, 2]
    centre_x = torch.arange(out_w, device=device).view(1, 1, out_w, 1, 1) * stride_w + (half_w - pad_w)
    centre_y = torch.arange(out_h, device=device).view(1, out_h, 1, 1, 1) * stride_h + (half_h - pad_h)
    moved = (grid + offset.to(_accumulator(input))) * offset_scale  # [N, Ho, Wo, G, P, 2]
    rows = input.reshape(n, height, width, group, group_channels).permute(0, 3, 1, 2, 4).reshape(-1, group_channels)
    base = (torch.arange(n, device=device).view(n, 1, 1, 1, 1) * group
            + torch.arange(group, device=device).view(1, 1, 1, group, 1)) * (height * width)
    total = _weighted_bilinear_sum(rows, base, centre_x + moved[..., 0], centre_y + moved[..., 1], height, width,
                                   mask)  # [N, Ho, Wo, G, GC]
    return total.reshape(n, out_h, out_w, group * group_channels).to(input.dtype)


def _points(kernel_h: int, kernel_w: int, remove_center: bool) -> int:
    return kernel_h * kernel_w - int(remove_center)


def dcnv3_core(input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int,
               stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
               group_channels: int, offset_scale: float, remove_center: bool) -> Tensor:
    """dcn_tvm::dcnv3_core in standard ops (`_dcnv3_aggregate`)."""
    points = _points(kernel_h, kernel_w, remove_center)
    offset = offset.reshape(*offset.shape[:3], group, points, 2)
    mask = mask.reshape(*mask.shape[:3], group, points)
    return _dcnv3_aggregate(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                            dilation_w, group, group_channels, offset_scale, remove_center)


def dcnv4_core(input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
               pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
               offset_scale: float, remove_center: bool) -> Tensor:
    """dcn_tvm::dcnv4_core in standard ops: DCNv4's packed offset_mask split into offset and mask, then
    `_dcnv3_aggregate`."""
    points = _points(kernel_h, kernel_w, remove_center)
    per_group = offset_mask[..., :group * points * 3].reshape(*offset_mask.shape[:3], group, 3 * points)
    offset = per_group[..., :2 * points].reshape(*offset_mask.shape[:3], group, points, 2)
    return _dcnv3_aggregate(input, offset, per_group[..., 2 * points:], kernel_h, kernel_w, stride_h, stride_w,
                            pad_h, pad_w, dilation_h, dilation_w, group, group_channels, offset_scale, remove_center)


def decompositions() -> dict:
    """The ops without an ONNX operator, each to its form here: for `ExportedProgram.run_decompositions`."""
    return {torch.ops.dcn_tvm.ms_deform_attn.default: ms_deform_attn,
            torch.ops.dcn_tvm.dcnv3_core.default: dcnv3_core,
            torch.ops.dcn_tvm.dcnv4_core.default: dcnv4_core}
