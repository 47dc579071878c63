"""Index width of the PrimFuncs: 32-bit where every buffer provably fits, 64-bit otherwise.

TE indexes in int32 by default, which overflows (a lowering error with static shapes, wrong
addresses with symbolic ones) once a buffer's flattened size passes 2^31 elements even though each
dimension fits. Symbolic sizes are int64 variables (dcn_tvm.kernels.build), so a kernel for every
size indexes in 64 bits.
"""

from __future__ import annotations

import math

from tvm import te, tirx

#: The most elements a buffer of an int32-indexed PrimFunc may have: half of int32's range, leaving
#: headroom for the partial sums of index arithmetic and for tiles that overshoot an extent.
INT32_ELEMENTS = 2**30


def _buffers(outputs):
    """Every tensor of the TE graph that computes `outputs` (placeholders, stages and outputs)."""
    seen, stack = {}, list(outputs)
    while stack:
        tensor = stack.pop()
        if tensor.op not in seen:
            seen[tensor.op] = tensor
            stack.extend(tensor.op.input_tensors)
    return seen.values()


def _elements(shape):
    """The element count of a shape, or None when a dimension is symbolic."""
    dims = [int(d) if isinstance(d, int) else (int(d.value) if isinstance(d, tirx.IntImm) else None) for d in shape]
    return None if None in dims else math.prod(dims)


def index_dtype(tensors) -> str:
    """'int32' when every buffer in the graph of `tensors` has static shape and at most
    INT32_ELEMENTS elements, else 'int64'."""
    counts = [_elements(t.shape) for t in _buffers(tensors)]
    return "int32" if all(c is not None and c <= INT32_ELEMENTS for c in counts) else "int64"


def create_prim_func(tensors):
    """te.create_prim_func(tensors) indexing in the width `index_dtype` chooses."""
    wide = index_dtype(tensors) == "int64"
    return te.create_prim_func(list(tensors), index_dtype_override="int64" if wide else None)
