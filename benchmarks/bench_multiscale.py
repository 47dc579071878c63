"""Multi-scale training under the three shape policies (DCN_TVM_SHAPES): compiles and steady step time.

    python benchmarks/bench_multiscale.py [--steps 10] [--policies auto static dynamic]

Detection training draws a new image size nearly every step (shorter side 480-800 in steps of 32, the
longer one by a random aspect up to 5:3). The demo's deformable CNN (dcn_tvm.demo.DigitNet's layers, 64
channels, global-average-pooled into its classifier) trains here at those sizes scaled by 1/16 (shorter
side 30-50 in steps of 2), batch 2, the same sizes for every policy, twice over (two epochs). Each policy
runs in a fresh process without the disk cache, so every kernel it needs is compiled there; the steady
step time is the median of the second epoch, in which no policy compiles.
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

SCALE = 16


def sizes(steps: int, seed: int = 0) -> list[tuple[int, int]]:
    """(height, width) per step: shorter side 480-800 in steps of 32, aspect up to 5:3, divided by SCALE."""
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    for _ in range(steps):
        shorter = 480 + 32 * int(torch.randint(11, (1,), generator=generator))
        longer = int(shorter * (1 + 2 / 3 * float(torch.rand(1, generator=generator))))
        pair = (shorter, longer) if torch.rand(1, generator=generator) < 0.5 else (longer, shorter)
        drawn.append(tuple(side // SCALE for side in pair))
    return drawn


def train(steps: int) -> dict:
    """{"compiles", "compile_s", "steps_s": [seconds per step], "compiled": [kernels compiled per step],
    "resident_mib": [after each epoch]}, for two epochs over the sizes of `steps` steps."""
    from dcn_tvm.demo import DigitNet
    from dcn_tvm.kernels import cache

    compile_seconds = []
    original = cache._compile

    def timed_compile(spec):
        begin = time.perf_counter()
        try:
            return original(spec)
        finally:
            compile_seconds.append(time.perf_counter() - begin)

    cache._compile = timed_compile
    torch.manual_seed(0)
    model = DigitNet(deformable=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step_seconds, compiled, resident = [], [], []
    for height, width in sizes(steps) * 2:
        images, labels = torch.randn(2, 1, height, width), torch.randint(10, (2,))
        before, begin = len(compile_seconds), time.perf_counter()
        loss = F.cross_entropy(model.fc(model.top(model.stem(images)).mean((2, 3))), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_seconds.append(time.perf_counter() - begin)
        compiled.append(len(compile_seconds) - before)
        if len(step_seconds) % steps == 0:
            resident.append(resident_mib())
    return {"compiles": len(compile_seconds), "compile_s": sum(compile_seconds), "steps_s": step_seconds,
            "compiled": compiled, "resident_mib": resident}


def resident_mib() -> float:
    """This process's resident memory (MiB)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--policies", nargs="+", default=["auto", "static", "dynamic"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(train(args.steps)))
        return
    print(f"device: {device_name(torch.device('cpu'))} | torch {torch.__version__} | demo CNN, batch 2, "
          f"{args.steps} steps at sizes {sizes(args.steps)}\n")
    print("| DCN_TVM_SHAPES | compiles | compile s | steady step ms (second epoch) | resident MiB (epoch 1, 2) |")
    print("|---|---:|---:|---:|---:|")
    steady = {}
    for policy in args.policies:
        env = dict(os.environ, DCN_TVM_SHAPES=policy, DCN_TVM_NO_DISK_CACHE="1")
        command = [sys.executable, __file__, "--worker", "--steps", str(args.steps)]
        result = json.loads(subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
                            .strip().splitlines()[-1])
        second = list(zip(result["steps_s"], result["compiled"]))[args.steps:]
        steady[policy] = statistics.median(s for s, _ in second) * 1e3
        print(f"| {policy} | {result['compiles']} | {result['compile_s']:.1f} | {steady[policy]:.1f} "
              f"({sum(n for _, n in second)} compiles in it) | "
              f"{', '.join(f'{mib:.0f}' for mib in result['resident_mib'])} |")
    if "static" in steady:
        print("\n" + ", ".join(f"{policy} / static steady step: {steady[policy] / steady['static']:.2f}x"
                               for policy in steady if policy != "static"))


if __name__ == "__main__":
    main()
