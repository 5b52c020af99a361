"""NYUv2 depth (paper section 5): Laina et al.'s up-projection decoder on block 3.

Holds `DepthConfig`, the fast `UpProjection` layer, the berHu loss, the input
pipeline and the registered `depth` protocol. Choices: BUILD.md, "Depth
protocol".

Typical use:

    python -m mtssl.evaluate depth --init_checkpoint=CKPT --model_dir=DIR
"""

import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tf_keras

from mtssl.configs import base
from mtssl.configs import evaluation as evaluation_config
from mtssl.models import lasso as lasso_lib
from mtssl.ops import preprocessing
from mtssl.backbones import slim_layers
from mtssl.evaluation import augment
from mtssl.evaluation import metrics as metrics_lib
from mtssl.evaluation import registry
from mtssl.evaluation import runner


BATCH_NORM = ('train', 'frozen')


@dataclasses.dataclass
class DepthConfig:
  """Settings of the depth protocol (flags --<field>)."""
  image_size: Tuple[int, int] = base.field(
      (240, 320), 'training input size S or H,W')
  upproj_filters: Tuple[int, ...] = base.field(
      (512, 256, 128), 'filters of the up-projection blocks')
  lasso_l1: Optional[float] = base.field(
      None, 'feed the decoder a lasso combination of all block-3 units with '
      'this L1 weight; None: the block-3 output')
  batch_norm: str = base.field('train', 'batch norm of the fine-tuned trunk',
                               choices=BATCH_NORM)
  # TensorFlow's default; the trunk keeps Slim's 0.997. Short runs need a
  # faster average.
  head_batch_norm_decay: float = base.field(
      0.99, 'moving-average decay of the decoder\'s batch norms')
  weight_decay: float = base.field(1e-4, 'L2 weight decay (Slim form) of the '
                                   'trunk and the decoder')
  min_depth: float = base.field(1e-3, 'lower clip of predictions (m)')
  max_depth: float = base.field(10.0, 'upper clip of predictions (m)')
  flip: bool = base.field(True, 'random horizontal flip in training')
  color_augment: bool = base.field(True, 'color distortion in training')
  berhu_fraction: float = base.field(
      0.2, 'berHu threshold as a fraction of the batch\'s largest residual')
  baseline_examples: int = base.field(
      64, 'training examples whose median depth is the chance-level '
      'constant prediction')

  def __post_init__(self):
    self.image_size = evaluation_config.square(self.image_size, 'image_size')

  @property
  def train_batch_norm(self) -> bool:
    return self.batch_norm == 'train'

  def validate(self):
    if self.batch_norm not in BATCH_NORM:
      raise ValueError(f'batch_norm must be one of {BATCH_NORM}, got '
                       f'{self.batch_norm!r}.')
    if len(self.image_size) != 2 or min(self.image_size) < 16:
      raise ValueError(f'image_size must be (height, width) >= 16, got '
                       f'{self.image_size}.')
    if not self.upproj_filters or min(self.upproj_filters) < 1:
      raise ValueError(f'upproj_filters must be positive, got '
                       f'{self.upproj_filters}.')
    if not 0 < self.min_depth < self.max_depth:
      raise ValueError(f'need 0 < min_depth < max_depth, got '
                       f'{self.min_depth}, {self.max_depth}.')
    if self.lasso_l1 is not None and self.lasso_l1 < 0:
      raise ValueError(f'lasso_l1 must be >= 0, got {self.lasso_l1}.')
    if not 0 <= self.head_batch_norm_decay < 1:
      raise ValueError(f'head_batch_norm_decay must be in [0, 1), got '
                       f'{self.head_batch_norm_decay}.')
    if not 0 < self.berhu_fraction <= 1:
      raise ValueError(f'berhu_fraction must be in (0, 1], got '
                       f'{self.berhu_fraction}.')
    if self.baseline_examples < 1:
      raise ValueError(f'baseline_examples must be >= 1, got '
                       f'{self.baseline_examples}.')


def _conv(filters, kernel, name, weight_decay, use_bias=False):
  return tf_keras.layers.Conv2D(
      filters, kernel, padding='valid', use_bias=use_bias,
      kernel_initializer=slim_layers.SlimVarianceScaling(),
      kernel_regularizer=(slim_layers.slim_l2(weight_decay)
                          if weight_decay else None), name=name)


def _bn(name, decay):
  return tf_keras.layers.BatchNormalization(
      momentum=decay, epsilon=slim_layers.BATCH_NORM_EPSILON, name=name)


def interleave(a, b, c, d):
  """Y[2i, 2j] = a, Y[2i, 2j+1] = b, Y[2i+1, 2j] = c, Y[2i+1, 2j+1] = d."""
  shape = tf.shape(a)
  n, h, w, ch = shape[0], shape[1], shape[2], shape[3]
  top = tf.reshape(tf.stack([a, b], axis=3), [n, h, 2 * w, ch])
  bottom = tf.reshape(tf.stack([c, d], axis=3), [n, h, 2 * w, ch])
  return tf.reshape(tf.stack([top, bottom], axis=2), [n, 2 * h, 2 * w, ch])


class FastUnpoolConv(tf_keras.layers.Layer):
  """2x zero-unpooling + 5x5 SAME convolution, computed on the input grid.

  Unpooling puts x[i, j] at (2i, 2j). An even output row 2i then sees input
  rows i-1, i, i+1 through kernel rows 0, 2, 4; an odd row 2i+1 sees rows i,
  i+1 through kernel rows 1, 3 (columns likewise). Hence four convolutions:
  A 3x3 (even, even), B 3x2 (even row, odd column), C 2x3, D 2x2, each with
  the padding that centres its taps.
  """

  def __init__(self, filters, weight_decay=0.0, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.conv_a = _conv(filters, (3, 3), 'conv_a', weight_decay)
    self.conv_b = _conv(filters, (3, 2), 'conv_b', weight_decay)
    self.conv_c = _conv(filters, (2, 3), 'conv_c', weight_decay)
    self.conv_d = _conv(filters, (2, 2), 'conv_d', weight_decay)

  def call(self, x):
    even, odd = (1, 1), (0, 1)  # (before, after) padding per parity
    def run(conv, rows, cols):
      return conv(tf.pad(x, [[0, 0], list(rows), list(cols), [0, 0]]))
    return interleave(run(self.conv_a, even, even), run(self.conv_b, even, odd),
                      run(self.conv_c, odd, even), run(self.conv_d, odd, odd))

  def set_from_5x5(self, kernel):
    """Sets the four kernels from one [5, 5, in, out] kernel (for tests)."""
    kernel = np.asarray(kernel)
    self.conv_a.kernel.assign(kernel[0::2, 0::2])
    self.conv_b.kernel.assign(kernel[0::2, 1::2])
    self.conv_c.kernel.assign(kernel[1::2, 0::2])
    self.conv_d.kernel.assign(kernel[1::2, 1::2])


class UpProjection(tf_keras.layers.Layer):
  """Laina et al.'s up-projection block (fast form), 2x upsampling."""

  def __init__(self, filters, weight_decay=0.0, batch_norm_decay=0.99,
               **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.unpool1 = FastUnpoolConv(filters, weight_decay, name='branch1_unpool')
    self.bn1 = _bn('branch1_bn1', batch_norm_decay)
    self.conv = _conv(filters, (3, 3), 'branch1_conv', weight_decay)
    self.bn2 = _bn('branch1_bn2', batch_norm_decay)
    self.unpool2 = FastUnpoolConv(filters, weight_decay, name='branch2_unpool')
    self.bn3 = _bn('branch2_bn', batch_norm_decay)

  def call(self, x, training=None):
    b1 = tf.nn.relu(self.bn1(self.unpool1(x), training=training))
    b1 = self.bn2(self.conv(tf.pad(b1, [[0, 0], [1, 1], [1, 1], [0, 0]])),
                  training=training)
    b2 = self.bn3(self.unpool2(x), training=training)
    return tf.nn.relu(b1 + b2)


class DepthHead(tf_keras.Model):
  """[lasso ->] up-projections -> 3x3 conv to depth."""

  def __init__(self, filters: Sequence[int], unit_names=None, lasso_l1=None,
               weight_decay=0.0, batch_norm_decay=0.99, **kwargs):
    super().__init__(**kwargs)
    self.lasso = (lasso_lib.UnitLasso(unit_names, lasso_l1, name='lasso_eval')
                  if lasso_l1 is not None else None)
    self.up = [UpProjection(f, weight_decay, batch_norm_decay,
                            name=f'up_projection_{i + 1}')
               for i, f in enumerate(filters)]
    self.predict_conv = _conv(1, (3, 3), 'depth_pred', weight_decay,
                              use_bias=True)

  def call(self, end_points, output_name, training=None):
    x = (self.lasso(end_points) if self.lasso is not None
         else end_points[output_name])
    for up in self.up:
      x = up(x, training=training)
    x = self.predict_conv(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]))
    return x[..., 0]


def berhu_loss(pred, gt, fraction=0.2):
  """Reverse Huber loss over valid pixels (gt finite and > 0), mean."""
  valid = tf.math.is_finite(gt) & (gt > 0)
  residual = tf.abs(tf.boolean_mask(pred - tf.where(valid, gt, 0.0), valid))
  c = tf.stop_gradient(fraction * tf.reduce_max(
      tf.concat([residual, [0.0]], 0)))
  safe_c = tf.maximum(c, 1e-12)
  loss = tf.where(residual <= c, residual,
                  (tf.square(residual) + tf.square(c)) / (2.0 * safe_c))
  count = tf.cast(tf.size(residual), tf.float32)
  return tf.reduce_sum(loss) / tf.maximum(count, 1.0)


def resize_depth_nearest(depth, size):
  return tf.image.resize(depth[..., None], size, method='nearest')[..., 0]


@registry.register_protocol('depth')
class DepthProtocol(runner.Protocol):
  """Fine-tuned trunk + up-projection decoder (section 5, NYUv2 depth)."""

  config_class = DepthConfig
  data_kind = 'depth'
  # Our choice (BUILD.md): RMSProp 1e-4, batch 16, 80k steps.
  run_defaults = dict(train_steps=80000, batch_size=16, eval_batch_size=8,
                      optimizer='rmsprop', learning_rate=1e-4)
  trunk_defaults = dict(output_stride=16)
  paper_columns = ('Tables 5-8: Pct. < 1.25 / 1.25^2 / 1.25^3, Mean Absolute '
                   'Error, Mean Relative Error; Tables 1-4: NYU (Pct. < 1.25)')
  headline = 'delta1'
  table_header = ('| Pre-training | Pct. < 1.25 | Pct. < 1.25^2 | '
                  'Pct. < 1.25^3 | Mean Absolute Error | Mean Relative '
                  'Error |')
  head = None  # built by build()

  # Data -------------------------------------------------------------------
  def _image(self, image):
    return tf.image.resize(tf.cast(image, tf.float32), self.config.image_size,
                           antialias=True)

  def train_dataset(self, seed, start, batch_size):
    c = self.config

    def _example(ex):
      key = augment.example_seed(seed, ex['index'])
      image = self._image(ex['image'])
      depth = resize_depth_nearest(ex['depth'], c.image_size)
      if c.flip:
        flip = augment.random_flip(key)
        image = tf.where(flip, image[:, ::-1], image)
        depth = tf.where(flip, depth[:, ::-1], depth)
      if c.color_augment:
        image = augment.distort_color(image, key)
      return {'index': ex['index'],
              'image': preprocessing.vgg_preprocess(image), 'depth': depth}

    return self.batched_train(_example, seed, start, batch_size)

  def eval_dataset(self, batch_size):
    def _example(ex):
      return {'index': ex['index'],
              'image': preprocessing.vgg_preprocess(self._image(ex['image'])),
              'depth': ex['depth']}

    return self.batched_eval(_example, batch_size)

  # Model ------------------------------------------------------------------
  def build(self, batch):
    c = self.config
    self.head = DepthHead(
        c.upproj_filters,
        unit_names=self.trunk.unit_names(self.trunk.block_specs[-1].scope),
        lasso_l1=c.lasso_l1, weight_decay=c.weight_decay,
        batch_norm_decay=c.head_batch_norm_decay, name='depth_head')
    self._depth(batch, tf.shape(batch['depth'])[1:3], training=False)

  def _depth(self, batch, size, training):
    # `train_batch_norm` is about the pre-trained trunk; the decoder's own
    # batch norms always train.
    end_points = self.trunk(batch['image'],
                            training=training and self.config.train_batch_norm)
    pred = self.head(end_points, self.trunk.output_name, training=training)
    return tf.image.resize(pred[..., None], size, method='bilinear')[..., 0]

  @property
  def checkpoint_items(self):
    return {'backbone': self.trunk, 'head': self.head}

  def trainable_variables(self):
    return (list(self.trunk.trainable_variables)
            + list(self.head.trainable_variables))

  def losses(self, batch):
    pred = self._depth(batch, tf.shape(batch['depth'])[1:3], training=True)
    loss = berhu_loss(pred, batch['depth'], self.config.berhu_fraction)
    reg = tf.add_n([tf.constant(0.0)] + list(self.trunk.losses)
                   + list(self.head.losses))
    return {'berhu': loss, 'regularization': reg, 'total': loss + reg}

  def predict(self, batch):
    pred = self._depth(batch, tf.shape(batch['depth'])[1:3], training=False)
    return {'depth': tf.clip_by_value(pred, self.config.min_depth,
                                      self.config.max_depth)}

  # Metrics ----------------------------------------------------------------
  def new_accumulator(self):
    return metrics_lib.DepthAccumulator()

  def accumulate(self, accumulator, batch, outputs):
    accumulator.update(outputs['depth'], batch['depth'])

  def chance(self):
    """Metrics of a constant prediction: the median training depth."""
    values = []
    for ex in self.train_source.train(0, 0).take(self.config.baseline_examples):
      d = ex['depth'].numpy()
      values.append(d[metrics_lib.depth_valid_mask(d)])
    values = np.concatenate(values) if values else np.zeros([0])
    constant = float(np.median(values)) if values.size else 1.0
    acc = metrics_lib.DepthAccumulator()
    for ex in self.eval_source.eval():
      d = ex['depth'].numpy()
      acc.update(np.full_like(d, constant), d)
    out = acc.result()
    out['constant_prediction'] = constant
    return out

  def table_row(self, label, metrics):
    m = metrics
    return (f'| {label} | {m["delta1"]:.2f} | {m["delta2"]:.2f} | '
            f'{m["delta3"]:.2f} | {m["mae"]:.3f} | {m["rel"]:.3f} |')

  def lasso_layer(self):
    return None if self.head is None else self.head.lasso
