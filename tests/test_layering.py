"""Every import inside dcn_tvm/, schedules/ and templates/ points down the layers of docs/design.md.

The layers, lowest first, are declared below module by module; a module may import its own layer and
the layers under it, never one above. Every import counts, at module level or inside a function
(the lazy ones too), and a module the table does not place fails: a new module must be given a layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Package -> its folder (pyproject's package-dir: schedules/ and templates/ ship inside dcn_tvm).
FOLDERS = {"dcn_tvm": ROOT / "dcn_tvm", "dcn_tvm.schedules": ROOT / "schedules", "dcn_tvm.templates": ROOT / "templates"}

#: (layer, its modules), lowest first.
LAYERS = (
    ("TVM gateway", ("dcn_tvm._tvm",)),
    ("base types and settings", (
        "dcn_tvm.env", "dcn_tvm.forksafe", "dcn_tvm.cuda_limits", "dcn_tvm.render", "dcn_tvm.templates",
        "dcn_tvm.geometry", "dcn_tvm.geometry.arguments", "dcn_tvm.geometry.conv", "dcn_tvm.geometry.dtypes",
        "dcn_tvm.geometry.roi_pool",
        "dcn_tvm.geometry.ms_deform_attn", "dcn_tvm.geometry.dcnv3",
    )),
    ("compute and schedules", (
        "dcn_tvm.compute", "dcn_tvm.compute.deform_conv2d", "dcn_tvm.compute.deform_roi_pool",
        "dcn_tvm.compute.indexing",
        "dcn_tvm.schedules", "dcn_tvm.schedules.common", "dcn_tvm.schedules.deform_conv2d_cuda",
        "dcn_tvm.schedules.deform_conv2d_llvm", "dcn_tvm.schedules.deform_roi_pool_cuda",
        "dcn_tvm.schedules.deform_roi_pool_llvm", "dcn_tvm.schedules.wmma", "dcn_tvm.schedules.mma_tf32",
        "dcn_tvm.compute.ms_deform_attn", "dcn_tvm.schedules.ms_deform_attn_cuda", "dcn_tvm.schedules.ms_deform_attn_llvm",
        "dcn_tvm.compute.dcnv3", "dcn_tvm.schedules.dcnv3_cuda", "dcn_tvm.schedules.dcnv3_llvm",
    )),
    ("kernel resolution", (
        "dcn_tvm.kernels", "dcn_tvm.kernels.build", "dcn_tvm.kernels.cache", "dcn_tvm.kernels.manifest",
        "dcn_tvm.kernels.prebuilt", "dcn_tvm.kernels.records", "dcn_tvm.kernels.resources",
        "dcn_tvm.kernels.runtime", "dcn_tvm.kernels.spec", "dcn_tvm.kernels.targets", "dcn_tvm.kernels.workloads",
        "dcn_tvm.kernels.threads",
    )),
    ("torch-facing ops", ("dcn_tvm.ops", "dcn_tvm.ops.deform_conv2d", "dcn_tvm.ops.deform_roi_pool",
                          "dcn_tvm.ops.dispatch", "dcn_tvm.ops.scratch", "dcn_tvm.ops.shapes",
                          "dcn_tvm.ops.onnx_forms", "dcn_tvm.ops.ms_deform_attn", "dcn_tvm.ops.dcnv3")),
    ("tools and the public face", (
        "dcn_tvm", "dcn_tvm.__main__", "dcn_tvm.convert", "dcn_tvm.demo", "dcn_tvm.export", "dcn_tvm.tune",
        "dcn_tvm.models", "dcn_tvm.models.heads", "dcn_tvm.models.resnet", "dcn_tvm.models.deformable_detr",
        "dcn_tvm.prebuilt", "dcn_tvm.prebuilt.build", "dcn_tvm.prebuilt.cli",
        "dcn_tvm.tuning", "dcn_tvm.tuning.cli", "dcn_tvm.tuning.report", "dcn_tvm.tuning.store",
        "dcn_tvm.tuning.target", "dcn_tvm.tuning.tuner", "dcn_tvm.tuning.show",
    )),
)
LAYER = {module: index for index, (_, modules) in enumerate(LAYERS) for module in modules}


def package_modules() -> dict[str, Path]:
    """{module name: source file} of every module of the package."""
    modules = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return dict(sorted(modules.items()))


def imported(module: str, is_package: bool, source: str, known) -> list[tuple[int, str]]:
    """(line, module) of every dcn_tvm module that `source` (the code of `module`) imports, anywhere in
    it. `from X import Y` imports X.Y where that is a module (`known`), else X."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found += [(node.lineno, target) for target in targets if target == "dcn_tvm" or target.startswith("dcn_tvm.")]
    return found


def violations(modules: dict[str, Path], layer: dict[str, int], root: Path = ROOT) -> list[str]:
    """Every module of `modules` ({name: file under `root`}) without a layer, then every import of
    theirs that points to a higher layer or to no module of the package."""
    problems = [f"{name} ({path.relative_to(root)}) has no layer: place it in LAYERS"
                for name, path in modules.items() if name not in layer]
    for name, path in modules.items():
        if name not in layer:
            continue
        for line, target in imported(name, path.name == "__init__.py", path.read_text(), modules):
            where = f"{path.relative_to(root)}:{line}: {name} ({LAYERS[layer[name]][0]})"
            if target not in modules:
                problems.append(f"{where} imports {target}, which is no module of the package")
            elif layer.get(target, -1) > layer[name]:
                problems.append(f"{where} imports {target} ({LAYERS[layer[target]][0]}), a higher layer")
    return problems


def test_every_module_has_one_layer():
    placed = [module for _, modules in LAYERS for module in modules]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    modules = package_modules()
    assert sorted(set(placed) - set(modules)) == [], "LAYERS names modules that do not exist"
    unplaced = [name for name in modules if name not in LAYER]
    assert not unplaced, f"modules without a layer (place them in LAYERS): {unplaced}"


def test_every_import_points_down():
    problems = violations(package_modules(), LAYER)
    assert not problems, "\n".join(problems)


def test_an_import_that_points_up_is_caught(tmp_path):
    """The check itself: an unplaced module, a lazy import up (kernels -> tools), a relative one up
    (resolved in its package) and an import of no module are each reported; downward ones are not."""
    files = {
        "dcn_tvm.kernels.cache": "from dcn_tvm import env\n\n\ndef f():\n    from dcn_tvm.tuning.store import Store\n",
        "dcn_tvm.schedules.common": "import math\n",
        "dcn_tvm.schedules.deform_conv2d_cuda": "from .common import x\nfrom . import common\nfrom ..ops import y\n",
        "dcn_tvm.ops": "",
        "dcn_tvm.env": "import dcn_tvm.nowhere\n",
        "dcn_tvm.tuning.store": "import dcn_tvm.kernels.cache\nfrom dcn_tvm.ops import deform_conv2d\n",
        "dcn_tvm.newcomer": "",
    }
    modules = {}
    for name, text in files.items():
        modules[name] = tmp_path / f"{name}.py"
        modules[name].write_text(text)
    assert violations(modules, LAYER, tmp_path) == [
        "dcn_tvm.newcomer (dcn_tvm.newcomer.py) has no layer: place it in LAYERS",
        "dcn_tvm.kernels.cache.py:5: dcn_tvm.kernels.cache (kernel resolution) imports dcn_tvm.tuning.store "
        "(tools and the public face), a higher layer",
        "dcn_tvm.schedules.deform_conv2d_cuda.py:3: dcn_tvm.schedules.deform_conv2d_cuda (compute and schedules) "
        "imports dcn_tvm.ops (torch-facing ops), a higher layer",
        "dcn_tvm.env.py:1: dcn_tvm.env (base types and settings) imports dcn_tvm.nowhere, which is no module of "
        "the package",
    ]
