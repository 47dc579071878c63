"""Train a small CNN with and without deformable convolution on transformed, cluttered digits, then
plot where the deformable layers learned to sample (the paper's Figure 5).

    python -m dcn_tvm.demo [--epochs 30] [--out deformable_sampling.png] [--compile]

The data are scikit-learn's 8x8 digits (they ship with the package: nothing is downloaded), upscaled
to a 32x32 canvas, randomly scaled (0.5x to 1.5x), rotated (±30°) and moved (±6 px), among fragments
of other digits: a fresh draw every epoch for training, a fixed one for the test set. Both networks
are the same CNN, whose classifier reads only the top unit at the image centre; in the deformable
one the last three 3x3 convs are `DeformConv2dPack` layers, run by dcn_tvm's compiled kernels, so
that unit can learn where to look. The plot shows, for a few test images, the 9·9·9 = 729 points
those three layers sample for it, mapped back to the image.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcn_tvm.ops.deform_conv2d import DeformConv2dPack

SIZE = 32  # image side, pixels
STEM_STRIDE = 4  # the deformable layers run on SIZE / 4 = 8x8 feature maps
BATCH = 64  # every batch has this size, so each deformable layer compiles one kernel set
TEST_IMAGES = 6 * BATCH
ROTATION, SCALES, SHIFT = 30.0, (0.5, 1.5), 6.0  # degrees, zoom, pixels
CLUTTER, FRAGMENT = 3, 6  # fragments of other digits per image, their side in pixels
LEARNING_RATE, OFFSET_LR_MULT = 3e-3, 0.1  # Adam; offset convs learn 10x slower


def load_digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train digits [N, 1, 8, 8] in [0, 1], train labels [N], test digits [384, 1, 8, 8], test labels)."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:TEST_IMAGES], order[TEST_IMAGES:]
    return images[train], labels[train], images[test], labels[test]


def _resample(canvas: Tensor, scale: Tensor, angle: Tensor, shift: Tensor) -> Tensor:
    """Canvases [N, 1, SIZE, SIZE] scaled by `scale` [N] and rotated by `angle` [N] (radians) about
    their centre, then moved by `shift` [N, 2] pixels (x, y); bilinear, zero outside."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    inverse = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # output -> input
    theta = torch.cat([inverse, -inverse @ (2 * shift / SIZE).unsqueeze(-1)], -1)
    grid = F.affine_grid(theta, list(canvas.shape), align_corners=False)
    return F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def transform(digits: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Digits [N, 1, 8, 8] -> (images [N, 1, SIZE, SIZE], their scales [N]).

    At scale 1 a digit spans the middle SIZE/2 pixels. CLUTTER squares of side FRAGMENT, cut from
    the middle of other digits, land anywhere on the image.
    """
    n = digits.shape[0]

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    canvas = F.pad(F.interpolate(digits, size=SIZE // 2, mode="bilinear", align_corners=False), [SIZE // 4] * 4)
    scale, angle = uniform(n, low=SCALES[0], high=SCALES[1]), uniform(n, low=-1, high=1) * math.radians(ROTATION)
    images = _resample(canvas, scale, angle, uniform(n, 2, low=-SHIFT, high=SHIFT))
    x, y = torch.arange(SIZE).view(1, 1, 1, SIZE), torch.arange(SIZE).view(1, 1, SIZE, 1)
    for _ in range(CLUTTER):
        source = canvas[torch.randperm(n, generator=generator)]
        target = uniform(n, 2, high=SIZE - 1)  # (x, y) the fragment lands on ...
        origin = (SIZE - 1) / 2 + uniform(n, 2, low=-SIZE / 8, high=SIZE / 8)  # ... from this point of `source`
        fragment = _resample(source, torch.ones(n), torch.zeros(n), target - origin)
        tx, ty = (target[:, i].view(n, 1, 1, 1) for i in range(2))
        images = torch.maximum(images, fragment * (((x - tx).abs() < FRAGMENT / 2) & ((y - ty).abs() < FRAGMENT / 2)))
    return images, scale


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, deformable: bool = False) -> nn.Sequential:
    conv_type = DeformConv2dPack if deformable else nn.Conv2d
    return nn.Sequential(conv_type(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class DigitNet(nn.Module):
    """Three plain 3x3 convs down to stride 4, three (deformable) 3x3 convs, and a fc on the top
    unit at the image centre: all the classifier sees comes through that unit's sampling locations.

    forward(images [N, 1, SIZE, SIZE]) -> logits [N, 10]
    """

    def __init__(self, deformable: bool, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(1, 16), conv_bn_relu(16, width, 2), conv_bn_relu(width, width, 2))
        self.top = nn.Sequential(*[conv_bn_relu(width, width, deformable=deformable) for _ in range(3)])
        self.fc = nn.Linear(width, 10)

    def forward(self, images: Tensor) -> Tensor:
        centre = SIZE // STEM_STRIDE // 2
        return self.fc(self.top(self.stem(images))[:, :, centre, centre])

    def deformable_layers(self) -> list[DeformConv2dPack]:
        return [block[0] for block in self.top if isinstance(block[0], DeformConv2dPack)]


def train(model: DigitNet, run: nn.Module, digits: Tensor, labels: Tensor, epochs: int, seed: int,
          desc: str) -> float:
    """Adam with a cosine schedule over `epochs` of freshly transformed batches; `run` is `model`,
    compiled or not. Adam ignores gradient scale, so the offset convs' learning-rate multiplier is
    a parameter group. Returns the training speed in steps/s, from the median step (the first steps
    also compile the kernels)."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    steps = epochs * (len(labels) // BATCH)
    offsets = {id(p) for layer in model.deformable_layers() for p in layer.conv_offset.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in offsets]},
              {"params": [p for p in model.parameters() if id(p) in offsets], "lr": LEARNING_RATE * OFFSET_LR_MULT}]
    optimizer = torch.optim.Adam(groups, lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    step_times = []
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(labels) - BATCH + 1, BATCH):
                begin = time.perf_counter()
                batch = order[start:start + BATCH]
                loss = F.cross_entropy(run(transform(digits[batch], generator)[0]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                step_times.append(time.perf_counter() - begin)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    return 1 / statistics.median(step_times)


@torch.no_grad()
def predict(model: nn.Module, run: nn.Module, images: Tensor) -> Tensor:
    """Predicted labels [N] of images [N, 1, SIZE, SIZE], N a multiple of BATCH."""
    model.eval()
    return torch.cat([run(images[start:start + BATCH]).argmax(1) for start in range(0, len(images), BATCH)])


def offset_fields(model: DigitNet, images: Tensor) -> list[Tensor]:
    """The offsets [N, 18, 8, 8] each deformable layer predicts for `images` [N, 1, SIZE, SIZE]
    (N a multiple of BATCH), in layer order."""
    layers = model.deformable_layers()
    fields = [[] for _ in layers]
    hooks = [layer.conv_offset.register_forward_hook(lambda module, args, out, found=found: found.append(out))
             for layer, found in zip(layers, fields)]
    try:
        predict(model, model, images)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(found) for found in fields]


def sampling_points(fields: list[Tensor], unit: tuple[int, int], deformable: bool = True) -> Tensor:
    """Image-pixel (y, x) [9**L, 2] of the samples behind one top-layer unit, through L stride-1,
    padding-1 3x3 layers whose offsets are `fields` ([18, H, W] each, in layer order).

    Walking down from the top, each point gets the 3x3 grid around it plus the offsets of the layer
    below at that point (bilinear); `deformable=False` gives a standard conv's grid.
    """
    kernel = torch.stack(torch.meshgrid(torch.arange(-1.0, 2), torch.arange(-1.0, 2), indexing="ij"), -1).view(9, 2)
    points = torch.tensor([unit], dtype=torch.float32)
    for field in reversed(fields):
        grid = points.flip(1) / (torch.tensor(field.shape[1:]).flip(0) - 1) * 2 - 1  # (x, y) in [-1, 1]
        offset = F.grid_sample(field[None], grid.view(1, 1, -1, 2), align_corners=True, padding_mode="border")
        offset = offset.view(9, 2, -1).permute(2, 0, 1)  # [P, 9, (dy, dx)]
        points = (points[:, None] + kernel + (offset if deformable else 0)).reshape(-1, 2)
    return points * STEM_STRIDE


def plot(images: Tensor, fields: list[Tensor], labels: Tensor, predicted: Tensor, scales: Tensor, out: str) -> None:
    """The paper's Figure 5 for K images [K, 1, SIZE, SIZE] with their offsets (`fields`, K first):
    the 729 learned sampling points (red) of the top unit the classifier reads (green), over a
    standard conv's (blue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = (len(images) + 1) // 2
    figure, axes = plt.subplots(2, columns, figsize=(3.2 * columns, 7.0))
    unit = (SIZE // STEM_STRIDE // 2,) * 2
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index >= len(images):
            continue
        learned = sampling_points([field[index] for field in fields], unit)
        regular = sampling_points([field[index] for field in fields], unit, deformable=False).unique(dim=0)
        axis.imshow(images[index, 0], cmap="gray", extent=(-0.5, SIZE - 0.5, SIZE - 0.5, -0.5))
        axis.scatter(regular[:, 1], regular[:, 0], s=22, facecolors="none", edgecolors="#3d8bfd", linewidths=0.7,
                     alpha=0.7)
        axis.scatter(learned[:, 1], learned[:, 0], s=6, c="red", alpha=0.45, linewidths=0)
        axis.scatter([unit[1] * STEM_STRIDE], [unit[0] * STEM_STRIDE], s=110, c="lime", marker="*",
                     edgecolors="black", linewidths=0.5)
        axis.set_xlim(-6, SIZE + 5)
        axis.set_ylim(SIZE + 5, -6)
        axis.set_title(f"digit {labels[index]}, predicted {predicted[index]}, scale {scales[index]:.2f}", fontsize=10)
    figure.suptitle("Where the 3 deformable layers sample (red, 729 points) for the unit the classifier reads "
                    "(green);\nblue: a standard 3x3 conv's fixed grid", fontsize=11)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def pick(scales: Tensor, correct: Tensor, count: int) -> Tensor:
    """Indices of `count` correctly classified images spread evenly from the smallest scale to the largest."""
    candidates = correct.nonzero().flatten()
    candidates = candidates[scales[candidates].argsort()]
    return candidates[torch.linspace(0, len(candidates) - 1, count).round().long()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="deformable_sampling.png", help="where to write the plot (PNG)")
    parser.add_argument("--compile", action="store_true", help="run both networks through torch.compile")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    begin = time.perf_counter()
    train_digits, train_labels, test_digits, test_labels = load_digits(args.seed)
    test_images, test_scales = transform(test_digits, torch.Generator().manual_seed(args.seed + 1))
    accuracies, speeds = {}, {}
    for name, deformable in (("plain", False), ("deformable", True)):
        torch.manual_seed(args.seed)
        model = DigitNet(deformable)
        run = torch.compile(model) if args.compile else model
        speeds[name] = train(model, run, train_digits, train_labels, args.epochs, args.seed, f"{name:>10}")
        predicted = predict(model, run, test_images)
        accuracies[name] = (predicted == test_labels).float().mean().item()
    for name, accuracy in accuracies.items():
        print(f"{name:>10} CNN test accuracy: {100 * accuracy:.1f}% ({len(test_labels)} images), "
              f"{speeds[name]:.1f} training steps/s")
    print(f"the deformable CNN trains at {speeds['deformable'] / speeds['plain']:.2f}x the plain CNN's steps/s")
    shown = pick(test_scales, predicted == test_labels, 8)
    fields = [field[shown] for field in offset_fields(model, test_images)]
    plot(test_images[shown], fields, test_labels[shown], predicted[shown], test_scales[shown], args.out)
    print(f"wrote {args.out} ({time.perf_counter() - begin:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
