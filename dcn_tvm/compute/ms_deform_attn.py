"""Multi-scale deformable attention (Zhu et al. 2021, Deformable DETR, eq. 3) as pure TE.

value [N, S, M, D] holds L feature maps, level l an H_l x W_l map flattened row-major from row start_l;
every query q of head m samples P points in every level:

    output[n, q, m, d] = sum_{l, p} A[n, q, m, l, p] * bilinear_l(x, y)[d]
    x = loc[n, q, m, l, p, 0] * W_l - 0.5,  y = loc[n, q, m, l, p, 1] * H_l - 0.5

with pixel (i, j) at ((j + 0.5) / W_l, (i + 0.5) / H_l) in normalised coordinates (grid_sample's
align_corners=False) and zero outside the map (zero padding): a sample with x outside (-1, W_l) or y
outside (-1, H_l) reads nothing (NaN and inf locations too), and of the others only the corners inside
the map count. The level shapes are constants of the geometry.

Stages, by the names schedules look up (corners c = 2 * row + column of the 2 x 2 neighbourhood):

    sample_pixels  [N, Lq, M, L, P, 2]  (x, y) in pixels of the level, OUTSIDE (-2) along an axis
                                        where the sample reads nothing (acc_dtype)
    sample_index   [N, Lq, M, L, P, 4]  int32 row of value each corner reads (clamped into its level)
    sample_weight  [N, Lq, M, L, P, 4]  A x the corner's bilinear weight, 0 outside (forward)
    sampled_sum    [N, Lq, M, D]        their weighted sum, in acc_dtype
    output         [N, Lq, M, D]        cast to dtype (the torch op views it as [N, Lq, M*D])

The backward adds corner_dots [N, Lq, M, L, P, 4] (grad_output . value at every corner), from which the
location and attention-weight gradients follow; the value gradient is a scatter (`scatter_grad_value`).
"""

from __future__ import annotations

from typing import NamedTuple

from tvm import te, tirx

from dcn_tvm.compute.indexing import create_prim_func
from dcn_tvm.geometry.ms_deform_attn import MSDeformAttnGeometry

CORNERS = 4


def _const(value, dtype):
    return tirx.const(value, dtype)


def _level_constant(level, values, dtype):
    """values[level] for a level index expression (a Select chain, folded where the level is known)."""
    expr = _const(values[-1], dtype)
    for index in range(len(values) - 2, -1, -1):
        expr = tirx.Select(level == index, _const(values[index], dtype), expr)
    return expr


#: Where a sample that is not taken sits, in pixels: every corner of it is outside its level.
OUTSIDE = -2.0


def _level_size(geo: MSDeformAttnGeometry, level, axis):
    """W_l for axis 0 (x), H_l for axis 1 (y), as int32 expressions."""
    widths = _level_constant(level, [w for _, w in geo.levels], "int32")
    heights = _level_constant(level, [h for h, _ in geo.levels], "int32")
    if isinstance(axis, int):
        return heights if axis else widths
    return tirx.Select(axis == 0, widths, heights)


def _pixel(geo: MSDeformAttnGeometry, coordinate, level, axis, acc: str):
    """Normalised coordinate `axis` (0: x, 1: y) of a sample in pixels of its level (x * W_l - 0.5); OUTSIDE
    where the sample reads nothing along this axis (outside (-1, size), NaN, inf)."""
    size = _level_size(geo, level, axis).astype(acc)
    position = coordinate.astype(acc) * size - _const(0.5, acc)
    inside = tirx.all(position > _const(-1, acc), position < size)
    return tirx.Select(inside, position, _const(OUTSIDE, acc))


class _Corner(NamedTuple):
    """Corner c of a sample: the row of value it reads, its bilinear weight and the weight's
    derivatives along x and y (pixels), all zero where the corner is outside the map."""

    index: object
    weight: object
    slope_x: object
    slope_y: object


def _corner(geo: MSDeformAttnGeometry, x, y, level, c, acc: str) -> _Corner:
    """Corner c (2 * row + column of the 2 x 2 neighbourhood) of the sample at pixel (x, y) of `level`."""
    height = _level_constant(level, [h for h, _ in geo.levels], "int32")
    width = _level_constant(level, [w for _, w in geo.levels], "int32")
    start = _level_constant(level, geo.level_starts, "int32")
    left, top = te.floor(x), te.floor(y)
    down, right = c // 2, c % 2
    row, col = top.astype("int32") + down, left.astype("int32") + right
    inside = tirx.all(row >= 0, row < height, col >= 0, col < width)
    one, zero = _const(1, acc), _const(0, acc)
    weight_y = tirx.Select(down == 0, one - (y - top), y - top)
    weight_x = tirx.Select(right == 0, one - (x - left), x - left)
    sign_y, sign_x = (tirx.Select(bit == 0, -one, one) for bit in (down, right))
    clamp_row = tirx.min(tirx.max(row, 0), height - 1)
    clamp_col = tirx.min(tirx.max(col, 0), width - 1)
    return _Corner(start + clamp_row * width + clamp_col,
                   tirx.Select(inside, weight_y * weight_x, zero),
                   tirx.Select(inside, sign_x * weight_y, zero),
                   tirx.Select(inside, sign_y * weight_x, zero))


def _operands(geo: MSDeformAttnGeometry, batch, queries):
    """Placeholders value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2], attention_weights
    [N, Lq, M, L, P], all in geo.dtype."""
    m, levels, p = geo.heads, geo.num_levels, geo.points
    value = te.placeholder((batch, geo.spatial_size, m, geo.head_dim), geo.dtype, name="value")
    locations = te.placeholder((batch, queries, m, levels, p, 2), geo.dtype, name="sampling_locations")
    attention = te.placeholder((batch, queries, m, levels, p), geo.dtype, name="attention_weights")
    return value, locations, attention


def _sample_stages(geo: MSDeformAttnGeometry, locations):
    """sample_pixels [N, Lq, M, L, P, 2] (acc_dtype) and sample_index [N, Lq, M, L, P, 4], and a function
    giving corner c of a sample from them."""
    acc = geo.acc_dtype
    pixels = te.compute(locations.shape, lambda n, q, m, level, p, axis: _pixel(
        geo, locations[n, q, m, level, p, axis], level, axis, acc), name="sample_pixels")

    def corner(n, q, m, level, p, c) -> _Corner:
        return _corner(geo, pixels[n, q, m, level, p, 0], pixels[n, q, m, level, p, 1], level, c, acc)

    index = te.compute((*locations.shape[:-1], CORNERS), lambda *at: corner(*at).index, name="sample_index")
    return pixels, index, corner


def forward(geo: MSDeformAttnGeometry, batch, queries):
    """(value, sampling_locations, attention_weights) -> output [N, Lq, M, D]; returns (arguments,
    outputs) in call order."""
    value, locations, attention = _operands(geo, batch, queries)
    acc = geo.acc_dtype
    _, index, corner = _sample_stages(geo, locations)
    weight = te.compute(
        index.shape,
        lambda n, q, m, level, p, c: attention[n, q, m, level, p].astype(acc) * corner(n, q, m, level, p, c).weight,
        name="sample_weight")
    rl, rp = te.reduce_axis((0, geo.num_levels), name="rl"), te.reduce_axis((0, geo.points), name="rp")
    rc = te.reduce_axis((0, CORNERS), name="rc")
    shape = (batch, queries, geo.heads, geo.head_dim)
    total = te.compute(
        shape,
        lambda n, q, m, d: te.sum(weight[n, q, m, rl, rp, rc] * value[n, index[n, q, m, rl, rp, rc], m, d].astype(acc),
                                  axis=[rl, rp, rc]),
        name="sampled_sum")
    output = te.compute(shape, lambda *at: total[at].astype(geo.dtype), name="output")
    return [value, locations, attention], [output]


def backward(geo: MSDeformAttnGeometry, batch, queries):
    """Gradients w.r.t. sampling_locations and attention_weights.

    Arguments (value, sampling_locations, attention_weights, grad_output [N, Lq, M, D]); outputs
    grad_sampling_locations [N, Lq, M, L, P, 2] and grad_attention_weights [N, Lq, M, L, P] (dtype):

        corner_dots[..., c]   = sum_d grad_output[n, q, m, d] * value[n, sample_index[..., c], m, d]
        grad_attention        = sum_c weight_c * corner_dots[..., c]
        grad_location[..., 0] = A * W_l * sum_c d(weight_c)/dx * corner_dots[..., c]   (H_l and y for 1)

    The derivative is the interpolation's at the sample (zero where the sample is not taken), as
    grid_sample's backward.
    """
    value, locations, attention = _operands(geo, batch, queries)
    acc = geo.acc_dtype
    grad_output = te.placeholder((batch, queries, geo.heads, geo.head_dim), geo.dtype, name="grad_output")
    _, index, corner = _sample_stages(geo, locations)
    rd = te.reduce_axis((0, geo.head_dim), name="rd")
    dots = te.compute(
        index.shape,
        lambda n, q, m, level, p, c: te.sum(
            grad_output[n, q, m, rd].astype(acc) * value[n, index[n, q, m, level, p, c], m, rd].astype(acc), axis=rd),
        name="corner_dots")

    def grad_attention(n, q, m, level, p):
        return sum(corner(n, q, m, level, p, c).weight * dots[n, q, m, level, p, c]
                   for c in range(CORNERS)).astype(geo.dtype)

    def grad_location(n, q, m, level, p, axis):
        slopes = [corner(n, q, m, level, p, c) for c in range(CORNERS)]
        slope = sum(tirx.Select(axis == 0, at.slope_x, at.slope_y) * dots[n, q, m, level, p, c]
                    for c, at in enumerate(slopes))
        size = _level_size(geo, level, axis).astype(acc)
        return (attention[n, q, m, level, p].astype(acc) * size * slope).astype(geo.dtype)

    grad_locations = te.compute(locations.shape, grad_location, name="grad_sampling_locations")
    grad_weights = te.compute(attention.shape, grad_attention, name="grad_attention_weights")
    return [value, locations, attention, grad_output], [grad_locations, grad_weights]


def scatter_grad_value(geo: MSDeformAttnGeometry, atomic: bool):
    """PrimFunc adding A x weight_c x grad_output into the value gradient at every corner.

    (sampling_locations, attention_weights, grad_output) -> grad_value [N, S, M, D] in acc_dtype, which
    the caller zero-fills; N and Lq are symbolic (int64). Each corner follows from the locations with
    the forward's expressions, computed where it is added.

    Head m of image n only ever writes value[n, :, m, :]: on the CPU one thread owns each (n, m) slab
    and plain adds are race-free (`atomic=False`); on the GPU every (n, q, m, l, p, d) gets a thread
    and the adds are atomic (`atomic=True`): the queries share pixels.
    """
    from tvm.script import tirx as T

    acc, m_size, levels, points, d_size = geo.acc_dtype, geo.heads, geo.num_levels, geo.points, geo.head_dim
    s_size, dtype = geo.spatial_size, geo.dtype

    def corner(locations, n, q, m, level, p, c) -> _Corner:
        x, y = (_pixel(geo, locations[n, q, m, level, p, axis], level, axis, acc) for axis in (0, 1))
        return _corner(geo, x, y, level, c, acc)

    @T.prim_func(s_tir=True)
    def scatter(locations_h: T.handle, attention_h: T.handle, grad_output_h: T.handle, grad_value_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n_size, q_size = T.int64(), T.int64()
        locations = T.match_buffer(locations_h, (n_size, q_size, m_size, levels, points, 2), dtype)
        attention = T.match_buffer(attention_h, (n_size, q_size, m_size, levels, points), dtype)
        grad_output = T.match_buffer(grad_output_h, (n_size, q_size, m_size, d_size), dtype)
        grad_value = T.match_buffer(grad_value_h, (n_size, s_size, m_size, d_size), acc)
        for n, m, q, level, p, c, d in T.grid(n_size, m_size, q_size, levels, points, CORNERS, d_size):
            with T.sblock("scatter_grad_value"):
                vn, vm, vq, vl, vp, vc, vd = T.axis.remap("SSSSSSS", [n, m, q, level, p, c, d])
                T.reads(locations[vn, vq, vm, vl, vp, 0:2], attention[vn, vq, vm, vl, vp], grad_output[vn, vq, vm, vd])
                T.writes(grad_value[vn, 0:s_size, vm, vd])
                if atomic:
                    T.evaluate(T.cuda.atomic_add(
                        T.address_of(grad_value[vn, corner(locations, vn, vq, vm, vl, vp, vc).index, vm, vd]),
                        attention[vn, vq, vm, vl, vp].astype(acc) * corner(locations, vn, vq, vm, vl, vp, vc).weight
                        * grad_output[vn, vq, vm, vd].astype(acc)))
                else:
                    grad_value[vn, corner(locations, vn, vq, vm, vl, vp, vc).index, vm, vd] += (
                        attention[vn, vq, vm, vl, vp].astype(acc) * corner(locations, vn, vq, vm, vl, vp, vc).weight
                        * grad_output[vn, vq, vm, vd].astype(acc))

    return scatter


def prim_func(stage: str, geo: MSDeformAttnGeometry, sizes, *, acc_dtype: str, position_align: int, atomic: bool):
    """The PrimFunc of one stage: forward or backward (sizes = N, Lq), or the scatter (N, Lq symbolic;
    `atomic` for GPUs). Accumulation follows `geo.acc_dtype`; there is no position axis to pad, so
    `acc_dtype` and `position_align` are unused."""
    if stage == "scatter":
        return scatter_grad_value(geo, atomic)
    stages = {"forward": forward, "backward": backward}
    if stage not in stages:
        raise ValueError(f"unknown ms_deform_attn stage {stage!r}")
    arguments, outputs = stages[stage](geo, *sizes)
    return create_prim_func(arguments + outputs)
