"""The paper's networks on dcn_tvm ops: the ResNet-101 feature extractor and the task heads."""

from dcn_tvm.models.heads import (CategoryAwareRPN, DeepLabHead, FasterRCNNHead, PSRoIPool, RFCNHead,
                                  RoIPool)
from dcn_tvm.models.resnet import Bottleneck, ResNetDCN, resnet101_dcn

__all__ = ["Bottleneck", "CategoryAwareRPN", "DeepLabHead", "FasterRCNNHead", "PSRoIPool", "RFCNHead",
           "ResNetDCN", "RoIPool", "resnet101_dcn"]
