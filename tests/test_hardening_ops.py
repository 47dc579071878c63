"""Hardening II (issue 22), the op side: the offset learning-rate multiplier through every copy of a module,
backward results that never alias scratch, scratch under inference mode, releasing and bounding scratch,
and the ranges of offset_lr_mult, spatial_scale and gamma."""

from __future__ import annotations

import copy
import gc
import io
import math
import pickle
import threading
import weakref

import numpy as np
import pytest
import torch

import dcn_tvm
from dcn_tvm.geometry.roi_pool import roi_pool_geometry
from dcn_tvm.kernels.workloads import Workload
from dcn_tvm.ops import scratch as scratch_module

ROIS = torch.tensor([[0, 0.5, 0.5, 9, 9], [1, 1, 2, 10, 8]])

#: name: (the module with an offset learning-rate multiplier, the name of its offset layer, its inputs)
MODULES = {
    "DeformConv2dPack": (lambda mult: dcn_tvm.DeformConv2dPack(2, 3, 3, padding=1, modulated=True,
                                                               offset_lr_mult=mult), "conv_offset", (2, 2, 5, 5)),
    "DeformRoIPool": (lambda mult: dcn_tvm.DeformRoIPool(4, 2, spatial_scale=0.5, sampling_ratio=1,
                                                         offset_lr_mult=mult), "offset_fc", (2, 4, 6, 6)),
    "DeformPSRoIPool": (lambda mult: dcn_tvm.DeformPSRoIPool(4, 1, 2, spatial_scale=0.5, sampling_ratio=1,
                                                             offset_lr_mult=mult), "offset_conv", (2, 4, 6, 6)),
}
MULTIPLIERS = {"DeformConv2dPack": 0.1, "DeformRoIPool": 0.01, "DeformPSRoIPool": 0.1}  # DeformRoIPool's default


def _saved_and_loaded(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _assigned(module, make, mult):
    fresh = make(mult)
    fresh.load_state_dict(module.state_dict(), assign=True)
    return fresh


COPIES = {
    "deepcopy": lambda module, make, mult: copy.deepcopy(module),
    "pickle": lambda module, make, mult: pickle.loads(pickle.dumps(module)),
    "torch.save": lambda module, make, mult: _saved_and_loaded(module),
    "load_state_dict(assign=True)": _assigned,
    "torch.compile": lambda module, make, mult: torch.compile(module, backend="aot_eager", fullgraph=True),
}


@pytest.mark.parametrize("route", COPIES)
@pytest.mark.parametrize("name", MODULES)
def test_offset_lr_mult_survives_every_copy(name, route):
    """Every copy's offset-layer gradients are lr_mult times the plain module's (the rest equal), and its
    output is bit for bit the plain module's."""
    make, offset_layer, shape = MODULES[name]
    mult, gen = MULTIPLIERS[name], torch.Generator().manual_seed(22)
    module = make(mult)
    with torch.no_grad():
        for parameter in module.parameters():  # offsets away from zero, so every parameter matters
            parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.3)
    plain = make(1.0)
    plain.load_state_dict(module.state_dict())
    copied = COPIES[route](module, make, mult)
    x = torch.randn(shape, generator=gen)
    inputs = (x,) if name == "DeformConv2dPack" else (x, ROIS)
    expected, out = plain(*inputs), copied(*inputs)
    if route != "torch.compile":
        assert torch.equal(out, expected)
    weight = torch.randn(expected.shape, generator=gen)
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    copied_parameters = dict((copied._orig_mod if route == "torch.compile" else copied).named_parameters())
    for key, parameter in plain.named_parameters():
        scale = mult if key.startswith(offset_layer + ".") else 1.0
        torch.testing.assert_close(copied_parameters[key].grad, scale * parameter.grad,
                                   msg=lambda message: f"{key}: {message}")


def _holds_scratch(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s storage overlaps a scratch buffer of this thread."""
    start = tensor.untyped_storage().data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    for buffer in scratch_module.held_buffers():
        low = buffer.untyped_storage().data_ptr()
        if start < low + buffer.untyped_storage().nbytes() and low < end:
            return True
    return False


def _conv_inputs(shape, dtype, gen):
    """(input, offset, weight, grad_output) of a 3x3 deform_conv2d with padding 1 (the channels-last graphs on
    the CPU) on `shape`."""
    n, c, h, w = shape
    x, offset = torch.randn(shape, dtype=dtype, generator=gen), torch.randn(n, 18, h, w, dtype=dtype, generator=gen)
    return x, offset, torch.randn(3, c, 3, 3, dtype=dtype, generator=gen), torch.randn(n, 3, h, w, dtype=dtype,
                                                                                       generator=gen)


def _conv_backward_op(grad_output, x, offset, weight):
    return torch.ops.dcn_tvm.deform_conv2d_backward(grad_output, x, offset, None, weight, [1, 1], [1, 1], [1, 1])


def _conv_backward(shape, dtype, gen):
    """A deform_conv2d backward call on `shape`, and the shape of its grad_output."""
    x, offset, weight, grad_output = _conv_inputs(shape, dtype, gen)
    return lambda grad: _conv_backward_op(grad, x, offset, weight), grad_output.shape


def _roi_backward(shape, dtype, gen):
    """A deform_roi_pool backward call with offsets (group_size 1: the channels-last graphs on the CPU)."""
    x, offset = torch.randn(shape, dtype=dtype, generator=gen), torch.randn(2, 2, 2, 2, dtype=dtype, generator=gen)
    rois = torch.tensor([[0, 0, 0, 1, 1], [shape[0] - 1, -1, 0, 2, 1]], dtype=dtype)
    return lambda grad_output: torch.ops.dcn_tvm.deform_roi_pool_backward(grad_output, x, rois, offset, 2, 1.0, 1,
                                                                          2, 1, 0.1), (2, shape[1], 2, 2)


@pytest.mark.parametrize("op,shape,dtype", [
    (_conv_backward, (2, 1, 1, 1), torch.float32),
    (_conv_backward, (2, 1, 1, 1), torch.float64),
    (_conv_backward, (2, 3, 1, 1), torch.float32),
    (_conv_backward, (1, 1, 3, 4), torch.float32),
    (_conv_backward, (2, 3, 4, 5), torch.float32),
    (_roi_backward, (1, 4, 1, 1), torch.float32),
    (_roi_backward, (2, 16, 1, 1), torch.float32),
    (_roi_backward, (2, 4, 3, 3), torch.float64),
], ids=["conv-2x1x1x1", "conv-2x1x1x1-float64", "conv-2x3x1x1", "conv-1x1x3x4", "conv-2x3x4x5", "roi-1x4x1x1",
        "roi-2x16x1x1", "roi-2x4x3x3-float64"])
def test_backward_results_never_alias_scratch(op, shape, dtype):
    """A later backward call must not change what an earlier one returned (as x.grad accumulates it)."""
    gen = torch.Generator().manual_seed(2)
    backward, output_shape = op(shape, dtype, gen)
    first = backward(torch.randn(output_shape, dtype=dtype, generator=gen))
    kept = [t.clone() for t in first]
    second = backward(torch.randn(output_shape, dtype=dtype, generator=gen))
    for index, (before, now) in enumerate(zip(kept, first)):
        assert torch.equal(now, before), f"result {index} changed by the next call"
    for index, result in enumerate(first + second):
        assert not _holds_scratch(result), f"result {index % len(first)} lies in a scratch buffer"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_input_gradient_accumulates_over_two_backward_passes(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 1, 1, dtype=dtype, generator=gen, requires_grad=True)
    offset, weight = torch.randn(2, 18, 1, 1, dtype=dtype, generator=gen), torch.randn(3, 1, 3, 3, dtype=dtype)
    grads = [torch.randn(2, 3, 1, 1, dtype=dtype, generator=gen) for _ in range(2)]
    separate = [torch.autograd.grad(dcn_tvm.deform_conv2d(x, offset, weight, padding=1), x, g)[0].clone()
                for g in grads]
    for g in grads:
        dcn_tvm.deform_conv2d(x, offset, weight, padding=1).backward(g)
    torch.testing.assert_close(x.grad, separate[0] + separate[1])


def _in_a_new_thread(work):
    """Run `work` in a fresh thread (which holds no scratch yet) and re-raise what it raised."""
    failures = []

    def run():
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            failures.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failures:
        raise failures[0]


def test_backward_under_inference_mode_leaves_scratch_usable():
    """Scratch first allocated (then grown) by a backward under inference mode still serves ordinary
    forward and backward passes of the same thread."""
    gen = torch.Generator().manual_seed(8)
    cases = [_conv_inputs(shape, torch.float32, gen) for shape in ((1, 1, 3, 4), (2, 3, 4, 5))]
    expected = [_conv_backward_op(grad, x, offset, weight)[0].clone() for x, offset, weight, grad in cases]

    def work():
        for (x, offset, weight, grad), grad_input in zip(cases, expected):
            with torch.inference_mode():
                _conv_backward_op(grad, x, offset, weight)
            leaf = x.clone().requires_grad_()
            dcn_tvm.deform_conv2d(leaf, offset, weight, padding=1).backward(grad)
            assert torch.equal(leaf.grad, grad_input)

    _in_a_new_thread(work)


def _held_bytes() -> int:
    return sum(b.numel() * b.element_size() for b in scratch_module.held_buffers())


def test_release_scratch_frees_every_thread_buffers():
    gen = torch.Generator().manual_seed(13)
    backward, output_shape = _conv_backward((2, 3, 4, 5), torch.float32, gen)
    grad = torch.randn(output_shape, generator=gen)
    backward(grad)
    done, held = threading.Event(), threading.Event()
    worker_buffers = []

    def worker():  # a thread that stays alive, holding its scratch
        try:
            backward(grad)
            worker_buffers.extend(weakref.ref(b) for b in scratch_module.held_buffers())
        finally:
            held.set()
        done.wait(60)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        held.wait(60)
        buffers = [weakref.ref(b) for b in scratch_module.held_buffers()] + worker_buffers
        assert len(buffers) >= 8 and _held_bytes() > 0
        freed = dcn_tvm.release_scratch()
        assert freed >= 2 * _held_bytes() + 1 and not scratch_module.held_buffers()
        gc.collect()
        assert all(ref() is None for ref in buffers)
        assert dcn_tvm.release_scratch() == 0
    finally:
        done.set()
        thread.join()
    result = backward(grad)  # scratch is allocated again
    assert _held_bytes() > 0 and torch.isfinite(result[0]).all()


def test_scratch_is_bounded_per_thread(monkeypatch):
    dcn_tvm.release_scratch()
    monkeypatch.setenv("DCN_TVM_SCRATCH_MIB", "1")
    mib = 1 << 20
    big = scratch_module.scratch("grad_columns", (mib // 4 + 1,), torch.float32, torch.device("cpu"))
    assert big.numel() == mib // 4 + 1 and _held_bytes() == 0  # over the bound: a plain allocation
    half = scratch_module.scratch("grad_columns", (mib // 8,), torch.float32, torch.device("cpu"))
    assert _held_bytes() == mib // 2 and _holds_scratch(half)
    scratch_module.scratch("weights", (mib // 8 + 1,), torch.float32, torch.device("cpu"))
    assert _held_bytes() == mib // 2  # together over the bound
    monkeypatch.setenv("DCN_TVM_SCRATCH_MIB", "0")
    scratch_module.scratch("weights", (4,), torch.float32, torch.device("cpu"))
    assert _held_bytes() == mib // 2
    for bad in ("-1", "lots", "1.5"):
        monkeypatch.setenv("DCN_TVM_SCRATCH_MIB", bad)
        with pytest.raises(ValueError, match=f"DCN_TVM_SCRATCH_MIB='{bad}' is not"):
            scratch_module.scratch("weights", (4,), torch.float32, torch.device("cpu"))
    dcn_tvm.release_scratch()


OFFSET_LR_MODULES = {
    "DeformConv2dPack": lambda mult: dcn_tvm.DeformConv2dPack(2, 2, 3, offset_lr_mult=mult),
    "DeformRoIPool": lambda mult: dcn_tvm.DeformRoIPool(2, 2, spatial_scale=0.5, offset_lr_mult=mult),
    "DeformPSRoIPool": lambda mult: dcn_tvm.DeformPSRoIPool(2, 1, 2, spatial_scale=0.5, offset_lr_mult=mult),
}


@pytest.mark.parametrize("name", OFFSET_LR_MODULES)
def test_offset_lr_mult_must_be_a_finite_non_negative_number(name):
    make = OFFSET_LR_MODULES[name]
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=f"offset_lr_mult must be finite, got {value!r}"):
            make(value)
    with pytest.raises(ValueError, match=r"offset_lr_mult must be >= 0, got -0.1"):
        make(-0.1)
    for value in ("0.1", True, None, torch.tensor(0.1)):
        with pytest.raises(TypeError, match=r"offset_lr_mult must be a real number, got"):
            make(value)
    for value in (0, 0.0, 2, np.float32(0.5)):
        assert make(value).offset_lr_mult == float(value)


FLOAT32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("changed,message", [
    (dict(spatial_scale=1e39), r"spatial_scale must be in \[1.1754943508222875e-38, 3.4028234663852886e\+38\] "
                               r"\(float32's normal range, the kernel's float type\), got 1e\+39"),
    (dict(spatial_scale=FLOAT32_MAX * (1 + 2**-30)), r"spatial_scale must be in .*, got 3.40282346\d*e\+38"),
    (dict(spatial_scale=1e-39), r"spatial_scale must be in \[1.1754943508222875e-38, .*, got 1e-39"),
    (dict(gamma=1e39), r"gamma must be within ±3.4028234663852886e\+38 \(float32's largest, the kernel's float "
                       r"type\), got 1e\+39"),
    (dict(gamma=-1e39), r"gamma must be within ±3.4028234663852886e\+38 .*, got -1e\+39"),
    (dict(sampling_ratio=2**31), r"sampling_ratio must be at most 2147483647 \(int32, the kernel's loop index\), "
                                 r"got 2147483648"),
], ids=["scale-1e39", "scale-just-over", "scale-subnormal", "gamma-1e39", "gamma--1e39", "sampling_ratio-2^31"])
def test_kernel_constants_must_fit_their_types(dtype, changed, message):
    """spatial_scale, gamma and sampling_ratio become constants of the kernels: checked against their types."""
    arguments = dict(output_size=2, spatial_scale=0.5, group_size=1, part_size=None, sampling_ratio=1, gamma=0.1)
    with pytest.raises(ValueError, match=message):
        roi_pool_geometry((1, 4, 6, 6), 2, (2, 2, 2, 2), **{**arguments, **changed}, dtype=dtype)
    if "sampling_ratio" not in changed:  # float64 kernels take them
        assert roi_pool_geometry((1, 4, 6, 6), 2, (2, 2, 2, 2), **{**arguments, **changed}, dtype="float64")
    fine = dict(spatial_scale=FLOAT32_MAX, gamma=-FLOAT32_MAX, sampling_ratio=2**31 - 1)
    assert roi_pool_geometry((1, 4, 6, 6), 2, (2, 2, 2, 2), **{**arguments, **fine}, dtype=dtype)
    assert roi_pool_geometry((1, 4, 6, 6), 2, (2, 2, 2, 2), **{**arguments, "spatial_scale": 2**-126}, dtype=dtype)


def test_float_range_checks_reach_workloads_and_the_functional():
    text = ("deform_roi_pool:r=2,n=1,c=4,h=6,w=6,k=2,group_size=1,sampling_ratio=1,classes=1,spatial_scale=0.5,"
            "gamma=1e39,dtype=float32")
    with pytest.raises(ValueError, match=r"gamma must be within ±3.4028234663852886e\+38"):
        Workload.parse(text)
    with pytest.raises(ValueError, match=r"spatial_scale must be in \[1.1754943508222875e-38"):
        dcn_tvm.deform_roi_pool(torch.randn(1, 4, 6, 6), ROIS[:1], output_size=2, spatial_scale=1e39)
    with pytest.raises(ValueError, match=r"gamma must be within ±3.4028234663852886e\+38"):
        dcn_tvm.DeformRoIPool(4, 2, spatial_scale=0.5, gamma=-1e39)(torch.randn(1, 4, 6, 6), ROIS[:1])
