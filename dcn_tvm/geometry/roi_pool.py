"""The static geometry of one deformable (PS) RoI pooling layer, the `geometry` of its KernelSpecs,
and the checks of a deform_roi_pool call's shapes and arguments that build it.

A key reads e.g. `float32_o21_k7_g7_p7_sr4_nc21_scale0p0625_gamma0p1` (floats with "p" for the point).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from dcn_tvm.geometry.arguments import finite, positive_int
from dcn_tvm.geometry.dtypes import accumulation_dtype


def _number(value: float) -> str:
    """A float as a file-name-friendly token that round-trips (0.0625 -> "0p0625")."""
    return repr(float(value)).replace(".", "p")


#: The layouts of the pooling graphs (dcn_tvm.compute.deform_roi_pool); "auto" picks per layer.
LAYOUTS = ("channels_first", "channels_last")
#: Channels-last graphs pad the channels to a multiple of this (a vector register of float32 lanes).
CHANNEL_ALIGN = 16


@dataclass(frozen=True)
class RoIPoolGeometry:
    """Static hyper-parameters of one deform_roi_pool call.

    num_classes is the number of offset classes (offset has 2*num_classes channels), 0 without
    offsets; then part_size and gamma are unused and set to 0.
    """

    out_channels: int
    output_size: int
    group_size: int
    part_size: int
    sampling_ratio: int
    num_classes: int
    spatial_scale: float
    gamma: float
    dtype: str

    @property
    def acc_dtype(self) -> str:
        return accumulation_dtype(self.dtype)

    @property
    def in_channels(self) -> int:
        return self.out_channels * self.group_size**2

    @property
    def with_offset(self) -> bool:
        return self.num_classes > 0

    @property
    def sample_classes(self) -> int:
        """Classes with their own sample positions: the offset classes, or 1 without offsets."""
        return max(self.num_classes, 1)

    @property
    def channels_per_class(self) -> int:
        return self.out_channels // self.sample_classes

    @property
    def padded_channels(self) -> int:
        """The channels rounded up to CHANNEL_ALIGN (the channel axis of the channels-last stages)."""
        return -(-self.in_channels // CHANNEL_ALIGN) * CHANNEL_ALIGN

    @property
    def key(self) -> str:
        return (
            f"{self.dtype}_o{self.out_channels}_k{self.output_size}_g{self.group_size}_p{self.part_size}"
            f"_sr{self.sampling_ratio}_nc{self.num_classes}_scale{_number(self.spatial_scale)}"
            f"_gamma{_number(self.gamma)}"
        )


#: The largest finite and the smallest normal number of each accumulation dtype: spatial_scale and gamma
#: become constants of that type in the kernels (a float32 constant beyond its range fails to compile).
_FLOAT_RANGES = {"float32": ((2 - 2**-23) * 2.0**127, 2.0**-126), "float64": (sys.float_info.max, sys.float_info.min)}
#: The largest sampling_ratio: a loop extent (an int32) of the kernels.
_INT32_MAX = 2**31 - 1


def _in_kernel_range(spatial_scale: float, gamma: float, sampling_ratio: int, dtype: str) -> None:
    """The arguments that become constants of the kernels within their types (ValueError naming the
    argument and the range): spatial_scale among the positive normal numbers of the accumulation dtype
    (a subnormal may be flushed to zero), |gamma| among its finite ones, sampling_ratio an int32."""
    acc = accumulation_dtype(dtype)
    largest, smallest = _FLOAT_RANGES[acc]
    if not smallest <= spatial_scale <= largest:
        raise ValueError(f"spatial_scale must be in [{smallest!r}, {largest!r}] ({acc}'s normal range, the "
                         f"kernel's float type), got {spatial_scale!r}")
    if abs(gamma) > largest:
        raise ValueError(f"gamma must be within ±{largest!r} ({acc}'s largest, the kernel's float type), "
                         f"got {gamma!r}")
    if sampling_ratio > _INT32_MAX:
        raise ValueError(f"sampling_ratio must be at most {_INT32_MAX} (int32, the kernel's loop index), "
                         f"got {sampling_ratio}")


def resolve_layout(geo: RoIPoolGeometry, layout: str) -> str:
    """`layout` (one of LAYOUTS or "auto"), "auto" resolved: channels-last for group_size 1, where every
    channel samples a bin at the same points (its class's), so a vector of channels shares each
    sample's pixels and weights; channels-first for position-sensitive pooling, where the channels of
    a vector would read different bins."""
    if layout not in (*LAYOUTS, "auto"):
        raise ValueError(f"unknown layout {layout!r}; expected 'auto' or one of {LAYOUTS}")
    if layout != "auto":
        return layout
    return "channels_last" if geo.group_size == 1 else "channels_first"


def roi_pool_geometry(input_shape: tuple, rois: int, offset_shape: tuple | None, output_size, spatial_scale,
                      group_size, part_size, sampling_ratio, gamma, dtype: str) -> RoIPoolGeometry:
    """Check the shapes (input [N, C, H, W], `rois` RoIs, offset [R, 2*num_classes, part_size,
    part_size] or None) and the arguments of a deform_roi_pool call in `dtype` (those that become
    constants of the kernels within their types), and return its geometry."""
    k, g = positive_int("output_size", output_size), positive_int("group_size", group_size)
    p = k if part_size is None else positive_int("part_size", part_size)
    s = positive_int("sampling_ratio", sampling_ratio)
    scale, gamma = finite("spatial_scale", spatial_scale, positive=True), finite("gamma", gamma)
    _in_kernel_range(scale, gamma, s, dtype)
    channels = input_shape[1]
    if channels == 0 or channels % (g * g) != 0:
        raise ValueError(f"input channels ({channels}) must be a positive multiple of group_size² ({g * g})")
    out_channels = channels // (g * g)
    if offset_shape is None:
        return RoIPoolGeometry(out_channels, k, g, 0, s, 0, scale, 0.0, dtype)
    classes, odd = divmod(offset_shape[1], 2)
    if odd or not classes or (offset_shape[0], offset_shape[2], offset_shape[3]) != (rois, p, p):
        raise ValueError(f"offset must have shape ({rois}, 2*num_classes, {p}, {p}) "
                         f"(R, 2*num_classes, part_size, part_size), got {tuple(offset_shape)}")
    if out_channels % classes != 0:
        raise ValueError(f"out channels ({out_channels} = {channels} // group_size²) must be a multiple of "
                         f"the offset classes ({classes} = offset.shape[1] // 2)")
    return RoIPoolGeometry(out_channels, k, g, p, s, classes, scale, gamma, dtype)
