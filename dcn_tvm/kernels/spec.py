"""Readable kernel specs. One key names the in-process cache entry, the on-disk file and (later)
the tuning record and the prebuilt artifact alike, e.g.

    deform_conv2d_forward_float32_c512_o512_k3x3_s1x1_p2x2_d2x2_g1_og1_m0_n1_h38_w50_llvm-znver5

A batch/height/width of None is symbolic ("nany"): one kernel serves every size. A kernel without
floating-point atomics (asked for by torch.use_deterministic_algorithms) ends in `_deterministic`, one
whose float32 GEMMs run at torch's float32 matmul precision "high" or "medium" (TF32 tensor cores) in
`_precision_high` or `_precision_medium`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelSpec:
    """One compiled function: an operator stage for a geometry, sizes and target.

    `geometry` is the operator's static description (anything with a `.key`, see dcn_tvm.geometry),
    or None for stages that are generic in everything but `acc_dtype`. `sizes` are the (name, value)
    pairs of the dimensions that may be symbolic; a value of None compiles a kernel for every size.
    """

    op: str
    stage: str
    geometry: object | None
    sizes: tuple[tuple[str, int | None], ...]
    target: str  # a target key, see dcn_tvm.kernels.targets
    acc_dtype: str = "float32"
    #: No floating-point atomics: the same results bit for bit on every run (the GPU scatters).
    deterministic: bool = False
    #: The torch float32 matmul precision of a float32 CUDA GEMM stage (ops.deform_conv2d.cuda_matmul_precision):
    #: "highest" exact, else TF32.
    precision: str = "highest"

    @property
    def workload_key(self) -> str:
        """The key without the target: a valid C symbol, used as the function name in libraries."""
        variant = ("_deterministic" if self.deterministic else "") + \
            ("" if self.precision == "highest" else f"_precision_{self.precision}")
        if self.geometry is None:
            return f"{self.op}_{self.stage}_{self.acc_dtype}{variant}"
        dims = "_".join(f"{name}{'any' if value is None else value}" for name, value in self.sizes)
        return f"{self.op}_{self.stage}_{self.geometry.key}_{dims}{variant}"

    @property
    def key(self) -> str:
        return f"{self.workload_key}_{self.target}"

    def symbolic(self) -> KernelSpec:
        """The same spec with every size symbolic: the kernel that serves any shape."""
        return dataclasses.replace(self, sizes=tuple((name, None) for name, _ in self.sizes))

