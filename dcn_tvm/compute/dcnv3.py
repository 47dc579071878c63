"""DCNv3 / DCNv4 aggregation (InternImage's dcnv3_core, FlashInternImage's dcnv4_core) as pure TE.

Per output position (n, ho, wo), group g and sampling point p, one bilinear sample of the group's
GC channels of the channels-last input [N, H, W, G*GC], times the point's mask value, summed over
the points. The rules are those of InternImage's CUDA kernel (dcnv3_im2col_cuda.cuh), which DCNv4's
kernel shares:

- points are x-major: point p is kernel column i = q // kh, row j = q % kh, where q = p, or with
  remove_center q = p + (p >= centre), the centre q = (kw // 2) * kh + kh // 2 left out;
- with half = dilation*(k - 1) // 2 per axis, the point samples
      y = (ho*sh + half_h - ph) - half_h*offset_scale + (j*dh + offset_y)*offset_scale
      x = (wo*sw + half_w - pw) - half_w*offset_scale + (i*dw + offset_x)*offset_scale,
  that is the window centre plus offset_scale times (grid displacement + offset);
- nothing unless -1 < y < H and -1 < x < W; otherwise bilinear between floor and floor + 1 with the
  corners outside the image read as zero; the mask value is used as given (no softmax).

InternImage's PyTorch fallback (dcnv3_core_pytorch) pads the height by pad_w and the width by pad_h;
its CUDA kernel, followed here, pads the height by pad_h.

Where the offsets and mask values are read is the only difference between DCNv3 and DCNv4
(`geo.packed`, see dcn_tvm.geometry.dcnv3): `_readers` gives both the same accessors.

Stages, by the names schedules look up (GC = group_channels, P = points):

    sample_positions [N, Ho, Wo, G, P, 2] (y, x) of every sample, -2 for both where it samples nothing
    sample_rows     [N, Ho, Wo, G, P, 2]  int32 rows of the floor / floor + 1 corners, clamped in range
    sample_cols     [N, Ho, Wo, G, P, 2]  int32 columns likewise
    sample_weights  [N, Ho, Wo, G, P, 4]  mask x bilinear weight of corner 2*row + column, 0 outside
    aggregate       [N, Ho, Wo, G, GC]    the weighted sum, in acc_dtype
    output          [N, Ho, Wo, G*GC]     cast to dtype

The backward (see `backward`) adds corner_dots, grad_sample and the offset / mask gradients; the input
gradient is the scatter (`scatter_grad_input`). A NaN, inf or huge offset fails the range test and
samples nothing; every pixel index is clamped, so no input makes a kernel read out of bounds.
"""

from __future__ import annotations

from typing import NamedTuple

from tvm import te, tirx

from dcn_tvm.compute.indexing import create_prim_func
from dcn_tvm.geometry.dcnv3 import DCNv3Geometry


def _const(value, dtype):
    return tirx.const(value, dtype)


def _cast(value, dtype):
    """A Python number or a PrimExpr as a `dtype` expression."""
    return _const(value, dtype) if isinstance(value, (int, float)) else value.astype(dtype)


class _Readers(NamedTuple):
    """Accessors of one layout: offset(n, y, x, g, p, axis) with axis 0 for x and 1 for y, and
    mask(n, y, x, g, p). They index tensors or buffers alike."""

    offset: object
    mask: object


def _readers(geo: DCNv3Geometry, offset, mask) -> _Readers:
    """The accessors of `geo`'s layout: DCNv3's offset [N, Ho, Wo, G, P, 2] and mask [N, Ho, Wo, G, P]
    (views of the op's tensors), or DCNv4's offset_mask [N, Ho, Wo, D] passed as both."""
    p_count = geo.points
    if geo.packed:
        return _Readers(lambda n, y, x, g, p, axis: offset[n, y, x, g * 3 * p_count + 2 * p + axis],
                        lambda n, y, x, g, p: mask[n, y, x, g * 3 * p_count + 2 * p_count + p])
    return _Readers(lambda n, y, x, g, p, axis: offset[n, y, x, g, p, axis],
                    lambda n, y, x, g, p: mask[n, y, x, g, p])


def _output_size(geo: DCNv3Geometry, height, width) -> tuple:
    """(Ho, Wo) of an input of height x width: the geometry's window arithmetic at static sizes; at symbolic
    ones two sizes of their own, bound by the sampling tensors' shapes (the op checks them against the
    input's). TVM 0.27 fails to bind GPU threads to a fused loop whose extent holds that arithmetic's floor
    division where it does not simplify away (any geometry but stride 1 with "same" padding): the CUDA
    builds of such shape-generic kernels failed (InternalError, unbound blockIdx.x)."""
    if isinstance(height, int) and isinstance(width, int):
        return geo.output_size(height, width)
    return te.var("out_h", "int64"), te.var("out_w", "int64")


def sampling_shapes(geo: DCNv3Geometry, batch, out_h, out_w) -> list[tuple]:
    """The kernels' shapes of the sampling tensors and of their gradients: DCNv3's offset
    [N, Ho, Wo, G, P, 2] and mask [N, Ho, Wo, G, P], or DCNv4's offset_mask [N, Ho, Wo, D]."""
    if geo.packed:
        return [(batch, out_h, out_w, geo.packed_channels)]
    g, p = geo.group, geo.points
    return [(batch, out_h, out_w, g, p, 2), (batch, out_h, out_w, g, p)]


def _sampling_operands(geo: DCNv3Geometry, batch, out_h, out_w) -> tuple[list, _Readers]:
    """Placeholders offset and mask, or offset_mask (`sampling_shapes`), and their accessors."""
    names = ["offset_mask"] if geo.packed else ["offset", "mask"]
    tensors = [te.placeholder(shape, geo.dtype, name=name)
               for name, shape in zip(names, sampling_shapes(geo, batch, out_h, out_w))]
    return tensors, _readers(geo, tensors[0], tensors[-1])


class _Axis(NamedTuple):
    """One axis of a sample: the clamped floor / floor + 1 pixels, their bilinear weights and the
    weights' derivatives along the axis (each zero where its pixel is outside or nothing is sampled)."""

    pixels: tuple
    weights: tuple
    slopes: tuple


class _Sample(NamedTuple):
    rows: _Axis
    cols: _Axis
    mask: object


#: Where nothing is sampled, the position of both axes: both corners outside, every weight zero.
_NOWHERE = -2


def _position(geo: DCNv3Geometry, readers: _Readers, n, y, x, g, p, height, width):
    """(y, x) of sample p of group g at output (n, y, x) by the module docstring's rules, or (_NOWHERE,
    _NOWHERE) unless -1 < y < H and -1 < x < W (NaN and inf included)."""
    acc, (kh, kw) = geo.acc_dtype, geo.kernel
    centre = (kw // 2) * kh + kh // 2
    # p + (p >= centre) in integer arithmetic (p < kh*kw): the Select it replaces made the backward's
    # simplification several times slower to build
    q = p + (p + kh * kw - centre) // (kh * kw) if geo.remove_center else p
    scale = _const(geo.offset_scale, acc)
    positions = []
    for axis, (out, index, size) in enumerate(((x, q // kh, width), (y, q % kh, height))):
        k, stride, pad, dilation = (geo.kernel[1 - axis], geo.stride[1 - axis], geo.padding[1 - axis],
                                    geo.dilation[1 - axis])
        half = dilation * (k - 1) // 2
        base = _cast(out * stride + (half - pad), acc) - _const(half * geo.offset_scale, acc)
        shift = _cast(index * dilation, acc) + readers.offset(n, y, x, g, p, axis).astype(acc)
        positions.append((base + shift * scale, _cast(size, acc)))
    (pos_x, size_x), (pos_y, size_y) = positions
    minus_one, nowhere = _const(-1, acc), _const(_NOWHERE, acc)
    taken = tirx.all(pos_y > minus_one, pos_x > minus_one, pos_y < size_y, pos_x < size_x)
    return tirx.Select(taken, pos_y, nowhere), tirx.Select(taken, pos_x, nowhere)


def _axis(position, size, acc) -> _Axis:
    """The corners along one axis of `size` pixels of a sample at `position` (-1 < position < size,
    or _NOWHERE)."""
    zero, one = _const(0, acc), _const(1, acc)
    size = _cast(size, acc)
    low = te.floor(position)
    frac = position - low
    inside = (tirx.Select(low >= zero, one, zero), tirx.Select(low + one <= size - one, one, zero))
    pixels = (tirx.max(low, zero).astype("int32"), tirx.max(tirx.min(low + one, size - one), zero).astype("int32"))
    return _Axis(pixels, (inside[0] * (one - frac), inside[1] * frac), (-inside[0], inside[1]))


def _sample(geo: DCNv3Geometry, readers: _Readers, n, y, x, g, p, height, width, positions=None) -> _Sample:
    """Sample p of group g at output (n, y, x): its position from the stage `positions` (sample_positions)
    if given, else from the offsets."""
    if positions is None:
        pos_y, pos_x = _position(geo, readers, n, y, x, g, p, height, width)
    else:
        pos_y, pos_x = positions[n, y, x, g, p, 0], positions[n, y, x, g, p, 1]
    acc = geo.acc_dtype
    return _Sample(_axis(pos_y, height, acc), _axis(pos_x, width, acc), readers.mask(n, y, x, g, p).astype(acc))


def _positions_stage(geo: DCNv3Geometry, readers: _Readers, batch, out_h, out_w, height, width) -> te.Tensor:
    """sample_positions [N, Ho, Wo, G, P, 2]: (y, x) of every sample (`_position`)."""
    return te.compute((batch, out_h, out_w, geo.group, geo.points, 2),
                      lambda n, y, x, g, p, a: _pick(_position(geo, readers, n, y, x, g, p, height, width), a),
                      name="sample_positions")


def _pick(pair, index):
    """pair[index] for an index expression that is 0 or 1."""
    return tirx.Select(index == 0, pair[0], pair[1])


def _tables(geo: DCNv3Geometry, readers: _Readers, positions: te.Tensor, height, width, with_weights: bool):
    """The stages sample_rows, sample_cols (and sample_weights with `with_weights`) from sample_positions."""

    def table(name, entries, value):
        return te.compute((*positions.shape[:5], entries),
                          lambda n, y, x, g, p, t: value(_sample(geo, readers, n, y, x, g, p, height, width,
                                                                 positions=positions), t), name=name)

    rows = table("sample_rows", 2, lambda s, t: _pick(s.rows.pixels, t))
    cols = table("sample_cols", 2, lambda s, t: _pick(s.cols.pixels, t))
    if not with_weights:
        return rows, cols
    weights = table("sample_weights", 4,
                    lambda s, t: s.mask * _pick(s.rows.weights, t // 2) * _pick(s.cols.weights, t % 2))
    return rows, cols, weights


def forward(geo: DCNv3Geometry, batch, height, width):
    """(input, offset, mask) or (input, offset_mask) -> output [N, Ho, Wo, G*GC]; returns (arguments,
    outputs) in call order."""
    acc, gc = geo.acc_dtype, geo.group_channels
    out_h, out_w = _output_size(geo, height, width)
    data = te.placeholder((batch, height, width, geo.channels), geo.dtype, name="input")
    sampling, readers = _sampling_operands(geo, batch, out_h, out_w)
    positions = _positions_stage(geo, readers, batch, out_h, out_w, height, width)
    rows, cols, weights = _tables(geo, readers, positions, height, width, with_weights=True)
    p = te.reduce_axis((0, geo.points), name="p")

    def aggregate(n, y, x, g, c):
        at = (n, y, x, g, p)
        value = _const(0, acc)
        for t in range(4):
            pixel = data[n, rows[(*at, t // 2)], cols[(*at, t % 2)], g * gc + c]
            value = value + weights[(*at, t)] * pixel.astype(acc)
        return te.sum(value, axis=p)

    total = te.compute((batch, out_h, out_w, geo.group, gc), aggregate, name="aggregate")
    output = te.compute((batch, out_h, out_w, geo.channels),
                        lambda n, y, x, c: total[n, y, x, c // gc, c % gc].astype(geo.dtype), name="output")
    return [data, *sampling], [output]


def backward(geo: DCNv3Geometry, batch, height, width):
    """The offset and mask gradients.

    Arguments (input, offset, mask, grad_output [N, Ho, Wo, G*GC]), packed (input, offset_mask,
    grad_output); outputs grad_offset [N, Ho, Wo, G*P*2] and grad_mask [N, Ho, Wo, G*P], packed
    grad_offset_mask [N, Ho, Wo, D] (zero in the padding channels), in dtype. Stages:

        sample_rows, sample_cols   as the forward's
        corner_dots  [N, Ho, Wo, G, P, 4]     sum over the group's channels of grad_output x corner pixel t
        grad_sample  [N, Ho, Wo, G, P, 3]     d/d(mask), d/d(offset_x), d/d(offset_y) of every sample

    As InternImage's kernel, the offset gradient is the derivative of the interpolation between the
    sample's floor and floor + 1 (the side of an integer position that floor picks) with the corners
    outside read as zero, and zero where nothing is sampled.
    """
    acc, gc, p_count = geo.acc_dtype, geo.group_channels, geo.points
    out_h, out_w = _output_size(geo, height, width)
    data = te.placeholder((batch, height, width, geo.channels), geo.dtype, name="input")
    sampling, readers = _sampling_operands(geo, batch, out_h, out_w)
    grad_output = te.placeholder((batch, out_h, out_w, geo.channels), geo.dtype, name="grad_output")
    positions = _positions_stage(geo, readers, batch, out_h, out_w, height, width)
    rows, cols = _tables(geo, readers, positions, height, width, with_weights=False)
    c = te.reduce_axis((0, gc), name="c")

    def corner_dots(n, y, x, g, p, t):
        pixel = data[n, rows[n, y, x, g, p, t // 2], cols[n, y, x, g, p, t % 2], g * gc + c]
        return te.sum(grad_output[n, y, x, g * gc + c].astype(acc) * pixel.astype(acc), axis=c)

    dots = te.compute((batch, out_h, out_w, geo.group, p_count, 4), corner_dots, name="corner_dots")
    scale = _const(geo.offset_scale, acc)

    def gradient(n, y, x, g, p, k):
        s = _sample(geo, readers, n, y, x, g, p, height, width, positions=positions)
        terms = [[], [], []]  # mask, offset x, offset y
        for ty in range(2):
            for tx in range(2):
                dot = dots[n, y, x, g, p, 2 * ty + tx]
                terms[0].append(s.rows.weights[ty] * s.cols.weights[tx] * dot)
                terms[1].append(s.rows.weights[ty] * s.cols.slopes[tx] * dot)
                terms[2].append(s.rows.slopes[ty] * s.cols.weights[tx] * dot)
        mask_grad, x_grad, y_grad = (sum(t[1:], t[0]) for t in terms)
        return tirx.Select(k == 0, mask_grad, scale * s.mask * tirx.Select(k == 1, x_grad, y_grad))

    grads = te.compute((batch, out_h, out_w, geo.group, p_count, 3), gradient, name="grad_sample")
    if geo.packed:
        used = geo.group * p_count * 3

        def packed(n, y, x, ch):
            g, r = tirx.min(ch // (3 * p_count), geo.group - 1), ch % (3 * p_count)  # g in range on padding
            is_mask = r // (2 * p_count)  # 0 for the offsets' 2P channels, 1 for the mask's P
            # r // 2 or r - 2P without a Select: a schedule computing the sample's corner dots where a
            # channel is written then sees one point (TVM's regions take both sides of a Select); clamped,
            # so that a region over many channels is bounded
            p = tirx.max(tirx.min(r // 2 - is_mask * (r // 2 - (r - 2 * p_count)), p_count - 1), 0)
            k = tirx.Select(is_mask == 0, r % 2 + 1, 0)
            value = tirx.Select(ch < used, grads[n, y, x, g, p, k], _const(0, acc))
            return value.astype(geo.dtype)

        shape = sampling_shapes(geo, batch, out_h, out_w)[0]
        outputs = [te.compute(shape, packed, name="grad_offset_mask")]
    else:
        offset_shape, mask_shape = sampling_shapes(geo, batch, out_h, out_w)
        outputs = [
            te.compute(offset_shape, lambda n, y, x, g, p, a: grads[n, y, x, g, p, a + 1].astype(geo.dtype),
                       name="grad_offset"),
            te.compute(mask_shape, lambda n, y, x, g, p: grads[n, y, x, g, p, 0].astype(geo.dtype), name="grad_mask"),
        ]
    return [data, *sampling, grad_output], outputs


def scatter_grad_input(geo: DCNv3Geometry, sizes, atomic: bool):
    """PrimFunc adding every sample's mask x bilinear weights x grad_output into the input gradient.

    (offset, mask, grad_output) or (offset_mask, grad_output) -> grad_input [N, H, W, G*GC] in acc_dtype,
    which the caller zero-fills; N, H, W as `sizes` (None: symbolic, int64). Stages:

        sample_positions    [N, Ho, Wo, G, P, 2]  as the forward's; schedules compute it where it is read
                            (the CPU's per output pixel, the GPU's per sample in a thread's registers)
        scatter_grad_input  loops (n, g, ho, wo, p, corner, c), each adding one corner, its pixels and
                            weight from the position with the forward's expressions

    Group g of image n only receives from its own samples: on the CPU one thread owns an (n, g) slab and
    plain adds are race-free (`atomic=False`); on the GPU every (sample, channel) gets a thread and the
    adds are atomic (`atomic=True`): any two samples may share a pixel.
    """
    from tvm.script import tirx as T

    acc, gc, g_count, p_count, channels = geo.acc_dtype, geo.group_channels, geo.group, geo.points, geo.channels

    @T.macro
    def body(offset, mask, grad_output, grad_input, n, h, w):
        positions = T.sblock_alloc_buffer((n, grad_output.shape[1], grad_output.shape[2], g_count, p_count, 2), acc)
        for b, y, x, g, p, a in T.grid(n, grad_output.shape[1], grad_output.shape[2], g_count, p_count, 2):
            with T.sblock("sample_positions"):
                vb, vy, vx, vg, vp, va = T.axis.remap("SSSSSS", [b, y, x, g, p, a])
                T.reads(*_read_regions(geo, offset, mask, vb, vy, vx, vg, vp))
                T.writes(positions[vb, vy, vx, vg, vp, va])
                positions[vb, vy, vx, vg, vp, va] = _pick(
                    _position(geo, _readers(geo, offset, mask), vb, vy, vx, vg, vp, h, w), va)
        for b, g, y, x, p, t, c in T.grid(n, g_count, grad_output.shape[1], grad_output.shape[2], p_count, 4, gc):
            with T.sblock("scatter_grad_input"):
                vb, vg, vy, vx, vp, vt, vc = T.axis.remap("SSSSSSS", [b, g, y, x, p, t, c])
                T.reads(*_read_regions(geo, offset, mask, vb, vy, vx, vg, vp), positions[vb, vy, vx, vg, vp, 0:2],
                        grad_output[vb, vy, vx, vg * gc + vc])
                T.writes(grad_input[vb, 0:h, 0:w, vg * gc + vc])
                if atomic:
                    T.evaluate(T.cuda.atomic_add(
                        T.address_of(grad_input[
                            vb, _corner(geo, offset, mask, positions, h, w, vb, vy, vx, vg, vp, vt)[0],
                            _corner(geo, offset, mask, positions, h, w, vb, vy, vx, vg, vp, vt)[1], vg * gc + vc]),
                        _corner(geo, offset, mask, positions, h, w, vb, vy, vx, vg, vp, vt)[2]
                        * grad_output[vb, vy, vx, vg * gc + vc].astype(acc)))
                else:
                    grad_input[vb, _corner(geo, offset, mask, positions, h, w, vb, vy, vx, vg, vp, vt)[0],
                               _corner(geo, offset, mask, positions, h, w, vb, vy, vx, vg, vp, vt)[1],
                               vg * gc + vc] += (_corner(geo, offset, mask, positions, h, w, vb, vy, vx, vg, vp, vt)[2]
                                                 * grad_output[vb, vy, vx, vg * gc + vc].astype(acc))

    out_size = _output_size(geo, *sizes[1:])
    if geo.packed:
        @T.prim_func(s_tir=True)
        def scatter(offset_mask_h: T.handle, grad_output_h: T.handle, grad_input_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            offset_mask = T.match_buffer(offset_mask_h, sampling_shapes(geo, sizes[0], *out_size)[0], geo.dtype)
            grad_output = T.match_buffer(grad_output_h, (sizes[0], *out_size, channels), geo.dtype)
            grad_input = T.match_buffer(grad_input_h, (*sizes, channels), acc)
            body(offset_mask, offset_mask, grad_output, grad_input, *sizes)
    else:
        @T.prim_func(s_tir=True)
        def scatter(offset_h: T.handle, mask_h: T.handle, grad_output_h: T.handle, grad_input_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            offset = T.match_buffer(offset_h, sampling_shapes(geo, sizes[0], *out_size)[0], geo.dtype)
            mask = T.match_buffer(mask_h, sampling_shapes(geo, sizes[0], *out_size)[1], geo.dtype)
            grad_output = T.match_buffer(grad_output_h, (sizes[0], *out_size, channels), geo.dtype)
            grad_input = T.match_buffer(grad_input_h, (*sizes, channels), acc)
            body(offset, mask, grad_output, grad_input, *sizes)

    return scatter


def _read_regions(geo: DCNv3Geometry, offset, mask, n, y, x, g, p) -> list:
    """The regions of the sampling buffers that sample p of group g at output (n, y, x) reads."""
    if geo.packed:
        return [offset[n, y, x, 0:geo.packed_channels]]
    return [offset[n, y, x, g, p, 0:2], mask[n, y, x, g, p]]


def _corner(geo: DCNv3Geometry, offset, mask, positions, height, width, n, y, x, g, p, t):
    """(row, column, mask x bilinear weight) of corner t (row t // 2, column t % 2) of sample p of group
    g at output (n, y, x) of a height x width input, from its position (the buffer `positions`) and its
    mask value, with the forward's expressions."""
    s = _sample(geo, _readers(geo, offset, mask), n, y, x, g, p, height, width, positions=positions)
    row, col = t // 2, t % 2
    return (_pick(s.rows.pixels, row), _pick(s.cols.pixels, col),
            s.mask * _pick(s.rows.weights, row) * _pick(s.cols.weights, col))


def prim_func(stage: str, geo: DCNv3Geometry, sizes, *, acc_dtype: str, position_align: int, atomic: bool):
    """The PrimFunc of one stage, forward, backward or the scatter (`atomic` for GPUs); sizes = N, H, W. Accumulation follows `geo.acc_dtype`; there is no position axis to pad, so
    `acc_dtype` and `position_align` are unused."""
    if stage == "scatter":
        return scatter_grad_input(geo, sizes, atomic)
    stages = {"forward": forward, "backward": backward}
    if stage not in stages:
        raise ValueError(f"unknown dcnv3 stage {stage!r}")
    arguments, outputs = stages[stage](geo, *sizes)
    return create_prim_func(arguments + outputs)
