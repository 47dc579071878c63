"""Move a torchvision model onto dcn_tvm: swap its `torchvision.ops.DeformConv2d` modules in place."""

from __future__ import annotations

import sys

import torch
from torch import nn

from dcn_tvm.ops.deform_conv2d import DeformConv2d


def _torchvision_deform_conv2d() -> type | None:
    """torchvision's DeformConv2d class if torchvision is loaded (a model cannot hold one otherwise)."""
    module = sys.modules.get("torchvision.ops.deform_conv")
    return getattr(module, "DeformConv2d", None)


def _replacement(old: nn.Module) -> DeformConv2d:
    """A dcn_tvm DeformConv2d holding `old`'s own weight and bias Parameters, in `old`'s training mode."""
    with torch.device("meta"):
        new = DeformConv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                           old.dilation, old.groups, bias=old.bias is not None)
    new.weight = old.weight
    if old.bias is not None:
        new.bias = old.bias
    return new.train(old.training)


def convert_torchvision(model: nn.Module) -> list[str]:
    """Replace, in place, every `torchvision.ops.DeformConv2d` inside `model` by a `dcn_tvm.DeformConv2d`.

    The new module holds the same weight and bias Parameters (not copies), so device, dtype,
    `requires_grad`, state_dict names and an optimizer built on them carry over; its training mode
    is the old one's. torchvision's feature extractor (torch.fx) sees the same nodes as before: each
    new module is one node named by its path, as torchvision's was. Only modules of exactly torchvision's class are swapped (a subclass may
    override forward); hooks registered on a swapped module are not carried over. Calls to the
    functional `torchvision.ops.deform_conv2d` in a forward cannot be swapped this way.

    Returns the qualified names replaced (a module reachable under several names gives all of them).
    Raises TypeError when `model` itself is a torchvision DeformConv2d (nothing to swap it inside).
    """
    torchvision_class = _torchvision_deform_conv2d()
    if torchvision_class is None:
        return []
    if type(model) is torchvision_class:
        raise TypeError("model is itself a torchvision DeformConv2d: convert a module that contains it")
    found = [(f"{prefix}.{name}" if prefix else name, parent, name, child)
             for prefix, parent in model.named_modules(remove_duplicate=False)
             for name, child in parent._modules.items() if type(child) is torchvision_class]
    new_modules = {}
    for _, parent, name, child in found:
        if id(child) not in new_modules:
            new_modules[id(child)] = _replacement(child)
        setattr(parent, name, new_modules[id(child)])
    return [qualified for qualified, *_ in found]
