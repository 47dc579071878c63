"""Benchmark the paper's networks end to end: deformable (dcn_tvm) against the same network with plain layers.

    python benchmarks/bench_models.py [--size 224] [--rois 64] [--repeats 5] [--device cpu|cuda]

Every network is the ResNet-101 feature extractor (stride 16, conv5 dilated) plus a head:
DeepLab (upsampled to the image), the category-aware RPN, Faster R-CNN (2-class RPN on conv4, RoI
head on `--rois` fixed proposals) and R-FCN (same, R-FCN head). Variants: "dcn_tvm" has deformable
conv in the last 3 3x3 convs and deformable (PS) RoI pooling in the RoI heads; "plain" has plain
convs and plain (PS) RoI pooling; "torchvision deform_conv2d" (where torchvision imports) is the
dcn_tvm variant with torchvision.ops.deform_conv2d doing the convolutions. Networks run in eval mode
(frozen BatchNorm, as the paper trains them) on one image; forward under no_grad, forward+backward
to every parameter. Medians after a warm-up (which also compiles dcn_tvm's kernels); ratios last.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
from unittest import mock

import torch
from bench_deform_conv2d import device_name, median_ms
from torch import Tensor, nn

import dcn_tvm.ops.deform_conv2d
from dcn_tvm.models import CategoryAwareRPN, DeepLabHead, FasterRCNNHead, RFCNHead, resnet101_dcn

CLASSES = 20  # PASCAL VOC


class Network(nn.Module):
    """Backbone + head. forward(image [1, 3, S, S], rois [R, 5]) -> the head's outputs, concatenated flat."""

    def __init__(self, head: str, deformable: bool):
        super().__init__()
        self.kind = head
        self.backbone = resnet101_dcn(3 if deformable else 0)
        if head == "DeepLab":
            self.head = DeepLabHead(1024, CLASSES)
        elif head == "category-aware RPN":
            self.head = CategoryAwareRPN(1024, CLASSES)
        else:
            self.rpn = CategoryAwareRPN(1024, num_classes=1)
            head_type = FasterRCNNHead if head == "Faster R-CNN" else RFCNHead
            self.head = head_type(1024, CLASSES, deformable=deformable)

    def forward(self, image: Tensor, rois: Tensor) -> Tensor:
        conv4, features = self.backbone.forward_features(image)
        if self.kind == "DeepLab":
            outputs = (self.head(features, size=image.shape[2:]),)
        elif self.kind == "category-aware RPN":
            outputs = self.head(features)
        else:
            outputs = self.rpn(conv4) + self.head(features, rois)
        return torch.cat([out.flatten() for out in outputs])


def variants():
    """name -> (deformable, context manager the network runs under)."""
    found = {"dcn_tvm": (True, contextlib.nullcontext), "plain": (False, contextlib.nullcontext)}
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision

        found["torchvision deform_conv2d"] = (True, lambda: mock.patch.object(
            dcn_tvm.ops.deform_conv2d, "deform_conv2d", torchvision.ops.deform_conv2d))
    return found


def proposals(count: int, size: int, generator: torch.Generator) -> Tensor:
    """[count, 5] boxes (batch 0) of 32 px to the whole image."""
    side = 32 + torch.rand(count, 2, generator=generator) * (size - 32)
    corner = torch.rand(count, 2, generator=generator) * (size - side)
    return torch.cat([torch.zeros(count, 1), corner, corner + side], dim=1)


def time_network(head: str, deformable: bool, context, image, rois, repeats, device):
    torch.manual_seed(0)
    network = Network(head, deformable).to(device).eval()
    parameters = list(network.parameters())

    def forward():
        with torch.no_grad():
            network(image, rois)

    def forward_backward():
        torch.autograd.grad(network(image, rois).square().sum(), parameters, allow_unused=True)

    with context():
        return median_ms(forward, repeats, device), median_ms(forward_backward, repeats, device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="image side (pixels)")
    parser.add_argument("--rois", type=int, default=64, help="proposals for the RoI heads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, args.size, args.size, generator=generator).to(device)
    rois = proposals(args.rois, args.size, generator).to(device)
    wait_policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"device: {device_name(device)} | torch {torch.__version__} | float32 | image 1x3x{args.size}x{args.size}, "
          f"{args.rois} RoIs | median of {args.repeats} runs | OMP_WAIT_POLICY={wait_policy}\n")
    print("| network | variant | forward ms | fwd+bwd ms | forward / plain | fwd+bwd / plain |")
    print("|---|---|---:|---:|---:|---:|")
    for head in ("DeepLab", "category-aware RPN", "Faster R-CNN", "R-FCN"):
        results = {name: time_network(head, deformable, context, image, rois, args.repeats, device)
                   for name, (deformable, context) in variants().items()}
        plain = results["plain"]
        for name, (forward, forward_backward) in results.items():
            print(f"| {head} | {name} | {forward:.1f} | {forward_backward:.1f} | {forward / plain[0]:.2f}x | "
                  f"{forward_backward / plain[1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
