"""The static geometry of one deformable convolution layer, the `geometry` of its KernelSpecs, and
the checks of a deform_conv2d call's shapes and arguments that build it.

A key reads e.g. `float32_c512_o512_k3x3_s1x1_p2x2_d2x2_g1_og1_m0`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcn_tvm.geometry.arguments import ShapeError, expect_shape, pair
from dcn_tvm.geometry.dtypes import accumulation_dtype


#: The layouts of the compute graphs' internal stages (dcn_tvm.compute.deform_conv2d): channels-first
#: ([N, C, ...]) or channels-last ([N, ..., C]); "auto" picks one per layer (resolve_layout).
LAYOUTS = ("channels_first", "channels_last")


@dataclass(frozen=True)
class ConvGeometry:
    """Static hyper-parameters of one deformable convolution layer."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    offset_groups: int
    with_mask: bool
    dtype: str

    @property
    def acc_dtype(self) -> str:
        return accumulation_dtype(self.dtype)

    def output_size(self, height, width):
        """(OH, OW) for an input of height x width (ints or symbolic expressions)."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        return (
            (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
            (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1,
        )

    @property
    def key(self) -> str:
        pair = "{}x{}".format
        return (
            f"{self.dtype}_c{self.in_channels}_o{self.out_channels}_k{pair(*self.kernel)}"
            f"_s{pair(*self.stride)}_p{pair(*self.padding)}_d{pair(*self.dilation)}"
            f"_g{self.groups}_og{self.offset_groups}_m{int(self.with_mask)}"
        )


def resolve_layout(geo: ConvGeometry, layout: str) -> str:
    """`layout` (one of LAYOUTS or "auto"), "auto" resolved: channels-last where the kernel points cover
    every input pixel (KH*KW >= stride_h*stride_w), so that transposing the whole input (and, backward,
    its gradient) costs less than the gather it speeds up; channels-first where a large stride samples
    few of its pixels."""
    if layout not in (*LAYOUTS, "auto"):
        raise ValueError(f"unknown layout {layout!r}; expected 'auto' or one of {LAYOUTS}")
    if layout != "auto":
        return layout
    (kh, kw), (sh, sw) = geo.kernel, geo.stride
    return "channels_last" if kh * kw >= sh * sw else "channels_first"


def conv_geometry(input_shape: tuple, offset_shape: tuple, weight_shape: tuple, mask_shape: tuple | None,
                  stride, padding, dilation, dtype: str) -> ConvGeometry:
    """Check the shapes (input [N, C, H, W], offset [N, 2*offset_groups*KH*KW, OH, OW], weight
    [O, C/groups, KH, KW], mask [N, offset_groups*KH*KW, OH, OW] or None) and the stride, padding and
    dilation of a deform_conv2d call in `dtype`, and return the layer's static geometry.

    A wrong shape raises ShapeError (ValueError and RuntimeError); the checks run in torchvision's
    order, and the offset's and mask's channel errors name the same thing as torchvision's."""
    stride, padding, dilation = pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1)
    n, c, h, w = input_shape
    o, c_per_group, kh, kw = weight_shape
    if c == 0:
        raise ShapeError(f"input must have at least one channel, got shape {tuple(input_shape)}")
    if offset_shape[1] == 0 or offset_shape[1] % (2 * kh * kw) != 0:
        raise ShapeError(f"the shape of the offset tensor at dimension 1 is not valid: offset.shape[1] must be a "
                         f"positive multiple of 2*KH*KW = {2 * kh * kw}, got {offset_shape[1]}")
    if c_per_group == 0 or c % c_per_group != 0:
        raise ShapeError(f"input channels ({c}) must be a multiple of weight.shape[1] ({c_per_group})")
    groups = c // c_per_group
    if o % groups != 0:
        raise ShapeError(f"out channels ({o}) must be a multiple of groups ({groups} = {c} // {c_per_group})")
    offset_groups = offset_shape[1] // (2 * kh * kw)
    if mask_shape is not None and mask_shape[1] != offset_groups * kh * kw:
        raise ShapeError(f"mask.shape[1] is not valid: mask must have offset_groups*KH*KW = {offset_groups * kh * kw} "
                         f"channels (offset_groups = {offset_groups} from offset.shape[1]), got {mask_shape[1]}")
    if c % offset_groups != 0:
        raise ShapeError(f"input channels ({c}) must be a multiple of offset groups ({offset_groups})")
    geo = ConvGeometry(c, o, (kh, kw), stride, padding, dilation, groups, offset_groups, mask_shape is not None, dtype)
    oh, ow = geo.output_size(h, w)
    if oh <= 0 or ow <= 0:
        raise ShapeError(f"input {h}x{w} is too small for kernel {kh}x{kw} with padding {padding} "
                         f"and dilation {dilation}: the output would be {oh}x{ow}")
    expect_shape("offset", offset_shape, (n, 2 * offset_groups * kh * kw, oh, ow), "N, 2*offset_groups*KH*KW, OH, OW")
    expect_shape("mask", mask_shape, (n, offset_groups * kh * kw, oh, ow), "N, offset_groups*KH*KW, OH, OW")
    return geo
