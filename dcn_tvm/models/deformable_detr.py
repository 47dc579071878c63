"""Deformable DETR's encoder layer (Zhu et al. 2021, §4.1) on `MultiScaleDeformableAttention`.

The encoder's queries are the positions of the flattened multi-scale feature maps themselves: each
attends, through its reference point (its pixel centre, `encoder_reference_points`), to P points on
every level, then passes a feed-forward block; post-norm residuals as in the paper's code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcn_tvm.ops.ms_deform_attn import MultiScaleDeformableAttention


def encoder_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor | None = None, batch: int = 1,
                             dtype: torch.dtype = torch.float32) -> Tensor:
    """[N, S, L, 2] normalised (x, y): every position's pixel centre in the valid part of its level,
    seen from every level. `valid_ratios` [N, L, 2] is the unpadded fraction (x, y) of each level (all
    ones, for `batch` images, if None)."""
    levels = spatial_shapes.shape[0]
    if valid_ratios is None:
        valid_ratios = torch.ones(batch, levels, 2, dtype=dtype, device=spatial_shapes.device)
    points = []
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        ys, xs = torch.meshgrid(torch.arange(height, dtype=dtype, device=spatial_shapes.device) + 0.5,
                                torch.arange(width, dtype=dtype, device=spatial_shapes.device) + 0.5, indexing="ij")
        x = xs.reshape(1, -1) / (valid_ratios[:, None, level, 0] * width)
        y = ys.reshape(1, -1) / (valid_ratios[:, None, level, 1] * height)
        points.append(torch.stack([x, y], dim=-1))
    return torch.cat(points, dim=1)[:, :, None] * valid_ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """One Deformable DETR encoder layer: multi-scale deformable self-attention over the flattened
    feature maps, then a two-layer ReLU feed-forward block, each added back and layer-normalised.

    forward(src [N, S, C], pos [N, S, C] positional + level embedding, reference_points [N, S, L, 2],
    spatial_shapes [L, 2], level_start_index [L], padding_mask [N, S] or None) -> [N, S, C]
    """

    def __init__(self, embed_dims: int = 256, ffn_dims: int = 1024, dropout: float = 0.1, num_levels: int = 4,
                 num_heads: int = 8, num_points: int = 4):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dims, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.linear1 = nn.Linear(embed_dims, ffn_dims)
        self.linear2 = nn.Linear(ffn_dims, embed_dims)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout(attended))
        hidden = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(hidden))
