"""Trunks: the TF-Slim ResNet-v2 family in tf_keras (see resnet_v2.py)."""

from mtssl.backbones.resnet_v2 import (Block, BottleneckV2, ResNetV2, SlimConv2D,
                                       UnitPlan, paper_trunk, plan_units,
                                       resnet_v2_50, resnet_v2_101,
                                       resnet_v2_152, resnet_v2_blocks,
                                       trunk_from_name)

__all__ = [
    'Block', 'BottleneckV2', 'ResNetV2', 'SlimConv2D', 'UnitPlan', 'paper_trunk',
    'plan_units', 'resnet_v2_50', 'resnet_v2_101', 'resnet_v2_152',
    'resnet_v2_blocks', 'trunk_from_name',
]
