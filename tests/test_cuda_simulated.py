"""The CUDA schedules, run on a simulated GPU (tests/gpusim.py: lowered for sm_90, executed on PoCL).

Through the real op layer: under `simulated_gpu` the ops build KernelSpecs for `cuda-sm_90` (GPU position
padding, atomic scatters, the allocations a GPU run makes) and take their kernels from the simulator.
Results are compared with the CPU kernels and the float64 references, over the geometry matrix.
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("pyopencl", reason="the simulated GPU needs pyopencl (pip install pyopencl) and an OpenCL "
                                       "device (apt-get install pocl-opencl-icd ocl-icd-libopencl1)")
import gpusim  # noqa: E402
from reference import deform_conv2d_loops, deform_conv2d_torch  # noqa: E402
from reference_roi_pool import deform_roi_pool_loops, deform_roi_pool_torch  # noqa: E402
from test_deform_conv2d import make_inputs as conv_inputs  # noqa: E402
from test_deform_roi_pool import CASES as ROI_CASES  # noqa: E402
from test_deform_roi_pool import case_id as roi_case_id  # noqa: E402
from test_deform_roi_pool import make_inputs as roi_inputs  # noqa: E402

import dcn_tvm  # noqa: E402
from dcn_tvm.kernels.spec import KernelSpec  # noqa: E402
from dcn_tvm.ops import deform_conv2d as conv_ops  # noqa: E402
from dcn_tvm.ops import deform_roi_pool as roi_ops  # noqa: E402

_missing = gpusim.available()
if _missing:
    pytest.skip(f"the simulated GPU needs an OpenCL device: {_missing} "
                f"(apt-get install pocl-opencl-icd ocl-icd-libopencl1)", allow_module_level=True)

GPU_TARGET = "cuda-sm_90"

# (N, C, H, W, O, kernel, stride, padding, dilation, groups, offset_groups, mask): channel counts off the
# tiles (3, 18, 72), groups 2/4/32, offset groups 3/4, asymmetric stride/padding/dilation.
CONV_CASES = [
    (2, 4, 7, 9, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, False),
    (2, 3, 6, 7, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 3, True),
    (1, 18, 6, 7, 12, (3, 2), (2, 1), (0, 2), (1, 2), 2, 3, True),
    (1, 72, 5, 6, 72, (3, 3), (1, 2), (2, 1), (2, 1), 4, 4, False),
    (1, 64, 4, 5, 64, (3, 3), (1, 1), (1, 1), (1, 1), 32, 4, True),
]
DTYPES = {"float32": (torch.float32, 1e-4), "float64": (torch.float64, 1e-10)}
#: float32, simulated GPU against the CPU kernels (the same compute, other schedules and summation orders).
CPU_TOLERANCE = 1e-5
# The R-FCN head (21 classes, k = 7: 1029 score maps) and plain RoI pooling over 1029 channels.
ROI_EXTRA = [(1, 21, 9, 11, 7, 7, 21, 7, 2, 0.5), (1, 1029, 6, 7, 3, 1, 0, None, 2, 0.5)]


def conv_case_id(case):
    n, c, h, w, o, (kh, kw), s, p, d, g, og, m = case
    return f"n{n}c{c}h{h}w{w}o{o}k{kh}x{kw}s{s[0]}x{s[1]}p{p[0]}x{p[1]}d{d[0]}x{d[1]}g{g}og{og}m{int(m)}"


@pytest.fixture
def simulated_gpu(monkeypatch):
    """A context manager: inside it, dcn_tvm's ops on CPU tensors run the simulated CUDA kernels."""
    return gpusim.simulating(monkeypatch, conv_ops, roi_ops, target=GPU_TARGET)


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()


def _conv_results(stage, tensors, conv, grad_output):
    """forward: [output]; backward: the gradients of input, offset, weight, bias[, mask] (the backward
    op alone, so that it is tested where the forward kernel is not launchable)."""
    x, offset, weight, bias, mask = tensors
    if stage == "forward":
        return [dcn_tvm.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)]
    grads = torch.ops.dcn_tvm.deform_conv2d_backward(grad_output, x, offset, mask, weight,
                                                     *(list(conv[k]) for k in ("stride", "padding", "dilation")))
    grad_input, grad_offset, grad_mask, grad_weight, grad_bias = grads
    return [grad_input, grad_offset, grad_weight, grad_bias] + ([grad_mask] if mask is not None else [])


def _conv_case(stage, case, dtype_name, seed=0):
    """(run, names, expected) of one stage ("forward" or "backward") of a case in `dtype_name`: `run()`
    gives its results from the kernels in use (see _conv_results), `expected` the float64 references
    (the loops, or autograd through deform_conv2d_torch) of the same inputs and grad_output."""
    dtype = {**DTYPES, **HALF_DTYPES}[dtype_name][0]
    tensors, conv = conv_inputs(case, dtype=dtype, seed=seed)
    reference = [None if t is None else t.double() for t in tensors]
    output = deform_conv2d_loops(*reference[:4], mask=reference[4], **conv)
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)

    def run():
        return _conv_results(stage, tensors, conv, grad_output)

    if stage == "forward":
        return run, ["output"], [output]
    leaves = [t.requires_grad_() for t in reference if t is not None]
    expected = torch.autograd.grad(deform_conv2d_torch(*reference[:4], mask=reference[4], **conv), leaves,
                                   grad_output.double())
    return run, ["input", "offset", "weight", "bias", "mask"][:len(leaves)], list(expected)


def _check_conv(stage, case, dtype_name, simulated_gpu, seed=0):
    run, names, expected = _conv_case(stage, case, dtype_name, seed)
    dtype, tolerance = {**DTYPES, **HALF_DTYPES}[dtype_name]
    with simulated_gpu():
        gpu = run()
    for name, ours, theirs in zip(names, gpu, expected, strict=True):
        assert ours.dtype == dtype and torch.isfinite(ours).all(), name
        assert relative_error(ours, theirs) <= tolerance, name
    if dtype_name == "float32":
        for name, ours, cpu in zip(names, gpu, run()):
            assert relative_error(ours, cpu) <= CPU_TOLERANCE, name


def _forward_params():
    for case in CONV_CASES:
        for dtype_name in DTYPES:
            yield pytest.param(case, dtype_name, id=f"{conv_case_id(case)}-{dtype_name}")


@pytest.mark.parametrize("case,dtype_name", list(_forward_params()))
def test_deform_conv2d_forward(case, dtype_name, simulated_gpu):
    _check_conv("forward", case, dtype_name, simulated_gpu)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
def test_deform_conv2d_gradients(case, dtype_name, simulated_gpu):
    _check_conv("backward", case, dtype_name, simulated_gpu)


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[2]], ids=conv_case_id)
def test_deform_conv2d_dynamic_shapes(case, simulated_gpu, monkeypatch):
    """One symbolic kernel per stage serves two batch/height/width combinations."""
    monkeypatch.setenv("DCN_TVM_SHAPES", "dynamic")
    n, c, h, w, *rest = case
    for seed, (batch, height, width) in enumerate([(n, h, w), (n + 1, h + 2, w + 1)]):
        for stage in ("forward", "backward"):
            _check_conv(stage, (batch, c, height, width, *rest), "float32", simulated_gpu, seed=seed)
    assert any("_nany_hany_wany_cuda-sm_90" in key for key, _ in gpusim._state["kernels"])


def _roi_results(x, rois, offset, kwargs, grad_output):
    """(output, grad_input[, grad_offset]) of dcn_tvm.deform_roi_pool."""
    leaves = [x.detach().requires_grad_()] + ([] if offset is None else [offset.detach().requires_grad_()])
    out = dcn_tvm.deform_roi_pool(leaves[0], rois, leaves[1] if offset is not None else None, **kwargs)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_output)]


def _check_roi(case, dtype_name, simulated_gpu, seed=0):
    dtype, tolerance = {**DTYPES, **HALF_DTYPES}[dtype_name]
    x, rois, offset, kwargs = roi_inputs(case, dtype=dtype, seed=seed)
    g = kwargs["group_size"]
    grad_output = torch.randn(rois.shape[0], x.shape[1] // (g * g), kwargs["output_size"], kwargs["output_size"],
                              generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with simulated_gpu():
        gpu = _roi_results(x, rois, offset, kwargs, grad_output)
    leaves = [x.double().requires_grad_()] + ([] if offset is None else [offset.double().requires_grad_()])
    expected_out = deform_roi_pool_torch(leaves[0], rois.double(), leaves[1] if offset is not None else None,
                                         **kwargs)
    expected = [deform_roi_pool_loops(x.double(), rois, None if offset is None else offset.double(), **kwargs),
                *torch.autograd.grad(expected_out, leaves, grad_output.double())]
    # In float32 the offset gradient is compared with the CPU kernels only: a sample that lands exactly
    # on a pixel in one precision and not in the other has a derivative of zero there (the documented
    # kink of `compute.deform_roi_pool.backward`), e.g. one element of 14406 for the R-FCN head.
    checked = 3 if dtype == torch.float64 else 2
    for name, ours, theirs in list(zip(("output", "input", "offset"), gpu, expected))[:checked]:
        assert torch.isfinite(ours).all(), name
        assert relative_error(ours, theirs) <= tolerance, name
    if dtype == torch.float32:
        cpu = _roi_results(x, rois, offset, kwargs, grad_output)
        for name, ours, theirs in zip(("output", "input", "offset"), gpu, cpu):
            assert relative_error(ours, theirs) <= CPU_TOLERANCE, name


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case", ROI_CASES[:4] + ROI_EXTRA, ids=roi_case_id)
def test_deform_roi_pool_forward_and_gradients(case, dtype_name, simulated_gpu):
    _check_roi(case, dtype_name, simulated_gpu, seed=ROI_CASES.index(case) if case in ROI_CASES else 9)


def test_deform_roi_pool_dynamic_shapes(simulated_gpu, monkeypatch):
    monkeypatch.setenv("DCN_TVM_SHAPES", "dynamic")
    for seed, (n, h, w) in enumerate([(2, 8, 10), (1, 11, 7)]):
        _check_roi((n, *ROI_CASES[3][1:2], h, w, *ROI_CASES[3][4:]), "float32", simulated_gpu, seed=seed)


def test_deform_roi_pool_zero_rois(simulated_gpu):
    x, rois, offset, kwargs = roi_inputs(ROI_CASES[3], seed=11)
    with simulated_gpu():
        leaves = [x.requires_grad_(), offset[:0].requires_grad_()]
        out = dcn_tvm.deform_roi_pool(x, rois[:0], leaves[1], **kwargs)
        assert out.shape == (0, 6, 3, 3)
        out.sum().backward()
    assert not x.grad.any() and offset.grad is None and leaves[1].grad.shape == (0, 6, 3, 3)


@pytest.mark.parametrize("bug", [dict(drop_barriers=True), dict(drop_barrier=1)], ids=["all", "after-loads"])
def test_dropped_barriers_are_caught(bug, simulated_gpu):
    """Without its barriers (or without the one between the tile loads and the multiply-adds) the
    shared-memory GEMM reads tiles its neighbours have not written yet."""
    tensors, conv = conv_inputs(CONV_CASES[0], seed=3)
    x, offset, weight, bias, mask = tensors
    expected = deform_conv2d_loops(x, offset, weight, bias, mask=mask, **conv)
    with simulated_gpu():
        assert relative_error(dcn_tvm.deform_conv2d(x, offset, weight, bias, mask=mask, **conv), expected) <= 1e-4
        with gpusim.mutated(**bug):
            broken = dcn_tvm.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    assert not relative_error(broken, expected) <= 1e-2


def _copy_kernel(shift: int, count: int):
    """b[i + shift] = a[i] for i < count, one thread each, on 256-element buffers."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def copy(a: T.Buffer((256,), "float32"), b: T.Buffer((256,), "float32")):
        for i in T.thread_binding(256, thread="threadIdx.x"):
            with T.sblock("copy"):
                vi = T.axis.remap("S", [i])
                if vi < count:
                    b[vi + shift] = a[vi]

    return copy


def test_out_of_bounds_write_is_caught():
    a, b = torch.randn(256), torch.empty(256)
    gpusim.Kernel(_copy_kernel(0, 256), outputs={1})(a, b)
    torch.testing.assert_close(b, a)
    with pytest.raises(AssertionError, match="wrote outside global buffer 1"):
        gpusim.Kernel(_copy_kernel(1, 256), outputs={1})(a, b)


def test_unwritten_output_reads_nan():
    a, b = torch.randn(256), torch.zeros(256)
    gpusim.Kernel(_copy_kernel(0, 200), outputs={1})(a, b)
    assert torch.equal(b[:200], a[:200]) and b[200:].isnan().all()


def _reversed_through_shared(size: int):
    """b = a reversed, one block of 256 threads that stages all of `a` in shared memory first."""
    import tvm
    from tvm import te

    a = te.placeholder((size,), name="a")
    b = te.compute((size,), lambda i: a[size - 1 - i], name="b")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    block = sch.get_sblock("b")
    outer, step, thread = sch.split(sch.get_loops(block)[0], [1, None, 256])
    sch.reorder(outer, thread, step)
    sch.bind(outer, "blockIdx.x")
    sch.bind(thread, "threadIdx.x")
    tile = sch.cache_read(block, 0, "shared")
    sch.compute_at(tile, outer)
    sch.bind(sch.split(sch.get_loops(tile)[-1], [None, 256])[1], "threadIdx.x")
    return sch.mod["main"]


def test_static_shared_memory_over_the_sm_90_limit_is_refused():
    """A 48 KiB tile fits an sm_90 block, a 64 KiB one does not (nvcc refuses it; so does the simulator)."""
    a, b = torch.randn(12288), torch.empty(12288)
    gpusim.Kernel(_reversed_through_shared(12288), outputs={1})(a, b)
    assert torch.equal(b, a.flip(0))
    with pytest.raises(gpusim.ResourceError, match="65536 bytes of static shared memory; sm_90 allows 49152"):
        gpusim.Kernel(_reversed_through_shared(16384))


# Tensor-core GEMMs (forward deform_gemm, backward grad_columns and grad_weight_sum): output channels per
# group and (input channels per group x kernel points) multiples of 16. One or two 64-position blocks,
# 1 or 2 warps along M and N, blocks of three fragments, several blocks along M and N, one to three
# K steps per block (the forward's 144-long K in steps of 48, grad_columns' 96 output channels in
# steps of 48, grad_weight_sum's positions of two images), groups, offset groups, masks,
# stride/padding/dilation; and a case whose 12 output channels per group fit no fragment.
TENSOR_CORE_CASES = [
    (1, 16, 6, 7, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, False),
    (2, 32, 9, 10, 32, (3, 3), (2, 1), (1, 2), (1, 1), 1, 2, True),
    (1, 32, 7, 6, 64, (3, 3), (1, 1), (2, 2), (2, 2), 2, 2, True),
    (1, 16, 9, 8, 96, (1, 1), (1, 1), (0, 0), (1, 1), 1, 1, False),
]
FALLBACK_CASE = (1, 32, 6, 7, 24, (3, 3), (1, 1), (1, 1), (1, 1), 2, 1, True)
#: Half dtypes against the float64 references (inputs, grad_output, columns and results rounded to the
#: dtype). Relative errors measured over TENSOR_CORE_CASES, seeds 0-2, of every output and gradient:
#: 1.7e-4 to 3.0e-4 in float16, 1.3e-3 to 2.5e-3 in bfloat16 (8x: three fewer mantissa bits); the
#: bounds leave about 10x and 3x.
HALF_DTYPES = {"float16": (torch.float16, 3e-3), "bfloat16": (torch.bfloat16, 8e-3)}
#: The kernels of each stage of the op, and the WMMA operations a tensor-core GEMM calls.
KERNEL_STAGES = {"forward": ("forward",), "backward": ("backward_data", "backward_weight")}
FRAGMENT_OPERATIONS = {"fill", "load", "mma", "store"}


def _stage_kernel(case, dtype_name, stage):
    """The simulated kernel of one stage ("forward", "backward_data", ...) of a case (cached once run)."""
    (x, offset, weight, _, mask), conv = conv_inputs(case, dtype=HALF_DTYPES[dtype_name][0])
    geo = conv_ops.geometry(x, offset, weight, mask, conv["stride"], conv["padding"], conv["dilation"])
    n, _, h, w = x.shape
    return gpusim.get_kernel(KernelSpec(conv_ops.OP, stage, geo, (("n", n), ("h", h), ("w", w)), GPU_TARGET))


@pytest.mark.parametrize("dtype_name", HALF_DTYPES)
@pytest.mark.parametrize("stage", KERNEL_STAGES)
@pytest.mark.parametrize("case", TENSOR_CORE_CASES + [FALLBACK_CASE], ids=conv_case_id)
def test_half_conv_on_tensor_cores(case, stage, dtype_name, simulated_gpu):
    """float16 and bfloat16, forward and gradients, against the float64 references: every GEMM ran on
    (emulated) tensor cores where fragments fit, the CUDA-core schedules where they do not."""
    _check_conv(stage, case, dtype_name, simulated_gpu)
    operations = set() if case is FALLBACK_CASE else FRAGMENT_OPERATIONS
    for kernel_stage in KERNEL_STAGES[stage]:
        assert _stage_kernel(case, dtype_name, kernel_stage).fragment_operations == operations, kernel_stage


#: A half conv on CUDA cores whose float16 columns TVM lays over the float32 sample coordinates' storage
#: (twice as many elements in its bytes): the simulator, which stores halves as float32, must size it for them.
REUSED_STORAGE_CASE = (2, 8, 11, 9, 4, (3, 1), (1, 2), (1, 1), (1, 2), 4, 2, True)


@pytest.mark.parametrize("dtype_name", HALF_DTYPES)
def test_half_columns_in_reused_float32_storage(dtype_name, simulated_gpu):
    kernel = _stage_kernel(REUSED_STORAGE_CASE, dtype_name, "backward_weight")
    assert any({"float32", "float16"} <= dtypes for dtypes in kernel.view_dtypes.values())
    _check_conv("backward", REUSED_STORAGE_CASE, dtype_name, simulated_gpu)


def test_bfloat16_shape_generic_kernels(simulated_gpu, monkeypatch):
    """bfloat16's shape-generic kernels, which TVM 0.27 does not read back exactly from their TVMScript:
    the simulator runs their float16 build, whose TVMScript is theirs with the type renamed."""
    monkeypatch.setenv("DCN_TVM_SHAPES", "dynamic")
    for stage in ("forward", "backward"):
        _check_conv(stage, CONV_CASES[2], "bfloat16", simulated_gpu)
    _check_roi(ROI_CASES[3], "bfloat16", simulated_gpu)
    keys = [key for key, _ in gpusim._state["kernels"] if key.endswith("_nany_hany_wany_cuda-sm_90")]
    for stage in ("forward", "backward_data", "backward_weight"):
        assert any(key.startswith(f"deform_conv2d_{stage}_bfloat16_") for key in keys), stage


#: What a wrong fragment load breaks: the forward output; grad_columns (so the input, offset and mask
#: gradients) and grad_weight_sum (the weight gradient), not the bias gradient, which has no GEMM.
GEMM_RESULTS = {"output", "input", "offset", "mask", "weight"}


@pytest.mark.parametrize("dtype_name", HALF_DTYPES)
@pytest.mark.parametrize("bug", [dict(transposed_fragments=True), dict(fragment_stride=16)],
                         ids=["transposed-fragments", "leading-dimension-16"])
@pytest.mark.parametrize("stage", KERNEL_STAGES)
def test_wrong_fragment_layout_is_caught(stage, bug, dtype_name, simulated_gpu):
    """Fragments loaded column-major, or with the fragment's width as leading dimension instead of
    the tile's, give wrong results from every GEMM, forward and backward."""
    run, names, expected = _conv_case(stage, TENSOR_CORE_CASES[1], dtype_name, seed=4)
    tolerance = HALF_DTYPES[dtype_name][1]
    with simulated_gpu():
        correct = run()
        with gpusim.mutated(**bug):
            broken = run()
    for name, ours, wrong, theirs in zip(names, correct, broken, expected):
        assert relative_error(ours, theirs) <= tolerance, name
        assert (relative_error(wrong, theirs) > 0.1) == (name in GEMM_RESULTS), name


def _rounding_kernel(dtype_name: str):
    """b = a (float32) converted to `dtype_name`, one thread per element of 256."""
    import tvm
    from tvm import te

    a = te.placeholder((256,), "float32", name="a")
    b = te.compute((256,), lambda i: a[i].astype(dtype_name), name="b")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    sch.bind(sch.get_loops(sch.get_sblock("b"))[0], "threadIdx.x")
    return sch.mod["main"]


@pytest.mark.parametrize("dtype_name", HALF_DTYPES)
def test_half_conversions_round_as_torch(dtype_name):
    """The simulator's conversion to float16 or bfloat16 is torch's (round to nearest, ties to even):
    ties below and above even values, the largest finite values and overflow, subnormals, NaN."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7F7FFF,
                         0x477FF000, 0x477FEFFF, 0x33800001, 0x00008000, 0x7FC00000], dtype=torch.int64)
    values = torch.cat([bits.to(torch.int32).view(torch.float32),
                        torch.randn(244, generator=torch.Generator().manual_seed(5)) * 1e3])
    converted = torch.empty(256, dtype=HALF_DTYPES[dtype_name][0])
    gpusim.Kernel(_rounding_kernel(dtype_name), outputs={1})(values, converted)
    expected = values.to(converted.dtype)
    assert torch.equal(converted.isnan(), expected.isnan())
    assert torch.equal(converted[~expected.isnan()], expected[~expected.isnan()])
