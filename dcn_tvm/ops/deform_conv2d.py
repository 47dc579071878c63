"""Deformable convolution for PyTorch: functional + modules, argument checks, torch.library ops.

`deform_conv2d` has torchvision's signature, semantics and offset layout. The compiled TVM kernels
run zero-copy on the caller's tensors (DLPack), on the current CUDA stream.

The functionals and modules script (torch.jit.script: the Python checks are skipped there, and the
ops check every argument again when they run) and trace (torch.fx: a module is one call_module node,
as torch.nn's layers are; a functional traced through is its op's node).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dcn_tvm import schedules
from dcn_tvm.geometry.arguments import ShapeError
from dcn_tvm.geometry.arguments import expect_shape as _expect_shape
from dcn_tvm.geometry.arguments import finite as _finite
from dcn_tvm.geometry.arguments import pair as _pair
from dcn_tvm.geometry.arguments import positive_int as _positive
from dcn_tvm.geometry.conv import ConvGeometry, conv_geometry, resolve_layout
from dcn_tvm.kernels.cache import get_kernel
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_key, target_kind
from dcn_tvm.ops import dispatch, onnx_forms, shapes
from dcn_tvm.ops.scratch import scratch
from dcn_tvm.schedules.mma_tf32 import TF32_PRECISIONS

OP = "deform_conv2d"


def _check_tensor(name: str, value, rank: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != rank:
        raise ShapeError(f"{name} must have {rank} dimensions, got shape {tuple(value.shape)}")


def geometry(input: Tensor, offset: Tensor, weight: Tensor, mask: Tensor | None, stride, padding,
             dilation) -> ConvGeometry:
    """Check the tensors of deform_conv2d (kind, rank, input dtype), their shapes and the other arguments
    (dcn_tvm.geometry.conv), then the other tensors' dtype and device, as torchvision does shapes first;
    return the layer's static geometry."""
    _check_tensor("input", input, 4)
    _check_tensor("offset", offset, 4)
    _check_tensor("weight", weight, 4)
    _check_tensor("mask", mask, 4, optional=True)
    dispatch.check_dtype("input", input)
    geo = conv_geometry(input.shape, offset.shape, weight.shape, None if mask is None else mask.shape, stride,
                        padding, dilation, dispatch.kernel_dtype(input))
    for name, value in (("offset", offset), ("weight", weight), ("mask", mask)):
        if value is None:
            continue
        dispatch.check_same_dtype(name, value, input)
        dispatch.check_same_device(name, value, input)
    dispatch.check_device(input)
    return geo


def _check_bias(bias: Tensor, input: Tensor, geo: ConvGeometry) -> None:
    _check_tensor("bias", bias, 1)
    if dispatch.compute_dtype(bias) != dispatch.compute_dtype(input) or bias.device != input.device:
        raise TypeError(f"bias must have the input's dtype {input.dtype} on {input.device}, "
                        f"got {bias.dtype} on {bias.device}")
    _expect_shape("bias", bias.shape, (geo.out_channels,), "O")


def precision(geo: ConvGeometry, target: str) -> str:
    """The precision of `geo`'s GEMMs on a target key: for float32 on CUDA, torch's float32 matmul
    precision on CUDA (read at call time, `cuda_matmul_precision`), where "high" and "medium" mean TF32
    tensor cores; else "highest"."""
    exact = geo.dtype != "float32" or target_kind(target) != "cuda"
    return "highest" if exact else cuda_matmul_precision()


def cuda_matmul_precision() -> str:
    """torch's float32 matmul precision on CUDA now, by torch.get_float32_matmul_precision()'s names:
    "highest" (IEEE), "high" or "medium" (TF32).

    torch (>= 2.9) keeps a setting per backend: `torch.backends.cuda.matmul.fp32_precision` reads "tf32"
    or "ieee" ("none" until set), inherited from torch.backends.fp32_precision and
    torch.backends.cudnn.fp32_precision, and written by the legacy switches too. Once that API has been
    used, torch.get_float32_matmul_precision() raises or names the legacy switch's stale state (both
    seen with torch 2.11 and 2.14): here it only tells "high" from "medium" when the setting is "tf32".
    """
    if torch.backends.cuda.matmul.fp32_precision != "tf32":
        return "highest"
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # "you have used mix of the legacy and new APIs"
        return "high"
    return legacy if legacy in TF32_PRECISIONS else "high"


def _spec(stage: str, geo: ConvGeometry, input: Tensor) -> KernelSpec:
    """The kernel of a stage for `input`'s sizes or for every size (dcn_tvm.ops.shapes)."""
    n, _, h, w = input.shape
    target = target_key(input.device)
    return shapes.choose(KernelSpec(OP, stage, geo, (("n", n), ("h", h), ("w", w)), target,
                                    precision=precision(geo, target)))


def _positions(geo: ConvGeometry, input: Tensor) -> int:
    oh, ow = geo.output_size(input.shape[2], input.shape[3])
    tile = schedules.position_tile(OP, target_kind(target_key(input.device)))
    return (oh * ow + tile - 1) // tile * tile


def layout(geo: ConvGeometry, target: str) -> str:
    """The layout of the internal stages of `geo`'s kernels for a target key (the schedules' choice,
    dcn_tvm.geometry.conv.resolve_layout): it fixes the column gradient's layout between the
    backward kernels."""
    return resolve_layout(geo, schedules.compute_options(OP, target_kind(target)).get("layout", "channels_first"))


def scatter_spec(geo: ConvGeometry, target: str, deterministic: bool = False) -> KernelSpec:
    """The input-gradient scatter for `geo`'s column gradient (generic in every size); `deterministic`:
    without the atomic adds a CUDA scatter makes otherwise (the CPU's adds are never atomic)."""
    stage = "scatter_channels_last" if layout(geo, target) == "channels_last" else "scatter"
    return KernelSpec(OP, stage, None, (), target, acc_dtype=geo.acc_dtype,
                      deterministic=dispatch.deterministic_scatter(target, deterministic))


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def _present(*tensors):
    """The kernels' arguments: the given tensors without the absent optional ones (mask)."""
    return [t for t in tensors if t is not None]


@torch.library.custom_op("dcn_tvm::deform_conv2d", mutates_args=())
def _forward_op(input: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor, bias: Tensor,
                stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    input, offset, mask, weight, bias = _contiguous(input, offset, mask, weight, bias)
    geo = geometry(input, offset, weight, mask, stride, padding, dilation)
    _check_bias(bias, input, geo)
    oh, ow = geo.output_size(input.shape[2], input.shape[3])
    output = input.new_empty(input.shape[0], geo.out_channels, oh, ow)
    if output.numel() == 0 or input.numel() == 0:  # no images, output channels or pixels: only the bias
        return output.copy_(bias[:, None, None].expand_as(output))
    kernel = get_kernel(_spec("forward", geo, input))
    kernel(*_present(input, offset, mask, weight, bias), output)
    return output


@_forward_op.register_fake
def _forward_fake(input, offset, mask, weight, bias, stride, padding, dilation):
    return input.new_empty(input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])


@torch.library.custom_op("dcn_tvm::deform_conv2d_backward", mutates_args=())
def _backward_op(grad_output: Tensor, input: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor,
                 stride: list[int], padding: list[int], dilation: list[int]
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_offset, grad_mask or an empty tensor without mask, grad_weight, grad_bias)."""
    grad_output, input, offset, mask, weight = _contiguous(grad_output, input, offset, mask, weight)
    geo = geometry(input, offset, weight, mask, stride, padding, dilation)
    n = input.shape[0]
    if grad_output.numel() == 0 or input.numel() == 0:  # as the forward: only the bias sees the output
        grad_mask = torch.zeros_like(mask) if mask is not None else input.new_empty(0)
        return (torch.zeros_like(input), torch.zeros_like(offset), grad_mask, torch.zeros_like(weight),
                grad_output.sum((0, 2, 3)))
    grad_offset = torch.empty_like(offset)
    grad_mask = torch.empty_like(mask) if mask is not None else input.new_empty(0)
    acc = getattr(torch, geo.acc_dtype)
    (kh, kw), og, p, c = geo.kernel, geo.offset_groups, _positions(geo, input), geo.in_channels
    target = target_key(input.device)
    channels_last = layout(geo, target) == "channels_last"
    scatter = get_kernel(scatter_spec(geo, target, torch.are_deterministic_algorithms_enabled()))
    # Channels-last: [N, P, KH, KW, G, C/G] from backward_data, the scatter's [N, P, KH, KW, C].
    grad_columns = scratch("grad_columns", (n, p, kh, kw, geo.groups, c // geo.groups) if channels_last else
                           (n, c, kh, kw, p), acc, input.device)
    rows, cols = (scratch(name, (n, og, kh, kw, p, 2), torch.int32, input.device) for name in ("rows", "cols"))
    weights = scratch("weights", (n, og, kh, kw, p, 4), acc, input.device)
    get_kernel(_spec("backward_data", geo, input))(
        *_present(input, offset, mask, weight, grad_output), *_present(grad_offset, grad_mask if mask is not None else None),
        grad_columns, rows, cols, weights)

    if channels_last:  # the scatter's [N, H, W, C] becomes a new NCHW tensor below
        grad_input = scratch("grad_input", (n, input.shape[2], input.shape[3], c), acc, input.device).zero_()
        scatter(grad_columns.view(n, p, kh, kw, c), rows, cols, weights, grad_input)
        grad_input = grad_input.permute(0, 3, 1, 2)
    else:
        grad_input = torch.zeros(input.shape, dtype=acc, device=input.device)
        scatter(grad_columns, rows, cols, weights, grad_input)

    grad_weight, grad_bias = torch.empty_like(weight), weight.new_empty(weight.shape[0])
    get_kernel(_spec("backward_weight", geo, input))(*_present(input, offset, mask, grad_output), grad_weight,
                                                    grad_bias)
    # Channels-last: a copy, never the scratch itself (the next call would overwrite a returned view).
    grad_input = grad_input.to(input.dtype, memory_format=torch.contiguous_format, copy=channels_last)
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias


@_backward_op.register_fake
def _backward_fake(grad_output, input, offset, mask, weight, stride, padding, dilation):
    grad_mask = torch.empty_like(mask) if mask is not None else input.new_empty(0)
    return (torch.empty_like(input), torch.empty_like(offset), grad_mask, torch.empty_like(weight),
            weight.new_empty(weight.shape[0]))


def _setup_context(ctx, inputs, output):
    input, offset, mask, weight, _, stride, padding, dilation = inputs
    ctx.save_for_backward(input, offset, mask, weight)
    ctx.conv = (stride, padding, dilation)


def _backward(ctx, grad_output):
    input, offset, mask, weight = ctx.saved_tensors
    grad_input, grad_offset, grad_mask, grad_weight, grad_bias = torch.ops.dcn_tvm.deform_conv2d_backward(
        grad_output, input, offset, mask, weight, *ctx.conv
    )
    return grad_input, grad_offset, grad_mask if mask is not None else None, grad_weight, grad_bias, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)
dispatch.register("deform_conv2d", autocast=True)
dispatch.register("deform_conv2d_backward", autocast=False)


def is_fx_traced(*values) -> bool:
    """Whether a value (or an element of a list or tuple value) is a torch.fx Proxy: under symbolic
    tracing, where tensors have no shapes to check."""
    return any(isinstance(v, torch.fx.Proxy) or isinstance(v, (list, tuple)) and is_fx_traced(*v) for v in values)


def fx_leaf(module: nn.Module, *args):
    """Under torch.fx symbolic tracing, `module` called on `args` recorded as one call_module node, as FX
    records torch.nn's layers (torchvision's feature extractor then names it by the module's path, as
    it does its own ops' layers); None otherwise, and for the root module, whose forward FX traces."""
    proxy = next((a for a in args if isinstance(a, torch.fx.Proxy)), None)
    if proxy is None:
        return None
    path = proxy.tracer.path_of_module(module)
    return proxy.tracer.create_proxy("call_module", path, args, {}) if path else None


def _check_arguments(input, offset, weight, bias, mask, stride, padding, dilation):
    """Check a Python call's arguments before dispatch; return stride, padding and dilation as pairs.
    Under torch.fx tracing only the numbers are checked (the op checks the tensors when it runs)."""
    conv = _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)
    if not is_fx_traced(input, offset, weight, bias, mask):
        geo = geometry(input, offset, weight, mask, *conv)
        if bias is not None:
            _check_bias(bias, input, geo)
    return conv


def _int_list(value: int | tuple[int, int]) -> list[int]:
    """stride, padding or dilation as the op's [height, width]."""
    if isinstance(value, int):
        return [value, value]
    return [value[0], value[1]]


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
                  stride: int | tuple[int, int] = (1, 1), padding: int | tuple[int, int] = (0, 0),
                  dilation: int | tuple[int, int] = (1, 1), mask: Tensor | None = None) -> Tensor:
    """Deformable convolution (DCNv1; DCNv2 with `mask`), a drop-in for torchvision.ops.deform_conv2d.

    Args:
        input (Tensor[N, C, H, W]): input feature map.
        offset (Tensor[N, 2*offset_groups*KH*KW, OH, OW]): channel 2*(g*KH*KW + k) is dy and
            2*(g*KH*KW + k) + 1 is dx of kernel point k (row-major) of offset group g.
        weight (Tensor[O, C/groups, KH, KW]): convolution weights; groups = C // weight.shape[1].
        bias (Tensor[O], optional): added to every output position.
        stride, padding, dilation (int or (int, int)): as in torch.nn.functional.conv2d.
        mask (Tensor[N, offset_groups*KH*KW, OH, OW], optional): DCNv2 modulation per sample.

    A sample at (y, x) is bilinear with every corner outside the image read as zero, and counts only
    when -1 < y < H and -1 < x < W. Returns Tensor[N, O, OH, OW].
    Wrong shapes raise ShapeError, a ValueError and a RuntimeError (torchvision raises RuntimeError).
    """
    if not torch.jit.is_scripting():
        stride, padding, dilation = _check_arguments(input, offset, weight, bias, mask, stride, padding, dilation)
    if bias is None:
        bias = weight.new_zeros([weight.shape[0]])
    if not torch.jit.is_scripting():
        if onnx_forms.exporting():
            return onnx_forms.deform_conv2d(input, offset, mask, weight, bias, _int_list(stride), _int_list(padding),
                                            _int_list(dilation))
    return torch.ops.dcn_tvm.deform_conv2d(input, offset, mask, weight, bias, _int_list(stride), _int_list(padding),
                                           _int_list(dilation))


def offset_lr_multiplier(value) -> float:
    """`value` checked as an offset layer's learning-rate multiplier: a finite real number >= 0."""
    multiplier = _finite("offset_lr_mult", value)
    if multiplier < 0:
        raise ValueError(f"offset_lr_mult must be >= 0, got {value!r}")
    return multiplier


def scale_gradient(tensor: Tensor, scale: float) -> Tensor:
    """`tensor`'s value, whose gradient is multiplied by `scale` on its way back: plain tensor ops in
    forward, which every copy of a module (deepcopy, pickle, torch.save, load_state_dict(assign=True)),
    torch.compile, TorchScript and FX keep, where tensor hooks get lost. Exact for finite values:
    frozen - tensor is +0, and frozen - 0 * scale is frozen bit for bit (-0.0 included)."""
    if scale == 1.0:
        return tensor
    frozen = tensor.detach()
    return frozen - (frozen - tensor) * scale


class _OffsetLayer:
    """What the offset layers share: zero initial parameters, `lr_mult` in their description."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lr_mult={self.lr_mult}"


class OffsetConv2d(_OffsetLayer, nn.Conv2d):
    """A conv that predicts offsets: it starts at zero (so deformation starts at none) and its weight and
    bias gradients are multiplied by `lr_mult` (under SGD, the paper's learning-rate multiplier for offset
    layers) in its forward, so that every copy of it keeps the multiplier."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 lr_mult: float = 1.0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation)
        self.lr_mult = offset_lr_multiplier(lr_mult)

    def forward(self, input: Tensor) -> Tensor:
        bias = self.bias
        if bias is not None:
            bias = scale_gradient(bias, self.lr_mult)
        return self._conv_forward(input, scale_gradient(self.weight, self.lr_mult), bias)


class OffsetLinear(_OffsetLayer, nn.Linear):
    """A fully connected layer that predicts offsets, as OffsetConv2d."""

    def __init__(self, in_features: int, out_features: int, lr_mult: float = 1.0):
        super().__init__(in_features, out_features)
        self.lr_mult = offset_lr_multiplier(lr_mult)

    def forward(self, input: Tensor) -> Tensor:
        return nn.functional.linear(input, scale_gradient(self.weight, self.lr_mult),
                                    scale_gradient(self.bias, self.lr_mult))


class DeformConv2d(nn.Module):
    """Deformable convolution layer with torchvision's signature; offsets (and mask) are inputs.

    forward(input [N, C, H, W], offset [N, 2*og*KH*KW, OH, OW], mask [N, og*KH*KW, OH, OW] or None)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        groups = _positive("groups", groups)
        if in_channels % groups != 0 or out_channels % groups != 0:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                             f"multiples of groups ({groups})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride, self.padding = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation of torch.nn.Conv2d."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        leaf = None if torch.jit.is_scripting() else fx_leaf(self, input, offset, mask)
        if leaf is not None:
            return leaf
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}")


class DeformConv2dPack(DeformConv2d):
    """The paper's deformable layer: owns the conv that predicts its offsets (and DCNv2 mask).

    The offset conv has 2*offset_groups*KH*KW channels (+ offset_groups*KH*KW mask logits when
    `modulated`), the same kernel, stride, padding and dilation, and starts at zero, so the layer
    starts as the plain convolution (modulated: times DCNv2's initial mask sigmoid(0) = 0.5).
    `offset_lr_mult` (a finite number >= 0) scales the offset conv's gradients, which under SGD is the
    paper's learning-rate multiplier for offset layers; OffsetConv2d applies it in its forward, so every
    copy of the module keeps it.

    forward(input [N, C, H, W]) -> [N, O, OH, OW]
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, offset_groups: int = 1, bias: bool = True, modulated: bool = False,
                 offset_lr_mult: float = 1.0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        _positive("offset_groups", offset_groups)
        if in_channels % offset_groups != 0:
            raise ValueError(f"in_channels ({in_channels}) must be a multiple of offset_groups ({offset_groups})")
        points = offset_groups * self.kernel_size[0] * self.kernel_size[1]
        self.offset_groups, self.modulated = offset_groups, modulated
        self.offset_lr_mult = offset_lr_multiplier(offset_lr_mult)
        self.conv_offset = OffsetConv2d(in_channels, points * (3 if modulated else 2), self.kernel_size,
                                        self.stride, self.padding, self.dilation, lr_mult=self.offset_lr_mult)

    def forward(self, input: Tensor) -> Tensor:
        leaf = None if torch.jit.is_scripting() else fx_leaf(self, input)
        if leaf is not None:
            return leaf
        out = self.conv_offset(input)
        points = self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        mask: Tensor | None = torch.sigmoid(out[:, 2 * points :]) if self.modulated else None
        return deform_conv2d(input, out[:, : 2 * points], self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask)
