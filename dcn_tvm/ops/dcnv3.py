"""DCNv3 and DCNv4 (InternImage, FlashInternImage) for PyTorch: functional, modules, torch.library ops.

`dcnv3_core` has the signature and semantics of InternImage's DCNv3 operator (its CUDA kernel's:
see dcn_tvm.compute.dcnv3; its PyTorch fallback swaps pad_h and pad_w), `dcnv4_core` the same
aggregation reading DCNv4's packed offset_mask. One TE compute serves both; the compiled kernels run
zero-copy on the caller's tensors (DLPack). The modules `DCNv3` and `DCNv4` have the upstream
parameter names, so upstream state_dicts load strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcn_tvm.geometry.dcnv3 import DCNv3Geometry, dcnv3_geometry
from dcn_tvm.kernels.cache import get_kernel
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_key
from dcn_tvm.ops import dispatch, onnx_forms, shapes

OP = "dcnv3"


def _check_tensor(name: str, value, input: Tensor | None = None) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions [N, H, W, C] (channels-last), got shape {tuple(value.shape)}")
    if input is None:
        return
    dispatch.check_same_dtype(name, value, input)
    dispatch.check_same_device(name, value, input)


def geometry(input: Tensor, sampling: list[Tensor], parameters: tuple, packed: bool) -> DCNv3Geometry:
    """Check the tensors (kind, rank, dtype, device) of a dcnv3_core call (`sampling` = [offset, mask]) or
    of a dcnv4_core call (packed, [offset_mask]), then their shapes and `parameters` (the operators'
    scalar arguments in order, see dcn_tvm.geometry.dcnv3), and return the call's geometry."""
    _check_tensor("input", input)
    dispatch.check_dtype("input", input)
    dispatch.check_device(input)
    for name, tensor in zip(("offset_mask",) if packed else ("offset", "mask"), sampling):
        _check_tensor(name, tensor, input)
    kh, kw, sh, sw, ph, pw, dh, dw, group, group_channels, offset_scale, remove_center = parameters
    return dcnv3_geometry(input.shape, [t.shape for t in sampling], (kh, kw), (sh, sw), (ph, pw), (dh, dw), group,
                          group_channels, offset_scale, remove_center, packed,
                          dispatch.kernel_dtype(input))


def _spec(stage: str, geo: DCNv3Geometry, input: Tensor) -> KernelSpec:
    """The kernel of a stage for `input`'s sizes or for every size (dcn_tvm.ops.shapes); on CUDA under
    torch.use_deterministic_algorithms the scatter without atomic adds (the CPU's never add atomically)."""
    n, h, w, _ = input.shape
    target = target_key(input.device)
    deterministic = stage == "scatter" and dispatch.deterministic_scatter(target,
                                                                          torch.are_deterministic_algorithms_enabled())
    return shapes.choose(KernelSpec(OP, stage, geo, (("n", n), ("h", h), ("w", w)), target, acc_dtype=geo.acc_dtype,
                                    deterministic=deterministic))


def _kernel_views(geo: DCNv3Geometry, sampling: list[Tensor]) -> list[Tensor]:
    """The sampling tensors (or their gradients) as the kernels see them: DCNv3's offset
    [N, Ho, Wo, G, P, 2] and mask [N, Ho, Wo, G, P] views; DCNv4's offset_mask as it is."""
    if geo.packed:
        return sampling
    offset, mask = sampling
    return [offset.view(*offset.shape[:3], geo.group, geo.points, 2), mask.view(*mask.shape[:3], geo.group, geo.points)]


def _output_shape(input: Tensor, sampling: list[Tensor]) -> tuple[int, int, int, int]:
    return (*sampling[0].shape[:3], input.shape[3])


def _forward(input: Tensor, sampling: list[Tensor], parameters: tuple, packed: bool) -> Tensor:
    input, sampling = input.contiguous(), [t.contiguous() for t in sampling]
    geo = geometry(input, sampling, parameters, packed)
    output = input.new_empty(_output_shape(input, sampling))
    if output.numel() == 0 or input.numel() == 0:  # no images, or every sample outside an empty image
        return output.zero_()
    get_kernel(_spec("forward", geo, input))(input, *_kernel_views(geo, sampling), output)
    return output


def _backward(grad_output: Tensor, input: Tensor, sampling: list[Tensor], parameters: tuple,
              packed: bool) -> list[Tensor]:
    """[grad_input, grad of each sampling tensor]."""
    input, sampling = input.contiguous(), [t.contiguous() for t in sampling]
    geo = geometry(input, sampling, parameters, packed)
    expected = _output_shape(input, sampling)
    if tuple(grad_output.shape) != expected or grad_output.dtype != input.dtype:
        raise ValueError(f"grad_output must be {input.dtype} of shape {expected}, got {grad_output.dtype} of "
                         f"shape {tuple(grad_output.shape)}")
    grads = [torch.empty_like(t) for t in sampling]
    grad_input = torch.zeros(input.shape, dtype=getattr(torch, geo.acc_dtype), device=input.device)
    if grad_output.numel() == 0 or input.numel() == 0:
        return [grad_input.to(input.dtype), *(g.zero_() for g in grads)]
    grad_output, views = grad_output.contiguous(), _kernel_views(geo, sampling)
    get_kernel(_spec("backward", geo, input))(input, *views, grad_output, *_kernel_views(geo, grads))
    get_kernel(_spec("scatter", geo, input))(*views, grad_output, grad_input)
    return [grad_input.to(input.dtype), *grads]


@torch.library.custom_op("dcn_tvm::dcnv3_core", mutates_args=())
def _dcnv3_op(input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int,
              stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
              group_channels: int, offset_scale: float, remove_center: bool) -> Tensor:
    return _forward(input, [offset, mask], (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                            dilation_w, group, group_channels, offset_scale, remove_center), False)


@torch.library.custom_op("dcn_tvm::dcnv3_core_backward", mutates_args=())
def _dcnv3_backward_op(grad_output: Tensor, input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int,
                       kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                       dilation_w: int, group: int, group_channels: int, offset_scale: float,
                       remove_center: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_offset, grad_mask)."""
    return tuple(_backward(grad_output, input, [offset, mask], (
        kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
        offset_scale, remove_center), False))


@torch.library.custom_op("dcn_tvm::dcnv4_core", mutates_args=())
def _dcnv4_op(input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
              pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
              offset_scale: float, remove_center: bool) -> Tensor:
    return _forward(input, [offset_mask], (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                           dilation_w, group, group_channels, offset_scale, remove_center), True)


@torch.library.custom_op("dcn_tvm::dcnv4_core_backward", mutates_args=())
def _dcnv4_backward_op(grad_output: Tensor, input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int,
                       stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int,
                       group: int, group_channels: int, offset_scale: float, remove_center: bool
                       ) -> tuple[Tensor, Tensor]:
    """(grad_input, grad_offset_mask), zero in offset_mask's padding channels."""
    return tuple(_backward(grad_output, input, [offset_mask], (
        kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
        offset_scale, remove_center), True))


def _register(forward_op, backward_op, name: str, sampling_count: int) -> None:
    """Fake kernels, autograd and the dispatcher rules of one operator with `sampling_count` sampling
    tensors after the input."""

    @forward_op.register_fake
    def _(input, *rest):
        return input.new_empty(_output_shape(input, rest[:sampling_count]))

    @backward_op.register_fake
    def _(grad_output, input, *rest):
        return (torch.empty_like(input), *(torch.empty_like(t) for t in rest[:sampling_count]))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:1 + sampling_count])
        ctx.parameters = inputs[1 + sampling_count:]

    def backward(ctx, grad_output):
        grads = getattr(torch.ops.dcn_tvm, f"{name}_backward")(grad_output, *ctx.saved_tensors, *ctx.parameters)
        return (*grads, *(None,) * len(ctx.parameters))

    forward_op.register_autograd(backward, setup_context=setup_context)
    dispatch.register(name, autocast=True)
    dispatch.register(f"{name}_backward", autocast=False)


_register(_dcnv3_op, _dcnv3_backward_op, "dcnv3_core", 2)
_register(_dcnv4_op, _dcnv4_backward_op, "dcnv4_core", 1)


def _arguments(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
               offset_scale, remove_center) -> tuple:
    """The scalar arguments as the ops take them (ints, a float, a bool)."""
    ints = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels)
    for name, value in zip(("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h",
                            "dilation_w", "group", "group_channels"), ints):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if not isinstance(offset_scale, (int, float)) or isinstance(offset_scale, bool):
        raise TypeError(f"offset_scale must be a real number, got {offset_scale!r}")
    return (*ints, float(offset_scale), bool(remove_center))


def dcnv3_core(input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int,
               stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
               group_channels: int, offset_scale: float, remove_center: bool = False) -> Tensor:
    """InternImage's DCNv3 aggregation (the semantics of its CUDA kernel; see dcn_tvm.compute.dcnv3).

    Args:
        input (Tensor[N, H, W, group*group_channels]): channels-last values.
        offset (Tensor[N, Ho, Wo, group*P*2]): the (x, y) offset of point p of group g at 2*(g*P + p),
            points x-major (kernel column outer), P = kernel_h*kernel_w (less 1 with remove_center).
        mask (Tensor[N, Ho, Wo, group*P]): the weight of every point, used as given (upstream's module
            applies a softmax over the points first).
        kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w (int): the window;
            pad_h pads the height (as the CUDA kernel; InternImage's PyTorch fallback swaps the pads).
        group, group_channels (int): G and GC.
        offset_scale (float): a point samples the window centre + offset_scale * (its grid
            displacement + its offset).
        remove_center (bool): leave the kernel's centre point out (odd kernels only).

    Returns Tensor[N, Ho, Wo, group*group_channels]; a sample outside -1 < y < H, -1 < x < W is zero and
    corners outside the image read as zero.
    """
    arguments = _arguments(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                           group_channels, offset_scale, remove_center)
    geometry(input, [offset, mask], arguments, packed=False)
    if onnx_forms.exporting():
        return onnx_forms.dcnv3_core(input, offset, mask, *arguments)
    return _dcnv3_op(input, offset, mask, *arguments)


def dcnv4_core(input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
               pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
               offset_scale: float, remove_center: bool = False) -> Tensor:
    """FlashInternImage's DCNv4 aggregation: `dcnv3_core` reading DCNv4's packed layout, no softmax.

    offset_mask (Tensor[N, Ho, Wo, D]): group g's 3P channels start at 3P*g: its P (x, y) offset pairs,
    then its P mask values; D = group*P*3 rounded up to a multiple of 8, the padding channels ignored
    (their gradient is zero). The other arguments and the result are dcnv3_core's.
    """
    arguments = _arguments(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                           group_channels, offset_scale, remove_center)
    geometry(input, [offset_mask], arguments, packed=True)
    if onnx_forms.exporting():
        return onnx_forms.dcnv4_core(input, offset_mask, *arguments)
    return _dcnv4_op(input, offset_mask, *arguments)


class _ToChannelsLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


def _norm_layer(channels: int, norm_layer: str) -> nn.Sequential:
    """Upstream's norm of the depthwise branch, channels-first in, channels-last out (its module
    indices, so the state_dict keys match: LN -> 1.weight, BN -> 0.weight)."""
    if norm_layer == "LN":
        return nn.Sequential(_ToChannelsLast(), nn.LayerNorm(channels, eps=1e-6))
    if norm_layer == "BN":
        return nn.Sequential(nn.BatchNorm2d(channels), _ToChannelsLast())
    raise ValueError(f"norm_layer must be 'LN' or 'BN', got {norm_layer!r}")


def _act_layer(act_layer: str) -> nn.Module:
    layers = {"ReLU": lambda: nn.ReLU(inplace=True), "SiLU": lambda: nn.SiLU(inplace=True), "GELU": nn.GELU}
    if act_layer not in layers:
        raise ValueError(f"act_layer must be one of {sorted(layers)}, got {act_layer!r}")
    return layers[act_layer]()


def _add_center_feature_scale(module: nn.Module, channels: int, group: int) -> None:
    """Upstream's optional centre-feature blend parameters (zero-initialised): per group,
    sigmoid(linear(query)) mixes the value projection into the aggregate (`_blend_center`)."""
    module.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
    module.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))


def _blend_center(module, query: Tensor, aggregate: Tensor, projected: Tensor) -> Tensor:
    scale = F.linear(query, module.center_feature_scale_proj_weight, module.center_feature_scale_proj_bias).sigmoid()
    scale = scale.repeat_interleave(module.channels // module.group, dim=-1)
    return aggregate * (1 - scale) + projected * scale


def _check_module_arguments(channels: int, kernel_size: int, group: int, remove_center: bool) -> None:
    if not isinstance(channels, int) or not isinstance(group, int) or group < 1 or channels % group:
        raise ValueError(f"channels must be divisible by group, got {channels} and {group}")
    if remove_center and kernel_size % 2 == 0:
        raise ValueError(f"remove_center needs an odd kernel_size, got {kernel_size}")


class DCNv3(nn.Module):
    """InternImage's DCNv3 layer, upstream's parameters and initialisation.

    input_proj (value), a depthwise conv + norm + activation (`dw_conv`) feeding the `offset` and
    `mask` linears (zero-initialised), a softmax over each group's points, dcnv3_core, output_proj.

    forward(input [N, H, W, channels]) -> [N, H, W, channels] (stride 1 with matching padding, as upstream)
    """

    def __init__(self, channels: int = 64, kernel_size: int = 3, dw_kernel_size: int | None = None, stride: int = 1,
                 pad: int = 1, dilation: int = 1, group: int = 4, offset_scale: float = 1.0, act_layer: str = "GELU",
                 norm_layer: str = "LN", center_feature_scale: bool = False, remove_center: bool = False):
        super().__init__()
        _check_module_arguments(channels, kernel_size, group, remove_center)
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.channels, self.kernel_size, self.dw_kernel_size = channels, kernel_size, dw_kernel_size
        self.stride, self.pad, self.dilation, self.group = stride, pad, dilation, group
        self.group_channels, self.offset_scale = channels // group, offset_scale
        self.center_feature_scale, self.remove_center = center_feature_scale, int(remove_center)
        points = kernel_size * kernel_size - self.remove_center
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, stride=1, padding=(dw_kernel_size - 1) // 2, groups=channels),
            _norm_layer(channels, norm_layer), _act_layer(act_layer))
        self.offset = nn.Linear(channels, group * points * 2)
        self.mask = nn.Linear(channels, group * points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        if center_feature_scale:
            _add_center_feature_scale(self, channels, group)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for layer in (self.offset, self.mask):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, input: Tensor) -> Tensor:
        n, h, w, _ = input.shape
        x = self.input_proj(input)
        query = self.dw_conv(input.permute(0, 3, 1, 2))
        offset = self.offset(query)
        mask = F.softmax(self.mask(query).reshape(n, h, w, self.group, -1), -1).reshape(n, h, w, -1).to(x.dtype)
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        out = dcnv3_core(x, offset.to(x.dtype), mask, k, k, s, s, p, p, d, d, self.group, self.group_channels,
                         self.offset_scale, bool(self.remove_center))
        if self.center_feature_scale:
            out = _blend_center(self, query, out, x)
        return self.output_proj(out)


class DCNv4(nn.Module):
    """FlashInternImage's DCNv4 layer, upstream's parameters and initialisation.

    value_proj, an optional depthwise conv (`offset_mask_dw`) feeding the zero-initialised `offset_mask`
    linear (the packed layout, no softmax), dcnv4_core, output_proj.

    forward(input [N, L, channels], shape=(H, W) or None for a square L) -> [N, L, channels]
    """

    def __init__(self, channels: int = 64, kernel_size: int = 3, stride: int = 1, pad: int = 1, dilation: int = 1,
                 group: int = 4, offset_scale: float = 1.0, dw_kernel_size: int | None = None,
                 center_feature_scale: bool = False, remove_center: bool = False, output_bias: bool = True,
                 without_pointwise: bool = False):
        super().__init__()
        _check_module_arguments(channels, kernel_size, group, remove_center)
        self.channels, self.kernel_size, self.dw_kernel_size = channels, kernel_size, dw_kernel_size
        self.stride, self.pad, self.dilation, self.group = stride, pad, dilation, group
        self.group_channels, self.offset_scale = channels // group, offset_scale
        self.center_feature_scale, self.remove_center = center_feature_scale, int(remove_center)
        self.without_pointwise = without_pointwise
        self.K = group * (kernel_size * kernel_size - self.remove_center)
        if dw_kernel_size is not None:
            self.offset_mask_dw = nn.Conv2d(channels, channels, dw_kernel_size, stride=1,
                                            padding=(dw_kernel_size - 1) // 2, groups=channels)
        self.offset_mask = nn.Linear(channels, int(math.ceil(self.K * 3 / 8) * 8))
        if not without_pointwise:
            self.value_proj = nn.Linear(channels, channels)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias)
        if center_feature_scale:
            _add_center_feature_scale(self, channels, group)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        if not self.without_pointwise:
            nn.init.xavier_uniform_(self.value_proj.weight)
            nn.init.zeros_(self.value_proj.bias)
            nn.init.xavier_uniform_(self.output_proj.weight)
            if self.output_proj.bias is not None:
                nn.init.zeros_(self.output_proj.bias)

    def forward(self, input: Tensor, shape: tuple[int, int] | None = None) -> Tensor:
        n, length, c = input.shape
        h, w = shape if shape is not None else (math.isqrt(length), math.isqrt(length))
        if h * w != length:
            raise ValueError(f"input has {length} positions, not H*W = {h}*{w}; pass shape=(H, W)")
        x = input if self.without_pointwise else self.value_proj(input)
        x = x.reshape(n, h, w, c)
        query = input
        if self.dw_kernel_size is not None:
            query = self.offset_mask_dw(input.view(n, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(
                n, length, c)
        offset_mask = self.offset_mask(query).reshape(n, h, w, -1).to(x.dtype)
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        out = dcnv4_core(x, offset_mask, k, k, s, s, p, p, d, d, self.group, self.group_channels,
                         self.offset_scale, bool(self.remove_center))
        if self.center_feature_scale:
            out = _blend_center(self, out, out, x)
        out = out.reshape(n, length, -1)
        return out if self.without_pointwise else self.output_proj(out)
