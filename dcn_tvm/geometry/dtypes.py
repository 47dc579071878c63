"""The dtypes dcn_tvm's kernels exist for, and the dtype each accumulates in."""

from __future__ import annotations

DTYPES = ("float16", "bfloat16", "float32", "float64")


def accumulation_dtype(dtype: str) -> str:
    """float64 accumulates in float64, every other dtype in float32."""
    return "float64" if dtype == "float64" else "float32"
