"""Tune kernels with MetaSchedule over the rules of schedules/ (one kernel at a time, resumable).

Per kernel: the design spaces are the kernel's own schedule rule, once per combination of its
structural choices, with every tile factor sampled (`schedules.common.design_spaces`; a `ScheduleFn`
with no generic rules: MetaSchedule's generic space would inline the gather into the GEMM and
recompute it per output channel). A fresh kernel first measures each design space at its default
tile factors (so every structure is tried once whatever the budget), then MetaSchedule's
evolutionary search with its XGBoost cost model spends the rest. The database is the kernel's
records (`RecordsDatabase`): the search starts from what earlier runs kept, and every successful
measurement is written to disk as it arrives. Once the kernel's trials are spent, its default
schedule and its kept records are measured side by side; the fastest is what the library will
compile.

`--trials` is the budget of the whole run, split evenly over the kernels; a kernel whose recorded
trials already meet its share (or whose space ran out) is not measured again. A run holds the lock
of each records folder it tunes (`Store.locked`) from start to end, so a second run into the same
folder waits, then counts the first one's trials. Every worker process the run starts
(MetaSchedule's `tvm.exec.popen_worker` builders and runners) is ended when it returns or raises.

SIGINT (Ctrl-C) and SIGTERM stop a run between batches (`StopRequests`): what it measured is kept,
and the same call resumes it. A second signal ends the run's workers and the process at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from dcn_tvm import env
from dcn_tvm._tvm import tvm
from dcn_tvm.kernels.build import prim_func
from dcn_tvm.kernels.records import Records, median
from dcn_tvm.kernels.targets import target_config, target_kind
from dcn_tvm.kernels.workloads import STAGE_NAMES, Task, Workload
from dcn_tvm.tuning.cli import COST_MODELS
from dcn_tvm.tuning.store import FAILED_SECS, Store, plain
from dcn_tvm.tuning.target import local_device, tuning_target

#: Candidates per MetaSchedule batch: records reach the disk at least this often.
BATCH = 8
#: Timed runs per measurement (each at least MIN_REPEAT_MS long); the median is reported.
REPEAT, MIN_REPEAT_MS = 5, 100
#: Rounds of the side-by-side measurement of a kernel's default schedule and records.
ROUNDS = 2


class MeasurementError(RuntimeError):
    """The default schedule of a kernel could not be measured on the target's device."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (`signum`) stopped the run between batches; what it measured is recorded."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class StopRequests:
    """While entered (in the main thread), SIGINT and SIGTERM only ask the run to stop; `check` then
    raises Interrupted at the next point between batches. (Raised by the default handler inside
    MetaSchedule's C++ loop, KeyboardInterrupt aborted the process: std::terminate.) A second signal
    kills this process's descendants, removes the folders made by `scratch` and exits with 128 + the
    signal's number."""

    def __init__(self):
        self.signum, self._previous, self._scratch = None, {}, []

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._request)
                              for signum in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _request(self, signum, frame):
        if self.signum is not None:
            _kill(_descendants())
            for folder in self._scratch:
                shutil.rmtree(folder, ignore_errors=True)
            _say(f"dcn-tvm tune: {signal.Signals(signum).name} again: stopped at once; the batch being measured "
                 f"is lost, what was recorded before it is kept")
            os._exit(128 + signum)
        self.signum = signum
        _say(f"\ndcn-tvm tune: {signal.Signals(signum).name}: stopping once the batch being measured is recorded "
             f"(signal again to stop at once)")

    def check(self) -> None:
        """Raise Interrupted if a stop was asked for."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def scratch(self, prefix: str):
        """A temporary folder (its path) that a stop at once removes too."""
        with tempfile.TemporaryDirectory(prefix=prefix) as folder:
            self._scratch.append(folder)
            try:
                yield folder
            finally:
                self._scratch.remove(folder)


def _say(line: str) -> None:
    """Print `line` to stderr from a signal handler. A handler that interrupts a blocked write to stderr
    would raise RuntimeError (a reentrant call) there, ending the run: the line is dropped instead."""
    with contextlib.suppress(RuntimeError):
        print(line, file=sys.stderr, flush=True)


@dataclass
class Result:
    """One kernel's line in the table: times in ms (None when never measured); `folder` holds its records."""

    folder: Path
    workload: str
    stage: str
    key: str
    default_ms: float | None
    tuned_ms: float | None
    trials: int
    schedule: str
    history: list


def _ms():
    from dcn_tvm.schedules import mma_tf32
    from tvm.s_tir import meta_schedule

    mma_tf32.give_way_to_tvm_intrinsics()  # before any TuneContext imports them

    return meta_schedule


def _module(func):
    return tvm().IRModule({"main": func.with_attr("global_symbol", "main")})


def _scheduled(task: Task, trace=None):
    """The measured kernel of `task` as an IRModule, scheduled by `trace`, else by its default rule."""
    sch = tvm().s_tir.Schedule(_module(prim_func(task.measured)))
    if trace is None:
        _default_rule(task, sch)
    else:
        tvm().s_tir.Trace.apply_json_to_schedule(trace, sch)
    return sch.mod


def _default_rule(task: Task, sch) -> None:
    """Schedule `sch` in place by the kernel's default rule, for (the vectors of) the kernel's target."""
    from dcn_tvm import schedules

    with tvm().target.Target(target_config(task.spec.target)):
        schedules.apply(task.spec.op, target_kind(task.spec.target), task.spec.stage, sch)


def design_spaces(task: Task, sch) -> list:
    """The design spaces of a kernel on `sch` (see the module docstring), default structure first."""
    from dcn_tvm.schedules.common import design_spaces as spaces

    return spaces(lambda s: _default_rule(task, s), sch)


def space(task: Task):
    """The kernel's design spaces as a MetaSchedule space generator."""
    ms = _ms()

    def rule(sch):
        return design_spaces(task, sch)

    postprocs = [ms.postproc.VerifyGPUCode()] if target_kind(task.spec.target) == "cuda" else []
    return ms.space_generator.ScheduleFn(rule, sch_rules=[], postprocs=postprocs, mutator_probs={})


def _records_database(store: Store, key: str, mod, target):
    """A MetaSchedule database over one kernel's records in `store` (see the module docstring)."""
    ms = _ms()
    from tvm.ir.utils import derived_object

    @derived_object
    class RecordsDatabase(ms.database.PyDatabase):
        def __init__(self):
            super().__init__()
            self.workload = ms.database.Workload(mod)
            self.args_info = ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True)

        def has_workload(self, other) -> bool:
            import tvm_ffi

            return bool(tvm_ffi.structural_equal(other, mod))

        def commit_workload(self, other):
            if not self.has_workload(other):
                raise ValueError(f"the records database of {key} holds that kernel only")
            return self.workload

        def commit_tuning_record(self, record) -> None:
            run_secs = [float(seconds) for seconds in record.run_secs or ()]
            if run_secs and max(run_secs) < FAILED_SECS:
                store.commit(key, [seconds * 1e3 for seconds in run_secs], plain(record.trace.as_json(True)))

        def get_top_k(self, workload, top_k: int) -> list:
            return [self._record(entry) for entry in store.records(key)[:top_k]]

        def get_all_tuning_records(self) -> list:
            return [self._record(entry) for entry in store.records(key)]

        def __len__(self) -> int:
            return len(store.records(key))

        def _record(self, entry):
            sch = tvm().s_tir.Schedule(mod)
            tvm().s_tir.Trace.apply_json_to_schedule(entry["trace"], sch)
            return ms.database.TuningRecord(sch.trace, self.workload, [t / 1e3 for t in entry["run_ms"]], target,
                                            self.args_info)

    return RecordsDatabase()


def _compile_function():
    """The builder's compile step: `tvm.compile`, as builds do. (MetaSchedule's default imports every
    tensor intrinsic in each fresh worker, seconds per batch; nested, this pickles by value.)"""

    def compile(mod, target, _params):
        import tvm

        with target:
            return tvm.compile(mod, target=target).mod

    return compile


class Measurer:
    """Build with MetaSchedule's local builder and time with its local runner, or with the devices
    registered under `rpc_key` at an RPC tracker (one measurement in flight per device)."""

    def __init__(self, target, stops: StopRequests, rpc_tracker: str | None = None, rpc_key: str | None = None):
        ms = _ms()
        self.target, self.stops = target, stops
        self.builder = ms.builder.LocalBuilder(timeout_sec=300, f_build=_compile_function())
        evaluator = ms.runner.EvaluatorConfig(number=1, repeat=REPEAT, min_repeat_ms=MIN_REPEAT_MS)
        if rpc_tracker is None:
            self.runner = ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=120)
            return
        host, _, port = rpc_tracker.rpartition(":")
        if not host or not port.isdigit() or not rpc_key:
            raise ValueError(f"--rpc-tracker must be HOST:PORT and --rpc-key given, got {rpc_tracker!r}, {rpc_key!r}")
        config = ms.runner.RPCConfig(host, int(port), rpc_key, session_timeout_sec=120)
        servers = config.count_num_servers(allow_missing=False)
        self.runner = ms.runner.RPCRunner(config, evaluator, max_workers=servers)

    def close(self) -> None:
        """End the runner's worker processes (the builder starts and ends its own per batch)."""
        self.runner.pool.shutdown(wait=False)

    def measure(self, mods) -> list[list[float] | str]:
        """Per module: its run times in ms over ROUNDS runs of the whole list (every other round in
        reverse order, so a slow spell of a shared machine hits every module alike), or the build or
        run error message. Raises Interrupted if a stop was asked for meanwhile (Ctrl-C reaches the
        workers too: their errors say nothing of the modules)."""
        ms = _ms()
        from tvm.s_tir.meta_schedule.utils import remove_build_dir

        builds = self.builder.build([ms.builder.BuilderInput(mod, self.target) for mod in mods])
        results: list = [build.error_msg or [] for build in builds]
        built = [i for i, build in enumerate(builds) if build.error_msg is None]
        device = "cuda" if self.target.kind.name == "cuda" else "cpu"
        order = [i for r in range(ROUNDS) for i in (built if r % 2 == 0 else built[::-1])]
        futures = self.runner.run([
            ms.runner.RunnerInput(builds[i].artifact_path, device,
                                  ms.arg_info.ArgInfo.from_entry_func(mods[i], remove_preproc=True))
            for i in order
        ])
        for i, future in zip(order, futures):
            result = future.result()
            secs = [float(s) for s in result.run_secs or ()]
            if isinstance(results[i], str):
                continue
            ok = result.error_msg is None and secs and max(secs) < FAILED_SECS
            results[i] = results[i] + [s * 1e3 for s in secs] if ok else (result.error_msg or "no run time")
        for i in built:
            remove_build_dir(builds[i].artifact_path)
        self.stops.check()
        return results


class _Progress:
    """tqdm bars: all kernels of the run, and the current kernel."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self._tqdm, self.enabled = tqdm, enabled
        self.overall = tqdm(total=total, desc="all kernels", unit="trial", disable=not enabled, position=0)
        self.kernel = None

    def start(self, task: Task, total: int):
        self.kernel = self._tqdm(total=total, desc=f"{task.spec.stage} {task.workload}"[:90], unit="trial",
                                 disable=not self.enabled, position=1, leave=False)

    def advance(self, trials: int, best_ms: float | None):
        self.overall.update(trials)
        self.kernel.update(trials)
        if best_ms is not None:
            self.kernel.set_postfix(best_ms=f"{best_ms:.4g}")

    def finish_kernel(self):
        self.kernel.close()

    def close(self):
        self.overall.close()


def _search(task: Task, store: Store, measurer: Measurer, trials: int, progress: _Progress, device: str,
            cost_model: str):
    """Run MetaSchedule for up to `trials` more trials; updates the kernel's entry after every batch."""
    ms = _ms()
    from tvm.ir.utils import derived_object

    entry = store.kernel(task.spec.key) or {}
    state = {"trials": entry.get("trials", 0), "history": list(entry.get("history", [])), "session": 0}
    best = min((median(r["run_ms"]) for r in store.records(task.spec.key)), default=None)

    def account(measured: int, times_ms: list[float]) -> None:
        """Note `measured` more trials, `times_ms` the medians of those that ran, in the entry and the bars."""
        nonlocal best
        best = min((t for t in (best, *times_ms) if t is not None), default=None)
        state["trials"] += measured
        state["session"] += measured
        state["history"].append([state["trials"], best])
        store.update_kernel(task.spec.key, device, trials=state["trials"], history=state["history"])
        progress.advance(measured, best)

    @derived_object
    class Bookkeeping(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            if not candidates:  # a search iteration that found nothing new to measure
                return
            times = []
            for result in runner_results:
                secs = [float(s) for s in result.run_secs or ()]
                if result.error_msg is None and secs and max(secs) < FAILED_SECS:
                    times.append(median(secs) * 1e3)
            # After a stop request, errors may be workers ended by Ctrl-C: count only the candidates that ran.
            account(len(times) if measurer.stops.signum else len(candidates), times)
            measurer.stops.check()

    mod = _module(prim_func(task.measured))
    if state["trials"] == 0:
        seeds = design_spaces(task, tvm().s_tir.Schedule(mod))[:trials]
        times = []
        for seed, measured in zip(seeds, measurer.measure([seed.mod for seed in seeds])):
            if not isinstance(measured, str):
                store.commit(task.spec.key, measured, plain(seed.trace.as_json(True)))
                times.append(median(measured))
        account(len(seeds), times)
    remaining = trials - state["session"]
    if remaining <= 0:
        return
    # No mutator applies to categorical decisions, so evolving would only re-score the population:
    # each batch ranks fresh random samples of the space with the cost model instead. The spaces
    # hold tens to hundreds of points, and replaying a trace can take 50 ms: sample 64, not 512.
    strategy = ms.search_strategy.EvolutionarySearch(population_size=64, init_min_unmeasured=16,
                                                     genetic_num_iters=0)
    context = ms.TuneContext(mod=mod, target=measurer.target, space_generator=space(task),
                             search_strategy=strategy, task_name=task.spec.key,
                             num_threads=os.cpu_count() or 1).clone()
    with measurer.stops.scratch("dcn_tvm_tune_") as work_dir:
        try:
            ms.tune_tasks(tasks=[context], task_weights=[1.0], work_dir=work_dir, max_trials_global=remaining,
                          num_trials_per_iter=min(BATCH, remaining), builder=measurer.builder,
                          runner=measurer.runner, cost_model=cost_model,
                          database=_records_database(store, task.spec.key, mod, measurer.target),
                          measure_callbacks=ms.MeasureCallback.create("default") + [Bookkeeping()],
                          task_scheduler="round-robin")
        except Exception:
            measurer.stops.check()  # Bookkeeping's Interrupted comes back through C++ as another type
            raise
    if state["session"] < trials:  # the search stopped early: no unmeasured candidates were left
        store.update_kernel(task.spec.key, device, exhausted=True)


def _final(task: Task, store: Store, measurer: Measurer, device: str) -> None:
    """Measure the default schedule and the kept records side by side; builds will use the fastest.

    Records that are the default schedule itself take its time; records that fail are dropped.
    `tuned_ms` is the time of the schedule chosen, so it equals `default_ms` when the default stays.
    """
    import tvm_ffi

    key, default = task.spec.key, _scheduled(task)
    kept = [(r, _scheduled(task, r["trace"])) for r in store.records(key)]
    others = [r for r, mod in kept if not tvm_ffi.structural_equal(mod, default)]
    times = measurer.measure([default] + [mod for r, mod in kept if r in others])
    if isinstance(times[0], str):
        raise MeasurementError(f"{key}: the default schedule failed to build or run:\n{times[0]}")
    default_ms, fastest = median(times[0]), None
    for record, measured in zip(others, times[1:]):
        if isinstance(measured, str):
            store.remove(key, record["trace"])
            continue
        store.commit(key, measured, record["trace"])
        fastest = min(fastest or median(measured), median(measured))
    for record in (r for r, _ in kept if r not in others):
        store.commit(key, times[0], record["trace"])
    schedule = "tuned" if fastest is not None and fastest < default_ms else "default"
    if schedule == "tuned" and task.spec != task.measured:
        _schedule_check(task, store.records(key)[0]["trace"])
    store.update_kernel(key, device, workload=str(task.workload), stage=task.spec.stage,
                        func_hash=str(tvm_ffi.structural_hash(prim_func(task.spec))), default_ms=default_ms,
                        tuned_ms=fastest if schedule == "tuned" else default_ms, schedule=schedule)


def _schedule_check(task: Task, trace) -> None:
    """The trace, tuned on the measured sizes, must also schedule the kernel the library builds."""
    tvm().s_tir.Trace.apply_json_to_schedule(trace, tvm().s_tir.Schedule(prim_func(task.spec)))


def tune(workloads: list[Workload], target: str, trials: int, logs: Path | None = None, stages=None,
         rpc_tracker: str | None = None, rpc_key: str | None = None, progress: bool = True,
         cost_model: str = "xgb") -> list[Result]:
    """Tune every kernel of `workloads` (only `stages`, if given) for the target key `target` with
    `trials` trials in all, guided by MetaSchedule's `cost_model` (xgb, mlp or random).

    Records go to `logs` (default env.tuning_logs_dir()) and are picked up by later builds.
    Raises RecordsVersionError if `logs` holds records of another TVM version for this target.
    """
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    if cost_model not in COST_MODELS:
        raise ValueError(f"--cost-model must be one of {', '.join(COST_MODELS)}, got {cost_model!r}")
    if stages and not set(stages) <= set(STAGE_NAMES):
        raise ValueError(f"unknown stage(s) {sorted(set(stages) - set(STAGE_NAMES))}; tunable stages are "
                         f"{list(STAGE_NAMES)}")
    root = Path(logs or env.tuning_logs_dir())
    tasks = list({task.spec.key: task for w in workloads for task in w.tasks(target)
                  if not stages or task.spec.stage in stages}.values())
    if not tasks:
        raise ValueError("nothing to tune: give --preset or --workload (and stages they have)")
    if target_kind(target) == "cuda" and rpc_tracker is None and not torch.cuda.is_available():
        raise ValueError(f"measuring for {target} needs a visible CUDA GPU or --rpc-tracker")
    stores = {op: Store(target, op, root) for op in sorted({task.spec.op for task in tasks})}
    with contextlib.ExitStack() as stack:
        for store in stores.values():
            stack.enter_context(store.locked())
        stack.enter_context(_ending_new_workers())
        for store in stores.values():
            store.check_version()
        _tune_tasks(tasks, stores, target, max(trials // len(tasks), 1), rpc_tracker, rpc_key, progress, stack,
                    cost_model)
    return [result_of(stores[task.spec.op], task.spec.key) for task in tasks]


def _tune_tasks(tasks: list[Task], stores: dict, target: str, share: int, rpc_tracker, rpc_key, progress: bool,
                stack: contextlib.ExitStack, cost_model: str) -> None:
    """Give every kernel its `share` of trials (less those recorded), then its final measurement."""

    def remaining(task: Task) -> int:
        entry = stores[task.spec.op].kernel(task.spec.key) or {}
        return 0 if entry.get("exhausted") else max(share - entry.get("trials", 0), 0)

    todo = {task.spec.key: remaining(task) for task in tasks}
    unfinished = [task for task in tasks if todo[task.spec.key] or "default_ms" not in
                  (stores[task.spec.op].kernel(task.spec.key) or {})]
    if not unfinished:
        return
    stops = stack.enter_context(StopRequests())
    measurer = Measurer(tuning_target(target), stops, rpc_tracker, rpc_key)
    stack.callback(measurer.close)
    device = f"RPC key {rpc_key!r} at {rpc_tracker}" if rpc_tracker else local_device(target)
    bars = stack.enter_context(contextlib.closing(_Progress(sum(todo.values()), progress)))
    for task in unfinished:
        stops.check()
        store = stores[task.spec.op]
        if todo[task.spec.key]:
            bars.start(task, todo[task.spec.key])
            _search(task, store, measurer, todo[task.spec.key], bars, device, cost_model)
            bars.finish_kernel()
        _final(task, store, measurer, device)


@contextlib.contextmanager
def _ending_new_workers():
    """Kill, on the way out, every descendant process started inside (MetaSchedule's popen workers,
    which otherwise outlive the run: a builder pool interrupted mid-batch is never shut down)."""
    before = {child.pid for child in _descendants()}
    try:
        yield
    finally:
        _kill([child for child in _descendants() if child.pid not in before])


def _descendants() -> list:
    """This process's descendants (psutil.Process objects)."""
    import psutil

    return psutil.Process().children(recursive=True)


def _kill(processes: list) -> None:
    """Kill `processes` and wait (at most 10 s) for them to end."""
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=10)


def result_of(store: Records, key: str) -> Result:
    """The table line of a recorded kernel."""
    entry = store.kernel(key)
    return Result(store.folder, entry["workload"], entry["stage"], key, entry.get("default_ms"), entry.get("tuned_ms"),
                  entry.get("trials", 0), entry["schedule"], entry.get("history", []))
