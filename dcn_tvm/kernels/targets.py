"""Target keys ("llvm-znver5", "cuda-sm_90") for torch devices, and their TVM target dicts."""

from __future__ import annotations

import functools

import torch


@functools.cache
def host_cpu() -> str:
    """LLVM's name for the host CPU (plain "llvm" would compile for a generic x86-64 without AVX);
    "host" where the compiler is not installed (prebuilt CPU libraries are chosen by ISA level)."""
    from dcn_tvm._tvm import CompilerUnavailable, tvm

    try:
        return str(tvm().target.Target.from_device(tvm().cpu()).attrs.get("mcpu", "generic"))
    except CompilerUnavailable:
        return "host"


def target_key(device: torch.device) -> str:
    if device.type == "cpu":
        return f"llvm-{host_cpu()}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm_{major}{minor}"
    raise ValueError(f"dcn_tvm runs on cpu and cuda devices, got {device}")


def target_kind(key: str) -> str:
    return key.split("-", 1)[0]


def target_config(key: str) -> dict:
    """The TVM target dict for a key."""
    kind, _, detail = key.partition("-")
    if kind == "llvm":
        return {"kind": "llvm", "mcpu": detail}
    if kind == "cuda":
        return {"kind": "cuda", "arch": detail}
    raise ValueError(f"unknown target key {key!r}")
