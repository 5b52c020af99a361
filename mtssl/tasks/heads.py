"""Heads shared by tasks: the residual-unit heads of relative position and
exemplar (paper section 3.4), and the convolution stack of colorization and
motion segmentation (`ConvStackHead`).

The two residual-unit heads start with the same two strided Slim bottleneck
units on the trunk output of each patch (12x12x1024 for a 96x96 patch at
output stride 8):

    unit_1: out 1024, bottleneck 128, stride 2  -> 6x6x1024
    unit_2: out  512, bottleneck 128, stride 2  -> 3x3x512

They are `mtssl.backbones.resnet_v2.BottleneckV2`, i.e. Slim's pre-activation
bottleneck with explicit padding for the strided 3x3 convolution, projection
shortcut (1x1 conv of the pre-activation, with bias) when the depth changes
and subsampling otherwise, and Slim-form L2 weight decay (1e-4 * sum(w^2) / 2)
with Slim's variance-scaling initializer.

Exemplar uses the flattened 3x3x512 feature directly (`PatchEmbeddingHead`).
Relative position concatenates the flattened features of a pair and adds three
"fully-connected" residual units and an 8-way classifier
(`RelativePositionHead`). Choices made there, where the paper leaves room:

* Width. The paper gives the fully-connected units input and output
  dimensionality 4608 (= 3x3x512), but a concatenated pair is 9216 wide. The
  first unit therefore maps 9216 -> 4608 and, as every Slim bottleneck whose
  depth changes, has a projection shortcut (1x1 conv of its pre-activation,
  with bias); the other two are 4608 -> 4608 with identity shortcuts. All
  three have bottleneck 512.
* "Fully-connected" units are bottleneck units on 1x1 maps whose middle
  convolution is 1x1 (`FullyConnectedBottleneck`). A 3x3 kernel on a 1x1 map
  with SAME padding only ever touches its centre tap, so this is the same
  function class without 8/9 of the middle kernel being dead weights, and
  Slim's fan-in initializer then scales the middle layer as the dense layer it
  is.
* After the last unit, Slim's ResNet-v2 convention applies: `postnorm`
  (batch norm + ReLU) and then the logits, a 1x1 convolution with bias and
  weight decay, no normalization or activation.
* Widths are arguments (paper values by default) so that tests and CPU runs
  can use a small head. `fc_depth=None` means "the flattened width of one
  patch", 4608 for the paper's 96x96 patches.
"""

import math
from typing import Optional, Sequence

import tensorflow as tf
import tf_keras

from mtssl.backbones import resnet_v2

PAPER_UNIT_DEPTHS = (1024, 512)
PAPER_UNIT_BOTTLENECK = 128
PAPER_FC_BOTTLENECK = 512
PAPER_NUM_FC_UNITS = 3


class FullyConnectedBottleneck(resnet_v2.BottleneckV2):
  """A Slim bottleneck unit on 1x1 maps with a 1x1 middle convolution."""

  def __init__(self, depth, depth_bottleneck,
               weight_decay=resnet_v2.WEIGHT_DECAY, **kwargs):
    super().__init__(depth, depth_bottleneck, stride=1, rate=1,
                     weight_decay=weight_decay, **kwargs)
    # Replaces the 3x3 middle convolution before anything is built.
    self.conv2 = resnet_v2.SlimConv2D(depth_bottleneck, 1, 1,
                                      weight_decay=weight_decay, name='conv2')

  def get_config(self):
    config = super().get_config()
    del config['stride'], config['rate']
    return config


def patch_units(depths: Sequence[int] = PAPER_UNIT_DEPTHS,
                bottleneck: int = PAPER_UNIT_BOTTLENECK,
                weight_decay: float = resnet_v2.WEIGHT_DECAY):
  """The strided residual units applied to every patch's trunk features."""
  return [resnet_v2.BottleneckV2(depth, bottleneck, stride=2,
                                 weight_decay=weight_decay,
                                 name=f'unit_{i + 1}/bottleneck_v2')
          for i, depth in enumerate(depths)]


def _strided_size(size: int, num_units: int) -> int:
  # Every unit halves the map, rounding up (Slim's conv2d_same and the
  # strided subsampling shortcut agree on ceil(n / 2)).
  for _ in range(num_units):
    size = math.ceil(size / 2)
  return size


def _static_patch_width(input_shape, depths) -> int:
  height, width = input_shape[1], input_shape[2]
  if height is None or width is None:
    raise ValueError(f'The head needs a static spatial size of the trunk '
                     f'features to size its fully-connected layers; got '
                     f'input shape {tuple(input_shape)}.')
  n = len(depths)
  return _strided_size(int(height), n) * _strided_size(int(width), n) * depths[-1]


class PatchEmbeddingHead(tf_keras.Model):
  """Exemplar's head: per patch, two strided units, flattened (paper: 4608).

  Called on the trunk features of `group` patches per example stacked
  example-major ([group * B, h, w, C]); returns [B, group, D].
  """

  def __init__(self, group: int, unit_depths=PAPER_UNIT_DEPTHS,
               unit_bottleneck=PAPER_UNIT_BOTTLENECK,
               weight_decay=resnet_v2.WEIGHT_DECAY, **kwargs):
    super().__init__(**kwargs)
    self.group = group
    self.unit_depths = tuple(unit_depths)
    self.units = patch_units(self.unit_depths, unit_bottleneck, weight_decay)
    self.embedding_size = None

  def build(self, input_shape):
    self.embedding_size = _static_patch_width(input_shape, self.unit_depths)
    # Sub-layers build on the first call; Model.build would trace call() on
    # placeholders instead.
    tf_keras.layers.Layer.build(self, input_shape)

  def call(self, features, training=None):
    x = features
    for unit in self.units:
      x = unit(x, training=training)
    return tf.reshape(x, [-1, self.group, self.embedding_size])


class RelativePositionHead(tf_keras.Model):
  """Relative position's head (see the module docstring); 8-way logits.

  Called on the trunk features of both patches of every pair stacked
  pair-major ([2B, h, w, C]: pair 0 first patch, pair 0 second patch, pair 1
  first patch, ...); returns logits [B, num_classes].
  """

  def __init__(self, num_classes: int = 8, unit_depths=PAPER_UNIT_DEPTHS,
               unit_bottleneck=PAPER_UNIT_BOTTLENECK,
               fc_depth: Optional[int] = None,
               fc_bottleneck=PAPER_FC_BOTTLENECK,
               num_fc_units=PAPER_NUM_FC_UNITS,
               weight_decay=resnet_v2.WEIGHT_DECAY, **kwargs):
    super().__init__(**kwargs)
    self.num_classes = num_classes
    self.unit_depths = tuple(unit_depths)
    self.fc_depth = fc_depth
    self.fc_bottleneck = fc_bottleneck
    self.num_fc_units = num_fc_units
    self.weight_decay = weight_decay
    self.units = patch_units(self.unit_depths, unit_bottleneck, weight_decay)
    self.fc_units = []  # Sized in build() from the patch features' width.
    self.patch_width = None
    self.postnorm = tf_keras.layers.BatchNormalization(
        momentum=resnet_v2.BATCH_NORM_DECAY, epsilon=resnet_v2.BATCH_NORM_EPSILON,
        name='postnorm')
    self.logits = resnet_v2.SlimConv2D(num_classes, 1, batch_norm=False,
                                       activation=False,
                                       weight_decay=weight_decay, name='logits')

  def build(self, input_shape):
    self.patch_width = _static_patch_width(input_shape, self.unit_depths)
    depth = self.fc_depth or self.patch_width
    # Extend the tracked list rather than replacing it: a checkpoint restore
    # requested before the head was built is attached to this list object.
    self.fc_units.extend(
        FullyConnectedBottleneck(depth, self.fc_bottleneck,
                                 weight_decay=self.weight_decay,
                                 name=f'fc_unit_{i + 1}/bottleneck_v2')
        for i in range(self.num_fc_units))
    tf_keras.layers.Layer.build(self, input_shape)

  def patch_features(self, features, training=None):
    """The flattened per-patch features, [N, patch_width]."""
    x = features
    for unit in self.units:
      x = unit(x, training=training)
    return tf.reshape(x, [-1, self.patch_width])

  def call(self, features, training=None):
    # Row-major reshape of [2B, F] to [B, 2F] concatenates each pair's first
    # and second patch features, in that order.
    pairs = tf.reshape(self.patch_features(features, training=training),
                       [-1, 1, 1, 2 * self.patch_width])
    x = pairs
    for unit in self.fc_units:
      x = unit(x, training=training)
    x = tf.nn.relu(self.postnorm(x, training=training))
    return tf.reshape(self.logits(x), [-1, self.num_classes])


class ConvStackHead(tf_keras.Model):
  """Slim convolutions at stride 1, then a 1x1 convolution to the logits.

  The per-pixel heads of colorization and motion segmentation: hidden layer
  i is `SlimConv2D(widths[i], kernel_sizes[i])` (batch norm and ReLU, or a
  bias without batch norm), the logits a biased 1x1 convolution computed in
  float32 (so mixed precision leaves the loss in float32).
  """

  def __init__(self, widths: Sequence[int], kernel_sizes: Sequence[int],
               num_outputs: int, batch_norm: bool = True,
               weight_decay: float = resnet_v2.WEIGHT_DECAY, **kwargs):
    super().__init__(**kwargs)
    self.widths = tuple(int(w) for w in widths)
    if len(kernel_sizes) != len(self.widths):
      raise ValueError(f'{self.name}: {len(kernel_sizes)} kernel sizes for '
                       f'{len(self.widths)} widths.')
    self.hidden = [
        resnet_v2.SlimConv2D(width, kernel, 1, batch_norm=batch_norm,
                             activation=True, weight_decay=weight_decay,
                             name=f'conv{i + 1}')
        for i, (width, kernel) in enumerate(zip(self.widths, kernel_sizes))
    ]
    self.logits = tf_keras.layers.Conv2D(
        num_outputs, 1, padding='valid', use_bias=True,
        kernel_initializer=resnet_v2.SlimVarianceScaling(),
        kernel_regularizer=(resnet_v2.slim_l2(weight_decay)
                            if weight_decay else None),
        dtype='float32', name='logits')

  def call(self, inputs, training=None):
    net = inputs
    for layer in self.hidden:
      net = layer(net, training=training)
    return self.logits(tf.cast(net, tf.float32))
