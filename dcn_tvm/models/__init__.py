"""The paper's networks on dcn_tvm ops: the ResNet-101 feature extractor and the task heads; Deformable
DETR's encoder layer."""

from dcn_tvm.models.heads import (CategoryAwareRPN, DeepLabHead, FasterRCNNHead, PSRoIPool, RFCNHead,
                                  RoIPool)
from dcn_tvm.models.resnet import Bottleneck, ResNetDCN, resnet101_dcn
from dcn_tvm.models.deformable_detr import DeformableEncoderLayer, encoder_reference_points

__all__ = ["Bottleneck", "CategoryAwareRPN", "DeepLabHead", "FasterRCNNHead", "PSRoIPool", "RFCNHead",
           "ResNetDCN", "RoIPool", "resnet101_dcn"]
__all__ += ["DeformableEncoderLayer", "encoder_reference_points"]
