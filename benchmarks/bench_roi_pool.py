"""Benchmark deform_roi_pool at the R-FCN head size: dcn_tvm, plain PyTorch, torchvision.

    python benchmarks/bench_roi_pool.py [--repeats 15] [--dtype float32] [--device cpu|cuda]

300 RoIs on the 1029-channel (7·7·21) score maps of a 600x1000 image at stride 16 (38x63), k = 7,
sampling_ratio 4: deformable PS RoI pooling with class-aware offsets, and PS RoI pooling without
offsets, where torchvision.ops.ps_roi_align (a different sampling rule, shown for scale only) runs
beside it if it imports; and plain RoI pooling (group_size 1) of 1029-, 1024- and 256-channel features beside
torchvision.ops.roi_align(aligned=True), which takes the same number of bilinear samples. Medians of repeated runs after a warm-up (which also compiles dcn_tvm's
kernels). Prints the device and a Markdown table; ratios are last.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from bench_deform_conv2d import device_name, median_ms, parse_arguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_roi_pool import deform_roi_pool_torch  # noqa: E402

import dcn_tvm  # noqa: E402

IMAGE, STRIDE, ROIS, CLASSES, K = (600, 1000), 16, 300, 21, 7
POOL = dict(output_size=K, spatial_scale=1 / STRIDE, group_size=K, sampling_ratio=4, gamma=0.1)


def inputs(dtype, device, channels=K * K * CLASSES):
    """Score maps [1, channels (7·7·21), 38, 63], proposals [300, 5] of 32..512 px, offsets [300, 42, 7, 7]."""
    gen = torch.Generator().manual_seed(0)
    height, width = (-(-side // STRIDE) for side in IMAGE)
    maps = torch.randn(1, channels, height, width, generator=gen)
    size = 32 + torch.rand(ROIS, 2, generator=gen) * 480
    corner = torch.rand(ROIS, 2, generator=gen) * (torch.tensor([IMAGE[1], IMAGE[0]]) - size)
    rois = torch.cat([torch.zeros(ROIS, 1), corner, corner + size], dim=1)
    offset = torch.randn(ROIS, 2 * CLASSES, K, K, generator=gen)
    return maps.to(device, dtype), rois.to(device), offset.to(device, dtype)


#: (label, input channels, group_size, with offsets)
CASES = [("deformable PS, class-aware offsets", K * K * CLASSES, K, True),
         ("PS, no offsets", K * K * CLASSES, K, False),
         ("RoI (group_size 1), 1029 channels", K * K * CLASSES, 1, False),
         ("RoI (group_size 1), 1024 channels", 1024, 1, False),
         ("RoI (group_size 1), 256 channels", 256, 1, False)]


def methods(group_size: int, deformable: bool):
    pool = dict(POOL, group_size=group_size)
    found = {"dcn_tvm": lambda maps, rois, offset: dcn_tvm.deform_roi_pool(maps, rois, offset, **pool)}
    if group_size > 1:  # the plain-torch reference takes minutes on the group_size 1 cases
        found["plain torch"] = lambda maps, rois, offset: deform_roi_pool_torch(maps, rois, offset, **pool)
    if not deformable and importlib.util.find_spec("torchvision") is not None:
        import torchvision

        scale, ratio = POOL["spatial_scale"], POOL["sampling_ratio"]
        if group_size == 1:
            found["torchvision roi_align(aligned=True)"] = lambda maps, rois, offset: torchvision.ops.roi_align(
                maps, rois.to(maps.dtype), K, scale, ratio, aligned=True)
        else:
            found["torchvision ps_roi_align"] = lambda maps, rois, offset: torchvision.ops.ps_roi_align(
                maps, rois.to(maps.dtype), K, scale, ratio)
    return found


def run(channels: int, group_size: int, deformable: bool, dtype, device, repeats):
    maps, rois, offset = inputs(dtype, device, channels)
    offset = offset.requires_grad_() if deformable else None
    maps.requires_grad_()
    leaves = [t for t in (maps, offset) if t is not None]
    grad = torch.randn(ROIS, channels // (group_size * group_size), K, K).to(device, dtype)
    results = {}
    for name, fn in methods(group_size, deformable).items():
        def forward():
            with torch.no_grad():
                fn(maps, rois, offset)

        def forward_backward():
            torch.autograd.grad(fn(maps, rois, offset), leaves, grad)

        results[name] = (median_ms(forward, repeats, device), median_ms(forward_backward, repeats, device))
    return results


def main(argv=None):
    args, device, dtype = parse_arguments(__doc__.splitlines()[0], argv)
    print(f"device: {device_name(device)} | torch {torch.__version__} | {args.dtype} | median of {args.repeats} runs\n")
    print("| pooling | method | forward ms | fwd+bwd ms | dcn_tvm speed-up (fwd, fwd+bwd) |")
    print("|---|---|---:|---:|---:|")
    for label, channels, group_size, deformable in CASES:
        results = run(channels, group_size, deformable, dtype, device, args.repeats)
        ours = results["dcn_tvm"]
        for name, (fwd, fwd_bwd) in results.items():
            print(f"| {label} | {name} | {fwd:.2f} | {fwd_bwd:.2f} | {fwd / ours[0]:.2f}x, {fwd_bwd / ours[1]:.2f}x |")


if __name__ == "__main__":
    main()
