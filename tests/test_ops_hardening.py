"""Awkward inputs a torchvision user tries: zero sizes, bad groups, RoI batch-index rules, devices."""

from __future__ import annotations

import pytest
import torch

import dcn_tvm


@pytest.mark.parametrize("shape,weight,padding", [
    ((2, 4, 6, 6), (0, 4, 3, 3), 1),  # no output channels
    ((2, 4, 0, 0), (3, 4, 1, 1), 1),  # no pixels, padded into a 2x2 output
    ((2, 4, 0, 5), (3, 4, 1, 1), 1),
], ids=["o0", "h0w0", "h0"])
def test_conv_zero_sizes_give_the_bias_and_shaped_gradients(shape, weight, padding):
    """As torchvision: every sample reads zero, so the output is the bias; gradients have the inputs' shapes."""
    n, _, h, w = shape
    o, _, kh, kw = weight
    oh, ow = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    x, wt = torch.randn(shape, requires_grad=True), torch.randn(weight, requires_grad=True)
    offset = torch.randn(n, 2 * kh * kw, oh, ow, requires_grad=True)
    mask = torch.rand(n, kh * kw, oh, ow, requires_grad=True)
    bias = torch.randn(o, requires_grad=True)
    out = dcn_tvm.deform_conv2d(x, offset, wt, bias, padding=padding, mask=mask)
    assert out.shape == (n, o, oh, ow)
    torch.testing.assert_close(out, bias[:, None, None].expand_as(out))
    out.sum().backward()
    for leaf in (x, offset, mask, wt):
        assert leaf.grad.shape == leaf.shape and not leaf.grad.any()
    torch.testing.assert_close(bias.grad, torch.full((o,), float(n * oh * ow)))


@pytest.mark.parametrize("weight", [(4, 2, 3, 3), (4, 0, 3, 3)])
def test_conv_zero_channels_raise(weight):
    with pytest.raises(ValueError, match=r"input must have at least one channel, got shape \(2, 0, 6, 6\)"):
        dcn_tvm.deform_conv2d(torch.randn(2, 0, 6, 6), torch.randn(2, 18, 6, 6), torch.randn(weight), padding=1)


@pytest.mark.parametrize("make,message", [
    (lambda: dcn_tvm.DeformConv2d(4, 4, 3, groups=0), "groups must be >= 1, got 0"),
    (lambda: dcn_tvm.DeformConv2dPack(4, 4, 3, offset_groups=0), "offset_groups must be >= 1, got 0"),
])
def test_modules_reject_zero_groups(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_modules_reject_float_groups():
    with pytest.raises(TypeError, match="groups must be an int, got 1.5"):
        dcn_tvm.DeformConv2d(4, 4, 3, groups=1.5)


def test_roi_pool_without_pixels_pools_zeros():
    x = torch.randn(2, 4, 0, 0, requires_grad=True)
    offset = torch.randn(2, 2, 2, 2, requires_grad=True)
    rois = torch.tensor([[0, 1, 1, 5, 5.0], [1, 0, 0, 7, 7]])
    out = dcn_tvm.deform_roi_pool(x, rois, offset, output_size=2)
    assert out.shape == (2, 4, 2, 2) and not out.any()
    out.sum().backward()
    assert x.grad.shape == x.shape and offset.grad.shape == offset.shape and not offset.grad.any()


def test_roi_batch_index_must_be_a_whole_number():
    """float64 1.99999999999 passes [0, N) but rounds to 2.0 in the float32 kernel: refused, with row and value."""
    x = torch.randn(2, 4, 8, 8)
    rois = torch.tensor([[0, 1, 1, 5, 5], [1.99999999999, 1, 1, 5, 5]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"whole numbers, got 1.99999999999 in row 1"):
        dcn_tvm.deform_roi_pool(x, rois, output_size=2)


@pytest.mark.parametrize("images", [258, 300])
def test_bfloat16_boxes_of_many_images_pool_their_own_image(images):
    """bfloat16 holds integers exactly only up to 256: the list format's batch index must not go through it."""
    x = torch.arange(images, dtype=torch.float32).view(images, 1, 1, 1).expand(images, 1, 4, 4).contiguous()
    boxes = [torch.tensor([[0.0, 0, 3, 3]], dtype=torch.bfloat16)] * images
    out = dcn_tvm.deform_roi_pool(x, boxes, output_size=1)
    torch.testing.assert_close(out.flatten(), torch.arange(images, dtype=torch.float32))


def test_expanded_and_channels_last_inputs():
    gen = torch.Generator().manual_seed(0)
    x, off = torch.randn(1, 4, 6, 6, generator=gen), torch.randn(1, 18, 6, 6, generator=gen)
    w, m = torch.randn(3, 4, 3, 3, generator=gen), torch.rand(1, 9, 6, 6, generator=gen)
    one = dcn_tvm.deform_conv2d(x, off, w, padding=1, mask=m)
    stride0 = [t.expand(2, -1, -1, -1) for t in (x, off, m)]
    assert stride0[0].stride()[0] == 0
    torch.testing.assert_close(dcn_tvm.deform_conv2d(stride0[0], stride0[1], w, padding=1, mask=stride0[2]),
                               one.expand(2, -1, -1, -1))
    last = [t.to(memory_format=torch.channels_last) for t in (x, off, w, m)]
    torch.testing.assert_close(dcn_tvm.deform_conv2d(last[0], last[1], last[2], padding=1, mask=last[3]), one)

    rois = torch.tensor([[0, 1, 1, 5, 5.0], [0, 0, 0, 7, 7]])
    pooled = dcn_tvm.deform_roi_pool(x, rois, output_size=2)
    torch.testing.assert_close(dcn_tvm.deform_roi_pool(last[0], rois[:1].expand(2, -1), output_size=2),
                               pooled[:1].expand(2, -1, -1, -1))


@pytest.mark.parametrize("rois,message", [
    (torch.zeros(2, 5, dtype=torch.int64, device="meta"), "rois is on meta but input is on cpu"),
    ([torch.zeros(2, 4, device="meta")], r"rois\[0\] is on meta but input is on cpu"),
])
def test_rois_on_another_device(rois, message):
    with pytest.raises(ValueError, match=message):
        dcn_tvm.deform_roi_pool(torch.randn(1, 4, 8, 8), rois, output_size=2)


def test_conv_tensors_on_another_device():
    x, off, w = torch.randn(1, 4, 6, 6), torch.randn(1, 18, 6, 6), torch.randn(3, 4, 3, 3)
    with pytest.raises(ValueError, match="weight is on meta but input is on cpu"):
        dcn_tvm.deform_conv2d(x, off, w.to("meta"), padding=1)
    with pytest.raises(TypeError, match="got torch.float32 on meta"):
        dcn_tvm.deform_conv2d(x, off, w, torch.zeros(3, device="meta"), padding=1)


@pytest.mark.parametrize("item,message", [
    ("k=3x", r"k='3x' is not an integer or AxB, each >= 1"),
    ("k=3,n=0", r"n='0' is not an integer >= 1"),
    ("k=3,h=-4", r"h='-4' is not an integer >= 1"),
    ("k=3,stride=0", r"stride='0' is not an integer or AxB, each >= 1"),
    ("k=3,mask=2", r"mask='2' is not an integer in \[0, 1\]"),
])
def test_cli_rejects_bad_workloads_with_a_usage_error(item, message, capsys, tmp_path):
    from dcn_tvm.__main__ import main

    base = {"n": "1", "c": "4", "h": "8", "w": "8", "o": "4"}
    given = dict(part.split("=") for part in item.split(","))
    text = "deform_conv2d:" + ",".join(f"{k}={v}" for k, v in {**base, **given}.items())
    with pytest.raises(SystemExit) as exit:
        main(["tune", "--target", "llvm", "--trials", "1", "--logs", str(tmp_path), "--workload", text])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: dcn-tvm tune") and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_infinite_box_edge_gives_finite_gradients():
    """An inf edge samples nothing (output 0): its offset gradient is 0, not 0 * inf = NaN."""
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    rois = torch.tensor([[0, 1, 1, 5, 5.0], [0, 1, 1, float("inf"), 5], [0, -float("inf"), 1, 5, 5]])
    offset = torch.randn(3, 2, 2, 2, requires_grad=True)
    out = dcn_tvm.deform_roi_pool(x, rois, offset, output_size=2)
    assert not out[1:].any()
    grad_x, grad_offset = torch.autograd.grad(out.sum(), [x, offset])
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_offset).all()
    assert not grad_offset[1:].any() and grad_offset[0].any()


def test_double_backward_raises_clearly():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    out = dcn_tvm.deform_conv2d(x, torch.randn(1, 18, 5, 5, dtype=torch.float64),
                                torch.randn(3, 2, 3, 3, dtype=torch.float64), padding=1)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        grad.sum().backward()


def _meta_layers():
    """(module, inputs) for each op's layer, on the CPU."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 9, generator=gen)
    rois = torch.tensor([[0, 1, 1, 6, 6.0], [1, 0, 2, 8, 5]])
    level = torch.tensor([[6, 6], [3, 3]])
    return {
        "DeformConv2dPack": (dcn_tvm.DeformConv2dPack(8, 4, 3, padding=1, modulated=True), (x,)),
        "DeformRoIPool": (dcn_tvm.DeformRoIPool(8, 3, 1.0), (x, rois)),
        "DeformPSRoIPool": (dcn_tvm.DeformPSRoIPool(8, 2, 3, 1.0), (x, rois)),
        "MultiScaleDeformableAttention": (dcn_tvm.MultiScaleDeformableAttention(16, 2, 2, 2), (
            torch.randn(1, 5, 16, generator=gen), torch.rand(1, 5, 2, 2, generator=gen),
            torch.randn(1, 45, 16, generator=gen), level, torch.tensor([0, 36]))),
        "DCNv3": (dcn_tvm.DCNv3(channels=16, group=2), (torch.randn(1, 7, 7, 16, generator=gen),)),
        "DCNv4": (dcn_tvm.DCNv4(channels=16, group=2), (torch.randn(1, 49, 16, generator=gen), (7, 7))),
    }


@pytest.mark.parametrize("name", list(_meta_layers()))
def test_meta_tensors_give_the_shapes_of_a_real_call(name):
    """As torchvision's ops: on the meta device (shape inference, models built on meta) each layer's forward
    and backward give the output and gradient shapes of a real CPU call, with no data read."""
    module, inputs = _meta_layers()[name]
    leaf = inputs[0].clone().requires_grad_(True)
    out = module(leaf, *inputs[1:])
    out.sum().backward()
    grads = {key: p.grad.shape for key, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    meta_leaf = inputs[0].to("meta").requires_grad_(True)
    meta_out = module.to("meta")(meta_leaf, *[a.to("meta") if isinstance(a, torch.Tensor) else a for a in inputs[1:]])
    meta_out.sum().backward()
    assert meta_out.device.type == "meta" and meta_out.shape == out.shape and meta_out.dtype == out.dtype
    assert meta_leaf.grad.device.type == "meta" and meta_leaf.grad.shape == leaf.grad.shape
    assert {key: p.grad.shape for key, p in module.named_parameters() if p.grad is not None} == grads
