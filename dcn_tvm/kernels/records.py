"""Reading tuning records: `<logs>/<target-key>/<op>/`, one folder per target and operator.

    metadata.json   TVM and dcn_tvm versions, target JSON, device, date; per kernel key: workload,
                    stage, structural hash of the kernel's PrimFunc, trials, whether the space ran
                    out, default and tuned times (ms, measured side by side), the schedule to use
                    ("tuned" or "default") and the best time after each batch of trials
    records.jsonl   the best 3 (tuning.store.KEEP) measured schedules per kernel key, one line each, sorted:
                    {"key", "run_ms", "trace"}, the trace being MetaSchedule's JSON with its decisions

Targets never share a folder (MetaSchedule matches records by PrimFunc, ignoring the target). Only
text is stored, no TVM object blobs; a trace replays with `Trace.apply_json_to_schedule`, whose
instruction names may change between TVM releases, so readers check the recorded TVM version and a
record only applies to a PrimFunc with the recorded structural hash. A damaged file never fails an
operator call: an unreadable line of records.jsonl is skipped, an unreadable metadata.json means the
default schedules, each with one warning naming the file.

This module only reads them, for kernel resolution: the tuned schedule of a spec, and the tag its
cache entry is keyed by. The tuner writes them (dcn_tvm.tuning.store: each file replaced atomically,
by one writer at a time).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import statistics
from pathlib import Path

from dcn_tvm import env
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_config, target_kind

log = logging.getLogger("dcn_tvm")
_warned: set[str] = set()


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def median(times) -> float:
    return statistics.median(times)


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


class Records:
    """The records of one target and operator under `root` (default: env.tuning_logs_dir()), read-only."""

    def __init__(self, target: str, op: str, root: Path | None = None):
        self.target, self.op = target, op
        self.folder = Path(root or env.tuning_logs_dir()) / target / op
        self.metadata_path, self.records_path = self.folder / "metadata.json", self.folder / "records.jsonl"

    def exists(self) -> bool:
        return self.metadata_path.is_file()

    def metadata(self) -> dict:
        """The folder's metadata; a fresh one where there is none or it cannot be read (warned once)."""
        fresh = {"tvm": version("apache-tvm"), "dcn_tvm": version("dcn_tvm"), "target": target_config(self.target),
                 "device": None, "date": None, "kernels": {}}
        if not self.exists():
            return fresh
        try:
            metadata = json.loads(self.metadata_path.read_text(errors="replace"))
            if not (isinstance(metadata, dict) and isinstance(metadata.get("kernels"), dict) and "tvm" in metadata):
                raise ValueError("not a JSON object with 'tvm' and 'kernels'")
        except (OSError, ValueError) as error:
            _warn_once(str(self.metadata_path), "dcn_tvm: ignoring %s, which cannot be read (%s); using the default "
                       "schedules", self.metadata_path, error)
            return fresh
        return metadata

    def version_error(self) -> str | None:
        """Why these records cannot be used with the installed TVM, or None."""
        recorded, installed = self.metadata()["tvm"], version("apache-tvm")
        if recorded == installed:
            return None
        return (f"{self.folder} was tuned with TVM {recorded} but TVM {installed} is installed; schedule traces "
                f"are TVM-version specific: re-tune into another --logs folder, or delete this one")

    def kernel(self, key: str) -> dict | None:
        entry = self.metadata()["kernels"].get(key)
        return entry if isinstance(entry, dict) else None

    def _all_records(self) -> list[dict]:
        """Every record of the file; a line that is not one is skipped, with one warning."""
        try:
            text = self.records_path.read_text(errors="replace") if self.records_path.is_file() else ""
        except OSError as error:
            _warn_once(str(self.records_path), "dcn_tvm: ignoring %s (%s)", self.records_path, error)
            return []
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if _is_record(record):
                records.append(record)
                continue
            _warn_once(f"{self.records_path}:{number}", "dcn_tvm: skipping line %d of %s: not a tuning record "
                       "(truncated or edited?)", number, self.records_path)
        return records

    def records(self, key: str) -> list[dict]:
        """The kernel's records, fastest (median) first."""
        return sorted((r for r in self._all_records() if r["key"] == key), key=lambda r: median(r["run_ms"]))


def _is_record(record) -> bool:
    """Whether a parsed line of records.jsonl has the shape of a record."""
    return (isinstance(record, dict) and isinstance(record.get("key"), str) and isinstance(record.get("trace"), list)
            and isinstance(record.get("run_ms"), list) and len(record["run_ms"]) > 0
            and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in record["run_ms"]))


def _usable_entry(spec: KernelSpec, root: Path | None) -> tuple[Records, dict] | None:
    """The store and metadata entry of a tuned schedule for `spec`, without the hash check."""
    store = Records(spec.target, spec.op, root)
    entry = store.kernel(spec.key) if store.exists() else None
    if entry is None:
        from dcn_tvm.kernels.workloads import of_spec, tunable

        if target_kind(spec.target) == "cuda" and tunable(spec):
            workload = of_spec(spec)
            _warn_once(f"{spec.target} {workload}", "dcn_tvm: no tuned schedules for %s on %s; using the default "
                       "schedules. Tune them on this GPU with: dcn-tvm tune --target cuda --workload '%s'",
                       workload, spec.target, workload)
        return None
    error = store.version_error()
    if error:
        _warn_once(str(store.folder), "dcn_tvm: ignoring tuning records: %s", error)
        return None
    if entry.get("schedule") != "tuned" or not store.records(spec.key):
        return None
    return store, entry


def tuned_schedule(spec: KernelSpec, func, root: Path | None = None):
    """An `s_tir.Schedule` of `func` (the PrimFunc of `spec`) with its tuned trace applied, or None
    for the default schedule.

    A miss on a CUDA target logs once the command that would tune it; records of another TVM version,
    of another PrimFunc (the compute changed since tuning) or that fail to replay log once and give None.
    """
    import tvm_ffi

    from dcn_tvm._tvm import tvm

    found = _usable_entry(spec, root)
    if found is None:
        return None
    store, entry = found
    if entry.get("func_hash") != str(tvm_ffi.structural_hash(func)):
        _warn_once(spec.key, "dcn_tvm: the tuned schedule of %s was tuned for another version of its compute; "
                   "using the default schedule (re-tune %s)", spec.key, entry.get("workload", "it"))
        return None
    sch = tvm().s_tir.Schedule(func)
    try:
        tvm().s_tir.Trace.apply_json_to_schedule(store.records(spec.key)[0]["trace"], sch)
    except Exception as error:  # a record that does not replay, for whatever reason, must not fail the op
        _warn_once(spec.key, "dcn_tvm: the tuned schedule of %s does not apply (%s); using the default schedule",
                   spec.key, str(error).splitlines()[0])
        return None
    return sch


def schedule_tag(spec: KernelSpec, root: Path | None = None) -> str:
    """"default", or "tuned-" + a hash of the tuned trace: what a kernel cache entry must be keyed by."""
    found = _usable_entry(spec, root)
    if found is None:
        return "default"
    trace = json.dumps(found[0].records(spec.key)[0]["trace"], separators=(",", ":"))
    return "tuned-" + hashlib.sha256(trace.encode()).hexdigest()[:12]
