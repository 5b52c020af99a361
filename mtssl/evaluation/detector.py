"""The Faster R-CNN of the detection protocol: the trunk (or its lasso) as a
one-level feature pyramid, ResNet-v2 block 4 on each ROI, and Model Garden's
R-CNN around them (`build_detector`)."""

import math

import tensorflow as tf
import tf_keras

from official.vision.modeling import maskrcnn_model
from official.vision.modeling.heads import dense_prediction_heads
from official.vision.modeling.layers import detection_generator
from official.vision.modeling.layers import roi_aligner
from official.vision.modeling.layers import roi_generator
from official.vision.modeling.layers import roi_sampler
from official.vision.ops import anchor as anchor_lib

from mtssl.backbones import resnet_v2 as resnet_lib
from mtssl.backbones import slim_layers
from mtssl.models import lasso as lasso_lib


def feature_level(output_stride: int) -> int:
  level = int(round(math.log2(output_stride)))
  if 2**level != output_stride:
    raise ValueError(f'Detection needs a power-of-two output stride, got '
                     f'{output_stride}.')
  return level


def make_anchors(image_size: int, level: int, sizes, aspect_ratios):
  """{str(level): [H/s, W/s, len(sizes) * len(aspect_ratios) * 4]}."""
  stride = 2**level
  grids = [
      anchor_lib.Anchor(min_level=level, max_level=level, num_scales=1,
                        aspect_ratios=list(aspect_ratios),
                        anchor_size=size / stride,
                        image_size=(image_size, image_size)
                        ).multilevel_boxes[str(level)]
      for size in sizes
  ]
  return {str(level): tf.concat(grids, axis=-1)}


class TrunkBackbone(tf_keras.Model):
  """The trunk (or its lasso combination) as a one-level feature pyramid."""

  def __init__(self, trunk: resnet_lib.ResNetV2, level: int, lasso_l1=None,
               train_batch_norm=False, **kwargs):
    super().__init__(**kwargs)
    self.trunk = trunk
    self.level = level
    self.train_batch_norm = train_batch_norm
    self.lasso = (lasso_lib.UnitLasso(
        trunk.unit_names(trunk.block_specs[-1].scope), lasso_l1,
        name='lasso_eval') if lasso_l1 is not None else None)

  def call(self, images, training=None):
    bn_training = bool(training) and self.train_batch_norm
    end_points = self.trunk(images, training=bn_training)
    features = (self.lasso(end_points) if self.lasso is not None
                else end_points[self.trunk.output_name])
    return {str(self.level): features}


class CropAndPool(tf_keras.layers.Layer):
  """Model Garden's ROIAlign to crop_size, then a 2x2 max-pool (TF-OD style)."""

  def __init__(self, crop_size: int = 14, **kwargs):
    super().__init__(**kwargs)
    self.aligner = roi_aligner.MultilevelROIAligner(crop_size=crop_size,
                                                    sample_offset=0.5)

  def call(self, features, boxes, training=None):
    crops = self.aligner(features, boxes)
    shape = tf.shape(crops)
    b, k = shape[0], shape[1]
    flat = tf.reshape(crops, tf.concat([[b * k], shape[2:]], 0))
    pooled = tf.nn.max_pool2d(flat, 2, 2, 'VALID')
    return tf.reshape(pooled, tf.concat([[b, k], tf.shape(pooled)[1:]], 0))


class Block4BoxHead(tf_keras.Model):
  """ResNet-v2 block 4 per ROI, average pool, class and box outputs."""

  def __init__(self, scope: str, base_depth: int, num_units: int,
               num_classes: int, train_batch_norm=False, weight_decay=1e-4,
               batch_norm_decay=None, **kwargs):
    super().__init__(**kwargs)
    self.num_classes = num_classes
    self.train_batch_norm = train_batch_norm
    self.block4 = resnet_lib.ResNetV2(
        [resnet_lib.Block('block4', base_depth, num_units, 1)],
        output_stride=None, include_root_block=False, include_postnorm=True,
        scope=scope, weight_decay=weight_decay, name='block4')
    if batch_norm_decay is not None:  # else Slim's 0.997
      for layer in self.block4._flatten_layers():  # pylint: disable=protected-access
        if isinstance(layer, tf_keras.layers.BatchNormalization):
          layer.momentum = batch_norm_decay
    reg = slim_layers.slim_l2(weight_decay) if weight_decay else None
    self.classifier = tf_keras.layers.Dense(
        num_classes + 1, name='class_logits', kernel_regularizer=reg,
        kernel_initializer=tf_keras.initializers.RandomNormal(stddev=0.01))
    self.box_regressor = tf_keras.layers.Dense(
        4 * (num_classes + 1), name='box_deltas', kernel_regularizer=reg,
        kernel_initializer=tf_keras.initializers.RandomNormal(stddev=0.001))

  def call(self, roi_features, training=None):
    shape = tf.shape(roi_features)
    b, k = shape[0], shape[1]
    x = tf.reshape(roi_features, tf.concat([[b * k], shape[2:]], 0))
    bn_training = bool(training) and self.train_batch_norm
    x = self.block4(x, training=bn_training)[self.block4.output_name]
    x = tf.reduce_mean(x, axis=[1, 2])
    classes = tf.reshape(self.classifier(x), [b, k, self.num_classes + 1])
    boxes = tf.reshape(self.box_regressor(x), [b, k, 4 * (self.num_classes + 1)])
    return classes, boxes


def build_detector(trunk: resnet_lib.ResNetV2, num_classes: int, config):
  """Model Garden's R-CNN composed with the trunk and a block-4 box head.

  `config` is a detection.DetectionConfig. The second stage encodes box
  targets with Model Garden's weights of its first cascade level, the usual
  Faster R-CNN [10, 10, 5, 5].
  """
  level = feature_level(trunk.effective_output_stride)
  num_anchors = len(config.anchor_sizes) * len(config.aspect_ratios)
  base_depth = config.block4_base_depth or 2 * trunk.block_specs[-1].base_depth
  reg = (slim_layers.slim_l2(config.weight_decay) if config.weight_decay
         else None)
  return maskrcnn_model.MaskRCNNModel(
      backbone=TrunkBackbone(trunk, level, config.lasso_l1,
                             config.train_batch_norm, name='trunk_backbone'),
      decoder=None,
      rpn_head=dense_prediction_heads.RPNHead(
          min_level=level, max_level=level,
          num_anchors_per_location=num_anchors, num_convs=1,
          num_filters=config.rpn_filters, kernel_regularizer=reg,
          norm_momentum=config.head_batch_norm_decay, name='rpn_head'),
      detection_head=Block4BoxHead(
          trunk.scope, base_depth, config.block4_units, num_classes,
          train_batch_norm=config.train_batch_norm,
          weight_decay=config.weight_decay,
          batch_norm_decay=(None if config.block4_checkpoint
                            else config.head_batch_norm_decay),
          name='box_head'),
      roi_generator=roi_generator.MultilevelROIGenerator(
          pre_nms_top_k=config.pre_nms_top_k, nms_iou_threshold=0.7,
          num_proposals=config.num_proposals,
          test_pre_nms_top_k=config.pre_nms_top_k, test_nms_iou_threshold=0.7,
          test_num_proposals=config.num_proposals, use_batched_nms=True),
      roi_sampler=roi_sampler.ROISampler(
          mix_gt_boxes=True, num_sampled_rois=config.num_sampled_rois,
          foreground_fraction=config.foreground_fraction,
          foreground_iou_threshold=0.5, background_iou_high_threshold=0.5,
          background_iou_low_threshold=0.0),
      roi_aligner=CropAndPool(config.crop_size, name='crop_and_pool'),
      detection_generator=detection_generator.DetectionGenerator(
          apply_nms=True, pre_nms_top_k=5000, pre_nms_score_threshold=0.0,
          nms_iou_threshold=config.detection_nms_iou,
          max_num_detections=config.max_detections, nms_version='batched'),
      min_level=level, max_level=level, num_scales=1,
      aspect_ratios=list(config.aspect_ratios),
      anchor_size=config.anchor_sizes[0] / 2**level,
      name='faster_rcnn')
