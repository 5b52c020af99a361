"""Layers several task heads share: the strided patch units of relative
position and exemplar (paper section 3.4: two Slim bottleneck units on each
patch's trunk features, 12x12x1024 -> 3x3x512 for a 96x96 patch at output
stride 8), and the convolution stack of colorization and motion segmentation.
"""

import math
from typing import Sequence

import tensorflow as tf
import tf_keras

from mtssl.backbones import slim_layers

# Forward G multiply-accumulates of the two patch units on one 96x96 patch's
# trunk output (12x12x1024 at output stride 8), the reference count of the
# paper's model.
PAPER_PATCH_HEAD_GMACS = 0.05

PAPER_UNIT_DEPTHS = (1024, 512)
PAPER_UNIT_BOTTLENECK = 128


def patch_units(depths: Sequence[int] = PAPER_UNIT_DEPTHS,
                bottleneck: int = PAPER_UNIT_BOTTLENECK,
                weight_decay: float = slim_layers.WEIGHT_DECAY):
  """The strided residual units applied to every patch's trunk features."""
  return [slim_layers.BottleneckV2(depth, bottleneck, stride=2,
                                   weight_decay=weight_decay,
                                   name=f'unit_{i + 1}/bottleneck_v2')
          for i, depth in enumerate(depths)]


def strided_size(size: int, num_units: int) -> int:
  """Side after `num_units` stride-2 units: ceil(n / 2) each (Slim's
  conv2d_same and the strided subsampling shortcut agree on it)."""
  for _ in range(num_units):
    size = math.ceil(size / 2)
  return size


def static_patch_width(input_shape, depths) -> int:
  """Flattened width of one patch's features after the patch units."""
  height, width = input_shape[1], input_shape[2]
  if height is None or width is None:
    raise ValueError(f'The head needs a static spatial size of the trunk '
                     f'features to size its fully-connected layers; got '
                     f'input shape {tuple(input_shape)}.')
  n = len(depths)
  return strided_size(int(height), n) * strided_size(int(width), n) * depths[-1]


class ConvStackHead(tf_keras.Model):
  """Slim convolutions at stride 1, then a 1x1 convolution to the logits.

  The per-pixel heads of colorization and motion segmentation: hidden layer
  i is `SlimConv2D(widths[i], kernel_sizes[i])` (batch norm and ReLU, or a
  bias without batch norm), the logits a biased 1x1 convolution computed in
  float32 (so mixed precision leaves the loss in float32).
  """

  def __init__(self, widths: Sequence[int], kernel_sizes: Sequence[int],
               num_outputs: int, batch_norm: bool = True,
               weight_decay: float = slim_layers.WEIGHT_DECAY, **kwargs):
    super().__init__(**kwargs)
    self.widths = tuple(int(w) for w in widths)
    if len(kernel_sizes) != len(self.widths):
      raise ValueError(f'{self.name}: {len(kernel_sizes)} kernel sizes for '
                       f'{len(self.widths)} widths.')
    self.hidden = [
        slim_layers.SlimConv2D(width, kernel, 1, batch_norm=batch_norm,
                               activation=True, weight_decay=weight_decay,
                               name=f'conv{i + 1}')
        for i, (width, kernel) in enumerate(zip(self.widths, kernel_sizes))
    ]
    self.logits = tf_keras.layers.Conv2D(
        num_outputs, 1, padding='valid', use_bias=True,
        kernel_initializer=slim_layers.SlimVarianceScaling(),
        kernel_regularizer=(slim_layers.slim_l2(weight_decay)
                            if weight_decay else None),
        dtype='float32', name='logits')

  def call(self, inputs, training=None):
    net = inputs
    for layer in self.hidden:
      net = layer(net, training=training)
    return self.logits(tf.cast(net, tf.float32))
