"""The static geometry of one multi-scale deformable attention call (Deformable DETR's MSDeformAttn), the
`geometry` of its KernelSpecs, and the checks of an ms_deform_attn call's shapes that build it.

The level shapes are part of the geometry: a model fixes them per input resolution, and baked into the
kernel every level's size and start are constants. A key reads e.g.
`float32_m8_d32_p4_l100x167_50x84_25x42_13x21` (heads, head_dim, points, then each level's H x W).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from dcn_tvm.geometry.dtypes import accumulation_dtype


@dataclass(frozen=True)
class MSDeformAttnGeometry:
    """Static sizes of one ms_deform_attn call: the level shapes (H, W), heads M, head_dim D, points P."""

    levels: tuple[tuple[int, int], ...]
    heads: int
    head_dim: int
    points: int
    dtype: str

    @property
    def acc_dtype(self) -> str:
        return accumulation_dtype(self.dtype)

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def level_starts(self) -> tuple[int, ...]:
        """The row of value where each level starts (level_start_index)."""
        return (0, *itertools.accumulate(h * w for h, w in self.levels))[:-1]

    @property
    def spatial_size(self) -> int:
        """S, the rows of value: every level's H * W."""
        return sum(h * w for h, w in self.levels)

    @property
    def key(self) -> str:
        return f"{self.dtype}_m{self.heads}_d{self.head_dim}_p{self.points}_l{levels_text(self.levels, '_')}"


def levels_text(levels, separator: str = "+") -> str:
    """Level shapes as `HxW` joined by `separator` (the workload form: `100x167+50x84`)."""
    return separator.join(f"{h}x{w}" for h, w in levels)


class Levels(tuple):
    """Level shapes ((H, W), ...) that print in the workload form, `100x167+50x84`."""

    def __str__(self) -> str:
        return levels_text(self)


def parse_levels(text: str) -> Levels:
    """`HxW+HxW+...` (each >= 1) as level shapes; ValueError describing the form otherwise."""
    parts = text.split("+")
    if not all(re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", part) for part in parts):
        raise ValueError("level shapes HxW joined by '+', each >= 1 (e.g. 100x167+50x84)")
    return Levels(tuple(int(size) for size in part.split("x")) for part in parts)


def _levels(spatial_shapes) -> tuple[tuple[int, int], ...]:
    """spatial_shapes (a sequence of (H, W) pairs) as a tuple of pairs of positive ints."""
    levels = tuple(tuple(pair) for pair in spatial_shapes)
    if not levels or any(len(pair) != 2 for pair in levels):
        raise ValueError(f"spatial_shapes must be [L, 2] (H, W) pairs with L >= 1, got {list(spatial_shapes)}")
    if any(not isinstance(size, int) or isinstance(size, bool) or size < 1 for pair in levels for size in pair):
        raise ValueError(f"spatial_shapes must hold sizes >= 1, got {[list(pair) for pair in levels]}")
    return levels


def ms_deform_attn_geometry(value_shape: tuple, spatial_shapes, level_start_index, locations_shape: tuple,
                            weights_shape: tuple, dtype: str) -> MSDeformAttnGeometry:
    """Check the shapes of an ms_deform_attn call (value [N, S, M, D]; spatial_shapes, level_start_index as
    lists; sampling_locations [N, Lq, M, L, P, 2]; attention_weights [N, Lq, M, L, P]) in `dtype` and return
    its geometry. ValueError naming the actual and the expected sizes."""
    levels = _levels(spatial_shapes)
    if len(value_shape) != 4:
        raise ValueError(f"value must have 4 dimensions [N, S, M, D], got shape {tuple(value_shape)}")
    n, s, heads, head_dim = value_shape
    spatial = sum(h * w for h, w in levels)
    if s != spatial:
        raise ValueError(f"value has S = {s} rows (value.shape[1]) but spatial_shapes {[list(p) for p in levels]} "
                         f"cover sum(H*W) = {spatial}")
    if heads < 1 or head_dim < 1:
        raise ValueError(f"value must have heads M >= 1 and head_dim D >= 1, got shape {tuple(value_shape)}")
    starts = (0, *itertools.accumulate(h * w for h, w in levels))[:-1]
    if tuple(level_start_index) != starts:
        raise ValueError(f"level_start_index must be {list(starts)} (each level's first row of value, from "
                         f"spatial_shapes), got {list(level_start_index)}")
    if len(locations_shape) != 6:
        raise ValueError(f"sampling_locations must have shape [N, Lq, M, L, P, 2], got {tuple(locations_shape)}")
    batch, queries, loc_heads, loc_levels, points, pair = locations_shape
    expected = (n, queries, heads, len(levels), points, 2)
    if (batch, loc_heads, loc_levels, pair) != (n, heads, len(levels), 2) or points < 1:
        raise ValueError(f"sampling_locations must have shape [N={n}, Lq, M={heads}, L={len(levels)}, P >= 1, 2], "
                         f"got {tuple(locations_shape)}")
    if tuple(weights_shape) != expected[:-1]:
        raise ValueError(f"attention_weights must have shape {expected[:-1]} [N, Lq, M, L, P], got "
                         f"{tuple(weights_shape)}")
    return MSDeformAttnGeometry(levels, heads, head_dim, points, dtype)
