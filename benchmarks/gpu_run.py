"""The GPU run (issue 25): device ceilings, correctness, speed and tuning of the CUDA path in one command.

    benchmarks/gpu_run.sh OUT                 # on the GPU host (benchmarks/GPU_NOTES.md, "GPU run")
    benchmarks/gpu_run.sh --rehearse OUT      # the same steps on this CPU: simulated GPU, small shapes
    python benchmarks/gpu_run.py --workloads cuda|llvm   # what the prebuilt packages must hold
    python benchmarks/gpu_run.py --verify-package        # are those kernels in DCN_TVM_PREBUILT?

Steps, in order of value, each in its own process with its own time budget:
  a. the device and its ceilings (name, clocks, a large copy, large matrix products), the versions;
  b. correctness: `pytest -m cuda`; dcn_tvm against torchvision (forward and every gradient) over the
     conformance geometries; ms_deform_attn and DCNv3/v4 against their grid_sample formulations;
     compute-sanitizer's memcheck and racecheck on a small forward and backward; the four RoI poolings
     against the CPU kernels;
  c. speed side by side (CUDA events, warm-up, medians, L2 flushed before each call; peak memory beside
     each time): dcn_tvm, torchvision and the dense conv of the same shape; RoI pooling against
     torchvision's; Deformable DETR's attention and InternImage's DCNv3/v4 against the grid_sample
     formulations (their PyTorch paths);
  d. tuning (`dcn-tvm tune`) of the conv5 and DCNv2 forwards, tuned against default time; skipped where
     the TVM compiler is absent;
  e. OUT/summary.md and OUT/results.json, rewritten whenever a result comes in, so a failed step or a run
     cut off keeps what came before. OUT also gets run.log (everything printed) and tuning_logs.tar.gz.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: A Python that imports the installed dcn_tvm, not the checkout's (subprocesses run in the checkout): -P,
#: new in Python 3.11; on 3.10 the checkout comes first (the rehearsal's editable install is the checkout).
PYTHON_INSTALLED = [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable]
SCRIPT = Path(__file__).resolve()
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

STEPS = {"a": "device and ceilings", "b": "correctness", "c": "speed", "d": "tuning", "e": "summary"}
DIRECTIONS = ("forward", "forward+backward")
#: Relative error (L2 norm) allowed against the float64 reference, per dtype; a result within twice
#: torchvision's own error passes too.
TOLERANCE = {"float32": 1e-4, "float16": 3e-3, "bfloat16": 2e-2}
GPU_TARGET = "cuda-sm_90"


# ------------------------------------------------------------------------------------------------ plans

@dataclass(frozen=True)
class ConvShape:
    """A deform_conv2d layer timed in step c (stride 1, one group, one offset group)."""

    label: str
    n: int
    c: int
    h: int
    w: int
    o: int
    kernel: int = 3
    padding: int = 1
    dilation: int = 1
    mask: bool = False

    @property
    def case(self) -> tuple:
        """The layer as a tests/test_deform_conv2d.py case tuple."""
        k, p, d = self.kernel, self.padding, self.dilation
        return (self.n, self.c, self.h, self.w, self.o, (k, k), (1, 1), (p, p), (d, d), 1, 1, self.mask)

    def output_size(self) -> tuple[int, int]:
        span = self.dilation * (self.kernel - 1)
        return self.h + 2 * self.padding - span, self.w + 2 * self.padding - span

    def gflop(self) -> float:
        """Multiply-adds of the forward GEMM, counted twice."""
        oh, ow = self.output_size()
        return 2 * self.n * self.o * oh * ow * self.c * self.kernel ** 2 / 1e9


@dataclass(frozen=True)
class RoICase:
    """A deform_roi_pool call timed in step c: a tests/test_deform_roi_pool.py case tuple (n, output
    channels, h, w, k, group_size, offset classes, part_size, sampling_ratio, spatial_scale), RoIs inside
    the image, and torchvision's pooling of the same sample count ("ps_roi_align" or "roi_align")."""

    label: str
    case: tuple
    rois: int
    torchvision: str


@dataclass(frozen=True)
class GatherCase:
    """An ms_deform_attn, dcnv3_core or dcnv4_core call (`op`: "ms_deform_attn", "dcnv3" or "dcnv4"), its
    case tuple as in tests/test_ms_deform_attn.py (n, levels, heads, head_dim, points, queries) or
    tests/test_dcnv3.py (n, h, w, group, group_channels, kernel, stride, pad, dilation, offset_scale,
    remove_center); checked and timed against the grid_sample formulation of tests/reference_*.py."""

    label: str
    op: str
    case: tuple


@dataclass(frozen=True)
class Plan:
    mode: str
    conv_shapes: tuple[ConvShape, ...]
    conv_dtypes: tuple[str, ...]
    roi_cases: tuple[RoICase, ...]
    roi_dtypes: tuple[str, ...]
    #: (index into test_deform_conv2d.CASES, dtype); None: every case in float32 and float16.
    conformance: tuple[tuple[int, str], ...] | None
    #: (index into test_deform_roi_pool.CASES, dtype), checked against the CPU kernels.
    roi_checks: tuple[tuple[int, str], ...]
    gather_cases: tuple[GatherCase, ...]
    #: The dtypes step c times the gather cases in.
    gather_dtypes: tuple[str, ...]
    #: Checked in step b against the grid_sample formulation in float64, each in every gather_check_dtypes.
    gather_checks: tuple[GatherCase, ...]
    gather_check_dtypes: tuple[str, ...]
    #: What the compute-sanitizer run does: conv (case tuple, dtype) and RoI (case tuple, dtype).
    sanitized_conv: tuple[tuple[tuple, str], ...]
    sanitized_roi: tuple[tuple[tuple, str], ...]
    sanitized_gather: tuple[tuple[GatherCase, str], ...]
    tune_target: str
    tune_shapes: tuple[ConvShape, ...]
    tune_dtype: str
    tune_trials: int
    budgets: dict
    total_s: float
    repeats: int


CONV5 = ConvShape("ResNet-101 conv5 1x512x38x63, dil 2", 1, 512, 38, 63, 512, padding=2, dilation=2)
CONV5_BATCH = ConvShape("conv5 8x512x32x32, dil 2", 8, 512, 32, 32, 512, padding=2, dilation=2)
DCNV2 = ConvShape("DCNv2 2x256x64x64, mask", 2, 256, 64, 64, 256, mask=True)
SMALL_BATCH = ConvShape("8x128x32x32", 8, 128, 32, 32, 128)
RFCN = (1, 21, 38, 63, 7, 7, 21, 7, 4, 1 / 16)  # 1029 score maps of a 600x1000 image, 21 classes, k = 7
REHEARSAL_CONV = ConvShape("DCNv2 1x16x12x12, mask", 1, 16, 12, 12, 16, mask=True)
DETR_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))  # an 800x1333 image at strides 8-64
DETR_ENCODER = GatherCase("Deformable DETR encoder (Lq=22223, 8x32, 4 points)", "ms_deform_attn",
                          (1, DETR_LEVELS, 8, 32, 4, 22223))
DETR_DECODER = GatherCase("Deformable DETR decoder (Lq=300)", "ms_deform_attn", (1, DETR_LEVELS, 8, 32, 4, 300))
INTERNIMAGE_T1 = (1, 200, 304, 4, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False)  # stage 1 of 800x1216
GATHER_CHECKS = (GatherCase("4 levels, 8x32", "ms_deform_attn", (2, ((4, 5), (2, 3), (1, 2), (1, 1)), 8, 32, 4, 3)),
                 GatherCase("3 levels to 1x1, 3x5", "ms_deform_attn", (2, ((5, 7), (3, 4), (1, 1)), 3, 5, 2, 6)),
                 *(GatherCase(label, op, case) for op in ("dcnv3", "dcnv4") for label, case in (
                     ("7x9, 3x5, stride 2x1, dil 1x2, no centre", (1, 7, 9, 3, 5, (3, 3), (2, 1), (2, 0), (1, 2),
                                                                  0.5, True)),
                     ("5x5 kernel, 4x2", (2, 5, 5, 4, 2, (5, 5), (1, 1), (2, 2), (1, 1), 1.0, False)))))
REHEARSAL_ROI = RoICase("deformable PS RoI pooling 16 RoIs, 27x10x12, k=3", (1, 3, 10, 12, 3, 3, 3, 3, 2, 0.5), 16,
                        "ps_roi_align")

PLANS = {
    "gpu": Plan(
        mode="gpu",
        conv_shapes=(CONV5, CONV5_BATCH, DCNV2, SMALL_BATCH),
        conv_dtypes=("float32", "float16", "bfloat16"),
        roi_cases=(RoICase("deformable PS RoI pooling (R-FCN: 300 RoIs, 1029x38x63, k=7)", RFCN, 300, "ps_roi_align"),
                   RoICase("PS RoI pooling, no offsets (300 RoIs, 1029x38x63, k=7)", RFCN[:6] + (0, None) + RFCN[8:],
                           300, "ps_roi_align"),
                   RoICase("RoI pooling (300 RoIs, 256x38x63, 7x7)", (1, 256, 38, 63, 7, 1, 0, None, 4, 1 / 16), 300,
                           "roi_align")),
        roi_dtypes=("float32", "float16"),
        conformance=None,
        roi_checks=tuple((index, dtype) for index in range(4) for dtype in ("float32", "float16")),
        gather_cases=(DETR_ENCODER, DETR_DECODER, GatherCase("InternImage-T DCNv3 1x200x304x64, 4 groups", "dcnv3",
                                                             INTERNIMAGE_T1),
                      GatherCase("FlashInternImage-T DCNv4 1x200x304x64, 4 groups", "dcnv4", INTERNIMAGE_T1)),
        gather_dtypes=("float32", "float16", "bfloat16"),
        gather_checks=GATHER_CHECKS,
        gather_check_dtypes=("float32", "float16", "bfloat16"),
        # the conformance case with groups, offset groups and a mask; the tensor-core one (16 channels)
        sanitized_conv=(((1, 6, 8, 5, 4, (3, 2), (2, 1), (0, 2), (1, 2), 2, 3, True), "float32"),
                        ((2, 16, 5, 5, 16, (3, 3), (1, 1), (2, 2), (2, 2), 1, 4, True), "float16")),
        sanitized_roi=(((2, 6, 8, 10, 3, 3, 3, 3, 2, 0.25), "float32"),),
        sanitized_gather=((GATHER_CHECKS[0], "float32"), (GATHER_CHECKS[-1], "float16")),
        tune_target="cuda",
        tune_shapes=(CONV5, DCNV2),
        tune_dtype="float16",
        tune_trials=32,
        budgets={"a": 40, "b": 240, "c": 250, "d": 170},
        total_s=540,
        repeats=25,
    ),
    "rehearse": Plan(
        mode="rehearse",
        conv_shapes=(REHEARSAL_CONV,),
        conv_dtypes=("float32", "float16", "bfloat16"),
        roi_cases=(REHEARSAL_ROI,),
        roi_dtypes=("float32",),
        conformance=((0, "float32"), (4, "float16")),
        roi_checks=((3, "float32"),),
        gather_cases=(GATHER_CHECKS[1], GATHER_CHECKS[2], GATHER_CHECKS[-1]),
        gather_dtypes=("float32",),
        gather_checks=(GATHER_CHECKS[1], GATHER_CHECKS[-1]),
        gather_check_dtypes=("bfloat16",),  # float32 takes the same path; each dtype adds a minute of builds
        sanitized_conv=((REHEARSAL_CONV.case, "float32"),),
        sanitized_roi=((REHEARSAL_ROI.case, "float32"),),
        sanitized_gather=((GATHER_CHECKS[1], "float32"),),
        tune_target="llvm",
        tune_shapes=(REHEARSAL_CONV,),
        tune_dtype="float32",
        tune_trials=2,
        budgets={"a": 60, "b": 300, "c": 240, "d": 240},
        total_s=900,
        repeats=3,
    ),
}


def conformance_cases(plan: Plan) -> list[tuple[int, str]]:
    from test_deform_conv2d import CASES

    if plan.conformance is not None:
        return list(plan.conformance)
    return [(index, dtype) for index in range(len(CASES)) for dtype in ("float32", "float16")]


# --------------------------------------------------------------------------------------- results files

class Results:
    """OUT/results.json and OUT/summary.md, both rewritten (staged, then renamed) at every change."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out / "results.json"

    def load(self) -> dict:
        return json.loads(self.path.read_text())

    def write(self, data: dict) -> None:
        for name, text in (("results.json", json.dumps(data, indent=1) + "\n"), ("summary.md", render_summary(data))):
            staged = self.out / f".{name}.tmp"
            staged.write_text(text)
            os.replace(staged, self.out / name)

    def update(self, change) -> None:
        data = self.load()
        change(data)
        self.write(data)

    def step(self, name: str, **fields) -> None:
        self.update(lambda data: data["steps"][name].update(fields))

    def append(self, key: str, *items) -> None:
        self.update(lambda data: data[key].extend(items))


def new_results(plan: Plan, steps: str) -> dict:
    return {
        "mode": plan.mode,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "finished": None,
        "steps": {name: {"title": title, "status": "pending" if name in steps else "not selected",
                         "budget_s": plan.budgets.get(name), "seconds": None, "found": ""}
                  for name, title in STEPS.items()},
        "device": {}, "versions": {}, "package": {}, "ceilings": [],
        "correctness": {"pytest": {}, "conv": [], "roi": [], "gather": [], "sanitizer": {}},
        "rows": [], "tuning": [],
    }


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _err(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def render_summary(data: dict) -> str:
    device, versions = data["device"], data["versions"]
    mode = "rehearsal on the CPU (simulated GPU for step b)" if data["mode"] == "rehearse" else "GPU run"
    lines = [f"# dcn_tvm {mode}: {device.get('name', 'device not read yet')}", "",
             f"started {data['started']}, finished {data['finished'] or '(not finished)'}", ""]
    if versions:
        lines += ["versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    if data["package"]:
        lines += [f"prebuilt kernels: {data['package'].get('summary', '')}", ""]
    lines += ["## Steps", "", "| step | status | seconds (budget) | found |", "|---|---|---:|---|"]
    for name, step in data["steps"].items():
        seconds = "-" if step["seconds"] is None else f"{step['seconds']:.0f}"
        lines.append(f"| {name}. {step['title']} | {step['status']} | {seconds} ({step['budget_s'] or '-'}) | "
                     f"{step['found']} |")
    if device:
        lines += ["", "## a. Device and ceilings", ""]
        lines += [f"- {key}: {value}" for key, value in device.items()]
        lines += ["", "| ceiling | value | how |", "|---|---:|---|"]
        lines += [f"| {c['name']} | {c['value']:.4g} {c['unit']} | {c['how']} |" for c in data["ceilings"]]
    lines += _correctness_lines(data["correctness"])
    lines += _speed_lines(data["rows"], data["ceilings"])
    lines += _target_lines(data)
    if data["tuning"]:
        lines += ["", "## d. Tuning (MetaSchedule's own timings of each kernel)", "",
                  "| workload | stage | default ms | tuned ms | speed-up | trials | schedule kept |",
                  "|---|---|---:|---:|---:|---:|---|"]
        lines += [f"| {t['workload']} | {t['stage']} | {_ms(t['default_ms'])} | {_ms(t['tuned_ms'])} | "
                  f"{_ratio(t['default_ms'], t['tuned_ms'])} | {t['trials']} | {t['schedule']} |"
                  for t in data["tuning"]]
    return "\n".join(lines) + "\n"


#: The correctness tables: (key in results, caption, first column, the peer each result is compared with).
ERROR_TABLES = (
    ("conv", "deform_conv2d against torchvision in the same dtype, and both against torchvision in float64 on "
             "the same (rounded) inputs: relative L2 errors", "case", "torchvision"),
    ("roi", "deform_roi_pool on the GPU against the CPU kernels, and both against float64", "pooling", "CPU kernels"),
    ("gather", "ms_deform_attn and DCNv3/v4 against their grid_sample formulations in the same dtype, and both "
               "against the formulation in float64 on the same (rounded) inputs", "call", "grid_sample"),
)


def _correctness_lines(found: dict) -> list[str]:
    lines = []
    if found["pytest"]:
        lines += ["", "## b. Correctness", "", f"- `pytest -m cuda`: {found['pytest'].get('result')}"]
    for tool, result in found["sanitizer"].items():
        lines.append(f"- compute-sanitizer {tool}: {result.get('result')}")
    for key, caption, first, peer in ERROR_TABLES:
        if found[key]:
            lines += ["", caption + ":", "", f"| {first} | dtype | result | vs {peer} | vs float64 | {peer} vs float64 "
                      "| ok |", "|---|---|---|---:|---:|---:|---|"]
            lines += [f"| {r['case']} | {r['dtype']} | {r['result']} | {_err(r['vs_peer'])} | {_err(r['vs_float64'])} "
                      f"| {_err(r['peer_vs_float64'])} | {'yes' if r['ok'] else '**NO**'} |" for r in found[key]]
    return lines


def _peer(found: dict) -> dict:
    """The row dcn_tvm is compared with in a {method: row} group: torchvision's, else the grid_sample
    formulation's."""
    return found.get("torchvision") or found.get("grid_sample", {})


def _speed_lines(rows: list[dict], ceilings: list[dict]) -> list[str]:
    if not rows:
        return []
    groups: dict[tuple, dict] = {}
    for row in rows:
        groups.setdefault((row["op"], row["shape"], row["dtype"], row["direction"]), {})[row["method"]] = row
    methods = list(dict.fromkeys(row["method"] for row in rows))
    rate = {c["name"].removeprefix("matmul "): c["value"] for c in ceilings if c["name"].startswith("matmul ")}
    lines = ["", "## c. Speed (median ms; peak MiB allocated by the call beside each; the peer is torchvision, or "
             "for the attention and DCNv3/v4 the grid_sample formulation)", "",
             "| op | shape | dtype | direction | " + " | ".join(methods) +
             " | peer / dcn_tvm | dcn_tvm / dense | peak dcn_tvm / peer | "
             "dcn_tvm TFLOP/s (of the matmul's) |",
             "|---|---|---|---|" + "---:|" * (len(methods) + 4)]
    for (op, shape, dtype, direction), found in groups.items():
        cells = []
        for method in methods:
            row = found.get(method)
            cells.append("" if row is None else row["note"] if row["median_ms"] is None else
                         f"{_ms(row['median_ms'])} ({_mib(row['peak_bytes'])})")
        ours, theirs = found.get("dcn_tvm", {}), _peer(found)
        dense = found.get("dense conv2d", {})
        tflops = "-"
        if ours.get("gflop") and ours.get("median_ms"):
            tflops = f"{ours['gflop'] / ours['median_ms']:.3g}" + (f" of {rate[dtype]:.3g}" if dtype in rate else "")
        lines.append(f"| {op} | {shape} | {dtype} | {direction} | " + " | ".join(cells) +
                     f" | {_ratio(theirs.get('median_ms'), ours.get('median_ms'))} | "
                     f"{_ratio(ours.get('median_ms'), dense.get('median_ms'))} | "
                     f"{_ratio(ours.get('peak_bytes'), theirs.get('peak_bytes'))} | {tflops} |")
    return lines


#: Issue 25's targets on the H100/H200: (text, op, dtype or None for any, direction or None, measure of a
#: {method: row} group, bound, whether the measure must stay at or under it).
TARGETS = (
    ("forward float16 >= 3x faster than torchvision", "deform_conv2d", "float16", "forward", "speed-up", 3, False),
    ("forward float16 <= 1.5x the dense conv's time", "deform_conv2d", "float16", "forward", "vs dense", 1.5, True),
    ("forward float32 >= 1.5x faster than torchvision", "deform_conv2d", "float32", "forward", "speed-up", 1.5, False),
    ("forward+backward >= 2x faster than torchvision", "deform_conv2d", None, "forward+backward", "speed-up", 2, False),
    ("peak memory <= half of torchvision's", "deform_conv2d", None, None, "peak", 0.5, True),
    ("PS RoI pooling forward+backward <= 1.2x ps_roi_align", "deform_roi_pool", None, "forward+backward", "time",
     1.2, True),
)


def _measure(name: str, found: dict) -> float | None:
    ours, theirs, dense = (found.get(m, {}) for m in ("dcn_tvm", "torchvision", "dense conv2d"))
    pairs = {"speed-up": (theirs.get("median_ms"), ours.get("median_ms")),
             "vs dense": (ours.get("median_ms"), dense.get("median_ms")),
             "peak": (ours.get("peak_bytes"), theirs.get("peak_bytes")),
             "time": (ours.get("median_ms"), theirs.get("median_ms"))}[name]
    return pairs[0] / pairs[1] if all(pairs) else None


def _target_lines(data: dict) -> list[str]:
    groups: dict[tuple, dict] = {}
    for row in data["rows"]:
        groups.setdefault((row["op"], row["shape"], row["dtype"], row["direction"]), {})[row["method"]] = row
    lines = []
    for text, op, dtype, direction, measure, bound, at_most in TARGETS:
        for (row_op, shape, row_dtype, row_direction), found in groups.items():
            value = _measure(measure, found)
            if (row_op, dtype or row_dtype, direction or row_direction) != (op, row_dtype, row_direction) or \
                    value is None or (op == "deform_roi_pool" and "PS" not in shape):
                continue
            met = value <= bound if at_most else value >= bound
            lines.append(f"| {text} | {shape}, {row_dtype}, {row_direction} | {value:.2f}x | "
                         f"{'met' if met else '**missed**'} |")
    sanitizer = data["correctness"]["sanitizer"]
    if "memcheck" in sanitizer:
        clean = all(r["ok"] for r in sanitizer.values())
        lines.append("| compute-sanitizer clean | " + ", ".join(f"{t}: {r['result']}" for t, r in sanitizer.items())
                     + f" | - | {'met' if clean else '**missed**'} |")
    if not lines:
        return []
    where = " (rehearsal: CPU numbers, not the targets' device)" if data["mode"] == "rehearse" else ""
    return ["", f"## Targets of issue 25{where}", "", "| target | where | value | |", "|---|---|---:|---|"] + lines


# ------------------------------------------------------------------------------------------ processes

def run_capture(command: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """(exit code, or None when it ran past `timeout` and its process group was killed; its output)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=max(timeout, 1))
        return process.returncode, output
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output


def cuda_tool(name: str) -> str | None:
    """A CUDA toolkit program: on PATH, else in /usr/local/cuda/bin; None if neither has it."""
    path = Path("/usr/local/cuda/bin") / name
    return shutil.which(name) or (str(path) if path.is_file() else None)


def log(message: str, file=None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    if file is not None:
        file.write(line + "\n")
        file.flush()


# ------------------------------------------------------------------------------------------ inputs

def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()


def conv_inputs(shape: ConvShape, dtype, device):
    """Benchmark inputs of a layer (offsets of about two pixels; a mask in [0, 1)) and a grad_output."""
    import torch

    gen = torch.Generator().manual_seed(0)
    oh, ow = shape.output_size()
    points = shape.kernel ** 2
    tensors = dict(
        input=torch.randn(shape.n, shape.c, shape.h, shape.w, generator=gen),
        offset=torch.randn(shape.n, 2 * points, oh, ow, generator=gen) * 2,
        weight=torch.randn(shape.o, shape.c, shape.kernel, shape.kernel, generator=gen) / (shape.c * points) ** 0.5,
        bias=torch.randn(shape.o, generator=gen),
        mask=torch.rand(shape.n, points, oh, ow, generator=gen) if shape.mask else None,
        grad=torch.randn(shape.n, shape.o, oh, ow, generator=gen),
    )
    return {name: None if t is None else t.to(device, dtype) for name, t in tensors.items()}


@dataclass
class GatherCall:
    """A gather call's differentiable tensors (`leaves`, on the device in the dtype, and their `names`), what
    computes its output from them by each method ("dcn_tvm", "grid_sample"), a grad_output, and the dcn_tvm
    op's name and positional arguments (for its workload, dcn_tvm.tune.call_workload)."""

    leaves: list
    names: tuple
    methods: dict
    grad: object
    op: str
    op_args: tuple


def gather_call(case: GatherCase, dtype, device, seed: int = 0) -> GatherCall:
    """The inputs of a GatherCase as tests/test_ms_deform_attn.py and tests/test_dcnv3.py make them
    (locations and offsets past the borders, some far outside)."""
    import torch
    from reference_dcnv3 import dcnv3_grid_sample, pack_offset_mask, unpack_offset_mask
    from reference_ms_deform_attn import ms_deform_attn_grid_sample

    import dcn_tvm

    if case.op == "ms_deform_attn":
        from test_ms_deform_attn import make_inputs

        value, shapes, starts, locations, weights = make_inputs(case.case, dtype=torch.float32, seed=seed)
        leaves = [t.to(device, dtype) for t in (value, locations, weights)]
        names = ("value", "locations", "weights")
        shapes, starts = shapes.to(device), starts.to(device)
        methods = {"dcn_tvm": lambda v, loc, w: dcn_tvm.ms_deform_attn(v, shapes, starts, loc, w),
                   "grid_sample": lambda v, loc, w: ms_deform_attn_grid_sample(v, shapes, loc, w)}
        n, _, heads, head_dim, _, queries = case.case
        out_shape = (n, queries, heads * head_dim)
        op, op_args = "dcn_tvm::ms_deform_attn", (leaves[0], shapes, starts, *leaves[1:])
    else:
        from test_dcnv3 import arguments, make_inputs, output_size, reference_arguments

        x, offset, mask = make_inputs(case.case, torch.float32, seed)
        parameters, reference, group = arguments(case.case), reference_arguments(case.case), case.case[3]
        points = mask.shape[-1] // group
        if case.op == "dcnv4":
            leaves = [t.to(device, dtype) for t in (x, pack_offset_mask(offset, mask, group))]
            names = ("input", "offset_mask")
            methods = {"dcn_tvm": lambda x, packed: dcn_tvm.dcnv4_core(x, packed, *parameters),
                       "grid_sample": lambda x, packed: dcnv3_grid_sample(
                           x, *unpack_offset_mask(packed, group, points), *reference)}
        else:
            leaves = [t.to(device, dtype) for t in (x, offset, mask)]
            names = ("input", "offset", "mask")
            methods = {"dcn_tvm": lambda x, offset, mask: dcn_tvm.dcnv3_core(x, offset, mask, *parameters),
                       "grid_sample": lambda x, offset, mask: dcnv3_grid_sample(x, offset, mask, *reference)}
        out_shape = (x.shape[0], *output_size(case.case), x.shape[3])
        op, op_args = f"dcn_tvm::{case.op}_core", (*leaves, *parameters)
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    return GatherCall(leaves, names, methods, grad, op, op_args)


@contextlib.contextmanager
def ops_patched(target: str, get_kernel):
    """Inside: dcn_tvm's ops on CPU tensors ask for `target`'s kernels (its layouts, its allocations)
    and take them from `get_kernel(spec)`."""
    from dcn_tvm.ops import dcnv3, deform_conv2d, deform_roi_pool, ms_deform_attn

    modules = (deform_conv2d, deform_roi_pool, ms_deform_attn, dcnv3)
    saved = [(module, name, getattr(module, name)) for module in modules for name in ("target_key", "get_kernel")]
    for module in modules:
        module.target_key = lambda device: target
        module.get_kernel = get_kernel
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def simulated_gpu():
    """Inside: dcn_tvm's ops on CPU tensors run the CUDA kernels on tests/gpusim.py's simulated GPU."""
    import gpusim

    return ops_patched(GPU_TARGET, gpusim.get_kernel)


# ------------------------------------------------------------------------------- what the run calls

def conv_calls(plan: Plan, kind: str) -> list[tuple[tuple, str]]:
    """The (case tuple, dtype) of every deform_conv2d the run calls on a device kind (cuda or llvm)."""
    from test_deform_conv2d import CASES

    if kind != "cuda":
        return []
    calls = [(CASES[index], dtype) for index, dtype in conformance_cases(plan)]
    calls += [(CASES[4], dtype) for dtype in ("float32", "float16")]  # test_deform_conv2d.py, test_cuda_context.py
    calls += [(shape.case, dtype) for shape in plan.conv_shapes for dtype in plan.conv_dtypes]
    calls += list(plan.sanitized_conv)
    return list(dict.fromkeys(calls))


def gather_calls(plan: Plan, kind: str) -> list[tuple[GatherCase, str]]:
    """The (GatherCase, dtype) of every ms_deform_attn and DCNv3/v4 call the run makes on a device kind
    (their checks compare with the grid_sample formulation on the same device: none on the CPU)."""
    if kind != "cuda":
        return []
    calls = [(case, dtype) for case in plan.gather_checks for dtype in plan.gather_check_dtypes]
    calls += [(case, dtype) for case in plan.gather_cases for dtype in plan.gather_dtypes]
    return list(dict.fromkeys(calls + list(plan.sanitized_gather)))


def roi_calls(plan: Plan, kind: str) -> list[tuple[tuple, str]]:
    """The (case tuple, dtype) of every deform_roi_pool the run calls on a device kind (cuda or llvm)."""
    from test_deform_roi_pool import CASES

    checks = [(CASES[index], dtype) for index, dtype in plan.roi_checks]
    checks += [(CASES[3], dtype) for dtype in ("float32", "float16")]  # test_deform_roi_pool.py, test_cuda_context.py
    if kind != "cuda":
        return list(dict.fromkeys(checks))
    calls = checks + [(case.case, dtype) for case in plan.roi_cases for dtype in plan.roi_dtypes]
    return list(dict.fromkeys(calls + list(plan.sanitized_roi)))


def conv_workload(case: tuple, dtype: str):
    from test_deform_conv2d import make_inputs

    from dcn_tvm.kernels.workloads import from_geometry
    from dcn_tvm.ops import deform_conv2d as conv_ops

    (x, offset, weight, _, mask), conv = make_inputs(case, dtype=torch_dtype(dtype))
    geo = conv_ops.geometry(x, offset, weight, mask, conv["stride"], conv["padding"], conv["dilation"])
    n, _, h, w = x.shape
    return from_geometry("deform_conv2d", geo, n=n, h=h, w=w)


def roi_workload(case: tuple, dtype: str):
    from test_deform_roi_pool import make_inputs

    from dcn_tvm.kernels.workloads import from_geometry
    from dcn_tvm.ops import deform_roi_pool as roi_ops

    x, rois, offset, kwargs = make_inputs(case, dtype=torch_dtype(dtype))
    geo = roi_ops.geometry(x, rois, offset, **kwargs)
    n, _, h, w = x.shape
    return from_geometry("deform_roi_pool", geo, r=rois.shape[0], n=n, h=h, w=w)


def gather_workload(case: GatherCase, dtype: str):
    from dcn_tvm.tune import call_workload

    call = gather_call(case, torch_dtype(dtype), "cpu")
    return call_workload(call.op, *call.op_args)


def workloads(plan: Plan, kind: str) -> list[str]:
    """The workload strings a prebuilt package for `kind` needs (`dcn-tvm build --workload ...`)."""
    found = [conv_workload(case, dtype) for case, dtype in conv_calls(plan, kind)]
    found += [roi_workload(case, dtype) for case, dtype in roi_calls(plan, kind)]
    found += [gather_workload(case, dtype) for case, dtype in gather_calls(plan, kind)]
    return list(dict.fromkeys(str(w) for w in found))


@contextlib.contextmanager
def recorded_specs(target: str):
    """Inside: dcn_tvm's ops on CPU tensors ask for `target`'s kernels and get kernels that do nothing (the
    results are garbage); yields the list of the KernelSpecs asked for, in order."""
    specs = []

    def note(spec):
        specs.append(spec)
        return lambda *arguments: None

    with ops_patched(target, note):
        yield specs


def requested_specs(plan: Plan, kind: str) -> list:
    """Every KernelSpec the run's calls ask for on a device kind, found by calling the ops (forward and
    backward) with kernels that only note what they are asked for."""
    import torch
    from test_deform_conv2d import make_inputs as conv_case_inputs
    from test_deform_roi_pool import make_inputs as roi_case_inputs

    import dcn_tvm

    with recorded_specs(GPU_TARGET if kind == "cuda" else "llvm-host") as specs:
        for case, dtype in conv_calls(plan, kind):
            (x, offset, weight, bias, mask), conv = conv_case_inputs(case, dtype=torch_dtype(dtype))
            leaves = [t.requires_grad_() for t in (x, offset, weight, bias, mask) if t is not None]
            out = dcn_tvm.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        for case, dtype in roi_calls(plan, kind):
            x, rois, offset, kwargs = roi_case_inputs(case, dtype=torch_dtype(dtype))
            leaves = [t.requires_grad_() for t in (x, offset) if t is not None]
            out = dcn_tvm.deform_roi_pool(x, rois, offset, **kwargs)
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        for case, dtype in gather_calls(plan, kind):
            call = gather_call(case, torch_dtype(dtype), "cpu")
            leaves = [t.requires_grad_() for t in call.leaves]
            torch.autograd.grad(call.methods["dcn_tvm"](*leaves), leaves, call.grad)
    return list({spec.key: spec for spec in specs}.values())


def verify_package(plan: Plan, coverage: bool = True, load: str | None = None) -> dict:
    """Load and verify the prebuilt packages of DCN_TVM_PREBUILT (every file's sha256, versions) and, with
    `coverage`, check that they hold every kernel the run asks for, on CUDA and on the CPU; with `load`
    ("cuda" or "llvm"), also load each of that kind's kernels as the ops do (a CUDA library needs
    libcuda.so.1: a driver, or gpu_prepare.sh's stand-in)."""
    from dcn_tvm.kernels import manifest, prebuilt

    packages = prebuilt.packages()
    report = {"packages": [{"root": str(p.root), "built": p.manifest.get("built"),
                            "libraries": [lib["file"] for lib in p.manifest["libraries"]],
                            "kernels": len(p.manifest["kernels"]), "versions": p.manifest["versions"]}
                           for p in packages]}
    missing, counts = [], {}
    for kind in ("cuda", "llvm") if coverage else ():
        specs = requested_specs(plan, kind)
        counts[kind] = len(specs)
        for spec in specs:  # its own kernel: a symbolic twin would serve, but it is not what is to be timed
            if not any(any(lib["kind"] == kind for lib in p.manifest["libraries"])
                       and spec.workload_key in p.manifest["kernels"] for p in packages):
                missing.append(f"{kind}: {spec.workload_key}")
    if load:
        specs = requested_specs(plan, load)
        missing += [f"{load}: {spec.workload_key} does not load" for spec in specs if prebuilt.find_kernel(spec) is None]
        counts[f"{load} loaded"] = len(specs)
    for package in packages:  # CUDA source would need the compiler to load: a fatbin, not source
        for library in package.manifest["libraries"]:
            data = (package.root / library["file"]).read_bytes()
            if library["kind"] == "cuda" and not manifest.holds_compiled_cuda(data):
                missing.append(f"{package.root.name}/{library['file']}: CUDA source, not compiled code")
    report["missing"] = missing
    report["summary"] = (f"{len(packages)} package(s) verified, {sum(p['kernels'] for p in report['packages'])} "
                         f"kernels: " + ", ".join(Path(p["root"]).name for p in report["packages"]))
    if coverage:
        report["summary"] += (f"; the run asks for {counts['cuda']} CUDA and {counts['llvm']} CPU kernels, "
                              f"missing {len(missing)}")
    if load:
        report["summary"] += f"; {counts[f'{load} loaded']} {load} kernels loaded, TVM imported: {sys.modules.get('tvm') is not None}"
    return report


# ------------------------------------------------------------------------------------------- timing

class Timer:
    """Median time and peak memory of a call: CUDA events around each call with L2 flushed before it,
    or the wall clock on the CPU."""

    def __init__(self, device, repeats: int, seconds_per_call_set: float = 1.5):
        import torch

        self.device, self.repeats, self.budget = device, repeats, seconds_per_call_set
        self.cuda = device.type == "cuda"
        if self.cuda:
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            self.flush = torch.empty(2 * l2, dtype=torch.int8, device=device)

    def __call__(self, fn) -> tuple[float, int | None, int]:
        """(median ms, peak bytes allocated during a call beyond what was allocated before it, repeats).
        `outside_torch` is then the device memory the call (its warm-up included) took outside torch's
        allocator (TVM's workspace pool, cuDNN, cuBLAS), which the peak does not count."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            free, _ = torch.cuda.mem_get_info(self.device)
            reserved = torch.cuda.memory_reserved(self.device)
        for _ in range(2):
            fn()
        times = []
        if self.cuda:
            torch.cuda.synchronize()
            now_free, _ = torch.cuda.mem_get_info(self.device)
            self.outside_torch = (free - now_free) - (torch.cuda.memory_reserved(self.device) - reserved)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        repeats = self.repeats
        while len(times) < repeats:
            if self.cuda:
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e3)
            if len(times) == 1:  # slow calls: fewer repeats, at least 5
                repeats = max(min(self.repeats, int(self.budget * 1e3 / max(times[0], 1e-3))), min(5, self.repeats))
        peak = torch.cuda.max_memory_allocated(self.device) - before if self.cuda else None
        return statistics.median(times), peak, len(times)

    def note(self) -> str:
        """What the last call took outside torch's allocator, where over 1 MiB."""
        outside = getattr(self, "outside_torch", 0)
        return f"+{outside / 2**20:.0f} MiB outside torch" if outside > 2**20 else ""


# ------------------------------------------------------------------------------------------ step a

def _smi(query: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    rc, output = run_capture(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], 20)
    return output.strip() if rc == 0 else None


def versions() -> dict:
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("torchvision", "dcn_tvm", "apache-tvm-ffi", "apache-tvm"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    if torch.cuda.is_available():
        found["CUDA (torch)"] = torch.version.cuda
        found["cuDNN"] = str(torch.backends.cudnn.version())
    if cuda_tool("nvcc"):
        rc, output = run_capture([cuda_tool("nvcc"), "--version"], 20)
        found["nvcc"] = next((line for line in output.splitlines() if "release" in line), f"exit {rc}")
    found["torch DLPack C exchange API"] = str(hasattr(torch.Tensor, "__dlpack_c_exchange_api__"))
    return found


def describe_device(device) -> dict:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"name": props.name, "compute capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count, "L2 MiB": props.L2_cache_size / 2**20,
                "memory GiB": round(props.total_memory / 2**30, 1),
                "nvidia-smi (driver, clocks SM/mem now and max, power, temperature)":
                    _smi("driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.draw,"
                         "temperature.gpu")}
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"name": f"{model} (CPU, {torch.get_num_threads()} threads)", "cores": os.cpu_count()}


def step_device(plan: Plan, results: Results, deadline: float) -> tuple[str, str]:
    import torch

    device = torch.device("cuda" if plan.mode == "gpu" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        return "failed", "torch sees no CUDA GPU"
    results.update(lambda data: data.update(device=describe_device(device), versions=versions()))
    if os.environ.get("DCN_TVM_PREBUILT"):  # coverage was checked where it was built (gpu_prepare.sh)
        report = verify_package(plan, coverage=False)
        results.update(lambda data: data.update(package=report))
        log(f"a: prebuilt kernels: {report['summary']}")
    timer = Timer(device, 10)
    gen = torch.Generator(device).manual_seed(0)
    ceilings = [_copy_rate(device, timer, gen)]
    size = 8192 if device.type == "cuda" else 512
    for dtype, tf32 in (("bfloat16", False), ("float16", False), ("float32", False), ("float32", True)):
        if time.time() > deadline - 5 or (tf32 and device.type != "cuda"):
            break
        a, b = (torch.randn(size, size, device=device, generator=gen).to(torch_dtype(dtype)) for _ in range(2))
        with _tf32(tf32):
            ms, _, _ = timer(lambda: a @ b)
        name = f"matmul {dtype}" + (" (TF32)" if tf32 else "")
        ceilings.append(dict(name=name, value=2 * size**3 / ms / 1e9, unit="TFLOP/s",
                             how=f"{size}^3, random data, median"))
    results.update(lambda data: data.update(ceilings=ceilings))
    if device.type == "cuda":
        results.update(lambda data: data["device"].update({"nvidia-smi after the matrix products": _smi(
            "clocks.sm,clocks.mem,power.draw,temperature.gpu")}))
    found = "; ".join(f"{c['name']} {c['value']:.3g} {c['unit']}" for c in ceilings)
    return "ok", found


def _copy_rate(device, timer: Timer, gen) -> dict:
    """A large device-to-device copy: 2 GiB of float32 on the GPU, 64 MiB on the CPU."""
    import torch

    source = torch.randn(2**29 if device.type == "cuda" else 2**24, device=device, generator=gen)
    target = torch.empty_like(source)
    ms, _, _ = timer(lambda: target.copy_(source))
    return dict(name="copy (device to device)", value=2 * source.numel() * 4 / ms / 1e6, unit="GB/s",
                how=f"{source.numel() * 4 / 2**30:.2f} GiB copied, bytes read + written, median")


@contextlib.contextmanager
def _tf32(enabled: bool):
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------------------------------ step b

def check_pytest(plan: Plan, timeout: float) -> dict:
    """tests/ marked cuda, in a fresh process (skipped there without a GPU)."""
    command = [*PYTHON_INSTALLED, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
               "tests/test_deform_conv2d.py", "tests/test_deform_roi_pool.py", "tests/test_cuda_context.py"]
    rc, output = run_capture(command, timeout)
    print(output, flush=True)
    last = (output.strip().splitlines() or [""])[-1]
    counts = {word: int(number) for number, word in
              re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", last)}
    result = "timed out" if rc is None else ", ".join(f"{n} {w}" for w, n in counts.items()) or f"exit code {rc}"
    ran = counts.get("passed", 0) + counts.get("failed", 0)
    ok = rc == 0 and (ran > 0 or plan.mode == "rehearse")
    return {"result": result + ("" if ran or rc else " (no CUDA GPU here)"), "ok": ok}


def conv_results(function, tensors, conv, grad, dtype, device) -> list:
    """[output, gradients of every tensor given] of function(x, offset, weight, bias, mask=...) in dtype."""
    import torch

    leaves = [None if t is None else t.to(device, dtype).requires_grad_() for t in tensors]
    x, offset, weight, bias, mask = leaves
    out = function(x, offset, weight, bias, mask=mask, **conv)
    present = [t for t in leaves if t is not None]
    return [out.detach().cpu()] + [g.cpu() for g in torch.autograd.grad(out, present, grad.to(device, dtype))]



def add_error_rows(results: Results, key: str, case: str, dtype_name: str, names, ours, theirs,
                   reference) -> list[dict]:
    """Correctness rows of one call, added to results' table `key`: each result's relative error against the
    peer in the same dtype (None where the peer has no such dtype) and against the float64 reference, and the
    peer's own; ok within the dtype's tolerance, or twice the peer's error."""
    rows = [dict(case=case, dtype=dtype_name, result=name, vs_peer=None if b is None else relative_error(a, b),
                 vs_float64=relative_error(a, ref), peer_vs_float64=None if b is None else relative_error(b, ref))
            for name, a, b, ref in zip(names, ours, theirs, reference)]
    for row in rows:
        own = row["vs_float64"]
        row["ok"] = math.isfinite(own) and own <= max(TOLERANCE[dtype_name], 2 * (row["peer_vs_float64"] or 0))
    results.update(lambda data: data["correctness"][key].extend(rows))
    log(f"b: {key} {case} {dtype_name}: worst vs float64 {max(r['vs_float64'] for r in rows):.1e}, "
        f"{'ok' if all(r['ok'] for r in rows) else 'MISMATCH'}")
    return rows


def check_conv(plan: Plan, device, gpu, results: Results, deadline: float) -> list[dict]:
    """dcn_tvm against torchvision in each dtype, and both against torchvision in float64 on the same
    inputs (rounded to the dtype), forward and every gradient, over the conformance cases."""
    import torch
    import torchvision
    from test_deform_conv2d import CASES, make_inputs
    from test_torchvision_conformance import _on_minus_one

    import dcn_tvm

    found = []
    for index, dtype_name in conformance_cases(plan):
        if time.time() > deadline:
            log("b: out of time before the remaining conformance cases")
            break
        case, dtype = CASES[index], torch_dtype(dtype_name)
        (x, offset, weight, bias, mask), conv = make_inputs(case, dtype=dtype, seed=1)
        tensors = [x, _on_minus_one(offset, case, seed=2), weight, bias, mask]
        grad = torch.randn(x.shape[0], weight.shape[0], *offset.shape[2:],
                           generator=torch.Generator().manual_seed(3)).to(dtype)
        with gpu():
            ours = conv_results(dcn_tvm.deform_conv2d, tensors, conv, grad, dtype, device)
        reference = conv_results(torchvision.ops.deform_conv2d, tensors, conv, grad, torch.float64, device)
        try:
            theirs = conv_results(torchvision.ops.deform_conv2d, tensors, conv, grad, dtype, device)
        except (RuntimeError, NotImplementedError):  # torchvision's CPU kernels have no half types
            theirs = [None] * len(ours)
        names = ["output", "grad input", "grad offset", "grad weight", "grad bias", "grad mask"][:len(ours)]
        found += add_error_rows(results, "conv", f"CASES[{index}]", dtype_name, names, ours, theirs, reference)
    return found


def roi_results(x, rois, offset, kwargs, grad, dtype, device) -> list:
    """[output, grad input(, grad offset)] of dcn_tvm.deform_roi_pool in dtype on device."""
    import torch

    import dcn_tvm

    leaves = [t.to(device, dtype).requires_grad_() for t in (x, offset) if t is not None]
    out = dcn_tvm.deform_roi_pool(leaves[0], rois.to(device), leaves[1] if offset is not None else None, **kwargs)
    return [out.detach().cpu()] + [g.cpu() for g in torch.autograd.grad(out, leaves, grad.to(device, dtype))]


def check_roi(plan: Plan, device, gpu, results: Results, deadline: float) -> list[dict]:
    """The RoI poolings on the GPU against the CPU kernels (and both against the float64 reference)."""
    import torch
    from reference_roi_pool import deform_roi_pool_torch
    from test_deform_roi_pool import CASES, make_inputs

    labels = {0: "RoI pooling", 1: "deformable RoI pooling", 2: "PS RoI pooling", 3: "deformable PS RoI pooling"}
    found = []
    for index, dtype_name in plan.roi_checks:
        if time.time() > deadline:
            log("b: out of time before the remaining RoI poolings")
            break
        dtype = torch_dtype(dtype_name)
        x, rois, offset, kwargs = make_inputs(CASES[index], dtype=dtype, seed=17)
        g = kwargs["group_size"]
        grad = torch.randn(rois.shape[0], x.shape[1] // (g * g), kwargs["output_size"], kwargs["output_size"],
                           generator=torch.Generator().manual_seed(18)).to(dtype)
        with gpu():
            ours = roi_results(x, rois, offset, kwargs, grad, dtype, device)
        cpu = roi_results(x, rois, offset, kwargs, grad, dtype, "cpu")
        leaves = [t.double().requires_grad_() for t in (x, offset) if t is not None]
        out = deform_roi_pool_torch(leaves[0], rois.double(), leaves[1] if offset is not None else None, **kwargs)
        reference = [out.detach()] + list(torch.autograd.grad(out, leaves, grad.double()))
        rows = []
        for name, a, b, ref in zip(("output", "grad input", "grad offset"), ours, cpu, reference):
            vs_cpu = relative_error(a, b)
            rows.append(dict(case=f"{labels.get(index, '')} CASES[{index}]", dtype=dtype_name, result=name,
                             vs_peer=vs_cpu, vs_float64=relative_error(a, ref), peer_vs_float64=relative_error(b, ref),
                             ok=math.isfinite(vs_cpu) and vs_cpu <= TOLERANCE[dtype_name]))
        found += rows
        results.update(lambda data: data["correctness"]["roi"].extend(rows))
        log(f"b: deform_roi_pool CASES[{index}] {dtype_name}: worst vs CPU kernels "
            f"{max(r['vs_peer'] for r in rows):.1e}, {'ok' if all(r['ok'] for r in rows) else 'MISMATCH'}")
    return found


def gather_results(call: GatherCall, method: str, dtype, device) -> list:
    """[output, gradient of every leaf] of a gather call by `method`, its leaves in `dtype` on `device`."""
    import torch

    leaves = [t.to(device, dtype).requires_grad_() for t in call.leaves]
    out = call.methods[method](*leaves)
    return [out.detach().cpu()] + [g.cpu() for g in torch.autograd.grad(out, leaves, call.grad.to(device, dtype))]


def check_gather(plan: Plan, device, gpu, results: Results, deadline: float) -> list[dict]:
    """ms_deform_attn and DCNv3/v4 against their grid_sample formulations in each dtype, and both against
    the formulation in float64 on the same (rounded) inputs, forward and every gradient."""
    import torch

    found = []
    for case in plan.gather_checks:
        for dtype_name in plan.gather_check_dtypes:
            if time.time() > deadline:
                log("b: out of time before the remaining attention and DCNv3/v4 checks")
                return found
            dtype = torch_dtype(dtype_name)
            call = gather_call(case, dtype, device, seed=11)
            with gpu():
                ours = gather_results(call, "dcn_tvm", dtype, device)
            reference = gather_results(call, "grid_sample", torch.float64, device)
            try:
                theirs = gather_results(call, "grid_sample", dtype, device)
            except (RuntimeError, NotImplementedError):  # grid_sample on the CPU has no float16
                theirs = [None] * len(ours)
            names = ["output"] + [f"grad {name}" for name in call.names]
            found += add_error_rows(results, "gather", f"{case.op} {case.label}", dtype_name, names, ours, theirs,
                                    reference)
    return found


SANITIZER_SUMMARY = {"memcheck": r"ERROR SUMMARY: (\d+) error", "racecheck": r"RACECHECK SUMMARY: (\d+) hazard"}


def check_sanitizer(plan: Plan, deadline: float) -> dict:
    """compute-sanitizer memcheck and racecheck on `--sanitized-run` (a small forward and backward).
    Without compute-sanitizer (the rehearsal) the run goes without it, so that it is exercised."""
    sanitizer = cuda_tool("compute-sanitizer")
    run = [sys.executable, str(SCRIPT), "--sanitized-run", plan.mode]
    # Every tensor its own cudaMalloc: an access past a tensor leaves its allocation, which memcheck sees.
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    found = {}
    tools = ("memcheck", "racecheck") if sanitizer else ("none",)
    for index, tool in enumerate(tools):
        command = [sanitizer, "--tool", tool, "--print-limit", "20", *run] if sanitizer else run
        began = time.time()
        rc, output = run_capture(command, (deadline - began) / (len(tools) - index), env)
        print(output[-20000:], flush=True)
        done = "sanitized run: done" in output
        if not sanitizer:
            found["not found"] = {"result": "the sanitized run alone: " + ("done" if done and rc == 0 else
                                                                         f"failed (exit {rc})"),
                                  "ok": done and rc == 0}
            continue
        summary = re.search(SANITIZER_SUMMARY[tool], output)
        errors = int(summary.group(1)) if summary else None
        result = ("timed out" if rc is None else f"{errors} {'errors' if tool == 'memcheck' else 'hazards'}"
                  if summary else f"no summary (exit {rc})")
        found[tool] = {"result": f"{result} in {time.time() - began:.0f} s" + ("" if done else ", run not finished"),
                       "ok": rc == 0 and errors == 0 and done}
    return found


def sanitized_run(plan: Plan) -> None:
    """A small forward and backward of each sanitized case (run under compute-sanitizer)."""
    import torch
    from test_deform_conv2d import make_inputs as conv_case_inputs
    from test_deform_roi_pool import make_inputs as roi_case_inputs

    import dcn_tvm

    device = "cuda" if plan.mode == "gpu" else "cpu"
    for case, dtype in plan.sanitized_conv:
        tensors, conv = conv_case_inputs(case, dtype=torch_dtype(dtype), seed=5)
        leaves = [None if t is None else t.to(device).requires_grad_() for t in tensors]
        out = dcn_tvm.deform_conv2d(*leaves[:4], mask=leaves[4], **conv)
        torch.autograd.grad(out, [t for t in leaves if t is not None], torch.randn_like(out))
    for case, dtype in plan.sanitized_roi:
        x, rois, offset, kwargs = roi_case_inputs(case, dtype=torch_dtype(dtype), seed=6)
        leaves = [t.to(device).requires_grad_() for t in (x, offset) if t is not None]
        out = dcn_tvm.deform_roi_pool(leaves[0], rois.to(device), leaves[1] if offset is not None else None, **kwargs)
        torch.autograd.grad(out, leaves, torch.randn_like(out))
    for case, dtype in plan.sanitized_gather:
        gather_results(gather_call(case, torch_dtype(dtype), device, seed=7), "dcn_tvm", torch_dtype(dtype), device)
    if device == "cuda":
        torch.cuda.synchronize()
    print("sanitized run: done", flush=True)


def step_correctness(plan: Plan, results: Results, deadline: float) -> tuple[str, str]:
    import torch

    if plan.mode == "gpu":
        device, gpu, where = torch.device("cuda"), contextlib.nullcontext, "CUDA"
    else:
        try:
            import gpusim
        except ImportError as error:  # pyopencl is not installed
            return "skipped", f"the simulated GPU needs pyopencl: {error}"
        missing = gpusim.available()
        if missing:
            return "skipped", f"the simulated GPU needs an OpenCL device: {missing}"
        device, gpu, where = torch.device("cpu"), simulated_gpu, "the simulated GPU"
    budget = deadline - time.time()
    log("b: pytest -m cuda")
    pytest = check_pytest(plan, 0.2 * budget)
    results.update(lambda data: data["correctness"].update(pytest=pytest))
    conv = check_conv(plan, device, gpu, results, deadline - 0.6 * budget)
    gather = check_gather(plan, device, gpu, results, deadline - 0.45 * budget)
    log("b: compute-sanitizer")
    sanitizer = check_sanitizer(plan, deadline - 0.1 * budget)
    results.update(lambda data: data["correctness"].update(sanitizer=sanitizer))
    roi = check_roi(plan, device, gpu, results, deadline)
    bad = [row for row in conv + roi + gather if not row["ok"]]
    planned = (len(conformance_cases(plan)) + len(plan.roi_checks)
               + len(plan.gather_checks) * len(plan.gather_check_dtypes))
    checked = len({(r["case"], r["dtype"]) for r in conv + roi + gather})
    found = (f"pytest -m cuda: {pytest['result']}; {checked}/{planned} cases on {where}, {len(bad)} results out of "
             f"tolerance; sanitizer: " + ", ".join(f"{tool} {r['result']}" for tool, r in sanitizer.items()))
    if bad or not pytest["ok"] or not all(r["ok"] for r in sanitizer.values()):
        return "problems", found
    return ("ok" if checked == planned else "partial"), found


# ------------------------------------------------------------------------------------------ step c

def conv_methods(device, dtype) -> dict:
    """name -> (function(x, offset, weight, bias, mask, shape), its leaves' names)."""
    import torch.nn.functional as F
    import torchvision

    import dcn_tvm

    def ours(x, offset, weight, bias, mask, shape):
        return dcn_tvm.deform_conv2d(x, offset, weight, bias, padding=shape.padding, dilation=shape.dilation,
                                     mask=mask)

    def theirs(x, offset, weight, bias, mask, shape):
        return torchvision.ops.deform_conv2d(x, offset, weight, bias, padding=shape.padding,
                                             dilation=shape.dilation, mask=mask)

    def dense(x, offset, weight, bias, mask, shape):
        return F.conv2d(x, weight, bias, padding=shape.padding, dilation=shape.dilation)

    def dense_exact(*arguments):
        with _tf32(False):
            return dense(*arguments)

    found = {"dcn_tvm": (ours, ("input", "offset", "weight", "bias", "mask")),
             "torchvision": (theirs, ("input", "offset", "weight", "bias", "mask")),
             "dense conv2d": (dense, ("input", "weight", "bias"))}
    if device.type == "cuda" and dtype == "float32":  # cuDNN runs float32 convolutions in TF32 by default
        found["dense conv2d, no TF32"] = (dense_exact, ("input", "weight", "bias"))
    return found


def _unsupported(error: Exception) -> str:
    """A short form of a method's error (torchvision's name the missing dtype on some line)."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    line = next((line for line in lines if "not implemented" in line), lines[-1])
    return f"{type(error).__name__}: {line.strip()[:100]}"


def time_directions(timer: Timer, forward, forward_backward, outputs: dict, **fields) -> list[dict]:
    """A row for each direction of one method (`fields`: op, shape, dtype, method): the median time and peak
    of forward() (no grad) and forward_backward(), the forward's output kept in outputs[method]; a method
    that cannot run (torchvision without the dtype) notes why."""
    rows = []
    for direction, call in zip(DIRECTIONS, (forward, forward_backward)):
        row = dict(fields, direction=direction, median_ms=None, peak_bytes=None, repeats=0, note="", gflop=None)
        try:
            if direction == "forward":
                outputs[fields["method"]] = forward()
            row["median_ms"], row["peak_bytes"], row["repeats"] = timer(call)
            row["note"] = timer.note()
        except (RuntimeError, NotImplementedError) as error:
            row["note"] = _unsupported(error)
        rows.append(row)
    return rows


def note_agreement(rows: list[dict], outputs: dict, peer: str) -> None:
    """Note on dcn_tvm's forward row how far its output is from `peer`'s (relative L2)."""
    if "dcn_tvm" in outputs and peer in outputs:
        agreement = relative_error(outputs["dcn_tvm"], outputs[peer])
        for row in rows:
            if row["method"] == "dcn_tvm" and row["direction"] == "forward":
                row["note"] = " ".join(filter(None, (row["note"], f"forward vs {peer} {agreement:.1e}")))


def time_conv(plan: Plan, shape: ConvShape, dtype_name: str, device, timer: Timer) -> list[dict]:
    import torch

    tensors = conv_inputs(shape, torch_dtype(dtype_name), device)
    rows = []
    outputs = {}
    for method, (function, names) in conv_methods(device, dtype_name).items():
        leaves = [tensors[name].requires_grad_() for name in names if tensors[name] is not None]
        arguments = [tensors[name] for name in ("input", "offset", "weight", "bias", "mask")]

        def forward():
            with torch.no_grad():
                return function(*arguments, shape)

        def forward_backward():
            torch.autograd.grad(function(*arguments, shape), leaves, tensors["grad"])

        found = time_directions(timer, forward, forward_backward, outputs, op="deform_conv2d", shape=shape.label,
                                dtype=dtype_name, method=method)
        if method == "dcn_tvm":
            for row in found:
                row["gflop"] = shape.gflop() * (1 if row["direction"] == "forward" else 3)
        rows += found
    note_agreement(rows, outputs, "torchvision")
    return rows


def roi_methods(case: RoICase) -> dict:
    import torchvision

    import dcn_tvm

    def theirs(x, rois, offset, kwargs):
        pool = getattr(torchvision.ops, case.torchvision)
        extra = {"aligned": True} if case.torchvision == "roi_align" else {}
        return pool(x, rois.to(x.dtype), kwargs["output_size"], kwargs["spatial_scale"], kwargs["sampling_ratio"],
                    **extra)

    return {"dcn_tvm": lambda x, rois, offset, kwargs: dcn_tvm.deform_roi_pool(x, rois, offset, **kwargs),
            "torchvision": theirs}


def time_roi(case: RoICase, dtype_name: str, device, timer: Timer) -> list[dict]:
    import torch
    from test_deform_roi_pool import make_inputs

    dtype = torch_dtype(dtype_name)
    x, rois, offset, kwargs = make_inputs(case.case, dtype=dtype, seed=0, rois_count=case.rois, inside=True)
    x, rois = x.to(device).requires_grad_(), rois.to(device)
    offset = None if offset is None else offset.to(device).requires_grad_()
    g, k = kwargs["group_size"], kwargs["output_size"]
    grad = torch.randn(case.rois, x.shape[1] // (g * g), k, k, generator=torch.Generator().manual_seed(1)).to(device,
                                                                                                             dtype)
    rows = []
    for method, function in roi_methods(case).items():
        leaves = [x] + ([offset] if offset is not None and method == "dcn_tvm" else [])

        def forward():
            with torch.no_grad():
                return function(x, rois, offset, kwargs)

        def forward_backward():
            torch.autograd.grad(function(x, rois, offset, kwargs), leaves, grad)

        found = time_directions(timer, forward, forward_backward, {}, op="deform_roi_pool", shape=case.label,
                                dtype=dtype_name, method=method)
        if method != "dcn_tvm":
            for row in found:
                row["note"] = " ".join(filter(None, (f"{case.torchvision} (no offsets: for scale)", row["note"])))
        rows += found
    return rows


def time_gather(case: GatherCase, dtype_name: str, device, timer: Timer) -> list[dict]:
    """dcn_tvm against the grid_sample formulation: forward (no grad) and forward+backward (every leaf)."""
    import torch

    call = gather_call(case, torch_dtype(dtype_name), device)
    leaves = [t.requires_grad_() for t in call.leaves]
    rows, outputs = [], {}
    for method, function in call.methods.items():

        def forward():
            with torch.no_grad():
                return function(*leaves)

        def forward_backward():
            torch.autograd.grad(function(*leaves), leaves, call.grad)

        rows += time_directions(timer, forward, forward_backward, outputs, op=case.op, shape=case.label,
                                dtype=dtype_name, method=method)
    note_agreement(rows, outputs, "grid_sample")
    return rows


def step_speed(plan: Plan, results: Results, deadline: float) -> tuple[str, str]:
    import torch

    device = torch.device("cuda" if plan.mode == "gpu" else "cpu")
    torch.backends.cudnn.benchmark = True  # the dense conv at cuDNN's best algorithm: the floor
    timer = Timer(device, plan.repeats)
    conv = [[(time_conv, (plan, shape, dtype)) for dtype in plan.conv_dtypes] for shape in plan.conv_shapes]
    roi = [[(time_roi, (case, dtype)) for dtype in plan.roi_dtypes] for case in plan.roi_cases]
    gather = [[(time_gather, (case, dtype)) for dtype in plan.gather_dtypes] for case in plan.gather_cases]
    # in order of value, should time run out: conv5, the R-FCN pooling, the DETR encoder, DCNv3, the others
    jobs = [job for group in conv[:1] + roi[:1] + gather[:1] + gather[2:3] + conv[1:] + roi[1:] + gather[1:2]
            + gather[3:] for job in group]
    done = 0
    for function, arguments in jobs:
        if time.time() > deadline:
            log("c: out of time before the remaining shapes")
            break
        rows = function(*arguments, device, timer)
        results.append("rows", *rows)
        for row in rows:
            log(f"c: {row['op']} {row['shape']} {row['dtype']} {row['direction']} {row['method']}: "
                f"{_ms(row['median_ms'])} ms, peak {_mib(row['peak_bytes'])} MiB {row['note']}")
        done += 1
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = results.load()["rows"]
    missing = [r for r in rows if r["method"] == "dcn_tvm" and r["median_ms"] is None]
    found = f"{done}/{len(jobs)} shape x dtype sets timed, {len(rows)} rows"
    if missing:
        return "problems", found + f"; dcn_tvm failed in {len(missing)} rows"
    return ("ok" if done == len(jobs) else "partial"), found


# ------------------------------------------------------------------------------------------ step d

def tune_command(plan: Plan, shape: ConvShape, logs: Path, cost_model: str) -> list[str]:
    workload = conv_workload(shape.case, plan.tune_dtype)
    return [*PYTHON_INSTALLED, "-m", "dcn_tvm", "tune", "--target", plan.tune_target, "--workload", str(workload),
            "--stage", "forward", "--trials", str(plan.tune_trials), "--logs", str(logs), "--cost-model", cost_model,
            "--no-progress"]


def step_tuning(plan: Plan, results: Results, deadline: float, work: Path) -> tuple[str, str]:
    if importlib.util.find_spec("tvm") is None:
        return "skipped", "no TVM compiler here (carry the compiler bundle: benchmarks/GPU_NOTES.md, GPU run)"
    from dcn_tvm.tuning.report import recorded

    # MetaSchedule's xgb cost model needs xgboost, which the bundle leaves out to fit the upload: random there.
    cost_model = "xgb" if plan.mode == "gpu" and importlib.util.find_spec("xgboost") else "random"
    logs = work / "tuning_logs"
    statuses = []
    for index, shape in enumerate(plan.tune_shapes):
        share = (deadline - time.time() - 10) / (len(plan.tune_shapes) - index)
        log(f"d: tuning {shape.label} {plan.tune_dtype} forward, {plan.tune_trials} trials, {cost_model} cost "
            f"model, at most {share:.0f} s")
        rc, output = run_capture(tune_command(plan, shape, logs, cost_model), share)
        print(output[-20000:], flush=True)
        statuses.append("timed out" if rc is None else "ok" if rc == 0 else f"exit {rc}")
        tuned = [dict(workload=r.workload, stage=r.stage, default_ms=r.default_ms, tuned_ms=r.tuned_ms,
                      trials=r.trials, schedule=r.schedule)
                 for folder in sorted(p for p in logs.glob("*") if p.is_dir()) for r in recorded(folder)]
        results.update(lambda data: data.update(tuning=tuned))
        if logs.is_dir():
            with tarfile.open(results.out / "tuning_logs.tar.gz", "w:gz") as archive:
                archive.add(logs, arcname="tuning_logs")
    tuned = results.load()["tuning"]
    found = (f"{len(tuned)}/{len(plan.tune_shapes)} kernels tuned ({', '.join(statuses)}); "
             + ", ".join(f"{_ratio(t['default_ms'], t['tuned_ms'])}" for t in tuned) + " over the default")
    return ("ok" if len(tuned) == len(plan.tune_shapes) and set(statuses) == {"ok"} else "partial"), found


# ----------------------------------------------------------------------------------------- driver

STEP_FUNCTIONS = {"a": step_device, "b": step_correctness, "c": step_speed, "d": step_tuning}
#: A step is not started with less time than this left (its process alone takes seconds to start).
MIN_STEP_S = 15


def run_step(plan: Plan, name: str, out: Path, deadline: float, work: Path) -> int:
    """One step, in this process (started by `drive`): its result lands in OUT/results.json."""
    results = Results(out)
    try:
        arguments = (plan, results, deadline) + ((work,) if name == "d" else ())
        status, found = STEP_FUNCTIONS[name](*arguments)
    except Exception as error:  # noqa: BLE001 - any failure is the step's result
        import traceback

        traceback.print_exc()
        first = (str(error).strip().splitlines() or [""])[0]
        status, found = "failed", f"{type(error).__name__}: {first[:200]}"
    results.step(name, status=status, found=found)
    return 0


def drive(plan: Plan, out: Path, steps: str, budgets: dict, total: float) -> int:
    """Run the selected steps, each in its own process with its budget, all within `total` seconds."""
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out)
    results.write(new_results(dataclasses.replace(plan, budgets=budgets), steps))
    began = time.time()
    work = Path(tempfile.mkdtemp(prefix="gpu_run_"))
    running = {}

    def stop(signum, frame):  # the device tool's time limit: end the step, keep what came
        if "child" in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running["child"].pid, signal.SIGKILL)
        results.update(lambda data: data.update(finished="cut off by a signal"))
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with open(out / "run.log", "a") as log_file:
            for name in [name for name in STEPS if name in steps and name != "e"]:
                left = began + total - time.time() - 5
                budget = min(budgets[name], left)
                if budget < MIN_STEP_S:
                    results.step(name, status="not run", found=f"{max(left, 0):.0f} s left of the run's {total:.0f} s")
                    continue
                log(f"step {name} ({STEPS[name]}), at most {budget:.0f} s", log_file)
                _run_step_process(plan, name, budget, out, work, results, log_file, running)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work, ignore_errors=True)

    def finish(data):
        data["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        data["steps"]["e"].update(status="ok", seconds=time.time() - began, found="summary.md, results.json")

    results.update(finish)
    print((out / "summary.md").read_text(), flush=True)
    return 0


def _run_step_process(plan: Plan, name: str, budget: float, out: Path, work: Path, results: Results, log_file,
                      running: dict) -> None:
    """Run step `name` in a process (its output copied to stdout and run.log), killed with its children
    after `budget` seconds; record its status and time."""
    import threading

    results.step(name, status="running")
    started = time.time()
    child = running["child"] = subprocess.Popen(
        [sys.executable, "-u", str(SCRIPT), "--step", name, "--mode", plan.mode, "--deadline",
         str(started + budget - 10), "--work", str(work), "--trials", str(plan.tune_trials), str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = threading.Event()

    def kill():
        killed.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)

    timer = threading.Timer(budget, kill)
    timer.start()
    for line in child.stdout:
        sys.stdout.write(line)
        log_file.write(line)
    rc = child.wait()
    timer.cancel()
    running.pop("child")
    seconds = time.time() - started
    if killed.is_set():
        results.step(name, status="timeout", seconds=seconds, found=f"killed after {budget:.0f} s")
    elif rc != 0 or results.load()["steps"][name]["status"] == "running":
        results.step(name, status="failed", seconds=seconds, found=f"exit code {rc}, no result")
    else:
        results.step(name, seconds=seconds)
    log(f"step {name}: {results.load()['steps'][name]['status']} in {seconds:.0f} s", log_file)


def _budgets(plan: Plan, overrides: list[str]) -> dict:
    budgets = dict(plan.budgets)
    for item in overrides:
        step, _, seconds = item.partition("=")
        if step not in plan.budgets or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"--budget {item!r}: expected STEP=SECONDS with STEP one of {sorted(plan.budgets)}")
        budgets[step] = float(seconds)
    return budgets


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, help="the folder the results go to")
    parser.add_argument("--rehearse", action="store_true", help="run every step on this CPU (small shapes)")
    parser.add_argument("--steps", default="abcde", help="the steps to run, e.g. abce or ad (default: all)")
    parser.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS",
                        help="a step's time budget (repeatable), e.g. c=120")
    parser.add_argument("--total", type=float, help="seconds for the whole run (default: 540 on the GPU)")
    parser.add_argument("--trials", type=int, help="tuning trials per kernel in step d")
    parser.add_argument("--workloads", choices=["cuda", "llvm"], help="print the workloads a package must hold")
    parser.add_argument("--verify-package", action="store_true", help="check DCN_TVM_PREBUILT against the run")
    parser.add_argument("--load", choices=["cuda", "llvm"], help="with --verify-package: load that kind's kernels")
    parser.add_argument("--without-compiler", action="store_true", help="make `import tvm` fail, as on the host")
    parser.add_argument("--step", choices=sorted(STEP_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=sorted(PLANS), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sanitized-run", choices=sorted(PLANS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.without_compiler:
        sys.modules["tvm"] = None
    plan = PLANS[args.mode or args.sanitized_run or ("rehearse" if args.rehearse else "gpu")]
    if args.trials:
        plan = dataclasses.replace(plan, tune_trials=args.trials)
    if args.workloads:
        print("\n".join(workloads(plan, args.workloads)))
        return 0
    if args.verify_package:
        report = verify_package(plan, load=args.load)
        print(json.dumps(report, indent=1))
        return 1 if report["missing"] else 0
    if args.sanitized_run:
        sanitized_run(plan)
        return 0
    if args.out is None:
        parser.error("give the output folder OUT")
    if args.step:
        return run_step(plan, args.step, args.out, args.deadline, args.work)
    return drive(plan, args.out, args.steps, _budgets(plan, args.budget), args.total or plan.total_s)


if __name__ == "__main__":
    sys.exit(main())
