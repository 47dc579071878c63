"""benchmarks/gpu_run.sh, the GPU run of issue 25, rehearsed on this CPU so that it cannot rot before a GPU
comes: every step runs (step b on the simulated GPU), and both result files hold what the run promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_run  # noqa: E402


def _expected_rows(plan) -> set[tuple]:
    """(op, shape, dtype, direction, method) of every row the plan's speed step writes."""
    conv = {("deform_conv2d", shape.label, dtype, direction, method) for shape in plan.conv_shapes
            for dtype in plan.conv_dtypes for direction in gpu_run.DIRECTIONS
            for method in ("dcn_tvm", "torchvision", "dense conv2d")}
    roi = {("deform_roi_pool", case.label, dtype, direction, method) for case in plan.roi_cases
           for dtype in plan.roi_dtypes for direction in gpu_run.DIRECTIONS for method in ("dcn_tvm", "torchvision")}
    gather = {(case.op, case.label, dtype, direction, method) for case in plan.gather_cases
              for dtype in plan.gather_dtypes for direction in gpu_run.DIRECTIONS
              for method in ("dcn_tvm", "grid_sample")}
    return conv | roi | gather


def _simulator_available() -> bool:
    try:
        import gpusim
    except ImportError:
        return False
    return gpusim.available() is None


@pytest.mark.slow
def test_rehearsal_runs_every_step_and_writes_both_files(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--rehearse", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    statuses = {name: step["status"] for name, step in data["steps"].items()}
    # Step b needs the simulated GPU's OpenCL device; without one it says so and is skipped.
    b_ok = "ok" if _simulator_available() else "skipped"
    assert statuses == {"a": "ok", "b": b_ok, "c": "ok", "d": "ok", "e": "ok"}, data["steps"]

    plan = gpu_run.PLANS["rehearse"]
    rows = data["rows"]
    assert {(r["op"], r["shape"], r["dtype"], r["direction"], r["method"]) for r in rows} == _expected_rows(plan)
    ours = [r for r in rows if r["method"] == "dcn_tvm"]
    assert all(r["median_ms"] > 0 and r["repeats"] >= 1 for r in ours), ours
    assert all(set(r) >= {"median_ms", "peak_bytes"} for r in rows)
    assert [c["name"] for c in data["ceilings"]][:2] == ["copy (device to device)", "matmul bfloat16"]
    assert data["device"]["name"] and data["versions"]["dcn_tvm"] and data["finished"]
    if b_ok == "ok":
        correctness = data["correctness"]
        assert {(r["case"], r["dtype"]) for r in correctness["conv"]} == {
            (f"CASES[{index}]", dtype) for index, dtype in plan.conformance}
        assert all(r["ok"] for r in correctness["conv"] + correctness["roi"] + correctness["gather"])
        assert len(correctness["roi"]) == 3 * len(plan.roi_checks)
        assert {(r["case"], r["dtype"]) for r in correctness["gather"]} == {
            (f"{case.op} {case.label}", dtype) for case in plan.gather_checks for dtype in plan.gather_check_dtypes}
        # the output and each gradient: three for the attention and DCNv3, two for DCNv4 (input, offset_mask)
        assert len(correctness["gather"]) == len(plan.gather_check_dtypes) * sum(
            3 if case.op == "dcnv4" else 4 for case in plan.gather_checks)
        # the cuda-marked tests, without a GPU: 4 in the conv and RoI test files, 16 in test_cuda_context.py
        assert "20 skipped" in correctness["pytest"]["result"]
        assert all(r["ok"] for r in correctness["sanitizer"].values())
    assert [(t["stage"], t["trials"]) for t in data["tuning"]] == [("forward", plan.tune_trials)]
    assert (out / "tuning_logs.tar.gz").stat().st_size > 0

    summary = (out / "summary.md").read_text()
    for heading in ("## Steps", "## a. Device and ceilings", "## c. Speed", "## d. Tuning"):
        assert heading in summary
    assert data["device"]["name"] in summary and data["started"] in summary
    assert "| c. speed | ok |" in summary
    assert sorted(path.name for path in out.iterdir()) == ["results.json", "run.log", "summary.md",
                                                           "tuning_logs.tar.gz"]


def test_a_step_past_its_budget_is_killed_and_what_it_wrote_stays(tmp_path, monkeypatch):
    """A step whose process outlives its budget is killed (with its children) and marked timeout, the
    rows it wrote stay; a step with too little of the run's time left is not started; both files are
    written at the end."""
    step = tmp_path / "step.py"
    row = dict(op="deform_conv2d", shape="s", dtype="float32", direction="forward", method="dcn_tvm",
               median_ms=1.5, peak_bytes=None, repeats=3, note="", gflop=None)
    step.write_text(f"import sys, time\nsys.path.insert(0, {str(ROOT / 'benchmarks')!r})\nimport gpu_run\n"
                    f"gpu_run.Results(gpu_run.Path(sys.argv[-1])).append('rows', {row!r})\n"
                    "print('a row written', flush=True)\ntime.sleep(60)\n")
    monkeypatch.setattr(gpu_run, "SCRIPT", step)
    monkeypatch.setattr(gpu_run, "MIN_STEP_S", 2)
    out = tmp_path / "out"
    began = time.time()
    gpu_run.drive(gpu_run.PLANS["rehearse"], out, "acd", {"a": 3, "b": 3, "c": 3, "d": 3}, total=9.5)
    assert time.time() - began < 8
    data = json.loads((out / "results.json").read_text())
    assert data["rows"] == [row]
    assert {name: step["status"] for name, step in data["steps"].items()} == {
        "a": "timeout", "b": "not selected", "c": "not run", "d": "not run", "e": "ok"}
    assert "a row written" in (out / "run.log").read_text()
    assert "| a. device and ceilings | timeout |" in (out / "summary.md").read_text()


def held_kernels(plan, kind: str, target: str) -> dict:
    """The workload keys of the kernels a prebuilt package of the plan's workloads for `kind` holds."""
    from dcn_tvm.kernels.workloads import Workload
    from dcn_tvm.prebuilt.build import expand

    texts = gpu_run.workloads(plan, kind)
    return expand([task.spec for text in texts for task in Workload.parse(text).tasks(target)])


def test_the_package_workloads_cover_every_kernel_the_gpu_run_asks_for():
    """The prebuilt packages hold the kernels of `--workloads` (each static with its symbolic twin, and the
    scatters): every kernel the GPU run's calls ask for, found by calling the ops with recording kernels, is
    there itself (a symbolic twin would run, but it is not the kernel to time)."""
    plan = gpu_run.PLANS["gpu"]
    for kind, target in (("cuda", gpu_run.GPU_TARGET), ("llvm", "llvm-host")):
        held = held_kernels(plan, kind, target)
        asked = gpu_run.requested_specs(plan, kind)
        assert asked and all(spec.workload_key in held for spec in asked), kind
    cuda = gpu_run.workloads(plan, "cuda")
    assert {text.rsplit("dtype=", 1)[1] for text in cuda} == {"float32", "float16", "bfloat16"}
    assert {text.partition(":")[0] for text in cuda} == {"deform_conv2d", "deform_roi_pool", "ms_deform_attn", "dcnv3"}


def test_the_package_holds_every_kernel_the_cuda_context_tests_ask_for():
    """tests/test_cuda_context.py runs in the GPU run's `pytest -m cuda`, where no compiler is."""
    import test_cuda_context

    with gpu_run.recorded_specs(gpu_run.GPU_TARGET) as asked:
        for make in test_cuda_context.CALLS.values():
            test_cuda_context.results(make())
    held = held_kernels(gpu_run.PLANS["gpu"], "cuda", gpu_run.GPU_TARGET)
    assert len({spec.op for spec in asked}) == 4 and [s.key for s in asked if s.workload_key not in held] == []
