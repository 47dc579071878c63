"""Deploying dcn_tvm models: ONNX export (run in onnxruntime), swapping torchvision's DeformConv2d,
torch.export save/load, torch.compile max-autotune."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import dcn_tvm
from dcn_tvm import DeformConv2dPack

_MISSING_ONNX = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
needs_onnx = pytest.mark.skipif(bool(_MISSING_ONNX), reason=f"needs {', '.join(_MISSING_ONNX)} (dcn_tvm[export])")


def relative_error(actual, expected) -> float:
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return ((actual - expected).norm() / expected.norm()).item()


def run_onnxruntime(model_proto, *inputs):
    import onnxruntime

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


@needs_onnx
def test_opsets_without_deformconv_are_refused():
    from dcn_tvm.export import to_onnx

    with pytest.raises(ValueError, match=r"opset_version must be >= 19 \(the first with DeformConv\), got 18"):
        to_onnx(DeformConv2dPack(4, 4, 3).eval(), (torch.randn(1, 4, 5, 5),), opset_version=18)
