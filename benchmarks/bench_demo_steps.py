"""Training speed of the demo's CNN with and without deformable convs, side by side in one run.

    pip install -e '.[demo]'
    python benchmarks/bench_demo_steps.py [--steps 40] [--threads 1 2]

`python -m dcn_tvm.demo` trains the plain network, then the deformable one, so the machine may change speed
between them; here their training steps alternate (the same batches, Adam as in the demo), the first
steps of each are warm-up (dcn_tvm compiles its kernels there), and the medians are compared. Each thread
count runs in a fresh process with torch and TVM given that many threads. Ratios are last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from bench_deform_conv2d import device_name

from dcn_tvm.demo import BATCH, DigitNet, load_digits, transform

WARMUP = 5


def step_times(steps: int) -> dict:
    """{network: [seconds per training step]}, the two networks' steps interleaved."""
    digits, labels, _, _ = load_digits(0)
    generator = torch.Generator().manual_seed(0)
    networks = {}
    for name, deformable in (("plain", False), ("deformable", True)):
        torch.manual_seed(0)
        model = DigitNet(deformable)
        networks[name] = (model, torch.optim.Adam(model.parameters(), lr=3e-3))
    times = {name: [] for name in networks}
    for step in range(WARMUP + steps):
        batch = torch.randint(len(labels), (BATCH,), generator=generator)
        images = transform(digits[batch], generator)[0]
        for name, (model, optimizer) in networks.items():
            begin = time.perf_counter()
            loss = F.cross_entropy(model(images), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step >= WARMUP:
                times[name].append(time.perf_counter() - begin)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.threads[0])
        print(json.dumps(step_times(args.steps)))
        return
    print(f"device: {device_name(torch.device('cpu')).rsplit(',', 1)[0]} | torch {torch.__version__} | "
          f"demo DigitNet, batch {BATCH}, median of {args.steps} interleaved training steps\n")
    print("| threads | plain steps/s | deformable steps/s | deformable / plain |")
    print("|---:|---:|---:|---:|")
    for threads in args.threads:
        env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        command = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--threads", str(threads)]
        times = json.loads(subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
                           .strip().splitlines()[-1])
        speed = {name: 1 / statistics.median(values) for name, values in times.items()}
        print(f"| {threads} | {speed['plain']:.1f} | {speed['deformable']:.1f} | "
              f"{speed['deformable'] / speed['plain']:.2f}x |")


if __name__ == "__main__":
    main()
