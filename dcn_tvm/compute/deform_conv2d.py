"""Deformable convolution (Dai et al. 2017, eq. 2-4; DCNv2 mask) as pure TE.

No torch, no schedules. Every stage has a fixed name that schedules look up:

    sample_coords  [N, OG, KH, KW, P, 2]   (y, x) of each sample, OUTSIDE where it samples nothing
    sample_rows    [N, OG, KH, KW, P, 2]   clamped input rows of the two bilinear corner rows
    sample_cols    [N, OG, KH, KW, P, 2]   clamped input columns of the two corner columns
    sample_weights [N, OG, KH, KW, P, 4]   corner weights (zero outside the image), times the mask
    deform_columns [N, C, KH, KW, P]       the bilinearly sampled input ("im2col" with offsets)
    deform_gemm    [N, O, P]               weight x columns, grouped, accumulated in acc_dtype
    output         [N, O, OH, OW]          gemm + bias, cast to dtype

The channels-last graphs (`forward_channels_last`, `backward_data_channels_last`,
`backward_weight_channels_last`; the CPU rules ask for them where the kernel covers every input
pixel, dcn_tvm.geometry.conv.resolve_layout) compute the same results through other stages, so that
the four corners of a sample are contiguous channel vectors and every GEMM vectorises over channels:

    input_channels_last          [N, H, W, C]           the input transposed
    weight_packed                [G, KH, KW, C/G, O/G]  the weight transposed (G = groups)
    deform_columns_channels_last [N, P, KH, KW, C]      the sampled input, channels innermost
    deform_gemm_channels_last    [N, P, G, O/G]         columns x weight per group, in acc_dtype
    output                       [N, O, OH, OW]         gemm + bias, cast to dtype

and backward weight_transposed [G, KH, KW, O/G, C/G], grad_columns_channels_last [N, P, KH, KW, G,
C/G] and grad_weight_sum_channels_last [O, KH, KW, C/G] (see their functions). The channels-first
backward:

    grad_columns        [N, C, KH, KW, P]      weight^T x grad_output
    grad_corner_weights [N, OG, KH, KW, P, 4]  gradient of each corner weight: grad_columns x corner
                                               pixel, summed over the offset group's channels
    grad_offset, grad_mask                     4-term sums of corner_weights x weight derivatives

P runs over the output positions oh*OW + ow, padded up to a multiple of `position_align` so that a
schedule can tile and vectorise it without tails; padded positions sample nothing.

The sampling tables are computed once per (offset group, kernel point, output position) and reused by
every channel of the offset group, which is what makes the gather cheap.

Sampling rule (torchvision's): the point (y, x) = (oh*sh - ph + kh*dh + dy, ow*sw - pw + kw*dw + dx)
contributes only if -1 < y < H and -1 < x < W; each of its four corners that falls outside the image
reads zero. NaN or huge offsets fail the comparison and sample nothing; indices are always clamped,
so no offset can make a kernel read out of bounds. The offset gradient is that of the bilinear sum
without the range test (torchvision's): a point exactly on y = -1 (or x = -1) samples nothing, yet
its derivative along y (x) is that of its corners in row (column) 0.
"""

from __future__ import annotations

from tvm import te, tirx

from dcn_tvm.compute.indexing import create_prim_func
from dcn_tvm.geometry.conv import ConvGeometry, resolve_layout


def _cast(value, dtype):
    """A Python int or an integer PrimExpr as a `dtype` expression."""
    return tirx.const(value, dtype) if isinstance(value, int) else value.astype(dtype)


def _corner(index, first, second):
    """Select `first` for corner index 0 and `second` for corner index 1 of a bilinear pair."""
    return te.if_then_else(index == 0, first, second)


def padded_positions(oh_size, ow_size, align: int):
    """Number of output positions OH*OW rounded up to a multiple of `align`."""
    return (oh_size * ow_size + align - 1) // align * align


#: Coordinate given to points that sample nothing: both corner rows (and columns) fall outside.
OUTSIDE = -2.0


def sample_coordinates(geo: ConvGeometry, offset, height, width, positions, closed: bool = False):
    """sample_coords [N, OG, KH, KW, P, 2]: (y, x) of every sample, or (OUTSIDE, OUTSIDE) when the
    point samples nothing (outside the image, NaN, or a padded position).

    `closed` keeps the points exactly on y = -1 or x = -1 (for the derivatives): their corners
    inside the image have weight y - floor(y) = 0 (x - floor(x) = 0), so they still sample nothing,
    but the derivatives of those weights are not zero.

    A stage of its own so that the tables below read two numbers instead of re-deriving them
    (inlined, the position arithmetic is repeated in every corner's expression).
    """
    n, _, oh_size, ow_size = offset.shape
    og, (kh_size, kw_size) = geo.offset_groups, geo.kernel
    (sh, sw), (ph, pw), (dh, dw) = geo.stride, geo.padding, geo.dilation
    acc = geo.acc_dtype

    def coordinate(b, g, kh, kw, p, axis):
        oh, ow = tirx.min(p // ow_size, oh_size - 1), p % ow_size
        channel = 2 * ((g * kh_size + kh) * kw_size + kw)
        y = (oh * sh - ph + kh * dh).astype(acc) + offset[b, channel, oh, ow].astype(acc)
        x = (ow * sw - pw + kw * dw).astype(acc) + offset[b, channel + 1, oh, ow].astype(acc)
        low = tirx.const(-1.0, acc)
        above, right = (y >= low, x >= low) if closed else (y > low, x > low)
        inside = tirx.all(p < oh_size * ow_size, above, y < _cast(height, acc), right, x < _cast(width, acc))
        return te.if_then_else(inside, te.if_then_else(axis == 0, y, x), tirx.const(OUTSIDE, acc))

    return te.compute((n, og, kh_size, kw_size, positions, 2), coordinate, name="sample_coords")


def sampling_tables(geo: ConvGeometry, offset, mask, height, width, positions, derivatives=False):
    """Corner rows, corner columns and corner weights of every sample (see the module docstring).

    With `derivatives`, also the unmasked corner weights and their derivatives along y and x
    (`sample_weights_unmasked`, `sample_weights_dy`, `sample_weights_dx`), which the offset and
    mask gradients need. The tables then come from closed coordinates (see sample_coordinates): the
    derivatives are torchvision's on y = -1 and x = -1, where every weight is still zero.
    """
    n, _, oh_size, ow_size = offset.shape
    og, (kh_size, kw_size) = geo.offset_groups, geo.kernel
    acc = geo.acc_dtype
    shape = (n, og, kh_size, kw_size, positions)
    coords = sample_coordinates(geo, offset, height, width, positions, closed=derivatives)

    def corner_index(b, g, kh, kw, p, axis, t, size):
        """Row (axis 0) or column (axis 1) of corner t, clamped into [0, size) so reads stay in bounds;
        int32 (the tables' dtype) even when size is an int64 variable."""
        index = te.floor(coords[b, g, kh, kw, p, axis]).astype("int32") + t
        return tirx.max(tirx.min(index, size - 1), 0).astype("int32")

    rows = te.compute(shape + (2,), lambda b, g, kh, kw, p, t: corner_index(b, g, kh, kw, p, 0, t, height),
                      name="sample_rows")
    cols = te.compute(shape + (2,), lambda b, g, kh, kw, p, t: corner_index(b, g, kh, kw, p, 1, t, width),
                      name="sample_cols")

    def weight_table(kind, with_mask):
        def weights(b, g, kh, kw, p, t):
            y, x = coords[b, g, kh, kw, p, 0], coords[b, g, kh, kw, p, 1]
            y0, x0 = te.floor(y), te.floor(x)
            ly, lx = y - y0, x - x0
            ty, tx = t // 2, t % 2
            row = y0.astype("int32") + ty
            col = x0.astype("int32") + tx
            # OUTSIDE puts both corner rows at -2 and -1: an outside point gets no weight.
            valid = tirx.all(row >= 0, row < height, col >= 0, col < width)
            wy, wx = _corner(ty, 1.0 - ly, ly), _corner(tx, 1.0 - lx, lx)
            one = tirx.const(1, acc)
            w = {"value": wy * wx, "dy": _corner(ty, -one, one) * wx, "dx": wy * _corner(tx, -one, one)}[kind]
            if with_mask:
                oh, ow = tirx.min(p // ow_size, oh_size - 1), p % ow_size
                w = w * mask[b, (g * kh_size + kh) * kw_size + kw, oh, ow].astype(acc)
            return te.if_then_else(valid, w, tirx.const(0, acc))

        return weights

    with_mask = mask is not None
    tables = (rows, cols, te.compute(shape + (4,), weight_table("value", with_mask), name="sample_weights"))
    if not derivatives:
        return tables
    return tables + (
        te.compute(shape + (4,), weight_table("value", False), name="sample_weights_unmasked"),
        te.compute(shape + (4,), weight_table("dy", False), name="sample_weights_dy"),
        te.compute(shape + (4,), weight_table("dx", False), name="sample_weights_dx"),
    )


def _corner_pixel(data, rows, cols, b, c, g, kh, kw, p, t, acc):
    """Channel c of the input at corner t (row t // 2, column t % 2) of sample (b, g, kh, kw, p), in acc."""
    return data[b, c, rows[b, g, kh, kw, p, t // 2], cols[b, g, kh, kw, p, t % 2]].astype(acc)


def _bilinear(data, rows, cols, weights, b, c, g, kh, kw, p, acc):
    """The bilinear sum over the four corners of sample (b, g, kh, kw, p) of channel c, in acc."""
    value = tirx.const(0, acc)
    for t in range(4):
        value = value + weights[b, g, kh, kw, p, t] * _corner_pixel(data, rows, cols, b, c, g, kh, kw, p, t, acc)
    return value


def deform_columns(geo: ConvGeometry, data: te.Tensor, tables):
    """[N, C, KH, KW, P]: the input sampled at every kernel point of every (padded) output position."""
    rows, cols, weights = tables[:3]
    n, c_size = data.shape[0], data.shape[1]
    _, _, kh_size, kw_size, positions, _ = weights.shape
    per_group = geo.in_channels // geo.offset_groups
    return te.compute(
        (n, c_size, kh_size, kw_size, positions),
        lambda b, c, kh, kw, p: _bilinear(
            data, rows, cols, weights, b, c, c // per_group, kh, kw, p, geo.acc_dtype
        ).astype(geo.dtype),
        name="deform_columns",
    )


def deform_columns_channels_last(geo: ConvGeometry, data_cl: te.Tensor, tables):
    """[N, P, KH, KW, C]: deform_columns from the channels-last input [N, H, W, C], channels innermost."""
    rows, cols, weights = tables[:3]
    n, _, _, c_size = data_cl.shape
    _, _, kh_size, kw_size, positions, _ = weights.shape
    per_group, acc = geo.in_channels // geo.offset_groups, geo.acc_dtype

    def value(b, p, kh, kw, c):
        # One offset group: no c // per_group, whose vector form would be a hardware gather.
        g, total = (c // per_group if geo.offset_groups > 1 else 0), tirx.const(0, acc)
        for t in range(4):
            pixel = data_cl[b, rows[b, g, kh, kw, p, t // 2], cols[b, g, kh, kw, p, t % 2], c].astype(acc)
            total = total + weights[b, g, kh, kw, p, t] * pixel
        return total.astype(geo.dtype)

    return te.compute((n, positions, kh_size, kw_size, c_size), value, name="deform_columns_channels_last")


def _channels_last(data: te.Tensor) -> te.Tensor:
    """input_channels_last [N, H, W, C]: the input [N, C, H, W] transposed."""
    n, c, h, w = data.shape
    return te.compute((n, h, w, c), lambda b, y, x, ch: data[b, ch, y, x], name="input_channels_last")


def _operands(geo: ConvGeometry, batch, height, width):
    """Placeholders input, offset, mask (or None), weight in the layout of the public API."""
    c, o, (kh, kw), og = geo.in_channels, geo.out_channels, geo.kernel, geo.offset_groups
    oh, ow = geo.output_size(height, width)
    data = te.placeholder((batch, c, height, width), geo.dtype, name="input")
    offset = te.placeholder((batch, 2 * og * kh * kw, oh, ow), geo.dtype, name="offset")
    mask = te.placeholder((batch, og * kh * kw, oh, ow), geo.dtype, name="mask") if geo.with_mask else None
    weight = te.placeholder((o, c // geo.groups, kh, kw), geo.dtype, name="weight")
    return data, offset, mask, weight


def _padded_grad_output(geo: ConvGeometry, grad_output: te.Tensor, positions, dtype: str | None = None):
    """[N, O, P]: grad_output flattened over (oh, ow) and zero on the padded positions, in `dtype`
    (acc_dtype by default). The channels-first GEMMs take it in the input dtype, so that tensor-core
    fragments get float16 and bfloat16 as they are; float32 and float64 accumulate in their own dtype,
    where that is acc_dtype and the casts at its uses are no-ops."""
    n, o, oh, ow = grad_output.shape
    dtype = dtype or geo.acc_dtype
    return te.compute(
        (n, o, positions),
        lambda b, oc, p: te.if_then_else(
            p < oh * ow, grad_output[b, oc, tirx.min(p // ow, oh - 1), p % ow].astype(dtype), tirx.const(0, dtype),
        ),
        name="grad_output_padded",
    )


def forward(geo: ConvGeometry, batch, height, width, position_align: int = 1):
    """Forward graph: (input, offset, [mask,] weight, bias) -> output [N, O, OH, OW].

    Returns (arguments, outputs) in call order; bias is always present (zeros when the caller has none).
    """
    data, offset, mask, weight = _operands(geo, batch, height, width)
    bias = te.placeholder((geo.out_channels,), geo.dtype, name="bias")
    oh, ow = geo.output_size(height, width)
    acc, kh, kw = geo.acc_dtype, geo.kernel[0], geo.kernel[1]
    positions = padded_positions(oh, ow, position_align)
    columns = deform_columns(geo, data, sampling_tables(geo, offset, mask, height, width, positions))
    c_per_group, o_per_group = geo.in_channels // geo.groups, geo.out_channels // geo.groups
    rc = te.reduce_axis((0, c_per_group), name="rc")
    rkh = te.reduce_axis((0, kh), name="rkh")
    rkw = te.reduce_axis((0, kw), name="rkw")
    gemm = te.compute(
        (batch, geo.out_channels, positions),
        lambda b, oc, p: te.sum(
            weight[oc, rc, rkh, rkw].astype(acc)
            * columns[b, oc // o_per_group * c_per_group + rc, rkh, rkw, p].astype(acc),
            axis=[rc, rkh, rkw],
        ),
        name="deform_gemm",
    )
    output = te.compute(
        (batch, geo.out_channels, oh, ow),
        lambda b, oc, y, x: (gemm[b, oc, y * ow + x] + bias[oc].astype(acc)).astype(geo.dtype),
        name="output",
    )
    return [a for a in (data, offset, mask, weight, bias) if a is not None], [output]


def forward_channels_last(geo: ConvGeometry, batch, height, width, position_align: int = 1):
    """The forward graph of `forward` (same arguments and output) through channels-last stages (see the
    module docstring): the gather reads contiguous channel vectors, the GEMM vectorises over O."""
    data, offset, mask, weight = _operands(geo, batch, height, width)
    bias = te.placeholder((geo.out_channels,), geo.dtype, name="bias")
    oh, ow = geo.output_size(height, width)
    acc, (kh, kw) = geo.acc_dtype, geo.kernel
    positions = padded_positions(oh, ow, position_align)
    columns = deform_columns_channels_last(geo, _channels_last(data),
                                           sampling_tables(geo, offset, mask, height, width, positions))
    c_per_group, o_per_group = geo.in_channels // geo.groups, geo.out_channels // geo.groups
    # Groups are an axis of their own, so that the vectorised output-channel axis never divides.
    packed = te.compute((geo.groups, kh, kw, c_per_group, o_per_group),
                        lambda g, i, j, c, o: weight[g * o_per_group + o, c, i, j], name="weight_packed")
    rkh = te.reduce_axis((0, kh), name="rkh")
    rkw = te.reduce_axis((0, kw), name="rkw")
    rc = te.reduce_axis((0, c_per_group), name="rc")
    gemm = te.compute(
        (batch, positions, geo.groups, o_per_group),
        lambda b, p, g, o: te.sum(
            columns[b, p, rkh, rkw, g * c_per_group + rc].astype(acc) * packed[g, rkh, rkw, rc, o].astype(acc),
            axis=[rkh, rkw, rc],
        ),
        name="deform_gemm_channels_last",
    )
    output = te.compute(
        (batch, geo.out_channels, oh, ow),
        lambda b, oc, y, x: (gemm[b, y * ow + x, oc // o_per_group, oc % o_per_group]
                             + bias[oc].astype(acc)).astype(geo.dtype),
        name="output",
    )
    return [a for a in (data, offset, mask, weight, bias) if a is not None], [output]


def backward_data(geo: ConvGeometry, batch, height, width, position_align: int = 1):
    """Gradients w.r.t. offset and mask, and what the input-gradient scatter needs (eq. 8-9).

    Arguments (input, offset, [mask,] weight, grad_output [N, O, OH, OW]); outputs, in call order:
    grad_offset [N, 2*OG*KH*KW, OH, OW], (grad_mask [N, OG*KH*KW, OH, OW],) grad_columns
    [N, C, KH, KW, P] in acc_dtype, and the three sampling tables of the forward.
    """
    data, offset, mask, weight = _operands(geo, batch, height, width)
    oh, ow = geo.output_size(height, width)
    grad_output = te.placeholder((batch, geo.out_channels, oh, ow), geo.dtype, name="grad_output")
    acc, (kh_size, kw_size), og = geo.acc_dtype, geo.kernel, geo.offset_groups
    positions = padded_positions(oh, ow, position_align)
    tables = sampling_tables(geo, offset, mask, height, width, positions, derivatives=True)
    rows, cols = tables[:2]
    grad_out = _padded_grad_output(geo, grad_output, positions, geo.dtype)

    c_per_group, o_per_group = geo.in_channels // geo.groups, geo.out_channels // geo.groups
    ro = te.reduce_axis((0, o_per_group), name="ro")
    grad_columns = te.compute(
        (batch, geo.in_channels, kh_size, kw_size, positions),
        lambda b, c, kh, kw, p: te.sum(
            weight[c // c_per_group * o_per_group + ro, c % c_per_group, kh, kw].astype(acc)
            * grad_out[b, c // c_per_group * o_per_group + ro, p].astype(acc),
            axis=ro,
        ),
        name="grad_columns",
    )

    # The gradient of each corner's bilinear weight, summed over the group's channels once.
    per_offset_group = geo.in_channels // og
    rc = te.reduce_axis((0, per_offset_group), name="rc")
    grad_corners = te.compute(
        (batch, og, kh_size, kw_size, positions, 4),
        lambda b, g, kh, kw, p, t: te.sum(
            grad_columns[b, g * per_offset_group + rc, kh, kw, p]
            * _corner_pixel(data, rows, cols, b, g * per_offset_group + rc, g, kh, kw, p, t, acc),
            axis=rc,
        ),
        name="grad_corner_weights",
    )

    outputs = _offset_and_mask_gradients(geo, offset, mask, grad_corners, tables, ow)
    outputs += [grad_columns, *tables[:3]]
    return [a for a in (data, offset, mask, weight, grad_output) if a is not None], outputs


def _offset_and_mask_gradients(geo: ConvGeometry, offset, mask, grad_corners, tables, ow) -> list:
    """[grad_offset (, grad_mask)] from the corner-weight gradients [N, OG, KH, KW, P, 4] and the
    weight derivative tables: 4-term dot products (eq. 8: d out / d dy = sum over corners of
    d w_t / d dy * pixel_t, and likewise for dx and the mask)."""
    _, _, _, unmasked, d_y, d_x = tables
    acc, (kh_size, kw_size) = geo.acc_dtype, geo.kernel

    def corner_dot(weights, at):
        return sum((weights[at + (t,)] * grad_corners[at + (t,)] for t in range(1, 4)),
                   weights[at + (0,)] * grad_corners[at + (0,)])

    def per_point(b, ch, y, x):
        """(offset group, kh, kw, position) of mask channel ch at output (y, x)."""
        g, k = ch // (kh_size * kw_size), ch % (kh_size * kw_size)
        return b, g, k // kw_size, k % kw_size, y * ow + x

    def offset_grad(b, ch, y, x):
        at = per_point(b, ch // 2, y, x)
        grad = te.if_then_else(ch % 2 == 0, corner_dot(d_y, at), corner_dot(d_x, at))
        if mask is not None:
            grad = grad * mask[b, ch // 2, y, x].astype(acc)
        return grad.astype(geo.dtype)

    outputs = [te.compute(offset.shape, offset_grad, name="grad_offset")]
    if mask is not None:
        outputs.append(
            te.compute(mask.shape, lambda b, ch, y, x: corner_dot(unmasked, per_point(b, ch, y, x)).astype(geo.dtype),
                       name="grad_mask")
        )
    return outputs


def backward_data_channels_last(geo: ConvGeometry, batch, height, width, position_align: int = 1):
    """backward_data (same arguments and outputs) through channels-last stages, but for the column
    gradient, which comes out channels-last for the channels-last scatter:

        weight_transposed            [G, KH, KW, O/G, C/G]   the weight, input channels innermost
        grad_columns_channels_last   [N, P, KH, KW, G, C/G]  grad_output^T x weight per group, acc_dtype
        input_channels_last          [N, H, W, C]            the corner pixels of the corner sums
        grad_corner_weights          [N, OG, KH, KW, P, 4]   dot products of contiguous channel vectors

    grad_columns_channels_last is the scatter's [N, P, KH, KW, C] (the same memory).
    """
    data, offset, mask, weight = _operands(geo, batch, height, width)
    oh, ow = geo.output_size(height, width)
    grad_output = te.placeholder((batch, geo.out_channels, oh, ow), geo.dtype, name="grad_output")
    acc, (kh_size, kw_size), og = geo.acc_dtype, geo.kernel, geo.offset_groups
    positions = padded_positions(oh, ow, position_align)
    tables = sampling_tables(geo, offset, mask, height, width, positions, derivatives=True)
    rows, cols = tables[:2]
    grad_out = _padded_grad_output(geo, grad_output, positions)
    groups, c_per_group, o_per_group = geo.groups, geo.in_channels // geo.groups, geo.out_channels // geo.groups
    transposed = te.compute((groups, kh_size, kw_size, o_per_group, c_per_group),
                            lambda g, i, j, o, c: weight[g * o_per_group + o, c, i, j], name="weight_transposed")
    ro = te.reduce_axis((0, o_per_group), name="ro")
    grad_columns = te.compute(
        (batch, positions, kh_size, kw_size, groups, c_per_group),
        lambda b, p, kh, kw, g, c: te.sum(grad_out[b, g * o_per_group + ro, p] * transposed[g, kh, kw, ro, c].astype(acc),
                                          axis=ro),
        name="grad_columns_channels_last",
    )
    data_cl = _channels_last(data)
    per_offset_group = geo.in_channels // og
    rc = te.reduce_axis((0, per_offset_group), name="rc")

    def grad_corner(b, g, kh, kw, p, t):
        channel = g * per_offset_group + rc
        column = (grad_columns[b, p, kh, kw, 0, channel] if groups == 1 else
                  grad_columns[b, p, kh, kw, channel // c_per_group, channel % c_per_group])
        pixel = data_cl[b, rows[b, g, kh, kw, p, t // 2], cols[b, g, kh, kw, p, t % 2], channel].astype(acc)
        return te.sum(column * pixel, axis=rc)

    grad_corners = te.compute((batch, og, kh_size, kw_size, positions, 4), grad_corner, name="grad_corner_weights")
    outputs = _offset_and_mask_gradients(geo, offset, mask, grad_corners, tables, ow)
    outputs += [grad_columns, *tables[:3]]
    return [a for a in (data, offset, mask, weight, grad_output) if a is not None], outputs


def backward_weight(geo: ConvGeometry, batch, height, width, position_align: int = 1):
    """grad_weight [O, C/groups, KH, KW] and grad_bias [O] (eq. 8, the ordinary conv gradient).

    Arguments (input, offset, [mask,] grad_output [N, O, OH, OW]); the columns are recomputed from
    the sampling tables rather than saved by the forward.
    """
    data, offset, mask, _ = _operands(geo, batch, height, width)
    oh, ow = geo.output_size(height, width)
    grad_output = te.placeholder((batch, geo.out_channels, oh, ow), geo.dtype, name="grad_output")
    acc, (kh_size, kw_size) = geo.acc_dtype, geo.kernel
    positions = padded_positions(oh, ow, position_align)
    columns = deform_columns(geo, data, sampling_tables(geo, offset, mask, height, width, positions))
    grad_out = _padded_grad_output(geo, grad_output, positions, geo.dtype)
    c_per_group, o_per_group = geo.in_channels // geo.groups, geo.out_channels // geo.groups
    rb = te.reduce_axis((0, batch), name="rb")
    rp = te.reduce_axis((0, positions), name="rp")
    points = kh_size * kw_size
    # One flat (c, kh, kw) axis, so a schedule can tile it into contiguous vectors.
    weight_sum = te.compute(
        (geo.out_channels, c_per_group * points),
        lambda oc, ck: te.sum(
            grad_out[rb, oc, rp].astype(acc)
            * columns[rb, oc // o_per_group * c_per_group + ck // points, ck % points // kw_size, ck % kw_size,
                      rp].astype(acc),
            axis=[rb, rp],
        ),
        name="grad_weight_sum",
    )
    grad_weight = te.compute(
        (geo.out_channels, c_per_group, kh_size, kw_size),
        lambda oc, c, kh, kw: weight_sum[oc, (c * kh_size + kh) * kw_size + kw].astype(geo.dtype),
        name="grad_weight",
    )
    return [a for a in (data, offset, mask, grad_output) if a is not None], [grad_weight, _grad_bias(geo, grad_out)]


def _grad_bias(geo: ConvGeometry, grad_out: te.Tensor) -> te.Tensor:
    """grad_bias [O]: the padded grad_output [N, O, P] summed over images and positions."""
    batch, _, positions = grad_out.shape
    rb = te.reduce_axis((0, batch), name="rb")
    rp = te.reduce_axis((0, positions), name="rp")
    bias_sum = te.compute((geo.out_channels,),
                          lambda oc: te.sum(grad_out[rb, oc, rp].astype(geo.acc_dtype), axis=[rb, rp]),
                          name="grad_bias_sum")
    return te.compute(bias_sum.shape, lambda oc: bias_sum[oc].astype(geo.dtype), name="grad_bias")


def backward_weight_channels_last(geo: ConvGeometry, batch, height, width, position_align: int = 1):
    """backward_weight (same arguments and outputs) from the channels-last columns of the forward
    (deform_columns_channels_last [N, P, KH, KW, C]), so that the weight gradient is a GEMM vectorised
    over contiguous input channels:

        grad_weight_sum_channels_last [O, KH, KW, C/groups]  grad_output x columns, over batch and positions
    """
    data, offset, mask, _ = _operands(geo, batch, height, width)
    oh, ow = geo.output_size(height, width)
    grad_output = te.placeholder((batch, geo.out_channels, oh, ow), geo.dtype, name="grad_output")
    acc, (kh_size, kw_size) = geo.acc_dtype, geo.kernel
    positions = padded_positions(oh, ow, position_align)
    columns = deform_columns_channels_last(geo, _channels_last(data),
                                           sampling_tables(geo, offset, mask, height, width, positions))
    grad_out = _padded_grad_output(geo, grad_output, positions)
    c_per_group, o_per_group = geo.in_channels // geo.groups, geo.out_channels // geo.groups
    rb = te.reduce_axis((0, batch), name="rb")
    rp = te.reduce_axis((0, positions), name="rp")
    weight_sum = te.compute(
        (geo.out_channels, kh_size, kw_size, c_per_group),
        lambda oc, kh, kw, c: te.sum(
            grad_out[rb, oc, rp] * columns[rb, rp, kh, kw, oc // o_per_group * c_per_group + c].astype(acc),
            axis=[rb, rp],
        ),
        name="grad_weight_sum_channels_last",
    )
    grad_weight = te.compute(
        (geo.out_channels, c_per_group, kh_size, kw_size),
        lambda oc, c, kh, kw: weight_sum[oc, kh, kw, c].astype(geo.dtype),
        name="grad_weight",
    )
    return [a for a in (data, offset, mask, grad_output) if a is not None], [grad_weight, _grad_bias(geo, grad_out)]


def scatter_grad_input(acc_dtype: str, atomic: bool):
    """PrimFunc adding each column gradient into the input gradient at its four corners (eq. 8).

    (grad_columns [N, C, KH, KW, P], sample_rows, sample_cols, sample_weights) -> grad_input
    [N, C, H, W] in acc_dtype, which the caller zero-fills; all sizes are symbolic (int64, see
    dcn_tvm.compute.indexing) and the int32 rows and columns are widened before they index.

    The input gradient is a scatter: a sample may land anywhere, so it has no bounded gather form.
    Channel c of image n only ever receives from grad_columns[n, c], so the (n, c) planes partition
    the work: on the CPU one thread owns a plane and plain adds are race-free (`atomic=False`); on
    the GPU there are too few planes to fill the device, so every (n, c, kh, kw, p) sample gets a
    thread and the adds are atomic (`atomic=True`), unless torch asks for deterministic algorithms: then
    the GPU too runs a thread per plane, adding in a fixed order (KernelSpec.deterministic).
    """
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def scatter(gcol_h: T.handle, rows_h: T.handle, cols_h: T.handle, weights_h: T.handle, gin_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n, c, og, kh, kw = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        p, h, w = T.int64(), T.int64(), T.int64()
        grad_columns = T.match_buffer(gcol_h, (n, c, kh, kw, p), acc_dtype)
        rows = T.match_buffer(rows_h, (n, og, kh, kw, p, 2), "int32")
        cols = T.match_buffer(cols_h, (n, og, kh, kw, p, 2), "int32")
        weights = T.match_buffer(weights_h, (n, og, kh, kw, p, 4), acc_dtype)
        grad_input = T.match_buffer(gin_h, (n, c, h, w), acc_dtype)
        if atomic:
            for b, ch, i, j, q in T.grid(n, c, kh, kw, p):
                with T.sblock("scatter_grad_input"):
                    vb, vc, vi, vj, vq = T.axis.remap("SSSSS", [b, ch, i, j, q])
                    T.reads(grad_columns[vb, vc, vi, vj, vq], rows[vb, 0:og, vi, vj, vq, 0:2],
                            cols[vb, 0:og, vi, vj, vq, 0:2], weights[vb, 0:og, vi, vj, vq, 0:4])
                    T.writes(grad_input[vb, vc, 0:h, 0:w])
                    for t in range(4):
                        T.evaluate(T.cuda.atomic_add(
                            T.address_of(grad_input[vb, vc, rows[vb, vc // (c // og), vi, vj, vq, t // 2],
                                                    cols[vb, vc // (c // og), vi, vj, vq, t % 2]]),
                            weights[vb, vc // (c // og), vi, vj, vq, t] * grad_columns[vb, vc, vi, vj, vq],
                        ))
        else:
            for b, ch in T.grid(n, c):
                with T.sblock("scatter_grad_input"):
                    vb, vc = T.axis.remap("SS", [b, ch])
                    T.reads(grad_columns[vb, vc, 0:kh, 0:kw, 0:p], rows[vb, 0:og, 0:kh, 0:kw, 0:p, 0:2],
                            cols[vb, 0:og, 0:kh, 0:kw, 0:p, 0:2], weights[vb, 0:og, 0:kh, 0:kw, 0:p, 0:4])
                    T.writes(grad_input[vb, vc, 0:h, 0:w])
                    g = vc // (c // og)
                    for i, j, q, t in T.grid(kh, kw, p, 4):
                        grad_input[vb, vc, rows[vb, g, i, j, q, t // 2], cols[vb, g, i, j, q, t % 2]] += (
                            weights[vb, g, i, j, q, t] * grad_columns[vb, vc, i, j, q]
                        )

    return scatter


def scatter_grad_input_channels_last(acc_dtype: str, lanes: int):
    """The channels-last scatter_grad_input: (grad_columns [N, P, KH, KW, C], sample_rows, sample_cols,
    sample_weights) -> grad_input [N, H, W, C] in acc_dtype (zero-filled by the caller), sizes symbolic.

    Each corner add is a vector of channels. An offset group's channels go in chunks of `lanes`
    (stage scatter_grad_input, the lane loop innermost for a schedule to vectorise) and the remaining
    C/OG % lanes one by one (scatter_grad_input_tail). An (image, offset group, chunk) owns its
    channels of every pixel, so chunks may run in parallel with plain adds.
    """
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def scatter(gcol_h: T.handle, rows_h: T.handle, cols_h: T.handle, weights_h: T.handle, gin_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n, c, og, kh, kw = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        p, h, w = T.int64(), T.int64(), T.int64()
        grad_columns = T.match_buffer(gcol_h, (n, p, kh, kw, c), acc_dtype)
        rows = T.match_buffer(rows_h, (n, og, kh, kw, p, 2), "int32")
        cols = T.match_buffer(cols_h, (n, og, kh, kw, p, 2), "int32")
        weights = T.match_buffer(weights_h, (n, og, kh, kw, p, 4), acc_dtype)
        grad_input = T.match_buffer(gin_h, (n, h, w, c), acc_dtype)
        per_group = c // og
        for b, g, chunk, i, j, q, t, lane in T.grid(n, og, per_group // lanes, kh, kw, p, 4, lanes):
            with T.sblock("scatter_grad_input"):
                vb, vg, vk, vi, vj, vq, vt, vl = T.axis.remap("SSSSSSSS", [b, g, chunk, i, j, q, t, lane])
                T.reads(grad_columns[vb, vq, vi, vj, vg * per_group + vk * lanes + vl],
                        rows[vb, vg, vi, vj, vq, vt // 2], cols[vb, vg, vi, vj, vq, vt % 2],
                        weights[vb, vg, vi, vj, vq, vt])
                T.writes(grad_input[vb, 0:h, 0:w, vg * per_group + vk * lanes + vl])
                grad_input[vb, rows[vb, vg, vi, vj, vq, vt // 2], cols[vb, vg, vi, vj, vq, vt % 2],
                           vg * per_group + vk * lanes + vl] += (
                    weights[vb, vg, vi, vj, vq, vt] * grad_columns[vb, vq, vi, vj, vg * per_group + vk * lanes + vl])
        for b, g, rest, i, j, q, t in T.grid(n, og, per_group % lanes, kh, kw, p, 4):
            with T.sblock("scatter_grad_input_tail"):
                vb, vg, vr, vi, vj, vq, vt = T.axis.remap("SSSSSSS", [b, g, rest, i, j, q, t])
                T.reads(grad_columns[vb, vq, vi, vj, vg * per_group + per_group // lanes * lanes + vr],
                        rows[vb, vg, vi, vj, vq, vt // 2], cols[vb, vg, vi, vj, vq, vt % 2],
                        weights[vb, vg, vi, vj, vq, vt])
                T.writes(grad_input[vb, 0:h, 0:w, vg * per_group + per_group // lanes * lanes + vr])
                grad_input[vb, rows[vb, vg, vi, vj, vq, vt // 2], cols[vb, vg, vi, vj, vq, vt % 2],
                           vg * per_group + per_group // lanes * lanes + vr] += (
                    weights[vb, vg, vi, vj, vq, vt]
                    * grad_columns[vb, vq, vi, vj, vg * per_group + per_group // lanes * lanes + vr])

    return scatter


#: The graph of each stage by the layout of its internal stages (`prim_func`'s layout).
GRAPHS = {
    "forward": {"channels_first": forward, "channels_last": forward_channels_last},
    "backward_data": {"channels_first": backward_data, "channels_last": backward_data_channels_last},
    "backward_weight": {"channels_first": backward_weight, "channels_last": backward_weight_channels_last},
}
#: Channels per vector of the channels-last scatter (its remainder goes one by one).
SCATTER_LANES = 16


def prim_func(stage: str, geo: ConvGeometry | None, sizes, *, acc_dtype: str, position_align: int, atomic: bool,
              layout: str = "channels_first"):
    """The PrimFunc of one stage: forward, backward_data or backward_weight (sizes = batch, height, width;
    internal stages in `layout`, one of dcn_tvm.geometry.conv.LAYOUTS or "auto", see resolve_layout), or
    the generic scatter (`atomic` for GPUs) or scatter_channels_last."""
    if stage == "scatter":
        return scatter_grad_input(acc_dtype, atomic)
    if stage == "scatter_channels_last":
        return scatter_grad_input_channels_last(acc_dtype, SCATTER_LANES)
    if stage not in GRAPHS:
        raise ValueError(f"unknown deform_conv2d stage {stage!r}")
    arguments, outputs = GRAPHS[stage][resolve_layout(geo, layout)](geo, *sizes, position_align=position_align)
    return create_prim_func(arguments + outputs)
