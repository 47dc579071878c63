"""Independent references of DCNv3 / DCNv4's aggregation for the tests and the benchmark, written from
the semantics of InternImage's CUDA kernel (dcn_tvm.compute.dcnv3 states them):

- point k of group g at output (ho, wo) is kernel column i, row j with the points x-major (i outer,
  j inner), the centre (kw // 2, kh // 2) skipped with remove_center;
- it samples (y, x) = window centre + offset_scale * (grid displacement + offset), where the window
  centre is (ho*sh - ph + dh*(kh-1)//2, wo*sw - pw + dw*(kw-1)//2) and the displacement
  (j*dh - dh*(kh-1)//2, i*dw - dw*(kw-1)//2); the offset is the (x, y) pair of the point;
- bilinear with corners outside the image read as zero, nothing unless -1 < y < H and -1 < x < W;
- times the point's mask value (as given), summed over the points.

InternImage's PyTorch fallback (dcnv3_core_pytorch) pads the height by pad_w and the width by pad_h;
its CUDA kernel, followed here, pads the height by pad_h.

`dcnv3_loops` is a float64 loop over every sample (slow, obviously right); `dcnv3_grid_sample` the
same maths through torch.nn.functional.grid_sample, differentiable by autograd, and the CPU baseline
of benchmarks/bench_dcnv34.py. `unpack_offset_mask` / `pack_offset_mask` convert between DCNv3's
separate offset and mask and DCNv4's packed offset_mask.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from reference import bilinear_or_zero


def _points(kernel, remove_center):
    """[(i, j)]: kernel column i and row j of every point, x-major, the centre left out with remove_center."""
    kh, kw = kernel
    return [(i, j) for i in range(kw) for j in range(kh) if not (remove_center and (i, j) == (kw // 2, kh // 2))]


def dcnv3_loops(input, offset, mask, kernel, stride, pad, dilation, group, offset_scale,
                remove_center=False) -> torch.Tensor:
    """Float64 loops: input [N, H, W, G*GC], offset [N, Ho, Wo, G*P*2], mask [N, Ho, Wo, G*P] ->
    [N, Ho, Wo, G*GC]. kernel, stride, pad, dilation are (h, w) pairs."""
    x = input.detach().double().numpy()
    off = offset.detach().double().numpy()
    msk = mask.detach().double().numpy()
    n, h, w, c = x.shape
    _, out_h, out_w, _ = off.shape
    gc = c // group
    points = _points(kernel, remove_center)
    half = [dilation[a] * (kernel[a] - 1) // 2 for a in (0, 1)]
    out = np.zeros((n, out_h, out_w, c))
    for b in range(n):
        for g in range(group):
            plane = x[b, :, :, g * gc:(g + 1) * gc].transpose(2, 0, 1)  # [GC, H, W]
            for ho in range(out_h):
                for wo in range(out_w):
                    centre_y = ho * stride[0] - pad[0] + half[0]
                    centre_x = wo * stride[1] - pad[1] + half[1]
                    for k, (i, j) in enumerate(points):
                        at = g * len(points) + k
                        dx, dy = off[b, ho, wo, 2 * at], off[b, ho, wo, 2 * at + 1]
                        y = centre_y + offset_scale * (j * dilation[0] - half[0] + dy)
                        xx = centre_x + offset_scale * (i * dilation[1] - half[1] + dx)
                        out[b, ho, wo, g * gc:(g + 1) * gc] += msk[b, ho, wo, at] * bilinear_or_zero(plane, y, xx)
    return torch.from_numpy(out)


def sampling_positions(offset, kernel, stride, pad, dilation, group, offset_scale, remove_center=False):
    """[N, Ho, Wo, G, P, 2] pixel coordinates (x, y) of every sample, differentiable in offset."""
    n, out_h, out_w, _ = offset.shape
    points = _points(kernel, remove_center)
    dev, dt = offset.device, offset.dtype
    half = [dilation[a] * (kernel[a] - 1) // 2 for a in (0, 1)]
    centre_y = torch.arange(out_h, device=dev, dtype=dt) * stride[0] - pad[0] + half[0]
    centre_x = torch.arange(out_w, device=dev, dtype=dt) * stride[1] - pad[1] + half[1]
    grid = torch.tensor([(i * dilation[1] - half[1], j * dilation[0] - half[0]) for i, j in points], device=dev,
                        dtype=dt)
    centre = torch.stack(torch.broadcast_tensors(centre_x[None, :], centre_y[:, None]), -1)  # [Ho, Wo, 2]
    off = offset.reshape(n, out_h, out_w, group, len(points), 2)
    return centre[None, :, :, None, None, :] + offset_scale * (grid + off)


def dcnv3_grid_sample(input, offset, mask, kernel, stride, pad, dilation, group, offset_scale,
                      remove_center=False) -> torch.Tensor:
    """The same maths through grid_sample (align_corners=False maps pixel coordinate u of a size-S axis
    to (2u + 1) / S - 1; zeros padding reads corners outside as zero): [N, Ho, Wo, G*GC]."""
    n, h, w, c = input.shape
    _, out_h, out_w, _ = offset.shape
    gc, points = c // group, len(_points(kernel, remove_center))
    positions = sampling_positions(offset, kernel, stride, pad, dilation, group, offset_scale, remove_center)
    size = torch.tensor([w, h], device=input.device, dtype=offset.dtype)
    grid = (2 * positions + 1) / size - 1
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * group, out_h * out_w, points, 2).to(input.dtype)
    planes = input.reshape(n, h, w, group, gc).permute(0, 3, 4, 1, 2).reshape(n * group, gc, h, w)
    samples = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = mask.reshape(n, out_h * out_w, group, points).permute(0, 2, 1, 3).reshape(n * group, 1, -1, points)
    out = (samples * weights).sum(-1)  # [N*G, GC, Ho*Wo]
    return out.reshape(n, c, out_h, out_w).permute(0, 2, 3, 1)


def pack_offset_mask(offset, mask, group: int, channels: int | None = None):
    """DCNv4's offset_mask [N, Ho, Wo, D] from offset [..., G*P*2] and mask [..., G*P]: group g's 2P offsets
    then its P mask values; D = `channels` (default G*P*3 rounded up to a multiple of 8), the padding zero."""
    *lead, gp = mask.shape
    points = gp // group
    body = torch.cat([offset.reshape(*lead, group, 2 * points), mask.reshape(*lead, group, points)], -1)
    total = channels if channels is not None else -(-group * points * 3 // 8) * 8
    return F.pad(body.reshape(*lead, group * points * 3), (0, total - group * points * 3))


def unpack_offset_mask(offset_mask, group: int, points: int):
    """(offset [..., G*P*2], mask [..., G*P]) of DCNv4's offset_mask, the padding channels dropped."""
    *lead, _ = offset_mask.shape
    body = offset_mask[..., :group * points * 3].reshape(*lead, group, 3 * points)
    return body[..., :2 * points].reshape(*lead, -1), body[..., 2 * points:].reshape(*lead, -1)
