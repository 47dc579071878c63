"""Independent references for the tests and the benchmarks, written from the paper's equations.

`deform_conv2d_loops` is a float64 loop over every sample (slow, obviously right);
`deform_conv2d_torch` is the same maths vectorised in plain PyTorch (bilinear gather + matmul),
differentiable by autograd, and the "plain-PyTorch deformable conv" of the benchmarks.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def bilinear_or_zero(plane: np.ndarray, y: float, x: float) -> np.ndarray:
    """plane [C, H, W] sampled at (y, x), corners outside read as zero: nothing unless -1 < y < H and -1 < x < W
    (torchvision's rule; the same values as grid_sample's zero padding)."""
    _, h, w = plane.shape
    if not (-1 < y < h and -1 < x < w):
        return np.zeros(plane.shape[0])
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = np.zeros(plane.shape[0])
    for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * plane[:, yy, xx]
    return total


def deform_conv2d_loops(inp, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                        mask=None) -> torch.Tensor:
    """Float64 loop reference of eq. (2)-(4) with DCNv2's mask; torchvision's offset layout."""
    x = inp.detach().double().numpy()
    off = offset.detach().double().numpy()
    wt = weight.detach().double().numpy()
    msk = None if mask is None else mask.detach().double().numpy()
    n, c, h, w = x.shape
    o, c_per_group, kh, kw = wt.shape
    groups = c // c_per_group
    oh, ow = off.shape[2], off.shape[3]
    offset_groups = off.shape[1] // (2 * kh * kw)
    per_offset_group = c // offset_groups
    columns = np.zeros((n, c, kh, kw, oh, ow))
    for b in range(n):
        for g in range(offset_groups):
            chans = slice(g * per_offset_group, (g + 1) * per_offset_group)
            for i in range(kh):
                for j in range(kw):
                    k = (g * kh + i) * kw + j
                    for y in range(oh):
                        for xx in range(ow):
                            py = y * stride[0] - padding[0] + i * dilation[0] + off[b, 2 * k, y, xx]
                            px = xx * stride[1] - padding[1] + j * dilation[1] + off[b, 2 * k + 1, y, xx]
                            value = bilinear_or_zero(x[b, chans], py, px)
                            if msk is not None:
                                value = value * msk[b, k, y, xx]
                            columns[b, chans, i, j, y, xx] = value
    out = np.zeros((n, o, oh, ow))
    o_per_group = o // groups
    for gr in range(groups):
        cols = columns[:, gr * c_per_group:(gr + 1) * c_per_group].reshape(n, -1, oh * ow)
        wg = wt[gr * o_per_group:(gr + 1) * o_per_group].reshape(o_per_group, -1)
        out[:, gr * o_per_group:(gr + 1) * o_per_group] = np.einsum("ok,nkp->nop", wg, cols).reshape(
            n, o_per_group, oh, ow)
    if bias is not None:
        out += bias.detach().double().numpy()[None, :, None, None]
    return torch.from_numpy(out)


def deform_conv2d_torch(inp, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                        mask=None) -> torch.Tensor:
    """The same maths in plain PyTorch: gather the four corners, blend, then one grouped matmul."""
    n, c, h, w = inp.shape
    o, c_per_group, kh, kw = weight.shape
    groups = c // c_per_group
    oh, ow = offset.shape[2], offset.shape[3]
    k = kh * kw
    offset_groups = offset.shape[1] // (2 * k)
    dev, dt = inp.device, inp.dtype
    base_y = (torch.arange(oh, device=dev) * stride[0] - padding[0]).view(1, 1, oh, 1) + (
        torch.arange(kh, device=dev) * dilation[0]).repeat_interleave(kw).view(1, k, 1, 1)
    base_x = (torch.arange(ow, device=dev) * stride[1] - padding[1]).view(1, 1, 1, ow) + (
        torch.arange(kw, device=dev) * dilation[1]).repeat(kh).view(1, k, 1, 1)
    off = offset.view(n, offset_groups, k, 2, oh, ow)
    y = base_y.unsqueeze(1).to(dt) + off[:, :, :, 0]  # [N, OG, K, OH, OW]
    x = base_x.unsqueeze(1).to(dt) + off[:, :, :, 1]
    # Closed at -1 (torchvision's gradient): on y = -1 the only corner inside has weight y - floor(y) = 0,
    # so the value is the same as with the open rule, but its derivative along y is not zero.
    inside = (y >= -1) & (y < h) & (x >= -1) & (x < w)
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    planes = inp.reshape(n, offset_groups, c // offset_groups, h * w)
    columns = torch.zeros(n, offset_groups, c // offset_groups, k, oh, ow, device=dev, dtype=dt)
    for dy, wy in ((0, 1 - ly), (1, ly)):
        for dx, wx in ((0, 1 - lx), (1, lx)):
            yy, xx = y0.long() + dy, x0.long() + dx
            valid = inside & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            index = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).view(n, offset_groups, 1, -1)
            pixels = torch.gather(planes, 3, index.expand(-1, -1, c // offset_groups, -1))
            corner = torch.where(valid, wy * wx, torch.zeros_like(wy)).view(n, offset_groups, 1, k, oh, ow)
            columns = columns + corner * pixels.view(n, offset_groups, c // offset_groups, k, oh, ow)
    if mask is not None:
        columns = columns * mask.view(n, offset_groups, 1, k, oh, ow)
    columns = columns.reshape(n, groups, c_per_group * k, oh * ow)
    out = torch.einsum("gok,ngkp->ngop", weight.reshape(groups, o // groups, -1), columns)
    out = out.reshape(n, o, oh, ow)
    return out if bias is None else out + bias.view(1, -1, 1, 1)
