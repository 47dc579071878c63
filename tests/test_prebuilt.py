"""Prebuilt packages: built once, loaded without the compiler, verified before use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dcn_tvm.geometry.conv import ConvGeometry
from dcn_tvm.kernels import cache
from dcn_tvm.kernels import manifest as mf
from dcn_tvm.kernels import prebuilt as loader
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_key
from dcn_tvm.prebuilt.build import build_package

GEOMETRY = ConvGeometry(4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, 1, True, "float32")
STAGES = ("forward", "backward_data", "backward_weight")
TESTS = Path(__file__).resolve().parent


def spec(stage="forward", sizes=(("n", 2), ("h", 7), ("w", 9))):
    return KernelSpec("deform_conv2d", stage, GEOMETRY, sizes, target_key(torch.device("cpu")))


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("prebuilt")
    build_package([spec(stage) for stage in STAGES], "llvm", out)
    return out


@pytest.fixture
def copy(package, tmp_path):
    """A private copy of the package folder, free to tamper with."""
    shutil.copytree(package, tmp_path / "pkg")
    return tmp_path / "pkg"


def _package_root(out: Path) -> Path:
    return next(out.glob(f"*/{mf.MANIFEST}")).parent


def run_without_compiler(code: str, **extra_env) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter in which `import tvm` fails."""
    prelude = "import sys; sys.modules['tvm'] = None\n"
    environment = {**os.environ, "PYTHONPATH": str(TESTS), **extra_env}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=environment,
                          capture_output=True, text=True, timeout=300)


def test_package_layout(package):
    root = _package_root(package)
    manifest = json.loads((root / mf.MANIFEST).read_text())
    assert {lib["isa"] for lib in manifest["libraries"]} == set(mf.CPU_LEVELS)
    assert spec().workload_key in manifest["kernels"] and spec().symbolic().workload_key in manifest["kernels"]
    # the scatter that takes this layer's column gradient (channels-last on the CPU for a 3x3 kernel)
    assert "deform_conv2d_scatter_channels_last_float32" in manifest["kernels"]
    assert "runtime/libtvm_runtime.so" in manifest["files"]
    assert (package / "pyproject.toml").is_file()


# torch imports torch._dynamo on the first call of any Python custom op (about 1 s on 2 busy cores),
# whoever defines it: imported before the clock starts, so the time is dcn_tvm's own.
COLD_CALL = """
import time, torch
import torch._dynamo
import dcn_tvm
x, offset, weight = torch.randn(2, 4, 7, 9), torch.randn(2, 18, 7, 9), torch.randn(6, 2, 3, 3)
start = time.perf_counter()
dcn_tvm.deform_conv2d(x, offset, weight, padding=1, mask=torch.rand(2, 9, 7, 9))
print(time.perf_counter() - start)
"""


def test_cold_load_under_a_second(package, tmp_path):
    """Loading, verifying and calling a packaged kernel in a fresh process; best of 3 against noise."""
    times = []
    for _ in range(3):
        result = run_without_compiler(COLD_CALL, DCN_TVM_PREBUILT=str(package), DCN_TVM_CACHE_DIR=str(tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        times.append(float(result.stdout.split()[-1]))
    assert min(times) < 1.0, times


def test_runs_without_the_compiler(package, tmp_path):
    result = run_without_compiler(
        """
        import torch
        from reference import deform_conv2d_loops
        import dcn_tvm
        gen = torch.Generator().manual_seed(0)
        for n, h, w in [(2, 7, 9), (1, 5, 11)]:  # the built shape, then one served by the symbolic kernels
            x = torch.randn(n, 4, h, w, generator=gen, requires_grad=True)
            offset = torch.randn(n, 18, h, w, generator=gen) * 2
            mask = torch.rand(n, 9, h, w, generator=gen)
            weight = torch.randn(6, 2, 3, 3, generator=gen)
            out = dcn_tvm.deform_conv2d(x, offset, weight, padding=1, mask=mask)
            expected = deform_conv2d_loops(x, offset, weight, padding=(1, 1), mask=mask)
            assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-5
            out.sum().backward()
            assert torch.isfinite(x.grad).all()
        import sys
        assert sys.modules["tvm"] is None
        """,
        DCN_TVM_PREBUILT=str(package), DCN_TVM_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "cache").exists(), "nothing may be compiled or cached"


@pytest.mark.slow
def test_attention_and_dcnv4_packages_run_without_the_compiler(package, tmp_path):
    """A package of an ms_deform_attn and a DCNv4 workload (the kernels `dcn-tvm build` expands them to:
    static and symbolic, the value-gradient scatter) serves both ops, forward and backward, at the built
    sizes and at other batch, query and image sizes, with no compiler: outputs against the loops, gradients against autograd of the
    grid_sample formulations. Then, in the same process, a kernel of a second package (the conv's), which
    carries its own copy of TVM's runtime as every package does (a GPU host loads a CUDA and a CPU package
    so): the runtime already loaded serves it (a second copy aborts the process, "Global Function ... is
    already registered")."""
    from dcn_tvm.kernels.workloads import Workload

    texts = ["ms_deform_attn:n=1,q=6,levels=5x7+3x4,heads=2,head_dim=4,points=3",
             "dcnv3:n=1,h=5,w=6,group=2,group_channels=4,packed=1"]
    cpu = target_key(torch.device("cpu"))
    build_package([task.spec for text in texts for task in Workload.parse(text).tasks(cpu)], "llvm", tmp_path / "pkg")
    result = run_without_compiler(
        """
        import sys, torch
        from reference_dcnv3 import dcnv3_grid_sample, dcnv3_loops, unpack_offset_mask
        from reference_ms_deform_attn import ms_deform_attn_grid_sample, ms_deform_attn_loops
        from reference import deform_conv2d_loops
        import dcn_tvm

        def error(a, b):
            return ((a.double() - b.double()).norm() / b.double().norm()).item()

        gen = torch.Generator().manual_seed(0)
        for n, q in [(1, 6), (2, 3)]:  # the level shapes are the kernels' own: the built ones
            levels = [[5, 7], [3, 4]]
            shapes = torch.tensor(levels)
            starts = torch.tensor([0, levels[0][0] * levels[0][1]])
            value = torch.randn(n, int(shapes.prod(1).sum()), 2, 4, generator=gen, requires_grad=True)
            locations = (torch.rand(n, q, 2, 2, 3, 2, generator=gen) * 1.4 - 0.2).requires_grad_()
            weights = torch.rand(n, q, 2, 2, 3, generator=gen, requires_grad=True)
            out = dcn_tvm.ms_deform_attn(value, shapes, starts, locations, weights)
            assert error(out, ms_deform_attn_loops(value, shapes, locations, weights)) < 1e-5
            expected = ms_deform_attn_grid_sample(value, shapes, locations, weights)
            for ours, theirs in zip(torch.autograd.grad(out.sum(), (value, locations, weights)),
                                    torch.autograd.grad(expected.sum(), (value, locations, weights))):
                assert error(ours, theirs) < 1e-4
        for n, h, w in [(1, 5, 6), (2, 4, 7)]:
            x = torch.randn(n, h, w, 8, generator=gen, requires_grad=True)
            packed = (torch.randn(n, h, w, 56, generator=gen)).requires_grad_()
            out = dcn_tvm.dcnv4_core(x, packed, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0)
            offset, mask = unpack_offset_mask(packed, 2, 9)
            arguments = ((3, 3), (1, 1), (1, 1), (1, 1), 2, 1.0)
            assert error(out, dcnv3_loops(x, offset, mask, *arguments)) < 1e-5
            ours = torch.autograd.grad(out.sum(), (x, packed))
            theirs = torch.autograd.grad(dcnv3_grid_sample(x, offset, mask, *arguments).sum(), (x, packed))
            assert all(error(a, b) < 1e-4 for a, b in zip(ours, theirs))
        x, offset, weight = torch.randn(2, 4, 7, 9), torch.randn(2, 18, 7, 9), torch.randn(6, 2, 3, 3)
        mask = torch.rand(2, 9, 7, 9)
        out = dcn_tvm.deform_conv2d(x, offset, weight, padding=1, mask=mask)
        assert error(out, deform_conv2d_loops(x, offset, weight, padding=(1, 1), mask=mask)) < 1e-5
        assert sys.modules["tvm"] is None
        """,
        DCN_TVM_PREBUILT=f"{tmp_path / 'pkg'}{os.pathsep}{package}", DCN_TVM_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "cache").exists(), "nothing may be compiled or cached"


def test_cuda_kernel_questions_need_no_compiler():
    """The ops ask the CUDA schedules for their position tile and layout before any kernel is found (a
    prebuilt CUDA package's host has no compiler): importing them registered the tensor intrinsics,
    which needs TVM."""
    result = run_without_compiler(
        """
        from dcn_tvm import schedules
        print(schedules.position_tile("deform_conv2d", "cuda"), schedules.compute_options("deform_conv2d", "cuda"))
        """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == "64"


def test_missing_kernel_without_compiler_names_the_commands(package, tmp_path):
    result = run_without_compiler(
        """
        import torch, dcn_tvm
        dcn_tvm.deform_conv2d(torch.randn(1, 3, 5, 5), torch.randn(1, 18, 5, 5), torch.randn(3, 3, 3, 3), padding=1)
        """,
        DCN_TVM_PREBUILT=str(package), DCN_TVM_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert result.returncode != 0
    assert "KernelUnavailable: no kernel for deform_conv2d_forward_float32_c3_o3" in result.stderr
    assert "dcn-tvm build --target llvm --workload 'deform_conv2d:n=1,c=3,h=5,w=5,o=3" in result.stderr


@pytest.fixture
def use_package(monkeypatch):
    """Point DCN_TVM_PREBUILT at a folder for this test, with fresh process caches before and after."""
    def use(folder):
        monkeypatch.setenv("DCN_TVM_PREBUILT", str(folder))
        loader.packages.cache_clear()
    yield use
    monkeypatch.delenv("DCN_TVM_PREBUILT", raising=False)
    loader.packages.cache_clear()
    cache._kernels.clear()


class Compiled(Exception):
    """Raised by the stub compiler: proves resolution reached the compile step."""


def test_resolution_prefers_prebuilt_then_compiles(package, use_package, monkeypatch):
    use_package(package)
    compiled = []

    def stub_compiler(kernel_spec):
        compiled.append(kernel_spec.key)
        raise Compiled

    monkeypatch.setattr(cache, "_compile", stub_compiler)
    assert cache.get_kernel(spec()) is not None
    assert cache.get_kernel(spec(sizes=(("n", 3), ("h", 4), ("w", 4)))) is not None  # its symbolic twin
    assert compiled == []
    other = KernelSpec("deform_conv2d", "forward", ConvGeometry(8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, False,
                                                                "float32"), (("n", 1), ("h", 5), ("w", 5)), spec().target)
    with pytest.raises(Compiled):
        cache.get_kernel(other)
    assert compiled == [other.key]


def test_tampered_file_is_refused(copy, use_package):
    library = next((_package_root(copy) / "lib").glob("*.so"))
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    use_package(copy)
    with pytest.raises(loader.PrebuiltError, match=r"sha256 .* does not match the manifest"):
        loader.packages()


def _edit_manifest(copy, edit):
    path = _package_root(copy) / mf.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_other_version_is_refused_unless_allowed(copy, use_package, monkeypatch):
    _edit_manifest(copy, lambda m: m["versions"].update({"dcn_tvm": "9.9.9"}))
    use_package(copy)
    with pytest.raises(loader.PrebuiltError, match="built with dcn_tvm 9.9.9, running"):
        loader.packages()
    monkeypatch.setenv("DCN_TVM_ALLOW_VERSION_MISMATCH", "1")
    loader.packages.cache_clear()
    with pytest.warns(UserWarning, match="built with dcn_tvm 9.9.9"):
        assert len(loader.packages()) == 1


def test_other_gpu_arch_is_refused(copy, use_package):
    root = _package_root(copy)
    shutil.copy(next((root / "lib").glob("*.so")), root / "lib" / "x.so")
    shutil.copy(root / "runtime" / "libtvm_runtime.so", root / "runtime" / "libtvm_runtime_cuda.so")

    def add_cuda(manifest):  # a CUDA library, and the CUDA runtime a package with one must hash
        manifest["libraries"].append({"kind": "cuda", "arch": "sm_90", "file": "lib/x.so", "target": "cuda-sm_90"})
        for name in ("lib/x.so", "runtime/libtvm_runtime_cuda.so"):
            manifest["files"][name] = mf.sha256(root / name)

    _edit_manifest(copy, add_cuda)
    use_package(copy)
    (package,) = loader.packages()
    with pytest.raises(loader.PrebuiltError, match=r"built for CUDA \['sm_90'\], but this GPU is sm_80"):
        package.library_for("cuda-sm_80")


def test_cpu_level_the_cpu_lacks_is_never_loaded(copy, use_package, monkeypatch):
    use_package(copy)
    (package,) = loader.packages()
    monkeypatch.setattr(mf, "cpu_flags", lambda: frozenset({"sse2", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe",
                                                            "abm", "xsave"}))
    assert package.library_for("llvm-host")["isa"] == "x86-64-v3"
    monkeypatch.setattr(mf, "cpu_flags", lambda: frozenset({"sse2"}))
    with pytest.raises(loader.PrebuiltError, match="which this CPU cannot run"):
        package.library_for("llvm-host")


def test_world_writable_location_warns(copy, use_package):
    lib = _package_root(copy) / "lib"
    lib.chmod(0o777)
    use_package(copy)
    with pytest.warns(UserWarning, match="is world-writable"):
        loader.packages()


def test_pip_installs_and_is_found_by_entry_point(package, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(package)], check=True, timeout=300)
    result = run_without_compiler(
        """
        from dcn_tvm.kernels import prebuilt as loader
        print([p.root.name for p in loader.packages()])
        """,
        PYTHONPATH=f"{target}{os.pathsep}{TESTS}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dcn_tvm_prebuilt_llvm" in result.stdout


def _library_entry(manifest, kind="llvm"):
    return next(lib for lib in manifest["libraries"] if lib["kind"] == kind)


def test_a_library_the_manifest_does_not_hash_is_refused(copy, use_package):
    def unlist(manifest):
        del manifest["files"][_library_entry(manifest)["file"]]

    _edit_manifest(copy, unlist)
    use_package(copy)
    with pytest.raises(loader.PrebuiltError, match=r"manifest\.json: libraries\[\d\] names 'lib/.*\.so', which "
                                                   r"'files' does not list"):
        loader.packages()


@pytest.mark.parametrize("where", ["absolute", "parent", "symlink"])
def test_files_outside_the_package_are_refused_even_if_hashed(copy, use_package, tmp_path, where):
    """A manifest may only name files inside its package, after resolving symlinks."""
    root = _package_root(copy)
    manifest = json.loads((root / mf.MANIFEST).read_text())
    outside = tmp_path / "outside.so"
    shutil.copy(root / _library_entry(manifest)["file"], outside)
    name = {"absolute": str(outside), "parent": os.path.relpath(outside, root), "symlink": "lib/link.so"}[where]
    if where == "symlink":
        (root / name).symlink_to(outside)

    def point_outside(manifest):
        _library_entry(manifest)["file"] = name
        manifest["files"][name] = mf.sha256(outside)

    _edit_manifest(copy, point_outside)
    use_package(copy)
    with pytest.raises(loader.PrebuiltError, match=rf"manifest\.json: {name!r} is outside the package"):
        loader.packages()


@pytest.mark.parametrize("key", ["format", "versions", "files", "libraries", "kernels", "libraries[0].kind",
                                 "libraries[0].file", "libraries[0].isa"])
def test_a_manifest_missing_a_key_names_it(copy, use_package, key):
    def remove(manifest):
        container, _, name = key.rpartition(".")
        del (manifest["libraries"][0] if container else manifest)[name]

    _edit_manifest(copy, remove)
    use_package(copy)
    path = _package_root(copy) / mf.MANIFEST
    with pytest.raises(loader.PrebuiltError, match=rf"{path}: .*no {key.rpartition('.')[2]!r} key"):
        loader.packages()
