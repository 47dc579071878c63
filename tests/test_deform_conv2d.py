"""deform_conv2d against independent references: float64 loops, F.conv2d, gradcheck, opcheck."""

from __future__ import annotations

import importlib.util
import multiprocessing
import shutil

import pytest
import torch
import torch.nn.functional as F
from reference import deform_conv2d_loops, deform_conv2d_torch

import dcn_tvm
from dcn_tvm.geometry.conv import ConvGeometry
from dcn_tvm.kernels import cache
from dcn_tvm.kernels.spec import KernelSpec

# (N, C, H, W, O, kernel, stride, padding, dilation, groups, offset_groups, mask)
CASES = [
    (2, 4, 7, 9, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, False),
    (1, 6, 8, 5, 4, (3, 2), (2, 1), (0, 2), (1, 2), 2, 3, True),
    (3, 8, 6, 6, 8, (1, 3), (1, 2), (2, 1), (2, 1), 4, 2, False),
    (1, 3, 9, 7, 5, (2, 2), (1, 1), (0, 0), (1, 1), 1, 1, True),
    (2, 16, 5, 5, 16, (3, 3), (1, 1), (2, 2), (2, 2), 1, 4, True),
    (2, 5, 9, 8, 4, (1, 1), (2, 2), (0, 0), (1, 1), 1, 1, True),  # few pixels sampled: channels-first on CPU
    # 20 channels per group and offset group: CPU channel vectors (16 lanes) and their remainders.
    (1, 40, 6, 7, 24, (3, 3), (1, 1), (1, 1), (1, 1), 2, 2, True),
]


def make_inputs(case, dtype=torch.float32, seed=0):
    """Random inputs whose offsets put samples between pixels, on borders, in (-1, 0) and outside."""
    n, c, h, w, o, (kh, kw), stride, padding, dilation, groups, og, with_mask = case
    gen = torch.Generator().manual_seed(seed)
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = torch.randn(n, c, h, w, generator=gen)
    offset = torch.rand(n, 2 * og * kh * kw, oh, ow, generator=gen) * 6 - 3  # mostly between pixels
    flat = offset.view(-1)
    picks = torch.randperm(flat.numel(), generator=gen)
    quarter = flat.numel() // 8
    flat[picks[:quarter]] = torch.round(flat[picks[:quarter]])  # exactly on pixel rows/columns
    flat[picks[quarter: 2 * quarter]] = -torch.rand(quarter, generator=gen) * 40  # far outside
    flat[picks[2 * quarter: 3 * quarter]] += 0.5 * torch.sign(flat[picks[2 * quarter: 3 * quarter]])
    weight = torch.randn(o, c // groups, kh, kw, generator=gen)
    bias = torch.randn(o, generator=gen)
    mask = torch.rand(n, og * kh * kw, oh, ow, generator=gen) if with_mask else None
    tensors = [x, offset, weight, bias, mask]
    tensors = [None if t is None else t.to(dtype) for t in tensors]
    return tensors, dict(stride=stride, padding=padding, dilation=dilation)


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}c{c[1]}h{c[2]}w{c[3]}o{c[4]}g{c[9]}og{c[10]}m{int(c[11])}")
def test_forward_matches_loop_reference(case):
    (x, offset, weight, bias, mask), conv = make_inputs(case, seed=hash(case) % 1000)
    out = dcn_tvm.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    expected = deform_conv2d_loops(x, offset, weight, bias, mask=mask, **conv)
    assert out.shape == expected.shape
    assert relative_error(out, expected) <= 1e-4


def test_cases_cover_both_cpu_graphs():
    """The CPU kernels (forward and backward) build channels-last graphs where the kernel covers every
    pixel, else channels-first ones: CASES must run both (through the llvm rules' "auto" layout)."""
    from dcn_tvm.ops.deform_conv2d import layout

    geometries = [ConvGeometry(c, o, k, s, p, d, g, og, m, "float32") for _, c, _, _, o, k, s, p, d, g, og, m in CASES]
    assert {layout(geo, "llvm") for geo in geometries} == {"channels_first", "channels_last"}


def test_cpu_forward_tiles_follow_the_target_vectors():
    """The llvm forward vectorises output channels by the target's vector width: 8 float32 lanes with
    AVX2 (znver3), 16 with AVX-512 (znver4); 16-lane tiles on AVX2 spill its 16 registers."""
    import tvm

    from dcn_tvm import schedules
    from dcn_tvm.kernels.build import prim_func

    geo = ConvGeometry(16, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, False, "float32")
    lanes = {}
    for mcpu in ("znver3", "znver4"):
        spec = KernelSpec("deform_conv2d", "forward", geo, (("n", 1), ("h", 8), ("w", 8)), f"llvm-{mcpu}")
        sch = tvm.s_tir.Schedule(prim_func(spec))
        with tvm.target.Target({"kind": "llvm", "mcpu": mcpu}):
            schedules.apply("deform_conv2d", "llvm", "forward", sch)
        loop = sch.get(sch.get_loops(sch.get_sblock("deform_gemm_channels_last_update"))[-1])
        assert loop.kind == tvm.tirx.ForKind.VECTORIZED
        lanes[mcpu] = loop.extent.value
    assert lanes == {"znver3": 8, "znver4": 16}


def test_samples_in_minus_one_to_zero_blend_with_zero():
    """A sample at y = -0.5 is half the first row (torchvision's rule; topi's would drop it)."""
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    weight = torch.ones(1, 1, 1, 1)
    offset = torch.zeros(1, 2, 3, 3)
    offset[0, 0, 0, 0] = -0.5
    out = dcn_tvm.deform_conv2d(x, offset, weight)
    assert out[0, 0, 0, 0].item() == pytest.approx(0.5 * x[0, 0, 0, 0].item())
    offset[0, 0, 0, 0] = -1.0  # exactly -1 is outside
    assert dcn_tvm.deform_conv2d(x, offset, weight)[0, 0, 0, 0].item() == 0.0


@pytest.mark.parametrize("groups", [1, 2])
def test_zero_offsets_equal_dense_conv(groups):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 11, 10, generator=gen)
    weight = torch.randn(6, 8 // groups, 3, 3, generator=gen)
    bias = torch.randn(6, generator=gen)
    expected = F.conv2d(x, weight, bias, stride=(2, 1), padding=(2, 1), dilation=(2, 1), groups=groups)
    offset = torch.zeros(2, 18, *expected.shape[2:])
    out = dcn_tvm.deform_conv2d(x, offset, weight, bias, stride=(2, 1), padding=(2, 1), dilation=(2, 1))
    assert relative_error(out, expected) <= 1e-5


def test_plain_torch_reference_agrees_with_loops():
    (x, offset, weight, bias, mask), conv = make_inputs(CASES[1], dtype=torch.float64)
    assert relative_error(deform_conv2d_torch(x, offset, weight, bias, mask=mask, **conv),
                          deform_conv2d_loops(x, offset, weight, bias, mask=mask, **conv)) < 1e-12


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=["plain", "groups-mask"])
def test_gradcheck_float64(case):
    (x, offset, weight, bias, mask), conv = make_inputs(case, dtype=torch.float64, seed=7)
    # Finite differences are wrong across pixel rows/columns: keep samples strictly between them.
    offset = offset.floor() + 0.25 + 0.5 * torch.rand_like(offset)
    inputs = [t.requires_grad_() for t in (x, offset, weight, bias)]
    if mask is not None:
        inputs.append(mask.requires_grad_())

    def fn(x, offset, weight, bias, mask=None):
        return dcn_tvm.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_opcheck():
    (x, offset, weight, bias, mask), conv = make_inputs(CASES[1], dtype=torch.float64)
    args = (x, offset.requires_grad_(), mask, weight.requires_grad_(), bias,
            list(conv["stride"]), list(conv["padding"]), list(conv["dilation"]))
    torch.library.opcheck(torch.ops.dcn_tvm.deform_conv2d.default, args)


def test_torch_compile_fullgraph():
    layer = dcn_tvm.DeformConv2dPack(4, 6, 3, padding=1, modulated=True)
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.3)
    x = torch.randn(2, 4, 9, 7, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    eager = layer(x)
    assert torch.allclose(out, eager, atol=1e-5)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_nan_and_huge_offsets_sample_nothing():
    (x, offset, weight, bias, mask), conv = make_inputs(CASES[0])
    offset[0, 0] = float("nan")
    offset[0, 3] = 1e30
    offset[1, 5] = -1e30
    offset[1, 6] = float("inf")
    out = dcn_tvm.deform_conv2d(x, offset, weight, bias, **conv)
    expected = deform_conv2d_loops(x, offset, weight, bias, **conv)
    assert torch.isfinite(out).all()
    assert relative_error(out, expected) <= 1e-4
    out.sum()  # backward through such offsets stays finite too
    grads = torch.autograd.grad(
        dcn_tvm.deform_conv2d(x.requires_grad_(), offset.requires_grad_(), weight, bias, **conv).sum(), [x, offset])
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[1][0, :2] == 0).all()  # a NaN dy: the point samples nothing, both derivatives are zero


def test_empty_batch():
    (x, offset, weight, bias, _), conv = make_inputs(CASES[0])
    x, offset = x[:0].requires_grad_(), offset[:0].requires_grad_()
    out = dcn_tvm.deform_conv2d(x, offset, weight, bias, **conv)
    assert out.shape == (0, 6, 7, 9)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_non_contiguous_inputs_are_handled():
    (x, offset, weight, bias, mask), conv = make_inputs(CASES[1])
    expected = dcn_tvm.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)
    offset_t = offset.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not x_t.is_contiguous() and not offset_t.is_contiguous()
    out = dcn_tvm.deform_conv2d(x_t, offset_t, weight, bias, mask=mask, **conv)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype, tolerance):
    (x, offset, weight, bias, mask), conv = make_inputs(CASES[4], dtype=dtype)
    out = dcn_tvm.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    assert out.dtype == dtype
    assert relative_error(out, deform_conv2d_loops(x, offset, weight, bias, mask=mask, **conv)) <= tolerance
    x.requires_grad_()
    dcn_tvm.deform_conv2d(x, offset, weight, bias, mask=mask, **conv).float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_backward_matches_autograd_of_plain_torch():
    (x, offset, weight, bias, mask), conv = make_inputs(CASES[4], seed=11)
    leaves = [t.requires_grad_() for t in (x, offset, weight, bias, mask)]
    grad_out = torch.randn(2, 16, 5, 5)
    ours = torch.autograd.grad(dcn_tvm.deform_conv2d(x, offset, weight, bias, mask=mask, **conv), leaves, grad_out)
    theirs = torch.autograd.grad(deform_conv2d_torch(x, offset, weight, bias, mask=mask, **conv), leaves, grad_out)
    for name, a, b in zip(("input", "offset", "weight", "bias", "mask"), ours, theirs):
        assert relative_error(a, b) <= 1e-4, name


def test_dynamic_shapes_serve_every_size(monkeypatch):
    """One kernel per stage for every size, forward and backward."""
    monkeypatch.setenv("DCN_TVM_SHAPES", "dynamic")
    for seed, (n, h, w) in enumerate([(1, 6, 7), (3, 9, 5)]):
        case = (n, 4, h, w, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True)
        (x, offset, weight, bias, mask), conv = make_inputs(case, seed=seed)
        out = dcn_tvm.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
        assert relative_error(out, deform_conv2d_loops(x, offset, weight, bias, mask=mask, **conv)) <= 1e-4
        leaves = [t.requires_grad_() for t in (x, offset, weight, bias, mask)]
        ours = torch.autograd.grad(dcn_tvm.deform_conv2d(x, offset, weight, bias, mask=mask, **conv).sum(), leaves)
        theirs = torch.autograd.grad(deform_conv2d_torch(x, offset, weight, bias, mask=mask, **conv).sum(), leaves)
        assert all(relative_error(a, b) <= 1e-4 for a, b in zip(ours, theirs))
    assert any("_nany_hany_wany_" in key for key in cache._kernels)


def test_modules():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    layer = dcn_tvm.DeformConv2d(4, 6, 3, padding=1, groups=2)
    offset = torch.randn(2, 18, 8, 8, generator=gen)
    torch.testing.assert_close(layer(x, offset), dcn_tvm.deform_conv2d(x, offset, layer.weight, layer.bias, padding=1))

    pack = dcn_tvm.DeformConv2dPack(4, 6, 3, padding=1)  # zero-initialised offsets: the plain conv
    torch.testing.assert_close(pack(x), F.conv2d(x, pack.weight, pack.bias, padding=1), rtol=1e-5, atol=1e-5)
    modulated = dcn_tvm.DeformConv2dPack(4, 6, 3, padding=1, modulated=True, bias=False)
    torch.testing.assert_close(modulated(x), 0.5 * F.conv2d(x, modulated.weight, padding=1), rtol=1e-5, atol=1e-5)

    slow = dcn_tvm.DeformConv2dPack(4, 6, 3, padding=1, offset_lr_mult=0.1)
    slow.load_state_dict(pack.state_dict())
    pack(x).square().sum().backward()
    slow(x).square().sum().backward()
    torch.testing.assert_close(slow.conv_offset.weight.grad, 0.1 * pack.conv_offset.weight.grad)


BAD_ARGUMENTS = [
    (dict(input=torch.randn(4, 7, 9)), ValueError, r"input must have 4 dimensions, got shape \(4, 7, 9\)"),
    (dict(input=torch.zeros(2, 4, 7, 9, dtype=torch.int32)), TypeError, "input must have a floating dtype"),
    (dict(offset=torch.randn(2, 18, 7, 9, dtype=torch.float64)), TypeError,
     "offset must have the input's dtype torch.float32, got torch.float64"),
    (dict(offset=torch.randn(2, 17, 7, 9)), ValueError, r"offset.shape\[1\] must be a positive multiple of 2\*KH\*KW = 18"),
    (dict(offset=torch.randn(2, 18, 6, 9)), ValueError, r"offset must have shape \(2, 18, 7, 9\)"),
    (dict(weight=torch.randn(6, 3, 3, 3)), ValueError, r"input channels \(4\) must be a multiple of weight.shape\[1\] \(3\)"),
    (dict(weight=torch.randn(5, 2, 3, 3)), ValueError, r"out channels \(5\) must be a multiple of groups \(2"),
    (dict(mask=torch.rand(2, 8, 7, 9)), ValueError, r"mask.shape\[1\] is not valid: mask must have offset_groups\*KH\*KW = 9 "),
    (dict(mask=torch.rand(2, 9, 7, 8)), ValueError, r"mask must have shape \(2, 9, 7, 9\)"),
    (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\)"),
    (dict(padding=-1), ValueError, "padding must be >= 0, got -1"),
    (dict(stride=(1, 0)), ValueError, "stride must be >= 1"),
    (dict(dilation=1.5), TypeError, "dilation must be an int or a pair of ints"),
    (dict(offset="zeros"), TypeError, "offset must be a torch.Tensor, got str"),
    (dict(input=torch.randn(2, 4, 1, 1), offset=torch.randn(2, 18, 1, 1), padding=0), ValueError, "too small"),
]


@pytest.mark.parametrize("override,error,message", BAD_ARGUMENTS, ids=[m[:30] for _, _, m in BAD_ARGUMENTS])
def test_bad_arguments_raise_clear_errors(override, error, message):
    arguments = dict(input=torch.randn(2, 4, 7, 9), offset=torch.randn(2, 18, 7, 9), weight=torch.randn(6, 4, 3, 3),
                     bias=torch.randn(6), padding=1, mask=None)
    arguments.update(override)
    with pytest.raises(error, match=message):
        dcn_tvm.deform_conv2d(**arguments)


def test_spec_key_is_readable():
    geo = ConvGeometry(512, 512, (3, 3), (1, 1), (2, 2), (2, 2), 1, 1, False, "float16")
    spec = KernelSpec("deform_conv2d", "forward", geo, (("n", 1), ("h", 38), ("w", 50)), "llvm-znver5")
    assert spec.key == "deform_conv2d_forward_float16_c512_o512_k3x3_s1x1_p2x2_d2x2_g1_og1_m0_n1_h38_w50_llvm-znver5"


def _compile_in_child(cache_dir):
    """Run one deform_conv2d in a fresh process; return (compiles done here, output)."""
    import os

    os.environ["DCN_TVM_CACHE_DIR"] = cache_dir
    from dcn_tvm.kernels import cache as child_cache

    compiled = []
    original = child_cache._compile
    child_cache._compile = lambda spec: compiled.append(spec.key) or original(spec)
    gen = torch.Generator().manual_seed(0)
    x, offset, weight = torch.randn(1, 4, 6, 6, generator=gen), torch.randn(1, 18, 6, 6, generator=gen), torch.randn(
        4, 4, 3, 3, generator=gen)
    out = dcn_tvm.deform_conv2d(x, offset, weight, padding=1)
    return len(compiled), out


def test_concurrent_processes_compile_once(tmp_path):
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_compile_in_child, [str(tmp_path)] * 3)
    assert sum(count for count, _ in results) == 1
    for _, out in results[1:]:
        torch.testing.assert_close(out, results[0][1])
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA codegen needs nvcc")
def test_cuda_build_contains_device_code():
    from dcn_tvm.kernels.build import build

    geo = ConvGeometry(16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, "float16")
    for stage in ("forward", "backward_data", "backward_weight"):
        executable = build(KernelSpec("deform_conv2d", stage, geo, (("n", 2), ("h", 8), ("w", 8)), "cuda-sm_90"))
        assert len(executable.mod.imports) == 1, stage
    scatter = build(KernelSpec("deform_conv2d", "scatter", None, (), "cuda-sm_90"))
    assert len(scatter.mod.imports) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_matches_torchvision(dtype):
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision not installed")
    import torchvision

    (x, offset, weight, bias, mask), conv = make_inputs(CASES[4], dtype=dtype)
    args = [t.cuda().requires_grad_() for t in (x, offset, weight, bias, mask)]
    ours = dcn_tvm.deform_conv2d(args[0], args[1], args[2], args[3], mask=args[4], **conv)
    theirs = torchvision.ops.deform_conv2d(args[0], args[1], args[2], args[3], mask=args[4], **conv)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-3
    assert relative_error(ours, theirs) <= tolerance
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, args, grad), torch.autograd.grad(theirs, args, grad)):
        assert relative_error(a, b) <= 10 * tolerance


@pytest.mark.parametrize("with_mask", [False, True])
def test_offset_gradient_on_minus_one_is_the_derivative_from_inside(with_mask):
    """torchvision's rule: a sample exactly on y = -1 (x = -1) samples nothing, but its derivative
    along y (x) is that of the bilinear weight y - floor(y) of its corner in row (column) 0."""
    x = torch.arange(1.0, 13.0, dtype=torch.float64).view(1, 1, 3, 4)
    weight = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    offset = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    offset[0, 0, 0, 1] = -1.0  # output (0, 1) samples (y, x) = (-1, 1)
    offset[0, 1, 2, 0] = -1.0  # output (2, 0) samples (2, -1)
    offset[0, :, 1, 3] = torch.tensor([-2.0, -4.0])  # output (1, 3) samples (-1, -1)
    mask = torch.full((1, 1, 3, 4), 0.5, dtype=torch.float64) if with_mask else None
    leaves = [offset.requires_grad_()] + ([mask.requires_grad_()] if with_mask else [])
    out = dcn_tvm.deform_conv2d(x, offset, weight, mask=mask)
    points = ([0, 2, 1], [1, 0, 3])
    assert (out[0, 0][points] == 0).all()
    grads = torch.autograd.grad(out.sum(), leaves)
    m = 0.5 if with_mask else 1.0
    expected_dy = torch.tensor([m * 2.0 * x[0, 0, 0, 1], 0.0, 0.0], dtype=torch.float64)
    expected_dx = torch.tensor([0.0, m * 2.0 * x[0, 0, 2, 0], 0.0], dtype=torch.float64)
    torch.testing.assert_close(grads[0][0, 0][points], expected_dy)
    torch.testing.assert_close(grads[0][0, 1][points], expected_dx)
    if with_mask:
        assert (grads[1][0, 0][points] == 0).all()  # the mask multiplies a value of zero


@pytest.mark.parametrize("stage", ["forward", "backward_data", "backward_weight", "scatter"])
def test_symbolic_kernels_index_in_64_bits(stage):
    """Symbolic sizes must be int64: an int32 size overflows (and crashed) past 2^31 elements."""
    import tvm

    from dcn_tvm.kernels.build import prim_func

    geo = ConvGeometry(4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, "float32")
    spec = (KernelSpec("deform_conv2d", stage, None, (), "llvm") if stage == "scatter" else
            KernelSpec("deform_conv2d", stage, geo, (("n", None), ("h", None), ("w", None)), "llvm"))
    sizes = {v.name: str(v.ty) for v in tvm.tirx.analysis.undefined_vars(prim_func(spec).body, [])
             if str(v.ty).startswith("int")}
    assert sizes and set(sizes.values()) == {"int64"}, sizes


def test_static_kernels_past_int32_elements_compile():
    """grad_columns [1, 58256, 3, 3, 4096] has 2^31 + 65536 elements: int32 indices fail to lower."""
    from dcn_tvm.kernels.build import build

    geo = ConvGeometry(58256, 1, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, False, "float32")
    build(KernelSpec("deform_conv2d", "backward_data", geo, (("n", 1), ("h", 64), ("w", 64)), "llvm"))


@pytest.fixture(scope="module")
def input_past_int32():
    """A bfloat16 input of 2^31 + 65536 elements (4 GiB), zero but on the pixels a 1x1 kernel with
    stride 128 samples, and its weight."""
    c, h, w, s = 32769, 256, 256, 128
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(1, c, h, w, dtype=torch.bfloat16)
    x[:, :, ::s, ::s] = torch.randn(1, c, h // s, w // s, generator=gen).bfloat16()
    weight = torch.randn(1, c, 1, 1, generator=gen).bfloat16()
    yield x, weight, s
    del x


@pytest.mark.slow
@pytest.mark.parametrize("shapes", ["static", "dynamic"])
def test_forward_reads_past_int32_elements(input_past_int32, shapes, monkeypatch):
    """The last channels lie past 2^31 elements: int32 indexing failed to lower (static) or
    crashed (dynamic)."""
    monkeypatch.setenv("DCN_TVM_SHAPES", shapes)
    x, weight, s = input_past_int32
    offset = torch.zeros(1, 2, x.shape[2] // s, x.shape[3] // s, dtype=x.dtype)
    out = dcn_tvm.deform_conv2d(x, offset, weight, stride=s)
    expected = torch.einsum("oc,nchw->nohw", weight[:, :, 0, 0].double(), x[:, :, ::s, ::s].double())
    assert relative_error(out, expected) <= 1e-2
