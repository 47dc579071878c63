"""`--target` values to target keys ("llvm-znver5", "cuda-sm_90"; see dcn_tvm.kernels.targets).

Tuning always measures with the key's own TVM target, the one the library compiles with, so a record
is tuned for exactly the code it will select; CUDA targets gain the limits MetaSchedule's
VerifyGPUCode checks (the same on every GPU since sm_70).
"""

from __future__ import annotations

import json
import os
import platform
import re

import torch

from dcn_tvm._tvm import tvm
from dcn_tvm.kernels.resources import TUNING_LIMITS
from dcn_tvm.kernels.targets import target_config, target_key, target_kind


def resolve(value: str) -> str:
    """The target key of `llvm` (this CPU), `cuda` (this GPU), `auto` (this GPU if one is visible,
    else this CPU), a TVM tag such as `nvidia/nvidia-h100`, or a TVM target as a JSON dict."""
    if value == "auto":
        value = "cuda" if torch.cuda.is_available() else "llvm"
    if value == "llvm":
        return target_key(torch.device("cpu"))
    if value == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--target cuda: no CUDA GPU is visible here; name the GPU instead, "
                             "e.g. --target nvidia/nvidia-h100 (and measure on it with --rpc-tracker)")
        return target_key(torch.device("cuda"))
    try:
        target = tvm().target.Target(json.loads(value) if value.lstrip().startswith("{") else value)
    except Exception as error:
        raise ValueError(f"--target {value!r} is not llvm, cuda, auto, a TVM tag or a TVM target JSON dict: "
                         f"{error}") from None
    kind = target.kind.name
    if kind == "llvm":
        return f"llvm-{target.attrs.get('mcpu', 'generic')}"
    if kind == "cuda":
        arch = re.fullmatch(r"sm_(\d+)[a-z]?", str(target.attrs.get("arch", "")))
        if arch:
            return f"cuda-sm_{arch.group(1)}"
    raise ValueError(f"--target {value!r}: dcn_tvm compiles for llvm and cuda (with an sm_XY arch), got {target}")


def tuning_target(key: str):
    """The TVM target measured for a key: the library's own, plus on CUDA the per-block limits that
    builds check (dcn_tvm.kernels.resources)."""
    config = target_config(key)
    if target_kind(key) == "cuda":
        config = {**config, **TUNING_LIMITS}
    return tvm().target.Target(config)


def local_device(key: str) -> str:
    """A readable name of this machine's device for a key (the one measured without RPC)."""
    if target_kind(key) == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} logical cores)"
