"""Benchmark dcnv3_core / dcnv4_core against the grid_sample formulation (InternImage's PyTorch path).

    python benchmarks/bench_dcnv34.py [--threads 1 2] [--repeats 7] [--sizes 800x1216 224x224] [--stages 1 2 3 4]
                                      [--no-memory]

The DCNv3 layers of InternImage-T's four stages (channels 64/128/256/512, groups 4/8/16/32, 3x3, stride 1,
pad 1) at a detection image (800x1216: 200x304 ... 25x38 at strides 4 ... 32) and a classification image
(224x224), batch 1, float32: forward and forward+backward (input, offset and mask gradients), medians
after a warm-up (which compiles dcn_tvm's kernels; they are cached on disk). Each thread count runs in a
fresh process (TVM's pool size is fixed at start). Peak memory is the rise of the process's peak RSS
over one call after a first one, in a fresh child process per (layer, method).
Prints the CPU and a Markdown table; ratios are last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

#: InternImage-T: (channels, groups) per stage, and the stage strides.
STAGES = [(64, 4), (128, 8), (256, 16), (512, 32)]
STRIDES = [4, 8, 16, 32]


def layer_inputs(size: str, stage: int, packed: bool, requires_grad: bool):
    """(input [1, H, W, C], sampling tensors) of one stage's layer; offsets ~ 2 N(0, 1) px, mask a softmax."""
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference_dcnv3 import pack_offset_mask

    height, width = (int(side) // STRIDES[stage] for side in size.split("x"))
    channels, groups = STAGES[stage]
    gen = torch.Generator().manual_seed(stage)
    x = torch.randn(1, height, width, channels, generator=gen)
    offset = torch.randn(1, height, width, groups * 18, generator=gen) * 2
    mask = torch.randn(1, height, width, groups, 9, generator=gen).softmax(-1).reshape(1, height, width, -1)
    sampling = [pack_offset_mask(offset, mask, groups)] if packed else [offset, mask]
    return [t.requires_grad_(requires_grad) for t in (x, *sampling)], groups


def method(name: str, groups: int):
    import dcn_tvm
    from reference_dcnv3 import dcnv3_grid_sample

    window = (3, 3, 1, 1, 1, 1, 1, 1)
    if name == "dcnv3_core":
        return lambda x, offset, mask: dcn_tvm.dcnv3_core(x, offset, mask, *window, groups, x.shape[3] // groups, 1.0)
    if name == "dcnv4_core":
        return lambda x, packed: dcn_tvm.dcnv4_core(x, packed, *window, groups, x.shape[3] // groups, 1.0)
    pair = ((3, 3), (1, 1), (1, 1), (1, 1))
    if name == "grid_sample":
        return lambda x, offset, mask: dcnv3_grid_sample(x, offset, mask, *pair, groups, 1.0)
    raise ValueError(name)


METHODS = ("dcnv3_core", "dcnv4_core", "grid_sample")


def _call(name: str, size: str, stage: int, backward: bool):
    """A closure running one call of `name` on its layer."""
    import torch

    tensors, groups = layer_inputs(size, stage, name == "dcnv4_core", backward)
    fn = method(name, groups)
    if not backward:
        def run():
            with torch.no_grad():
                fn(*tensors)
        return run
    grad = torch.randn(fn(*tensors).shape)
    return lambda: torch.autograd.grad(fn(*tensors), tensors, grad)


def measure_memory(name: str, size: str, stage: int, backward: bool) -> float:
    """MiB: the peak RSS rise over one call, after a first call (which loads the kernels). The parent sets
    MALLOC_MMAP_THRESHOLD_ so that glibc returns every freed block over 64 KiB to the system: the first
    call's memory is not reused unseen by the second."""
    from bench_ms_deform_attn import peak_mib

    run = _call(name, size, stage, backward)
    run()
    return peak_mib(run)


def _child(args, *extra) -> str:
    env = dict(os.environ, TVM_NUM_THREADS=str(args.threads[0]), OMP_NUM_THREADS=str(args.threads[0]),
               OMP_WAIT_POLICY="PASSIVE", TVM_THREAD_POOL_SPIN_COUNT="0", MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, __file__, "--threads", str(args.threads[0]), "--repeats", str(args.repeats), *extra]
    return subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout


def run_threads(args) -> None:
    """One thread count in this process: timings, then memory per (layer, method) in child processes."""
    import torch

    torch.set_num_threads(args.threads[0])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_deform_conv2d import device_name, median_ms

    print(f"\n### {device_name(torch.device('cpu'))} (TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}), "
          f"float32, median of {args.repeats}\n")
    print("| image | stage | method | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB | "
          "speed-up vs grid_sample (fwd, fwd+bwd) | memory vs grid_sample (fwd, fwd+bwd) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        for stage in [stage - 1 for stage in args.stages]:
            rows = {}
            for name in METHODS:
                times = [median_ms(_call(name, size, stage, backward), args.repeats, torch.device("cpu"))
                         for backward in (False, True)]
                memory = [float("nan")] * 2
                if args.memory:
                    memory = [json.loads(_child(args, "--memory-of", name, size, str(stage), str(int(backward))))
                              for backward in (False, True)]
                rows[name] = (*times, *memory)
            base = rows["grid_sample"]
            for name, (fwd, both, mem_fwd, mem_both) in rows.items():
                print(f"| {size} | {stage + 1} | {name} | {fwd:.2f} | {both:.2f} | {mem_fwd:.1f} | {mem_both:.1f} | "
                      f"{base[0] / fwd:.2f}x, {base[1] / both:.2f}x | "
                      f"{mem_fwd / base[2]:.2f}, {mem_both / base[3]:.2f} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", nargs="+", default=["800x1216", "224x224"])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--memory-of", nargs=4, metavar=("METHOD", "SIZE", "STAGE", "BACKWARD"))
    args = parser.parse_args(argv)
    if args.memory_of:
        name, size, stage, backward = args.memory_of
        print(json.dumps(measure_memory(name, size, int(stage), bool(int(backward)))))
    elif len(args.threads) > 1 or os.environ.get("TVM_NUM_THREADS") != str(args.threads[0]):
        for threads in args.threads:  # each in a fresh process
            extra = ["--sizes", *args.sizes, "--stages", *map(str, args.stages)] + ([] if args.memory else ["--no-memory"])
            print(_child(argparse.Namespace(threads=[threads], repeats=args.repeats), *extra), end="", flush=True)
    else:
        run_threads(args)


if __name__ == "__main__":
    main()
