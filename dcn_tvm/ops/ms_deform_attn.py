"""Multi-scale deformable attention for PyTorch: functional, the Deformable DETR module, torch.library ops.

`ms_deform_attn` has the reference operator's signature and semantics (Deformable DETR's
MSDeformAttnFunction; see `dcn_tvm.compute.ms_deform_attn`). The level shapes are read from
`spatial_shapes` on the host and baked into the kernels, which a model reuses for every image of one
resolution. On a CUDA device that read is a device sync (and an error under CUDA graph capture), so
`spatial_shapes` and `level_start_index` may stay on the CPU instead. The compiled TVM kernels run
zero-copy on the caller's tensors (DLPack), on the current CUDA stream.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dcn_tvm.geometry.arguments import positive_int as _positive_int
from dcn_tvm.geometry.ms_deform_attn import MSDeformAttnGeometry, ms_deform_attn_geometry
from dcn_tvm.kernels.cache import get_kernel
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_key
from dcn_tvm.ops import dispatch, onnx_forms, shapes

OP = "ms_deform_attn"


def _check_tensor(name: str, value, rank: int, like: Tensor | None, on_cpu_too: bool = False) -> None:
    """`value` is a tensor of `rank` dimensions on `like`'s device (or, `on_cpu_too`, on the CPU)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(value.shape)}")
    if like is not None and not (on_cpu_too and value.device.type == "cpu"):
        dispatch.check_same_device(name, value, like, "value")


def _check_tensors(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> None:
    """Check the tensors of ms_deform_attn (kind, rank, dtype, device)."""
    _check_tensor("value", value, 4, None)
    dispatch.check_dtype("value", value)
    dispatch.check_device(value)
    _check_tensor("spatial_shapes", spatial_shapes, 2, value, on_cpu_too=True)
    _check_tensor("level_start_index", level_start_index, 1, value, on_cpu_too=True)
    for name, index in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError(f"{name} must have an integer dtype (int64), got {index.dtype}")
    _check_tensor("sampling_locations", sampling_locations, 6, value)
    _check_tensor("attention_weights", attention_weights, 5, value)
    for name, tensor in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        dispatch.check_same_dtype(name, tensor, value, "value's")


def geometry(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
             attention_weights: Tensor) -> MSDeformAttnGeometry:
    """Check the tensors of ms_deform_attn, read the level shapes and starts (a host sync where they are
    on a CUDA device), check the shapes against them (dcn_tvm.geometry.ms_deform_attn) and return the
    call's geometry."""
    _check_tensors(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    on_gpu = any(t.device.type == "cuda" for t in (spatial_shapes, level_start_index))
    if on_gpu and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("ms_deform_attn reads spatial_shapes and level_start_index on the host, which CUDA "
                           "graph capture forbids for tensors on the GPU: pass them as CPU tensors")
    return ms_deform_attn_geometry(value.shape, spatial_shapes.tolist(), level_start_index.tolist(),
                                   sampling_locations.shape, attention_weights.shape, dispatch.kernel_dtype(value))


def scatter_spec(geo: MSDeformAttnGeometry, target: str, deterministic: bool = False) -> KernelSpec:
    """The value-gradient scatter of `geo` (every size symbolic); `deterministic`: without the atomic
    adds a CUDA scatter makes otherwise (dispatch.deterministic_scatter)."""
    return KernelSpec(OP, "scatter", geo, (("n", None), ("q", None)), target, acc_dtype=geo.acc_dtype,
                      deterministic=dispatch.deterministic_scatter(target, deterministic))


def _spec(stage: str, geo: MSDeformAttnGeometry, sampling_locations: Tensor) -> KernelSpec:
    """N and Lq as the shape policy chooses (dcn_tvm.ops.shapes); the scatter always symbolic."""
    if stage == "scatter":
        return scatter_spec(geo, target_key(sampling_locations.device), torch.are_deterministic_algorithms_enabled())
    n, q = sampling_locations.shape[:2]
    return shapes.choose(KernelSpec(OP, stage, geo, (("n", n), ("q", q)), target_key(sampling_locations.device),
                                    acc_dtype=geo.acc_dtype))


def _output_shape(value: Tensor, sampling_locations: Tensor) -> tuple[int, int, int]:
    n, _, heads, head_dim = value.shape
    return n, sampling_locations.shape[1], heads * head_dim


@torch.library.custom_op("dcn_tvm::ms_deform_attn", mutates_args=())
def _forward_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                attention_weights: Tensor) -> Tensor:
    geo = geometry(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, q, _ = shape = _output_shape(value, sampling_locations)
    output = value.new_empty(shape)
    if output.numel() == 0:
        return output
    kernel = get_kernel(_spec("forward", geo, sampling_locations))
    kernel(value.contiguous(), sampling_locations.contiguous(), attention_weights.contiguous(),
           output.view(n, q, geo.heads, geo.head_dim))
    return output


@_forward_op.register_fake
def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return value.new_empty(_output_shape(value, sampling_locations))


@torch.library.custom_op("dcn_tvm::ms_deform_attn_backward", mutates_args=())
def _backward_op(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                 sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_value, grad_sampling_locations, grad_attention_weights)."""
    geo = geometry(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    expected = _output_shape(value, sampling_locations)
    if tuple(grad_output.shape) != expected or grad_output.dtype != value.dtype:
        raise ValueError(f"grad_output must be {value.dtype} of shape {expected} (N, Lq, M*D), got "
                         f"{grad_output.dtype} of shape {tuple(grad_output.shape)}")
    grad_locations, grad_weights = torch.empty_like(sampling_locations), torch.empty_like(attention_weights)
    acc = getattr(torch, geo.acc_dtype)
    grad_value = torch.zeros(value.shape, dtype=acc, device=value.device)
    if grad_output.numel() == 0:
        return grad_value.to(value.dtype), grad_locations.zero_(), grad_weights.zero_()
    n, q, _ = expected
    operands = (sampling_locations.contiguous(), attention_weights.contiguous(),
                grad_output.contiguous().view(n, q, geo.heads, geo.head_dim))
    get_kernel(_spec("backward", geo, sampling_locations))(value.contiguous(), *operands, grad_locations,
                                                            grad_weights)
    get_kernel(_spec("scatter", geo, sampling_locations))(*operands, grad_value)
    return grad_value.to(value.dtype), grad_locations, grad_weights


@_backward_op.register_fake
def _backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.dcn_tvm.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return grad_value, None, None, grad_locations, grad_weights


_forward_op.register_autograd(_backward, setup_context=_setup_context)
dispatch.register("ms_deform_attn", autocast=True)
dispatch.register("ms_deform_attn_backward", autocast=False)


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention (Deformable DETR, eq. 3), as the reference MSDeformAttnFunction.

    Args:
        value (Tensor[N, S, M, D]): M heads of D channels at S = sum(H_l * W_l) positions, every level
            flattened row-major, levels in order.
        spatial_shapes (Tensor[L, 2]): (H_l, W_l) of every level, integers (int64), on value's device or
            on the CPU (read there without a device sync; needed under CUDA graph capture).
        level_start_index (Tensor[L]): the first row of value of every level (0, H_0*W_0, ...), as
            spatial_shapes on value's device or on the CPU.
        sampling_locations (Tensor[N, Lq, M, L, P, 2]): normalised (x, y) of every sample, pixel (i, j) of
            a level at ((j + 0.5) / W, (i + 0.5) / H) (grid_sample's align_corners=False); samples read
            zero outside their level; NaN and inf locations read nothing.
        attention_weights (Tensor[N, Lq, M, L, P]): the weight of every sample.

    Returns Tensor[N, Lq, M*D]: per query and head, the weighted sum of the bilinear samples.
    Inconsistent shapes, dtypes or devices raise ValueError/TypeError.
    """
    _check_tensors(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if onnx_forms.exporting():
        return onnx_forms.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                         attention_weights)
    return _forward_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _initial_offsets(heads: int, levels: int, points: int) -> Tensor:
    """Deformable DETR's initial sampling offsets [M, L, P, 2]: head m looks along the angle 2*pi*m/M (its
    direction scaled so that the larger coordinate is 1), point p at p + 1 times that, on every level."""
    angles = torch.arange(heads, dtype=torch.float64) * (2 * math.pi / heads)
    directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
    directions = directions / directions.abs().amax(dim=-1, keepdim=True)
    scale = torch.arange(1, points + 1, dtype=torch.float64).view(1, 1, points, 1)
    return (directions.view(heads, 1, 1, 2) * scale).expand(heads, levels, points, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable DETR's multi-scale deformable attention module (§4.1, MSDeformAttn).

    The value is a linear projection of the flattened multi-scale features; every query predicts, per
    head, level and point, a sampling offset (a linear layer) and an attention weight (a linear layer,
    softmax over levels x points), samples the value at reference point + offset and projects the
    result. Initialisation as Deformable DETR's: the offset layer's weight zero and its bias spreading
    each head's points along one direction (`_initial_offsets`), the attention weights uniform (zero
    layer), the value and output projections Xavier-uniform with zero bias.

    forward(query [N, Lq, C], reference_points [N, Lq, L, 2] normalised (x, y) or [N, Lq, L, 4] boxes
    (cx, cy, w, h), input_flatten [N, S, C], spatial_shapes [L, 2], level_start_index [L],
    padding_mask [N, S] (True: padding) or None) -> [N, Lq, C]
    """

    def __init__(self, embed_dims: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4):
        super().__init__()
        self.embed_dims = _positive_int("embed_dims", embed_dims)
        self.num_levels = _positive_int("num_levels", num_levels)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.num_points = _positive_int("num_points", num_points)
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims ({embed_dims}) must be a multiple of num_heads ({num_heads})")
        samples = num_heads * num_levels * num_points
        self.sampling_offsets = nn.Linear(embed_dims, samples * 2)
        self.attention_weights = nn.Linear(embed_dims, samples)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(
                _initial_offsets(self.num_heads, self.num_levels, self.num_points).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        n, queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, input_flatten.shape[1], heads, self.embed_dims // heads)
        offsets = self.sampling_offsets(query).view(n, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(n, queries, heads, levels * points).softmax(-1)
        weights = weights.view(n, queries, heads, levels, points)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide by its (W, H).
            sizes = spatial_shapes.flip(-1).to(offsets.device, offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / sizes[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # Boxes: offsets are in halves of the box size per point.
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), got shape "
                             f"{tuple(reference_points.shape)}")
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output)

    def extra_repr(self) -> str:
        return (f"embed_dims={self.embed_dims}, num_levels={self.num_levels}, num_heads={self.num_heads}, "
                f"num_points={self.num_points}")
