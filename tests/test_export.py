"""Deploying dcn_tvm models: ONNX export (run in onnxruntime), swapping torchvision's DeformConv2d,
torch.export save/load, torch.compile max-autotune."""

from __future__ import annotations

import copy
import functools
import importlib.util
import subprocess
import sys

import pytest
import torch
from torch import nn

import dcn_tvm
from dcn_tvm import DeformConv2d, DeformConv2dPack, DeformPSRoIPool, DeformRoIPool
from dcn_tvm.models import DeepLabHead, resnet101_dcn

_MISSING_ONNX = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
needs_onnx = pytest.mark.skipif(bool(_MISSING_ONNX), reason=f"needs {', '.join(_MISSING_ONNX)} (dcn_tvm[export])")
needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="needs torchvision")


def relative_error(actual, expected) -> float:
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return ((actual - expected).norm() / expected.norm()).item()


def standard_op_exports(model, args: tuple, dynamic_shapes) -> list:
    """The ONNX programs of `model` through a plain torch.onnx.export and through to_onnx of a
    torch.export.ExportedProgram captured outside an ONNX export; each holds standard ONNX ops only."""
    from dcn_tvm.export import to_onnx

    programs = [torch.onnx.export(model, args, dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes),
                to_onnx(torch.export.export(model, args, dynamic_shapes=dynamic_shapes), args, verbose=False)]
    for program in programs:
        assert {node.domain for node in program.model_proto.graph.node} <= {""}
    return programs


@functools.cache
def onnxruntime_lacks_deform_conv() -> str | None:
    """Why this onnxruntime cannot run DeformConv, or None. Its CPU kernel is recent: 1.23.2, the newest
    wheel for Python 3.10, has none (1.32.0 has). Asked of a one-node model built here, so a fault in
    dcn_tvm's export never reads as a missing kernel."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
              for name, shape in (("x", [1, 1, 3, 3]), ("w", [1, 1, 1, 1]), ("offset", [1, 2, 3, 3]))]
    graph = helper.make_graph([helper.make_node("DeformConv", ["x", "w", "offset"], ["y"], kernel_shape=[1, 1])],
                              "deform_conv", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)  # opset 19: IR 9
    try:
        onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except onnxruntime.capi.onnxruntime_pybind11_state.NotImplemented:
        return f"onnxruntime {onnxruntime.__version__} has no DeformConv kernel (onnx {onnx.__version__})"
    return None


def run_onnxruntime(model_proto, *inputs):
    """The outputs of `model_proto` run by onnxruntime on the CPU (the test skipped where the model holds a
    DeformConv and this onnxruntime cannot run one)."""
    import onnxruntime

    if nodes(model_proto, "DeformConv") and (reason := onnxruntime_lacks_deform_conv()):
        pytest.skip(reason)
    session = onnxruntime.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {arg.name: value.numpy() for arg, value in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def nodes(model_proto, op_type):
    return [node for node in model_proto.graph.node if node.op_type == op_type]


def attributes(node) -> dict:
    import onnx

    return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}


def deforming(module: DeformConv2dPack, std: float = 0.5) -> DeformConv2dPack:
    """`module` in eval mode with a non-zero offset conv, so samples land off the grid and past the borders."""
    with torch.no_grad():
        module.conv_offset.weight.normal_(std=std)
        module.conv_offset.bias.normal_(std=std)
    return module.eval()


CONV_CASES = {  # name: (DeformConv2dPack arguments, the DeformConv attributes expected)
    "plain": (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
              dict(group=1, offset_group=1, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1],
                   dilations=[1, 1])),
    "modulated_offset_groups_no_bias": (
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, offset_groups=2, modulated=True, bias=False),
        dict(group=1, offset_group=2, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1])),
    "groups_stride_dilation": (
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=2, dilation=2, groups=2,
             offset_groups=2, modulated=True),
        dict(group=2, offset_group=2, kernel_shape=[3, 3], pads=[2, 2, 2, 2], strides=[2, 2], dilations=[2, 2])),
    "rectangular": (dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(1, 2), padding=(1, 0)),
                    dict(group=1, offset_group=1, kernel_shape=[3, 2], pads=[1, 0, 1, 0], strides=[1, 2],
                         dilations=[1, 1])),
}


@needs_onnx
@pytest.mark.parametrize("case", CONV_CASES)
def test_deform_conv2d_exports_to_onnx_deformconv(case):
    from dcn_tvm.export import to_onnx

    layer, expected = CONV_CASES[case]
    torch.manual_seed(0)
    model = deforming(DeformConv2dPack(**layer))
    program = to_onnx(model, (torch.randn(2, 4, 9, 11),), verbose=False)
    proto = program.model_proto
    (node,) = nodes(proto, "DeformConv")
    assert attributes(node) == expected
    assert len(node.input) == 5 if layer.get("modulated") else 4  # X, W, offset, B (zeros without bias), mask
    assert {opset.domain for opset in proto.opset_import} == {""}
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [bool(dim.dim_param) for dim in dims] == [True, False, True, True]  # N, H, W dynamic
    for shape in ((2, 4, 9, 11), (3, 4, 13, 6)):  # the example's sizes and others
        image = torch.randn(shape)
        with torch.no_grad():
            expected_output = model(image)
        (output,) = run_onnxruntime(proto, image)
        assert output.shape == expected_output.shape
        assert relative_error(output, expected_output) < 1e-5, shape


@needs_onnx
def test_functional_deform_conv2d_with_given_offsets_and_plain_torch_onnx_export():
    """The table passed to torch.onnx.export directly; offsets and mask as model inputs, bias None."""
    from dcn_tvm.export import onnx_translation_table

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 2, 3, 3))

        def forward(self, image, offset, mask):
            return dcn_tvm.deform_conv2d(image, offset, self.weight, None, stride=2, padding=1, mask=mask)

    torch.manual_seed(0)
    model = Functional().eval()

    def inputs(n):
        return torch.randn(n, 4, 8, 10), 2 * torch.randn(n, 18, 4, 5), torch.rand(n, 9, 4, 5)

    batch = torch.export.Dim("batch")
    program = torch.onnx.export(model, inputs(2), dynamo=True, verbose=False,
                                custom_translation_table=onnx_translation_table(),
                                dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    (node,) = nodes(program.model_proto, "DeformConv")
    assert attributes(node)["group"] == 2 and attributes(node)["strides"] == [2, 2]
    for n in (2, 5):
        args = inputs(n)
        with torch.no_grad():
            expected = model(*args)
        assert relative_error(run_onnxruntime(program.model_proto, *args)[0], expected) < 1e-5


class PackAndFunctional(nn.Module):
    """A DeformConv2dPack, then deform_conv2d called with offsets computed in the model."""

    def __init__(self):
        super().__init__()
        self.pack = deforming(DeformConv2dPack(4, 6, 3, padding=1, modulated=True))
        self.offset = nn.Conv2d(6, 18, 3, stride=2, padding=1)
        self.weight = nn.Parameter(torch.randn(5, 6, 3, 3))

    def forward(self, image):
        features = self.pack(image)
        return dcn_tvm.deform_conv2d(features, self.offset(features), self.weight, stride=2, padding=1)


@needs_onnx
@pytest.mark.slow
def test_plain_torch_onnx_export_needs_no_extra_argument():
    """torch.onnx.export(model, args, dynamo=True), as deploy scripts call it: standard DeformConv nodes that
    onnxruntime runs at two sizes, and the RoI poolings as dcn_tvm::DeformRoIPool."""
    torch.manual_seed(0)
    model = PackAndFunctional().eval()
    dynamic = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(model, (torch.randn(1, 4, 9, 11),), dynamo=True, verbose=False,
                                dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},))
    assert len(nodes(program.model_proto, "DeformConv")) == 2
    for shape in ((1, 4, 9, 11), (2, 4, 12, 7)):
        image = torch.randn(shape)
        with torch.no_grad():
            expected = model(image)
        assert relative_error(run_onnxruntime(program.model_proto, image)[0], expected) < 1e-5, shape
    pools = nodes(torch.onnx.export(RoIHeads().eval(), (torch.randn(2, 8, 8, 8), rois(3, 2)), dynamo=True,
                                    verbose=False).model_proto, "DeformRoIPool")
    assert len(pools) == 4 and all(node.domain == "dcn_tvm" for node in pools)


def test_the_torchscript_exporter_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match=r"through torch.onnx.export\(..., dynamo=True\).*not the TorchScript "
                                           r"exporter \(dynamo=False\)"):
        torch.onnx.export(DeformConv2dPack(4, 4, 3).eval(), (torch.randn(1, 4, 5, 5),), str(tmp_path / "m.onnx"),
                          dynamo=False)


@needs_onnx
def test_opsets_without_deformconv_are_refused():
    from dcn_tvm.export import to_onnx

    with pytest.raises(ValueError, match=r"opset_version must be >= 19 \(the first with DeformConv\), got 18"):
        to_onnx(DeformConv2dPack(4, 4, 3).eval(), (torch.randn(1, 4, 5, 5),), opset_version=18)


class RoIHeads(nn.Module):
    """Both RoI poolings: deformable (offset input) and plain (the first pass inside DeformRoIPool),
    position-sensitive."""

    def __init__(self):
        super().__init__()
        self.pool = DeformRoIPool(8, 3, spatial_scale=0.5)
        self.ps_pool = DeformPSRoIPool(8, 2, 3, spatial_scale=0.5)
        with torch.no_grad():
            self.pool.offset_fc.weight.normal_(std=0.01)
            self.ps_pool.offset_conv.weight.normal_(std=0.01)

    def forward(self, features, rois):
        return self.pool(features, rois), self.ps_pool(features, rois)


def rois(count: int, batch: int, size: float = 16.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    corners = torch.rand(count, 2, 2, generator=gen) * size
    boxes = torch.cat([corners.min(1).values, corners.max(1).values], dim=1)
    return torch.cat([torch.randint(batch, (count, 1), generator=gen).float(), boxes], dim=1)


def _run_deform_roi_pool(self, x, boxes, offset=None, **attrs):
    """dcn_tvm::DeformRoIPool for onnx's reference evaluator, from the node's inputs and attributes."""
    tensors = [None if t is None else torch.from_numpy(t) for t in (x, boxes, offset)]
    return (dcn_tvm.deform_roi_pool(*tensors, **attrs).numpy(),)


def run_reference_evaluator(model_proto, *inputs):
    """The outputs of `model_proto` run by onnx's reference evaluator, dcn_tvm::DeformRoIPool implemented
    from its documented inputs and attributes (_run_deform_roi_pool)."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    # The reference evaluator finds a custom op by its class name and op_domain.
    deform_roi_pool = type("DeformRoIPool", (OpRun,), {"op_domain": "dcn_tvm", "_run": _run_deform_roi_pool})
    evaluator = ReferenceEvaluator(model_proto, new_ops=[deform_roi_pool])
    return evaluator.run(None, {name: value.numpy() for name, value in zip(evaluator.input_names, inputs)})


@needs_onnx
def test_deform_roi_pool_exports_to_the_dcn_tvm_domain():
    """The custom node carries everything the op needs: an implementation of dcn_tvm::DeformRoIPool
    from its documented inputs and attributes reproduces the model (here in onnx's reference
    evaluator, at another RoI count); onnxruntime, which has no such op, refuses the model."""
    import onnx
    import onnxruntime

    from dcn_tvm.export import DEFORM_ROI_POOL_SCHEMA, to_onnx

    torch.manual_seed(0)
    model = RoIHeads().eval()
    program = to_onnx(model, (torch.randn(2, 8, 8, 8), rois(3, 2)), verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    assert {(opset.domain, opset.version) for opset in proto.opset_import} >= {("dcn_tvm", 1)}
    pools = nodes(proto, "DeformRoIPool")
    assert all(node.domain == "dcn_tvm" for node in pools)
    assert sorted(len(node.input) for node in pools) == [2, 2, 3, 3]  # plain passes have no offset
    schema_attributes = set(DEFORM_ROI_POOL_SCHEMA.attributes)
    assert all(set(attributes(node)) == schema_attributes for node in pools)
    assert {attributes(node)["group_size"] for node in pools} == {1, 3}
    assert {attributes(node)["part_size"] for node in pools} == {3}

    features, boxes = torch.randn(3, 8, 8, 8), rois(5, 3, seed=1)
    with torch.no_grad():
        expected = model(features, boxes)
    for output, reference in zip(run_reference_evaluator(proto, features, boxes), expected):
        assert relative_error(output, reference) < 1e-5
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.Fail, match="DeformRoIPool"):
        run_onnxruntime(proto, features, boxes)


def export_as_cuda_model(make_model, args: tuple, weights: dict) -> torch.onnx.ONNXProgram:
    """torch.onnx.export(..., dynamo=True) of `make_model()` as a CUDA model, without a GPU: built and traced
    on fake CUDA tensors shaped as `args` (tensors that are not floating point, such as ms_deform_attn's level
    tensors, stay as given, on the CPU), then given the real `weights` (a state_dict)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        model = make_model().eval()
        fake_args = tuple(torch.empty(arg.shape, dtype=arg.dtype) if arg.is_floating_point() else arg for arg in args)
        assert {tensor.device.type for tensor in model.state_dict().values()} == {"cuda"}
        # optimize=False: constant folding would read the fake weights
        program = torch.onnx.export(model, fake_args, dynamo=True, verbose=False, optimize=False)
    program.apply_weights(weights)
    return program


@needs_onnx
def test_a_cuda_model_exports_as_the_cpu_model_does():
    """A CUDA model's export matches the CPU model: DeformConv feeding a CUDA conv (onnxruntime), and both
    RoI poolings feeding their offset layers (onnx's reference evaluator with dcn_tvm::DeformRoIPool). Before
    the ops' ONNX nodes came on their input's device (torch.onnx.ops.symbolic makes CPU tensors), the next
    layer refused them and the export failed."""
    torch.manual_seed(0)
    heads, features, boxes = RoIHeads().eval(), torch.randn(2, 8, 8, 8), rois(3, 2)
    program = export_as_cuda_model(RoIHeads, (features, boxes), heads.state_dict())
    assert len(nodes(program.model_proto, "DeformRoIPool")) == 4
    with torch.no_grad():
        expected = heads(features, boxes)
    for output, reference in zip(run_reference_evaluator(program.model_proto, features, boxes), expected):
        assert relative_error(output, reference) < 1e-5

    # last: onnxruntime without a DeformConv kernel (Python 3.10's) skips the test there
    convs, image = PackAndFunctional().eval(), torch.randn(1, 4, 9, 11)
    program = export_as_cuda_model(PackAndFunctional, (image,), convs.state_dict())
    assert len(nodes(program.model_proto, "DeformConv")) == 2
    with torch.no_grad():
        expected = convs(image)
    assert relative_error(run_onnxruntime(program.model_proto, image)[0], expected) < 1e-5


class DeepLab(nn.Module):
    """ResNet-101-DCN with the DeepLab head, scores upsampled to the image."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = resnet101_dcn(), DeepLabHead(1024, 20)

    def forward(self, image):
        return self.head(self.backbone(image), size=image.shape[-2:])


@needs_onnx
@pytest.mark.slow
def test_resnet101_dcn_deeplab_runs_in_onnxruntime():
    from dcn_tvm.export import to_onnx

    torch.manual_seed(0)
    model = DeepLab().eval()
    for block in model.backbone.layer4:
        deforming(block.conv2, std=0.01)
    program = to_onnx(model, (torch.randn(1, 3, 64, 64),), verbose=False)
    assert len(nodes(program.model_proto, "DeformConv")) == 3
    for shape in ((1, 3, 64, 64), (2, 3, 48, 80)):
        image = torch.randn(shape)
        with torch.no_grad():
            expected = model(image)
        (output,) = run_onnxruntime(program.model_proto, image)
        assert output.shape == (shape[0], 21, *shape[2:])
        assert relative_error(output, expected) < 1e-5, shape


def torchvision_model(torchvision, dtype):
    """torchvision DeformConv2d layers nested in a Sequential, ModuleList and ModuleDict, one of them
    reachable under two names, one without bias and in eval mode; forward(input, offsets, masks)."""
    tv = torchvision.ops.DeformConv2d
    shared = tv(4, 4, 3, padding=1, groups=2)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(tv(4, 4, 3, padding=1), nn.ReLU())
            self.blocks = nn.ModuleList([shared, nn.ModuleDict({"deform": tv(4, 8, 3, 2, 2, 2, bias=False),
                                                                "again": shared})])
            self.blocks[1]["deform"].eval()

        def forward(self, x, offsets, mask):
            x = self.stem[1](self.stem[0](x, offsets[0]))
            x = self.blocks[1]["again"](self.blocks[0](x, offsets[1], mask), offsets[2])
            return self.blocks[1]["deform"](x, offsets[3], mask[:, :, ::2, ::2].repeat(1, 2, 1, 1))

    return Model().to(dtype)


@needs_torchvision
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_convert_torchvision_swaps_modules_keeping_parameters(dtype, tolerance):
    import torchvision

    torch.manual_seed(0)
    model = torchvision_model(torchvision, dtype)
    reference = copy.deepcopy(model)
    parameters = dict(model.named_parameters())
    x = torch.randn(2, 4, 7, 9, dtype=dtype, requires_grad=True)
    offsets = [(2 * torch.randn(2, 18, 7, 9, dtype=dtype)).requires_grad_() for _ in range(3)]
    offsets.append((2 * torch.randn(2, 36, 4, 5, dtype=dtype)).requires_grad_())
    mask = torch.rand(2, 9, 7, 9, dtype=dtype, requires_grad=True)

    replaced = dcn_tvm.convert_torchvision(model)

    assert replaced == ["stem.0", "blocks.0", "blocks.1.deform", "blocks.1.again"]
    assert not any(isinstance(m, torchvision.ops.DeformConv2d) for m in model.modules())
    assert model.blocks[0] is model.blocks[1]["again"] and isinstance(model.blocks[0], DeformConv2d)
    assert all(value is parameters[name] for name, value in model.named_parameters())  # the same tensors
    assert model.blocks[1]["deform"].bias is None and not model.blocks[1]["deform"].training
    assert model.stem[0].training and model.stem[0].weight.dtype == dtype
    grads = []
    for run in (reference, model):
        run.zero_grad()
        inputs = (x, *offsets, mask)
        for tensor in inputs:
            tensor.grad = None
        out = run(x, offsets, mask)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        grads.append([out] + [t.grad.clone() for t in inputs]
                     + [p.grad.clone() for p in run.parameters()])
    for ours, theirs in zip(grads[1], grads[0]):
        assert relative_error(ours, theirs) < tolerance


@needs_torchvision
def test_convert_torchvision_leaves_what_it_cannot_swap():
    """The functional torchvision.ops.deform_conv2d in a forward is not a module: nothing to swap."""
    import torchvision

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))

        def forward(self, x, offset):
            return torchvision.ops.deform_conv2d(x, offset, self.weight)

    class Subclass(torchvision.ops.DeformConv2d):
        pass

    assert dcn_tvm.convert_torchvision(nn.Sequential(Functional(), Subclass(4, 4, 3))) == []
    with pytest.raises(TypeError, match="model is itself a torchvision DeformConv2d"):
        dcn_tvm.convert_torchvision(torchvision.ops.DeformConv2d(4, 4, 3))


def test_dcn_tvm_imports_without_torchvision():
    code = ("import sys; sys.modules['torchvision'] = None; import dcn_tvm, torch; "
            "assert dcn_tvm.convert_torchvision(torch.nn.Linear(2, 2)) == []")
    subprocess.run([sys.executable, "-c", code], check=True)


class TinyNet(nn.Module):
    """A modulated deformable conv feeding a deformable RoI pooling: both op families."""

    def __init__(self):
        super().__init__()
        self.conv = deforming(DeformConv2dPack(4, 8, 3, padding=1, offset_groups=2, modulated=True), std=0.1)
        self.pool = DeformRoIPool(8, 3, spatial_scale=0.5)
        with torch.no_grad():
            self.pool.offset_fc.weight.normal_(std=0.01)

    def forward(self, features, rois):
        return self.pool(self.conv(features), rois)


def test_torch_export_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TinyNet().eval()
    args = (torch.randn(2, 4, 8, 8), rois(3, 2))
    program = torch.export.export(model, args)
    path = tmp_path / "tiny.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    targets = {str(node.target) for node in loaded.graph.nodes if node.op == "call_function"}
    assert {"dcn_tvm.deform_conv2d.default", "dcn_tvm.deform_roi_pool.default"} <= targets
    with torch.no_grad():
        assert torch.equal(loaded.module()(*args), model(*args))


def test_torch_compile_max_autotune_on_cpu():
    torch.manual_seed(0)
    model = TinyNet()
    features, boxes = torch.randn(2, 4, 8, 8), rois(3, 2)
    results = []
    for run in (model, torch.compile(model, mode="max-autotune-no-cudagraphs", fullgraph=True)):
        model.zero_grad()
        out = run(features, boxes)
        out.square().sum().backward()
        results.append((out, model.conv.weight.grad.clone(), model.conv.conv_offset.weight.grad.clone()))
    for compiled, eager in zip(results[1], results[0]):
        assert relative_error(compiled, eager) < 1e-5
