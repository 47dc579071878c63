"""The kernel cache under hostile or unlucky conditions (issue 22): entries other users could have
planted, a fork while a thread holds the cache's locks, a stopped process holding an entry's lock,
no home directory, many shapes in one process, staged files of a killed writer.

The kernel is the smallest there is, the input-gradient scatter (about 0.2 s to compile), checked on
one sample: weights (1, 2, 3, 4) on the four corners of a 2x2 plane."""

from __future__ import annotations

import gc
import inspect
import os
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from dcn_tvm.kernels import cache
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_key

TARGET = target_key(torch.device("cpu"))
SPEC = KernelSpec("deform_conv2d", "scatter", None, (), TARGET)
SPEC64 = KernelSpec("deform_conv2d", "scatter", None, (), TARGET, acc_dtype="float64")
ROOT = os.geteuid() == 0
NOBODY = 65534



def run_scatter(kernel, dtype=torch.float32):
    """Run a scatter kernel on one sample and check it."""
    rows = torch.tensor([0, 1], dtype=torch.int32).view(1, 1, 1, 1, 1, 2)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype).view(1, 1, 1, 1, 1, 4)
    grad_input = torch.zeros(1, 1, 2, 2, dtype=dtype)
    kernel(torch.ones(1, 1, 1, 1, 1, dtype=dtype), rows, rows.clone(), weights, grad_input)
    assert grad_input.flatten().tolist() == [1.0, 2.0, 3.0, 4.0], grad_input


RUN_SCATTER = "\n" + inspect.getsource(run_scatter)  # for the child processes below


@pytest.fixture
def library(tmp_path, monkeypatch):
    """Where SPEC's entry goes in a fresh disk cache (not created)."""
    monkeypatch.setenv("DCN_TVM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DCN_TVM_NO_DISK_CACHE", raising=False)
    return cache.cache_path(SPEC)


@pytest.fixture
def compiled(monkeypatch):
    """The keys cache._compile is asked for."""
    keys = []
    original = cache._compile
    monkeypatch.setattr(cache, "_compile", lambda spec: keys.append(spec.key) or original(spec))
    return keys


def store(library: Path) -> Path:
    library.parent.mkdir(parents=True, exist_ok=True)
    cache._store(cache._compile(SPEC), library)
    return library


# --- 4: entries another user could have planted ------------------------------------------------------

def _open_folder(library):
    library.parent.chmod(0o777)
    return library.parent


def _open_root(library):
    root = Path(os.environ["DCN_TVM_CACHE_DIR"])
    root.chmod(0o777)
    return root


def _foreign_entry(library):
    os.chown(library, NOBODY, NOBODY)
    return library


def _foreign_folder(library):
    os.chown(library.parent, NOBODY, NOBODY)
    return library.parent


def _open_checksum(library):
    checksum = cache.checksum_path(library)
    checksum.chmod(0o666)
    return checksum


def _foreign_symlinked_root(library):
    """The cache root is a symlink that another user owns (and so may point elsewhere at any time)."""
    root = Path(os.environ["DCN_TVM_CACHE_DIR"])
    real = root.rename(root.with_name("real"))
    root.symlink_to(real)
    os.chown(root, NOBODY, NOBODY, follow_symlinks=False)
    return root


OPENINGS = {"folder writable by everyone": _open_folder, "cache root writable by everyone": _open_root,
            "checksum file writable by everyone": _open_checksum, "entry owned by another user": _foreign_entry,
            "folder owned by another user": _foreign_folder, "root a symlink of another user": _foreign_symlinked_root}


@pytest.mark.parametrize("opening", OPENINGS)
def test_an_entry_others_could_have_planted_is_not_loaded(library, compiled, opening):
    if "another user" in opening and not ROOT:
        pytest.skip("giving a file to another user needs root")
    culprit = OPENINGS[opening](store(library))
    compiled.clear()
    with pytest.warns(UserWarning, match=rf"not using the kernel cache: {culprit} is (writable by everyone|owned by "
                                         rf"uid {NOBODY}), so another user could have planted libraries there; "
                                         rf"compiling kernels in memory"):
        run_scatter(cache._from_disk(SPEC, library))
    assert compiled == [SPEC.key]


def test_a_private_cache_loads_also_under_a_sticky_world_writable_folder(tmp_path, monkeypatch, compiled):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: everyone may add files, only their owner may move or remove them
    monkeypatch.setenv("DCN_TVM_CACHE_DIR", str(shared / "cache"))
    library = store(cache.cache_path(SPEC))
    compiled.clear()
    run_scatter(cache._from_disk(SPEC, library))
    assert compiled == []


# --- 6: fork while another thread holds the cache's locks ---------------------------------------------

FORK_CHILD = """
import os, sys, threading, time, torch
from dcn_tvm.kernels import cache
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_key
""" + RUN_SCATTER + """
spec = KernelSpec("deform_conv2d", "scatter", None, (), target_key(torch.device("cpu")))
compiling, release = threading.Event(), threading.Event()
original = cache._compile

def slow_compile(spec):  # get_kernel holds the in-process lock and the entry's file lock meanwhile
    compiling.set()
    release.wait()
    return original(spec)

cache._compile = slow_compile
thread = threading.Thread(target=cache.get_kernel, args=(spec,), daemon=True)
thread.start()
compiling.wait()
pid = os.fork()
if pid == 0:
    compiled = []
    cache._compile = lambda spec: compiled.append(spec.key) or original(spec)
    run_scatter(cache.get_kernel(spec))
    os._exit(10 + len(compiled))  # 10: loaded what the parent's thread stored
release.set()
thread.join(60)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child exit", os.waitstatus_to_exitcode(status))
        sys.exit(0)
    time.sleep(0.1)
os.kill(pid, 9)
os.waitpid(pid, 0)
print("child hung")
"""


@pytest.mark.slow  # a fresh interpreter that imports TVM: about 12 s
def test_a_fork_while_a_thread_compiles_leaves_the_child_free_to_get_kernels(tmp_path):
    """The child neither waits for the in-process lock nor for its own copy of the entry's file lock;
    it waits for the parent's thread to store the entry and loads it."""
    environment = {**os.environ, "DCN_TVM_CACHE_DIR": str(tmp_path / "cache"), "DCN_TVM_LOCK_TIMEOUT": "20"}
    environment.pop("DCN_TVM_NO_DISK_CACHE", None)
    result = subprocess.run([sys.executable, "-c", FORK_CHILD], env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["child", "exit", "10"], result.stdout + result.stderr[-3000:]


# --- 7: a stopped process holding an entry's lock -----------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from dcn_tvm.kernels import cache
cache._lock_entry(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_stopped_lock_holder_is_named_and_waited_for_only_so_long(library, monkeypatch, caplog):
    monkeypatch.setenv("DCN_TVM_LOCK_TIMEOUT", "1")
    lock = library.with_suffix(".lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(library)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        os.kill(holder.pid, signal.SIGSTOP)  # Ctrl-Z, or a debugger's breakpoint
        os.waitpid(holder.pid, os.WUNTRACED)  # until it has stopped
        result, start = [], time.monotonic()
        with pytest.warns(UserWarning, match=rf"{lock} is still held by process {holder.pid} \(stopped\) after 1 s "
                                             rf"\(stopped, or stuck\?\); compiling {SPEC.key} in memory"):
            waiter = threading.Thread(target=lambda: result.append(cache._from_disk(SPEC, library)), daemon=True)
            waiter.start()
            waiter.join(timeout=60)
        assert result, "still waiting for the stopped process after 60 s"
        assert time.monotonic() - start < 30
        run_scatter(result[0])
        assert f"waiting for {lock}, held by process {holder.pid} (stopped); giving up after 1 s" in caplog.text
        assert not library.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_the_lock_timeout_must_be_seconds(monkeypatch, value):
    from dcn_tvm import env

    monkeypatch.setenv("DCN_TVM_LOCK_TIMEOUT", value)
    with pytest.raises(ValueError, match=rf"DCN_TVM_LOCK_TIMEOUT={value!r} is not a number of seconds >= 0"):
        env.lock_timeout()


# --- 9: no home directory -----------------------------------------------------------------------------

NO_HOME = """
import os, pwd, torch

def no_entry(uid):
    raise KeyError(f"getpwuid(): uid not found: {uid}")

pwd.getpwuid = no_entry  # an arbitrary container uid: no passwd entry (and no HOME)
from dcn_tvm import env
from dcn_tvm.kernels import cache
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_key
""" + RUN_SCATTER + """
spec = KernelSpec("deform_conv2d", "scatter", None, (), target_key(torch.device("cpu")))
run_scatter(cache.get_kernel(spec))
print(env.cache_dir(), len(list(env.cache_dir().rglob("*.so"))), flush=True)
if os.geteuid() == 0:  # that folder taken by another user: not used
    os.chown(env.cache_dir(), 65534, 65534)
    cache._kernels.clear()
    run_scatter(cache.get_kernel(spec))
"""


@pytest.mark.slow  # a fresh interpreter that imports TVM: about 12 s
def test_without_a_home_directory_kernels_are_cached_in_a_temp_folder_of_the_user(tmp_path):
    environment = {**os.environ, "TMPDIR": str(tmp_path)}
    for name in ("HOME", "XDG_CACHE_HOME", "DCN_TVM_CACHE_DIR", "DCN_TVM_NO_DISK_CACHE"):
        environment.pop(name, None)
    result = subprocess.run([sys.executable, "-c", NO_HOME], env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / f"dcn_tvm-{os.geteuid()}"
    assert result.stdout.split()[-2:] == [str(folder), "1"]
    if ROOT:
        assert f"{folder} is owned by uid {NOBODY}" in result.stderr and "in memory" in result.stderr


# --- 12: a bounded number of kernels in memory --------------------------------------------------------

@pytest.fixture
def fresh_memory(monkeypatch):
    """An empty in-process cache of at most two kernels."""
    monkeypatch.setattr(cache, "_kernels", OrderedDict())
    monkeypatch.setattr(cache, "_dropped", set(), raising=False)
    monkeypatch.setenv("DCN_TVM_KERNELS_IN_MEMORY", "2")


def test_the_least_recently_used_kernel_is_dropped_beyond_the_bound(fresh_memory, monkeypatch, caplog):
    resolved = []
    monkeypatch.setattr(cache, "_resolve", lambda spec: resolved.append(spec.stage) or object())
    specs = {stage: KernelSpec("deform_conv2d", stage, None, (), TARGET) for stage in "abcd"}
    kernels = {stage: cache.get_kernel(specs[stage]) for stage in "abc"}
    assert list(cache._kernels) == [specs["b"].key, specs["c"].key]
    assert cache.get_kernel(specs["b"]) is kernels["b"]  # b is now the most recently used: d drops c
    cache.get_kernel(specs["d"])
    assert list(cache._kernels) == [specs["b"].key, specs["d"].key]
    assert "raise the bound" not in caplog.text
    cache.get_kernel(specs["a"])
    assert resolved == ["a", "b", "c", "d", "a"]
    assert f"{specs['a'].key} was dropped from the 2 kernels this process keeps" in caplog.text


def _mapped(library: Path) -> bool:
    return library.name in Path("/proc/self/maps").read_text()


def test_a_dropped_kernel_runs_while_held_is_unloaded_when_released_and_loads_again(library, fresh_memory,
                                                                                    compiled, monkeypatch):
    monkeypatch.setenv("DCN_TVM_KERNELS_IN_MEMORY", "1")
    store(library)
    compiled.clear()
    held = cache.get_kernel(SPEC)
    assert _mapped(library) and compiled == []
    run_scatter(cache.get_kernel(SPEC64), torch.float64)  # drops SPEC's kernel
    assert list(cache._kernels) == [SPEC64.key]
    assert _mapped(cache.cache_path(SPEC64))  # compiled, stored, and served from the stored library
    run_scatter(held)  # a caller's reference keeps its library loaded
    del held
    gc.collect()
    assert not _mapped(library)
    run_scatter(cache.get_kernel(SPEC))  # back from the disk cache
    assert compiled == [SPEC64.key]


@pytest.mark.parametrize("value", ["0", "-3", "many", "1.5"])
def test_the_kernel_bound_must_be_a_whole_number(monkeypatch, value):
    from dcn_tvm import env

    monkeypatch.setenv("DCN_TVM_KERNELS_IN_MEMORY", value)
    with pytest.raises(ValueError, match=rf"DCN_TVM_KERNELS_IN_MEMORY={value!r} is not a whole number >= 1"):
        env.kernels_in_memory()


# --- 20: staged files of a killed writer --------------------------------------------------------------

def test_stale_staged_files_are_removed_when_the_folder_is_next_written(library, compiled):
    library.parent.mkdir(parents=True)
    old = [library.parent / f"other_entry_x1y2z3w4{suffix}.tmp" for suffix in (".so", ".sha256.json")]
    fresh = library.parent / "in_flight_a1b2c3d4.so.tmp"  # another process's write, still going
    for path in [*old, fresh]:
        path.write_bytes(b"partial")
    stale = time.time() - 3600
    for path in old:
        os.utime(path, (stale, stale))
    run_scatter(cache._from_disk(SPEC, library))
    assert compiled == [SPEC.key] and library.exists()
    assert not any(path.exists() for path in old) and fresh.exists()
    assert sorted(path.name for path in library.parent.glob("*.tmp")) == [fresh.name]
