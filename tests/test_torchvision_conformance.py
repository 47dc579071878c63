"""dcn_tvm against the real torchvision: forward and every gradient, and the modules' interface."""

from __future__ import annotations

import inspect

import pytest
import torch
from test_deform_conv2d import CASES, make_inputs, relative_error

import dcn_tvm

torchvision = pytest.importorskip("torchvision", reason="the conformance tests compare with torchvision")

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def _on_minus_one(offset, case, seed):
    """Put a sixteenth of the samples exactly on y = -1 or x = -1 (zero value, nonzero derivative)."""
    _, _, _, _, _, (kh, kw), stride, padding, dilation, _, og, _ = case
    n, _, oh, ow = offset.shape
    gen = torch.Generator().manual_seed(seed)
    base_y = (torch.arange(oh) * stride[0] - padding[0]).view(1, oh, 1) + (torch.arange(kh) * dilation[0]).view(kh, 1, 1)
    base_x = (torch.arange(ow) * stride[1] - padding[1]).view(1, 1, ow) + (torch.arange(kw) * dilation[1]).view(kw, 1, 1)
    view = offset.view(n, og, kh, kw, 2, oh, ow)
    pick = torch.rand(n, og, kh, kw, 2, oh, ow, generator=gen) < 1 / 16
    on_row = (-1.0 - base_y).view(1, 1, kh, 1, oh, 1).expand(n, og, kh, kw, oh, ow)
    on_col = (-1.0 - base_x).view(1, 1, 1, kw, 1, ow).expand(n, og, kh, kw, oh, ow)
    view[:, :, :, :, 0][pick[:, :, :, :, 0]] = on_row[pick[:, :, :, :, 0]].to(offset.dtype)
    view[:, :, :, :, 1][pick[:, :, :, :, 1]] = on_col[pick[:, :, :, :, 1]].to(offset.dtype)
    return offset


def _compare(ours_fn, theirs_fn, leaves, dtype, grad_seed=0):
    """Forward and the gradient of every leaf, ours against torchvision's."""
    ours, theirs = ours_fn(*leaves), theirs_fn(*leaves)
    assert relative_error(ours, theirs) <= TOLERANCE[dtype], "forward"
    grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=dtype)
    ours_grads = torch.autograd.grad(ours, leaves, grad)
    theirs_grads = torch.autograd.grad(theirs, leaves, grad)
    for index, (a, b) in enumerate(zip(ours_grads, theirs_grads)):
        assert relative_error(a, b) <= TOLERANCE[dtype], f"gradient of argument {index}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}c{c[1]}h{c[2]}w{c[3]}o{c[4]}g{c[9]}og{c[10]}m{int(c[11])}")
def test_forward_and_gradients_match_torchvision(case, dtype):
    """Between pixels, on pixel rows, in (-1, 0), exactly on -1 and far outside (make_inputs)."""
    (x, offset, weight, bias, mask), conv = make_inputs(case, dtype=dtype, seed=1)
    offset = _on_minus_one(offset, case, seed=2)
    leaves = [t.requires_grad_() for t in (x, offset, weight, bias, mask) if t is not None]

    def call(function):
        def run(x, offset, weight, bias, mask=None):
            return function(x, offset, weight, bias, mask=mask, **conv)
        return run

    _compare(call(dcn_tvm.deform_conv2d), call(torchvision.ops.deform_conv2d), leaves, dtype)


def test_without_bias_matches_torchvision():
    (x, offset, weight, _, mask), conv = make_inputs(CASES[1], dtype=torch.float64, seed=3)
    leaves = [t.requires_grad_() for t in (x, offset, weight, mask)]

    def call(function):
        return lambda x, offset, weight, mask: function(x, offset, weight, None, mask=mask, **conv)

    _compare(call(dcn_tvm.deform_conv2d), call(torchvision.ops.deform_conv2d), leaves, torch.float64)


def test_fresh_deform_conv2d_pack_matches_torchvision():
    """Zero offsets with padding 1 put the border samples exactly on y = -1 and x = -1: the offset
    gradient there (and so the offset conv's gradient) is torchvision's."""
    torch.manual_seed(0)
    pack = dcn_tvm.DeformConv2dPack(4, 5, 3, padding=1).double()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    leaves = [x, pack.weight, pack.bias, pack.conv_offset.weight, pack.conv_offset.bias]

    def theirs(x, weight, bias, *_):
        return torchvision.ops.deform_conv2d(x, pack.conv_offset(x), weight, bias, padding=1)

    _compare(lambda x, *_: pack(x), theirs, leaves, torch.float64)


def test_deform_conv2d_module_is_torchvisions():
    ours_cls, theirs_cls = dcn_tvm.DeformConv2d, torchvision.ops.DeformConv2d
    def parameters(cls, method):
        """Names, kinds and defaults (annotations differ: ours take pairs too)."""
        return [(p.name, p.kind, p.default) for p in inspect.signature(getattr(cls, method)).parameters.values()]

    for method in ("__init__", "forward"):
        assert parameters(ours_cls, method) == parameters(theirs_cls, method), method
    arguments = dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2),
                     dilation=(1, 2), groups=2)
    ours, theirs = ours_cls(**arguments).double(), theirs_cls(**arguments).double()
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    out_size = (4, 8)  # (7 + 2*1 - 1*2 - 1) // 2 + 1, (6 + 2*2 - 2*1 - 1) // 1 + 1
    offset = torch.randn(2, 12, *out_size, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 6, *out_size, generator=gen, dtype=torch.float64, requires_grad=True)
    leaves = [x, offset, mask]
    _compare(lambda *t: ours(*t), lambda *t: theirs(*t), leaves, torch.float64)
    grad = torch.ones(2, 6, *out_size, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ours(x, offset, mask), list(ours.parameters()), grad),
                    torch.autograd.grad(theirs(x, offset, mask), list(theirs.parameters()), grad)):
        assert relative_error(a, b) <= 1e-12
