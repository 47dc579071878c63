"""Deformable position-sensitive RoI pooling (Dai et al. 2017, §2.2; gradients as eq. 10) as pure TE.

One operator covers the paper's four RoI poolings: group_size G = 1 pools plain RoIs, G = k is
position-sensitive, and offsets make either deformable. The rules are the original
DeformablePSROIPooling's, so that published models carry over (k = output_size, P = part_size,
S = sampling_ratio, s = spatial_scale, O = out_channels, NC = offset classes):

- RoI r = (batch, x1, y1, x2, y2): start_w = round(x1)*s - 0.5, end_w = (round(x2) + 1)*s - 0.5 with
  round half away from zero; roi_w = max(end_w - start_w, 0.1); bin_w = roi_w / k; likewise for h.
- Output (r, c, i, j): class = c // (O / NC); part (i*P // k, j*P // k); tx = offset[r, 2*class, part]
  * gamma and ty = offset[r, 2*class + 1, part] * gamma (x first); the bin starts at
  w0 = j*bin_w + start_w + tx*roi_w, h0 = i*bin_h + start_h + ty*roi_h and reads input channel
  (c*G + i*G // k)*G + j*G // k.
- Samples at (h0 + b*bin_h/S, w0 + a*bin_w/S) for a, b < S. A sample with w outside [-0.5, W - 0.5]
  or h outside [-0.5, H - 0.5] is skipped; the others are clamped to [0, W-1] x [0, H-1] and read
  bilinearly between the floor and ceil pixels. Output = mean of the samples taken, 0 if none.

Stages, by the names schedules look up:

    roi_batch      [R]              int32 image of every RoI
    roi_boxes      [R, 4]           start_w, start_h, roi_w, roi_h
    bin_starts     [NC', k, k, R, 4]  w0, h0 (offsets applied) and the sample steps bin_w / S, bin_h / S
    sample_count   [NC', k, k, R]   samples taken per bin (NC' = NC, or 1 without offsets)
    sample_rows, sample_row_weights, sample_cols, sample_col_weights
                   [NC', k, k, R, S, 2]  floor/ceil pixels and weights of every sample row/col,
                                    computed once for all the channels of a class
    pool_sum       [R, O, k, k]     their sum, in acc_dtype
    output         [R, O, k, k]     pool_sum / sample_count (0 for empty bins), cast to dtype

The per-bin tables keep the RoIs inside (class, bin): a kernel that walks the RoIs for one channel
(the CPU gathers and scatter do) reads them contiguously.

The backward adds grad_scale, grad_offset_bins, grad_offset and the scatter's sampling tables
(see `backward`). NaN, inf and huge offsets or boxes fail the range test and sample nothing; an
out-of-range batch index reads image 0 (the torch op refuses it first, but under CUDA graph capture);
every pixel index comes from a clamped position, so no input makes a kernel read out of bounds.

R is symbolic in practice (the RoI count changes with every image); N, H and W may be.
"""

from __future__ import annotations

from typing import NamedTuple

from tvm import te, tirx

from dcn_tvm.compute.indexing import create_prim_func
from dcn_tvm.geometry.roi_pool import CHANNEL_ALIGN, RoIPoolGeometry, resolve_layout


def _const(value, dtype):
    return tirx.const(value, dtype)


def _cast(value, dtype):
    """A Python int or an integer PrimExpr as a `dtype` expression."""
    return _const(value, dtype) if isinstance(value, int) else value.astype(dtype)


def _corner(index, first, second):
    """Select `first` for corner index 0 and `second` for corner index 1 of a bilinear pair."""
    return tirx.Select(index == 0, first, second)


def _round(x, dtype):
    """C's round (half away from zero), exactly: trunc(x) moved one step out when |frac| >= 0.5."""
    whole, half = tirx.trunc(x), _const(0.5, dtype)
    one, zero = _const(1, dtype), _const(0, dtype)
    return whole + tirx.Select(x - whole >= half, one, zero) - tirx.Select(whole - x >= half, one, zero)


def bins_of(part, parts: int, k: int):
    """[first, end): the bins i < k with i*parts // k == part; never more than ceil(k / parts)."""
    return (part * k + parts - 1) // parts, ((part + 1) * k + parts - 1) // parts


def input_channel(geo: RoIPoolGeometry, c, i, j):
    """Input channel read by output channel c at bin (i, j): (c*G + i*G // k)*G + j*G // k (c for G = 1,
    written so: TVM does not fold the i // k of a loop variable i < k)."""
    g, k = geo.group_size, geo.output_size
    return c if g == 1 else (c * g + i * g // k) * g + j * g // k


def sample_class(geo: RoIPoolGeometry, c):
    """The row of the per-class tables (sample_count, the sampling tables) output channel c uses: its
    offset class, or 0 without offsets (written so for the same reason, and so that a kernel vectorised
    over channels reads one table entry for them all)."""
    return c // geo.channels_per_class if geo.sample_classes > 1 else 0


class _Axis(NamedTuple):
    """One sample along one axis: taken?, floor and ceil pixels of the clamped position, fraction."""

    taken: object
    low: object
    high: object
    frac: object


def _axis(origin, step, index, size, acc) -> _Axis:
    """Sample `index` along one axis of `size` pixels of a bin starting at `origin`."""
    position = origin + index.astype(acc) * step
    last = _cast(size, acc) - _const(1, acc)
    taken = tirx.all(position >= _const(-0.5, acc), position <= last + _const(0.5, acc))
    # Skipped positions (NaN and inf included) become 0, so floor/ceil and the integer casts are defined.
    position = tirx.Select(taken, tirx.min(tirx.max(position, _const(0, acc)), last), _const(0, acc))
    low = te.floor(position)
    return _Axis(taken, low.astype("int32"), te.ceil(position).astype("int32"), position - low)


class _Bin(NamedTuple):
    """One bin of one RoI and offset class: its image, first sample and sub-bin steps."""

    image: object
    w0: object
    h0: object
    step_w: object
    step_h: object
    acc: str

    def row(self, index, height) -> _Axis:
        return _axis(self.h0, self.step_h, index, height, self.acc)

    def col(self, index, width) -> _Axis:
        return _axis(self.w0, self.step_w, index, width, self.acc)


class _RoIs(NamedTuple):
    """The per-RoI stages roi_batch, roi_boxes and bin_starts (see the module docstring)."""

    batch: te.Tensor
    boxes: te.Tensor
    bins: te.Tensor


def _roi_stages(geo: RoIPoolGeometry, rois, batch, offset) -> _RoIs:
    """The image and box of every RoI (a batch index outside [0, N), or NaN, gives image 0) and where
    each bin's samples start, computed once per bin for every sample and channel that uses it."""
    acc, k, s = geo.acc_dtype, geo.output_size, geo.sampling_ratio

    def image(r):
        index = rois[r, 0]
        in_range = tirx.all(index >= _const(0, acc), index < _cast(batch, acc))
        return tirx.Select(in_range, index, _const(0, acc)).astype("int32")

    def box(r, t):
        scale, half, one = _const(geo.spatial_scale, acc), _const(0.5, acc), _const(1, acc)
        start = [_round(rois[r, 1 + axis], acc) * scale - half for axis in (0, 1)]
        end = [(_round(rois[r, 3 + axis], acc) + one) * scale - half for axis in (0, 1)]
        size = [tirx.max(e - b, _const(0.1, acc)) for b, e in zip(start, end)]
        return tirx.Select(t < 2, _corner(t, start[0], start[1]), _corner(t - 2, size[0], size[1]))

    rois_count = rois.shape[0]
    boxes = te.compute((rois_count, 4), box, name="roi_boxes")

    def start(cls, i, j, r, entry):
        """Bin (i, j) of RoI r as offset class `cls` sees it (the module docstring's rules)."""
        start_w, start_h, roi_w, roi_h = (boxes[r, t] for t in range(4))
        bin_w, bin_h = roi_w / _const(k, acc), roi_h / _const(k, acc)
        w0, h0 = j.astype(acc) * bin_w + start_w, i.astype(acc) * bin_h + start_h
        if offset is not None:
            part_row, part_col = i * geo.part_size // k, j * geo.part_size // k
            gamma = _const(geo.gamma, acc)
            w0 = w0 + offset[r, 2 * cls, part_row, part_col].astype(acc) * gamma * roi_w
            h0 = h0 + offset[r, 2 * cls + 1, part_row, part_col].astype(acc) * gamma * roi_h
        step_w, step_h = bin_w / _const(s, acc), bin_h / _const(s, acc)
        return tirx.Select(entry < 2, _corner(entry, w0, h0), _corner(entry - 2, step_w, step_h))

    return _RoIs(te.compute((rois_count,), image, name="roi_batch"), boxes,
                 te.compute((geo.sample_classes, k, k, rois_count, 4), start, name="bin_starts"))


def _bin(roi: _RoIs, r, cls, i, j, acc) -> _Bin:
    """Bin (i, j) of RoI r as offset class `cls` sees it (bin_starts)."""
    return _Bin(roi.batch[r], *(roi.bins[cls, i, j, r, t] for t in range(4)), acc)


def _interpolate(data, image, channel, ys: _Axis, xs: _Axis, acc, along=None):
    """Bilinear value at the sample (along=None), or its derivative along "x" or "y"."""
    one = _const(1, acc)
    wy = (-one, one) if along == "y" else (one - ys.frac, ys.frac)
    wx = (-one, one) if along == "x" else (one - xs.frac, xs.frac)
    value = _const(0, acc)
    for ty, row in enumerate((ys.low, ys.high)):
        for tx, col in enumerate((xs.low, xs.high)):
            value = value + wy[ty] * wx[tx] * data[image, channel, row, col].astype(acc)
    return value


def _operands(geo: RoIPoolGeometry, rois_count, batch, height, width):
    """Placeholders input [N, C, H, W], rois [R, 5] (acc_dtype), offset [R, 2*NC, P, P] or None."""
    data = te.placeholder((batch, geo.in_channels, height, width), geo.dtype, name="input")
    rois = te.placeholder((rois_count, 5), geo.acc_dtype, name="rois")
    offset = None
    if geo.with_offset:
        p = geo.part_size
        offset = te.placeholder((rois_count, 2 * geo.num_classes, p, p), geo.dtype, name="offset")
    return data, rois, offset


def _sample_count(geo: RoIPoolGeometry, roi: _RoIs, offset, height, width):
    """[NC', k, k, R]: samples taken in every bin, in acc_dtype."""
    k, s = geo.output_size, geo.sampling_ratio
    rb, ra = te.reduce_axis((0, s), name="rb"), te.reduce_axis((0, s), name="ra")

    def count(cls, i, j, r):
        at = _bin(roi, r, cls, i, j, geo.acc_dtype)
        taken = tirx.all(at.row(rb, height).taken, at.col(ra, width).taken)
        return te.sum(taken.astype(geo.acc_dtype), axis=[rb, ra])

    return te.compute((geo.sample_classes, k, k, roi.batch.shape[0]), count, name="sample_count")


class _Tables(NamedTuple):
    """Where every bin of every RoI and offset class samples, shared by all its channels:
    [NC', k, k, R, S, 2] each, the floor and ceil pixel of sample row (col) b and their weights
    (1 - f, f), both weights zero where the sample is skipped."""

    rows: te.Tensor
    row_weights: te.Tensor
    cols: te.Tensor
    col_weights: te.Tensor


def _sample_tables(geo: RoIPoolGeometry, roi: _RoIs, offset, height, width) -> _Tables:
    """The stages sample_rows, sample_row_weights, sample_cols and sample_col_weights."""
    acc, k, s = geo.acc_dtype, geo.output_size, geo.sampling_ratio
    zero, one = _const(0, acc), _const(1, acc)

    def table(name: str, along_rows: bool, weights: bool):
        def entry(cls, i, j, r, index, t):
            at = _bin(roi, r, cls, i, j, geo.acc_dtype)
            axis = at.row(index, height) if along_rows else at.col(index, width)
            if not weights:
                return _corner(t, axis.low, axis.high)
            return tirx.Select(axis.taken, _corner(t, one - axis.frac, axis.frac), zero)

        return te.compute((geo.sample_classes, k, k, roi.batch.shape[0], s, 2), entry, name=name)

    return _Tables(table("sample_rows", True, False), table("sample_row_weights", True, True),
                   table("sample_cols", False, False), table("sample_col_weights", False, True))


def _channels_last(geo: RoIPoolGeometry, data) -> te.Tensor:
    """input_channels_last [N, H, W, C']: the input transposed, zero in the padding channels (C' =
    geo.padded_channels)."""
    n, c_size, h, w = data.shape
    return te.compute((n, h, w, geo.padded_channels),
                      lambda b, y, x, c: te.if_then_else(c < c_size, data[b, tirx.min(c, c_size - 1), y, x],
                                                         _const(0, data.dtype)),
                      name="input_channels_last")


def _class_of_padded(geo: RoIPoolGeometry, c):
    """sample_class of channel c of a channels-last stage; its padding channels take the last class."""
    return sample_class(geo, tirx.min(c, geo.out_channels - 1) if geo.padded_channels > geo.out_channels else c)


def forward(geo: RoIPoolGeometry, rois_count, batch, height, width, layout: str = "channels_first"):
    """(input, rois, [offset]) -> output [R, O, k, k]; returns (arguments, outputs) in call order.

    Channels-last (group_size 1 only) the samples are summed over the padded channels-last input into
    pool_sum [R, k, k, C'], so that a vector of channels shares every sample's pixels and weights."""
    data, rois, offset = _operands(geo, rois_count, batch, height, width)
    acc, k, s = geo.acc_dtype, geo.output_size, geo.sampling_ratio
    roi = _roi_stages(geo, rois, batch, offset)
    count = _sample_count(geo, roi, offset, height, width)
    tables = _sample_tables(geo, roi, offset, height, width)
    rb, ra = te.reduce_axis((0, s), name="rb"), te.reduce_axis((0, s), name="ra")
    zero = _const(0, acc)
    channels_last = layout == "channels_last"
    if channels_last:
        data_cl = _channels_last(geo, data)

    def pooled(r, c, i, j):
        sample = (_class_of_padded(geo, c) if channels_last else sample_class(geo, c), i, j, r)
        row_weights = [tables.row_weights[(*sample, rb, t)] for t in (0, 1)]
        col_weights = [tables.col_weights[(*sample, ra, t)] for t in (0, 1)]
        image, channel = roi.batch[r], input_channel(geo, c, i, j)
        value = zero
        for ty in (0, 1):
            for tx in (0, 1):
                row, col = tables.rows[(*sample, rb, ty)], tables.cols[(*sample, ra, tx)]
                pixel = data_cl[image, row, col, channel] if channels_last else data[image, channel, row, col]
                value = value + row_weights[ty] * col_weights[tx] * pixel.astype(acc)
        # Skipped samples (both weights zero) are left out, not added as 0 * pixel (an inf pixel gives NaN).
        taken = tirx.all(row_weights[0] + row_weights[1] != zero, col_weights[0] + col_weights[1] != zero)
        return te.sum(tirx.Select(taken, value, zero), axis=[rb, ra])

    if channels_last:
        total = te.compute((rois_count, k, k, geo.padded_channels), lambda r, i, j, c: pooled(r, c, i, j),
                           name="pool_sum")
    else:
        total = te.compute((rois_count, geo.out_channels, k, k), pooled, name="pool_sum")

    def mean(r, c, i, j):
        taken = count[sample_class(geo, c), i, j, r]
        pool = total[r, i, j, c] if channels_last else total[r, c, i, j]
        return tirx.Select(taken > _const(0, acc), pool / taken, _const(0, acc)).astype(geo.dtype)

    output = te.compute((rois_count, geo.out_channels, k, k), mean, name="output")
    return [a for a in (data, rois, offset) if a is not None], [output]


def backward(geo: RoIPoolGeometry, rois_count, batch, height, width, layout: str = "channels_first"):
    """Gradient w.r.t. offset (eq. 10) and what the input-gradient scatter needs.

    Arguments (input, rois, [offset,] grad_output [R, O, k, k]); outputs in call order:

        grad_offset         [R, 2*NC, P, P]        dtype (only with offsets)
        grad_scale          [R, O, k, k]           grad_output / sample_count, 0 for empty bins; channels-last
                            [R, k, k, C']          (group_size 1), zero in the padding channels
        roi_batch           [R]                    int32, the image of every RoI
        bin_starts          [NC', k, k, R, 4]      where every bin's samples start, and their steps

    The offset gradient sums d(sample)/dw * gamma * roi_w (d/dh and roi_h for ty) * grad_scale
    over the samples of every bin of the part cell and every channel of the class. As in the
    original it is the derivative of the interpolation at the clamped position: zero in the clamped
    margins [-0.5, 0) and (W-1, W-0.5] (where the clamp makes it right), zero at integer positions
    (floor == ceil there, where the true function has a kink), and blind to samples entering or
    leaving [-0.5, W-0.5], which changes the count (the mean is taken as over a fixed set).
    """
    data, rois, offset = _operands(geo, rois_count, batch, height, width)
    acc, k, s, per_class = geo.acc_dtype, geo.output_size, geo.sampling_ratio, geo.channels_per_class
    grad_output = te.placeholder((rois_count, geo.out_channels, k, k), geo.dtype, name="grad_output")
    roi = _roi_stages(geo, rois, batch, offset)
    count = _sample_count(geo, roi, offset, height, width)
    zero = _const(0, acc)

    def scale(r, c, i, j):
        taken = count[sample_class(geo, c), i, j, r]
        return tirx.Select(taken > zero, grad_output[r, c, i, j].astype(acc) / taken, zero)

    if layout == "channels_last":
        grad_scale = te.compute(
            (rois_count, k, k, geo.padded_channels),
            lambda r, i, j, c: tirx.Select(c < geo.out_channels, scale(r, tirx.min(c, geo.out_channels - 1), i, j), zero),
            name="grad_scale")
    else:
        grad_scale = te.compute(grad_output.shape, scale, name="grad_scale")

    tables = [roi.batch, roi.bins]
    if offset is None:
        return [data, rois, grad_output], [grad_scale, *tables]

    rc = te.reduce_axis((0, per_class), name="rc")
    rb, ra = te.reduce_axis((0, s), name="rb"), te.reduce_axis((0, s), name="ra")
    pair_sum = te.comm_reducer(lambda a, b: (a[0] + b[0], a[1] + b[1]),
                               lambda t0, t1: (_const(0, t0), _const(0, t1)), name="pair_sum")

    def bin_gradient(r, cls, i, j):
        """(d/dtx, d/dty) of bin (i, j) before the gamma * roi size factor, sharing every sample."""
        at = _bin(roi, r, cls, i, j, geo.acc_dtype)
        ys, xs = at.row(rb, height), at.col(ra, width)
        c = cls * per_class + rc
        channel, taken = input_channel(geo, c, i, j), tirx.all(ys.taken, xs.taken)

        def slope(along):
            value = _interpolate(data, at.image, channel, ys, xs, acc, along)
            scaled = grad_scale[r, i, j, c] if layout == "channels_last" else grad_scale[r, c, i, j]
            return tirx.Select(taken, scaled * value, zero)

        return pair_sum((slope("x"), slope("y")), axis=[rc, rb, ra])

    bins = te.compute((rois_count, geo.num_classes, k, k), bin_gradient, name="grad_offset_bins")
    p = geo.part_size
    span = (k + p - 1) // p
    di, dj = te.reduce_axis((0, span), name="di"), te.reduce_axis((0, span), name="dj")

    def part_gradient(r, channel, part_row, part_col):
        (first_i, end_i), (first_j, end_j) = bins_of(part_row, p, k), bins_of(part_col, p, k)
        i, j = first_i + di, first_j + dj
        # The min() only keeps the index expression in bounds where the bin is not used.
        at = (r, channel // 2, tirx.min(i, k - 1), tirx.min(j, k - 1))
        slope = _corner(channel % 2, bins[0][at], bins[1][at])
        return te.sum(tirx.Select(tirx.all(i < end_i, j < end_j), slope, zero), axis=[di, dj])

    parts = te.compute(offset.shape, part_gradient, name="grad_offset_parts")

    def offset_gradient(r, channel, part_row, part_col):
        size = _corner(channel % 2, roi.boxes[r, 2], roi.boxes[r, 3])
        part = parts[r, channel, part_row, part_col]
        # A part that sampled nothing has no gradient, also when its box is infinite (0 * inf).
        return tirx.Select(part == zero, zero, part * _const(geo.gamma, acc) * size).astype(geo.dtype)

    grad_offset = te.compute(offset.shape, offset_gradient, name="grad_offset")
    return [data, rois, offset, grad_output], [grad_offset, grad_scale, *tables]


def _scatter_corner(bins, bin_at, sy, sx, t, height, width, acc):
    """(row, column, bilinear weight) of corner t (row t // 2, column t % 2) of sample (sy, sx) of the
    bin at `bin_at` (class, i, j, RoI) of bin_starts, with the forward's expressions; weight 0 where
    the sample is skipped."""
    w0, h0, step_w, step_h = (bins[(*bin_at, e)] for e in range(4))
    ys, xs = _axis(h0, step_h, sy, height, acc), _axis(w0, step_w, sx, width, acc)
    one, zero = _const(1, acc), _const(0, acc)
    wy = tirx.Select(ys.taken, _corner(t // 2, one - ys.frac, ys.frac), zero)
    wx = tirx.Select(xs.taken, _corner(t % 2, one - xs.frac, xs.frac), zero)
    return _corner(t // 2, ys.low, ys.high), _corner(t % 2, xs.low, xs.high), wy * wx


def scatter_grad_input(geo: RoIPoolGeometry, atomic: bool):
    """PrimFunc adding every sample's bilinear weights x grad_scale into the input gradient.

    (grad_scale, roi_batch, bin_starts) -> grad_input [N, C, H, W] in acc_dtype, which the caller
    zero-fills; R, N, H, W are symbolic (int64, see dcn_tvm.compute.indexing). Each sample's pixels
    and weights follow from its bin's start as in the forward (the same expressions), computed where
    they are added rather than stored per sample by the backward kernel and read back.

    Input channel ch only ever receives from output channel ch // G² at the bins of its group
    (ch // G % G, ch % G), from every RoI. On the CPU one thread owns a channel and plain adds are
    race-free (`atomic=False`). On the GPU every (RoI, output channel, bin, sample) gets a thread
    and the adds are atomic (`atomic=True`): RoIs overlap, so any two threads may meet. Where torch asks
    for deterministic algorithms the GPU too runs a thread per channel (KernelSpec.deterministic).
    """
    from tvm.script import tirx as T

    acc, k, g, s = geo.acc_dtype, geo.output_size, geo.group_size, geo.sampling_ratio
    o, c_in, nc = geo.out_channels, geo.in_channels, geo.sample_classes
    span = (k + g - 1) // g

    def corner(bins, roi, cls, i, j, sy, sx, t, size_h, size_w):
        return _scatter_corner(bins, (cls, i, j, roi), sy, sx, t, size_h, size_w, acc)

    @T.prim_func(s_tir=True)
    def scatter(scale_h: T.handle, batch_h: T.handle, bins_h: T.handle, grad_input_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        r, n, h, w = T.int64(), T.int64(), T.int64(), T.int64()
        grad_scale = T.match_buffer(scale_h, (r, o, k, k), acc)
        roi_batch = T.match_buffer(batch_h, (r,), "int32")
        bins = T.match_buffer(bins_h, (nc, k, k, r, 4), acc)
        grad_input = T.match_buffer(grad_input_h, (n, c_in, h, w), acc)
        if atomic:
            for roi, oc, i, j, sy, sx in T.grid(r, o, k, k, s, s):
                with T.sblock("scatter_grad_input"):
                    vr, vo, vi, vj, vy, vx = T.axis.remap("SSSSSS", [roi, oc, i, j, sy, sx])
                    T.reads(grad_scale[vr, vo, vi, vj], roi_batch[vr], bins[0:nc, vi, vj, vr, 0:4])
                    T.writes(grad_input[0:n, 0:c_in, 0:h, 0:w])
                    for t in range(4):
                        T.evaluate(T.cuda.atomic_add(
                            T.address_of(grad_input[roi_batch[vr], input_channel(geo, vo, vi, vj),
                                                    corner(bins, vr, sample_class(geo, vo), vi, vj, vy, vx, t, h, w)[0],
                                                    corner(bins, vr, sample_class(geo, vo), vi, vj, vy, vx, t, h, w)[1]]),
                            corner(bins, vr, sample_class(geo, vo), vi, vj, vy, vx, t, h, w)[2]
                            * grad_scale[vr, vo, vi, vj],
                        ))
        else:
            for ch in T.serial(c_in):
                with T.sblock("scatter_grad_input"):
                    vc = T.axis.remap("S", [ch])
                    T.reads(grad_scale[0:r, 0:o, 0:k, 0:k], roi_batch[0:r], bins[0:nc, 0:k, 0:k, 0:r, 0:4])
                    T.writes(grad_input[0:n, vc, 0:h, 0:w])
                    oc = vc // (g * g)
                    cls = sample_class(geo, oc)
                    first_i, end_i = bins_of(vc // g % g, g, k)
                    first_j, end_j = bins_of(vc % g, g, k)
                    for roi, di, dj, sy, sx, t in T.grid(r, span, span, s, s, 4):
                        i = first_i + di
                        j = first_j + dj
                        if i < end_i and j < end_j:
                            grad_input[roi_batch[roi], vc, corner(bins, roi, cls, i, j, sy, sx, t, h, w)[0],
                                       corner(bins, roi, cls, i, j, sy, sx, t, h, w)[1]] += (
                                corner(bins, roi, cls, i, j, sy, sx, t, h, w)[2] * grad_scale[roi, oc, i, j]
                            )

    return scatter


def scatter_grad_input_channels_last(geo: RoIPoolGeometry, lanes: int = CHANNEL_ALIGN):
    """The scatter of group_size 1 channels-last: (grad_scale [R, k, k, C'], roi_batch, bin_starts) ->
    grad_input [N, H, W, C'] in acc_dtype (zero-filled by the caller), R, N, H, W symbolic.

    Each sample's four corner adds are vectors of `lanes` channels that share its pixels and weights
    (stage scatter_grad_input, the lane loop innermost); a chunk of channels owns them in every pixel,
    so chunks may run in parallel with plain adds.
    """
    from tvm.script import tirx as T

    acc, k, s, padded = geo.acc_dtype, geo.output_size, geo.sampling_ratio, geo.padded_channels
    nc = geo.sample_classes

    def corner(bins, roi, c, i, j, sy, sx, t, size_h, size_w):
        return _scatter_corner(bins, (_class_of_padded(geo, c), i, j, roi), sy, sx, t, size_h, size_w, acc)

    @T.prim_func(s_tir=True)
    def scatter(scale_h: T.handle, batch_h: T.handle, bins_h: T.handle, grad_input_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        r, n, h, w = T.int64(), T.int64(), T.int64(), T.int64()
        grad_scale = T.match_buffer(scale_h, (r, k, k, padded), acc)
        roi_batch = T.match_buffer(batch_h, (r,), "int32")
        bins = T.match_buffer(bins_h, (nc, k, k, r, 4), acc)
        grad_input = T.match_buffer(grad_input_h, (n, h, w, padded), acc)
        for chunk, roi, i, j, sy, sx, t, lane in T.grid(padded // lanes, r, k, k, s, s, 4, lanes):
            with T.sblock("scatter_grad_input"):
                vk, vr, vi, vj, vy, vx, vt, vl = T.axis.remap("SSSSSSSS", [chunk, roi, i, j, sy, sx, t, lane])
                T.reads(grad_scale[vr, vi, vj, vk * lanes + vl], roi_batch[vr], bins[0:nc, vi, vj, vr, 0:4])
                T.writes(grad_input[0:n, 0:h, 0:w, vk * lanes + vl])
                grad_input[roi_batch[vr], corner(bins, vr, vk * lanes + vl, vi, vj, vy, vx, vt, h, w)[0],
                           corner(bins, vr, vk * lanes + vl, vi, vj, vy, vx, vt, h, w)[1], vk * lanes + vl] += (
                    corner(bins, vr, vk * lanes + vl, vi, vj, vy, vx, vt, h, w)[2]
                    * grad_scale[vr, vi, vj, vk * lanes + vl])

    return scatter


def prim_func(stage: str, geo: RoIPoolGeometry, sizes, *, acc_dtype: str, position_align: int, atomic: bool,
              layout: str = "channels_first"):
    """The PrimFunc of one stage: forward or backward (sizes = R, N, H, W; internal stages in `layout`,
    one of dcn_tvm.geometry.roi_pool.LAYOUTS or "auto", see resolve_layout), or the scatter (R, N, H, W
    symbolic; `atomic` for GPUs) of that layout. Accumulation follows `geo.acc_dtype`; there is no
    position axis to pad, so `acc_dtype` and `position_align` are unused."""
    layout = resolve_layout(geo, layout)
    if stage == "scatter":
        return scatter_grad_input_channels_last(geo) if layout == "channels_last" else scatter_grad_input(geo, atomic)
    stages = {"forward": forward, "backward": backward}
    if stage not in stages:
        raise ValueError(f"unknown deform_roi_pool stage {stage!r}")
    arguments, outputs = stages[stage](geo, *sizes, layout=layout)
    return create_prim_func(arguments + outputs)
