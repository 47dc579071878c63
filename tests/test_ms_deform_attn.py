"""ms_deform_attn against a float64 loop reference of its formula and autograd of the grid_sample
formulation; gradcheck, opcheck, torch.compile, autocast, shape errors; the module and the encoder layer;
the CUDA schedules on the simulated GPU (tests/gpusim.py) and under ptxas."""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
from reference_ms_deform_attn import ms_deform_attn_grid_sample, ms_deform_attn_loops

import dcn_tvm
from dcn_tvm.kernels.workloads import Workload
from dcn_tvm.ops import ms_deform_attn as msda_ops

#: (N, level shapes, heads M, head_dim D, points P, queries Lq): three levels down to 1x1, heads and
#: channels off any vector width.
CASE = (2, ((5, 7), (3, 4), (1, 1)), 3, 5, 2, 6)
#: CASE and one of a single channel per head (its vector loops have extent 1: the CPU schedules failed).
CASES = [CASE, (1, ((4, 3), (2, 2)), 2, 1, 3, 5)]


def level_tensors(levels):
    """(spatial_shapes [L, 2] int64, level_start_index [L] int64)."""
    shapes = torch.tensor(levels, dtype=torch.int64)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    return shapes, starts


def make_inputs(case=CASE, dtype=torch.float64, seed=0, non_finite=False):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights): locations in
    [-0.25, 1.25] (some samples wholly or partly outside their level), with `non_finite` NaN, inf and
    huge ones, and pixel-exact ones (corners, borders)."""
    n, levels, heads, head_dim, points, queries = case
    gen = torch.Generator().manual_seed(seed)
    shapes, starts = level_tensors(levels)
    value = torch.randn(n, int((shapes[:, 0] * shapes[:, 1]).sum()), heads, head_dim, generator=gen)
    locations = torch.rand(n, queries, heads, len(levels), points, 2, generator=gen) * 1.5 - 0.25
    weights = torch.rand(n, queries, heads, len(levels), points, generator=gen)
    if non_finite:
        flat = locations.view(-1, 2)
        flat[0] = torch.tensor([float("nan"), 0.5])
        flat[1] = torch.tensor([0.5, float("inf")])
        flat[2] = torch.tensor([-float("inf"), -float("inf")])
        flat[3] = torch.tensor([3e38, 0.5])
        flat[4] = torch.tensor([0.0, 1.0])  # a corner of the map
        flat[5] = torch.tensor([0.5, 0.5])
    return value.to(dtype), shapes, starts, locations.to(dtype), weights.to(dtype)


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()


def test_grid_sample_formulation_agrees_with_loops():
    value, shapes, starts, locations, weights = make_inputs(seed=1)
    assert relative_error(ms_deform_attn_grid_sample(value, shapes, locations, weights),
                          ms_deform_attn_loops(value, shapes, locations, weights)) <= 1e-13


@pytest.mark.parametrize("case", CASES, ids=["d5", "d1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_loops_non_finite_locations_sample_nothing(dtype, case):
    n, _, heads, head_dim, _, queries = case
    value, shapes, starts, locations, weights = make_inputs(case, dtype=dtype, seed=2, non_finite=True)
    out = dcn_tvm.ms_deform_attn(value, shapes, starts, locations, weights)
    assert out.shape == (n, queries, heads * head_dim) and out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, ms_deform_attn_loops(value, shapes, locations, weights)) <= (
        1e-13 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("case", CASES, ids=["d5", "d1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_matches_autograd_of_grid_sample(dtype, case):
    value, shapes, starts, locations, weights = make_inputs(case, dtype=dtype, seed=3)
    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    out = dcn_tvm.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, grad)
    theirs = torch.autograd.grad(ms_deform_attn_grid_sample(leaves[0], shapes, leaves[1], leaves[2]), leaves, grad)
    for name, a, b in zip(("value", "sampling_locations", "attention_weights"), ours, theirs):
        assert a.dtype == dtype and relative_error(a, b) <= (1e-12 if dtype == torch.float64 else 1e-5), name


def test_non_finite_locations_have_zero_gradients():
    value, shapes, starts, locations, weights = make_inputs(seed=4, non_finite=True)
    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    dcn_tvm.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2]).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert (locations.grad.view(-1, 2)[:4] == 0).all() and (weights.grad.view(-1)[:4] == 0).all()


def test_gradcheck_float64():
    value, shapes, starts, locations, weights = make_inputs(seed=5)

    def attend(value, locations, weights):
        return dcn_tvm.ms_deform_attn(value, shapes, starts, locations, weights)

    assert torch.autograd.gradcheck(attend, (value.requires_grad_(), locations.requires_grad_(),
                                             weights.requires_grad_()), eps=1e-6, atol=1e-5, fast_mode=True)


def test_opcheck():
    value, shapes, starts, locations, weights = make_inputs(seed=6)
    torch.library.opcheck(torch.ops.dcn_tvm.ms_deform_attn.default,
                          (value.requires_grad_(), shapes, starts, locations.requires_grad_(),
                           weights.requires_grad_()))
    grad = torch.randn(2, 6, 15, dtype=torch.float64)
    torch.library.opcheck(torch.ops.dcn_tvm.ms_deform_attn_backward.default,
                          (grad, value.detach(), shapes, starts, locations.detach(), weights.detach()))


def test_torch_compile_fullgraph():
    value, shapes, starts, locations, weights = make_inputs(dtype=torch.float32, seed=7)
    leaves = [t.requires_grad_() for t in (value, locations, weights)]

    def attend(value, locations, weights):
        return dcn_tvm.ms_deform_attn(value, shapes, starts, locations, weights).relu().sum()

    compiled = torch.compile(attend, fullgraph=True)
    ours = torch.autograd.grad(compiled(*leaves), leaves)
    eager = torch.autograd.grad(attend(*leaves), leaves)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b)


def test_half_dtypes_and_autocast():
    """bfloat16 computes in float32 and rounds once; under autocast, bfloat16 inputs run in float32."""
    value, shapes, starts, locations, weights = make_inputs(dtype=torch.bfloat16, seed=8)
    expected = ms_deform_attn_loops(value, shapes, locations, weights)
    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    out = dcn_tvm.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
    assert out.dtype == torch.bfloat16 and relative_error(out, expected) <= 1e-2
    out.float().sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad).all() for t in leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = dcn_tvm.ms_deform_attn(value.detach(), shapes, starts, locations.detach().float(), weights.detach())
    assert mixed.dtype == torch.bfloat16 and relative_error(mixed, expected) <= 1e-2


def test_forward_mode_ad_is_refused():
    value, shapes, starts, locations, weights = make_inputs(seed=9)
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jvp(lambda v: dcn_tvm.ms_deform_attn(v, shapes, starts, locations, weights), (value,),
                       (torch.ones_like(value),))


def test_zero_queries_and_images():
    value, shapes, starts, locations, weights = make_inputs(dtype=torch.float32, seed=10)
    for n, q in ((2, 0), (0, 6)):
        leaves = [value[:n].requires_grad_(), locations[:n, :q].requires_grad_(), weights[:n, :q].requires_grad_()]
        out = dcn_tvm.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
        assert out.shape == (n, q, 15)
        out.sum().backward()
        assert all((t.grad == 0).all() for t in leaves)


@pytest.mark.parametrize("change, error, message", [
    (lambda a: {**a, "value": a["value"][:, 1:]}, ValueError, r"value has S = 47 rows .* cover sum\(H\*W\) = 48"),
    (lambda a: {**a, "spatial_shapes": a["spatial_shapes"].flip(0)}, ValueError,
     r"level_start_index must be \[0, 1, 13\]"),
    (lambda a: {**a, "level_start_index": a["level_start_index"] + 1}, ValueError,
     r"level_start_index must be \[0, 35, 47\]"),
    (lambda a: {**a, "spatial_shapes": a["spatial_shapes"][:, :1]}, ValueError, r"spatial_shapes must be \[L, 2\]"),
    (lambda a: {**a, "spatial_shapes": a["spatial_shapes"] * 0}, ValueError, r"spatial_shapes must hold sizes >= 1"),
    (lambda a: {**a, "spatial_shapes": a["spatial_shapes"].double()}, TypeError, "spatial_shapes must have an integer"),
    (lambda a: {**a, "sampling_locations": a["sampling_locations"][..., :1]}, ValueError,
     r"sampling_locations must have shape \[N=2, Lq, M=3, L=3, P >= 1, 2\]"),
    (lambda a: {**a, "sampling_locations": a["sampling_locations"][:, :, :2]}, ValueError, "sampling_locations must"),
    (lambda a: {**a, "attention_weights": a["attention_weights"][..., :1]}, ValueError,
     r"attention_weights must have shape \(2, 6, 3, 3, 2\)"),
    (lambda a: {**a, "attention_weights": a["attention_weights"].float()}, TypeError,
     "attention_weights must have value's dtype"),
    (lambda a: {**a, "value": a["value"].int()}, TypeError, "value must have a floating dtype"),
    (lambda a: {**a, "value": a["value"][0]}, ValueError, "value must have 4 dimensions"),
    (lambda a: {**a, "level_start_index": a["level_start_index"].to("meta")}, ValueError,
     "level_start_index is on meta but value is on cpu"),
    (lambda a: {**a, "attention_weights": a["attention_weights"].tolist()}, TypeError,
     "attention_weights must be a torch.Tensor"),
])
def test_bad_arguments_are_named(change, error, message):
    value, shapes, starts, locations, weights = make_inputs()
    arguments = dict(value=value, spatial_shapes=shapes, level_start_index=starts, sampling_locations=locations,
                     attention_weights=weights)
    with pytest.raises(error, match=message):
        dcn_tvm.ms_deform_attn(**change(arguments))


def test_workloads_name_the_kernels_the_op_asks_for():
    workload = Workload.parse("ms_deform_attn:n=2,q=6,levels=5x7+3x4+1x1,heads=3,head_dim=5,points=2,dtype=float64")
    assert Workload.parse(str(workload)) == workload
    value, shapes, starts, locations, weights = make_inputs()
    geo = msda_ops.geometry(value, shapes, starts, locations, weights)
    assert workload.geometry() == geo and geo.key == "float64_m3_d5_p2_l5x7_3x4_1x1"
    target = msda_ops.target_key(value.device)
    assert [task.spec for task in workload.tasks(target)] == [msda_ops._spec(stage, geo, locations)
                                                               for stage in ("forward", "backward")]
    with pytest.raises(ValueError, match="levels='5x7x3' is not level shapes"):
        Workload.parse("ms_deform_attn:n=1,q=3,levels=5x7x3")


@pytest.fixture
def grid_sample_attention(monkeypatch):
    """A context manager: inside it, the module computes ms_deform_attn by the grid_sample formulation."""

    @contextlib.contextmanager
    def patched():
        with monkeypatch.context() as patch:
            patch.setattr(msda_ops, "ms_deform_attn",
                          lambda value, shapes, starts, locations, weights: ms_deform_attn_grid_sample(
                              value, shapes, locations, weights))
            yield

    return patched


def test_module_initialisation():
    """Deformable DETR's: offsets of head m along angle 2*pi*m/M scaled to a unit max-norm, point p at
    (p + 1) times that; uniform attention; Xavier projections with zero biases."""
    module = dcn_tvm.MultiScaleDeformableAttention(embed_dims=16, num_levels=2, num_heads=4, num_points=3)
    offsets = module.sampling_offsets.bias.view(4, 2, 3, 2)
    expected_heads = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    torch.testing.assert_close(offsets[:, 1, 2], 3 * expected_heads, atol=1e-6, rtol=0)
    torch.testing.assert_close(offsets[:, 0], offsets[:, 1])
    assert (module.sampling_offsets.weight == 0).all() and (module.attention_weights.weight == 0).all()
    assert (module.attention_weights.bias == 0).all() and (module.value_proj.bias == 0).all()
    bound = (6 / 32) ** 0.5
    assert module.output_proj.weight.abs().max() <= bound and module.output_proj.weight.std() > bound / 4
    eight = dcn_tvm.MultiScaleDeformableAttention(embed_dims=16, num_levels=1, num_heads=8, num_points=1)
    torch.testing.assert_close(eight.sampling_offsets.bias.view(8, 2)[1], torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match=r"embed_dims \(10\) must be a multiple of num_heads \(4\)"):
        dcn_tvm.MultiScaleDeformableAttention(embed_dims=10, num_heads=4)


@pytest.mark.parametrize("box_references", [False, True], ids=["points", "boxes"])
def test_module_matches_grid_sample_formulation(box_references, grid_sample_attention):
    """The module on CASE's sizes (float64): output and every parameter's gradient, reference points as
    (x, y) and as boxes, with a padding mask."""
    n, levels, heads, head_dim, points, queries = CASE
    torch.manual_seed(11)
    module = dcn_tvm.MultiScaleDeformableAttention(heads * head_dim, len(levels), heads, points).double()
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(module.attention_weights.weight, std=0.1)
    shapes, starts = level_tensors(levels)
    features = torch.randn(n, int((shapes[:, 0] * shapes[:, 1]).sum()), heads * head_dim, dtype=torch.float64)
    query = torch.randn(n, queries, heads * head_dim, dtype=torch.float64)
    references = torch.rand(n, queries, len(levels), 4 if box_references else 2, dtype=torch.float64)
    mask = torch.rand(n, features.shape[1]) < 0.2
    results = []
    for context in (contextlib.nullcontext, grid_sample_attention):
        module.zero_grad()
        with context():
            out = module(query, references, features, shapes, starts, mask)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in module.parameters()])
    for ours, theirs in zip(*results):
        assert relative_error(ours, theirs) <= 1e-12


def test_encoder_layer(grid_sample_attention):
    """DeformableEncoderLayer on float32 features of CASE's levels: its queries are every position,
    whose reference points are the pixel centres; as with the grid_sample formulation."""
    from dcn_tvm.models import DeformableEncoderLayer, encoder_reference_points

    n, levels, heads, head_dim, points, _ = CASE
    torch.manual_seed(12)
    layer = DeformableEncoderLayer(heads * head_dim, 32, 0.0, len(levels), heads, points)
    shapes, starts = level_tensors(levels)
    references = encoder_reference_points(shapes, batch=n)
    assert references.shape == (n, 48, 3, 2)
    torch.testing.assert_close(references[0, 35, 0], torch.tensor([0.5 / 4, 0.5 / 3]))  # level 1's first pixel
    src = torch.randn(n, 48, heads * head_dim, requires_grad=True)
    pos = torch.randn(n, 48, heads * head_dim)
    ours = layer(src, pos, references, shapes, starts)
    with grid_sample_attention():
        theirs = layer(src, pos, references, shapes, starts)
    assert relative_error(ours, theirs) <= 1e-6
    grad = torch.randn_like(ours)  # not the sum: a layer norm's outputs sum to 0
    (grad_ours,) = torch.autograd.grad(ours, src, grad)
    (grad_theirs,) = torch.autograd.grad(theirs, src, grad)
    assert relative_error(grad_ours, grad_theirs) <= 1e-5


def test_onnx_form_matches_loops():
    """The form the ONNX export traces (dcn_tvm.ops.onnx_forms) against the loops, NaN, inf and huge
    locations included: float64 stays float64."""
    from dcn_tvm.ops import onnx_forms

    value, shapes, starts, locations, weights = make_inputs(seed=3, non_finite=True)
    out = onnx_forms.ms_deform_attn(value, shapes, starts, locations, weights)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    assert relative_error(out, ms_deform_attn_loops(value, shapes, locations, weights)) <= 1e-13


def test_plain_torch_onnx_export_runs_in_onnxruntime():
    """torch.onnx.export(module, args, dynamo=True) with no extra argument, and to_onnx of a
    torch.export.ExportedProgram holding the op: standard ONNX ops that onnxruntime runs with the export's
    levels and with other level shapes, batch, queries (the level shapes are read at run time). So does the
    export of the module as a CUDA module, spatial_shapes and level_start_index on the CPU (as CUDA graphs
    need them): it failed before the ONNX form moved them to value's device."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from test_export import export_as_cuda_model, run_onnxruntime, standard_op_exports

    n, levels, heads, head_dim, points, queries = CASE

    def make_module():
        return dcn_tvm.MultiScaleDeformableAttention(heads * head_dim, len(levels), heads, points)

    torch.manual_seed(13)
    module = make_module().eval()
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.5)  # samples past the level borders
    torch.nn.init.normal_(module.attention_weights.weight, std=0.5)

    def inputs(batch, level_shapes, count):
        shapes, starts = level_tensors(level_shapes)
        features = torch.randn(batch, int((shapes[:, 0] * shapes[:, 1]).sum()), heads * head_dim)
        return (torch.randn(batch, count, heads * head_dim), torch.rand(batch, count, len(levels), 2), features,
                shapes, starts)

    args = inputs(n, levels, queries)
    sizes = torch.export.Dim.DYNAMIC
    dynamic = ({0: sizes, 1: sizes}, {0: sizes, 1: sizes}, {0: sizes, 1: sizes}, None, None)
    exports = [(program, (args, inputs(1, ((4, 9), (2, 2), (1, 3)), 5)))
               for program in standard_op_exports(module, args, dynamic)]
    cuda_program = export_as_cuda_model(make_module, args, module.state_dict())
    assert {node.domain for node in cuda_program.model_proto.graph.node} <= {""}  # as standard_op_exports checks
    exports.append((cuda_program, (args,)))
    for program, samples in exports:
        for sample in samples:
            with torch.no_grad():
                expected = module(*sample)
            assert relative_error(torch.from_numpy(run_onnxruntime(program.model_proto, *sample)[0]),
                                  expected) <= 1e-5


# ------------------------------------------------------------------------------------ CUDA schedules

GPU_TARGET = "cuda-sm_90"
#: The simulated-GPU matrix, in four geometries: one level of 1 head (D 8, 1 point, float32); four levels
#: down to 1x1, 8 heads of 32 channels, 4 points (float32); two levels with a 1x1 one, an odd head_dim
#: (float64); one channel per head (float32).
GPU_CASES = [(1, ((3, 4),), 1, 8, 1, 6), (2, ((4, 5), (2, 3), (1, 2), (1, 1)), 8, 32, 4, 3),
             (1, ((5, 7), (1, 1)), 2, 5, 4, 4), CASES[1]]


def gpu_case_id(case):
    n, levels, heads, head_dim, points, queries = case
    return f"n{n}_l{'+'.join(f'{h}x{w}' for h, w in levels)}_m{heads}_d{head_dim}_p{points}_q{queries}"


@pytest.fixture
def simulated_gpu(simulated_gpu_of):
    """A context manager: inside it, ms_deform_attn on CPU tensors runs the simulated CUDA kernels."""
    return simulated_gpu_of(msda_ops)


def _results(value, shapes, starts, locations, weights, grad):
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    out = dcn_tvm.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


@pytest.mark.parametrize("case", GPU_CASES, ids=gpu_case_id)
def test_simulated_gpu_forward_and_gradients(case, simulated_gpu):
    """Output against the loops, gradients against autograd of the grid_sample formulation (float32 also
    against the CPU kernels); locations in [-0.25, 1.25] and non-finite; the value gradient's adds are
    atomic (queries share pixels)."""
    dtype = torch.float64 if case == GPU_CASES[2] else torch.float32
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    value, shapes, starts, locations, weights = make_inputs(case, dtype=dtype, seed=13, non_finite=True)
    grad = torch.randn(case[0], case[5], case[2] * case[3], dtype=dtype)
    with simulated_gpu():
        gpu = _results(value, shapes, starts, locations, weights, grad)
    finite = torch.isfinite(locations)
    leaves = [t.detach().double().requires_grad_() for t in (value, locations.where(finite, 9.0), weights)]
    expected = [ms_deform_attn_loops(value, shapes, locations, weights),
                *torch.autograd.grad(ms_deform_attn_grid_sample(leaves[0], shapes, leaves[1], leaves[2]), leaves,
                                     grad.double())]
    for name, ours, theirs in zip(("output", "value", "sampling_locations", "attention_weights"), gpu, expected):
        assert torch.isfinite(ours).all() and relative_error(ours, theirs) <= tolerance, name
    if dtype == torch.float32:
        for name, ours, theirs in zip(("output", "value", "locations", "weights"), gpu,
                                      _results(value, shapes, starts, locations, weights, grad)):
            assert relative_error(ours, theirs) <= 1e-5, name


def test_simulated_gpu_zero_queries(simulated_gpu):
    value, shapes, starts, locations, weights = make_inputs(GPU_CASES[0], dtype=torch.float32)
    with simulated_gpu():
        leaves = [value.requires_grad_(), locations[:, :0].requires_grad_(), weights[:, :0].requires_grad_()]
        out = dcn_tvm.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
        assert out.shape == (1, 0, 8)
        out.sum().backward()
    assert not value.grad.any()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="ptxas (nvcc) is not on PATH")
def test_cuda_kernels_fit_sm_90(monkeypatch):
    """Every kernel the op asks for on the widest GPU case (forward and backward at static sizes, also at
    symbolic ones in float32, and the scatter) in float32, bfloat16 and float64, built for sm_90 in one
    module: ptxas accepts each within the register budget."""
    from dcn_tvm.kernels import build, resources

    n, levels, heads, head_dim, points, queries = GPU_CASES[1]
    specs = []
    for dtype in ("float32", "bfloat16", "float64"):
        workload = Workload.parse(f"ms_deform_attn:n={n},q={queries},levels={'+'.join(f'{h}x{w}' for h, w in levels)},"
                                  f"heads={heads},head_dim={head_dim},points={points},dtype={dtype}")
        for task in workload.tasks(GPU_TARGET):
            specs += [task.spec, task.spec.symbolic()] if dtype == "float32" else [task.spec]
        specs.append(msda_ops.scatter_spec(workload.geometry(), GPU_TARGET))
    seen, check = [], resources.check_assembled
    monkeypatch.setattr(resources, "check_assembled", lambda *args: seen.append(check(*args)) or seen[-1])
    build.compile_functions({spec.workload_key: build.scheduled(spec) for spec in specs}, GPU_TARGET)
    (usage,) = seen
    assert len(usage) >= len(specs) and all(0 < used["registers"] <= 255 for used in usage.values())
