"""Independent references for deform_roi_pool, written from the rules of issue 3 (the original
DeformablePSROIPooling's), for the tests and the benchmarks.

`deform_roi_pool_loops` is a float64 loop over every bin and sample (slow, obviously right);
`deform_roi_pool_torch` is the same maths vectorised in plain PyTorch, differentiable by autograd,
and the "plain-PyTorch" baseline of the benchmark.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _round(value: float) -> float:
    """Round half away from zero (C's round); NaN and inf stay as they are."""
    return float(np.copysign(np.floor(np.abs(value) + 0.5), value))


def _roi_geometry(roi, spatial_scale: float):
    """(batch, start_w, start_h, roi_w, roi_h) of one [5] RoI row."""
    batch, x1, y1, x2, y2 = (float(v) for v in roi)
    start_w, start_h = _round(x1) * spatial_scale - 0.5, _round(y1) * spatial_scale - 0.5
    end_w, end_h = (_round(x2) + 1) * spatial_scale - 0.5, (_round(y2) + 1) * spatial_scale - 0.5
    return int(batch), start_w, start_h, max(end_w - start_w, 0.1), max(end_h - start_h, 0.1)


def _bilinear(plane: np.ndarray, h: float, w: float) -> float:
    """plane [H, W] at (h, w), already clamped, between the floor and ceil pixels."""
    y0, y1, x0, x1 = math.floor(h), math.ceil(h), math.floor(w), math.ceil(w)
    fy, fx = h - y0, w - x0
    return ((1 - fy) * ((1 - fx) * plane[y0, x0] + fx * plane[y0, x1])
            + fy * ((1 - fx) * plane[y1, x0] + fx * plane[y1, x1]))


def deform_roi_pool_loops(input, rois, offset=None, output_size=7, spatial_scale=1.0, group_size=1,
                          part_size=None, sampling_ratio=4, gamma=0.1) -> torch.Tensor:
    """Float64 loops: input [N, C, H, W], rois [R, 5], offset [R, 2*NC, P, P] -> [R, C/G², k, k]."""
    x = input.detach().double().numpy()
    boxes = rois.detach().double().numpy()
    off = None if offset is None else offset.detach().double().numpy()
    _, channels, height, width = x.shape
    k, g, s = output_size, group_size, sampling_ratio
    p = part_size or k
    out_channels = channels // (g * g)
    num_classes = 1 if off is None else off.shape[1] // 2
    per_class = out_channels // num_classes
    out = np.zeros((len(boxes), out_channels, k, k))
    for r, roi in enumerate(boxes):
        batch, start_w, start_h, roi_w, roi_h = _roi_geometry(roi, spatial_scale)
        bin_w, bin_h = roi_w / k, roi_h / k
        for c in range(out_channels):
            cls = c // per_class
            for i in range(k):
                for j in range(k):
                    tx = ty = 0.0
                    if off is not None:
                        part_row, part_col = math.floor(i / k * p), math.floor(j / k * p)
                        tx = off[r, 2 * cls, part_row, part_col] * gamma
                        ty = off[r, 2 * cls + 1, part_row, part_col] * gamma
                    w0 = j * bin_w + start_w + tx * roi_w
                    h0 = i * bin_h + start_h + ty * roi_h
                    gh = min(max(math.floor(i * g / k), 0), g - 1)
                    gw = min(max(math.floor(j * g / k), 0), g - 1)
                    plane = x[batch, (c * g + gh) * g + gw]
                    total, count = 0.0, 0
                    for b in range(s):
                        for a in range(s):
                            w, h = w0 + a * bin_w / s, h0 + b * bin_h / s
                            # Skip w < -0.5, w > W - 0.5 and likewise h; written so that NaN is skipped too.
                            if not (-0.5 <= w <= width - 0.5 and -0.5 <= h <= height - 0.5):
                                continue
                            total += _bilinear(plane, min(max(h, 0.0), height - 1), min(max(w, 0.0), width - 1))
                            count += 1
                    out[r, c, i, j] = total / count if count else 0.0
    return torch.from_numpy(out)


def deform_roi_pool_torch(input, rois, offset=None, output_size=7, spatial_scale=1.0, group_size=1,
                          part_size=None, sampling_ratio=4, gamma=0.1) -> torch.Tensor:
    """The same maths in plain PyTorch: every sample's four corners gathered at once, then averaged."""
    n, channels, height, width = input.shape
    k, g, s = output_size, group_size, sampling_ratio
    p = part_size or k
    out_channels = channels // (g * g)
    dev, dt = input.device, input.dtype
    r_count = rois.shape[0]
    coords = rois[:, 1:].to(dt)
    rounded = torch.sign(coords) * torch.floor(coords.abs() + 0.5)
    start = rounded[:, :2] * spatial_scale - 0.5  # (w, h)
    size = ((rounded[:, 2:] + 1) * spatial_scale - 0.5 - start).clamp_min(0.1)
    steps = torch.arange(k, device=dev, dtype=dt)
    grid = torch.arange(s, device=dev, dtype=dt) / s
    # Sample positions [R, NC, k(i), k(j), S(b), S(a)] along w and h.
    shift = torch.zeros(r_count, 1, k, k, 2, device=dev, dtype=dt)
    if offset is not None:
        part = torch.div(torch.arange(k, device=dev) * p, k, rounding_mode="floor")
        trans = offset.view(r_count, -1, 2, p, p)[:, :, :, part][:, :, :, :, part]  # [R, NC, 2, k, k]
        shift = trans.permute(0, 1, 3, 4, 2) * gamma * size.view(r_count, 1, 1, 1, 2)
    bins = size / k  # [R, 2]
    w = (start[:, 0].view(-1, 1, 1, 1, 1, 1) + steps.view(1, 1, 1, k, 1, 1) * bins[:, 0].view(-1, 1, 1, 1, 1, 1)
         + shift[..., 0, None, None] + grid.view(1, 1, 1, 1, 1, s) * bins[:, 0].view(-1, 1, 1, 1, 1, 1))
    h = (start[:, 1].view(-1, 1, 1, 1, 1, 1) + steps.view(1, 1, k, 1, 1, 1) * bins[:, 1].view(-1, 1, 1, 1, 1, 1)
         + shift[..., 1, None, None] + grid.view(1, 1, 1, 1, s, 1) * bins[:, 1].view(-1, 1, 1, 1, 1, 1))
    w, h = torch.broadcast_tensors(w, h)
    taken = (w >= -0.5) & (w <= width - 0.5) & (h >= -0.5) & (h <= height - 0.5)
    w = torch.where(taken, w, torch.zeros_like(w)).clamp(0, width - 1)  # skipped samples (NaN too) read pixel 0
    h = torch.where(taken, h, torch.zeros_like(h)).clamp(0, height - 1)
    x0, y0 = torch.floor(w), torch.floor(h)
    fx, fy = w - x0, h - y0
    x1, y1 = torch.ceil(w).long(), torch.ceil(h).long()
    x0, y0 = x0.long(), y0.long()
    # Input channel of every (c, i, j), and the sample positions of c's class.
    per_class = out_channels // w.shape[1]
    group = torch.div(torch.arange(k, device=dev) * g, k, rounding_mode="floor")
    chan = ((torch.arange(out_channels, device=dev).view(-1, 1, 1) * g + group.view(1, -1, 1)) * g
            + group.view(1, 1, -1))  # [O, k, k]
    cls = torch.arange(out_channels, device=dev) // per_class
    planes = input.reshape(n, channels, height * width)
    batch = rois[:, 0].long()
    base = (batch.view(-1, 1, 1, 1) * channels + chan.unsqueeze(0)) * (height * width)  # [R, O, k, k]
    flat = planes.reshape(-1)

    def corner(yy, xx):
        index = base[..., None, None] + (yy[:, cls] * width + xx[:, cls])
        return flat[index]

    value = ((1 - fy[:, cls]) * ((1 - fx[:, cls]) * corner(y0, x0) + fx[:, cls] * corner(y0, x1))
             + fy[:, cls] * ((1 - fx[:, cls]) * corner(y1, x0) + fx[:, cls] * corner(y1, x1)))
    mask = taken[:, cls]
    total = torch.where(mask, value, torch.zeros_like(value)).sum((-2, -1))
    count = mask.sum((-2, -1)).to(dt)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
