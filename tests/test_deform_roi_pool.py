"""deform_roi_pool against a float64 loop reference of issue 3's rules: gradcheck, opcheck, compile."""

from __future__ import annotations

import shutil

import pytest
import torch
from reference_roi_pool import deform_roi_pool_loops, deform_roi_pool_torch

import dcn_tvm
from dcn_tvm.geometry.roi_pool import RoIPoolGeometry
from dcn_tvm.kernels import cache
from dcn_tvm.kernels.spec import KernelSpec

# (N, out_channels, H, W, output_size, group_size, offset classes (0: none), part_size, sampling_ratio, scale)
CASES = [
    (2, 3, 9, 11, 3, 1, 0, None, 2, 0.5),  # RoI pooling
    (2, 4, 10, 8, 3, 1, 2, 2, 2, 0.5),  # deformable RoI pooling, two offset classes
    (1, 2, 12, 9, 3, 3, 0, None, 3, 1.0),  # PS RoI pooling
    (2, 6, 8, 10, 3, 3, 3, 3, 2, 0.25),  # deformable PS RoI pooling, three classes
    (1, 4, 7, 7, 4, 2, 1, 5, 1, 1.0),  # group_size < k, class-agnostic offsets, part_size > k
    (2, 24, 9, 11, 3, 1, 0, None, 2, 0.5),  # RoI pooling channels-last on the CPU (channels % 8 == 0)
    (2, 16, 10, 8, 3, 1, 2, 2, 2, 0.5),  # deformable RoI pooling channels-last, two offset classes
    # one output channel per offset class, as in the R-FCN head: no table entry shared by two channels
    (2, 3, 9, 8, 3, 3, 3, 3, 2, 0.5),
]


def case_id(case):
    n, o, h, w, k, g, classes, p, s, scale = case
    return f"n{n}o{o}h{h}w{w}k{k}g{g}nc{classes}p{p}s{s}x{scale}"


def make_rois(n, count, image_h, image_w, gen, margin=None):
    """[count, 5] RoIs in image pixels. Without `margin`: random boxes crossing the borders, plus a
    degenerate one (x2 < x1), one wholly outside and one larger than the image. With `margin`:
    boxes inside the image at least `margin` pixels from its borders."""
    batch = torch.randint(0, n, (count, 1), generator=gen).float()
    size = torch.tensor([image_w, image_h, image_w, image_h])
    if margin is not None:
        span = size[:2] - 2 * margin
        low = margin + torch.rand(count, 2, generator=gen) * span * 0.3
        high = margin + span - torch.rand(count, 2, generator=gen) * span * 0.3
        return torch.cat([batch, low, high], dim=1)
    start = (torch.rand(count, 2, generator=gen) * 1.1 - 0.2) * size[:2]
    extent = (torch.rand(count, 2, generator=gen) * 0.8 - 0.1) * size[:2]
    boxes = torch.cat([start, start + extent], dim=1)
    boxes[0] = torch.tensor([0.7, 0.6, 0.4, 0.1]) * size  # degenerate: x2 < x1, y2 < y1
    boxes[1] = torch.tensor([1.2, 1.1, 1.5, 1.6]) * size  # wholly outside
    boxes[2] = torch.tensor([-0.2, -0.3, 1.2, 1.1]) * size  # larger than the image
    return torch.cat([batch, boxes], dim=1)


def make_inputs(case, dtype=torch.float32, seed=0, rois_count=7, inside=False):
    """(input, rois, offset, keyword arguments); offsets move bins by ~0.1 RoI (0.05 `inside`)."""
    n, o, h, w, k, g, classes, p, s, scale = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, o * g * g, h, w, generator=gen)
    rois = make_rois(n, rois_count, h / scale, w / scale, gen, margin=1.5 / scale if inside else None)
    offset = None
    if classes:
        spread = 0.5 if inside else 1.0
        offset = torch.randn(rois_count, 2 * classes, p or k, p or k, generator=gen) * spread
    kwargs = dict(output_size=k, spatial_scale=scale, group_size=g, part_size=p, sampling_ratio=s, gamma=0.1)
    return x.to(dtype), rois, None if offset is None else offset.to(dtype), kwargs


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_loop_reference(case):
    x, rois, offset, kwargs = make_inputs(case, seed=CASES.index(case))
    out = dcn_tvm.deform_roi_pool(x, rois, offset, **kwargs)
    expected = deform_roi_pool_loops(x, rois, offset, **kwargs)
    assert out.shape == expected.shape
    assert relative_error(out, expected) <= 1e-4


def test_plain_torch_reference_agrees_with_loops():
    x, rois, offset, kwargs = make_inputs(CASES[3], dtype=torch.float64, seed=3)
    assert relative_error(deform_roi_pool_torch(x, rois.double(), offset, **kwargs),
                          deform_roi_pool_loops(x, rois, offset, **kwargs)) <= 1e-12


def test_list_of_boxes_per_image():
    x, rois, offset, kwargs = make_inputs(CASES[1], seed=1)
    order = torch.argsort(rois[:, 0], stable=True)
    rois, offset = rois[order], offset[order]
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(x.shape[0])]
    torch.testing.assert_close(dcn_tvm.deform_roi_pool(x, boxes, offset, **kwargs),
                               dcn_tvm.deform_roi_pool(x, rois, offset, **kwargs))


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=["deformable", "deformable-ps"])
def test_gradcheck_float64(case):
    """Input and offset gradients; RoIs and offsets keep every sample inside the image and off the
    clamp margins, and random offsets keep it off integer positions (see `backward`'s docstring)."""
    n, o, h, w, *rest = case
    x, rois, offset, kwargs = make_inputs((1, o, 8, 8, *rest), dtype=torch.float64, seed=4, rois_count=3,
                                          inside=True)
    rois = rois.double()

    def pool(x, offset):
        return dcn_tvm.deform_roi_pool(x, rois, offset, **kwargs)

    assert torch.autograd.gradcheck(pool, (x.requires_grad_(), offset.requires_grad_()), eps=1e-6, atol=1e-5)


def test_backward_matches_autograd_of_plain_torch():
    x, rois, offset, kwargs = make_inputs(CASES[3], seed=8)
    leaves = [x.requires_grad_(), offset.requires_grad_()]
    out = dcn_tvm.deform_roi_pool(x, rois, offset, **kwargs)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, grad)
    theirs = torch.autograd.grad(deform_roi_pool_torch(x, rois, offset, **kwargs), leaves, grad)
    for name, a, b in zip(("input", "offset"), ours, theirs):
        assert relative_error(a, b) <= 1e-4, name


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["plain", "deformable-ps"])
def test_opcheck(case):
    x, rois, offset, kwargs = make_inputs(case, dtype=torch.float64, seed=5, rois_count=4)
    k, g, p = kwargs["output_size"], kwargs["group_size"], kwargs["part_size"] or kwargs["output_size"]
    parameters = (k, kwargs["spatial_scale"], g, p, kwargs["sampling_ratio"], kwargs["gamma"])
    offset = None if offset is None else offset.requires_grad_()
    torch.library.opcheck(torch.ops.dcn_tvm.deform_roi_pool.default, (x.requires_grad_(), rois, offset, *parameters))
    grad = torch.randn(rois.shape[0], x.shape[1] // (g * g), k, k, dtype=torch.float64)
    torch.library.opcheck(torch.ops.dcn_tvm.deform_roi_pool_backward.default,
                          (grad, x.detach(), rois, None if offset is None else offset.detach(), *parameters))


def test_torch_compile_fullgraph():
    x, rois, offset, kwargs = make_inputs(CASES[3], seed=6)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(x.shape[0])]

    def head(x, boxes, offset):
        return dcn_tvm.deform_roi_pool(x, boxes, offset, **kwargs).mean((2, 3))

    compiled = torch.compile(head, fullgraph=True)
    x.requires_grad_()
    out = compiled(x, boxes, offset)
    torch.testing.assert_close(out, head(x, boxes, offset))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_nan_and_huge_offsets_sample_nothing():
    x, rois, offset, kwargs = make_inputs(CASES[3], seed=7)
    offset[3, 0:2] = float("nan")
    offset[4, 2] = 1e30
    offset[5, 3] = -float("inf")
    offset[6, 4, 1] = -1e30
    x.requires_grad_()
    offset.requires_grad_()
    out = dcn_tvm.deform_roi_pool(x, rois, offset, **kwargs)
    assert torch.isfinite(out).all()
    assert relative_error(out, deform_roi_pool_loops(x, rois, offset, **kwargs)) <= 1e-4
    assert (out[3, 0:2] == 0).all() and (out[4, 2:4] == 0).all()  # classes 0 of RoI 3 and 1 of RoI 4
    grads = torch.autograd.grad(out.sum(), [x, offset])
    assert all(torch.isfinite(g).all() for g in grads)


def test_nan_and_huge_rois_sample_nothing():
    x, rois, _, kwargs = make_inputs(CASES[0], seed=9)
    rois[3, 1] = float("nan")
    rois[4, 3] = float("inf")
    rois[5, 1:] = 1e30
    out = dcn_tvm.deform_roi_pool(x, rois, **kwargs)
    assert (out[3:6] == 0).all()
    assert relative_error(out, deform_roi_pool_loops(x, rois, **kwargs)) <= 1e-4


def test_kernel_clamps_out_of_range_batch_index():
    """Called directly, past the op's check, a bad batch index reads image 0, never out of bounds."""
    from dcn_tvm.ops import deform_roi_pool as op

    x, rois, _, kwargs = make_inputs(CASES[0], seed=10, rois_count=4)
    geo = op.geometry(x, rois, None, **kwargs)
    bad = rois.clone()
    bad[:, 0] = torch.tensor([7.0, -3.0, float("nan"), 1e9])
    out = x.new_empty(4, 3, 3, 3)
    cache.get_kernel(op._spec("forward", geo, x))(x, bad, out)
    bad[:, 0] = 0
    torch.testing.assert_close(out, dcn_tvm.deform_roi_pool(x, bad, **kwargs))


def test_zero_rois():
    x, rois, offset, kwargs = make_inputs(CASES[1], seed=11)
    x.requires_grad_()
    offset = offset[:0].requires_grad_()
    out = dcn_tvm.deform_roi_pool(x, rois[:0], offset, **kwargs)
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape and not x.grad.any() and offset.grad.shape == offset.shape
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    assert dcn_tvm.deform_roi_pool(x, empty, **kwargs).shape == (0, 4, 3, 3)
    assert dcn_tvm.deform_roi_pool(x[:0], rois[:0], **kwargs).shape == (0, 4, 3, 3)


def test_non_contiguous_inputs_are_handled():
    x, rois, offset, kwargs = make_inputs(CASES[3], seed=12)
    expected = dcn_tvm.deform_roi_pool(x, rois, offset, **kwargs)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)
    rois_t = rois.t().contiguous().t()
    offset_t = offset.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not any(t.is_contiguous() for t in (x_t, rois_t, offset_t))
    torch.testing.assert_close(dcn_tvm.deform_roi_pool(x_t, rois_t, offset_t, **kwargs), expected)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype, tolerance):
    x, rois, offset, kwargs = make_inputs(CASES[3], dtype=dtype, seed=13)
    out = dcn_tvm.deform_roi_pool(x, rois, offset, **kwargs)
    assert out.dtype == dtype
    assert relative_error(out, deform_roi_pool_loops(x, rois, offset, **kwargs)) <= tolerance
    x.requires_grad_()
    offset.requires_grad_()
    dcn_tvm.deform_roi_pool(x, rois, offset, **kwargs).float().sum().backward()
    assert x.grad.dtype == dtype and offset.grad.dtype == dtype
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(offset.grad.float()).all()


def test_one_kernel_serves_every_rois_count():
    from dcn_tvm.ops import deform_roi_pool as op

    keys = set()
    for seed, count in enumerate((4, 9)):
        x, rois, offset, kwargs = make_inputs(CASES[1], seed=seed, rois_count=count)
        out = dcn_tvm.deform_roi_pool(x, rois, offset, **kwargs)
        assert relative_error(out, deform_roi_pool_loops(x, rois, offset, **kwargs)) <= 1e-4
        keys.add(op._spec("forward", op.geometry(x, rois, offset, **kwargs), x).key)
    (key,) = keys
    assert "_rany_" in key and key in cache._kernels


def test_spec_key_is_readable():
    geo = RoIPoolGeometry(21, 7, 7, 7, 4, 21, 0.0625, 0.1, "float16")
    spec = KernelSpec("deform_roi_pool", "forward", geo, (("r", None), ("n", 1), ("h", 38), ("w", 63)), "llvm-znver5")
    assert spec.key == ("deform_roi_pool_forward_float16_o21_k7_g7_p7_sr4_nc21_scale0p0625_gamma0p1"
                        "_rany_n1_h38_w63_llvm-znver5")


def test_deform_roi_pool_module():
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(2, 4, 10, 12, generator=gen, requires_grad=True)
    rois = make_rois(2, 5, 20, 24, gen, margin=2)
    head = dcn_tvm.DeformRoIPool(4, output_size=3, spatial_scale=0.5, sampling_ratio=2, offset_lr_mult=1.0)
    out = head(x, rois)  # the offset fc starts at zero: plain RoI pooling
    plain = dcn_tvm.deform_roi_pool(x, rois, output_size=3, spatial_scale=0.5, sampling_ratio=2)
    torch.testing.assert_close(out, plain)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and head.offset_fc.weight.grad.abs().sum() > 0

    slow = dcn_tvm.DeformRoIPool(4, output_size=3, spatial_scale=0.5, sampling_ratio=2)  # beta = 0.01
    slow.load_state_dict(head.state_dict())
    slow(x, rois).square().sum().backward()
    torch.testing.assert_close(slow.offset_fc.weight.grad, 0.01 * head.offset_fc.weight.grad)


@pytest.mark.parametrize("class_agnostic", [False, True], ids=["class-aware", "class-agnostic"])
def test_deform_psroi_pool_module(class_agnostic):
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(2, 5, 9, 11, generator=gen, requires_grad=True)
    boxes = [make_rois(1, 3, 18, 22, gen, margin=2)[:, 1:] for _ in range(2)]
    head = dcn_tvm.DeformPSRoIPool(5, 4, output_size=3, spatial_scale=0.5, sampling_ratio=2,
                                   class_agnostic=class_agnostic)
    offsets = 2 * (1 if class_agnostic else 4) * 9
    assert head.offset_conv.out_channels == offsets and head.score_conv.out_channels == 36
    out = head(x, boxes)
    expected = dcn_tvm.deform_roi_pool(head.score_conv(x), boxes, output_size=3, spatial_scale=0.5, group_size=3,
                                       sampling_ratio=2)
    torch.testing.assert_close(out, expected)  # zero offsets at the start
    with torch.no_grad():
        head.offset_conv.weight.normal_(0, 0.5, generator=gen)
    out = head(x, boxes)
    assert out.shape == (6, 4, 3, 3) and not torch.allclose(out, expected)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert head.score_conv.weight.grad.abs().sum() > 0 and head.offset_conv.weight.grad.abs().sum() > 0


def _arguments(**override):
    gen = torch.Generator().manual_seed(16)
    arguments = dict(input=torch.randn(2, 18, 8, 8, generator=gen), rois=make_rois(2, 3, 8, 8, gen),
                     offset=torch.randn(3, 4, 3, 3, generator=gen), output_size=3, group_size=3)
    arguments.update(override)
    return arguments


BAD_ARGUMENTS = [
    (dict(rois=torch.tensor([[2.0, 0, 0, 4, 4]] * 3)), ValueError,
     r"rois\[:, 0\] must be batch indices in \[0, 2\) \(input has 2 images\), whole numbers, got 2.0 in row 0"),
    (dict(rois=torch.tensor([[0.0, 0, 0, 4, 4], [float("nan"), 0, 0, 4, 4], [0.0, 0, 0, 4, 4]])), ValueError,
     r"got nan in row 1"),
    (dict(rois=torch.zeros(3, 4)), ValueError, r"rois must have shape \[R, 5\] .*got \(3, 4\)"),
    (dict(rois=torch.zeros(3, 5, dtype=torch.int64)), TypeError, "rois must have a floating dtype, got torch.int64"),
    (dict(rois=[torch.zeros(2, 5)], offset=None), ValueError, r"rois\[0\] must have shape \[L, 4\]"),
    (dict(rois="boxes"), TypeError, "rois must be a Tensor"),
    (dict(input=torch.randn(2, 18, 8)), ValueError, r"input must have 4 dimensions \[N, C, H, W\]"),
    (dict(input=torch.zeros(2, 18, 8, 8, dtype=torch.int32)), TypeError, "input must have a floating dtype"),
    (dict(input=torch.randn(2, 16, 8, 8)), ValueError,
     r"input channels \(16\) must be a positive multiple of group_size"),
    (dict(offset=torch.randn(3, 4, 3, 3, dtype=torch.float64)), TypeError, "offset must have the input's dtype"),
    (dict(offset=torch.randn(3, 4, 2, 2)), ValueError, r"offset must have shape \(3, 2\*num_classes, 3, 3\)"),
    (dict(offset=torch.randn(2, 4, 3, 3)), ValueError, r"offset must have shape \(3, 2\*num_classes, 3, 3\)"),
    (dict(offset=torch.randn(3, 5, 3, 3)), ValueError, r"offset must have shape"),
    (dict(offset=torch.randn(3, 6, 3, 3)), ValueError, r"out channels \(2 = 18 // group_size²\) must be a multiple"),
    (dict(output_size=0), ValueError, "output_size must be >= 1, got 0"),
    (dict(output_size=3.0), TypeError, "output_size must be an int, got 3.0"),
    (dict(sampling_ratio=0), ValueError, "sampling_ratio must be >= 1, got 0"),
    (dict(part_size=0), ValueError, "part_size must be >= 1"),
    (dict(spatial_scale=0.0), ValueError, "spatial_scale must be positive and finite, got 0.0"),
    (dict(gamma=float("nan")), ValueError, "gamma must be finite"),
]


@pytest.mark.parametrize("override,error,message", BAD_ARGUMENTS, ids=[m[:32] for _, _, m in BAD_ARGUMENTS])
def test_bad_arguments_raise_clear_errors(override, error, message):
    with pytest.raises(error, match=message):
        dcn_tvm.deform_roi_pool(**_arguments(**override))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA codegen needs nvcc")
def test_cuda_build_contains_device_code():
    from dcn_tvm.kernels.build import build

    deformable_ps = RoIPoolGeometry(4, 3, 3, 3, 2, 2, 0.0625, 0.1, "float16")
    plain = RoIPoolGeometry(4, 3, 1, 0, 2, 0, 1.0, 0.0, "float32")
    for geo in (deformable_ps, plain):
        for stage in ("forward", "backward", "scatter"):
            spec = KernelSpec("deform_roi_pool", stage, geo, (("r", None), ("n", 2), ("h", 8), ("w", 8)), "cuda-sm_90")
            assert len(build(spec).mod.imports) == 1, (geo.key, stage)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_matches_cpu(dtype):
    x, rois, offset, kwargs = make_inputs(CASES[3], dtype=dtype, seed=17)
    grad = torch.randn(rois.shape[0], 6, 3, 3).to(dtype)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [x.to(device).requires_grad_(), offset.to(device).requires_grad_()]
        out = dcn_tvm.deform_roi_pool(leaves[0], rois.to(device), leaves[1], **kwargs)
        results.append([out, *torch.autograd.grad(out, leaves, grad.to(device))])
    tolerance = 1e-4 if dtype == torch.float32 else 3e-3
    for name, a, b in zip(("output", "input", "offset"), *results):
        assert relative_error(b.cpu(), a) <= tolerance, name
