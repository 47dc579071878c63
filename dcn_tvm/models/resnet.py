"""ResNet-101 feature extractor as the paper modifies it (§3), with deformable conv in its last layers.

Changes to torchvision's ResNet (v1.5, stride on the 3x3 conv), following the paper:
- no average pool or fc; a randomly initialised 1x1 conv (+ ReLU) reduces the 2048 channels to 1024;
- conv5's first stride is 1 instead of 2 and all its 3x3 convs have dilation 2 (padding 2), so the
  network stride is 16 instead of 32;
- the last `num_deformable` 3x3 convs (default 3: all of conv5's) are `DeformConv2dPack` layers whose
  offset convs start at zero (so the network starts as the plain one) and whose gradients are scaled
  by `offset_lr_mult` (the paper's beta).

Parameter names are torchvision's, so its ResNet-101 checkpoints load with `load_torchvision_state_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from dcn_tvm.ops.deform_conv2d import DeformConv2dPack

STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
_TORCHVISION_ONLY = ("fc.weight", "fc.bias")


def _kaiming(conv: nn.Module) -> nn.Module:
    """torchvision's initialisation of a ResNet conv (only `.weight`; an offset conv stays at zero)."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation; deformable or not) -> 1x1 (x4 channels), plus the shortcut.

    forward(x [N, in_channels, H, W]) -> [N, 4*width, OH, OW], OH = ceil(H / stride)
    """

    def __init__(self, in_channels: int, width: int, stride: int = 1, dilation: int = 1,
                 deformable: bool = False, offset_lr_mult: float = 1.0):
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = _kaiming(nn.Conv2d(in_channels, width, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(width)
        if deformable:
            conv2 = DeformConv2dPack(width, width, 3, stride, dilation, dilation, bias=False,
                                     offset_lr_mult=offset_lr_mult)
        else:
            conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation, bias=False)
        self.conv2 = _kaiming(conv2)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _kaiming(nn.Conv2d(width, out_channels, 1, bias=False))
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(_kaiming(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNetDCN(nn.Module):
    """The paper's ResNet feature extractor (stride 16, 1024 channels) with deformable last layers.

    Args:
        layers: bottleneck blocks per stage (conv2..conv5); (3, 4, 23, 3) is ResNet-101.
        num_deformable: how many of the last 3x3 convs are deformable (0 gives the plain network).
        offset_lr_mult: beta, the learning-rate multiplier of the offset convs (under SGD).
        out_channels: channels of the final 1x1 conv.

    forward(x [N, 3, H, W]) -> [N, out_channels, ceil(H/16), ceil(W/16)]
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 23, 3), num_deformable: int = 3,
                 offset_lr_mult: float = 1.0, out_channels: int = 1024):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)}")
        if not 0 <= num_deformable <= sum(layers):
            raise ValueError(f"num_deformable must be in [0, {sum(layers)}] (the 3x3 convs of the "
                             f"bottlenecks), got {num_deformable}")
        self.num_deformable, self.offset_lr_mult = num_deformable, offset_lr_mult
        self.conv1 = _kaiming(nn.Conv2d(3, 64, 7, 2, 3, bias=False))
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        first_deformable = sum(layers) - num_deformable
        in_channels, index = 64, 0
        for stage, (blocks, width) in enumerate(zip(layers, STAGE_WIDTHS)):
            stride, dilation = ((1, 1), (2, 1), (2, 1), (1, 2))[stage]
            stage_blocks = []
            for block in range(blocks):
                stage_blocks.append(Bottleneck(in_channels, width, stride if block == 0 else 1, dilation,
                                               index >= first_deformable, offset_lr_mult))
                in_channels, index = width * EXPANSION, index + 1
            setattr(self, f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        self.reduce = _kaiming(nn.Conv2d(in_channels, out_channels, 1))
        nn.init.zeros_(self.reduce.bias)
        self.out_channels = out_channels

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(conv4 [N, 1024, H/16, W/16], where the paper's RPN sits; the output [N, out_channels, H/16, W/16])."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        conv4 = self.layer3(self.layer2(self.layer1(x)))
        return conv4, self.relu(self.reduce(self.layer4(conv4)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[1]

    def load_torchvision_state_dict(self, state_dict: Mapping[str, Tensor]) -> list[str]:
        """Load a torchvision ResNet checkpoint (e.g. resnet101-*.pth); its fc is dropped.

        Returns the names left at their initialisation: the offset convs and the 1x1 reduction conv.
        Raises ValueError for any other missing or unexpected name, RuntimeError for a shape mismatch.
        """
        kept = {name: value for name, value in state_dict.items() if name not in _TORCHVISION_ONLY}
        missing, unexpected = self.load_state_dict(kept, strict=False)
        untouched = [name for name in missing if not (name.startswith("reduce.") or ".conv_offset." in name)]
        if untouched or unexpected:
            raise ValueError(f"not a torchvision ResNet checkpoint of this depth: missing {untouched}, "
                             f"unexpected {unexpected}")
        return missing


def resnet101_dcn(num_deformable: int = 3, offset_lr_mult: float = 1.0) -> ResNetDCN:
    """ResNet-101 with its last `num_deformable` 3x3 convs deformable (0: the plain network)."""
    return ResNetDCN((3, 4, 23, 3), num_deformable, offset_lr_mult)
