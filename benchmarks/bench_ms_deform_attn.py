"""Benchmark ms_deform_attn on Deformable DETR's layers: dcn_tvm against the grid_sample formulation.

    python benchmarks/bench_ms_deform_attn.py [--repeats 5] [--threads 1 2] [--batches 1 2] [--onnx]

An 800x1333 image gives four levels at strides 8, 16, 32, 64 (100x167, 50x84, 25x42, 13x21: S = 22223);
M=8 heads of D=32 channels, P=4 points per level. The encoder layer's queries are every position
(Lq = S), the decoder layer's 300 object queries. Forward (no grad) and forward+backward (gradients of
value, locations and weights), medians after a warm-up (which also compiles dcn_tvm's kernels), float32.
Peak memory is the rise of the process's resident set during one call (VmHWM after resetting it through
/proc/self/clear_refs, large allocations returned to the system on free). Each thread count runs in a
fresh process (TVM's pool is sized once); idle workers sleep. With --onnx, onnxruntime runs the exported
graph of the forward (standard ONNX ops, dcn_tvm.ops.onnx_forms) beside them. Prints the device and a Markdown table;
ratios are last.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
HEADS, HEAD_DIM, POINTS = 8, 32, 4
LAYERS = {"encoder": sum(h * w for h, w in LEVELS), "decoder": 300}


def _status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def peak_mib(fn) -> float:
    """The rise of the resident set while `fn` runs once, in MiB."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS:")
    fn()
    return (_status_kib("VmHWM:") - before) / 1024


def median_ms(fn, repeats: int) -> tuple[float, float]:
    """Medians of the wall-clock and of the process's CPU time per call, in ms (one thread: the CPU time
    is the wall time the call would take alone on its core)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return sorted(walls)[len(walls) // 2] * 1e3, sorted(cpus)[len(cpus) // 2] * 1e3


def reference_points(batch: int, queries: int, gen):
    """[N, Lq, 2] normalised (x, y): the encoder's queries are the pixel centres of every level in order
    (Deformable DETR's encoder reference points), the decoder's uniform in [0, 1]."""
    import torch

    if queries != LAYERS["encoder"]:
        return torch.rand(batch, queries, 2, generator=gen)
    centres = [torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h, indexing="xy"),
                           dim=-1).view(-1, 2) for h, w in LEVELS]
    return torch.cat(centres).expand(batch, -1, -1)


def _ratio(peak: float | None, ours: float) -> str:
    """`peak` over dcn_tvm's peak, or "-" where dcn_tvm's is under 1 MiB (below the page-level resolution)."""
    return f"{peak / ours:.1f}x" if peak is not None and ours >= 1 else "-"


def inputs(batch: int, queries: int):
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights: every sample a few
    pixels of its level from its query's reference point (offsets ~ N(0, 2 px), as a trained model's
    are), the weights a softmax over levels x points."""
    import torch

    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    value = torch.randn(batch, LAYERS["encoder"], HEADS, HEAD_DIM, generator=gen)
    offsets = torch.randn(batch, queries, HEADS, len(LEVELS), POINTS, 2, generator=gen) * 2
    locations = reference_points(batch, queries, gen)[:, :, None, None, None, :] + offsets / shapes.flip(-1)[:, None]
    weights = torch.rand(batch, queries, HEADS, len(LEVELS) * POINTS, generator=gen).softmax(-1)
    return value, shapes, starts, locations, weights.view(batch, queries, HEADS, len(LEVELS), POINTS)


def _onnx_session(batch: int, queries: int, tensors):
    """onnxruntime running the exported forward (a Gather per row of bilinear corners, a weighted MatMul)."""
    import onnxruntime
    import torch

    import dcn_tvm
    from dcn_tvm.export import to_onnx

    class Attend(torch.nn.Module):
        def forward(self, value, locations, weights):
            return dcn_tvm.ms_deform_attn(value, tensors[1], tensors[2], locations, weights)

    value, _, _, locations, weights = tensors
    program = to_onnx(Attend(), (value, locations, weights), dynamic=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(os.environ["OMP_NUM_THREADS"])
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    feeds = {node.name: t.numpy() for node, t in zip(session.get_inputs(), (value, locations, weights))}
    return lambda: session.run(None, feeds)


def measure(threads: int, batches, repeats: int, onnx: bool) -> None:
    """In this process (started with `threads` threads): print one table row per measurement."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference_ms_deform_attn import ms_deform_attn_grid_sample

    import dcn_tvm

    torch.set_num_threads(threads)
    methods = {"dcn_tvm": lambda v, s, i, l, w: dcn_tvm.ms_deform_attn(v, s, i, l, w),
               "grid_sample": lambda v, s, i, l, w: ms_deform_attn_grid_sample(v, s, l, w)}
    for layer, queries in LAYERS.items():
        for batch in batches:
            tensors = inputs(batch, queries)
            value, shapes, starts, locations, weights = tensors
            leaves = [t.requires_grad_() for t in (value, locations, weights)]
            grad = torch.randn(batch, queries, HEADS * HEAD_DIM)
            results = {}
            for name, fn in methods.items():
                def forward(fn=fn):
                    with torch.no_grad():
                        fn(value, shapes, starts, locations, weights)

                def forward_backward(fn=fn):
                    torch.autograd.grad(fn(value, shapes, starts, locations, weights), leaves, grad)

                results[name] = (median_ms(forward, repeats), median_ms(forward_backward, repeats),
                                 peak_mib(forward), peak_mib(forward_backward))
            if onnx:  # forward only
                run = _onnx_session(batch, queries, [t.detach() for t in tensors])
                results["onnxruntime (export)"] = (median_ms(run, repeats), None, peak_mib(run), None)
            ours = results["dcn_tvm"]
            for name, (fwd, both, fwd_mib, both_mib) in results.items():
                print(f"| {layer} (Lq={queries}) | {batch} | {threads} | {name} | {_times(fwd)} | {_times(both)} | "
                      f"{_mib(fwd_mib)} | {_mib(both_mib)} | {_speedup(fwd, ours[0])}, {_speedup(both, ours[1])} | "
                      f"{_ratio(fwd_mib, ours[2])}, {_ratio(both_mib, ours[3])} |", flush=True)


def _times(times) -> str:
    return "-" if times is None else f"{times[0]:.1f} ({times[1]:.1f})"


def _mib(peak) -> str:
    return "-" if peak is None else f"{peak:.0f}"


def _speedup(times, ours) -> str:
    return "-" if times is None else f"{times[0] / ours[0]:.2f}x ({times[1] / ours[1]:.2f}x)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--onnx", action="store_true", help="also onnxruntime running the exported forward")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        measure(args.threads[0], args.batches, args.repeats, args.onnx)
        return
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    print(f"device: {model} | float32 | median of {args.repeats} runs, wall ms (CPU ms of the process) | "
          f"peak = rise of the resident set | load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| layer | batch | threads | method | forward ms | fwd+bwd ms | forward peak MiB | fwd+bwd peak MiB | "
          "dcn_tvm speed-up (fwd, fwd+bwd) | memory / dcn_tvm's (fwd, fwd+bwd) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for threads in args.threads:
        environment = dict(os.environ, OMP_NUM_THREADS=str(threads), TVM_NUM_THREADS=str(threads),
                           OMP_WAIT_POLICY="PASSIVE", TVM_THREAD_POOL_SPIN_COUNT="0",
                           MALLOC_MMAP_THRESHOLD_="65536")
        command = [sys.executable, __file__, "--worker", "--threads", str(threads), "--repeats", str(args.repeats),
                   "--batches", *map(str, args.batches)] + (["--onnx"] if args.onnx else [])
        subprocess.run(command, env=environment, check=True)


if __name__ == "__main__":
    main()
