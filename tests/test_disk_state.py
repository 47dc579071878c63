"""Nothing on disk can crash or poison dcn_tvm: damaged or unwritable kernel caches, environment
variables. Damaged caches are tried in fresh interpreters, where a crash (SIGBUS) cannot kill pytest.
And the suite leaves nothing on disk: its private kernel cache goes when it ends."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from dcn_tvm import env
from dcn_tvm.kernels import cache

TESTS = Path(__file__).resolve().parent

# One small forward kernel, checked against the float64 loops; prints how many kernels it compiled.
CHILD = """
import torch, dcn_tvm
from dcn_tvm.kernels import cache
from reference import deform_conv2d_loops
compiled = []
original = cache._compile
cache._compile = lambda spec: compiled.append(spec.key) or original(spec)
gen = torch.Generator().manual_seed(0)
x, offset, weight = torch.randn(1, 4, 6, 6, generator=gen), torch.randn(1, 18, 6, 6, generator=gen), \\
    torch.randn(4, 4, 3, 3, generator=gen)
out = dcn_tvm.deform_conv2d(x, offset, weight, padding=1)
expected = deform_conv2d_loops(x, offset, weight, padding=(1, 1))
assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-5
print("compiled", len(compiled))
"""


def run_child(cache_dir: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(TESTS), "DCN_TVM_CACHE_DIR": str(cache_dir)}
    environment.pop("DCN_TVM_NO_DISK_CACHE", None)
    return subprocess.run([sys.executable, "-c", CHILD], env=environment, capture_output=True, text=True,
                          timeout=600)


def compiles(result: subprocess.CompletedProcess) -> int:
    assert result.returncode == 0, f"rc {result.returncode}\n{result.stderr[-3000:]}"
    return int(result.stdout.split()[-1])


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """A cache folder holding the child's kernel."""
    folder = tmp_path_factory.mktemp("filled")
    assert compiles(run_child(folder)) == 1
    return folder


@pytest.fixture
def copy(filled, tmp_path):
    shutil.copytree(filled, tmp_path / "cache")
    return tmp_path / "cache"


def _library(folder: Path) -> Path:
    (library,) = folder.rglob("*.so")
    return library


DAMAGE = {
    "truncated to 50%": lambda data: data[:len(data) // 2],
    "truncated to 25%": lambda data: data[:len(data) // 4],
    "truncated to 10%": lambda data: data[:len(data) // 10],
    "emptied": lambda data: b"",
    "garbage": lambda data: os.urandom(len(data)),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_recompiled_with_a_warning(copy, damage):
    library = _library(copy)
    library.write_bytes(DAMAGE[damage](library.read_bytes()))
    result = run_child(copy)
    assert compiles(result) == 1
    assert f"{library}" in result.stderr and "recompiling" in result.stderr
    assert cache._load(library) is not None  # the recompiled entry verifies


def test_an_entry_without_its_checksum_is_never_loaded(copy):
    library = _library(copy)
    cache.checksum_path(library).unlink()
    result = run_child(copy)
    assert compiles(result) == 1 and str(library) in result.stderr
    assert cache._load(library) is not None


def test_the_check_is_against_the_recorded_checksum(copy):
    """A library of the right size with other bytes fails the sha256 check."""
    library = _library(copy)
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    assert cache._load(library) is None


@contextmanager
def unwritable(folder: Path):
    """Make `folder` unwritable, also for root: chattr +i (root, ext2/3/4, xfs, btrfs), else chmod."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                           capture_output=True).returncode != 0:
            pytest.skip("running as root and chattr +i does not work here")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


def test_a_read_only_cache_serves_its_kernels_and_compiles_new_ones_in_memory(copy):
    target_folder = _library(copy).parent
    with unwritable(target_folder):
        assert compiles(run_child(copy)) == 0  # a kernel it holds loads without writing
    _library(copy).unlink()
    with unwritable(target_folder):
        result = run_child(copy)
        assert compiles(result) == 1
        assert "compiling" in result.stderr and "in memory" in result.stderr and str(target_folder) in result.stderr
    assert not list(target_folder.glob("*.so"))


def test_a_cache_folder_that_cannot_be_created_compiles_in_memory(tmp_path):
    (tmp_path / "file").write_text("a regular file, so no folder can be made under it")
    result = run_child(tmp_path / "file" / "cache")
    assert compiles(result) == 1
    assert "in memory" in result.stderr and str(tmp_path / "file" / "cache") in result.stderr


# --- environment variables ------------------------------------------------------------------------------

FLAGS = {"DCN_TVM_NO_DISK_CACHE": lambda: not env.disk_cache_enabled(),
         "DCN_TVM_ALLOW_VERSION_MISMATCH": env.allow_version_mismatch}


@pytest.mark.parametrize("name", FLAGS)
@pytest.mark.parametrize("value, expected", [("1", True), ("TRUE", True), ("yes", True), ("On", True),
                                             ("0", False), ("false", False), ("NO", False), ("off", False),
                                             ("", False)])
def test_boolean_variables_accept_booleans(monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    assert FLAGS[name]() is expected


@pytest.mark.parametrize("name", FLAGS)
@pytest.mark.parametrize("value", ["maybe", "2", "y e s", "enabled"])
def test_boolean_variables_refuse_anything_else(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"{name}={value!r} is not a boolean: use 1/0, true/false, yes/no or "
                                         rf"on/off \(any case; empty means unset\)"):
        FLAGS[name]()


def test_boolean_variables_unset_are_false(monkeypatch):
    for name in FLAGS:
        monkeypatch.delenv(name, raising=False)
    assert env.disk_cache_enabled() and not env.allow_version_mismatch()


def test_the_suites_private_kernel_cache_is_removed_at_its_end(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env_vars = {k: v for k, v in os.environ.items() if k != "DCN_TVM_CACHE_DIR"} | {"TMPDIR": str(scratch)}
    one_test = f"{Path(__file__).name}::test_boolean_variables_unset_are_false"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", one_test], cwd=TESTS,
                          env=env_vars, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout
    assert not list(scratch.glob("dcn_tvm_test_cache_*"))
