"""Trunks: the TF-Slim ResNet-v2 family in tf_keras (see resnet_v2.py; its
layers in slim_layers.py)."""

from mtssl.backbones.resnet_v2 import (Block, ResNetV2, UnitPlan, paper_trunk,
                                       plan_units, resnet_v2_50, resnet_v2_101,
                                       resnet_v2_152, resnet_v2_blocks,
                                       trunk_from_name)
from mtssl.backbones.slim_layers import BottleneckV2, SlimConv2D

__all__ = [
    'Block', 'BottleneckV2', 'ResNetV2', 'SlimConv2D', 'UnitPlan', 'paper_trunk',
    'plan_units', 'resnet_v2_50', 'resnet_v2_101', 'resnet_v2_152',
    'resnet_v2_blocks', 'trunk_from_name',
]
