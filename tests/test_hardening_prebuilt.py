"""Prebuilt packages and the build/tune command line under attack and misuse (issue 22, items 3, 5, 10, 11,
16, 17, 18, 21): every library a package loads is verified, damaged manifests and unusable folders are
clear errors, a rebuild never loses the package it replaces."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from dcn_tvm.__main__ import main
from dcn_tvm.geometry.conv import ConvGeometry
from dcn_tvm.kernels import records
from dcn_tvm.kernels import manifest as mf
from dcn_tvm.kernels import prebuilt as loader
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_key
from dcn_tvm.prebuilt import build
from test_prebuilt import run_without_compiler, use_package  # noqa: F401  (use_package: a fixture)

WORKLOAD = "deform_conv2d:n=1,c=4,h=5,w=5,o=4,k=3,pad=1"
GEOMETRY = ConvGeometry(4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, False, "float32")


def spec(geometry=GEOMETRY, stage="forward"):
    return KernelSpec("deform_conv2d", stage, geometry, (("n", 1), ("h", 5), ("w", 5)), target_key(torch.device("cpu")))


#: The kernel the fixture's build finds a tuned record for (the others take the default schedule).
TUNED = spec().workload_key


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the --out folder, the build's output) of `dcn-tvm build` for WORKLOAD with an empty records folder,
    where one kernel's record is made to exist (records.tuned_schedule answers for it)."""
    from dcn_tvm._tvm import tvm

    out, logs = tmp_path_factory.mktemp("built"), tmp_path_factory.mktemp("logs")
    real = records.tuned_schedule

    def tuned_schedule(kernel_spec, func, root=None):
        return tvm().s_tir.Schedule(func) if kernel_spec.workload_key == TUNED else real(kernel_spec, func, root)

    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(output):
        patch.setattr(records, "tuned_schedule", tuned_schedule)
        patch.delenv("DCN_TVM_TUNING_LOGS", raising=False)  # restored after `build --logs` sets it
        assert main(["build", "--workload", WORKLOAD, "--logs", str(logs), "--out", str(out / "pkg")]) == 0
    return out / "pkg", output.getvalue()


@pytest.fixture(autouse=True)
def records_folder_restored(monkeypatch):
    """`dcn-tvm build --logs` points this process at its records folder: undone after each test."""
    monkeypatch.delenv("DCN_TVM_TUNING_LOGS", raising=False)


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of the --out folder, free to tamper with."""
    shutil.copytree(built[0], tmp_path / "pkg")
    return tmp_path / "pkg"


def root_of(out: Path) -> Path:
    (manifest,) = out.glob(f"*/{mf.MANIFEST}")
    return manifest.parent


def edit_manifest(out: Path, edit) -> Path:
    path = root_of(out) / mf.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return path


# -- 3: the runtime library is verified like the kernels ---------------------------------------------------

HOSTILE_C = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { fclose(fopen(MARKER, "w")); }
"""

SWAPPED_RUNTIME = """
import os, shutil
from pathlib import Path
from dcn_tvm.kernels import prebuilt as loader
from test_hardening_prebuilt import spec

def attempt(folder, swap_after_verifying):
    os.environ["DCN_TVM_PREBUILT"] = folder
    loader.packages.cache_clear()
    runtime = loader._package_root(Path(folder)) / "runtime" / "libtvm_runtime.so"
    if not swap_after_verifying:
        shutil.copy(os.environ["HOSTILE"], runtime)
    try:
        loader.packages()
        if swap_after_verifying:
            shutil.copy(os.environ["HOSTILE"], runtime)
        loader.find_kernel(spec())
    except loader.PrebuiltError as error:
        print("refused:", str(error).splitlines()[0])
    else:
        print("loaded")

attempt(os.environ["UNHASHED"], swap_after_verifying=False)
attempt(os.environ["HASHED"], swap_after_verifying=True)
maps = open("/proc/self/maps").read()
print("runtime mapped:", "libtvm_runtime" in maps, "marker:", os.path.exists(os.environ["MARKER"]))
"""


def test_an_unverified_runtime_is_never_loaded(built, tmp_path):
    """Without apache-tvm the package's own libtvm_runtime.so is loaded: a runtime the manifest does not hash
    refuses the package, one swapped after verification is refused as it loads; its constructor never runs."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the planted library")
    marker, hostile = tmp_path / "constructor-ran", tmp_path / "hostile.so"
    (tmp_path / "hostile.c").write_text(HOSTILE_C)
    subprocess.run([compiler, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(hostile),
                    str(tmp_path / "hostile.c")], check=True, timeout=60)
    unhashed, hashed = tmp_path / "unhashed", tmp_path / "hashed"
    shutil.copytree(built[0], unhashed)
    shutil.copytree(built[0], hashed)
    edit_manifest(unhashed, lambda m: m["files"].pop("runtime/libtvm_runtime.so"))
    result = run_without_compiler(SWAPPED_RUNTIME, UNHASHED=str(unhashed), HASHED=str(hashed), HOSTILE=str(hostile),
                                  MARKER=str(marker), DCN_TVM_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("refused:") and "runtime/libtvm_runtime.so" in lines[0], lines
    assert lines[1].startswith("refused:") and "libtvm_runtime.so" in lines[1], lines
    assert lines[2] == "runtime mapped: False marker: False", lines


@pytest.mark.parametrize("runtime", ["libtvm_runtime.so", "libtvm_runtime_cuda.so"])
def test_a_package_without_its_runtime_hashed_is_refused(copy, use_package, runtime):
    """Every package needs libtvm_runtime.so hashed; one with a CUDA library, libtvm_runtime_cuda.so too."""
    def unhash(manifest):
        manifest["files"].pop(f"runtime/{runtime}", None)
        if runtime == "libtvm_runtime_cuda.so":
            manifest["libraries"].append({"kind": "cuda", "arch": "sm_90", "file": manifest["libraries"][0]["file"]})

    edit_manifest(copy, unhash)
    use_package(copy)
    with pytest.raises(loader.PrebuiltError, match=rf"manifest\.json: 'files' does not list runtime/{re.escape(runtime)}"):
        loader.packages()


# -- 5: a package inside a folder anyone may rename entries of --------------------------------------------

@pytest.mark.parametrize("mode, warns", [(0o777, True), (0o1777, False)])
def test_a_world_writable_ancestor_warns_unless_sticky(built, tmp_path, use_package, mode, warns):
    shared = tmp_path / "shared"
    shutil.copytree(built[0], shared / "deeper" / "pkg")
    shared.chmod(mode)
    use_package(shared / "deeper" / "pkg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader.packages()
    messages = [str(warning.message) for warning in caught]
    if warns:
        assert any(f"{shared} is world-writable" in message for message in messages), messages
    else:
        assert messages == []


# -- 16: a kernel the manifest lists but the library lacks ------------------------------------------------

def test_a_kernel_missing_from_its_library_names_it(copy, use_package):
    other = spec(ConvGeometry(4, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, False, "float32"))
    edit_manifest(copy, lambda m: m["kernels"].update({other.workload_key: {}}))
    use_package(copy)
    (package,) = loader.packages()
    with pytest.raises(loader.PrebuiltError, match=rf"{re.escape(str(package.root))}: lib/llvm-x86-64-v\d\.so has "
                                                   rf"no kernel {other.workload_key}"):
        package.find(other)


# -- 17: manifest fields of the wrong type ---------------------------------------------------------------

def _set(field, value):
    def edit(manifest):
        container, _, name = field.rpartition(".")
        (manifest["libraries"][0] if container else manifest)[name] = value
    return edit


@pytest.mark.parametrize("field, value, named", [
    ("files", [], "'files'"),
    ("versions", ["dcn_tvm"], "'versions'"),
    ("kernels", None, "'kernels'"),
    ("libraries", {"file": "lib/x.so"}, "'libraries'"),
    ("format", True, "'format'"),
    ("versions", {"dcn_tvm": 1}, r"'versions'\['dcn_tvm'\]"),
    ("files", {"lib/x.so": None}, r"'files'\['lib/x\.so'\]"),
    ("libraries.file", ["lib/x.so"], r"libraries\[0\]\['file'\]"),
    ("libraries.kind", None, r"libraries\[0\]\['kind'\]"),
    ("libraries.isa", 4, r"libraries\[0\]\['isa'\]"),
])
def test_a_manifest_field_of_the_wrong_type_names_it(copy, use_package, field, value, named):
    path = edit_manifest(copy, _set(field, value))
    use_package(copy)
    with pytest.raises(loader.PrebuiltError, match=rf"{re.escape(str(path))}: {named} is "):
        loader.packages()


# -- 10, 18, 21: what `dcn-tvm build --out/--logs` and `dcn-tvm tune --logs` refuse -----------------------

def build_command(out, *more):
    return ["build", "--workload", WORKLOAD, "--out", str(out), *more]


def one_line_error(capsys, command: str) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"dcn-tvm {command}: error: "), captured.err
    return captured.err


@pytest.mark.parametrize("foreign", ["pyproject.toml", "notes.txt"])
def test_build_refuses_a_folder_that_is_not_a_package(tmp_path, capsys, foreign):
    (tmp_path / foreign).write_text("[project]\nname = 'mine'\n")
    assert main(build_command(tmp_path)) == 2
    assert str(tmp_path) in one_line_error(capsys, "build")
    assert os.listdir(tmp_path) == [foreign] and (tmp_path / foreign).read_text() == "[project]\nname = 'mine'\n"


def test_build_refuses_a_missing_logs_folder(tmp_path, capsys):
    assert main(build_command(tmp_path / "out", "--logs", str(tmp_path / "no-such"))) == 2
    assert f"--logs {tmp_path / 'no-such'}" in one_line_error(capsys, "build")
    assert not (tmp_path / "out").exists()


def test_build_says_which_kernels_are_tuned(built):
    out, output = built
    said = dict(re.findall(r"scheduled (\S+) \((tuned|default schedule)\)$", output, re.MULTILINE))
    kernels = json.loads((root_of(out) / mf.MANIFEST).read_text())["kernels"]
    assert said == {name: "tuned" if name == TUNED else "default schedule" for name in kernels}, output
    assert len(kernels) == 7 and "1 of 7 kernels tuned" in output, output


@pytest.fixture(params=["under-a-file", "proc", "read-only-mount"])
def unwritable(request, tmp_path, monkeypatch):
    """A folder path no one can create or write, even root: below a regular file, inside /proc, or on a
    read-only file system (simulated: every mkdir below it fails with EROFS)."""
    if request.param == "under-a-file":
        (tmp_path / "file").write_text("")
        return tmp_path / "file" / "out"
    if request.param == "proc":
        return Path("/proc/dcn_tvm_no_such/out")
    mount = tmp_path / "ro"

    def read_only(mkdir):
        """`mkdir`, failing with EROFS for a path below the mount."""
        def refuse_below_mount(path, *args, **kwargs):
            if Path(path).is_relative_to(mount):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return mkdir(path, *args, **kwargs)
        return refuse_below_mount

    monkeypatch.setattr(os, "mkdir", read_only(os.mkdir))
    monkeypatch.setattr(Path, "mkdir", read_only(Path.mkdir))  # Python 3.10's Path.mkdir holds its own os.mkdir
    return mount / "out"


def test_build_into_an_unwritable_place_is_a_one_line_error(unwritable, capsys):
    assert main(build_command(unwritable)) == 2
    one_line_error(capsys, "build")


def test_tune_into_an_unwritable_place_is_a_one_line_error(unwritable, capsys):
    assert main(["tune", "--target", "llvm", "--workload", WORKLOAD, "--stage", "forward", "--trials", "1",
                 "--no-progress", "--logs", str(unwritable)]) == 2
    one_line_error(capsys, "tune")


# -- 11: a rebuild replaces the package only once the new one is complete ---------------------------------

def snapshot(out: Path) -> dict[str, bytes]:
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}


def test_an_interrupted_rebuild_keeps_the_old_package(copy, use_package, monkeypatch):
    before, entries = snapshot(copy), sorted(os.listdir(copy))

    def interrupted(functions, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "compile_functions", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.build_package([spec()], "llvm", copy)
    assert snapshot(copy) == before and sorted(os.listdir(copy)) == entries
    use_package(copy)
    (package,) = loader.packages()
    assert package.find(spec()) is not None


class FakeExecutable:
    """What compile_functions returns, reduced to writing a library file (the swap, not TVM, is on test)."""

    def export_library(self, path):
        Path(path).write_bytes(b"new library")


def test_a_rebuild_in_place_replaces_the_package_whole(copy, use_package, monkeypatch):
    root = root_of(copy)
    (root / "lib" / "stale.so").write_bytes(b"from the old package")
    monkeypatch.setattr(build, "compile_functions", lambda functions, target: FakeExecutable())
    assert build.build_package([spec()], "llvm", copy) == root
    assert not (root / "lib" / "stale.so").exists()
    assert {path.read_bytes() for path in (root / "lib").iterdir()} == {b"new library"}
    assert sorted(os.listdir(copy)) == ["dcn_tvm_prebuilt_llvm", "pyproject.toml"]
    use_package(copy)
    (package,) = loader.packages()
    assert spec().workload_key in package.manifest["kernels"]


# --- a CUDA package must hold compiled code -----------------------------------------------------------

@pytest.mark.parametrize("device_code, refused", [(b"extern \"C\" __global__ void k() {}", True),
                                                  (mf.FATBIN_MAGIC + b"\0sass", False)])
def test_a_cuda_library_holding_source_is_never_packaged(tmp_path, monkeypatch, device_code, refused):
    """Without a GPU driver TVM keeps CUDA kernels as source, which the deployment host could load only with
    the compiler: `dcn-tvm build` refuses such a library (one-line error, exit 2) and writes no package."""
    class Executable:
        def export_library(self, path):
            Path(path).write_bytes(b"\x7fELF host code " + device_code)

    monkeypatch.setattr(build, "compile_functions", lambda functions, target: Executable())
    monkeypatch.setattr(build, "scheduled", lambda spec: None)
    out = tmp_path / "package"
    if refused:
        with pytest.raises(build.CudaSourceError, match="holds CUDA source"):
            build.build_package([spec()], "cuda-sm_90", out)
        assert not any(out.rglob("manifest.json"))
    else:
        build.build_package([spec()], "cuda-sm_90", out)
        assert any(out.rglob("manifest.json"))
