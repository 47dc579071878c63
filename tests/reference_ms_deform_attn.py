"""References for multi-scale deformable attention, shared by the tests and the benchmark.

- `ms_deform_attn_loops`: float64 loops written from the formula (Deformable DETR eq. 3 with grid_sample's
  align_corners=False pixel centres and zero padding), one sample and one corner at a time.
- `ms_deform_attn_grid_sample`: the formulation everyone runs without a kernel, one grid_sample per level
  over a [N*M, D, H, W] view of the value, then the weighted sum; differentiable by torch's autograd. It
  materialises [N*M, D, Lq, L*P] samples.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from reference import bilinear_or_zero


def ms_deform_attn_loops(value, spatial_shapes, sampling_locations, attention_weights):
    """output[n, q, m*D + d] = sum_{l,p} A[n,q,m,l,p] * bilinear(level l of value[n, :, m], x*W_l - 0.5,
    y*H_l - 0.5)[d], in float64; value [N, S, M, D], locations [N, Lq, M, L, P, 2], weights [N, Lq, M, L, P]."""
    value, locations, weights = (t.detach().double().numpy() for t in (value, sampling_locations, attention_weights))
    n_size, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    shapes = [tuple(int(v) for v in pair) for pair in spatial_shapes.tolist()]
    starts = [sum(h * w for h, w in shapes[:level]) for level in range(levels)]
    output = np.zeros((n_size, queries, heads, head_dim))
    for n in range(n_size):
        for m in range(heads):
            planes = [value[n, start:start + h * w, m].reshape(h, w, head_dim).transpose(2, 0, 1)  # [D, H, W]
                      for start, (h, w) in zip(starts, shapes)]
            for q in range(queries):
                for level, (h, w) in enumerate(shapes):
                    for p in range(points):
                        x, y = locations[n, q, m, level, p]
                        sample = bilinear_or_zero(planes[level], y * h - 0.5, x * w - 0.5)
                        output[n, q, m] += weights[n, q, m, level, p] * sample
    return torch.from_numpy(output).view(n_size, queries, heads * head_dim)


def ms_deform_attn_grid_sample(value, spatial_shapes, sampling_locations, attention_weights):
    """The grid_sample formulation (differentiable, any dtype): [N, Lq, M*D]."""
    n, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = [tuple(int(v) for v in pair) for pair in spatial_shapes.tolist()]
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] coordinates
    samples = []
    for level, (h, w) in enumerate(shapes):
        plane = per_level[level].flatten(2).transpose(1, 2).reshape(n * heads, head_dim, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        samples.append(F.grid_sample(plane, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # [N*M, D, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, queries, levels * points)
    output = (stacked * weights).sum(-1).view(n, heads * head_dim, queries)
    return output.transpose(1, 2).contiguous()
