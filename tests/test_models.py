"""dcn_tvm.models: the ResNet-101-DCN backbone's structure, its zero-offset start, checkpoint loading, the heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcn_tvm import DeformConv2dPack, DeformPSRoIPool, DeformRoIPool
from dcn_tvm.models import (Bottleneck, CategoryAwareRPN, DeepLabHead, FasterRCNNHead, PSRoIPool, RFCNHead,
                            RoIPool, resnet101_dcn)

RESNET101 = (3, 4, 23, 3)


def kxk_convs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The network's convs with a kernel larger than 1x1, in order; offset convs belong to their layer."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, DeformConv2dPack)) and max(module.kernel_size) > 1
            and not name.endswith("conv_offset")]


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def torchvision_state_dict(layers, seed=0):
    """Random tensors under torchvision's ResNet parameter names and shapes (no num_batches_tracked,
    like the published checkpoints), fc included."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def batch_norm(prefix, channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)

    batch_norm("bn1", 64)
    in_channels = 64
    for stage, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            for index, shape in enumerate([(width, in_channels, 1, 1), (width, width, 3, 3),
                                           (4 * width, width, 1, 1)], start=1):
                shapes[f"{prefix}.conv{index}.weight"] = shape
                batch_norm(f"{prefix}.bn{index}", shape[0])
            if block == 0:
                shapes[f"{prefix}.downsample.0.weight"] = (4 * width, in_channels, 1, 1)
                batch_norm(f"{prefix}.downsample.1", 4 * width)
            in_channels = 4 * width
    shapes.update({"fc.weight": (1000, 2048), "fc.bias": (1000,)})
    return {name: torch.rand(shape, generator=gen) + 0.5 for name, shape in shapes.items()}


def test_output_stride_is_16():
    model = resnet101_dcn().eval()
    with torch.no_grad():
        conv4, out = model.forward_features(torch.randn(1, 3, 64, 64))
    assert conv4.shape == (1, 1024, 4, 4)
    assert out.shape == (1, 1024, 4, 4)


@pytest.mark.parametrize("num_deformable", [0, 3, 6, 33])
def test_deformable_layers_are_the_last_n_kxk_convs(num_deformable):
    model = resnet101_dcn(num_deformable, offset_lr_mult=0.5)
    convs = kxk_convs(model)
    assert len(convs) == 1 + sum(RESNET101)  # the 7x7 stem and one 3x3 per bottleneck
    deformable = [name for name, module in convs if isinstance(module, DeformConv2dPack)]
    assert deformable == [name for name, _ in convs[len(convs) - num_deformable:]]
    for name, module in convs:
        conv5 = name.startswith("layer4.")
        assert module.dilation == ((2, 2) if conv5 else (1, 1)), name
        stride = 2 if name in ("conv1", "layer2.0.conv2", "layer3.0.conv2") else 1
        assert module.stride == (stride, stride), name
        if isinstance(module, DeformConv2dPack):
            assert module.offset_lr_mult == 0.5
            assert not module.conv_offset.weight.any() and not module.conv_offset.bias.any()


def test_num_deformable_out_of_range():
    with pytest.raises(ValueError, match=r"num_deformable must be in \[0, 33\].*got 34"):
        resnet101_dcn(34)


def test_zero_offsets_reproduce_the_plain_network():
    torch.manual_seed(0)
    dcn, plain = resnet101_dcn(3).eval(), resnet101_dcn(0).eval()
    plain.load_state_dict({name: value for name, value in dcn.state_dict().items() if "conv_offset" not in name})
    x = torch.randn(1, 3, 64, 64)
    outputs, grads = [], []
    for model in (dcn, plain):
        image = x.clone().requires_grad_()
        out = model(image)
        out.square().mean().backward()
        outputs.append(out)
        grads.append((image.grad, model.layer4[0].conv2.weight.grad))
    assert relative_error(outputs[0], outputs[1]) < 1e-5
    for actual, expected in zip(grads[0], grads[1]):
        assert relative_error(actual, expected) < 1e-4
    assert dcn.layer4[0].conv2.conv_offset.weight.grad.abs().sum() > 0


def test_loads_a_torchvision_checkpoint():
    checkpoint = torchvision_state_dict(RESNET101)
    model = resnet101_dcn(3)
    left = model.load_torchvision_state_dict(checkpoint)
    assert sorted(left) == sorted([f"layer4.{b}.conv2.conv_offset.{p}" for b in range(3) for p in ("weight", "bias")]
                                  + ["reduce.weight", "reduce.bias"])
    state = model.state_dict()
    for name, value in checkpoint.items():
        if not name.startswith("fc."):
            assert torch.equal(state[name], value), name


def test_rejects_a_checkpoint_of_another_depth():
    with pytest.raises(ValueError, match=r"not a torchvision ResNet checkpoint of this depth: missing \['layer3.6"):
        resnet101_dcn(3).load_torchvision_state_dict(torchvision_state_dict((3, 4, 6, 3)))


FEATURES = (2, 16, 8, 8)  # N, C, H, W at stride 2 (spatial_scale 0.5) for 16x16 images
CLASSES = 3
ROIS = torch.tensor([[0, 0.0, 0.0, 15.0, 15.0], [1, 2.5, 3.0, 9.0, 14.0], [0, 6.0, 1.0, 12.5, 7.0]])
ROI_HEAD = dict(in_channels=16, num_classes=CLASSES, output_size=3, spatial_scale=0.5)
HEADS = {  # name: (head, whether it takes RoIs, output shapes)
    "deeplab": (lambda: DeepLabHead(16, CLASSES), False, [(2, 4, 8, 8)]),
    "rpn": (lambda: CategoryAwareRPN(16, CLASSES, num_anchors=2, mid_channels=8), False, [(2, 8, 8, 8)] * 2),
    "faster_rcnn": (lambda: FasterRCNNHead(**ROI_HEAD, hidden=32), True, [(3, 4), (3, 16)]),
    "faster_rcnn_deformable": (lambda: FasterRCNNHead(**ROI_HEAD, hidden=32, deformable=True), True,
                               [(3, 4), (3, 16)]),
    "rfcn": (lambda: RFCNHead(**ROI_HEAD), True, [(3, 4), (3, 4)]),
    "rfcn_plain": (lambda: RFCNHead(**ROI_HEAD, deformable=False), True, [(3, 4), (3, 4)]),
}


@pytest.mark.parametrize("name", HEADS)
def test_head_forward_backward(name):
    make, takes_rois, shapes = HEADS[name]
    torch.manual_seed(0)
    head = make()
    features = torch.randn(FEATURES, requires_grad=True)
    outputs = head(features, ROIS) if takes_rois else head(features)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert [tuple(out.shape) for out in outputs] == shapes
    sum(out.square().sum() for out in outputs).backward()
    assert features.grad.abs().sum() > 0
    for parameter_name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name


def test_roi_heads_choose_their_pooling():
    assert isinstance(FasterRCNNHead(**ROI_HEAD).pool, RoIPool)
    assert isinstance(FasterRCNNHead(**ROI_HEAD, deformable=True).pool, DeformRoIPool)
    rfcn = RFCNHead(**ROI_HEAD)
    assert isinstance(rfcn.cls, DeformPSRoIPool) and isinstance(rfcn.bbox, DeformPSRoIPool)
    assert not rfcn.cls.class_agnostic and rfcn.bbox.class_agnostic
    plain = RFCNHead(**ROI_HEAD, deformable=False)
    assert isinstance(plain.cls, PSRoIPool) and isinstance(plain.bbox, PSRoIPool)


def test_deeplab_upsamples_to_the_image():
    assert DeepLabHead(16, CLASSES)(torch.randn(FEATURES), size=(16, 16)).shape == (2, CLASSES + 1, 16, 16)


class TinyDetector(nn.Module):
    """A deformable bottleneck feeding a deformable Faster R-CNN head: both op families in one graph."""

    def __init__(self):
        super().__init__()
        self.block = Bottleneck(16, 4, deformable=True)
        self.head = FasterRCNNHead(**ROI_HEAD, hidden=32, deformable=True)

    def forward(self, features, rois):
        return self.head(self.block(features), rois)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = TinyDetector()
    with torch.no_grad():  # non-zero offsets, so the compiled graph samples off the grid
        model.block.conv2.conv_offset.weight.normal_(std=0.1)
        model.head.pool.offset_fc.weight.normal_(std=0.01)
    features = torch.randn(FEATURES)
    grads = []
    for run in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad()
        scores, deltas = run(features, ROIS)
        (scores.square().sum() + deltas.square().sum()).backward()
        grads.append((scores, deltas, model.block.conv2.conv_offset.weight.grad.clone()))
    for eager, compiled in zip(*grads):
        assert relative_error(compiled, eager) < 1e-4
