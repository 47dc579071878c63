"""The manifest of a prebuilt package, and the facts about the running machine it is checked against."""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

FORMAT = 1
MANIFEST = "manifest.json"

#: CPU ISA levels a CPU library can be built for (LLVM's CPU names), best first, with the
#: /proc/cpuinfo flags a CPU needs to run code built for it.
CPU_LEVELS = {
    "x86-64-v4": frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi2",
                            "f16c", "movbe"}),
    "x86-64-v3": frozenset({"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "xsave"}),
}


#: The first bytes of a CUDA fatbin (0xba55ed50, little-endian).
FATBIN_MAGIC = b"\x50\xed\x55\xba"


def holds_compiled_cuda(library: bytes) -> bool:
    """Whether a CUDA library's bytes hold its kernels compiled (a fatbin) rather than as source: where no GPU
    driver is, TVM keeps CUDA kernels as source, which only a machine with the compiler can load."""
    return FATBIN_MAGIC in library and b"__global__" not in library


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def runtime_versions() -> dict[str, str]:
    """The versions a package must agree with: dcn_tvm (kernel signatures) and tvm-ffi (the ABI)."""
    return {"dcn_tvm": version("dcn_tvm"), "apache-tvm-ffi": version("apache-tvm-ffi")}


def compatible(built: str, running: str, package: str) -> bool:
    """dcn_tvm must match exactly; tvm-ffi on major.minor (its ABI is stable within a minor series)."""
    if package == "dcn_tvm":
        return built == running
    return built.split(".")[:2] == running.split(".")[:2]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU, from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def supported_cpu_levels(flags: frozenset[str]) -> list[str]:
    """The CPU levels this CPU can run, best first."""
    return [level for level, needs in CPU_LEVELS.items() if needs <= flags]
