"""torchvision's own deform_conv2d tests, run on dcn_tvm, and what they imply for our other modules.

`TestDeformConv` restates, in our words, the class of that name in torchvision 0.29's test/test_ops.py
(its CPU tests; the CUDA ones need a GPU), with the functional and module being dcn_tvm's: forward
against a float64 loop reference, gradcheck eager and scripted, TorchScript, the module a leaf of
torchvision's feature extractor, torchvision's errors for wrong offset and mask sizes. As torchvision
does, every test runs again under torch.library's opcheck utilities (test_schema__..., ...), which
check each dcn_tvm op the test calls. The tests after the class carry the same promises to
DeformConv2dPack and the RoI poolings, to models converted from torchvision, and to numpy integers.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
import torch.testing._internal.optests as optests
from reference import deform_conv2d_loops
from test_deform_conv2d import relative_error
from torch import Tensor, nn
from torch.autograd import gradcheck

import dcn_tvm
from dcn_tvm.geometry.arguments import ShapeError

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.(script|save|load)` is deprecated:FutureWarning")
torchvision = pytest.importorskip("torchvision", reason="the suite runs torchvision's tests and its feature extractor")
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names  # noqa: E402

# torchvision's layer: 6 -> 2 channels in 2 groups, 3 offset groups, a 3x2 kernel, on 5x4 images (output 2x3).
CONV = dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1))
GROUPS, OFFSET_GROUPS, KERNEL, IMAGE, OUTPUT = 2, 3, (3, 2), (5, 4), (2, 3)


def _strided_like(tensor: Tensor, order: tuple[int, ...]) -> Tensor:
    """The same values, stored with the dimensions in `order` (a non-contiguous view)."""
    inverse = tuple(order.index(d) for d in range(tensor.dim()))
    return tensor.detach().permute(order).contiguous().permute(inverse).requires_grad_()


def _conv_inputs(contiguous: bool, batch: int, dtype=torch.float64):
    """(input, weight, offset, mask, bias) for torchvision's layer; offsets and mask from randn, so
    samples land between pixels, outside the image, and the mask takes both signs."""
    gen = torch.Generator().manual_seed(batch + contiguous)
    kh, kw = KERNEL
    x = torch.rand(batch, 6, *IMAGE, generator=gen, dtype=dtype)
    offset = torch.randn(batch, 2 * OFFSET_GROUPS * kh * kw, *OUTPUT, generator=gen, dtype=dtype)
    mask = torch.randn(batch, OFFSET_GROUPS * kh * kw, *OUTPUT, generator=gen, dtype=dtype)
    weight = torch.randn(2, 6 // GROUPS, kh, kw, generator=gen, dtype=dtype)
    bias = torch.randn(2, generator=gen, dtype=dtype)
    tensors = [t.requires_grad_() for t in (x, weight, offset, mask, bias)]
    if not contiguous:  # torchvision's layouts: H and W swapped in memory, batch moved inward, ...
        tensors[:4] = [_strided_like(tensors[0], (0, 1, 3, 2)), _strided_like(tensors[1], (3, 2, 0, 1)),
                       _strided_like(tensors[2], (1, 3, 0, 2)), _strided_like(tensors[3], (1, 3, 0, 2))]
        assert batch == 0 or not any(t.is_contiguous() for t in tensors[:4])
    return tensors


def _layer(**overrides) -> dcn_tvm.DeformConv2d:
    return dcn_tvm.DeformConv2d(**{**dict(in_channels=6, out_channels=2, kernel_size=KERNEL, groups=GROUPS, **CONV),
                                   **overrides})


class _CallsLayer(nn.Module):
    """A model that calls its layer on its three inputs (torchvision's wrapper for the leaf test)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, a, b, c):
        self.layer(a, b, c)


def _conv(x: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor, bias: Tensor,
                   stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    return dcn_tvm.deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation,
                                 mask=mask)


class TestDeformConv:
    def test_is_leaf_node(self):
        """In torchvision's feature extractor the layer is one node, named by its path."""
        train_nodes, eval_nodes = get_graph_node_names(_CallsLayer(_layer()))
        assert train_nodes == eval_nodes == ["a", "b", "c", "layer"]

    @pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
    @pytest.mark.parametrize("batch", [0, 33])
    def test_forward(self, contiguous, batch):
        x, _, offset, mask, _ = _conv_inputs(contiguous, batch)
        layer = _layer().double()
        for modulation in (mask, None):
            expected = (deform_conv2d_loops(x, offset, layer.weight, layer.bias, mask=modulation, **CONV) if batch
                        else x.new_empty(0, 2, *OUTPUT))
            torch.testing.assert_close(layer(x, offset, modulation).detach(), expected, rtol=1e-5, atol=1e-5)

    def test_wrong_sizes(self):
        """torchvision's messages, raised as RuntimeError; the float32 layer on float64 inputs shows that
        sizes are checked before dtypes."""
        x, _, offset, mask, _ = _conv_inputs(True, 10)
        layer = _layer()
        with pytest.raises(RuntimeError, match="the shape of the offset"):
            layer(x, torch.rand_like(offset[:, :2]))
        with pytest.raises(RuntimeError, match=r"mask.shape\[1\] is not valid"):
            layer(x, offset, torch.rand_like(mask[:, :2]))

    @pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
    @pytest.mark.parametrize("batch", [0, 33])
    def test_backward(self, contiguous, batch):
        x, weight, offset, mask, bias = _conv_inputs(contiguous, batch)
        conv = (CONV["stride"], CONV["padding"], CONV["dilation"])

        def eager(x, offset, mask, weight, bias):
            return dcn_tvm.deform_conv2d(x, offset, weight, bias, *conv, mask=mask)

        def scripted(x, offset, mask, weight, bias):
            return torch.jit.script(_conv)(x, offset, mask, weight, bias, *conv)

        for function in (eager, scripted):
            gradcheck(function, (x, offset, mask, weight, bias), nondet_tol=1e-5, fast_mode=True)
            gradcheck(lambda x, offset, weight, bias: function(x, offset, None, weight, bias),
                      (x, offset, weight, bias), nondet_tol=1e-5, fast_mode=True)

    def test_forward_scriptability(self):
        torch.jit.script(dcn_tvm.DeformConv2d(in_channels=8, out_channels=8, kernel_size=3))


# No expected failures: the file lists none (torch's format, checked by generate_opcheck_tests).
optests.generate_opcheck_tests(
    testcase=TestDeformConv,
    namespaces=["dcn_tvm"],
    failures_dict_path=os.path.join(os.path.dirname(__file__), "optests_failures_dict.json"),
    additional_decorators={},
    test_utils=["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"],
)


def _outputs_and_gradients(module: nn.Module, inputs: list[Tensor]) -> list[Tensor]:
    """The output, then the gradients of every input that requires one and of every parameter (by
    name: a traced graph may hold them in another order), for a fixed output gradient."""
    output = module(*inputs)
    leaves = [t for t in inputs if t.requires_grad] + [p for _, p in sorted(module.named_parameters())]
    grad = torch.randn(output.shape, generator=torch.Generator().manual_seed(9), dtype=output.dtype)
    return [output.detach(), *torch.autograd.grad(output, leaves, grad)]


def _rois():
    """Boxes of two images, one partly outside; as [R, 5] rows and as torchvision's per-image lists."""
    rows = torch.tensor([[0, 0.5, 1.0, 8.0, 6.5], [1, 2.0, 0.0, 9.5, 9.0], [1, -2.0, 3.0, 4.0, 12.0]],
                        dtype=torch.float64)
    return rows, [rows[:1, 1:], rows[1:, 1:]]


def _modules_and_inputs(offset_lr_mult: float):
    """Every dcn_tvm module in float64, offset layers non-zero and their gradients times
    `offset_lr_mult`, with inputs that need gradients."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 18, 10, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    offset = torch.randn(2, 18, 10, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 9, 10, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    rows, _ = _rois()
    modules = [
        (dcn_tvm.DeformConv2d(18, 4, 3, padding=1), [x, offset, mask]),
        (dcn_tvm.DeformConv2d(18, 4, 3, padding=1, bias=False), [x, offset]),
        (dcn_tvm.DeformConv2dPack(18, 4, 3, padding=1, modulated=True, offset_lr_mult=offset_lr_mult), [x]),
        (dcn_tvm.DeformRoIPool(18, 3, 1.0, offset_lr_mult=offset_lr_mult), [x, rows]),
        (dcn_tvm.DeformPSRoIPool(18, 2, 3, 1.0, offset_lr_mult=offset_lr_mult), [x, rows]),
    ]
    for module, _ in modules:
        module.double()
        for name, parameter in module.named_parameters():
            if "offset" in name:
                nn.init.normal_(parameter, std=0.05, generator=gen)
    return modules


MODULE_NAMES = ["DeformConv2d", "DeformConv2d-nobias", "DeformConv2dPack", "DeformRoIPool", "DeformPSRoIPool"]


@pytest.mark.parametrize("index", range(5), ids=MODULE_NAMES)
def test_scripted_modules_match_eager(index):
    """Output and every gradient (inputs and parameters, offset_lr_mult applied) of the scripted module
    equal eager's; so do those of the scripted module saved and loaded (the multiplier is in forward)."""
    for save in (False, True):
        module, inputs = _modules_and_inputs(0.1)[index]
        eager = _outputs_and_gradients(module, inputs)
        scripted = torch.jit.script(module)
        if save:
            buffer = io.BytesIO()
            torch.jit.save(scripted, buffer)
            buffer.seek(0)
            scripted = torch.jit.load(buffer)
        for a, b in zip(_outputs_and_gradients(scripted, inputs), eager, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_scripted_functionals_take_ints_and_box_lists():
    layer, (x, offset, mask) = _modules_and_inputs(1.0)[0]
    conv = torch.jit.script(dcn_tvm.deform_conv2d)
    torch.testing.assert_close(conv(x, offset, layer.weight, None, 1, 1, (1, 1), mask),
                               dcn_tvm.deform_conv2d(x, offset, layer.weight, padding=(1, 1), mask=mask))
    rows, boxes = _rois()
    pool = torch.jit.script(dcn_tvm.deform_roi_pool)
    features = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(pool(features, boxes, None, 2, 0.5, 2),
                               dcn_tvm.deform_roi_pool(features, rows, output_size=2, spatial_scale=0.5, group_size=2))


def test_scripted_ops_check_their_arguments():
    """TorchScript skips the Python checks; the op checks every argument when it runs."""
    x, weight, offset, _, bias = _conv_inputs(True, 2)
    scripted = torch.jit.script(_conv)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(2,\)"):
        scripted(x, offset, None, weight, bias[:1], (2, 1), (1, 0), (2, 1))
    with pytest.raises(RuntimeError, match="the shape of the offset tensor at dimension 1 is not valid"):
        scripted(x, offset[:, :5], None, weight, bias, (2, 1), (1, 0), (2, 1))


class _Calls(nn.Module):
    """A model around one module, to trace it as a child."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, a, b=None, c=None):
        return self.layer(*[t for t in (a, b, c) if t is not None]) * 2


@pytest.mark.parametrize("index", range(5), ids=MODULE_NAMES)
def test_fx_traces_modules(index):
    """torch.fx.symbolic_trace: a module inside a model is one call_module node; a module traced itself
    shows its ops. Both graphs compute eager's output and gradients."""
    module, inputs = _modules_and_inputs(0.1)[index]
    model = _Calls(module)
    graph = torch.fx.symbolic_trace(model, concrete_args=dict.fromkeys("bc"[len(inputs) - 1:]))
    assert [n.target for n in graph.graph.nodes if n.op == "call_module"] == ["layer"]
    own = torch.fx.symbolic_trace(module)
    ops = {n.target for n in own.graph.nodes if n.op == "call_function"}
    assert ops & {torch.ops.dcn_tvm.deform_conv2d, torch.ops.dcn_tvm.deform_roi_pool}
    for traced, reference in ((graph, model), (own, module)):
        for a, b in zip(_outputs_and_gradients(traced, inputs), _outputs_and_gradients(reference, inputs), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    if isinstance(module, (dcn_tvm.DeformRoIPool, dcn_tvm.DeformPSRoIPool)):  # rois as per-image lists too
        torch.testing.assert_close(own(inputs[0], _rois()[1]), module(*inputs), rtol=0, atol=0)


class _Block(nn.Module):
    """A residual block whose deformable conv (torchvision's) takes its offsets, and a DCNv2 mask, from
    a plain conv: the way torchvision users write them."""

    def __init__(self, channels: int):
        super().__init__()
        self.offset = nn.Conv2d(channels, 27, 3, padding=1)
        self.conv = torchvision.ops.DeformConv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        out = self.offset(x)
        return x + torch.relu(self.conv(x, out[:, :18], torch.sigmoid(out[:, 18:])))


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.layer = nn.Sequential(_Block(8), _Block(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.layer(self.stem(x)))


def test_feature_extractor_on_a_converted_backbone():
    """After convert_torchvision, torchvision's feature extractor sees the same node names and returns
    the same features and gradients as on the torchvision model."""
    torch.manual_seed(0)
    theirs = _Backbone().double()
    ours = _Backbone().double()
    ours.load_state_dict(theirs.state_dict())
    assert dcn_tvm.convert_torchvision(ours) == ["layer.0.conv", "layer.1.conv"]
    assert isinstance(ours.layer[0].conv, dcn_tvm.DeformConv2d)
    assert get_graph_node_names(ours) == get_graph_node_names(theirs)

    return_nodes = {"layer.0.conv": "deformed", "layer.1": "block", "head": "logits"}
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    features = [create_feature_extractor(model, return_nodes)(x) for model in (ours, theirs)]
    for name in return_nodes.values():
        assert relative_error(features[0][name], features[1][name]) <= 1e-12, name
    gradients = [torch.autograd.grad(f["logits"].sum() + f["deformed"].sum(), [x, *m.parameters()])
                 for f, m in zip(features, (ours, theirs))]
    for a, b in zip(*gradients, strict=True):
        assert relative_error(a, b) <= 1e-12


# Wrong sizes for a 4 -> 6 layer with a 3x3 kernel, padding 1, on 2x4x7x9 inputs (offset [2, 18, 7, 9]).
WRONG_SIZES = {
    "offset channels below 2*KH*KW": (dict(offset=(2, 2, 7, 9)), "the shape of the offset tensor at dimension 1"),
    "offset channels not a multiple": (dict(offset=(2, 20, 7, 9)), "the shape of the offset tensor at dimension 1"),
    "mask channels": (dict(mask=(2, 8, 7, 9)), r"mask.shape\[1\] is not valid"),
    "weight groups": (dict(weight=(6, 3, 3, 3)), r"must be a multiple of weight.shape\[1\]"),
    "offset batch": (dict(offset=(3, 18, 7, 9)), r"offset must have shape \(2, 18, 7, 9\)"),
    "offset size": (dict(offset=(2, 18, 7, 8)), r"offset must have shape \(2, 18, 7, 9\)"),
    "mask size": (dict(mask=(2, 9, 6, 9)), r"mask must have shape \(2, 9, 7, 9\)"),
    "image too small": (dict(input=(2, 4, 1, 1), offset=(2, 18, 1, 1), padding=0), "too small"),
}


@pytest.mark.parametrize("override,message", WRONG_SIZES.values(), ids=WRONG_SIZES.keys())
def test_wrong_sizes_raise_what_torchvision_raises(override, message):
    """Every size mistake that torchvision answers with a RuntimeError is a ShapeError here: caught as
    RuntimeError (torchvision's) and as ValueError (ours). Offset and mask in float64 against float32
    weights: the sizes are checked first, as in torchvision."""
    shapes = dict(input=(2, 4, 7, 9), offset=(2, 18, 7, 9), weight=(6, 4, 3, 3), mask=(2, 9, 7, 9))
    shapes.update({k: v for k, v in override.items() if k != "padding"})
    tensors = {name: torch.rand(shape, dtype=torch.float64 if name in ("offset", "mask") else torch.float32)
               for name, shape in shapes.items()}
    padding = override.get("padding", 1)
    with pytest.raises(RuntimeError):
        torchvision.ops.deform_conv2d(**tensors, padding=padding)
    with pytest.raises(ShapeError, match=message) as raised:
        dcn_tvm.deform_conv2d(**tensors, padding=padding)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, RuntimeError)


def test_numpy_integers_are_integers():
    """numpy integers pass wherever ints do (as in torchvision); bools and floats, numpy's too, do not."""
    x, weight, offset, mask, bias = _conv_inputs(True, 2)
    expected = dcn_tvm.deform_conv2d(x, offset, weight, bias, (2, 1), (1, 0), (2, 1), mask=mask)
    stride, padding, dilation = (np.int64(2), np.int32(1)), [np.int64(1), np.uint8(0)], (np.int16(2), 1)
    torch.testing.assert_close(dcn_tvm.deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask=mask),
                               expected, rtol=0, atol=0)
    layer = dcn_tvm.DeformConv2d(np.int64(6), np.int64(2), (np.int64(3), 2), stride, padding, dilation,
                                 groups=np.int64(2)).double()
    assert (layer.stride, layer.padding, layer.dilation, layer.groups) == ((2, 1), (1, 0), (2, 1), 2)
    assert all(type(v) is int for v in (*layer.kernel_size, *layer.stride, *layer.padding, layer.groups))
    torch.jit.script(layer)
    rows, _ = _rois()
    features = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(dcn_tvm.deform_roi_pool(features, rows, output_size=np.int64(2), group_size=np.int8(2)),
                               dcn_tvm.deform_roi_pool(features, rows, output_size=2, group_size=2))
    for bad in (True, np.bool_(True), 1.0, np.float64(1.0), (1, np.float32(1))):
        with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
            dcn_tvm.deform_conv2d(x, offset, weight, bias, bad)
