"""dcn_tvm: Deformable ConvNets operators written as TVM tensor expressions, called from PyTorch."""

from dcn_tvm.convert import convert_torchvision
from dcn_tvm.ops.deform_conv2d import DeformConv2d, DeformConv2dPack, deform_conv2d
from dcn_tvm.ops.deform_roi_pool import DeformPSRoIPool, DeformRoIPool, deform_roi_pool
from dcn_tvm.ops.dcnv3 import DCNv3, DCNv4, dcnv3_core, dcnv4_core
from dcn_tvm.ops.ms_deform_attn import MultiScaleDeformableAttention, ms_deform_attn
from dcn_tvm.ops.scratch import release_scratch

__all__ = ["DCNv3", "DCNv4", "DeformConv2d", "DeformConv2dPack", "DeformPSRoIPool", "DeformRoIPool",
           "MultiScaleDeformableAttention", "convert_torchvision", "dcnv3_core", "dcnv4_core", "deform_conv2d",
           "deform_roi_pool", "ms_deform_attn", "release_scratch"]
__version__ = "0.1.0"
