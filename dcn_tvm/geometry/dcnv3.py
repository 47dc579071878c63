"""The static geometry of one DCNv3 / DCNv4 aggregation (InternImage, FlashInternImage), the `geometry`
of its KernelSpecs, and the checks of a dcnv3_core / dcnv4_core call's shapes that build it.

Both operators are one computation: per output position, group g and kernel point p, a bilinear sample
of the group's channels, weighted by a mask value, summed over the points. They differ only in where
the offsets and mask values come from (`packed`):

    DCNv3 (packed=False)  offset [N, Ho, Wo, G*P*2]: (x, y) of point p of group g at 2*(g*P + p)
                          mask   [N, Ho, Wo, G*P]:   point p of group g at g*P + p
    DCNv4 (packed=True)   offset_mask [N, Ho, Wo, D]: group g's 3*P channels from 3*P*g: its P (x, y)
                          pairs, then its P mask values; D = G*P*3 rounded up to a multiple of 8, the
                          padding channels unread (and given zero gradient)

A key reads e.g. `float32_g4_gc16_k3x3_s1x1_p1x1_d1x1_scale1p0_rc0_v3` (`v4` when packed).
"""

from __future__ import annotations

from dataclasses import dataclass

from dcn_tvm.geometry.arguments import finite, pair, positive_int
from dcn_tvm.geometry.dtypes import accumulation_dtype

#: DCNv4 pads offset_mask's channels to a multiple of this.
PACKED_ALIGN = 8


def _number(value: float) -> str:
    """A float as a file-name-friendly token that round-trips (0.5 -> "0p5", -1.0 -> "m1p0")."""
    return repr(float(value)).replace(".", "p").replace("-", "m")


@dataclass(frozen=True)
class DCNv3Geometry:
    """Static hyper-parameters of one dcnv3_core (packed=False) or dcnv4_core (packed=True) call."""

    group: int
    group_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    offset_scale: float
    remove_center: bool
    packed: bool
    dtype: str

    @property
    def acc_dtype(self) -> str:
        return accumulation_dtype(self.dtype)

    @property
    def channels(self) -> int:
        return self.group * self.group_channels

    @property
    def points(self) -> int:
        """P, the sampling points per group: the kernel's, less the centre with remove_center."""
        return self.kernel[0] * self.kernel[1] - int(self.remove_center)

    @property
    def packed_channels(self) -> int:
        """D, the channels of DCNv4's offset_mask: G*P*3 rounded up to a multiple of PACKED_ALIGN."""
        return -(-self.group * self.points * 3 // PACKED_ALIGN) * PACKED_ALIGN

    def output_size(self, height, width):
        """(Ho, Wo) for an input of height x width (ints or symbolic expressions)."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def sampling_shapes(self, batch: int, out_h: int, out_w: int) -> tuple[tuple[int, ...], ...]:
        """The shapes of the sampling tensors: (offset, mask), or (offset_mask,) when packed."""
        g, p = self.group, self.points
        if self.packed:
            return ((batch, out_h, out_w, self.packed_channels),)
        return (batch, out_h, out_w, g * p * 2), (batch, out_h, out_w, g * p)

    @property
    def key(self) -> str:
        pair = "{}x{}".format
        return (
            f"{self.dtype}_g{self.group}_gc{self.group_channels}_k{pair(*self.kernel)}_s{pair(*self.stride)}"
            f"_p{pair(*self.padding)}_d{pair(*self.dilation)}_scale{_number(self.offset_scale)}"
            f"_rc{int(self.remove_center)}_{'v4' if self.packed else 'v3'}"
        )


def dcnv3_geometry(input_shape: tuple, sampling_shapes: tuple, kernel, stride, padding, dilation, group,
                   group_channels, offset_scale, remove_center, packed: bool, dtype: str) -> DCNv3Geometry:
    """Check the shapes (input [N, H, W, group*group_channels]; `sampling_shapes` the (offset, mask) or
    (offset_mask,) shapes, see the module docstring) and the arguments of a dcnv3_core (dcnv4_core when
    `packed`) call in `dtype`, and return its geometry."""
    g, gc = positive_int("group", group), positive_int("group_channels", group_channels)
    if not isinstance(remove_center, (bool, int)) or remove_center not in (0, 1):
        raise TypeError(f"remove_center must be a bool, got {remove_center!r}")
    geo = DCNv3Geometry(g, gc, pair(kernel, "kernel", 1), pair(stride, "stride", 1), pair(padding, "pad", 0),
                        pair(dilation, "dilation", 1), finite("offset_scale", offset_scale), bool(remove_center),
                        packed, dtype)
    kh, kw = geo.kernel
    if geo.remove_center and (kh % 2 == 0 or kw % 2 == 0):
        raise ValueError(f"remove_center needs an odd kernel (it has a centre point), got kernel {kh}x{kw}")
    if len(input_shape) != 4 or input_shape[3] != geo.channels:
        raise ValueError(f"input must have shape [N, H, W, {geo.channels}] (channels-last, group*group_channels "
                         f"= {g}*{gc} channels), got {tuple(input_shape)}")
    n, h, w, _ = input_shape
    out_h, out_w = geo.output_size(h, w)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"the kernel's extent ({geo.dilation[0] * (kh - 1) + 1}x{geo.dilation[1] * (kw - 1) + 1}) "
                         f"does not fit the padded input ({h + 2 * geo.padding[0]}x{w + 2 * geo.padding[1]})")
    names = ("offset_mask",) if packed else ("offset", "mask")
    expected = geo.sampling_shapes(n, out_h, out_w)
    if len(sampling_shapes) != len(names):
        raise ValueError(f"expected the tensors {names}, got {len(sampling_shapes)}")
    for name, shape, want in zip(names, sampling_shapes, expected):
        if tuple(shape) != want:
            raise ValueError(f"{name} must have shape {want} ([N, Ho, Wo, {_channels_text(name, geo)}]), "
                             f"got {tuple(shape)}")
    return geo


def _channels_text(name: str, geo: DCNv3Geometry) -> str:
    g, p = geo.group, geo.points
    return {"offset": f"group*points*2 = {g}*{p}*2", "mask": f"group*points = {g}*{p}",
            "offset_mask": f"group*points*3 = {g}*{p}*3 rounded up to a multiple of {PACKED_ALIGN}"}[name]
