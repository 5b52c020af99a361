"""ImageNet linear classification on frozen block-3 features (paper section 5).

Holds `LinearConfig`, the adaptive 3x3 max-pool + standardization + softmax
layer model, the augmentation and the registered `linear` protocol. Choices:
BUILD.md, "Linear protocol".

Typical use:

    python -m mtssl.evaluate linear --init_checkpoint=CKPT --model_dir=DIR
"""

import dataclasses
from typing import Optional

import tensorflow as tf
import tf_keras

from mtssl.configs import base
from mtssl.models import lasso as lasso_lib
from mtssl.ops import preprocessing
from mtssl.ops import pooling
from mtssl.backbones import slim_layers
from mtssl.evaluation import augment
from mtssl.evaluation import data as data_lib
from mtssl.evaluation import label_checks
from mtssl.evaluation import metrics as metrics_lib
from mtssl.evaluation import registry
from mtssl.evaluation import runner


@dataclasses.dataclass
class LinearConfig:
  """Settings of the linear protocol (flags --<field>)."""
  num_classes: Optional[int] = base.field(
      None, 'classes (None: the training data\'s)')
  image_size: int = base.field(224, 'side of the square crop')
  resize_size: int = base.field(256, 'shorter side before the crop')
  pool_size: int = base.field(3, 'adaptive max pool to this many bins a side')
  lasso_l1: Optional[float] = base.field(
      None, 'feed the classifier a lasso combination of all block-3 units '
      'with this L1 weight (the paper\'s "eval only lasso"); None: the '
      'block-3 output')
  weight_decay: float = base.field(0.0, 'L2 weight decay (Slim form) of the '
                                   'classifier')
  color_augment: bool = base.field(True, 'color distortion of training crops')
  feature_norm: bool = base.field(True, 'standardize the pooled features '
                                  '(batch norm without scale or offset)')

  def validate(self):
    if self.image_size < 16:
      raise ValueError(f'image_size must be >= 16, got {self.image_size}.')
    if self.resize_size < self.image_size:
      raise ValueError(f'resize_size ({self.resize_size}) must be >= '
                       f'image_size ({self.image_size}).')
    if self.pool_size < 1:
      raise ValueError(f'pool_size must be >= 1, got {self.pool_size}.')
    if self.num_classes is not None and self.num_classes < 2:
      raise ValueError(f'num_classes must be >= 2, got {self.num_classes}.')
    if self.lasso_l1 is not None and self.lasso_l1 < 0:
      raise ValueError(f'lasso_l1 must be >= 0, got {self.lasso_l1}.')
    if self.weight_decay < 0:
      raise ValueError(f'weight_decay must be >= 0, got {self.weight_decay}.')


class LinearHead(tf_keras.Model):
  """[lasso over block-3 units ->] adaptive max pool -> flatten -> softmax layer."""

  def __init__(self, num_classes, pool_size, unit_names=None, lasso_l1=None,
               weight_decay=0.0, feature_norm=True, **kwargs):
    super().__init__(**kwargs)
    self.pool_size = pool_size
    # Standardization only (no learned scale or offset): at evaluation it is
    # a fixed affine map, which the linear layer absorbs.
    self.feature_norm = (tf_keras.layers.BatchNormalization(
        center=False, scale=False, momentum=0.99, epsilon=1e-3,
        name='feature_norm') if feature_norm else None)
    self.lasso = (lasso_lib.UnitLasso(unit_names, lasso_l1, name='lasso_eval')
                  if lasso_l1 is not None else None)
    self.classifier = tf_keras.layers.Dense(
        num_classes, name='logits',
        kernel_regularizer=(slim_layers.slim_l2(weight_decay)
                            if weight_decay else None))

  def call(self, end_points, output_name, training=None):
    if self.lasso is not None:
      features = self.lasso(end_points)
    else:
      features = end_points[output_name]
    pooled = pooling.adaptive_max_pool2d(features, (self.pool_size,) * 2)
    flat = tf.reshape(pooled, [tf.shape(pooled)[0], -1])
    if self.feature_norm is not None:
      flat = self.feature_norm(flat, training=training)
    return self.classifier(flat)


@registry.register_protocol('linear')
class LinearProtocol(runner.Protocol):
  """Frozen trunk + linear softmax classifier (section 5, ImageNet frozen)."""

  config_class = LinearConfig
  data_kind = 'classification'
  # The paper gives none (BUILD.md): 30 epochs of batch 256, learning rate
  # 0.01 divided by 10 every 10 epochs.
  run_defaults = dict(train_steps=150000, batch_size=256, eval_batch_size=250,
                      optimizer='momentum', learning_rate=0.01,
                      lr_decay_steps=50000, lr_decay_rate=0.1)
  trunk_defaults = dict(output_stride=8)
  paper_columns = ('Table 1: ImageNet top1 / top5 (Ours); Tables 2-4: '
                   'ImageNet (top-5)')
  headline = 'top5'
  table_header = '| Pre-training | ImageNet top1 | ImageNet top5 |'
  head = None  # built by build()

  @classmethod
  def synthetic_size(cls, config):
    return (config.resize_size, config.resize_size)

  # Data -------------------------------------------------------------------
  def validate(self):
    super().validate()
    self.resolve_num_classes()
    train_names = self.train_source.class_names
    eval_names = self.eval_source.class_names
    if train_names and eval_names and train_names != eval_names:
      raise data_lib.DataSourceError(
          f'The training data {self.train_source.name} and the evaluation '
          f'data {self.eval_source.name} name their classes differently '
          f'(first difference: {_first_difference(train_names, eval_names)}).')

  def _check(self, ex):
    label = label_checks.assert_class_range(
        ex['label'], self.config.num_classes, ex['index'])
    return label

  def train_dataset(self, seed, start, batch_size):
    c = self.config

    def _example(ex):
      key = augment.example_seed(seed, ex['index'])
      image = augment.resize_shorter_side(ex['image'], c.resize_size)
      image = tf.image.stateless_random_crop(
          image, [c.image_size, c.image_size, 3], augment.fold(key, 0))
      if c.color_augment:
        image = augment.distort_color(image, key)
      return {'index': ex['index'],
              'image': preprocessing.vgg_preprocess(image),
              'label': self._check(ex)}

    return self.batched_train(_example, seed, start, batch_size)

  def eval_dataset(self, batch_size):
    c = self.config

    def _example(ex):
      image = augment.resize_shorter_side(ex['image'], c.resize_size)
      shape = tf.shape(image)
      image = tf.image.crop_to_bounding_box(
          image, (shape[0] - c.image_size) // 2, (shape[1] - c.image_size) // 2,
          c.image_size, c.image_size)
      return {'index': ex['index'],
              'image': preprocessing.vgg_preprocess(image),
              'label': self._check(ex)}

    return self.batched_eval(_example, batch_size)

  # Model ------------------------------------------------------------------
  def build(self, batch):
    c = self.config
    self.head = LinearHead(
        c.num_classes, c.pool_size,
        unit_names=self.trunk.unit_names(self.trunk.block_specs[-1].scope),
        lasso_l1=c.lasso_l1, weight_decay=c.weight_decay,
        feature_norm=c.feature_norm, name='linear_head')
    self._logits(batch, training=False)

  def _logits(self, batch, training):
    end_points = self.trunk(batch['image'], training=False)
    end_points = {k: tf.stop_gradient(v) for k, v in end_points.items()}
    return self.head(end_points, self.trunk.output_name, training=training)

  @property
  def checkpoint_items(self):
    return {'backbone': self.trunk, 'head': self.head}

  def trainable_variables(self):
    return list(self.head.trainable_variables)

  def losses(self, batch):
    logits = self._logits(batch, training=True)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=batch['label'], logits=logits))
    reg = tf.add_n([tf.constant(0.0)] + list(self.head.losses))
    return {'classification': loss, 'regularization': reg,
            'total': loss + reg}

  def predict(self, batch):
    return {'logits': self._logits(batch, training=False)}

  # Metrics ----------------------------------------------------------------
  def new_accumulator(self):
    return metrics_lib.TopKAccumulator((1, 5))

  def accumulate(self, accumulator, batch, outputs):
    accumulator.update(outputs['logits'], batch['label'])

  def chance(self):
    n = self.config.num_classes
    return {'top1': 100.0 / n, 'top5': 100.0 * min(5, n) / n}

  def table_row(self, label, metrics):
    return f'| {label} | {metrics["top1"]:.2f} | {metrics["top5"]:.2f} |'

  def lasso_layer(self):
    return None if self.head is None else self.head.lasso


def _first_difference(a, b):
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return f'class {i}: {x!r} vs {y!r}'
  return f'{len(a)} vs {len(b)} classes'
