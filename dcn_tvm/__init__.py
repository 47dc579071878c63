"""dcn_tvm: Deformable ConvNets operators written as TVM tensor expressions, called from PyTorch."""

from dcn_tvm.convert import convert_torchvision
from dcn_tvm.ops.deform_conv2d import DeformConv2d, DeformConv2dPack, deform_conv2d
from dcn_tvm.ops.deform_roi_pool import DeformPSRoIPool, DeformRoIPool, deform_roi_pool
from dcn_tvm.ops.dcnv3 import DCNv3, DCNv4, dcnv3_core, dcnv4_core

__all__ = ["DeformConv2d", "DeformConv2dPack", "DeformPSRoIPool", "DeformRoIPool", "convert_torchvision",
           "deform_conv2d", "deform_roi_pool"]
__all__ += ["DCNv3", "DCNv4", "dcnv3_core", "dcnv4_core"]
__version__ = "0.1.0"
