"""Dispatcher rules shared by the dcn_tvm torch.library ops: autocast, forward-mode AD refused, and the
CUDA device of the tensors made current while an op runs.

Autocast follows torchvision's deform_conv2d and roi_align: inside `torch.autocast`, float16,
bfloat16 and float32 arguments run in float32 (float64 stays float64) with autocast off, and the
result comes back in the first argument's dtype, on CPU and CUDA alike (torchvision 0.29's CPU
deform_conv2d fails on the mixed dtypes autocast produces: measured).

No op has a forward-mode formula, and torch would drop a tangent silently (the result of
`torch.func.jvp` all zeros, `forward_ad.unpack_dual(out).tangent` None): a tangent raises instead.

A compiled CUDA kernel sets the current CUDA device to its tensors' (TVM's host code calls
cudaSetDevice for its first tensor's device id) and leaves it so. An op on cuda:1 called while cuda:0
is current would then move the caller's later `device="cuda"` allocations to cuda:1. So each op runs
with its tensors' device current and restores the caller's after, as torchvision's ops do (DeviceGuard).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from dcn_tvm.geometry.dtypes import DTYPES
from dcn_tvm.kernels.targets import target_kind

_LIBRARY = torch.library.Library("dcn_tvm", "FRAGMENT")
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_AUTOCAST_TO_FLOAT32 = (torch.float16, torch.bfloat16, torch.float32)
#: The torch dtypes the kernels are built for, to their names in DTYPES.
_KERNEL_DTYPES = {getattr(torch, name): name for name in DTYPES}


def deterministic_scatter(target: str, deterministic: bool) -> bool:
    """Whether an op's gradient scatter for `target` is the one without atomic adds: asked for
    (torch.use_deterministic_algorithms) on a CUDA target; the CPU's scatters never add atomically."""
    return deterministic and target_kind(target) == "cuda"


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype `tensor` is computed in: float32 under autocast on its device (cpu or cuda) for float16,
    bfloat16 and float32, its own dtype otherwise. (Not torch.amp.is_autocast_available, which
    torch.compile(fullgraph=True) of torch 2.11 cannot trace: measured.)"""
    device_type = tensor.device.type
    if (tensor.dtype in _AUTOCAST_TO_FLOAT32 and device_type in _DEVICE_KEYS
            and torch.is_autocast_enabled(device_type)):
        return torch.float32
    return tensor.dtype


def check_dtype(name: str, tensor: Tensor) -> None:
    """An op's first tensor argument `name` must have one of the kernels' dtypes (TypeError)."""
    if tensor.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name} must have a floating dtype among {DTYPES}, got {tensor.dtype}")


def check_same_dtype(name: str, tensor: Tensor, first: Tensor, whose: str = "the input's") -> None:
    """Another tensor argument `name` must be computed in the dtype of the op's first tensor `first`,
    named `whose` in the message (TypeError)."""
    if compute_dtype(tensor) != compute_dtype(first):
        raise TypeError(f"{name} must have {whose} dtype {first.dtype}, got {tensor.dtype}")


def check_same_device(name: str, tensor: Tensor, first: Tensor, first_name: str = "input") -> None:
    """Another tensor argument `name` must be on the device of the op's first tensor `first`, named
    `first_name` in the message (ValueError)."""
    if tensor.device != first.device:
        raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}")


def check_device(tensor: Tensor) -> None:
    """An op's first tensor argument must be on a device dcn_tvm has kernels for, or on the meta device,
    where the ops' fake kernels give the shapes (ValueError)."""
    if tensor.device.type not in _DEVICE_KEYS and tensor.device.type != "meta":
        raise ValueError(f"dcn_tvm runs on cpu and cuda devices, got {tensor.device}")


def kernel_dtype(tensor: Tensor) -> str:
    """The name (in DTYPES) of the dtype `tensor`, checked by check_dtype, is computed in."""
    return _KERNEL_DTYPES[compute_dtype(tensor)]


def _autocast_kernel(op: torch._ops.OpOverload, device_type: str):
    def kernel(*args):
        cast = [a.to(compute_dtype(a)) if isinstance(a, Tensor) and a.device.type == device_type else a
                for a in args]
        with torch.autocast(device_type, enabled=False):
            return op(*cast).to(args[0].dtype)
    return kernel


def _forward_ad_refusing_kernel(qualname: str, reverse_mode):
    def kernel(keyset, *args):
        if any(isinstance(a, Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args):
            raise NotImplementedError(
                f"{qualname} has no forward-mode derivative (torch.func.jvp, torch.autograd.forward_ad, "
                f"torch.func.jacfwd); use reverse mode (Tensor.backward, torch.autograd.grad)")
        return reverse_mode.call_boxed(keyset, *args)
    return kernel


def _device_guarded_kernel(backend):
    """`backend` (an op's CUDA kernel) run with the device of the op's first argument (every op's is a
    tensor) current, the caller's restored after."""
    def kernel(keyset, *args):
        with torch.cuda.device(args[0].device):
            return backend.call_boxed(keyset, *args)
    return kernel


def register(op_name: str, autocast: bool) -> None:
    """Run dcn_tvm::<op_name> with its tensors' CUDA device current and refuse forward-mode
    tangents to it on every device; with `autocast`, give it the autocast rule above (for forward ops,
    whose single result takes the input's dtype)."""
    qualname = f"dcn_tvm::{op_name}"
    # On CUDA the op's own kernel (torch.library.custom_op's) runs inside the device guard; the CPU's is untouched.
    _LIBRARY.impl(op_name, _device_guarded_kernel(torch.library.get_kernel(qualname, "CUDA")), "CUDA",
                  with_keyset=True)
    for device_type, key in _DEVICE_KEYS.items():
        # The op's own Autograd kernel (reverse mode, from register_autograd) stays what runs.
        reverse_mode = torch.library.get_kernel(qualname, "Autograd" + key)
        _LIBRARY.impl(op_name, _forward_ad_refusing_kernel(qualname, reverse_mode), "Autograd" + key,
                      with_keyset=True)
        if autocast:
            _LIBRARY.impl(op_name, _autocast_kernel(getattr(torch.ops.dcn_tvm, op_name).default, device_type),
                          "Autocast" + key)
