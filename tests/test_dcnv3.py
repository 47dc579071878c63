"""dcnv3_core / dcnv4_core and the DCNv3 / DCNv4 modules against independent references
(tests/reference_dcnv3.py: float64 loops from InternImage's CUDA kernel semantics, and autograd
through a grid_sample formulation), on the CPU and on the simulated GPU (tests/gpusim.py).

The pads follow InternImage's CUDA kernel (pad_h pads the height), not its PyTorch fallback, which
swaps them: the cases with pad_h != pad_w check that.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference_dcnv3 import dcnv3_grid_sample, dcnv3_loops, pack_offset_mask, unpack_offset_mask

import dcn_tvm
from dcn_tvm.ops import dcnv3 as ops

# (N, H, W, group, group_channels, kernel, stride, pad, dilation, offset_scale, remove_center)
CASES = [
    (2, 6, 7, 2, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False),
    (1, 7, 9, 3, 5, (3, 3), (2, 1), (2, 0), (1, 2), 0.5, True),
    (1, 5, 8, 1, 4, (1, 3), (1, 2), (0, 1), (1, 1), 1.3, True),
    (2, 5, 5, 4, 2, (5, 5), (1, 1), (2, 2), (1, 1), 1.0, False),
    (1, 4, 5, 3, 1, (3, 1), (1, 1), (1, 0), (1, 1), 1.0, False),  # one channel a group: vectors of extent 1
]


def case_id(case):
    n, h, w, g, gc, k, s, p, d, scale, rc = case
    return f"n{n}h{h}w{w}g{g}gc{gc}k{k[0]}x{k[1]}s{s[0]}x{s[1]}p{p[0]}x{p[1]}d{d[0]}x{d[1]}os{scale}rc{int(rc)}"


def output_size(case):
    _, h, w, _, _, k, s, p, d, _, _ = case
    return tuple((size + 2 * p[a] - d[a] * (k[a] - 1) - 1) // s[a] + 1 for a, size in enumerate((h, w)))


def make_inputs(case, dtype=torch.float32, seed=0):
    """(input, offset, mask) of a case: offsets spread past the borders, a few samples far outside,
    masks in [0, 1) and some negative."""
    n, h, w, g, gc, k, *_ = case
    remove_center = case[-1]
    points = k[0] * k[1] - int(remove_center)
    out_h, out_w = output_size(case)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, w, g * gc, generator=gen)
    offset = torch.randn(n, out_h, out_w, g * points * 2, generator=gen) * 2
    offset.view(-1)[::7] += 40  # far outside: samples nothing
    mask = torch.rand(n, out_h, out_w, g * points, generator=gen) * 1.5 - 0.25
    return x.to(dtype), offset.to(dtype), mask.to(dtype)


def arguments(case):
    """The scalar arguments of dcnv3_core / dcnv4_core in order."""
    _, _, _, g, gc, k, s, p, d, scale, rc = case
    return (*k, *s, *p, *d, g, gc, scale, rc)


def reference_arguments(case):
    _, _, _, g, _, k, s, p, d, scale, rc = case
    return k, s, p, d, g, scale, rc


def run(case, x, offset, mask, packed):
    if packed:
        return dcn_tvm.dcnv4_core(x, pack_offset_mask(offset, mask, case[3]), *arguments(case))
    return dcn_tvm.dcnv3_core(x, offset, mask, *arguments(case))


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()


@pytest.fixture(params=["static", "dynamic"], ids=["exact-size", "shape-generic"])
def kernel_sizes(request, monkeypatch):
    """The calls run the kernels of their exact sizes, or the shape-generic ones (DCN_TVM_SHAPES=dynamic), whose
    output size is a size of its own rather than the window arithmetic of the input's."""
    from dcn_tvm.ops import shapes

    monkeypatch.setenv("DCN_TVM_SHAPES", request.param)
    shapes.forget()
    yield
    shapes.forget()


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_loop_reference(case, packed, kernel_sizes):
    x, offset, mask = make_inputs(case, torch.float64)
    out = run(case, x, offset, mask, packed)
    expected = dcnv3_loops(x, offset, mask, *reference_arguments(case))
    assert out.shape == (x.shape[0], *output_size(case), x.shape[3]) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_grid_sample_formulation_agrees_with_loops():
    case = CASES[1]
    x, offset, mask = make_inputs(case, torch.float64)
    torch.testing.assert_close(dcnv3_grid_sample(x, offset, mask, *reference_arguments(case)),
                               dcnv3_loops(x, offset, mask, *reference_arguments(case)))


def _gradients(case, packed, dtype=torch.float64, seed=0):
    """(ours, expected): gradients of input, offset, mask through the op and through grid_sample autograd."""
    x, offset, mask = make_inputs(case, dtype, seed)
    grad_output = torch.randn(x.shape[0], *output_size(case), x.shape[3],
                              generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
    ours = torch.autograd.grad(run(case, *leaves, packed), leaves, grad_output)
    reference = [t.double().requires_grad_() for t in (x, offset, mask)]
    expected = torch.autograd.grad(dcnv3_grid_sample(*reference, *reference_arguments(case)), reference,
                                   grad_output.double())
    return ours, expected


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradients_match_grid_sample_autograd(case, packed, kernel_sizes):
    ours, expected = _gradients(case, packed)
    for name, a, b in zip(("input", "offset", "mask"), ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def wide_group_case(group_channels):
    """A 3x3 'same' case of 2 groups, each of `group_channels` channels."""
    return (1, 5, 6, 2, group_channels, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False)


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
@pytest.mark.parametrize("group_channels, dtype", [(16, torch.float64), (16, torch.float32), (8, torch.float64),
                                                    (6, torch.float64)], ids=["gc16-f64", "gc16-f32", "gc8", "gc6"])
def test_gradients_with_wide_groups(group_channels, dtype, packed):
    """The CPU backward's corner dot products in vectors of partial sums: InternImage's 16 channels a group
    (four vectors of 4 lanes), 8 (two) and 6 (three of 2 lanes); CASES have 5 channels a group at most."""
    ours, expected = _gradients(wide_group_case(group_channels), packed, dtype)
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    for name, a, b in zip(("input", "offset", "mask"), ours, expected):
        torch.testing.assert_close(a.double(), b, rtol=tolerance, atol=tolerance, msg=name)


def test_packed_gradient_is_zero_in_the_padding():
    case = CASES[0]  # G*P*3 = 54 channels, padded to 56
    x, offset, mask = make_inputs(case, torch.float64)
    packed = pack_offset_mask(offset, mask, case[3]).requires_grad_()
    dcn_tvm.dcnv4_core(x, packed, *arguments(case)).sum().backward()
    assert packed.shape[-1] == 56 and packed.grad[..., 54:].abs().max() == 0
    grad_offset, grad_mask = unpack_offset_mask(packed.grad, case[3], 9)
    assert grad_offset.abs().max() > 0 and grad_mask.abs().max() > 0


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_offset_gradient_on_whole_pixels_is_the_derivative_from_above(packed):
    """Samples exactly on pixel rows and columns (bfloat16 offsets land there often): the offset gradient
    is the one-sided derivative towards larger coordinates, as the floor of InternImage's CUDA kernel
    gives it: grid_sample autograd a hair above. Every position is >= 0 here (no pad, offsets >= 0):
    on -1 the sample is outside, its derivative zero."""
    case = (1, 5, 6, 2, 3, (3, 3), (1, 1), (0, 0), (1, 1), 1.0, False)
    gen = torch.Generator().manual_seed(3)
    x, offset, mask = make_inputs(case, torch.float64)
    offset = torch.randint(0, 3, offset.shape, generator=gen).double()
    grad_output = torch.randn(1, *output_size(case), x.shape[3], generator=gen, dtype=torch.float64)

    def offset_gradient(function, offset):
        leaf = offset.clone().requires_grad_()
        return torch.autograd.grad(function(x, leaf, mask), leaf, grad_output)[0]

    def reference(x, offset, mask):
        return dcnv3_grid_sample(x, offset, mask, *reference_arguments(case))

    expected = offset_gradient(reference, offset + 1e-9)
    assert (expected - offset_gradient(reference, offset - 1e-9)).abs().max() > 0.1  # the side matters
    ours = offset_gradient(lambda *tensors: run(case, *tensors, packed), offset)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_gradcheck_float64(packed):
    case = (1, 4, 5, 2, 2, (3, 3), (1, 1), (1, 0), (1, 1), 0.7, False)
    x, offset, mask = make_inputs(case, torch.float64)
    offset = offset.remainder(1.0) * 0.8 + 0.1  # away from integer positions (the kink of floor)
    leaves = [t.requires_grad_() for t in (x, offset, mask)]
    assert torch.autograd.gradcheck(lambda *t: run(case, *t, packed), leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_opcheck(packed):
    case = CASES[1]
    x, offset, mask = make_inputs(case)
    if packed:
        sampling, op = [pack_offset_mask(offset, mask, case[3])], torch.ops.dcn_tvm.dcnv4_core.default
    else:
        sampling, op = [offset, mask], torch.ops.dcn_tvm.dcnv3_core.default
    tensors = [t.requires_grad_() for t in (x, *sampling)]
    torch.library.opcheck(op, (*tensors, *ops._arguments(*arguments(case))))


def test_torch_compile_fullgraph():
    case = CASES[0]
    x, offset, mask = make_inputs(case)

    def layer(x, offset, mask):
        return (dcn_tvm.dcnv3_core(x, offset, mask, *arguments(case)) * 2).relu()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, offset, mask), layer(x, offset, mask))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype, tolerance):
    """float16/bfloat16 tensors, computed in float32: forward and gradients against float64."""
    case = CASES[1]
    ours, expected = _gradients(case, packed=False, dtype=dtype)
    x, offset, mask = make_inputs(case, dtype)
    out = run(case, x, offset, mask, False)
    assert out.dtype == dtype
    assert relative_error(out, dcnv3_loops(x, offset, mask, *reference_arguments(case))) < tolerance
    for name, a, b in zip(("input", "offset", "mask"), ours, expected):
        assert a.dtype == dtype and relative_error(a, b) < 4 * tolerance, name


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
@pytest.mark.parametrize("case", [CASES[1], wide_group_case(16)], ids=["gc5", "gc16"])
def test_bfloat16_backward_runs_bfloat16_kernels(case, packed, monkeypatch):
    """bfloat16 gradients come from the bfloat16 kernels (float32 sums), not from float32 copies, and match
    float64 autograd to bfloat16's precision. (The backward kernel before 6bc7461 was wrong in bfloat16,
    relative error 1e9, and the op ran the float32 kernels on copies.)"""
    get_kernel, stages = ops.get_kernel, []
    monkeypatch.setattr(ops, "get_kernel", lambda spec: stages.append((spec.stage, spec.geometry.dtype))
                        or get_kernel(spec))
    ours, expected = _gradients(case, packed, dtype=torch.bfloat16)
    assert stages == [("forward", "bfloat16"), ("backward", "bfloat16"), ("scatter", "bfloat16")]
    for name, a, b in zip(("input", "offset", "mask"), ours, expected):
        assert a.dtype == torch.bfloat16 and relative_error(a, b) < 2e-2, name


def test_autocast_runs_in_float32():
    case = CASES[0]
    x, offset, mask = make_inputs(case, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dcn_tvm.dcnv3_core(x, offset.float(), mask, *arguments(case))
    expected = dcn_tvm.dcnv3_core(x.float(), offset.float(), mask.float(), *arguments(case))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.to(torch.bfloat16))


def test_forward_mode_ad_is_refused():
    case = CASES[0]
    x, offset, mask = make_inputs(case, torch.float64)
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jvp(lambda t: dcn_tvm.dcnv3_core(t, offset, mask, *arguments(case)), (x,), (torch.ones_like(x),))


def test_nan_and_huge_offsets_sample_nothing():
    case = CASES[0]
    x, offset, mask = make_inputs(case)
    offset[..., :4] = torch.tensor([float("nan"), 1e30, float("inf"), -1e30])
    leaves = [t.requires_grad_() for t in (x, offset, mask)]
    out = dcn_tvm.dcnv3_core(*leaves, *arguments(case))
    out.sum().backward()
    assert all(torch.isfinite(t).all() for t in (out, x.grad, offset.grad, mask.grad))
    # Point 0 of group 0 (offsets 0, 1) and point 1 (offsets 2, 3) sample nothing: their mask gradient is 0.
    assert mask.grad[..., :2].abs().max() == 0 and offset.grad[..., :4].abs().max() == 0


def test_empty_batch_and_non_contiguous_inputs():
    case = CASES[0]
    x, offset, mask = make_inputs(case)
    out = dcn_tvm.dcnv3_core(x[:0], offset[:0], mask[:0], *arguments(case))
    assert out.shape == (0, *output_size(case), x.shape[3])
    strided = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    torch.testing.assert_close(dcn_tvm.dcnv3_core(strided, offset, mask, *arguments(case)),
                               dcn_tvm.dcnv3_core(x, offset, mask, *arguments(case)))


def test_spec_key_is_readable():
    case = CASES[1]
    x, offset, mask = make_inputs(case)
    geo = ops.geometry(x, [offset, mask], ops._arguments(*arguments(case)), packed=False)
    assert ops._spec("forward", geo, x).key.startswith(
        "dcnv3_forward_float32_g3_gc5_k3x3_s2x1_p2x0_d1x2_scale0p5_rc1_v3_n1_h7_w9_llvm-")


def _bad(**changes):
    """dcnv3_core's (input, offset, mask, arguments) for CASES[0] with `changes` applied."""
    case = CASES[0]
    x, offset, mask = make_inputs(case)
    values = dict(zip(("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w",
                       "group", "group_channels", "offset_scale", "remove_center"), arguments(case)))
    tensors = {"input": x, "offset": offset, "mask": mask}
    for key, value in changes.items():
        (tensors if key in tensors else values)[key] = value(tensors[key]) if callable(value) else value
    return tensors, values


@pytest.mark.parametrize("changes,error,message", [
    (dict(group_channels=4), ValueError, r"input must have shape \[N, H, W, 8\]"),
    (dict(offset=lambda t: t[..., :-2]), ValueError, r"offset must have shape \(2, 6, 7, 36\).*group\*points\*2"),
    (dict(mask=lambda t: t[..., :-1]), ValueError, r"mask must have shape \(2, 6, 7, 18\)"),
    (dict(mask=lambda t: t[:, :-1]), ValueError, r"mask must have shape"),
    (dict(remove_center=True, kernel_w=2), ValueError, "remove_center needs an odd kernel"),
    (dict(kernel_h=9, pad_h=0), ValueError, "does not fit the padded input"),
    (dict(group=0), ValueError, "group must be >= 1"),
    (dict(stride_h=1.5), TypeError, "stride_h must be an int"),
    (dict(offset_scale=float("nan")), ValueError, "offset_scale must be finite"),
    (dict(mask=lambda t: t.double()), TypeError, "mask must have the input's dtype"),
    (dict(input=lambda t: t[0]), ValueError, "input must have 4 dimensions"),
])
def test_bad_arguments_raise_clear_errors(changes, error, message):
    tensors, values = _bad(**changes)
    with pytest.raises(error, match=message):
        dcn_tvm.dcnv3_core(tensors["input"], tensors["offset"], tensors["mask"], *values.values())


def test_dcnv4_offset_mask_width_is_checked():
    case = CASES[0]
    x, offset, mask = make_inputs(case)
    packed = pack_offset_mask(offset, mask, case[3])
    with pytest.raises(ValueError, match=r"offset_mask must have shape \(2, 6, 7, 56\).*multiple of 8"):
        dcn_tvm.dcnv4_core(x, packed[..., :54], *arguments(case))


def _upstream_dcnv3_state(channels, group, kernel, norm, centre=False, remove_center=False):
    """The state_dict key names and shapes of InternImage's DCNv3 module (ops_dcnv3/modules/dcnv3.py)."""
    points = kernel * kernel - int(remove_center)
    state = {"dw_conv.0.weight": (channels, 1, kernel, kernel), "dw_conv.0.bias": (channels,),
             "offset.weight": (group * points * 2, channels), "offset.bias": (group * points * 2,),
             "mask.weight": (group * points, channels), "mask.bias": (group * points,),
             "input_proj.weight": (channels, channels), "input_proj.bias": (channels,),
             "output_proj.weight": (channels, channels), "output_proj.bias": (channels,)}
    if norm == "LN":
        state.update({"dw_conv.1.1.weight": (channels,), "dw_conv.1.1.bias": (channels,)})
    else:
        state.update({f"dw_conv.1.0.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")})
        state["dw_conv.1.0.num_batches_tracked"] = ()
    if centre:
        state.update({"center_feature_scale_proj_weight": (group, channels), "center_feature_scale_proj_bias": (group,)})
    return state


def _upstream_dcnv4_state(channels, group, kernel, dw_kernel=None, centre=False, output_bias=True,
                          without_pointwise=False):
    """The state_dict key names and shapes of FlashInternImage's DCNv4 module (DCNv4_op/DCNv4/modules/dcnv4.py)."""
    packed = -(-group * kernel * kernel * 3 // 8) * 8
    state = {"offset_mask.weight": (packed, channels), "offset_mask.bias": (packed,)}
    if dw_kernel is not None:
        state.update({"offset_mask_dw.weight": (channels, 1, dw_kernel, dw_kernel), "offset_mask_dw.bias": (channels,)})
    if not without_pointwise:
        state.update({"value_proj.weight": (channels, channels), "value_proj.bias": (channels,),
                      "output_proj.weight": (channels, channels)})
        if output_bias:
            state["output_proj.bias"] = (channels,)
    if centre:
        state.update({"center_feature_scale_proj_weight": (group, channels), "center_feature_scale_proj_bias": (group,)})
    return state


def _random_state(shapes):
    gen = torch.Generator().manual_seed(3)
    state = {key: (torch.tensor(7) if not shape else torch.randn(shape, generator=gen) * 0.3)
             for key, shape in shapes.items()}
    return {key: value.abs() + 0.5 if key.endswith("running_var") else value for key, value in state.items()}


@pytest.mark.parametrize("norm,centre", [("LN", False), ("BN", True)])
def test_dcnv3_module_loads_upstream_state_and_matches_grid_sample(norm, centre, monkeypatch):
    layer = dcn_tvm.DCNv3(channels=24, group=3, norm_layer=norm, center_feature_scale=centre).eval()
    assert layer.offset.weight.abs().max() == 0 and layer.mask.weight.abs().max() == 0  # upstream's init
    layer.load_state_dict(_random_state(_upstream_dcnv3_state(24, 3, 3, norm, centre)), strict=True)
    x = torch.randn(2, 6, 5, 24)
    out = layer(x)

    def grid_sample_core(input, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, group, gc, scale, rc):
        return dcnv3_grid_sample(input, offset, mask, (kh, kw), (sh, sw), (ph, pw), (dh, dw), group, scale, rc)

    monkeypatch.setattr(ops, "dcnv3_core", grid_sample_core)
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [dict(dw_kernel=3, centre=True), dict(output_bias=False),
                                     dict(without_pointwise=True)])
def test_dcnv4_module_loads_upstream_state_and_matches_grid_sample(options, monkeypatch):
    upstream = dict(dw_kernel_size=options.get("dw_kernel"), center_feature_scale=options.get("centre", False),
                    output_bias=options.get("output_bias", True), without_pointwise=options.get("without_pointwise", False))
    layer = dcn_tvm.DCNv4(channels=16, group=2, **upstream).eval()
    layer.load_state_dict(_random_state(_upstream_dcnv4_state(16, 2, 3, **options)), strict=True)
    x = torch.randn(2, 4 * 6, 16)
    out = layer(x, shape=(4, 6))
    assert out.shape == x.shape

    def grid_sample_core(input, offset_mask, kh, kw, sh, sw, ph, pw, dh, dw, group, gc, scale, rc):
        offset, mask = unpack_offset_mask(offset_mask, group, kh * kw - int(rc))
        return dcnv3_grid_sample(input, offset, mask, (kh, kw), (sh, sw), (ph, pw), (dh, dw), group, scale, rc)

    monkeypatch.setattr(ops, "dcnv4_core", grid_sample_core)
    torch.testing.assert_close(out, layer(x, shape=(4, 6)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- simulated GPU

GPU_TARGET = "cuda-sm_90"
# Groups 1-8, group_channels 4 to 64 (odd 5, 7), kernels 3x3, 5x5, 1x3, strides, dilations, remove_center;
# DCNv4's layout in two (its 5x5 remove_center case took 6.5 minutes before its backward's threads computed
# one sample each, 40 s since, on 2 cores).
GPU_CASES = [
    ((1, 5, 6, 1, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False), False),
    ((1, 6, 5, 2, 5, (5, 5), (2, 1), (2, 1), (1, 1), 0.8, True), False),
    ((2, 4, 7, 8, 7, (1, 3), (1, 2), (0, 1), (1, 2), 1.0, False), False),
    ((1, 4, 3, 1, 64, (3, 3), (1, 1), (2, 1), (2, 1), 1.2, True), False),
    ((1, 4, 4, 4, 16, (3, 3), (2, 2), (1, 1), (1, 1), 1.0, False), True),
    ((1, 6, 5, 2, 5, (5, 5), (2, 1), (2, 1), (1, 1), 0.8, True), True),
    (CASES[4], False),
    (CASES[4], True),
]


@pytest.fixture
def simulated_gpu(simulated_gpu_of):
    """Inside the context it returns, dcnv3_core / dcnv4_core on CPU tensors run the simulated CUDA kernels."""
    return simulated_gpu_of(ops)


def _matches_on_the_simulated_gpu(case, packed, simulated_gpu, dtype=torch.float32) -> None:
    """The op on the simulated GPU: its output against the loops, its gradients against grid_sample autograd
    (both in float64 from the same inputs)."""
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    x, offset, mask = make_inputs(case, dtype)
    with simulated_gpu():
        out = run(case, x, offset, mask, packed)
        ours, expected = _gradients(case, packed, dtype=dtype)
    torch.testing.assert_close(out.double(), dcnv3_loops(x, offset, mask, *reference_arguments(case)),
                               rtol=tolerance, atol=tolerance)
    for name, a, b in zip(("input", "offset", "mask"), ours, expected):
        assert a.dtype == dtype and torch.isfinite(a).all() and relative_error(a, b) < tolerance, name


@pytest.mark.parametrize("case,packed", GPU_CASES, ids=[f"{case_id(c)}-{'v4' if p else 'v3'}" for c, p in GPU_CASES])
def test_simulated_gpu_forward_and_gradients(case, packed, simulated_gpu):
    _matches_on_the_simulated_gpu(case, packed, simulated_gpu)


@pytest.mark.parametrize("case,packed", [GPU_CASES[0], GPU_CASES[4]], ids=["v3", "v4-stride2"])
def test_simulated_gpu_bfloat16(case, packed, simulated_gpu):
    """The bfloat16 CUDA kernels, forward and backward (float32 sums, bfloat16's rounding)."""
    _matches_on_the_simulated_gpu(case, packed, simulated_gpu, torch.bfloat16)


@pytest.mark.parametrize("kernel_sizes", ["dynamic"], indirect=True)
@pytest.mark.parametrize("case,packed", [GPU_CASES[1], GPU_CASES[4]], ids=["v3-5x5-stride2x1", "v4-stride2"])
def test_simulated_gpu_shape_generic_kernels(case, packed, simulated_gpu, kernel_sizes):
    """The shape-generic CUDA kernels of geometries whose output is smaller than the input: TVM 0.27 could
    not bind their threads while the output size was the input's window arithmetic (InternalError)."""
    _matches_on_the_simulated_gpu(case, packed, simulated_gpu)


def test_workloads_name_the_ops_kernels():
    """A preset's workload gives the very specs the op asks for (forward, backward, scatter), and back."""
    from dcn_tvm.kernels import workloads

    (workload,) = [w for w in workloads.resolve(["flashinternimage-t"]) if dict(w.values)["h"] == 56]
    x = torch.randn(1, 56, 56, 64)
    packed = torch.randn(1, 56, 56, 112)
    geo = ops.geometry(x, [packed], ops._arguments(3, 3, 1, 1, 1, 1, 1, 1, 4, 16, 1.0, False), packed=True)
    tasks = workload.tasks("llvm-znver4")
    assert [t.spec for t in tasks] == [
        dataclasses.replace(ops._spec(stage, geo, x), target="llvm-znver4") for stage in ("forward", "backward", "scatter")]
    assert workloads.of_spec(tasks[0].spec) == workload and workloads.Workload.parse(str(workload)) == workload
    with pytest.raises(ValueError, match="remove_center needs an odd kernel"):
        workloads.Workload.parse("dcnv3:n=1,h=8,w=8,group=2,group_channels=4,k=2,remove_center=1")


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_onnx_form_matches_loop_reference(case, packed):
    """The form the ONNX export traces (dcn_tvm.ops.onnx_forms), in float64, NaN and huge offsets included."""
    from dcn_tvm.ops import onnx_forms

    x, offset, mask = make_inputs(case, torch.float64)
    offset[..., :3] = torch.tensor([float("nan"), 1e30, -float("inf")])
    expected = dcnv3_loops(x, offset, mask, *reference_arguments(case))
    if packed:
        out = onnx_forms.dcnv4_core(x, pack_offset_mask(offset, mask, case[3]), *arguments(case))
    else:
        out = onnx_forms.dcnv3_core(x, offset, mask, *arguments(case))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_onnx_export_runs_in_onnxruntime(packed):
    """The modules export to standard ONNX ops through a plain torch.onnx.export, and through to_onnx of a
    torch.export.ExportedProgram holding the op; onnxruntime matches them, DCNv3's at a second image size
    too (dynamic batch and spatial sizes). So does the export of the model as a CUDA model."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from test_export import export_as_cuda_model, run_onnxruntime, standard_op_exports

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = dcn_tvm.DCNv4(channels=16, group=2, dw_kernel_size=3) if packed else \
                dcn_tvm.DCNv3(channels=24, group=3)

        def forward(self, x):
            return self.layer(x, (5, 6)) if packed else self.layer(x)

    torch.manual_seed(0)
    model = Model().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.3)  # offsets past the borders
    x = torch.randn(2, 5 * 6, 16) if packed else torch.randn(2, 5, 6, 24)
    dynamic = torch.export.Dim.DYNAMIC  # channels-last: the channels are the last dimension
    shapes = None if packed else ({0: dynamic, 1: dynamic, 2: dynamic},)
    exports = [(program, [x] if packed else [x, torch.randn(1, 7, 4, 24)])
               for program in standard_op_exports(model, (x,), shapes)]
    exports.append((export_as_cuda_model(Model, (x,), model.state_dict()), [x]))
    for program, samples in exports:
        for sample in samples:
            torch.testing.assert_close(torch.from_numpy(run_onnxruntime(program.model_proto, sample)[0]),
                                       model(sample), rtol=1e-4, atol=1e-4)


def dcnv4_gpu_spec(case, stage: str, dtype: str = "float32"):
    """The sm_90 KernelSpec of a DCNv4 case's stage at the case's exact sizes."""
    from dcn_tvm.geometry.dcnv3 import dcnv3_geometry
    from dcn_tvm.kernels.spec import KernelSpec

    n, h, w, group, group_channels, kernel, stride, pad, dilation, scale, remove_center = case
    x, offset, mask = make_inputs(case)
    geo = dcnv3_geometry(x.shape, [pack_offset_mask(offset, mask, group).shape], kernel, stride, pad, dilation, group,
                         group_channels, scale, remove_center, True, dtype)
    return KernelSpec("dcnv3", stage, geo, (("n", n), ("h", h), ("w", w)), GPU_TARGET)


@pytest.mark.parametrize("kernel, remove_center", [((3, 3), False), ((3, 3), True), ((5, 5), False)])
def test_dcnv4_cuda_backward_thread_computes_its_own_samples_corner_dots(kernel, remove_center):
    """A thread of the DCNv4 CUDA backward writes one channel of the offset_mask gradient and computes the
    corner dots of that channel's sample alone: 4 corners x group_channels products. (Its point was once a
    Select, whose region took both sides: 1 to P points a thread, 5 on average at 3x3, and 50 s to build
    InternImage-T's stage 1 on 2 cores, 18 s since.)"""
    from tvm.s_tir import Schedule

    from dcn_tvm.kernels.build import scheduled

    group_channels = 16
    case = (1, 9, 11, 4, group_channels, kernel, (1, 1), (kernel[0] // 2, kernel[1] // 2), (1, 1), 1.0, remove_center)
    sch = Schedule(scheduled(dcnv4_gpu_spec(case, "backward")))
    loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("corner_dots"))]
    bound = [loop.thread_binding is not None for loop in loops]
    assert [loop.thread_binding.thread_tag for loop in loops if loop.thread_binding is not None] == [
        "blockIdx.x", "threadIdx.x"] and bound == sorted(bound, reverse=True)
    assert [int(loop.extent) for loop in loops if loop.thread_binding is None] == [4, group_channels]


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="ptxas (nvcc) is not on PATH")
def test_cuda_builds_fit_sm_90():
    """Every stage of a DCNv4 geometry (the largest kernels: its backward holds the corner dots) builds
    for sm_90 in float16 under ptxas' resource check (dcn_tvm.kernels.resources). A DCNv3 5x5 geometry,
    and float64 at symbolic sizes, pass too (measured; minutes of nvcc on 2 cores)."""
    from dcn_tvm.kernels.build import compile_functions, scheduled

    case = (1, 9, 11, 4, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, True)
    specs = [dcnv4_gpu_spec(case, stage, "float16") for stage in ("forward", "backward", "scatter")]
    compile_functions({spec.workload_key: scheduled(spec) for spec in specs}, GPU_TARGET)
