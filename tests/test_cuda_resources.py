"""CUDA kernels that could launch: every geometry, stage, dtype and tuning candidate builds for sm_90
within the per-block limits (dcn_tvm.kernels.resources), read from the lowered TIR and from ptxas.
No GPU needed; ptxas comes with nvcc."""

from __future__ import annotations

import dataclasses
import multiprocessing
import random
import re
import shutil
from concurrent.futures import ProcessPoolExecutor

import pytest

from dcn_tvm.geometry.dtypes import DTYPES
from dcn_tvm.kernels import build, resources
from dcn_tvm.kernels.resources import KernelResourceError
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.workloads import Workload

TARGET = "cuda-sm_90"
needs_ptxas = pytest.mark.skipif(shutil.which("nvcc") is None, reason="ptxas (nvcc) is not on PATH")

#: 3x3 unless said, pad 1: tails of the channel blocks, groups, offset groups, masks, ResNet conv5
#: (pad 2, dil 2), and every hyper-parameter off its default at once.
CONV = [
    "c=64,o=64", "c=64,o=72", "c=128,o=18", "c=3,o=18", "c=64,o=64,groups=4", "c=256,o=256,groups=32",
    "c=256,o=256,offset_groups=4,mask=1", "c=512,o=512,pad=2,dil=2",
    "c=18,o=72,groups=2,offset_groups=3,stride=2x1,pad=0x2,dil=1x2,k=3x2",
]
#: tests/test_deform_roi_pool.py's cases (RoI, deformable, PS, deformable PS, class-agnostic
#: offsets) and Deformable R-FCN's 1029-channel class scores.
ROI = [
    "c=3,k=3,sampling_ratio=2,spatial_scale=0.5", "c=4,k=3,classes=2,part_size=2,sampling_ratio=2,spatial_scale=0.5",
    "c=18,k=3,group_size=3,sampling_ratio=3", "c=54,k=3,group_size=3,classes=3,part_size=3,sampling_ratio=2",
    "c=16,k=4,group_size=2,classes=1,part_size=5,sampling_ratio=1", "c=1029,k=7,group_size=7,part_size=7,classes=21,"
    "spatial_scale=0.0625",
]


def _workload(op: str, fields: str, dtype: str) -> Workload:
    if op == "deform_conv2d":
        return Workload.parse(f"deform_conv2d:n=2,h=12,w=10,k=3,pad=1,{fields},dtype={dtype}")  # later keys win
    return Workload.parse(f"deform_roi_pool:r=5,n=2,h=9,w=11,{fields},dtype={dtype}")


def _specs(op: str, fields: str, dtype: str, symbolic: bool) -> list[KernelSpec]:
    """The kernels the op asks for: its tunable stages (static or symbolic sizes) and its scatter."""
    specs = [task.spec.symbolic() if symbolic else task.spec for task in _workload(op, fields, dtype).tasks(TARGET)]
    if op == "deform_conv2d":
        scatter = KernelSpec(op, "scatter", None, (), TARGET, acc_dtype=specs[0].geometry.acc_dtype)
    else:
        scatter = dataclasses.replace(specs[0], stage="scatter").symbolic()
    return specs + [scatter]


def _decided(task, pick: str) -> list:
    """The measured kernel of `task` scheduled from each of its CUDA design spaces (the structural
    choices: tensor cores or not), every sampled tile factor set to its largest, its smallest or a
    random option (`pick`)."""
    import tvm

    from dcn_tvm.tuning import tuner

    mod = tuner._module(build.prim_func(task.measured))
    rng = random.Random(task.measured.key)
    choose = {"largest": lambda count: count - 1, "smallest": lambda count: 0, "random": rng.randrange}[pick]
    functions = []
    for space in tuner.design_spaces(task, tvm.s_tir.Schedule(mod)):
        decisions = {inst: choose(len(inst.attrs[0])) for inst in space.trace.insts
                     if inst.kind.name == "SampleCategorical"}
        sch = tvm.s_tir.Schedule(mod)
        tvm.s_tir.Trace(space.trace.insts, decisions).apply_to_schedule(sch, True)
        functions.append(sch.mod["main"])
    return functions


def _build_checked(kernels: list) -> list:
    """In a worker process: (spec, None) or (task, pick) pairs compiled as one module; returns what
    its ptxas check saw, [(threads per kernel from the TIR, ptxas usage per kernel, the WMMA
    instructions of each kernel's PTX)]."""
    functions = {}
    for item, pick in kernels:
        if pick:
            functions.update({f"{item.measured.workload_key}_{pick}_{index}": func
                              for index, func in enumerate(_decided(item, pick))})
        else:
            functions[item.workload_key] = build.scheduled(item)
    seen, check = [], resources.check_assembled

    def recording(source, arch, threads):
        seen.append((threads, check(source, arch, threads), _wmma_instructions(source)))
        return seen[-1][1]

    resources.check_assembled = recording
    try:
        build.compile_functions(functions, TARGET)
    finally:
        resources.check_assembled = check
    return seen


def _build_all(modules: list[list]) -> list:
    """_build_checked on every module, in two worker processes (TVM's compile holds the GIL much of
    the time); give the slowest modules first."""
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [checked for seen in pool.map(_build_checked, modules) for checked in seen]


#: The CONV geometries whose GEMMs fit WMMA fragments (16 | O/groups and 16 | C/groups x KH x KW): in
#: float16 and bfloat16 these stages multiply on tensor cores. PTX names a float16 MMA by its
#: accumulator types only, a bfloat16 one by all four.
TENSOR_CORE_CONV = ("c=64,o=64", "c=64,o=64,groups=4", "c=256,o=256,offset_groups=4,mask=1", "c=512,o=512,pad=2,dil=2")
TENSOR_CORE_STAGES = ("forward", "backward_data", "backward_weight")
PTX_TYPES = {"float16": ("f16", "f32.f32"), "bfloat16": ("bf16", "f32.bf16.bf16.f32")}


def _expected_wmma(op: str, fields: str, dtype: str, stage: str) -> frozenset[str]:
    """Patterns of the WMMA instructions of a kernel's PTX (up to the operands): row-major m16n16k16
    loads of A and B in its dtype (from shared memory, or generic addresses), multiply-accumulate
    into float32, and the float32 store (to the shared output tile in backward_data, to global
    memory elsewhere); none where no fragment fits, nor in other dtypes."""
    if op != "deform_conv2d" or fields not in TENSOR_CORE_CONV or dtype not in PTX_TYPES or \
            stage not in TENSOR_CORE_STAGES:
        return frozenset()
    (t, mma), store = PTX_TYPES[dtype], "shared" if stage == "backward_data" else "global"
    return frozenset({rf"wmma\.load\.a\.sync\.aligned\.row\.m16n16k16(\.shared)?\.{t}",
                      rf"wmma\.load\.b\.sync\.aligned\.row\.m16n16k16(\.shared)?\.{t}",
                      rf"wmma\.mma\.sync\.aligned\.row\.row\.m16n16k16\.{re.escape(mma)}",
                      rf"wmma\.store\.d\.sync\.aligned\.row\.m16n16k16\.{store}\.f32"})


def _matches(instructions: set[str], patterns: frozenset[str]) -> bool:
    """Every instruction fits one of the patterns and every pattern fits one of the instructions."""
    return all(any(re.fullmatch(p, i) for p in patterns) for i in instructions) and \
        all(any(re.fullmatch(p, i) for i in instructions) for p in patterns)


@needs_ptxas
def test_every_geometry_stage_and_dtype_fits_sm_90():
    """The matrix: every geometry and stage at static sizes in each dtype, and at symbolic sizes in
    the widest (float64) and the legalised (bfloat16) dtypes; one module per (op, dtype, sizes).
    Each builds, ptxas saw every kernel the lowered TIR has, and the PTX multiplies on tensor cores
    exactly where it should: the forward and backward GEMMs of TENSOR_CORE_CONV in float16 and
    bfloat16 (`_expected_wmma`)."""
    modules, expected = [], {}
    for op, geometries in (("deform_conv2d", CONV), ("deform_roi_pool", ROI)):
        for dtype, symbolic in [("float64", True), ("bfloat16", True)] + [(dtype, False) for dtype in DTYPES]:
            specs = {}
            for fields in geometries:
                for spec in _specs(op, fields, dtype, symbolic):
                    specs[spec.key] = spec
                    expected[spec.workload_key] = _expected_wmma(op, fields, dtype, spec.stage)
            modules.append([(spec, None) for spec in specs.values()])
    checked = _build_all(modules)
    assert len(checked) == len(modules)
    for module, (threads, usage, wmma) in zip(modules, checked):
        assert set(usage) == set(threads) == set(wmma)
        assert all(0 < used["registers"] <= 255 for used in usage.values())
        for spec, _ in module:
            kernels = [name for name in wmma if name.startswith(f"{spec.workload_key}_kernel")]
            assert kernels and _matches(set().union(*(wmma[name] for name in kernels)), expected[spec.workload_key]), \
                spec.key
    # float16, bfloat16 and symbolic bfloat16:
    assert sum(bool(wanted) for wanted in expected.values()) == 3 * len(TENSOR_CORE_CONV) * len(TENSOR_CORE_STAGES)


def _gemm_shared_bytes(fields: str, dtype: str, stage: str = "forward") -> int:
    """Shared memory of a stage's one kernel that has any (its GEMM), from the lowered TIR."""
    import tvm

    (spec,) = [spec for spec in _specs("deform_conv2d", fields, dtype, symbolic=False) if spec.stage == stage]
    func = build.scheduled(spec).with_attr("global_symbol", "main")
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with target:
        _, kernels = resources.compile_cuda(tvm.IRModule({"main": func}), target)
    sizes = [tvm.s_tir.analysis.calculate_allocated_bytes(kernel)["main"].get("shared", 0) for kernel in kernels.values()]
    (shared,) = [int(size) for size in sizes if size]
    return shared


@pytest.mark.parametrize("fields, dtype, channels, step", [
    ("c=64,o=64", "float32", 64, 18),  # 2 input channels x 3x3 per step
    ("c=512,o=512,pad=2,dil=2", "float16", 64, 64),  # tensor cores: a K step of 4 fragments of 16
    ("c=64,o=72", "float32", 36, 18),  # 36 divides the 72 channels: no block straddles the tail
    ("c=128,o=18", "float64", 18, 18),
    ("c=3,o=18", "float32", 18, 9),  # 3 input channels: one per step
    ("c=256,o=256,groups=32", "float32", 8, 18),  # one group's 8 output channels per block
    ("c=18,o=72,groups=2,offset_groups=3,stride=2x1,pad=0x2,dil=1x2,k=3x2", "float32", 36, 6),
    ("c=64,o=64,k=7,pad=3", "float64", 64, 7),  # 7x7 would not fit: one kernel row per step
])
def test_forward_gemm_tiles_are_the_schedules(fields, dtype, channels, step):
    """The shared tiles hold (block channels + 64 positions) x step x element bytes, nothing more:
    a block never reads another group's channels, a step never reads partial channels."""
    element = {"float64": 8, "float32": 4, "float16": 2}[dtype]
    assert _gemm_shared_bytes(fields, dtype) == (channels + 64) * step * element


@pytest.mark.parametrize("fields, dtype, stage, tiles", [
    # weight^T [64 of (c, kh, kw), a K step of 64 output channels] and grad_output [64, 64 positions], 2 bytes
    # each, and the float32 [64, 64] output tile (too large to take a freed input tile's place)
    ("c=64,o=64", "float16", "backward_data", (64 * 64 + 64 * 64) * 2 + 64 * 64 * 4),
    # grad_output [64 output channels, a K step of 64 positions] and the columns the gather writes,
    # [64 positions, 64 of (c, kh, kw)]: no column buffer in global memory
    ("c=64,o=64", "bfloat16", "backward_weight", (64 * 64 + 64 * 64) * 2),
    # one group's 16 output channels, and 48 = 3 fragments of its 144 (c, kh, kw) per block
    ("c=64,o=64,groups=4", "float16", "backward_weight", (16 * 64 + 64 * 48) * 2),
])
def test_tensor_core_backward_tiles_are_the_schedules(fields, dtype, stage, tiles):
    """The backward GEMMs' shared tiles on tensor cores: one group's blocks, whole K steps, nothing more."""
    assert _gemm_shared_bytes(fields, dtype, stage) == tiles


def _ptx(source: str) -> str:
    """The PTX nvcc makes of a CUDA source for sm_90, with TVM's options."""
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="dcn_tvm_ptx_") as scratch:
        path = Path(scratch) / "kernels.cu"
        path.write_text(source)
        subprocess.run(["nvcc", "-ptx", "-arch=sm_90", *resources.NVCC_OPTIONS, "-o", str(path.with_suffix(".ptx")),
                        str(path)], check=True, capture_output=True, timeout=600)
        return path.with_suffix(".ptx").read_text()


def _wmma_instructions(source: str) -> dict[str, set[str]]:
    """{kernel: the WMMA instructions of its PTX, up to their operands} of a CUDA source for sm_90."""
    entries = re.split(r"^\.visible \.entry ", _ptx(source), flags=re.M)[1:]
    return {entry.split("(")[0]: set(re.findall(r"\bwmma\.[\w.]+", entry)) for entry in entries}


def _oversized_copy(threads: int, shared_elements: int):
    """B = A through a shared tile of `shared_elements` float32, in blocks of `threads` threads."""
    import tvm
    from tvm import te

    a = te.placeholder((shared_elements * 4,), "float32", name="A")
    b = te.compute(a.shape, lambda i: a[i], name="B")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    block = sch.get_sblock("B")
    outer, inner = sch.split(sch.get_loops(block)[0], [None, shared_elements])
    sch.bind(outer, "blockIdx.x")
    tile = sch.cache_read(block, 0, "shared")
    sch.compute_at(tile, outer)
    for loop in (inner, sch.get_loops(tile)[-1]):
        _, thread = sch.split(loop, [None, threads])
        sch.bind(thread, "threadIdx.x")
    return sch.mod["main"]


@pytest.mark.parametrize("threads, elements, message", [
    (256, 16384, r"CUDA kernel \w+_kernel: 64.0 KiB of shared memory per block, more than the 48.0 KiB"),
    (2048, 4096, r"CUDA kernel \w+_kernel: 2048 threads along threadIdx.x, more than the 1024 allowed"),
])
def test_build_refuses_a_kernel_over_a_limit(threads, elements, message):
    with pytest.raises(KernelResourceError, match=message):
        build.compile_functions({"copy": _oversized_copy(threads, elements)}, TARGET)
    assert build.compile_functions({"copy": _oversized_copy(256, 4096)}, TARGET).mod.imports


def test_build_names_the_spec_of_a_refused_kernel(monkeypatch):
    """A schedule whose blocks outgrow the limits (512 output channels a block: 2048 threads) is refused."""
    from dcn_tvm.schedules import deform_conv2d_cuda

    monkeypatch.setattr(deform_conv2d_cuda, "MAX_BLOCK_CHANNELS", 512)
    (spec, *_) = _specs("deform_conv2d", "c=512,o=512", "float32", symbolic=False)
    with pytest.raises(KernelResourceError, match=rf"{spec.key}: CUDA kernel main_kernel_\d+: 2048 threads"):
        build.build(spec)


@needs_ptxas
def test_ptxas_refusals_and_register_budgets_are_errors():
    source = 'extern "C" __global__ void big(float* out) { __shared__ float tile[16384]; ' \
             'tile[threadIdx.x] = out[threadIdx.x]; __syncthreads(); out[threadIdx.x] = tile[threadIdx.x + 1]; }'
    with pytest.raises(KernelResourceError, match=r"ptxas refuses a kernel for sm_90:\n.*'big' uses too much shared"):
        resources.ptxas_usage(source, "sm_90")
    small = source.replace("16384", "1024")
    (usage,) = resources.ptxas_usage(small, "sm_90").values()
    assert usage["shared"] == 4096 and usage["registers"] > 0
    assert resources.check_assembled(small, "sm_90", {"big": 1024})
    with pytest.raises(KernelResourceError, match=r"CUDA kernel big: \d+ registers x 65536 threads"):
        resources.check_assembled(small, "sm_90", {"big": 65536})
    with pytest.raises(RuntimeError, match="nvcc cannot compile the generated CUDA source"):
        resources.ptxas_usage("this is not CUDA", "sm_90")


@needs_ptxas
def test_every_tuning_candidate_fits_sm_90():
    """The CUDA tuning spaces the tuner searches replay with any decision and build within the limits:
    every tile factor at its largest option (the most shared memory and threads) in float64, at its
    smallest (unit loops) in float32, and random options in float16. Where fragments fit a float16
    GEMM, its kernel has two design spaces, tensor cores (the default, first) and CUDA cores, and
    only the first multiplies on tensor cores in PTX; every other kernel has one space, without."""
    modules, spaces = [], {}
    for op, geometries in (("deform_conv2d", CONV), ("deform_roi_pool", ROI)):
        for dtype, pick in (("float64", "largest"), ("float32", "smallest"), ("float16", "random")):
            modules.append([])
            for fields in geometries:
                for task in _workload(op, fields, dtype).tasks(TARGET):
                    modules[-1].append((task, pick))
                    wanted = _expected_wmma(op, fields, dtype, task.spec.stage)
                    spaces[f"{task.measured.workload_key}_{pick}"] = [wanted, frozenset()] if wanted else [wanted]
    checked = _build_all(modules)
    assert len(checked) == len(modules)
    wmma = {kernel: instructions for _, _, found in checked for kernel, instructions in found.items()}
    for function, expected in spaces.items():
        for index in range(len(expected) + 1):
            kernels = [wmma[name] for name in wmma if name.startswith(f"{function}_{index}_kernel")]
            if index == len(expected):
                assert not kernels, f"{function}: more than {len(expected)} design spaces"
            else:
                assert kernels and _matches(set().union(*kernels), expected[index]), (function, index)
    assert sum(len(expected) == 2 for expected in spaces.values()) == len(TENSOR_CORE_CONV) * len(TENSOR_CORE_STAGES)


@pytest.mark.parametrize("stage", [
    "backward_data",
    pytest.param("backward_weight", marks=pytest.mark.xfail(
        strict=True, reason="its column buffer in global memory (2^31 + 65536 floats) fails TVM 0.27's region "
                            "bound with an int32 literal; the CUDA grad_weight GEMM should gather into shared tiles")),
])
def test_static_backward_past_2_31_elements_compiles(stage):
    """grad_columns of 1x58256x64x64, 3x3, pad 1 holds 2^31 + 65536 elements: 64-bit indices throughout, and
    no fuse of five loops (TVM 0.27 folds their extent into an int32 constant: bind_threads fuses pairwise)."""
    workload = Workload.parse("deform_conv2d:n=1,c=58256,o=8,h=64,w=64,k=3,pad=1,dtype=float32")
    (task,) = [task for task in workload.tasks(TARGET) if task.spec.stage == stage]
    build.build(task.spec)
