"""`dcn-tvm show`: the schedule each stage of a workload uses and its generated code, for a CPU and a CUDA
target (no GPU needed); ptxas counts where nvcc is on PATH."""

from __future__ import annotations

import re
import shutil

import pytest

from dcn_tvm.__main__ import main

WORKLOAD = "deform_conv2d:n=1,c=4,h=6,w=6,o=4,k=3,pad=1"


def test_cpu_target_shows_llvm_ir_and_assembly(capsys):
    assert main(["show", "--target", "llvm", "--workload", WORKLOAD, "--stage", "forward"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^## forward: deform_conv2d_forward_float32_c4_o4_\w+_n1_h6_w6_llvm-\w+\nschedule: default$",
                     text, re.M)
    assert "## backward_data" not in text and "define " in text  # LLVM IR of the forward only
    assert main(["show", "--target", "llvm", "--workload", WORKLOAD, "--stage", "forward", "--format", "asm"]) == 0
    assert re.search(r"^\s+(vmov|vfmadd|ret)", capsys.readouterr().out, re.M)


@pytest.mark.slow
def test_cuda_target_shows_cuda_source_and_ptxas_counts(capsys):
    """At torch's float32 matmul precision "high" the forward GEMM is on TF32 tensor cores: the source shows
    the PTX mma with tf32 operands (issue 24)."""
    workload = "deform_conv2d:n=1,c=16,h=6,w=6,o=16,k=3,pad=1,precision=high"  # 16 | O and C*KH*KW: fragments fit
    assert main(["show", "--target", "nvidia/nvidia-h100", "--workload", workload, "--stage", "forward"]) == 0
    text = capsys.readouterr().out
    assert "_precision_high_cuda-sm_90\nschedule: default\n" in text and '__global__ void __launch_bounds__' in text
    assert "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32" in text
    if shutil.which("nvcc"):
        assert re.search(r"^ptxas: main_kernel\w*: \d+ registers/thread, \d+ B shared, 0 B spill stores, "
                         r"0 B spill loads$", text, re.M)
    else:
        assert "nvcc is not on PATH" in text


ATTENTION = "ms_deform_attn:n=1,q=6,levels=5x7+3x4,heads=2,head_dim=4,points=3"
DCNV4 = "dcnv3:n=1,h=5,w=6,group=2,group_channels=4,packed=1"


@pytest.mark.slow
@pytest.mark.parametrize("workload, keys", [
    (ATTENTION, {"forward": "ms_deform_attn_forward_float32_m2_d4_p3_l5x7_3x4_n1_q6",
                 "backward": "ms_deform_attn_backward_float32_m2_d4_p3_l5x7_3x4_n1_q6"}),
    (DCNV4, {stage: f"dcnv3_{stage}_float32_g2_gc4_k3x3_s1x1_p1x1_d1x1_scale1p0_rc0_v4_n1_h5_w6"
             for stage in ("forward", "backward", "scatter")}),
], ids=["ms_deform_attn", "dcnv4"])
def test_attention_and_dcnv3_workloads_show_every_stage(workload, keys, capsys):
    """Every tunable stage on the CPU (LLVM IR each); the forward for sm_90 (CUDA C, ptxas counts)."""
    assert main(["show", "--target", "llvm", "--workload", workload]) == 0
    text = capsys.readouterr().out
    headers = re.findall(r"^## (\w+): (\w+)_llvm-\w+\nschedule: default$", text, re.M)
    assert headers == list(keys.items())
    assert text.count("\ndefine ") >= len(keys)
    assert main(["show", "--target", "nvidia/nvidia-h100", "--workload", workload, "--stage", "forward"]) == 0
    text = capsys.readouterr().out
    assert f"## forward: {keys['forward']}_cuda-sm_90\nschedule: default\n" in text and "__global__ void" in text
    if shutil.which("nvcc"):
        assert re.search(r"^ptxas: main_kernel\w*: \d+ registers/thread, \d+ B shared, 0 B spill stores", text, re.M)


def test_a_bad_target_is_a_usage_error(capsys):
    assert main(["show", "--target", "tpu", "--workload", WORKLOAD]) == 2
    assert "dcn-tvm show: error: --target 'tpu'" in capsys.readouterr().err


def test_a_prebuilt_kernel_is_named_as_the_origin(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from dcn_tvm.kernels import prebuilt
    from dcn_tvm.kernels.workloads import Workload
    from dcn_tvm.tuning.show import origin

    monkeypatch.setenv("DCN_TVM_TUNING_LOGS", str(tmp_path))  # no records: the default schedule
    forward, backward = Workload.parse(WORKLOAD).tasks("llvm-znver4")[:2]
    package = SimpleNamespace(root=tmp_path / "pkg", manifest={"kernels": {forward.spec.workload_key: {}}})
    monkeypatch.setattr(prebuilt, "packages", lambda: (package,))
    assert origin(forward.spec) == f"prebuilt {tmp_path / 'pkg'}"
    assert origin(backward.spec) == "default"
