"""Deformable (PS) RoI pooling for PyTorch: functional, the paper's two heads, torch.library ops.

One operator covers the paper's four RoI poolings (§2.2): `group_size=1` pools plain RoIs,
`group_size=k` is position-sensitive, and offsets make either deformable. The rules are the
original DeformablePSROIPooling's (see `dcn_tvm.compute.deform_roi_pool`). The compiled TVM kernels
run zero-copy on the caller's tensors (DLPack), on the current CUDA stream; they are compiled for
every RoI count at once (R is symbolic), so a changing number of proposals never recompiles.
The functional and the modules script and trace as deform_conv2d's do (dcn_tvm.ops.deform_conv2d).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dcn_tvm import schedules
from dcn_tvm.geometry.arguments import finite as _finite
from dcn_tvm.geometry.arguments import positive_int as _positive_int
from dcn_tvm.geometry.roi_pool import RoIPoolGeometry, resolve_layout, roi_pool_geometry
from dcn_tvm.kernels.cache import get_kernel
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_key, target_kind
from dcn_tvm.ops import dispatch, onnx_forms, shapes
from dcn_tvm.ops.deform_conv2d import OffsetConv2d, OffsetLinear, fx_leaf, is_fx_traced, offset_lr_multiplier
from dcn_tvm.ops.scratch import scratch

OP = "deform_roi_pool"


def _check_tensor(name: str, value, rank: int, input: Tensor) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(value.shape)}")
    dispatch.check_same_device(name, value, input)


def _check_boxes(rois, input: Tensor) -> None:
    """rois must be a tensor (checked later) or a list of [L_i, 4] box tensors on input's device."""
    if isinstance(rois, Tensor):
        return
    if not isinstance(rois, (list, tuple)):
        raise TypeError(f"rois must be a Tensor[R, 5] or a list of Tensor[L, 4], got {type(rois).__name__}")
    for index, boxes in enumerate(rois):
        _check_tensor(f"rois[{index}]", boxes, 2, input)
        if boxes.shape[1] != 4:
            raise ValueError(f"rois[{index}] must have shape [L, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")


@torch.fx.wrap
def roi_rows(rois: Tensor | list[Tensor], input: Tensor) -> Tensor:
    """rois as one [R, 5] tensor of (batch_index, x1, y1, x2, y2) rows.

    Accepts that tensor itself, or a list of [L_i, 4] box tensors, one per image (torchvision's
    format), whose rows get batch index i. One node under torch.fx tracing (rois may be either).
    """
    if not torch.jit.is_scripting():
        _check_boxes(rois, input)
    if isinstance(rois, Tensor):
        return rois
    rows = []
    for index, boxes in enumerate(rois):
        # At least float32, which holds every batch index exactly (bfloat16 stops at 256).
        dtype = torch.promote_types(boxes.dtype, torch.float32)
        rows.append(torch.cat([boxes.new_full([boxes.shape[0], 1], index, dtype=dtype), boxes.to(dtype)], dim=1))
    if len(rows) == 0:
        return input.new_zeros([0, 5])
    return torch.cat(rows)


def geometry(input: Tensor, rois: Tensor, offset: Tensor | None, output_size, spatial_scale, group_size,
             part_size, sampling_ratio, gamma) -> RoIPoolGeometry:
    """Check the tensors of deform_roi_pool (rois as [R, 5]; kind, rank, dtype, device), then their
    shapes and the other arguments (dcn_tvm.geometry.roi_pool), and return the call's geometry."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must have 4 dimensions [N, C, H, W], got shape {tuple(input.shape)}")
    dispatch.check_dtype("input", input)
    dispatch.check_device(input)
    _check_tensor("rois", rois, 2, input)
    if rois.shape[1] != 5:
        raise ValueError(f"rois must have shape [R, 5] (batch_index, x1, y1, x2, y2), got {tuple(rois.shape)}")
    if not rois.dtype.is_floating_point:
        raise TypeError(f"rois must have a floating dtype, got {rois.dtype}")
    if offset is not None:
        _check_tensor("offset", offset, 4, input)
        dispatch.check_same_dtype("offset", offset, input)
    return roi_pool_geometry(input.shape, rois.shape[0], None if offset is None else offset.shape, output_size,
                             spatial_scale, group_size, part_size, sampling_ratio, gamma,
                             dispatch.kernel_dtype(input))


def _kernel_rois(rois: Tensor, geo: RoIPoolGeometry, batch: int) -> Tensor:
    """rois in acc_dtype, contiguous, after checking every batch index is a whole number in [0, N)
    (a host sync). Not while a CUDA graph is captured, where a sync is an error: there an index outside
    [0, N) pools image 0 (dcn_tvm.compute.deform_roi_pool reads no other image)."""
    if not (rois.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        index = rois[:, 0]
        bad = ~((index >= 0) & (index < batch) & (index == index.trunc()))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"rois[:, 0] must be batch indices in [0, {batch}) (input has {batch} images), "
                             f"whole numbers, got {index[row].item()!r} in row {row}")
    return rois.to(getattr(torch, geo.acc_dtype)).contiguous()


def layout(geo: RoIPoolGeometry, target: str) -> str:
    """The layout of the internal stages of `geo`'s kernels for a target key (the schedules' choice,
    dcn_tvm.geometry.roi_pool.resolve_layout): it fixes grad_scale's layout between the backward kernels."""
    return resolve_layout(geo, schedules.compute_options(OP, target_kind(target)).get("layout", "channels_first"))


def scatter_spec(geo: RoIPoolGeometry, target: str, deterministic: bool = False) -> KernelSpec:
    """The input-gradient scatter of `geo` (every size symbolic); `deterministic`: without the atomic
    adds a CUDA scatter makes otherwise (the CPU's adds are never atomic)."""
    sizes = (("r", None), ("n", None), ("h", None), ("w", None))
    return KernelSpec(OP, "scatter", geo, sizes, target, acc_dtype=geo.acc_dtype,
                      deterministic=dispatch.deterministic_scatter(target, deterministic))


def _spec(stage: str, geo: RoIPoolGeometry, input: Tensor) -> KernelSpec:
    """R is always symbolic; N, H, W by the shape policy (dcn_tvm.ops.shapes), and for the scatter,
    which gains nothing from static sizes, always."""
    if stage == "scatter":
        return scatter_spec(geo, target_key(input.device), torch.are_deterministic_algorithms_enabled())
    n, _, h, w = input.shape
    return shapes.choose(KernelSpec(OP, stage, geo, (("r", None), ("n", n), ("h", h), ("w", w)),
                                    target_key(input.device), acc_dtype=geo.acc_dtype))


def _prepare(input, rois, offset, *parameters):
    """(geometry, input, rois in acc_dtype, offset), contiguous and checked, for the ops below."""
    geo = geometry(input, rois, offset, *parameters)
    offset = None if offset is None else offset.contiguous()
    return geo, input.contiguous(), _kernel_rois(rois, geo, input.shape[0]), offset


def _output_shape(input: Tensor, rois: Tensor, output_size: int, group_size: int) -> tuple[int, int, int, int]:
    return rois.shape[0], input.shape[1] // (group_size * group_size), output_size, output_size


@torch.library.custom_op("dcn_tvm::deform_roi_pool", mutates_args=())
def _forward_op(input: Tensor, rois: Tensor, offset: Tensor | None, output_size: int, spatial_scale: float,
                group_size: int, part_size: int, sampling_ratio: int, gamma: float) -> Tensor:
    geo, input, rois, offset = _prepare(input, rois, offset, output_size, spatial_scale, group_size, part_size,
                                        sampling_ratio, gamma)
    output = input.new_empty(_output_shape(input, rois, output_size, group_size))
    if rois.shape[0] == 0 or input.numel() == 0:  # no RoIs, or no pixels to sample
        return output.zero_()
    kernel = get_kernel(_spec("forward", geo, input))
    kernel(*[t for t in (input, rois, offset) if t is not None], output)
    return output


@_forward_op.register_fake
def _forward_fake(input, rois, offset, output_size, spatial_scale, group_size, part_size, sampling_ratio, gamma):
    return input.new_empty(_output_shape(input, rois, output_size, group_size))


@torch.library.custom_op("dcn_tvm::deform_roi_pool_backward", mutates_args=())
def _backward_op(grad_output: Tensor, input: Tensor, rois: Tensor, offset: Tensor | None, output_size: int,
                 spatial_scale: float, group_size: int, part_size: int, sampling_ratio: int, gamma: float
                 ) -> tuple[Tensor, Tensor]:
    """(grad_input, grad_offset or an empty tensor without offsets)."""
    geo, input, rois, offset = _prepare(input, rois, offset, output_size, spatial_scale, group_size, part_size,
                                        sampling_ratio, gamma)
    expected = _output_shape(input, rois, output_size, group_size)
    if tuple(grad_output.shape) != expected or grad_output.dtype != input.dtype:
        raise ValueError(f"grad_output must be {input.dtype} of shape {expected} (R, out_channels, k, k), "
                         f"got {grad_output.dtype} of shape {tuple(grad_output.shape)}")
    grad_offset = input.new_empty(0) if offset is None else torch.empty_like(offset)
    r = rois.shape[0]
    if r == 0 or input.numel() == 0:
        return torch.zeros_like(input), grad_offset.zero_()
    acc = getattr(torch, geo.acc_dtype)
    k, classes = geo.output_size, geo.sample_classes
    n, c, h, w = input.shape
    channels_last = layout(geo, target_key(input.device)) == "channels_last"
    # Channels-last (group_size 1): grad_scale and the input gradient over the padded channels.
    grad_scale = scratch("grad_scale", (r, k, k, geo.padded_channels) if channels_last else (r, geo.out_channels, k, k),
                         acc, input.device)
    roi_batch = scratch("roi_batch", (r,), torch.int32, input.device)
    bin_starts = scratch("bin_starts", (classes, k, k, r, 4), acc, input.device)
    tables = (grad_scale, roi_batch, bin_starts)
    operands = [t for t in (input, rois, offset, grad_output.contiguous()) if t is not None]
    results = [grad_offset] if offset is not None else []
    get_kernel(_spec("backward", geo, input))(*operands, *results, *tables)
    if channels_last:  # [N, H, W, C'] becomes a new NCHW tensor below
        grad_input = scratch("grad_input", (n, h, w, geo.padded_channels), acc, input.device).zero_()
        get_kernel(_spec("scatter", geo, input))(*tables, grad_input)
        grad_input = grad_input[..., :c].permute(0, 3, 1, 2)
    else:
        grad_input = torch.zeros(input.shape, dtype=acc, device=input.device)
        get_kernel(_spec("scatter", geo, input))(*tables, grad_input)
    # Channels-last: a copy, never the scratch itself (the next call would overwrite a returned view).
    return grad_input.to(input.dtype, memory_format=torch.contiguous_format, copy=channels_last), grad_offset


@_backward_op.register_fake
def _backward_fake(grad_output, input, rois, offset, output_size, spatial_scale, group_size, part_size,
                   sampling_ratio, gamma):
    return torch.empty_like(input), input.new_empty(0) if offset is None else torch.empty_like(offset)


def _setup_context(ctx, inputs, output):
    input, rois, offset, *parameters = inputs
    ctx.save_for_backward(input, rois, offset)
    ctx.parameters = parameters


def _backward(ctx, grad_output):
    input, rois, offset = ctx.saved_tensors
    grad_input, grad_offset = torch.ops.dcn_tvm.deform_roi_pool_backward(grad_output, input, rois, offset,
                                                                         *ctx.parameters)
    return (grad_input, None, grad_offset if offset is not None else None) + (None,) * len(ctx.parameters)


_forward_op.register_autograd(_backward, setup_context=_setup_context)
dispatch.register("deform_roi_pool", autocast=True)
dispatch.register("deform_roi_pool_backward", autocast=False)


def deform_roi_pool(input: Tensor, rois: Tensor | list[Tensor], offset: Tensor | None = None, output_size: int = 7,
                    spatial_scale: float = 1.0, group_size: int = 1, part_size: int | None = None,
                    sampling_ratio: int = 4, gamma: float = 0.1) -> Tensor:
    """(Deformable) (position-sensitive) RoI pooling, as the original DeformablePSROIPooling.

    Args:
        input (Tensor[N, C, H, W]): feature or score maps, C = out_channels * group_size².
        rois (Tensor[R, 5] or list of Tensor[L_i, 4]): (batch_index, x1, y1, x2, y2) rows in image
            pixels, or one box tensor per image. Any floating dtype; the kernels read them in
            float32 (float64 for float64 input). No gradient flows to them.
        offset (Tensor[R, 2*num_classes, P, P], optional): normalised offsets per part cell,
            channel 2*class is tx and 2*class + 1 is ty (x first); class = c // (out_channels /
            num_classes). None pools without deformation.
        output_size (int): k, the bins per side.
        spatial_scale (float): input pixels per image pixel (1/16 for stride 16).
        group_size (int): 1 for plain RoI pooling, k for position-sensitive pooling.
        part_size (int, optional): P, the offset cells per side; default output_size.
        sampling_ratio (int): samples per bin side.
        gamma (float): offset scale; the bin moves by gamma * offset * (roi width, roi height).

    Returns Tensor[R, out_channels, k, k]: every bin the mean of its samples inside the image.
    Batch indices outside [0, N) raise ValueError (checking them synchronises with the device); under
    CUDA graph capture, where nothing may synchronise, they are not checked and such a RoI pools image 0.
    """
    rows = roi_rows(rois, input)
    part = output_size if part_size is None else part_size
    if not torch.jit.is_scripting():
        if not is_fx_traced(input, rows, offset):  # checked before dispatch, the numbers as the op's
            geo = geometry(input, rows, offset, output_size, spatial_scale, group_size, part_size, sampling_ratio,
                           gamma)
            output_size, spatial_scale, group_size = geo.output_size, geo.spatial_scale, geo.group_size
            part, sampling_ratio, gamma = geo.part_size or geo.output_size, geo.sampling_ratio, geo.gamma
        if onnx_forms.exporting():
            return onnx_forms.deform_roi_pool(input, rows, offset, output_size, spatial_scale, group_size, part,
                                              sampling_ratio, gamma)
    return torch.ops.dcn_tvm.deform_roi_pool(input, rows, offset, output_size, spatial_scale, group_size, part,
                                             sampling_ratio, gamma)


class DeformRoIPool(nn.Module):
    """Deformable RoI pooling, the paper's Faster R-CNN head (§2.2, Fig. 3).

    Plain RoI pooling feeds a fc layer that predicts normalised offsets [R, 2, k, k] (zero-initialised,
    so the layer starts as plain pooling); the RoI is then pooled again with the bins moved by
    gamma * offset * (roi width, roi height). `offset_lr_mult` (the paper's beta, 0.01 for Faster
    R-CNN; a finite number >= 0) scales the fc's gradients in forward (OffsetLinear), which under SGD is
    its learning-rate multiplier.

    forward(input [N, C, H, W], rois [R, 5] or list of [L_i, 4]) -> [R, C, k, k]
    """

    def __init__(self, in_channels: int, output_size: int, spatial_scale: float, sampling_ratio: int = 4,
                 gamma: float = 0.1, offset_lr_mult: float = 0.01):
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.output_size = _positive_int("output_size", output_size)
        self.spatial_scale = _finite("spatial_scale", spatial_scale, positive=True)
        self.sampling_ratio = _positive_int("sampling_ratio", sampling_ratio)
        self.gamma, self.offset_lr_mult = _finite("gamma", gamma), offset_lr_multiplier(offset_lr_mult)
        bins = output_size * output_size
        self.offset_fc = OffsetLinear(in_channels * bins, 2 * bins, lr_mult=self.offset_lr_mult)

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        leaf = None if torch.jit.is_scripting() else fx_leaf(self, input, rois)
        if leaf is not None:
            return leaf
        rows, k = roi_rows(rois, input), self.output_size
        plain = deform_roi_pool(input, rows, None, k, self.spatial_scale, sampling_ratio=self.sampling_ratio,
                                gamma=self.gamma)
        offset = self.offset_fc(plain.flatten(1)).view(-1, 2, k, k)
        return deform_roi_pool(input, rows, offset, k, self.spatial_scale, sampling_ratio=self.sampling_ratio,
                               gamma=self.gamma)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}, offset_lr_mult={self.offset_lr_mult}")


class DeformPSRoIPool(nn.Module):
    """Deformable position-sensitive RoI pooling, the paper's R-FCN head (§2.2, Fig. 4).

    A 1x1 conv makes k²·out_channels score maps (out_channels = C+1 classes for the classification
    branch, 4·N_reg for box regression). A second 1x1 conv makes 2·k²·num_offset_classes offset
    fields, which PS RoI pooling without offsets turns into the offsets [R, 2·num_offset_classes,
    k, k]; the score maps are then pooled by deformable PS RoI pooling. Offsets are class-aware
    (one pair per output channel) or, with `class_agnostic`, one pair per bin shared by every output
    channel (the box-regression branch). The offset conv starts at zero, so the head starts as
    R-FCN's; `offset_lr_mult` scales its gradients. R-FCN's vote is `output.mean((2, 3))`.

    forward(input [N, in_channels, H, W], rois [R, 5] or list of [L_i, 4]) -> [R, out_channels, k, k]
    """

    def __init__(self, in_channels: int, out_channels: int, output_size: int, spatial_scale: float,
                 sampling_ratio: int = 4, gamma: float = 0.1, class_agnostic: bool = False,
                 offset_lr_mult: float = 1.0):
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.output_size = _positive_int("output_size", output_size)
        self.spatial_scale = _finite("spatial_scale", spatial_scale, positive=True)
        self.sampling_ratio = _positive_int("sampling_ratio", sampling_ratio)
        self.gamma, self.offset_lr_mult = _finite("gamma", gamma), offset_lr_multiplier(offset_lr_mult)
        self.class_agnostic = class_agnostic
        bins = output_size * output_size
        offset_classes = 1 if class_agnostic else out_channels
        self.score_conv = nn.Conv2d(in_channels, bins * out_channels, 1)
        self.offset_conv = OffsetConv2d(in_channels, bins * 2 * offset_classes, 1, lr_mult=self.offset_lr_mult)
        nn.init.normal_(self.score_conv.weight, std=0.01)
        nn.init.zeros_(self.score_conv.bias)

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        leaf = None if torch.jit.is_scripting() else fx_leaf(self, input, rois)
        if leaf is not None:
            return leaf
        rows, k = roi_rows(rois, input), self.output_size
        offset = deform_roi_pool(self.offset_conv(input), rows, None, k, self.spatial_scale, k,
                                 sampling_ratio=self.sampling_ratio, gamma=self.gamma)
        return deform_roi_pool(self.score_conv(input), rows, offset, k, self.spatial_scale, k,
                               sampling_ratio=self.sampling_ratio, gamma=self.gamma)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, gamma={self.gamma}, "
                f"class_agnostic={self.class_agnostic}, offset_lr_mult={self.offset_lr_mult}")
