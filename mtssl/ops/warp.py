"""TensorFlow's projective warp (bilinear, REFLECT fill) in ops XLA compiles.

`tf.raw_ops.ImageProjectiveTransformV3` has no XLA kernel, so a compiled
step cannot call it. `projective_bilinear` computes the same function from
gathers and arithmetic in the kernel's order of operations: output pixel
(x, y) (integer coordinates) samples the input at
((t0 x + t1 y + t2) / p, (t3 x + t4 y + t5) / p), p = t6 x + t7 y + 1;
coordinates outside the image are reflected ([dcba|abcd|dcba]) and clamped,
and the bilinear neighbours past the last row or column read 0. Run eagerly
it equals the kernel bit for bit; in a tf.function Grappler's arithmetic
rewrites, and under XLA its fused multiply-adds, move values by about 1e-7
to 6e-6 (the tests measure them).

Typical use:

    views = warp.projective_bilinear(images, transforms, [96, 96])
    # == ImageProjectiveTransformV3(images, transforms, [96, 96],
    #        interpolation='BILINEAR', fill_mode='REFLECT', fill_value=0)
"""

import tensorflow as tf


def _reflect(coord, length):
  """The kernel's REFLECT map of float32 coordinates into [0, length - 1]
  (`length` a positive int32 scalar)."""
  size = tf.cast(length, tf.float32)
  span = 2.0 * size
  # Below 0: fold by whole periods (the kernel truncates -c / span), then
  # reflect once.
  low = span * tf.floor(-coord / span) + coord
  low = tf.where(low < -size, low + span, -low - 1.0)
  # Above length - 1.
  high = coord - span * tf.floor(coord / span)
  high = tf.where(high >= size, span - high - 1.0, high)
  mapped = tf.where(coord < 0.0, low, tf.where(coord > size - 1.0, high,
                                               coord))
  mapped = tf.where(length <= 1, tf.zeros_like(mapped), mapped)
  return tf.clip_by_value(mapped, 0.0, size - 1.0)


def projective_bilinear(images, transforms, output_shape, image_index=None):
  """images [M, H, W, C] float32, transforms [N, 8] float32 -> [N, out_h,
  out_w, C] (see the module docstring). Transform i warps image
  image_index[i] (int32 [N]; default i, with M == N)."""
  images = tf.convert_to_tensor(images, tf.float32)
  transforms = tf.convert_to_tensor(transforms, tf.float32)
  out_h, out_w = (int(d) for d in output_shape)
  shape = tf.shape(images)
  height, width = shape[1], shape[2]
  t = [transforms[:, i, tf.newaxis, tf.newaxis] for i in range(8)]
  y_out = tf.range(out_h, dtype=tf.float32)[tf.newaxis, :, tf.newaxis]
  x_out = tf.range(out_w, dtype=tf.float32)[tf.newaxis, tf.newaxis, :]
  projection = t[6] * x_out + t[7] * y_out + 1.0
  x = _reflect((t[0] * x_out + t[1] * y_out + t[2]) / projection, width)
  y = _reflect((t[3] * x_out + t[4] * y_out + t[5]) / projection, height)
  x_floor, y_floor = tf.floor(x), tf.floor(y)
  x_ceil, y_ceil = x_floor + 1.0, y_floor + 1.0
  # Neighbours as flat indices into [N * H * W, C]; past the edge: 0.
  flat = tf.reshape(images, [-1, shape[3]])
  if image_index is None:
    image_index = tf.range(shape[0])
  base = (image_index * height * width)[:, tf.newaxis, tf.newaxis]
  rows = [tf.cast(y_floor, tf.int32), tf.cast(y_ceil, tf.int32)]
  cols = [tf.cast(x_floor, tf.int32), tf.cast(x_ceil, tf.int32)]

  def read(row, col):
    inside = (row < height) & (col < width)
    index = base + tf.minimum(row, height - 1) * width + tf.minimum(
        col, width - 1)
    return tf.where(inside[..., tf.newaxis], tf.gather(flat, index), 0.0)

  right, left = (x - x_floor)[..., tf.newaxis], (x_ceil - x)[..., tf.newaxis]
  top = left * read(rows[0], cols[0]) + right * read(rows[0], cols[1])
  bottom = left * read(rows[1], cols[0]) + right * read(rows[1], cols[1])
  out = ((y_ceil - y)[..., tf.newaxis] * top +
         (y - y_floor)[..., tf.newaxis] * bottom)
  # An infinite coordinate (projection 0) gives the fill value.
  return tf.where((projection == 0.0)[..., tf.newaxis], 0.0, out)
