"""Benchmark deform_conv2d side by side: dcn_tvm, dense conv (the floor), plain PyTorch, torchvision.

    python benchmarks/bench_deform_conv2d.py [--repeats 15] [--dtype float32] [--device cpu|cuda]

Medians of repeated runs after a warm-up (which also compiles dcn_tvm's kernels); every method sees
the same fresh random inputs. Prints the device and a Markdown table; ratios are last.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import deform_conv2d_torch  # noqa: E402

import dcn_tvm  # noqa: E402
from dcn_tvm.render import render  # noqa: E402

SHAPES = {
    # name: (N, C, H, W, O, kernel, padding, dilation)
    "resnet101-conv5 600x800": (1, 512, 38, 50, 512, 3, 2, 2),
    "small 56x56": (2, 64, 56, 56, 64, 3, 1, 1),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {torch.get_num_threads()} threads"


def median_ms(fn, repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def methods():
    found = {
        "dcn_tvm": lambda x, off, w, b, pad, dil: dcn_tvm.deform_conv2d(x, off, w, b, padding=pad, dilation=dil),
        "plain torch": lambda x, off, w, b, pad, dil: deform_conv2d_torch(x, off, w, b, padding=(pad, pad),
                                                                          dilation=(dil, dil)),
    }
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision

        found["torchvision"] = lambda x, off, w, b, pad, dil: torchvision.ops.deform_conv2d(
            x, off, w, b, padding=pad, dilation=dil)
    found["dense conv2d"] = lambda x, off, w, b, pad, dil: F.conv2d(x, w, b, padding=pad, dilation=dil)
    return found


def run(shape, dtype, device, repeats):
    n, c, h, w, o, k, pad, dil = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen).to(device, dtype).requires_grad_()
    offset = (torch.randn(n, 2 * k * k, h, w, generator=gen) * 2).to(device, dtype).requires_grad_()
    weight = (torch.randn(o, c, k, k, generator=gen) / (c * k * k) ** 0.5).to(device, dtype).requires_grad_()
    bias = torch.randn(o, generator=gen).to(device, dtype).requires_grad_()
    grad = torch.randn(n, o, h, w, generator=gen).to(device, dtype)
    results = {}
    for name, fn in methods().items():
        def forward():
            with torch.no_grad():
                fn(x, offset, weight, bias, pad, dil)

        def forward_backward():
            torch.autograd.grad(fn(x, offset, weight, bias, pad, dil), [x, offset, weight, bias], grad,
                                allow_unused=True)

        results[name] = (median_ms(forward, repeats, device), median_ms(forward_backward, repeats, device))
    return results


def parse_arguments(description: str, argv=None):
    """The options every operator benchmark takes: (args, torch device, torch dtype)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    return args, torch.device(args.device), getattr(torch, args.dtype)


def main(argv=None):
    args, device, dtype = parse_arguments(__doc__.splitlines()[0], argv)
    rows = []
    for label, shape in SHAPES.items():
        results = run(shape, dtype, device, args.repeats)
        dense, ours = results["dense conv2d"], results["dcn_tvm"]
        for name, (fwd, fwd_bwd) in results.items():
            rows.append(dict(shape=label, method=name, forward=fwd, forward_backward=fwd_bwd,
                             forward_vs_dense=fwd / dense[0], forward_backward_vs_dense=fwd_bwd / dense[1],
                             speedup_forward=fwd / ours[0], speedup_forward_backward=fwd_bwd / ours[1]))
    print(render("benchmark_table.md.j2", device=device_name(device), torch_version=torch.__version__,
                 dtype=args.dtype, repeats=args.repeats, rows=rows))


if __name__ == "__main__":
    main()
