"""Writing tuning records (the tuner's side; kernel resolution reads them with dcn_tvm.kernels.records,
which describes the folder's files).

Files are replaced atomically (a temporary file in the same folder, then rename), by one writer at a
time (`Store.locked`: an fcntl lock on the folder's .lock file, which a tuning run holds from start
to end).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from dcn_tvm.forksafe import ForkSafeLock
from dcn_tvm.kernels.records import Records, median, version

log = logging.getLogger("dcn_tvm")
#: Measured schedules kept per kernel.
KEEP = 3
#: run_secs at or above this mark a failed measurement (MetaSchedule stores failures as 1e10 s).
FAILED_SECS = 1e9
#: Per folder: a lock for this process's threads, and [the open .lock file, how deeply it is held].
_folder_locks: dict[str, tuple[ForkSafeLock, list]] = {}
_folder_locks_guard = ForkSafeLock()


class RecordsVersionError(RuntimeError):
    """The records were written by another TVM version than the one installed."""


class RecordsFolderError(RuntimeError):
    """The records folder cannot be created or written (read-only, a file in the way, ...)."""


def _write(path: Path, text: str) -> None:
    """Replace `path` by `text` atomically (a temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


class Store(Records):
    """The records of one target and operator, read and written."""

    @contextmanager
    def locked(self):
        """Be the folder's only writer while inside: other processes and threads wait (reentrant)."""
        with _folder_locks_guard:
            thread_lock, held = _folder_locks.setdefault(str(self.folder), (ForkSafeLock(reentrant=True), [None, 0]))
        with thread_lock:
            if held[1] == 0:
                try:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    handle = open(self.folder / ".lock", "a")
                except OSError as error:
                    raise RecordsFolderError(f"cannot write tuning records into {self.folder}: {error}") from None
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.warning("dcn_tvm: waiting for another writer of %s (another dcn-tvm tune run?)", self.folder)
                    fcntl.flock(handle, fcntl.LOCK_EX)
                held[0] = handle
            held[1] += 1
            try:
                yield
            finally:
                held[1] -= 1
                if held[1] == 0:
                    held[0].close()
                    held[0] = None

    def check_version(self) -> None:
        error = self.version_error() if self.exists() else None
        if error:
            raise RecordsVersionError(error)

    def update_kernel(self, key: str, device: str, **fields) -> dict:
        """Merge `fields` into the kernel's entry and stamp the folder's device and date."""
        with self.locked():
            metadata = self.metadata()
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            metadata.update(device=device, date=now, dcn_tvm=version("dcn_tvm"))
            entry = metadata["kernels"].get(key)
            entry = metadata["kernels"][key] = entry if isinstance(entry, dict) else {}
            entry.update(fields, date=now)
            metadata["kernels"] = dict(sorted(metadata["kernels"].items()))
            _write(self.metadata_path, json.dumps(metadata, indent=1) + "\n")
            return entry

    def _save(self, records: list[dict]) -> None:
        records = sorted(records, key=lambda r: (r["key"], median(r["run_ms"])))
        _write(self.records_path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))

    def remove(self, key: str, trace: list) -> None:
        """Forget a recorded schedule (one that no longer builds or runs)."""
        with self.locked():
            self._save([r for r in self._all_records() if not (r["key"] == key and r["trace"] == trace)])

    def commit(self, key: str, run_ms: list[float], trace: list) -> None:
        """Record a measured schedule (replacing an earlier measurement of the same trace), keeping
        the KEEP fastest per kernel."""
        with self.locked():
            others = [r for r in self._all_records() if not (r["key"] == key and r["trace"] == trace)]
            mine = sorted([r for r in others if r["key"] == key] + [{"key": key, "run_ms": run_ms, "trace": trace}],
                          key=lambda r: median(r["run_ms"]))[:KEEP]
            self._save([r for r in others if r["key"] != key] + mine)


def plain(value):
    """A trace's JSON (TVM containers, IntImm, FloatImm) as plain Python lists and numbers."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return str(value) if isinstance(value, str) else value
    if hasattr(value, "value"):
        return value.value
    return [plain(item) for item in value]
