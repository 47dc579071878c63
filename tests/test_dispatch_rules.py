"""The ops under torch.autocast (float32 inside, the input's dtype out, as torchvision) and under
forward-mode AD (a clear NotImplementedError, never a silently dropped tangent)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

import dcn_tvm

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _conv_arguments(dtype: torch.dtype, low: torch.dtype):
    """A DCNv2 call whose offsets and mask come in `low` precision, as an autocast offset conv gives them."""
    x = torch.randn(2, 4, 7, 6, dtype=dtype)
    offset = (torch.randn(2, 18, 7, 6) * 2).to(low)
    mask = torch.rand(2, 9, 7, 6).to(low)
    return x, offset, torch.randn(5, 4, 3, 3), torch.randn(5), mask


@pytest.mark.parametrize("low", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("input_is_low", [False, True], ids=["float32_input", "low_input"])
def test_conv_under_autocast_runs_in_float32_and_returns_the_input_dtype(low, input_is_low):
    x, offset, weight, bias, mask = _conv_arguments(low if input_is_low else torch.float32, low)
    leaves = [t.clone().requires_grad_() for t in (x, offset, weight, bias, mask)]
    with torch.autocast("cpu", dtype=low):
        out = dcn_tvm.deform_conv2d(*leaves[:4], padding=1, mask=leaves[4])
    float32 = [t.float().requires_grad_() for t in (x, offset, weight, bias, mask)]
    expected = dcn_tvm.deform_conv2d(*float32[:4], padding=1, mask=float32[4]).to(x.dtype)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for leaf, reference in zip(leaves, float32):
        assert leaf.grad.dtype == leaf.dtype
        torch.testing.assert_close(leaf.grad, reference.grad.to(leaf.dtype), rtol=0, atol=0)


def test_pack_module_under_autocast_trains():
    """The case that raised TypeError (bfloat16 offsets from the offset conv, float32 input)."""
    layer = dcn_tvm.DeformConv2dPack(4, 6, 3, padding=1, modulated=True)
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float32
    out.square().sum().backward()
    assert layer.conv_offset.weight.grad.abs().sum() > 0 and layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("low", AUTOCAST_DTYPES, ids=str)
def test_roi_pool_under_autocast_runs_in_float32(low):
    x = torch.randn(2, 2 * 9, 10, 12)
    rois = torch.tensor([[0, 1.5, 0.5, 8.0, 9.0], [1, 0.0, 2.0, 11.0, 6.5]])
    offset = torch.randn(2, 4, 3, 3).to(low)
    pool = dict(output_size=3, group_size=3, sampling_ratio=2)
    with torch.autocast("cpu", dtype=low):
        out = dcn_tvm.deform_roi_pool(x, rois.to(low), offset, **pool)
        head = dcn_tvm.DeformPSRoIPool(8, 2, 3, spatial_scale=0.5)(x[:, :8], rois)
    assert out.dtype == torch.float32
    assert head.dtype == low  # the score maps' dtype: autocast runs the score conv in low precision
    torch.testing.assert_close(out, dcn_tvm.deform_roi_pool(x, rois.to(low).float(), offset.float(), **pool),
                               rtol=0, atol=0)


def test_float64_under_autocast_stays_float64():
    x, offset, weight, bias, mask = (t.double() for t in _conv_arguments(torch.float64, torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dcn_tvm.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
        with pytest.raises(TypeError, match="offset must have the input's dtype torch.float64, got torch.bfloat16"):
            dcn_tvm.deform_conv2d(x, offset.bfloat16(), weight, bias, padding=1, mask=mask)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, dcn_tvm.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask),
                               rtol=0, atol=0)


@pytest.mark.parametrize("op", ["deform_conv2d", "deform_roi_pool"])
def test_autocast_is_registered_for_cuda_too(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dcn_tvm::{op}", "AutocastCUDA")


def _conv(x, offset, weight):
    return dcn_tvm.deform_conv2d(x, offset, weight, padding=1)


def _roi_pool(x, offset, _):
    return dcn_tvm.deform_roi_pool(x, torch.tensor([[0, 0.5, 1.0, 5.0, 4.0]], dtype=x.dtype), offset,
                                   output_size=2, sampling_ratio=2)


CALLS = {
    "conv": (_conv, lambda: (torch.randn(1, 2, 5, 5), torch.randn(1, 18, 5, 5), torch.randn(3, 2, 3, 3))),
    "roi_pool": (_roi_pool, lambda: (torch.randn(1, 3, 6, 6), torch.randn(1, 2, 2, 2), None)),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("argument", [0, 1], ids=["input_tangent", "offset_tangent"])
def test_forward_mode_ad_raises(call, argument):
    fn, make = CALLS[call]
    args = list(make())
    with forward_ad.dual_level():
        dual = list(args)
        dual[argument] = forward_ad.make_dual(args[argument], torch.ones_like(args[argument]))
        with pytest.raises(NotImplementedError, match="has no forward-mode derivative"):
            fn(*dual)
    with pytest.raises(NotImplementedError, match="has no forward-mode derivative .*torch.func.jvp"):
        torch.func.jvp(lambda a: fn(*args[:argument], a, *args[argument + 1:]), (args[argument],),
                       (torch.ones_like(args[argument]),))


@pytest.mark.parametrize("call", CALLS)
def test_forward_mode_through_the_backward_ops_raises(call):
    """fwd-over-rev (a Hessian-vector product) would push tangents into the backward ops."""
    fn, make = CALLS[call]
    x, offset, weight = make()
    x.requires_grad_()
    out = fn(x, offset, weight)
    with forward_ad.dual_level():
        grad_output = forward_ad.make_dual(torch.ones_like(out), torch.ones_like(out))
        with pytest.raises(NotImplementedError, match="_backward has no forward-mode derivative"):
            torch.autograd.grad(out, x, grad_output)
