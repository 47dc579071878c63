"""Find, verify and load prebuilt kernel packages (runtime side: tvm_ffi only, never the compiler).

Packages come from DCN_TVM_PREBUILT (folders, searched first) and from installed packages that
declare a `dcn_tvm.prebuilt` entry point. Each is verified once per process: manifest format, keys
and their types, versions (DCN_TVM_ALLOW_VERSION_MISMATCH=1 turns a mismatch into a warning), the
sha256 of every file (every library it may load, TVM's runtime included, must be one of them, inside
the package after resolving symlinks; it is hashed again as it is loaded, and loaded from the
descriptor it was hashed from), and a warning for any file or folder above it that anyone may replace.
A library built for this device kind but another GPU arch, or for a CPU level this CPU cannot run, is
refused with an error.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import json
import logging
import os
import stat
import warnings
from pathlib import Path

from dcn_tvm import env
from dcn_tvm.forksafe import ForkSafeLock
from dcn_tvm.kernels import manifest as mf
from dcn_tvm.kernels.runtime import (installed_runtime, load_runtime_verified, load_tvm_runtime, load_verified,
                                     runtime_names)
from dcn_tvm.kernels.spec import KernelSpec

log = logging.getLogger("dcn_tvm")
ENTRY_POINT_GROUP = "dcn_tvm.prebuilt"
#: Every manifest field and its JSON type; the type of the values of `versions` and `files`.
FIELDS = {"format": int, "versions": dict, "files": dict, "libraries": list, "kernels": dict}
VALUES = {"versions": str, "files": str}
#: The fields of every library entry, and those of a kind's entries.
LIBRARY_FIELDS = {"kind": str, "file": str}
KIND_FIELDS = {"llvm": {"isa": str}, "cuda": {"arch": str}}
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
              bool: "a boolean", type(None): "null"}


class PrebuiltError(RuntimeError):
    """A prebuilt package that must not be loaded (tampered, wrong target, incompatible version)."""


def _open_to_anyone(path: Path) -> list[Path]:
    """The places through which anyone on this machine could replace the file at `path`: the file if it
    is world-writable, and each folder above it up to / (along the path as given and as resolved) that
    is world-writable without the sticky bit, which lets anyone rename what it holds. In a sticky one
    (/tmp) only an entry's owner may, so it is safe as long as every folder below it is."""
    places = [path] if path.stat().st_mode & stat.S_IWOTH else []
    for folder in dict.fromkeys([*Path(os.path.abspath(path)).parents, *path.resolve().parents]):
        mode = folder.stat().st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            places.append(folder)
    return places


class PrebuiltPackage:
    """One verified package folder (the one holding manifest.json)."""

    def __init__(self, root: Path):
        self.root = root
        self.path = path = root / mf.MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise PrebuiltError(f"{path}: not a readable dcn_tvm prebuilt manifest ({error})") from error
        self._require(self.manifest, FIELDS)
        for field, kind in VALUES.items():
            for name, value in self.manifest[field].items():
                self._check_type(value, kind, f"{field!r}[{name!r}]")
        if self.manifest["format"] != mf.FORMAT:
            raise PrebuiltError(f"{path}: manifest format {self.manifest['format']!r}, this dcn_tvm reads "
                                f"{mf.FORMAT}; rebuild the package with this version (dcn-tvm build)")
        self._check_libraries()
        self._check_versions()
        self._check_files()
        self._modules: dict[str, object] = {}
        self._lock = ForkSafeLock()

    def __repr__(self) -> str:
        return f"PrebuiltPackage({self.root})"

    def _check_type(self, value, kind: type, where: str) -> None:
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise PrebuiltError(f"{self.path}: {where} is {JSON_TYPES.get(type(value), type(value).__name__)}, "
                                f"expected {JSON_TYPES[kind]}; rebuild the package (dcn-tvm build)")

    def _require(self, mapping, fields: dict[str, type], where: str = "") -> None:
        """`mapping` (the manifest, or the entry `where` names, e.g. "libraries[0]") is an object with
        each of `fields`, of its type."""
        self._check_type(mapping, dict, where or "the manifest")
        for key, kind in fields.items():
            if key not in mapping:
                raise PrebuiltError(f"{self.path}: {where or 'the manifest'} has no {key!r} key; rebuild the package "
                                    f"(dcn-tvm build)")
            self._check_type(mapping[key], kind, f"{where}[{key!r}]" if where else repr(key))

    def _check_libraries(self) -> None:
        """Every library entry is complete and names a file that `files` hashes, and so do the runtime
        libraries they need."""
        for i, library in enumerate(self.manifest["libraries"]):
            self._require(library, LIBRARY_FIELDS, f"libraries[{i}]")
            self._require(library, KIND_FIELDS.get(library["kind"], {}), f"libraries[{i}]")
            if library["file"] not in self.manifest["files"]:
                raise PrebuiltError(f"{self.path}: libraries[{i}] names {library['file']!r}, which 'files' does not "
                                    f"list with its sha256; refusing to load a library nothing verifies")
        cuda = any(library["kind"] == "cuda" for library in self.manifest["libraries"])
        for name in runtime_names(cuda):
            if f"runtime/{name}" not in self.manifest["files"]:
                raise PrebuiltError(f"{self.path}: 'files' does not list runtime/{name} with its sha256; refusing a "
                                    f"package whose runtime library nothing verifies")

    def _inside(self, name: str) -> Path:
        """The path of a file the manifest names, which must lie inside the package (symlinks resolved)."""
        path = self.root / name
        if Path(name).is_absolute() or not path.resolve().is_relative_to(self.root.resolve()):
            raise PrebuiltError(f"{self.path}: {name!r} is outside the package {self.root}; a manifest may only "
                                f"name files inside its package")
        return path

    def _check_versions(self) -> None:
        running = mf.runtime_versions()
        for package, built in self.manifest["versions"].items():
            if package in running and not mf.compatible(built, running[package], package):
                message = (f"{self.root}: built with {package} {built}, running {running[package]}; rebuild it "
                           f"(dcn-tvm build) or set DCN_TVM_ALLOW_VERSION_MISMATCH=1 to load it anyway")
                if not env.allow_version_mismatch():
                    raise PrebuiltError(message)
                warnings.warn(message, stacklevel=3)

    def _check_files(self) -> None:
        """Every file is inside the package and has its sha256; a warning for each place anyone could
        replace one of them (or the manifest) through."""
        places = _open_to_anyone(self.path)
        for name, expected in self.manifest["files"].items():
            path = self._inside(name)
            if not path.is_file():
                raise PrebuiltError(f"{self.root}: {name} is listed in the manifest but missing")
            actual = mf.sha256(path)
            if actual != expected:
                raise PrebuiltError(f"{path}: sha256 {actual} does not match the manifest's {expected}; "
                                    f"the file was changed after the package was built")
            places += _open_to_anyone(path)
        for place in dict.fromkeys(places):
            replaced = "what it holds (it is not sticky)" if place.is_dir() else "it"
            warnings.warn(f"dcn_tvm: loading the prebuilt package {self.root}, and {place} is world-writable: "
                          f"anyone on this machine could have replaced {replaced}", stacklevel=3)

    def library_for(self, target: str) -> dict | None:
        """The manifest entry of the library to run for a target key ("llvm-...", "cuda-sm_90");
        None if the package has no library of that kind."""
        kind, _, detail = target.partition("-")
        candidates = [lib for lib in self.manifest["libraries"] if lib["kind"] == kind]
        if not candidates:
            return None
        if kind == "cuda":
            match = [lib for lib in candidates if lib["arch"] == detail]
            if not match:
                raise PrebuiltError(f"{self.root}: built for CUDA {[lib['arch'] for lib in candidates]}, "
                                    f"but this GPU is {detail}; rebuild with dcn-tvm build --target cuda on it")
            return match[0]
        levels = mf.supported_cpu_levels(mf.cpu_flags())
        for level in levels:
            match = [lib for lib in candidates if lib["isa"] == level]
            if match:
                return match[0]
        raise PrebuiltError(f"{self.root}: built for CPU levels {[lib['isa'] for lib in candidates]}, which this "
                            f"CPU cannot run (it supports {levels or 'none of the known levels'})")

    def _changed(self, path: Path) -> PrebuiltError:
        return PrebuiltError(f"{path}: changed since the package was verified (its sha256 no longer matches the "
                             f"manifest); refusing to load it")

    def _load_runtime(self, cuda: bool) -> None:
        """TVM's runtime libraries: the installed TVM's, else the package's own, verified as they load."""
        if installed_runtime(cuda) is not None:
            load_tvm_runtime(cuda)
            return
        for name in runtime_names(cuda):
            path = self._inside(f"runtime/{name}")
            if not load_runtime_verified(path, self.manifest["files"][f"runtime/{name}"]):
                raise self._changed(path)

    def _module(self, library: dict):
        with self._lock:
            if library["file"] not in self._modules:
                self._load_runtime(cuda=library["kind"] == "cuda")
                path = self._inside(library["file"])
                module = load_verified(path, self.manifest["files"][library["file"]])
                if module is None:
                    raise self._changed(path)
                self._modules[library["file"]] = module
            return self._modules[library["file"]]

    def find(self, spec: KernelSpec):
        """The kernel for `spec`: its own if the package has it, else the package's symbolic one."""
        for key in (spec.workload_key, spec.symbolic().workload_key):
            if key in self.manifest["kernels"]:
                library = self.library_for(spec.target)
                if library is None:
                    return None
                try:
                    return self._module(library)[key]
                except AttributeError:
                    raise PrebuiltError(f"{self.root}: {library['file']} has no kernel {key}, which the manifest "
                                        f"lists; the package is damaged: rebuild it (dcn-tvm build)") from None
        return None


def _package_root(folder: Path) -> Path:
    """Accept the package folder itself or the `dcn-tvm build --out` folder around it (whose hidden
    folders are builds under way)."""
    if (folder / mf.MANIFEST).is_file():
        return folder
    found = sorted(path for path in folder.glob(f"*/{mf.MANIFEST}") if not path.parent.name.startswith("."))
    if len(found) != 1:
        raise PrebuiltError(f"{folder}: expected one dcn_tvm prebuilt package (a {mf.MANIFEST}) there, "
                            f"found {len(found)}")
    return found[0].parent


@functools.cache
def packages() -> tuple[PrebuiltPackage, ...]:
    """Every prebuilt package of this process: DCN_TVM_PREBUILT folders first, then installed ones."""
    roots = [_package_root(Path(folder)) for folder in env.prebuilt_paths()]
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        roots.append(Path(importlib.import_module(entry.value).ROOT))
    return tuple(PrebuiltPackage(root) for root in roots)


def find_kernel(spec: KernelSpec):
    """The first prebuilt kernel for `spec`, or None."""
    for package in packages():
        kernel = package.find(spec)
        if kernel is not None:
            log.debug("dcn_tvm: %s from prebuilt %s", spec.key, package.root)
            return kernel
    return None
