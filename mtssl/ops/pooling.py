"""Adaptive max pooling to a fixed grid (the paper's 3x3x1024 block-3 feature).

Along an axis of n positions and k bins, bin i covers
[floor(i n / k), ceil((i + 1) n / k)), as PyTorch's AdaptiveMaxPool2d:
32x32 -> bins [0, 11), [10, 22), [21, 32). Inputs smaller than the grid
repeat positions; shapes may be dynamic.
"""

from typing import List, Sequence, Tuple

import tensorflow as tf


def adaptive_bins(length: int, bins: int) -> List[Tuple[int, int]]:
  """The (start, end) of each of `bins` bins over `length` positions."""
  if length < 1 or bins < 1:
    raise ValueError(f'adaptive_bins needs length >= 1 and bins >= 1, got '
                     f'length={length}, bins={bins}.')
  return [((i * length) // bins, -((-(i + 1) * length) // bins))
          for i in range(bins)]


def _bin_bounds(length, bins, i):
  # Same arithmetic as adaptive_bins on a (possibly dynamic) scalar tensor.
  return (i * length) // bins, -((-(i + 1) * length) // bins)


def adaptive_max_pool2d(features, output_size: Sequence[int] = (3, 3)):
  """Max-pools [B, H, W, C] features to [B, out_h, out_w, C] (bins above)."""
  features = tf.convert_to_tensor(features)
  if features.shape.rank is not None and features.shape.rank != 4:
    raise ValueError(f'adaptive_max_pool2d expects [batch, height, width, '
                     f'channels] features, got shape {features.shape}.')
  out_h, out_w = (int(s) for s in output_size)
  if out_h < 1 or out_w < 1:
    raise ValueError(f'output_size must be positive, got {tuple(output_size)}.')
  shape = tf.shape(features)
  height, width = shape[1], shape[2]
  rows = []
  for i in range(out_h):
    h0, h1 = _bin_bounds(height, out_h, i)
    cols = []
    for j in range(out_w):
      w0, w1 = _bin_bounds(width, out_w, j)
      cols.append(tf.reduce_max(features[:, h0:h1, w0:w1, :], axis=[1, 2]))
    rows.append(tf.stack(cols, axis=1))
  return tf.stack(rows, axis=1)
