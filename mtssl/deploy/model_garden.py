"""The trunk as a TF Model Garden backbone, for detection fine-tuning.

Importing this module registers the backbone builder `mtssl_resnet_v2`, a
`Backbone` one-of config with that field (so stock experiments can name it)
and the experiments `mtssl_fasterrcnn` and `mtssl_image_classification`.
Use: README, "Detection fine-tuning"; choices: BUILD.md, "Model Garden
backbone".
"""

import dataclasses
import math
from typing import Dict, Optional

import tensorflow as tf

from official.core import config_definitions as cfg
from official.core import exp_factory
from official.modeling import hyperparams
from official.vision.configs import backbones as backbones_cfg
from official.vision.configs import decoders as decoders_cfg
from official.vision.configs import image_classification as ic_cfg
from official.vision.configs import maskrcnn  # pylint: disable=unused-import
from official.vision.modeling.backbones import factory
from official.vision.ops import preprocess_ops
# The tasks the experiments name, so task_factory.get_task finds them.
from official.vision.tasks import image_classification  # pylint: disable=unused-import
from official.vision.tasks import maskrcnn as maskrcnn_task  # pylint: disable=unused-import

from mtssl.ops import preprocessing
from mtssl.backbones import resnet_v2

BACKBONE_TYPE = 'mtssl_resnet_v2'


@dataclasses.dataclass
class MtsslResNetV2(hyperparams.Config):
  """Config of the `mtssl_resnet_v2` backbone.

  Attributes:
    trunk: a name of `mtssl.backbones.resnet_v2.TRUNK_BLOCKS`.
    output_stride: 8, 16 (detection) or 0 for the nominal stride (32).
    weight_decay: Slim-form L2 decay on conv kernels; None takes the task's
      `losses.l2_weight_decay`.
  """
  trunk: str = 'resnet_v2_101'
  output_stride: int = 16
  weight_decay: Optional[float] = None


@dataclasses.dataclass
class Backbone(backbones_cfg.Backbone):
  """Model Garden's backbone one-of plus `mtssl_resnet_v2`."""
  mtssl_resnet_v2: MtsslResNetV2 = dataclasses.field(
      default_factory=MtsslResNetV2)


# Model Garden configs name `backbones.Backbone` when they are built (field
# default factories and experiment factories alike), so from here on they
# build the extended one-of.
backbones_cfg.Backbone = Backbone


def mtssl_backbone(trunk: str = 'resnet_v2_101', output_stride: int = 16,
                   weight_decay: Optional[float] = None) -> Backbone:
  return Backbone(type=BACKBONE_TYPE, mtssl_resnet_v2=MtsslResNetV2(
      trunk=trunk, output_stride=output_stride, weight_decay=weight_decay))


def endpoint_levels(trunk: resnet_v2.ResNetV2) -> Dict[str, str]:
  """{Model Garden level: trunk end point} (see module docstring)."""
  stride = resnet_v2.ROOT_STRIDE if trunk.include_root_block else 1
  block_ends, unit_ends = {}, {}
  last_units = {(b.scope, b.num_units) for b in trunk.block_specs}
  for plan in trunk.unit_plan:
    stride *= plan.stride
    level = str(int(math.log2(stride)))
    unit_ends[level] = f'{trunk.scope}/{plan.scope}'
    if (plan.block, plan.index) in last_units:
      block_ends[level] = f'{trunk.scope}/{plan.block}'
  # A level where no block ends (stride 4: block1 strides on its last unit)
  # takes its deepest unit.
  return {level: block_ends.get(level, name)
          for level, name in sorted(unit_ends.items(), key=lambda x: int(x[0]))}


def trunk_input(images):
  """Model Garden's normalized RGB -> the trunk's input (RGB minus VGG mean)."""
  scale = tf.constant(preprocess_ops.STDDEV_RGB, tf.float32)
  offset = tf.constant(preprocess_ops.MEAN_RGB, tf.float32) - tf.constant(
      preprocessing.VGG_MEAN_RGB, tf.float32)
  return tf.cast(tf.cast(images, tf.float32) * scale + offset, images.dtype)


class ModelGardenResNetV2(resnet_v2.ResNetV2):
  """A ResNetV2 returning Model Garden endpoints {level: block output}.

  Args:
    blocks, output_stride, ...: as `ResNetV2`.
    input_specs: the Model Garden input spec; it sets `output_specs`.
  """

  def __init__(self, blocks, output_stride=None, input_specs=None, **kwargs):
    super().__init__(blocks, output_stride=output_stride, **kwargs)
    shape = (input_specs.shape if input_specs is not None
             else (None, None, None, 3))
    if shape[-1] not in (None, 3):
      raise ValueError(f'The {BACKBONE_TYPE} backbone takes RGB input, got an '
                       f'input spec with {shape[-1]} channels.')
    self._input_shape = tuple(shape)
    self._levels = endpoint_levels(self)

  @property
  def endpoint_names(self) -> Dict[str, str]:
    return dict(self._levels)

  @property
  def output_specs(self) -> Dict[str, tf.TensorShape]:
    """{level: [batch, height, width, depth]} for the input spec given."""
    batch, height, width = self._input_shape[:3]
    depths = {f'{self.scope}/{b.scope}': 4 * b.base_depth
              for b in self.block_specs}
    depths.update({f'{self.scope}/{u.scope}': u.depth for u in self.unit_plan})
    specs = {}
    for level, name in self._levels.items():
      stride = 2 ** int(level)
      specs[level] = tf.TensorShape([
          batch,
          None if height is None else -(-height // stride),
          None if width is None else -(-width // stride),
          depths[name]])
    return specs

  def call(self, inputs, training=None):
    end_points = super().call(trunk_input(inputs), training=training)
    return {level: end_points[name] for level, name in self._levels.items()}


def build_backbone(trunk: str = 'resnet_v2_101', output_stride: Optional[int] = 16,
                   input_specs=None, weight_decay: float = 0.0
                   ) -> ModelGardenResNetV2:
  if trunk not in resnet_v2.TRUNK_BLOCKS:
    raise ValueError(f'Unknown {BACKBONE_TYPE} trunk {trunk!r}; choose one of '
                     f'{", ".join(sorted(resnet_v2.TRUNK_BLOCKS))}.')
  return ModelGardenResNetV2(resnet_v2.TRUNK_BLOCKS[trunk](),
                             output_stride=output_stride or None,
                             input_specs=input_specs, scope=trunk,
                             weight_decay=weight_decay)


@factory.register_backbone_builder(BACKBONE_TYPE)
def build_mtssl_resnet_v2(input_specs, backbone_config, norm_activation_config,
                          l2_regularizer=None, **unused_kwargs):
  """Model Garden backbone builder for `type: mtssl_resnet_v2`."""
  del norm_activation_config  # The trunk keeps Slim's batch norm settings.
  if backbone_config.type != BACKBONE_TYPE:
    raise ValueError(f'Backbone type {backbone_config.type!r} is not '
                     f'{BACKBONE_TYPE!r}.')
  config = backbone_config.get()
  weight_decay = config.weight_decay
  if weight_decay is None:
    weight_decay = 0.0
    if l2_regularizer is not None:
      l2 = getattr(l2_regularizer, 'l2', None)
      if l2 is None:
        raise ValueError(f'The {BACKBONE_TYPE} backbone takes an L2 '
                         f'regularizer, got {l2_regularizer!r}; set '
                         f'backbone.{BACKBONE_TYPE}.weight_decay instead.')
      weight_decay = 2.0 * float(l2)
  backbone = build_backbone(config.trunk, config.output_stride, input_specs,
                            weight_decay)
  backbone.build_for_input()
  return backbone


@exp_factory.register_config_factory('mtssl_image_classification')
def mtssl_image_classification() -> cfg.ExperimentConfig:
  """Image classification on the trunk (set num_classes and the data)."""
  config = exp_factory.get_exp_config('image_classification')
  config.task.model = ic_cfg.ImageClassificationModel(
      num_classes=1000, input_size=[224, 224, 3],
      backbone=mtssl_backbone(output_stride=16))
  config.task.init_checkpoint_modules = 'backbone'
  return config


@exp_factory.register_config_factory('mtssl_fasterrcnn')
def mtssl_fasterrcnn() -> cfg.ExperimentConfig:
  """Faster R-CNN (FPN levels 3-6) on the trunk at output stride 16.

  Starts from Model Garden's `fasterrcnn_resnetfpn_coco`; set
  `task.init_checkpoint` to a trunk checkpoint, the data paths and
  `num_classes` (e.g. 21 for PASCAL VOC) for a dataset.
  """
  config = exp_factory.get_exp_config('fasterrcnn_resnetfpn_coco')
  model = config.task.model
  model.min_level = 3
  model.max_level = 6
  model.backbone = mtssl_backbone(output_stride=16)
  model.decoder = decoders_cfg.Decoder(type='fpn', fpn=decoders_cfg.FPN())
  config.task.init_checkpoint = None
  config.task.init_checkpoint_modules = 'backbone'
  config.runtime.mixed_precision_dtype = None
  return config
