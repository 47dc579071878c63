"""The static geometry of one deformable (PS) RoI pooling layer, the `geometry` of its KernelSpecs.

A key reads e.g. `float32_o21_k7_g7_p7_sr4_nc21_scale0p0625_gamma0p1` (floats with "p" for the point).
"""

from __future__ import annotations

from dataclasses import dataclass

from dcn_tvm.kernels.spec import accumulation_dtype


def _number(value: float) -> str:
    """A float as a file-name-friendly token that round-trips (0.0625 -> "0p0625")."""
    return repr(float(value)).replace(".", "p")


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
    def key(self) -> str:
        return (
            f"{self.dtype}_o{self.out_channels}_k{self.output_size}_g{self.group_size}_p{self.part_size}"
            f"_sr{self.sampling_ratio}_nc{self.num_classes}_scale{_number(self.spatial_scale)}"
            f"_gamma{_number(self.gamma)}"
        )
