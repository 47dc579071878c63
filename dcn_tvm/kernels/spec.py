"""Readable kernel specs. One key names the in-process cache entry, the on-disk file and (later)
the tuning record and the prebuilt artifact alike, e.g.

    deform_conv2d_forward_float32_c512_o512_k3x3_s1x1_p2x2_d2x2_g1_og1_m0_n1_h38_w50_llvm-znver5

A batch/height/width of None is symbolic ("nany"): one kernel serves every size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPES = ("float16", "bfloat16", "float32", "float64")


def accumulation_dtype(dtype: str) -> str:
    """float64 accumulates in float64, every other dtype in float32."""
    return "float64" if dtype == "float64" else "float32"


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


@dataclass(frozen=True)
class KernelSpec:
    """One compiled function: an operator stage for a geometry, sizes and target.

    `geometry` is the operator's static description (anything with a `.key`), or None for stages
    that are generic in everything but `acc_dtype`. `sizes` are the (name, value) pairs of the
    dimensions that may be symbolic; a value of None compiles a kernel for every size.
    """

    op: str
    stage: str
    geometry: object | None
    sizes: tuple[tuple[str, int | None], ...]
    target: str  # a target key, see dcn_tvm.kernels.targets
    acc_dtype: str = "float32"

    @property
    def workload_key(self) -> str:
        """The key without the target: a valid C symbol, used as the function name in libraries."""
        if self.geometry is None:
            return f"{self.op}_{self.stage}_{self.acc_dtype}"
        dims = "_".join(f"{name}{'any' if value is None else value}" for name, value in self.sizes)
        return f"{self.op}_{self.stage}_{self.geometry.key}_{dims}"

    @property
    def key(self) -> str:
        return f"{self.workload_key}_{self.target}"

    def symbolic(self) -> KernelSpec:
        """The same spec with every size symbolic: the kernel that serves any shape."""
        return dataclasses.replace(self, sizes=tuple((name, None) for name, _ in self.sizes))

