"""The CUDA context an op runs in, as torch's own ops: the caller's current stream, CUDA graph capture and
replay, and the caller's current device left as it was. Marked cuda (skipped without a GPU); the inputs
are cases of the ops' own tests whose kernels the GPU run's prebuilt package holds (benchmarks/gpu_run.py:
its conv and RoI cuda cases, its attention and DCNv3/v4 checks)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import test_dcnv3
import test_deform_conv2d
import test_deform_roi_pool
import test_ms_deform_attn
import torch
from reference_dcnv3 import pack_offset_mask

import dcn_tvm


@dataclass
class Call:
    """An op call: fn(*tensors) -> Tensor, the indices of the tensors it differentiates, a gradient, and
    the indices of the tensors that stay on the CPU whatever the device."""

    fn: object
    tensors: list
    differentiable: tuple
    grad: torch.Tensor
    host: tuple = ()

    def to(self, device) -> Call:
        tensors = [t if i in self.host else t.to(device) for i, t in enumerate(self.tensors)]
        return Call(self.fn, tensors, self.differentiable, self.grad.to(device), self.host)


def gradient(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def conv_call(seed: int = 0) -> Call:
    (x, offset, weight, bias, mask), conv = test_deform_conv2d.make_inputs(test_deform_conv2d.CASES[4], seed=seed)
    out_shape = (x.shape[0], weight.shape[0], *offset.shape[2:])
    return Call(lambda x, o, w, b, m: dcn_tvm.deform_conv2d(x, o, w, b, mask=m, **conv),
                [x, offset, weight, bias, mask], (0, 1, 2, 3, 4), gradient(out_shape, seed))


def roi_call(seed: int = 0) -> Call:
    x, rois, offset, kwargs = test_deform_roi_pool.make_inputs(test_deform_roi_pool.CASES[3], seed=seed)
    out_shape = (rois.shape[0], x.shape[1] // kwargs["group_size"] ** 2, kwargs["output_size"], kwargs["output_size"])
    return Call(lambda x, r, o: dcn_tvm.deform_roi_pool(x, r, o, **kwargs), [x, rois, offset], (0, 2),
                gradient(out_shape, seed))


def attention_call(seed: int = 0, host: tuple = (1, 2)) -> Call:
    """ms_deform_attn, its level shapes and starts on the CPU (read without a device sync)."""
    value, shapes, starts, locations, weights = test_ms_deform_attn.make_inputs(dtype=torch.float32, seed=seed)
    n, queries, heads = locations.shape[:3]
    return Call(dcn_tvm.ms_deform_attn, [value, shapes, starts, locations, weights], (0, 3, 4),
                gradient((n, queries, heads * value.shape[3]), seed), host)


def dcnv3_call(seed: int = 0, packed: bool = False) -> Call:
    case = test_dcnv3.CASES[1]
    x, offset, mask = test_dcnv3.make_inputs(case, seed=seed)
    out_shape = (x.shape[0], *test_dcnv3.output_size(case), x.shape[3])
    if packed:
        return Call(lambda x, packed: dcn_tvm.dcnv4_core(x, packed, *test_dcnv3.arguments(case)),
                    [x, pack_offset_mask(offset, mask, case[3])], (0, 1), gradient(out_shape, seed))
    return Call(lambda x, o, m: dcn_tvm.dcnv3_core(x, o, m, *test_dcnv3.arguments(case)), [x, offset, mask],
                (0, 1, 2), gradient(out_shape, seed))


CALLS = {"deform_conv2d": conv_call, "deform_roi_pool": roi_call, "ms_deform_attn": attention_call,
         "dcnv3_core": dcnv3_call, "dcnv4_core": lambda seed=0: dcnv3_call(seed, packed=True)}


def results(call: Call) -> list:
    """[output, the gradient of every differentiable tensor] of the call, on copies of its tensors made on
    the current stream."""
    leaves = [t.detach().clone().requires_grad_(i in call.differentiable) for i, t in enumerate(call.tensors)]
    out = call.fn(*leaves)
    return [out, *torch.autograd.grad(out, [leaves[i] for i in call.differentiable], call.grad)]


def assert_close(actual: list, expected: list, tolerance: float = 1e-5) -> None:
    """Each tensor within `tolerance` of its expected one, relatively (the scatters' atomic adds may sum
    in another order)."""
    for a, b in zip(actual, expected, strict=True):
        assert a.shape == b.shape and a.device == b.device
        assert test_deform_conv2d.relative_error(a, b) <= tolerance


@pytest.mark.cuda
@pytest.mark.parametrize("op", CALLS)
def test_ops_run_on_the_callers_stream(op):
    """The inputs are written on a side stream after a ~50 ms spin: a kernel launched on any other stream
    would read them unwritten."""
    call = CALLS[op]().to("cuda")
    expected = results(call)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        late = results(call)
    torch.cuda.current_stream().wait_stream(side)
    assert_close(late, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("op", CALLS)
def test_ops_capture_into_a_cuda_graph_and_replay_on_new_inputs(op):
    """Forward and backward captured once (the RoI op checks no batch index then: that would sync), then
    replayed on other inputs copied into the captured ones: as the same calls run eagerly."""
    call = CALLS[op]().to("cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (load the kernels) outside the capture, as torch's recipe does
        results(call)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = results(call)
    fresh = CALLS[op](seed=1).to("cuda")
    for static, new in zip(call.tensors + [call.grad], fresh.tensors + [fresh.grad], strict=True):
        static.copy_(new)
    graph.replay()
    assert_close(captured, results(fresh))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("op", CALLS)
def test_ops_on_another_gpu_leave_the_current_device_as_it_was(op):
    """A TVM kernel makes its tensors' device current (cudaSetDevice): the op restores the caller's."""
    call = CALLS[op]()
    with torch.cuda.device(0):
        on_second = results(call.to("cuda:1"))
        assert torch.cuda.current_device() == 0
    assert all(t.device == torch.device("cuda:1") for t in on_second)
    assert_close([t.cpu() for t in on_second], results(call), tolerance=1e-4)


@pytest.mark.cuda
def test_attention_refuses_capture_with_level_shapes_on_the_gpu():
    call = attention_call(host=()).to("cuda")
    results(call)  # outside a capture they are read with a device sync
    with pytest.raises(RuntimeError, match="pass them as CPU tensors"), torch.cuda.graph(torch.cuda.CUDAGraph()):
        results(call)
