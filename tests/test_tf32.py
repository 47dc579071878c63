"""float32 deform_conv2d on TF32 tensor cores where torch allows it (torch.set_float32_matmul_precision
"high" or "medium"): the kernels' identity, the simulated GPU's results against float64 references, the
TF32 rounding and fragment layout, and ptxas for sm_90.

The simulated GPU (tests/gpusim.py) emulates PTX mma.sync m16n8k8 tf32 per warp: it assembles A and B from
the lanes' registers at the PTX fragment positions and truncates the operands to TF32 as the hardware
does, so a kernel that loads a wrong layout or does not round to nearest gives other numbers.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from reference import deform_conv2d_torch
from test_deform_conv2d import make_inputs as conv_inputs

import dcn_tvm
from dcn_tvm.geometry.conv import conv_geometry
from dcn_tvm.kernels.build import build
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.workloads import Workload
from dcn_tvm.ops import deform_conv2d as conv_ops

GPU_TARGET = "cuda-sm_90"
# Fragments fit: 16 | output channels per group and 16 | input channels per group x kernel points.
CASES = [
    (2, 16, 6, 7, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, False),
    (1, 32, 5, 6, 32, (3, 3), (1, 2), (2, 1), (2, 1), 2, 2, True),
]
#: Relative error against float64 of a TF32 result (operands rounded to 10 mantissa bits: 2^-11).
TF32_TOLERANCE = 2e-3
#: Relative error against the float64 product of the TF32-rounded operands (float32 accumulation).
ROUNDED_TOLERANCE = 2e-5


def tf32(tensor: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32 (to nearest, ties away from zero, at mantissa bit 13), as float64."""
    bits = tensor.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32).double()


@pytest.fixture
def precision():
    """Set torch's float32 matmul precision for the test (restored after)."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def simulated_gpu(monkeypatch):
    """dcn_tvm's conv ops on CPU tensors run the simulated CUDA kernels; returns the kernels asked for."""
    gpusim = pytest.importorskip("gpusim")
    missing = gpusim.available()
    if missing:
        pytest.skip(f"the simulated GPU needs an OpenCL device: {missing}")
    kernels = {}

    def get_kernel(spec):
        kernels[spec.stage] = gpusim.get_kernel(spec)
        return kernels[spec.stage]

    monkeypatch.setattr(conv_ops, "target_key", lambda device: GPU_TARGET)
    monkeypatch.setattr(conv_ops, "get_kernel", get_kernel)
    return kernels


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()


def _grad_output(tensors, conv, seed: int) -> torch.Tensor:
    x, offset, weight, _, mask = tensors
    geo = conv_ops.geometry(x, offset, weight, mask, conv["stride"], conv["padding"], conv["dilation"])
    return torch.randn(x.shape[0], weight.shape[0], *geo.output_size(x.shape[2], x.shape[3]),
                       generator=torch.Generator().manual_seed(seed))


def _run(tensors, conv, grad_output):
    """[output, grad_input, grad_offset, grad_weight(, grad_mask)] from dcn_tvm's forward and backward ops."""
    x, offset, weight, bias, mask = tensors
    output = dcn_tvm.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    grads = torch.ops.dcn_tvm.deform_conv2d_backward(grad_output, x, offset, mask, weight,
                                                     *(list(conv[k]) for k in ("stride", "padding", "dilation")))
    return [output, grads[0], grads[1], grads[3]] + ([grads[2]] if mask is not None else [])


def _reference(tensors, conv, grad_output, rounded: bool):
    """The float64 results of `_run`; `rounded`: with the weight and grad_output rounded to TF32."""
    x, offset, weight, bias, mask = [None if t is None else t.double() for t in tensors]
    if rounded:
        weight, grad_output = tf32(tensors[2]), tf32(grad_output)
    leaves = [t.requires_grad_() for t in (x, offset, weight, mask) if t is not None]
    output = deform_conv2d_torch(x, offset, weight, bias, mask=mask, **conv)
    grads = torch.autograd.grad(output, leaves, grad_output.double())
    return [output.detach(), *grads[:3]] + ([grads[3]] if mask is not None else [])


def test_precision_is_part_of_the_kernel_and_workload(precision):
    geo = conv_geometry((1, 16, 6, 6), (1, 18, 6, 6), (16, 16, 3, 3), None, 1, 1, 1, "float32")
    spec = KernelSpec("deform_conv2d", "forward", geo, (("n", 1), ("h", 6), ("w", 6)), GPU_TARGET, precision="high")
    assert spec.key.endswith("_precision_high_cuda-sm_90")
    text = "deform_conv2d:n=1,c=16,h=6,w=6,o=16,k=3,pad=1"
    assert str(Workload.parse(text + ",precision=highest")) == str(Workload.parse(text))
    high = Workload.parse(text + ",precision=high")
    assert str(high).endswith(",precision=high") and Workload.parse(str(high)) == high
    assert {task.spec.precision for task in high.tasks(GPU_TARGET)} == {"high"}
    assert {task.spec.precision for task in high.tasks("llvm-znver4")} == {"highest"}  # no TF32 on the CPU
    with pytest.raises(ValueError, match="precision"):
        Workload.parse(text + ",precision=low")
    precision("medium")
    assert conv_ops.precision(geo, GPU_TARGET) == "medium" and conv_ops.precision(geo, "llvm-znver4") == "highest"
    float64 = conv_geometry((1, 16, 6, 6), (1, 18, 6, 6), (16, 16, 3, 3), None, 1, 1, 1, "float64")
    assert conv_ops.precision(float64, GPU_TARGET) == "highest"
    precision("highest")
    assert conv_ops.precision(geo, GPU_TARGET) == "highest"


@pytest.fixture
def fp32_precision(precision):
    """torch's per-backend float32 precision switches for the test (each back to "none" after, then the
    legacy precision as before)."""
    yield
    for switch in (torch.backends, torch.backends.cudnn, torch.backends.cuda.matmul):
        switch.fp32_precision = "none"


def test_precision_follows_torch_per_backend_switch(fp32_precision):
    """torch.backends.cuda.matmul.fp32_precision and the switches it inherits from decide; after them
    torch.get_float32_matmul_precision() raises or names a stale state."""
    geo = conv_geometry((1, 16, 6, 6), (1, 18, 6, 6), (16, 16, 3, 3), None, 1, 1, 1, "float32")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert conv_ops.precision(geo, GPU_TARGET) == "high"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert conv_ops.precision(geo, GPU_TARGET) == "highest"
    torch.backends.cuda.matmul.fp32_precision = "none"
    for parent in (torch.backends, torch.backends.cudnn):
        parent.fp32_precision = "tf32"
        assert conv_ops.precision(geo, GPU_TARGET) == "high", parent
        parent.fp32_precision = "none"
    assert conv_ops.precision(geo, GPU_TARGET) == "highest"
    torch.set_float32_matmul_precision("medium")  # the legacy switch still names its kernels
    assert conv_ops.precision(geo, GPU_TARGET) == "medium"
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # the newer switch wins over the legacy state
    assert conv_ops.precision(geo, GPU_TARGET) == "highest"
    assert conv_ops.precision(geo, "llvm-znver4") == "highest"


@pytest.mark.parametrize("switch", ["legacy", "per_backend"])
@pytest.mark.parametrize("case", CASES, ids=["plain", "groups2_og2_mask"])
def test_tf32_forward_and_backward_on_the_simulated_gpu(case, switch, precision, fp32_precision, simulated_gpu):
    """At "high", or with torch.backends.cuda.matmul.fp32_precision "tf32" (`switch`): every GEMM stage calls
    the emulated TF32 MMA, and the results (samples between pixels, on borders and outside) match float64
    to TF32's precision."""
    if switch == "legacy":
        precision("high")
    else:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    tensors, conv = conv_inputs(case, seed=7)
    grad_output = _grad_output(tensors, conv, seed=8)
    results = _run(tensors, conv, grad_output)
    for stage in ("forward", "backward_data", "backward_weight"):
        assert simulated_gpu[stage].tf32_operations == {"mma_tf32", "mma_fill", "mma_store"}, stage
    for index, (ours, theirs) in enumerate(zip(results, _reference(tensors, conv, grad_output, False), strict=True)):
        assert ours.dtype == torch.float32 and relative_error(ours, theirs) <= TF32_TOLERANCE, index


def _exact_inputs(case):
    """Inputs whose sampled columns are exact in TF32: integer offsets (every sample on a pixel) and an
    input of TF32 values; the weight and grad_output are any float32, rounded by the kernels."""
    tensors, conv = conv_inputs(case, seed=9)
    x, offset, weight, bias, _ = tensors
    offset = torch.round(offset.clamp(-3, 3))
    tensors = [tf32(x).float(), offset, weight, bias, None]
    return tensors, conv, _grad_output(tensors, conv, seed=10)


@pytest.mark.parametrize("bug", [None, "unrounded_tf32", "transposed_fragments"])
def test_tf32_rounding_and_fragment_layout(bug, precision, simulated_gpu):
    """Output, input gradient and weight gradient equal the float64 products of the TF32-rounded operands
    to float32 accumulation; a kernel that skips the rounding (the MMA then truncates) or a fragment in
    another layout is off by far more, in every GEMM."""
    import gpusim

    precision("high")
    tensors, conv, grad_output = _exact_inputs(CASES[0])
    mutation = {} if bug is None else {bug: True}
    with gpusim.mutated(**mutation):
        output, grad_input, _, grad_weight = _run(tensors, conv, grad_output)
    expected = _reference(tensors, conv, grad_output, True)
    errors = [relative_error(ours, theirs) for ours, theirs in zip((output, grad_input, grad_weight),
                                                                    (expected[0], expected[1], expected[3]))]
    if bug is None:
        assert max(errors) <= ROUNDED_TOLERANCE, errors
    else:
        assert min(errors) > 5 * ROUNDED_TOLERANCE, errors


def test_tf32_kernels_assemble_for_sm_90():
    """The three GEMM kernels at "high" carry the PTX TF32 MMA and pass ptxas for sm_90 within its limits
    (the CUDA build runs it where nvcc is); at "highest" there is none."""
    geo = conv_geometry((1, 32, 5, 6), (1, 36, 5, 6), (32, 16, 3, 3), (1, 18, 5, 6), 1, 1, 1, "float32")
    for stage in ("forward", "backward_data", "backward_weight"):
        for precision_name, count in (("high", 1), ("highest", 0)):
            spec = KernelSpec("deform_conv2d", stage, geo, (("n", 1), ("h", 5), ("w", 6)), GPU_TARGET,
                              precision=precision_name)
            source = build(spec).mod.imports[0].inspect_source("cuda")
            assert source.count("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32") == count, spec.key


def test_tuning_space_holds_tf32_and_cuda_cores():
    """A precision=high workload's GEMM tasks have two CUDA design spaces where fragments fit: TF32 tensor
    cores first (the default), then CUDA cores; both replay random decisions and pass ptxas for sm_90."""
    from test_cuda_resources import _decided

    from dcn_tvm.kernels.build import compile_functions

    workload = Workload.parse("deform_conv2d:n=1,c=16,h=6,w=7,o=16,k=3,pad=1,precision=high")
    for task in workload.tasks(GPU_TARGET):
        functions = _decided(task, "random")
        assert len(functions) == 2, task.spec.key
        for function, count in zip(functions, (1, 0)):
            source = compile_functions({"main": function}, GPU_TARGET).mod.imports[0].inspect_source("cuda")
            assert source.count("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32") == count, task.spec.key


CLASH = """
import tvm_ffi
import dcn_tvm.schedules.deform_conv2d_cuda  # registers the TF32 intrinsics and the store layout
from dcn_tvm.schedules.mma_tf32 import STORE_LAYOUT, accumulator_lane
from dcn_tvm.tuning import tuner
assert tvm_ffi.get_global_func(STORE_LAYOUT, allow_missing=True) is not None
tuner._ms()  # MetaSchedule, then TVM's own tensor intrinsics, which register the same name
import tvm.s_tir.tensor_intrin.cuda
layout = tvm_ffi.get_global_func(STORE_LAYOUT)
assert all(tuple(int(v) for v in layout([i, j])) == accumulator_lane(i, j) for i in range(16) for j in range(16))
"""


@pytest.mark.slow  # a fresh interpreter importing TVM's tensor intrinsics: about 30 s
def test_tuning_after_a_tf32_schedule_in_the_same_process():
    """TVM's tensor intrinsics register the accumulator layout TF32's store needs under the same name: after
    the TF32 intrinsics, tuning (whose TuneContext imports TVM's) must not fail as a duplicate registration."""
    result = subprocess.run([sys.executable, "-c", CLASH], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
