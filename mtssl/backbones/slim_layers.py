"""TF-Slim's layers as ResNet-v2 uses them, in tf_keras: `slim.conv2d` with
`conv2d_same` padding, batch norm and initializer defaults of
`resnet_arg_scope`, and the pre-activation bottleneck unit. Each layer lists
its variables under their Slim names (`slim_variables`).

Typical use:

    unit = BottleneckV2(depth=256, depth_bottleneck=64, stride=2)
    y = unit(x, training=True)
"""

import math
from typing import Dict

import tensorflow as tf
import tf_keras

# Slim resnet_arg_scope defaults.
WEIGHT_DECAY = 1e-4
BATCH_NORM_DECAY = 0.997
BATCH_NORM_EPSILON = 1e-5


class SlimVarianceScaling(tf_keras.initializers.Initializer):
  """Slim's `variance_scaling_initializer()`: factor 2, fan-in, truncated normal.

  Slim draws from a normal truncated at two standard deviations with
  `stddev = sqrt(1.3 * factor / fan_in)`; Keras' VarianceScaling uses the
  slightly different correction 1 / 0.8796^2 = 1.2925, so it is not reused.
  """

  def __init__(self, factor=2.0, seed=None):
    self.factor = factor
    self.seed = seed

  def __call__(self, shape, dtype=None, **kwargs):
    dtype = tf.as_dtype(dtype or tf_keras.backend.floatx())
    fan_in = 1.0
    for dim in shape[:-1]:
      fan_in *= float(dim)
    stddev = math.sqrt(1.3 * self.factor / fan_in)
    if self.seed is None:
      return tf.random.truncated_normal(shape, 0.0, stddev, dtype=dtype)
    return tf.random.stateless_truncated_normal(
        shape, seed=[self.seed, 0], mean=0.0, stddev=stddev, dtype=dtype)

  def get_config(self):
    return {'factor': self.factor, 'seed': self.seed}


def slim_l2(weight_decay: float = WEIGHT_DECAY):
  """Slim's l2_regularizer(wd) = wd * tf.nn.l2_loss(w) = wd * sum(w**2) / 2."""
  return tf_keras.regularizers.L2(weight_decay / 2.0)


def slim_batch_norm(name):
  return tf_keras.layers.BatchNormalization(
      axis=-1, momentum=BATCH_NORM_DECAY, epsilon=BATCH_NORM_EPSILON,
      center=True, scale=True, name=name)


def batch_norm_variables(bn, prefix) -> Dict[str, tf.Variable]:
  return {
      f'{prefix}/gamma': bn.gamma,
      f'{prefix}/beta': bn.beta,
      f'{prefix}/moving_mean': bn.moving_mean,
      f'{prefix}/moving_variance': bn.moving_variance,
  }


class NativeAtrousConv2D(tf_keras.layers.Conv2D):
  """Conv2D whose dilation is an attribute of one Conv2D op
  (`--native_atrous`)."""

  def convolution_op(self, inputs, kernel):
    return tf.nn.conv2d(inputs, kernel, strides=list(self.strides),
                        padding=self.padding.upper(),
                        dilations=list(self.dilation_rate),
                        data_format='NHWC', name='Conv2D')


class SlimConv2D(tf_keras.layers.Layer):
  """`slim.conv2d` as used by ResNet-v2, with `conv2d_same` padding.

  With `batch_norm=True` the convolution has no bias and is followed by batch
  norm (Slim's normalizer_fn) and, with `activation=True`, a ReLU. Without
  batch norm the convolution has a bias. Strided convolutions use Slim's
  explicit symmetric padding followed by a VALID convolution; kernel size 1
  needs no padding at any stride. `native_atrous` runs a dilated convolution
  as one Conv2D op instead of
  SpaceToBatch, Conv2D, BatchToSpace.
  """

  def __init__(self, filters, kernel_size, stride=1, rate=1, batch_norm=True,
               activation=True, weight_decay=WEIGHT_DECAY, native_atrous=False,
               **kwargs):
    super().__init__(**kwargs)
    if stride > 1 and rate > 1:
      raise ValueError(f'{self.name}: stride {stride} with atrous rate {rate} '
                       f'is not supported.')
    self.filters = filters
    self.kernel_size = kernel_size
    self.stride = stride
    self.rate = rate
    self.use_batch_norm = batch_norm
    self.use_activation = activation
    self.weight_decay = weight_decay
    self.native_atrous = native_atrous
    k_eff = kernel_size + (kernel_size - 1) * (rate - 1)
    if stride > 1 and k_eff > 1:
      pad_total = k_eff - 1
      self._padding = (pad_total // 2, pad_total - pad_total // 2)
      conv_padding = 'valid'
    else:
      self._padding = None
      conv_padding = 'same'
    conv_class = (NativeAtrousConv2D if native_atrous and rate > 1
                  else tf_keras.layers.Conv2D)
    self.conv = conv_class(
        filters, kernel_size, strides=stride, dilation_rate=rate,
        padding=conv_padding, use_bias=not batch_norm,
        kernel_initializer=SlimVarianceScaling(),
        kernel_regularizer=slim_l2(weight_decay) if weight_decay else None,
        bias_initializer='zeros', name='conv')
    self.bn = slim_batch_norm('BatchNorm') if batch_norm else None

  def call(self, inputs, training=None):
    x = inputs
    if self._padding is not None:
      beg, end = self._padding
      x = tf.pad(x, [[0, 0], [beg, end], [beg, end], [0, 0]])
    x = self.conv(x)
    if self.bn is not None:
      x = self.bn(x, training=training)
    if self.use_activation:
      x = tf.nn.relu(x)
    return x

  def slim_variables(self, prefix: str) -> Dict[str, tf.Variable]:
    out = {f'{prefix}/weights': self.conv.kernel}
    if self.bn is None:
      out[f'{prefix}/biases'] = self.conv.bias
    else:
      out.update(batch_norm_variables(self.bn, f'{prefix}/BatchNorm'))
    return out

  def get_config(self):
    config = super().get_config()
    config.update(filters=self.filters, kernel_size=self.kernel_size,
                  stride=self.stride, rate=self.rate,
                  batch_norm=self.use_batch_norm,
                  activation=self.use_activation,
                  weight_decay=self.weight_decay,
                  native_atrous=self.native_atrous)
    return config


class BottleneckV2(tf_keras.layers.Layer):
  """Slim `resnet_v2.bottleneck`: the full pre-activation bottleneck unit."""

  def __init__(self, depth, depth_bottleneck, stride=1, rate=1,
               weight_decay=WEIGHT_DECAY, native_atrous=False, **kwargs):
    super().__init__(**kwargs)
    self.depth = depth
    self.depth_bottleneck = depth_bottleneck
    self.stride = stride
    self.rate = rate
    self.weight_decay = weight_decay
    self.native_atrous = native_atrous
    self.preact = slim_batch_norm('preact')
    self.shortcut = None  # Created in build() once the input depth is known.
    self.conv1 = SlimConv2D(depth_bottleneck, 1, 1, weight_decay=weight_decay,
                            name='conv1')
    self.conv2 = SlimConv2D(depth_bottleneck, 3, stride, rate,
                            weight_decay=weight_decay,
                            native_atrous=native_atrous, name='conv2')
    self.conv3 = SlimConv2D(depth, 1, 1, batch_norm=False, activation=False,
                            weight_decay=weight_decay, name='conv3')

  def build(self, input_shape):
    depth_in = int(input_shape[-1])
    if depth_in != self.depth:
      self.shortcut = SlimConv2D(self.depth, 1, self.stride, batch_norm=False,
                                 activation=False,
                                 weight_decay=self.weight_decay,
                                 name='shortcut')
    super().build(input_shape)

  def call(self, inputs, training=None):
    preact = tf.nn.relu(self.preact(inputs, training=training))
    if self.shortcut is None:
      # Slim's subsample(): a 1x1 max-pool with this stride, i.e. a strided
      # slice.
      shortcut = inputs if self.stride == 1 else (
          inputs[:, ::self.stride, ::self.stride, :])
    else:
      shortcut = self.shortcut(preact)
    residual = self.conv1(preact, training=training)
    residual = self.conv2(residual, training=training)
    residual = self.conv3(residual)
    return shortcut + residual

  def slim_variables(self, prefix: str) -> Dict[str, tf.Variable]:
    out = batch_norm_variables(self.preact, f'{prefix}/preact')
    if self.shortcut is not None:
      out.update(self.shortcut.slim_variables(f'{prefix}/shortcut'))
    for conv in (self.conv1, self.conv2, self.conv3):
      out.update(conv.slim_variables(f'{prefix}/{conv.name}'))
    return out

  def get_config(self):
    config = super().get_config()
    config.update(depth=self.depth, depth_bottleneck=self.depth_bottleneck,
                  stride=self.stride, rate=self.rate,
                  weight_decay=self.weight_decay,
                  native_atrous=self.native_atrous)
    return config
