"""torch.use_deterministic_algorithms(True): a CUDA backward without floating-point atomics, and the CPU's
results bitwise repeatable across runs and thread counts.

On the GPU only the input-gradient scatters add atomically (every sample its own thread); under the flag
they are the deterministic scatters (one thread per input plane, or per (image, head/group, channel) for
ms_deform_attn and DCNv3/v4, adding in a fixed order), named by `_deterministic` in their kernel key. On the CPU every kernel already sums in a fixed order that does not
depend on the thread count (a thread owns whole output elements and planes): the flag changes nothing.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from test_dcnv3 import CASES as DCNV3_CASES
from test_dcnv3 import arguments as dcnv3_arguments
from test_dcnv3 import make_inputs as dcnv3_inputs
from test_deform_conv2d import make_inputs as conv_inputs
from test_deform_roi_pool import make_inputs as roi_inputs
from test_ms_deform_attn import make_inputs as msda_inputs

import dcn_tvm
from dcn_tvm.geometry.conv import conv_geometry
from dcn_tvm.geometry.roi_pool import roi_pool_geometry
from dcn_tvm.kernels.build import build
from dcn_tvm.kernels.workloads import Workload
from dcn_tvm.ops import dcnv3 as dcnv3_ops
from dcn_tvm.ops import deform_conv2d as conv_ops
from dcn_tvm.ops import deform_roi_pool as roi_ops
from dcn_tvm.ops import ms_deform_attn as msda_ops

GPU_TARGET = "cuda-sm_90"
# Offset groups and a mask; a deformable PS RoI pooling with overlapping RoIs and offset classes.
CONV_CASE = (2, 6, 7, 8, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, 3, True)
ROI_CASE = (2, 6, 8, 10, 3, 3, 3, 3, 2, 0.25)


def _conv_gradients(case, dtype=torch.float32):
    """Every gradient of deform_conv2d (and its output) for `case`, through autograd."""
    (x, offset, weight, bias, mask), conv = conv_inputs(case, dtype=dtype, seed=3)
    leaves = [t.requires_grad_() for t in (x, offset, weight, bias, mask) if t is not None]
    out = dcn_tvm.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=dtype)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


def _roi_gradients(case, dtype=torch.float32):
    x, rois, offset, kwargs = roi_inputs(case, dtype=dtype, seed=5, rois_count=9)
    leaves = [t.requires_grad_() for t in (x, offset) if t is not None]
    out = dcn_tvm.deform_roi_pool(x, rois, offset, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=dtype)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


def _msda_gradients(dtype=torch.float32):
    """ms_deform_attn's output and gradients of value, locations and weights (borders, NaN and inf included)."""
    value, shapes, starts, locations, weights = msda_inputs(dtype=dtype, seed=7, non_finite=True)
    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    out = dcn_tvm.ms_deform_attn(value, shapes, starts, locations, weights)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(8), dtype=dtype)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


def _dcnv3_gradients(case=DCNV3_CASES[1], dtype=torch.float32):
    """dcnv3_core's output and gradients of input, offset and mask (remove_center, strides, dilation)."""
    leaves = [t.requires_grad_() for t in dcnv3_inputs(case, dtype, seed=9)]
    out = dcn_tvm.dcnv3_core(*leaves, *dcnv3_arguments(case))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(10), dtype=dtype)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


def _scatter_specs(dtype: str, deterministic: bool):
    """A scatter of each operator for sm_90."""
    conv = conv_geometry((1, 6, 7, 8), (1, 54, 7, 8), (4, 6, 3, 3), (1, 27, 7, 8), 1, 1, 1, dtype)
    roi = roi_pool_geometry((1, 54, 8, 10), 9, (9, 6, 3, 3), 3, 0.25, 3, 3, 2, 0.1, dtype)
    msda = Workload.parse(f"ms_deform_attn:n=1,q=6,levels=5x7+3x4,heads=2,head_dim=4,points=3,dtype={dtype}")
    *_, dcnv3 = Workload.parse(f"dcnv3:n=1,h=5,w=6,group=2,group_channels=4,dtype={dtype}").tasks(GPU_TARGET)
    return [conv_ops.scatter_spec(conv, GPU_TARGET, deterministic),
            roi_ops.scatter_spec(roi, GPU_TARGET, deterministic),
            msda_ops.scatter_spec(msda.geometry(), GPU_TARGET, deterministic),
            dataclasses.replace(dcnv3.spec, deterministic=deterministic)]


def _cuda_source(spec) -> str:
    return build(spec).mod.imports[0].inspect_source("cuda")


def test_deterministic_scatters_are_named_and_cpu_has_none():
    for spec in _scatter_specs("float32", True):
        assert spec.key.endswith("_deterministic_cuda-sm_90"), spec.key
    plain = _scatter_specs("float32", False)
    assert not any(spec.deterministic or "deterministic" in spec.key for spec in plain)
    conv = conv_geometry((1, 6, 7, 8), (1, 54, 7, 8), (4, 6, 3, 3), None, 1, 1, 1, "float32")
    assert not conv_ops.scatter_spec(conv, "llvm-znver4", True).deterministic  # CPU adds are never atomic
    msda = Workload.parse("ms_deform_attn:n=1,q=6,levels=5x7,heads=2,head_dim=4,points=3").geometry()
    assert not msda_ops.scatter_spec(msda, "llvm-znver4", True).deterministic
    x, offset, mask = dcnv3_inputs(DCNV3_CASES[0])
    dcnv3 = dcnv3_ops.geometry(x, [offset, mask], dcnv3_arguments(DCNV3_CASES[0]), packed=False)
    try:
        torch.use_deterministic_algorithms(True)
        assert not dcnv3_ops._spec("scatter", dcnv3, x).deterministic
    finally:
        torch.use_deterministic_algorithms(False)
    text = "deform_conv2d:n=1,c=6,h=7,w=8,o=4,k=3,pad=1,deterministic=1"
    assert str(Workload.parse(text)).endswith(",deterministic=1")
    assert "deterministic" not in str(Workload.parse(text[:-1] + "0"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_deterministic_cuda_scatters_have_no_atomics(dtype):
    """The generated CUDA source of the deterministic scatters has no atomic instruction (the atomic
    ones do, so the check can fail); ptxas accepts both for sm_90 (the build runs it where nvcc is)."""
    for spec in _scatter_specs(dtype, False):
        assert "atomicAdd" in _cuda_source(spec), spec.key
    for spec in _scatter_specs(dtype, True):
        assert "atomic" not in _cuda_source(spec).lower(), spec.key


def test_other_cuda_backward_kernels_have_no_atomics():
    """The backward's other kernels (column and weight gradients, RoI backward, the attention's and DCNv4's
    sampling gradients) never add atomically, on CUDA cores or tensor cores, so the deterministic scatter
    makes the whole CUDA backward atomic-free."""
    workloads = ["deform_conv2d:n=1,c=6,h=7,w=8,o=4,k=3,pad=1,offset_groups=3,mask=1",
                 "deform_conv2d:n=1,c=16,h=6,w=6,o=16,k=3,pad=1,dtype=float16",
                 "deform_roi_pool:r=9,n=1,c=54,h=8,w=10,k=3,group_size=3,part_size=3,sampling_ratio=2,classes=3,"
                 "spatial_scale=0.25",
                 "ms_deform_attn:n=1,q=6,levels=5x7+3x4,heads=2,head_dim=4,points=3",
                 "dcnv3:n=1,h=5,w=6,group=2,group_channels=4,packed=1"]
    for text in workloads:
        for task in Workload.parse(text).tasks(GPU_TARGET):
            if task.spec.stage not in ("forward", "scatter"):
                assert "atomic" not in _cuda_source(task.spec).lower(), task.spec.key


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_backward_on_the_simulated_gpu(deterministic, monkeypatch):
    """The deterministic kernels on the simulated GPU: the same gradients as the atomic ones (float
    tolerance: another summation order), bitwise equal from run to run."""
    gpusim = pytest.importorskip("gpusim")
    missing = gpusim.available()
    if missing:
        pytest.skip(f"the simulated GPU needs an OpenCL device: {missing}")
    asked = []

    def get_kernel(spec):
        asked.append(spec)
        return gpusim.get_kernel(spec)

    for module in (conv_ops, roi_ops, msda_ops, dcnv3_ops):
        monkeypatch.setattr(module, "target_key", lambda device: GPU_TARGET)
        monkeypatch.setattr(module, "get_kernel", get_kernel)
    for gradients in (lambda: _conv_gradients(CONV_CASE), lambda: _roi_gradients(ROI_CASE), _msda_gradients,
                      _dcnv3_gradients):
        first, second = gradients(), gradients()
        torch.use_deterministic_algorithms(False)
        atomic = gradients()
        torch.use_deterministic_algorithms(True)
        for ours, again, theirs in zip(first, second, atomic, strict=True):
            assert torch.equal(ours, again)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    scatters = [spec for spec in asked if spec.stage == "scatter"]
    assert sum(spec.deterministic for spec in scatters) == 8 and len(scatters) == 12


_REPEAT_SCRIPT = """
import hashlib, sys, torch, tvm_ffi
sys.path.insert(0, {tests!r})
import test_deterministic as t
digest = hashlib.sha256()
for case in t.CPU_CONV_CASES:
    for tensor in t._conv_gradients(case):
        digest.update(tensor.numpy().tobytes())
for case in t.CPU_ROI_CASES:
    for tensor in t._roi_gradients(case):
        digest.update(tensor.numpy().tobytes())
for tensor in t._msda_gradients() + t._dcnv3_gradients():
    digest.update(tensor.numpy().tobytes())
print(tvm_ffi.get_global_func("runtime.NumThreads")(), digest.hexdigest())
"""
# The channels-last graphs (CONV_CASE) and the channels-first ones (a stride over the kernel: the CPU rules
# pick by shape, dcn_tvm.geometry.conv.resolve_layout); RoI pooling channels-last (its scatter's chunks
# in parallel).
CPU_CONV_CASES = [CONV_CASE, (2, 8, 9, 9, 8, (1, 2), (2, 2), (0, 1), (1, 1), 2, 2, True)]
CPU_ROI_CASES = [(2, 16, 10, 8, 3, 1, 2, 2, 2, 0.5)]


def _cpu_digest(threads: int) -> str:
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-c", _REPEAT_SCRIPT.format(tests=tests)], env=env, capture_output=True,
                            text=True, timeout=600, check=True)
    return " ".join(result.stdout.split()[-2:])


def test_cpu_results_are_bitwise_repeatable_across_runs_and_thread_counts():
    """Forward and every gradient (float32) of the four operators: the same bytes from two 2-thread processes
    and a 1-thread one (each reports the threads of TVM's pool). The CPU kernels need no deterministic variant."""
    two = _cpu_digest(2)
    assert two.startswith("2 ") and _cpu_digest(2) == two
    assert _cpu_digest(1) == "1 " + two.split()[1]
