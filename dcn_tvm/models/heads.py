"""The paper's task heads (§3) on top of `ResNetDCN`'s stride-16 features.

RoIs are [R, 5] rows (batch_index, x1, y1, x2, y2) in image pixels, or a list of [L_i, 4] boxes per
image; `num_classes` (C) excludes the background, so classifiers have C+1 outputs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dcn_tvm.ops.deform_roi_pool import DeformPSRoIPool, DeformRoIPool, deform_roi_pool


def _normal(layer: nn.Module, std: float) -> nn.Module:
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


class RoIPool(nn.Module):
    """RoI pooling without offsets, with `DeformRoIPool`'s arguments and sampling rule.

    forward(input [N, C, H, W], rois) -> [R, C, k, k]
    """

    def __init__(self, output_size: int, spatial_scale: float, sampling_ratio: int = 4):
        super().__init__()
        self.output_size, self.spatial_scale, self.sampling_ratio = output_size, spatial_scale, sampling_ratio

    def forward(self, input: Tensor, rois) -> Tensor:
        return deform_roi_pool(input, rois, output_size=self.output_size, spatial_scale=self.spatial_scale,
                               sampling_ratio=self.sampling_ratio)


class PSRoIPool(nn.Module):
    """R-FCN's position-sensitive RoI pooling without offsets, with `DeformPSRoIPool`'s arguments.

    A 1x1 conv (`score_conv`, named as in DeformPSRoIPool) makes k²·out_channels score maps, pooled
    with group_size k. forward(input [N, in_channels, H, W], rois) -> [R, out_channels, k, k]
    """

    def __init__(self, in_channels: int, out_channels: int, output_size: int, spatial_scale: float,
                 sampling_ratio: int = 4):
        super().__init__()
        self.output_size, self.spatial_scale, self.sampling_ratio = output_size, spatial_scale, sampling_ratio
        self.score_conv = _normal(nn.Conv2d(in_channels, output_size * output_size * out_channels, 1), 0.01)

    def forward(self, input: Tensor, rois) -> Tensor:
        return deform_roi_pool(self.score_conv(input), rois, output_size=self.output_size,
                               spatial_scale=self.spatial_scale, group_size=self.output_size,
                               sampling_ratio=self.sampling_ratio)


class DeepLabHead(nn.Module):
    """Semantic segmentation: a 1x1 conv to C+1 per-pixel score maps.

    forward(features [N, in_channels, h, w], size=None) -> [N, C+1, h, w], or bilinearly upsampled
    to `size` = (H, W) (the image's).
    """

    def __init__(self, in_channels: int = 1024, num_classes: int = 20):
        super().__init__()
        self.classifier = _normal(nn.Conv2d(in_channels, num_classes + 1, 1), 0.01)

    def forward(self, features: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        scores = self.classifier(features)
        if size is None:
            return scores
        return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


class CategoryAwareRPN(nn.Module):
    """Region proposal network whose 2-class (object or not) classifier is a (C+1)-class one.

    A 3x3 conv (+ ReLU) then, per anchor, 1x1 convs to C+1 class scores and 4 box deltas.
    forward(features [N, in_channels, H, W]) -> (scores [N, A*(C+1), H, W], deltas [N, A*4, H, W]),
    channel a*(C+1) + c being class c of anchor a.
    """

    def __init__(self, in_channels: int = 1024, num_classes: int = 20, num_anchors: int = 9,
                 mid_channels: int = 512):
        super().__init__()
        self.conv = _normal(nn.Conv2d(in_channels, mid_channels, 3, padding=1), 0.01)
        self.cls_score = _normal(nn.Conv2d(mid_channels, num_anchors * (num_classes + 1), 1), 0.01)
        self.bbox_pred = _normal(nn.Conv2d(mid_channels, num_anchors * 4, 1), 0.01)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        hidden = F.relu(self.conv(features))
        return self.cls_score(hidden), self.bbox_pred(hidden)


class FasterRCNNHead(nn.Module):
    """The paper's simplified Faster R-CNN head: (deformable) RoI pooling -> 2 fc (1024) -> cls / box.

    `deformable` uses `DeformRoIPool` (its offset fc with learning-rate multiplier `offset_lr_mult`,
    0.01 in the paper), otherwise plain RoI pooling. Box deltas are class-specific.
    forward(features [N, in_channels, H, W], rois) -> (scores [R, C+1], deltas [R, 4*(C+1)])
    """

    def __init__(self, in_channels: int = 1024, num_classes: int = 20, output_size: int = 7,
                 spatial_scale: float = 1 / 16, deformable: bool = False, hidden: int = 1024,
                 sampling_ratio: int = 4, offset_lr_mult: float = 0.01):
        super().__init__()
        if deformable:
            self.pool = DeformRoIPool(in_channels, output_size, spatial_scale, sampling_ratio,
                                      offset_lr_mult=offset_lr_mult)
        else:
            self.pool = RoIPool(output_size, spatial_scale, sampling_ratio)
        self.fc1 = nn.Linear(in_channels * output_size * output_size, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.cls_score = _normal(nn.Linear(hidden, num_classes + 1), 0.01)
        self.bbox_pred = _normal(nn.Linear(hidden, 4 * (num_classes + 1)), 0.001)

    def forward(self, features: Tensor, rois) -> tuple[Tensor, Tensor]:
        hidden = F.relu(self.fc2(F.relu(self.fc1(self.pool(features, rois).flatten(1)))))
        return self.cls_score(hidden), self.bbox_pred(hidden)


class RFCNHead(nn.Module):
    """R-FCN: position-sensitive score maps, (deformable) PS RoI pooling, and a vote (mean over bins).

    With `deformable`, both branches use `DeformPSRoIPool`: class-aware offsets for the C+1
    classification maps, one class-agnostic offset per bin for the 4 box-regression maps.
    forward(features [N, in_channels, H, W], rois) -> (scores [R, C+1], deltas [R, 4])
    """

    def __init__(self, in_channels: int = 1024, num_classes: int = 20, output_size: int = 7,
                 spatial_scale: float = 1 / 16, deformable: bool = True, sampling_ratio: int = 4,
                 offset_lr_mult: float = 1.0):
        super().__init__()
        pool = dict(output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio)
        if deformable:
            self.cls = DeformPSRoIPool(in_channels, num_classes + 1, offset_lr_mult=offset_lr_mult, **pool)
            self.bbox = DeformPSRoIPool(in_channels, 4, class_agnostic=True, offset_lr_mult=offset_lr_mult, **pool)
        else:
            self.cls = PSRoIPool(in_channels, num_classes + 1, **pool)
            self.bbox = PSRoIPool(in_channels, 4, **pool)

    def forward(self, features: Tensor, rois) -> tuple[Tensor, Tensor]:
        return self.cls(features, rois).mean((2, 3)), self.bbox(features, rois).mean((2, 3))
