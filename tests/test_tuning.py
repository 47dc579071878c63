"""dcn_tvm.tuning: workload strings, records, real MetaSchedule runs (local, resumed, over RPC), and
builds picking tuned schedules up. The runs tune one tiny kernel with a handful of trials."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reference import deform_conv2d_torch

import dcn_tvm
import dcn_tvm.tune
from dcn_tvm.__main__ import main
from dcn_tvm.kernels import build, records
from dcn_tvm.kernels.build import which_schedule
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_key
from dcn_tvm.kernels.workloads import PRESETS, Workload, of_spec, resolve
from dcn_tvm.ops import deform_conv2d as conv_op
from dcn_tvm.ops import deform_roi_pool as roi_op
from dcn_tvm.schedules.common import sampling
from dcn_tvm.tuning import report, tuner
from dcn_tvm.tuning.store import KEEP, RecordsVersionError, Store, plain
from dcn_tvm.tuning.target import resolve as resolve_target

CPU = target_key(torch.device("cpu"))
TINY = "deform_conv2d:n=1,c=8,h=10,w=10,o=8,k=3,stride=1,pad=1,dil=1,groups=1,offset_groups=1,mask=0,dtype=float32"


def forward_task(text=TINY):
    return Workload.parse(text).tasks(CPU)[0]


# --- workloads and targets ---------------------------------------------------------------------------

def test_workload_round_trip_and_defaults():
    workload = Workload.parse("deform_conv2d:n=1,c=8,h=10,w=10,o=8,k=3,pad=1")
    assert str(workload) == TINY
    assert Workload.parse(str(workload)) == workload
    odd = Workload.parse("deform_conv2d:n=2,c=6,h=9,w=7,o=4,k=3x2,stride=2x1,pad=0x2,dil=1x2,groups=2,"
                         "offset_groups=3,mask=1,dtype=float64")
    assert Workload.parse(str(odd)) == odd
    assert "k=3x2" in str(odd)


def test_presets_parse_and_cover_the_issue():
    assert {"tiny", "resnet101-dcn", "rfcn-dcn"} <= set(PRESETS)
    resnet = resolve(["resnet101-dcn"])
    assert [str(w) for w in resnet] == [
        "deform_conv2d:n=1,c=512,h=38,w=63,o=512,k=3,stride=1,pad=2,dil=2,groups=1,offset_groups=1,mask=0,"
        "dtype=float32"]
    (rfcn,) = resolve(["rfcn-dcn"])
    geo = rfcn.geometry()
    assert (geo.out_channels, geo.output_size, geo.group_size, geo.num_classes, geo.spatial_scale) == \
        (21, 7, 7, 21, 0.0625)
    assert [t.spec.stage for t in rfcn.tasks(CPU)] == ["forward", "backward"]


@pytest.mark.parametrize("text, message", [
    ("conv:n=1", "unknown operator 'conv'"),
    ("deform_conv2d:n=1,c=8", "missing h, w, o, k"),
    ("deform_conv2d:n=1,c=8,h=10,w=10,o=8,k=3,color=red", "bad item 'color=red'"),
    ("deform_conv2d:n=1,c=8,h=10,w=10,o=8,k=three", "k='three' is not an integer or AxB"),
    ("deform_conv2d:n=1,c=8,h=10,w=10,o=8,k=3,dtype=int8", "dtype must be one of"),
    ("deform_conv2d:n=1,c=8,h=2,w=2,o=8,k=5", "too small for kernel 5x5"),
    ("deform_conv2d:n=1,c=8,h=10,w=10,o=8,k=3,groups=3", r"c \(8\) and o \(8\) multiples of groups \(3\)"),
    ("deform_conv2d:n=1,c=8,h=10,w=10,o=8,k=3,offset_groups=3", r"multiple of offset groups \(3\)"),
    ("deform_roi_pool:r=4,n=1,c=50,h=8,w=8,k=7,group_size=7", "multiple of group_size"),
])
def test_bad_workloads_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        Workload.parse(text)


def test_workload_specs_are_the_ops_own():
    """The records are keyed by the spec the op asks for at run time."""
    conv = Workload.parse("deform_conv2d:n=2,c=6,h=9,w=7,o=4,k=3,pad=1,groups=2,offset_groups=3,mask=1")
    x = torch.empty(2, 6, 9, 7)
    for task in conv.tasks(CPU):
        assert task.spec == conv_op._spec(task.spec.stage, conv.geometry(), x)
        assert task.measured == task.spec
        assert of_spec(task.spec) == conv
    (rfcn,) = resolve(["rfcn-dcn"])
    for task in rfcn.tasks(CPU):
        assert task.spec == roi_op._spec(task.spec.stage, rfcn.geometry(), torch.empty(1, 1029, 38, 63))
        assert dict(task.measured.sizes)["r"] == 300


def test_targets():
    assert resolve_target("llvm") == CPU
    assert resolve_target("nvidia/nvidia-h100") == "cuda-sm_90"
    assert resolve_target('{"kind": "cuda", "arch": "sm_80"}') == "cuda-sm_80"
    assert resolve_target('{"kind": "llvm", "mcpu": "skylake-avx512"}') == "llvm-skylake-avx512"
    with pytest.raises(ValueError, match="not llvm, cuda, auto"):
        resolve_target("no-such-target")
    if not torch.cuda.is_available():
        assert resolve_target("auto") == CPU
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            resolve_target("cuda")


# --- the tuning space --------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["forward", "backward_data", "backward_weight"])
def test_the_default_schedule_is_a_point_of_the_space(stage):
    import tvm
    import tvm_ffi

    from dcn_tvm import schedules

    task = Workload.parse(TINY).tasks(CPU)[["forward", "backward_data", "backward_weight"].index(stage)]
    default = tvm.s_tir.Schedule(build.prim_func(task.spec))
    schedules.apply("deform_conv2d", "llvm", stage, default)
    space = tvm.s_tir.Schedule(build.prim_func(task.spec))
    with sampling():
        schedules.apply("deform_conv2d", "llvm", stage, space)
    assert any(inst.kind.name == "SampleCategorical" for inst in space.trace.insts)
    assert tvm_ffi.structural_equal(default.mod, space.mod)


@pytest.mark.parametrize("stage", ["forward", "backward_data", "backward_weight"])
def test_structural_choices_are_design_spaces_of_their_own(stage):
    """One design space per loop-order choice, the default structure first; they differ."""
    import tvm
    import tvm_ffi

    from dcn_tvm import schedules

    task = Workload.parse(TINY).tasks(CPU)[["forward", "backward_data", "backward_weight"].index(stage)]
    default = tvm.s_tir.Schedule(build.prim_func(task.spec))
    schedules.apply("deform_conv2d", "llvm", stage, default)
    spaces = tuner.design_spaces(task, tvm.s_tir.Schedule(tuner._module(build.prim_func(task.spec))))
    assert len(spaces) == 2
    assert tvm_ffi.structural_equal(default.mod["main"], spaces[0].mod["main"])
    assert not tvm_ffi.structural_equal(spaces[0].mod, spaces[1].mod)


@pytest.mark.parametrize("text", [TINY, "deform_roi_pool:r=8,n=1,c=18,h=6,w=5,k=3,group_size=3,classes=2"])
def test_cuda_spaces_sample_kernels_with_device_code(text):
    """No GPU needed: MetaSchedule samples the CUDA spaces (VerifyGPUCode on) and they compile."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from dcn_tvm.tuning.target import tuning_target

    target = tuning_target("cuda-sm_90")
    for task in Workload.parse(text).tasks("cuda-sm_90"):
        context = ms.TuneContext(mod=tuner._module(build.prim_func(task.measured)), target=target,
                                 space_generator=tuner.space(task), search_strategy="replay-trace", num_threads=1)
        spaces = context.generate_design_space()
        context.pre_tuning(max_trials=1, num_trials_per_iter=1, design_spaces=spaces,
                           database=ms.database.MemoryDatabase(), cost_model=None)
        candidates = context.generate_measure_candidates()
        assert len(candidates) == 1
        for candidate in candidates:
            with target:
                assert len(tvm.compile(candidate.sch.mod, target=target).mod.imports) == 1


def _other_trace(task):
    """The space's trace with its first real decision moved off the default (JSON): a schedule of
    the space that is not the default schedule."""
    import tvm

    from dcn_tvm import schedules

    sch = tvm.s_tir.Schedule(build.prim_func(task.spec))
    with sampling():
        schedules.apply(task.spec.op, "llvm", task.spec.stage, sch)
    trace = sch.trace
    inst = next(i for i in trace.insts if i.kind.name == "SampleCategorical" and len(i.attrs[0]) > 1)
    index = (int(trace.decisions[inst]) + 1) % len(inst.attrs[0])
    return plain(trace.with_decision(inst, index, True).as_json(True))


def test_failed_measurements_never_become_records(tmp_path):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    task = forward_task()
    store = Store(CPU, "deform_conv2d", tmp_path)
    mod = tuner._module(build.prim_func(task.measured))
    database = tuner._records_database(store, task.spec.key, mod, tvm.target.Target({"kind": "llvm"}))
    workload = database.commit_workload(mod)
    sch = tvm.s_tir.Schedule(mod)
    tvm.s_tir.Trace.apply_json_to_schedule(_other_trace(task), sch)
    for run_secs in (None, [1e10], [0.5, 1e10]):
        database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, run_secs))
    assert store.records(task.spec.key) == []
    database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [2e-3, 1e-3, 3e-3]))
    (record,) = store.records(task.spec.key)
    assert record["run_ms"] == pytest.approx([2, 1, 3])
    assert len(database.get_top_k(workload, 5)) == 1


# --- a real MetaSchedule run, resumed, over RPC --------------------------------------------------------

@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The tiny forward kernel tuned for this CPU with 6 trials: (logs folder, results)."""
    logs = tmp_path_factory.mktemp("tuning_logs")
    results = dcn_tvm.tune.run([TINY], target="llvm", trials=6, logs=logs, stages=["forward"], progress=False)
    return logs, results


@pytest.mark.slow
def test_a_real_tuning_run_records_what_it_measured(tuned):
    logs, (result,) = tuned
    assert result.trials == 6
    assert result.default_ms > 0 and result.tuned_ms > 0
    assert result.schedule == ("tuned" if result.tuned_ms < result.default_ms else "default")
    assert result.tuned_ms <= result.default_ms
    store = Store(CPU, "deform_conv2d", logs)
    metadata = store.metadata()
    assert metadata["tvm"] == records.version("apache-tvm")
    assert metadata["target"] == {"kind": "llvm", "mcpu": CPU.split("-", 1)[1]}
    assert metadata["device"] and metadata["date"]
    entry = metadata["kernels"][result.key]
    assert entry["workload"] == TINY and entry["stage"] == "forward" and entry["trials"] == 6
    assert [trials for trials, _ in entry["history"]][-1] == 6
    kept = store.records(result.key)
    assert 1 <= len(kept) <= KEEP
    assert all(max(r["run_ms"]) < 1e6 for r in kept)
    # tuned_ms is the time of the schedule builds use: the fastest record, or the default itself.
    fastest = records.median(kept[0]["run_ms"])
    assert result.tuned_ms == pytest.approx(fastest if result.schedule == "tuned" else result.default_ms)


@pytest.mark.slow
def test_a_second_identical_run_measures_nothing(tuned, monkeypatch, capsys):
    logs, (result,) = tuned
    before = (logs / CPU / "deform_conv2d" / "records.jsonl").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(tuner, "Measurer", refuse)
    assert main(["tune", "--target", "llvm", "--workload", TINY, "--stage", "forward", "--trials", "6",
                 "--logs", str(logs), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| workload | stage | default ms | tuned ms | speedup | trials | schedule |" in table
    assert f"| `{TINY}` | forward |" in table and f"| 6 | {result.schedule} |" in table
    assert (logs / CPU / "deform_conv2d" / "records.jsonl").read_text() == before


@pytest.mark.slow
def test_builds_use_the_tuned_schedule_and_stay_correct(tuned, tmp_path, monkeypatch):
    """which_schedule follows the record; a tuned (non-default) schedule compiles into the op, which
    stays correct forward and backward."""
    import tvm
    import tvm_ffi

    logs, (result,) = tuned
    monkeypatch.setenv("DCN_TVM_TUNING_LOGS", str(logs))
    task = forward_task()
    assert which_schedule(task.spec) == result.schedule

    # A record of a schedule other than the default for every stage of another shape, marked tuned.
    monkeypatch.setenv("DCN_TVM_TUNING_LOGS", str(tmp_path))
    monkeypatch.setenv("DCN_TVM_NO_DISK_CACHE", "1")
    workload = Workload.parse("deform_conv2d:n=1,c=8,h=9,w=11,o=16,k=3,pad=1,mask=1")
    store = Store(CPU, "deform_conv2d", tmp_path)
    for task in workload.tasks(CPU):
        assert which_schedule(task.spec) == "default"
        trace = _other_trace(task)
        store.commit(task.spec.key, [1.0], trace)
        store.update_kernel(task.spec.key, "test", workload=str(workload), stage=task.spec.stage,
                            func_hash=str(tvm_ffi.structural_hash(build.prim_func(task.spec))),
                            default_ms=2.0, tuned_ms=1.0, schedule="tuned")
        assert which_schedule(task.spec) == "tuned"
        expected = tvm.s_tir.Schedule(build.prim_func(task.spec))
        tvm.s_tir.Trace.apply_json_to_schedule(trace, expected)
        default = tvm.s_tir.Schedule(build.prim_func(task.spec))
        from dcn_tvm import schedules

        schedules.apply("deform_conv2d", "llvm", task.spec.stage, default)
        scheduled = build.scheduled(task.spec)
        assert tvm_ffi.structural_equal(scheduled, expected.mod["main"])
        assert not tvm_ffi.structural_equal(scheduled, default.mod["main"])

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 9, 11, dtype=torch.float64, generator=generator)
    offset = 2 * torch.randn(1, 18, 9, 11, dtype=torch.float64, generator=generator)
    mask = torch.rand(1, 9, 9, 11, dtype=torch.float64, generator=generator)
    weight = torch.randn(16, 8, 3, 3, dtype=torch.float64, generator=generator)
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask, weight)]
    expected = deform_conv2d_torch(leaves[0], leaves[1], leaves[3], padding=(1, 1), mask=leaves[2])
    grad = torch.randn_like(expected)
    expected.backward(grad)
    ours = [t.float().requires_grad_() for t in (x, offset, mask, weight)]
    out = dcn_tvm.deform_conv2d(ours[0], ours[1], ours[3], padding=1, mask=ours[2])
    out.backward(grad.float())
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-4, atol=1e-4)
    for mine, reference in zip(ours, leaves):
        torch.testing.assert_close(mine.grad.double(), reference.grad, rtol=1e-4, atol=1e-4)


def _records_lines(logs):
    path = logs / CPU / "deform_conv2d" / "records.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def _tune_process(logs: Path, trials: int, scratch: Path, **popen) -> subprocess.Popen:
    """`dcn-tvm tune` of TINY's forward in a process whose temporary files go to `scratch`."""
    scratch.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "dcn_tvm", "tune", "--target", "llvm", "--workload", TINY, "--stage",
               "forward", "--trials", str(trials), "--logs", str(logs), "--no-progress"]
    return subprocess.Popen(command, env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.DEVNULL, **popen)


@pytest.mark.slow
def test_a_killed_run_resumes_and_loses_nothing(tmp_path):
    metadata = tmp_path / CPU / "deform_conv2d" / "metadata.json"
    process = _tune_process(tmp_path, 12, tmp_path / "tmp", stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (metadata.exists() and json.loads(metadata.read_text())["kernels"]):
            assert process.poll() is None and time.monotonic() < deadline, "no batch recorded before the kill"
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    (entry,) = json.loads(metadata.read_text())["kernels"].values()
    assert 0 < entry["trials"] < 12 and "default_ms" not in entry
    measured = {repr(json.loads(line)["trace"]) for line in _records_lines(tmp_path)}

    (result,) = dcn_tvm.tune.run([TINY], target="llvm", trials=12, logs=tmp_path, stages=["forward"],
                                 progress=False)
    assert result.trials == 12 and result.default_ms is not None
    after = [json.loads(line) for line in _records_lines(tmp_path)]
    kept = {repr(r["trace"]) for r in after}
    # Every schedule measured before the kill is still recorded, unless KEEP faster ones displaced it.
    assert measured <= kept or len(after) == KEEP


@pytest.mark.slow
@pytest.mark.parametrize("signum, whole_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c-to-the-process-group", "sigterm"])
def test_a_signal_stops_the_run_between_batches(tmp_path, signum, whole_group):
    """Ctrl-C (SIGINT to the terminal's process group, workers included) or SIGTERM while MetaSchedule's
    C++ loop runs a batch: an exit with 128 + signum, no worker left, no temporary folder left, and the
    kernel left to resume (neither exhausted nor finished). Before, Ctrl-C aborted the process."""
    import psutil

    scratch, logs = tmp_path / "tmp", tmp_path / "logs"
    with open(tmp_path / "stderr", "w+") as stderr:
        process = _tune_process(logs, 24, scratch, stderr=stderr, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not list(scratch.glob("dcn_tvm_tune_*")):  # MetaSchedule's search has begun
                assert process.poll() is None and time.monotonic() < deadline, "the search did not begin"
                time.sleep(0.2)
            workers = psutil.Process(process.pid).children(recursive=True)
            (os.killpg if whole_group else os.kill)(process.pid, signum)
            process.wait(timeout=240)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        stderr.seek(0)
        said = stderr.read()
    assert process.returncode == 128 + signum, said[-3000:]
    assert f"stopped by {signal.Signals(signum).name}; what it measured is recorded" in said
    assert not [w for w in workers if not _ended(w)]
    assert not list(scratch.iterdir())
    (entry,) = json.loads((logs / CPU / "deform_conv2d" / "metadata.json").read_text())["kernels"].values()
    assert entry["trials"] < 24 and "exhausted" not in entry and "default_ms" not in entry


def test_stop_requests_turn_a_signal_into_interrupted_at_the_next_check():
    before = signal.getsignal(signal.SIGINT)
    with tuner.StopRequests() as stops:
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before kill returns to Python code
        with pytest.raises(tuner.Interrupted, match="stopped by SIGINT") as stopped:
            stops.check()
    assert stopped.value.signum == signal.SIGINT and isinstance(stopped.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGINT) is before


_SIGNALLED_TWICE = """
import os, signal, subprocess, sys, time
from dcn_tvm.tuning import tuner
with tuner.StopRequests() as stops, stops.scratch("dcn_tvm_tune_") as folder:
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    print(folder, worker.pid, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(300)
"""


def test_a_second_signal_ends_the_workers_and_the_scratch_folders_at_once(tmp_path):
    """The stop at once (a second signal before the run could stop): 128 + signum, its worker ended and
    its temporary folder removed (it was left behind before)."""
    import psutil

    done = subprocess.run([sys.executable, "-c", _SIGNALLED_TWICE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    folder, worker = done.stdout.split()
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert "SIGTERM again: stopped at once" in done.stderr
    assert not Path(folder).exists() and Path(folder).parent == tmp_path
    with contextlib.suppress(psutil.NoSuchProcess):  # gone before it could be looked up
        assert _ended(psutil.Process(int(worker)))


def _ended(process) -> bool:
    """Whether `process` (a psutil.Process) has ended: gone, or a zombie its parent has not reaped yet. A
    reap between the two reads makes the second raise NoSuchProcess, which means ended too."""
    import psutil

    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def rpc_tracker():
    """A TVM RPC tracker and one CPU server (key "dcn-test") on 127.0.0.1: yields "host:port"."""
    from tvm.s_tir.meta_schedule.runner import RPCConfig

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                "--port", str(port), "--port-end", str(port + 1), "--silent"], env=env)
    server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}",
                               "--key", "dcn-test", "--host", "127.0.0.1", "--silent"], env=env)
    processes = [server, tracker]
    try:
        config = RPCConfig("127.0.0.1", port, "dcn-test", session_timeout_sec=5)
        deadline = time.monotonic() + 60
        while True:
            try:
                if config.count_num_servers() == 1:
                    break
            except ValueError:
                pass
            assert time.monotonic() < deadline, "the RPC server did not register with the tracker"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        import psutil

        # The server forks a process per session and starts popen workers: end the whole trees.
        tree = [psutil.Process(p.pid) for p in processes]
        tree += [child for process in tree for child in process.children(recursive=True)]
        for process in tree:
            process.kill()
        psutil.wait_procs(tree, timeout=30)


@pytest.mark.slow
def test_tuning_over_rpc(rpc_tracker, tmp_path):
    (result,) = dcn_tvm.tune.run([TINY], target="llvm", trials=2, logs=tmp_path, stages=["forward"],
                                 rpc_tracker=rpc_tracker, rpc_key="dcn-test", progress=False, report=False)
    assert result.trials == 2 and result.default_ms > 0 and result.tuned_ms > 0
    assert Store(CPU, "deform_conv2d", tmp_path).metadata()["device"] == f"RPC key 'dcn-test' at {rpc_tracker}"


# --- versions, misses, reports, models -----------------------------------------------------------------

def _tuned_entry(store, task, tvm_version):
    store.commit(task.spec.key, [1.0], _other_trace(task))
    store.update_kernel(task.spec.key, "test", workload=TINY, stage="forward", func_hash="0", default_ms=2.0,
                        tuned_ms=1.0, schedule="tuned")
    metadata = json.loads(store.metadata_path.read_text())
    metadata["tvm"] = tvm_version
    store.metadata_path.write_text(json.dumps(metadata))


def test_records_of_another_tvm_version_are_refused_for_tuning_and_ignored_by_builds(tmp_path, caplog):
    task = forward_task()
    store = Store(CPU, "deform_conv2d", tmp_path)
    _tuned_entry(store, task, "0.0.1")
    with pytest.raises(RecordsVersionError, match=r"tuned with TVM 0\.0\.1 but TVM .* is installed"):
        dcn_tvm.tune.run([TINY], target="llvm", trials=1, logs=tmp_path, progress=False)
    assert main(["tune", "--target", "llvm", "--workload", TINY, "--logs", str(tmp_path)]) == 2
    with caplog.at_level(logging.WARNING, logger="dcn_tvm"):
        assert records.tuned_schedule(task.spec, build.prim_func(task.spec), tmp_path) is None
    assert "ignoring tuning records" in caplog.text and "0.0.1" in caplog.text


def test_records_of_another_compute_are_ignored(tmp_path, caplog):
    task = forward_task()
    store = Store(CPU, "deform_conv2d", tmp_path)
    _tuned_entry(store, task, records.version("apache-tvm"))
    with caplog.at_level(logging.WARNING, logger="dcn_tvm"):
        assert records.tuned_schedule(task.spec, build.prim_func(task.spec), tmp_path) is None
    assert "another version of its compute" in caplog.text


SHIPPED = Path(__file__).resolve().parents[1] / "tuning_logs"


@pytest.mark.parametrize("metadata", sorted(SHIPPED.glob("*/*/metadata.json")),
                         ids=lambda path: f"{path.parent.parent.name}/{path.parent.name}")
def test_shipped_records_match_todays_compute_and_replay(metadata, caplog):
    """A compute change must come with re-tuned (or removed) records, or builds ignore them with a warning."""
    folder = metadata.parent
    kernels = json.loads(metadata.read_text())["kernels"]
    assert kernels
    for key, entry in kernels.items():
        (task,) = [t for t in Workload.parse(entry["workload"]).tasks(folder.parent.name) if t.spec.key == key]
        if entry["schedule"] == "tuned":
            with caplog.at_level(logging.WARNING, logger="dcn_tvm"):
                assert records.tuned_schedule(task.spec, build.prim_func(task.spec), SHIPPED) is not None, \
                    f"{key}: {caplog.text or 'no usable record'}; re-tune: dcn-tvm tune --workload '{entry['workload']}'"


def test_a_gpu_miss_logs_the_tune_command_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dcn_tvm"):
        for task in Workload.parse(TINY).tasks("cuda-sm_90") * 2:
            assert records.tuned_schedule(task.spec, build.prim_func(task.spec), tmp_path) is None
    assert caplog.text.count("dcn-tvm tune --target cuda --workload") == 1
    assert f"--workload '{TINY}'" in caplog.text
    scatter = KernelSpec("deform_conv2d", "scatter", None, (), "cuda-sm_90")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dcn_tvm"):
        assert records.tuned_schedule(scatter, build.prim_func(scatter), tmp_path) is None
    assert caplog.text == ""


def test_cuda_without_a_gpu_or_tracker_is_refused(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["tune", "--target", "nvidia/nvidia-h100", "--workload", TINY, "--logs", str(tmp_path)]) == 2
    assert "measuring for cuda-sm_90 needs a visible CUDA GPU or --rpc-tracker" in capsys.readouterr().err


@pytest.mark.slow
def test_the_cost_model_asked_for_is_the_one_metaschedule_ranks_with(tuned, tmp_path, monkeypatch):
    """`--cost-model` reaches MetaSchedule (random, mlp: where xgboost is missing, as on the GPU run's host);
    an unknown one is refused before anything is measured."""
    from tvm.s_tir import meta_schedule as ms

    class Created(Exception):
        pass

    def create(kind, *args, **kwargs):
        raise Created(kind)

    monkeypatch.setattr(ms.CostModel, "create", staticmethod(create))
    logs = shutil.copytree(tuned[0], tmp_path / "logs")  # resumed: straight to the search, which asks for it
    options = dict(target="llvm", trials=12, stages=["forward"], progress=False, report=False)
    with pytest.raises(Created, match="^random$"):
        dcn_tvm.tune.run([TINY], logs=logs, cost_model="random", **options)
    with pytest.raises(ValueError, match="--cost-model must be one of xgb, mlp, random, got 'forest'"):
        dcn_tvm.tune.run([TINY], logs=tmp_path / "forest", cost_model="forest", **options)
    assert not (tmp_path / "forest").exists()


def test_from_model_tunes_the_recorded_workloads_for_the_inputs_device(monkeypatch):
    calls = []
    monkeypatch.setattr(dcn_tvm.tune, "run", lambda workloads, **options: calls.append((workloads, options)))
    model = dcn_tvm.DeformConv2dPack(4, 4, 3, padding=1)
    dcn_tvm.tune.from_model(model, (torch.randn(1, 4, 6, 5),), trials=7)
    ((workloads, options),) = calls
    assert [str(w) for w in workloads] == [
        "deform_conv2d:n=1,c=4,h=6,w=5,o=4,k=3,stride=1,pad=1,dil=1,groups=1,offset_groups=1,mask=0,dtype=float32"]
    assert options == {"target": "llvm", "trials": 7}


def test_report_renders_table_and_plot(tmp_path):
    from dcn_tvm.render import render

    folder = tmp_path / CPU
    store = Store(CPU, "deform_conv2d", tmp_path)
    store.update_kernel(forward_task().spec.key, "a CPU", workload=TINY, stage="forward", func_hash="0",
                        default_ms=2.0, tuned_ms=1.0, schedule="tuned", trials=16, history=[[8, 1.5], [16, 1.0]])
    path = report.write(folder)
    text = path.read_text()
    assert f"| `{TINY}` | forward | 2 | 1 | 2.00x | 16 | tuned |" in text
    assert f"| `{TINY}` | forward | 2 | 1 | 2.00x | 16 |\n" in text  # the per-workload table
    assert "- device: a CPU" in text
    assert "![best time against trials per workload](report.png)" in text
    assert (folder / "report.png").stat().st_size > 1000
    no_plot = render("tuning_report.md.j2", target=CPU, device="d", tvm="t", dcn_tvm="d", date="today",
                     target_json="{}", rounds=2, repeat=10, min_repeat_ms=100, folder=CPU, workloads=[], rows=[],
                     plot=None)
    assert "(No plot: matplotlib is not installed.)" in no_plot


def test_record_notes_every_deformable_op_of_a_model():
    from dcn_tvm.ops.deform_roi_pool import DeformPSRoIPool

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = dcn_tvm.DeformConv2dPack(4, 4, 3, padding=1, modulated=True)
            self.head = DeformPSRoIPool(4, 2, 3, spatial_scale=0.5, sampling_ratio=2)

        def forward(self, x, rois):
            return self.head(self.conv(x), rois)

    rois = torch.tensor([[0, 0.0, 0.0, 7.0, 9.0], [0, 2.0, 1.0, 5.0, 5.0]])
    workloads = dcn_tvm.tune.record(Tiny().eval(), (torch.randn(1, 4, 6, 5), rois))
    assert [str(w) for w in workloads] == [
        "deform_conv2d:n=1,c=4,h=6,w=5,o=4,k=3,stride=1,pad=1,dil=1,groups=1,offset_groups=1,mask=1,dtype=float32",
        # the offset pooling (no offsets, so no gamma), then the score pooling with class-aware offsets
        "deform_roi_pool:r=2,n=1,c=36,h=6,w=5,k=3,group_size=3,sampling_ratio=2,classes=0,spatial_scale=0.5,"
        "gamma=0.0,dtype=float32",
        "deform_roi_pool:r=2,n=1,c=18,h=6,w=5,k=3,group_size=3,part_size=3,sampling_ratio=2,classes=2,"
        "spatial_scale=0.5,gamma=0.1,dtype=float32",
    ]
    for workload in workloads:
        assert Workload.parse(str(workload)) == workload


def test_record_notes_the_attention_and_dcnv3_ops_too():
    """Deformable DETR's attention (level shapes read from the call), DCNv3 and DCNv4 (packed=1)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = dcn_tvm.MultiScaleDeformableAttention(8, 2, 2, 3)
            self.v3 = dcn_tvm.DCNv3(channels=8, group=2, remove_center=True)
            self.v4 = dcn_tvm.DCNv4(channels=8, group=2, kernel_size=5, pad=2)

        def forward(self, query, references, features, shapes, starts, image):
            return (self.attention(query, references, features, shapes, starts), self.v3(image),
                    self.v4(image.flatten(1, 2), (5, 6)))

    shapes, starts = torch.tensor([[5, 7], [3, 4]]), torch.tensor([0, 35])
    args = (torch.randn(1, 6, 8), torch.rand(1, 6, 2, 2), torch.randn(1, 47, 8), shapes, starts,
            torch.randn(1, 5, 6, 8))
    workloads = dcn_tvm.tune.record(Net().eval(), args)
    assert [str(w) for w in workloads] == [
        "ms_deform_attn:n=1,q=6,levels=5x7+3x4,heads=2,head_dim=4,points=3,dtype=float32",
        "dcnv3:n=1,h=5,w=6,group=2,group_channels=4,k=3,stride=1,pad=1,dil=1,offset_scale=1.0,remove_center=1,"
        "packed=0,dtype=float32",
        "dcnv3:n=1,h=5,w=6,group=2,group_channels=4,k=5,stride=1,pad=2,dil=1,offset_scale=1.0,remove_center=0,"
        "packed=1,dtype=float32",
    ]
    for workload in workloads:
        assert Workload.parse(str(workload)) == workload


# --- damaged and concurrent records --------------------------------------------------------------------

def _tuned_for_real(store, task):
    """A usable tuned record of `task` in `store` (another point of the space, marked tuned)."""
    import tvm_ffi

    store.commit(task.spec.key, [1.0], _other_trace(task))
    store.update_kernel(task.spec.key, "test", workload=TINY, stage="forward", default_ms=2.0, tuned_ms=1.0,
                        func_hash=str(tvm_ffi.structural_hash(build.prim_func(task.spec))), schedule="tuned")


def test_a_truncated_records_line_is_skipped_with_one_warning(tmp_path, caplog):
    task = forward_task()
    store = Store(CPU, "deform_conv2d", tmp_path)
    _tuned_for_real(store, task)
    with store.records_path.open("a") as handle:
        handle.write('{"key": "' + task.spec.key + '", "run_ms": [0.5, 0.')  # a run killed mid-write
    with caplog.at_level(logging.WARNING, logger="dcn_tvm"):
        for _ in range(2):
            assert records.tuned_schedule(task.spec, build.prim_func(task.spec), tmp_path) is not None
            assert records.schedule_tag(task.spec, tmp_path).startswith("tuned-")
    assert caplog.text.count(f"skipping line 2 of {store.records_path}") == 1


def test_a_truncated_metadata_means_default_schedules(tmp_path, caplog, monkeypatch):
    task = forward_task()
    store = Store(CPU, "deform_conv2d", tmp_path)
    _tuned_for_real(store, task)
    text = store.metadata_path.read_text()
    store.metadata_path.write_text(text[:len(text) // 2])
    monkeypatch.setenv("DCN_TVM_TUNING_LOGS", str(tmp_path))
    monkeypatch.setenv("DCN_TVM_NO_DISK_CACHE", "1")
    with caplog.at_level(logging.WARNING, logger="dcn_tvm"):
        assert which_schedule(task.spec) == "default"
        assert records.tuned_schedule(task.spec, build.prim_func(task.spec), tmp_path) is None
        x, offset, weight = torch.randn(1, 8, 10, 10), torch.randn(1, 18, 10, 10), torch.randn(8, 8, 3, 3)
        torch.testing.assert_close(dcn_tvm.deform_conv2d(x, offset, weight, padding=1),
                                   deform_conv2d_torch(x, offset, weight, padding=(1, 1)), rtol=1e-4, atol=1e-4)
    assert caplog.text.count(f"ignoring {store.metadata_path}, which cannot be read") == 1


def _write_concurrently(root: str, worker: int, start: float, count: int) -> None:
    """One of several processes committing records and trial counts into one Store at the same time."""
    store = Store(CPU, "deform_conv2d", Path(root))
    while time.time() < start:
        time.sleep(0.01)
    for i in range(count):
        store.commit(f"kernel{worker}", [float(count - i)], [["trace", worker, i]])
        entry = store.kernel(f"kernel{worker}") or {}
        store.update_kernel(f"kernel{worker}", "test", trials=entry.get("trials", 0) + 1)


def test_concurrent_store_writers_lose_nothing(tmp_path):
    workers, count = 3, 40
    start = time.time() + 10  # after every process has imported dcn_tvm
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.starmap(_write_concurrently, [(str(tmp_path), w, start, count) for w in range(workers)])
    store = Store(CPU, "deform_conv2d", tmp_path)
    for worker in range(workers):
        assert store.kernel(f"kernel{worker}")["trials"] == count
        assert [r["run_ms"] for r in store.records(f"kernel{worker}")] == [[1.0], [2.0], [3.0]]


@pytest.mark.slow
def test_two_tuning_runs_into_one_folder_count_every_trial(tmp_path):
    """The second run waits for the first, then tops its kernel up to its own budget."""
    def command(trials):
        return [sys.executable, "-m", "dcn_tvm", "tune", "--target", "llvm", "--workload", TINY, "--stage",
                "forward", "--trials", str(trials), "--logs", str(tmp_path), "--no-progress"]

    runs = [subprocess.Popen(command(trials), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for trials in (2, 3)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum("waiting for another writer of" in err for _, err in outputs) == 1
    store = Store(CPU, "deform_conv2d", tmp_path)
    (entry,) = store.metadata()["kernels"].values()
    assert entry["trials"] == 3 and entry["history"][-1][0] == 3
    kept = store.records(forward_task().spec.key)
    fastest = records.median(kept[0]["run_ms"])
    assert entry["schedule"] == ("tuned" if fastest < entry["default_ms"] else "default")
    assert entry["tuned_ms"] == pytest.approx(fastest if entry["schedule"] == "tuned" else entry["default_ms"])
