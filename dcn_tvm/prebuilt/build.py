"""Build a prebuilt package (compiler side): compile kernels per target variant, export the libraries,
copy TVM's runtime beside them, write the manifest and render the loader and pyproject from templates/.
"""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
from pathlib import Path

from dcn_tvm._tvm import tvm
from dcn_tvm.kernels import manifest as mf
from dcn_tvm.kernels.build import compile_functions, scheduled
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_config, target_kind
from dcn_tvm.ops.deform_conv2d import scatter_spec as conv_scatter_spec
from dcn_tvm.ops.deform_roi_pool import scatter_spec as roi_scatter_spec
from dcn_tvm.render import render

#: The input-gradient scatter beside each operator's kernels (generic in its sizes).
SCATTER_SPECS = {"deform_conv2d": conv_scatter_spec, "deform_roi_pool": roi_scatter_spec}


def variants(target: str) -> list[dict]:
    """The libraries to build for a `--target` kind: both x86-64 levels for llvm, one arch for CUDA."""
    kind = target_kind(target)
    if kind == "llvm":
        return [{"kind": "llvm", "isa": level, "target": f"llvm-{level}"} for level in mf.CPU_LEVELS]
    if kind == "cuda":
        arch = target.partition("-")[2]
        if not arch.startswith("sm_"):
            raise ValueError(f"a CUDA package needs an arch, e.g. cuda-sm_90; got {target!r}")
        return [{"kind": "cuda", "arch": arch, "target": target}]
    raise ValueError(f"cannot build a package for target {target!r}")


def expand(specs: list[KernelSpec]) -> dict[str, KernelSpec]:
    """Every kernel the package holds: each spec, its symbolic twin (for every other shape) and the
    scatters of each accumulation dtype (atomic and deterministic); keyed by function name."""
    kernels: dict[str, KernelSpec] = {}
    for spec in specs:
        for kernel in (spec, spec.symbolic()):
            kernels.setdefault(kernel.workload_key, kernel)
        if spec.op in SCATTER_SPECS and spec.geometry is not None:
            for deterministic in (False, True):  # the scatters the op asks for
                scatter = SCATTER_SPECS[spec.op](spec.geometry, spec.target, deterministic)
                kernels.setdefault(scatter.workload_key, scatter)
    return kernels


def _describe(spec: KernelSpec) -> dict:
    return {"op": spec.op, "stage": spec.stage, "sizes": dict(spec.sizes),
            "dtype": getattr(spec.geometry, "dtype", spec.acc_dtype),
            "geometry": getattr(spec.geometry, "key", None)}


def build_package(specs: list[KernelSpec], target: str, out: Path, progress=None) -> Path:
    """Write a pip-installable package for `specs` into `out`; returns the package module folder.

    The specs' own target names the tuning records their schedules come from; the libraries are
    compiled for every variant of `target` (see `variants`).
    """
    kernels = expand(specs)
    module = "dcn_tvm_prebuilt_" + target.replace("-", "_").replace(".", "_")
    package = out / module
    if package.exists():
        shutil.rmtree(package)
    (package / "lib").mkdir(parents=True)
    (package / "runtime").mkdir()
    functions = {}
    for name, spec in kernels.items():
        functions[name] = scheduled(spec)
        if progress:
            progress(f"scheduled {name}")
    libraries = []
    for variant in variants(target):
        file = f"lib/{variant['target']}.so"
        executable = compile_functions(functions, variant["target"])
        with tempfile.TemporaryDirectory() as scratch:
            staged = Path(scratch) / "library.so"
            executable.export_library(str(staged))
            shutil.move(staged, package / file)
        libraries.append({**variant, "file": file, "target_json": target_config(variant["target"])})
        if progress:
            progress(f"compiled {file}")
    runtime_folder = Path(tvm().__file__).parent / "lib"
    runtime_names = ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if target_kind(target) == "cuda" else [])
    for name in runtime_names:
        shutil.copy2(runtime_folder / name, package / "runtime" / name)
    versions = {**mf.runtime_versions(), "apache-tvm": tvm().__version__}
    values = dict(distribution=module.replace("_", "-"), module=module, versions=versions,
                  targets=[lib["target"] for lib in libraries], kernel_count=len(kernels))
    (out / "pyproject.toml").write_text(render("prebuilt_pyproject.toml.j2", **values))
    (package / "__init__.py").write_text(render("prebuilt_loader.py.j2", **values))
    files = sorted(path for path in package.rglob("*") if path.is_file() and path.name != mf.MANIFEST)
    manifest = {
        "format": mf.FORMAT,
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "libraries": libraries,
        "kernels": {name: _describe(spec) for name, spec in kernels.items()},
        "files": {str(path.relative_to(package)): mf.sha256(path) for path in files},
    }
    (package / mf.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return package
