"""Windows of a resized image, resampled anywhere from a cut of the original.

`tf.image.resize(image, [h, w], 'bilinear', antialias=True)` and a window of
it are TensorFlow's ScaleAndTranslate op (triangle kernel, antialiased). Its
weights depend only on the scale, the window's corner and the image size,
so a window can be computed from the source pixels it reads: `cut` takes
them from the image (a fixed-size region, in the input pipeline) and
`resample` applies the op's weights to them as two matrix products (in a
compiled step, batched). The result equals the op's within float32 rounding
of the sums (the test measures it).

Typical use:

    region = windows.cut(image, [h, w], corner, 96, region=160)  # host
    window = windows.resample(*region_batch, size=96)             # device
"""

from typing import Dict

import tensorflow as tf

CUT_KEYS = ('region', 'origin', 'image_size', 'scale', 'corner')
# ScaleAndTranslate's 'triangle' kernel has radius 1 (in output pixels,
# times 1 / scale when antialiased and downscaling).
_RADIUS = 1.0


def _axis_bounds(corner, scale, size: int, length):
  """[first, end) of the source pixels that a window of `size` output pixels
  at `corner` reads along an axis of `length` pixels (one pixel of margin
  either side), float64 arithmetic."""
  inv = 1.0 / tf.cast(scale, tf.float64)
  reach = tf.maximum(inv, 1.0) * _RADIUS
  corner = tf.cast(corner, tf.float64)
  first = tf.math.floor((corner + 0.5) * inv - reach - 0.5) - 1.0
  end = tf.math.ceil((corner + size - 0.5) * inv + reach - 0.5) + 2.0
  length = tf.cast(length, tf.float64)
  return (tf.cast(tf.clip_by_value(first, 0.0, length), tf.int32),
          tf.cast(tf.clip_by_value(end, 0.0, length), tf.int32))


def cut(image, resized, corner, size: int, region: int,
        window_fn=None, channels=None) -> Dict[str, tf.Tensor]:
  """The source pixels of one window, for `resample`.

  image: [H, W, C] (any real dtype) to be resized to `resized` ([2] int,
  height and width); corner: [2] (y, x) of the size x size window in the
  resized image. Returns float32 region [region, region, C] (the pixels the
  window reads, zero-padded) and its resampling parameters: origin [2]
  int32 (the region's place in the image), image_size [2] int32, scale [2]
  float32, corner [2] float32. A window that reads more than region x
  region pixels (a large downscale) is computed here by `window_fn(image,
  resized, corner)` (float32 [size, size, C]) and sent as its own region
  with an identity resampling. `channels` (int [k]) keeps those channels
  of the image alone.
  """
  shape = tf.shape(image)[:2]
  scale = tf.cast(resized, tf.float32) / tf.cast(shape, tf.float32)
  bounds = [_axis_bounds(corner[a], scale[a], size, shape[a]) for a in (0, 1)]
  first = tf.stack([b[0] for b in bounds])
  extent = tf.stack([b[1] for b in bounds]) - first
  depth = image.shape[-1] if channels is None else channels.shape[0]

  def _kept(x):
    return x if channels is None else tf.gather(x, channels, axis=-1)

  def _region():
    part = tf.cast(_kept(image[first[0]:first[0] + extent[0],
                               first[1]:first[1] + extent[1]]), tf.float32)
    return (_pad(part, region), first, shape, scale,
            tf.cast(corner, tf.float32))

  def _window():
    window = tf.cast(_kept(window_fn(image, resized, corner)), tf.float32)
    return (_pad(window, region), tf.zeros([2], tf.int32),
            tf.constant([size, size], tf.int32), tf.ones([2], tf.float32),
            tf.zeros([2], tf.float32))

  if window_fn is None:
    parts = _region()
  else:
    parts = tf.cond(tf.reduce_all(extent <= region), _region, _window)
  parts[0].set_shape([region, region, depth])
  return dict(zip(CUT_KEYS, parts))


def _pad(x, region: int):
  shape = tf.shape(x)
  return tf.pad(x, [[0, region - shape[0]], [0, region - shape[1]], [0, 0]])


def _weights(scale, corner, origin, length, region: int, size: int):
  """ScaleAndTranslate's weights along one axis: [N, size, region] for N
  windows (scale, corner float32 [N]; origin, length int32 [N])."""
  inv_scale = 1.0 / scale
  inv_translate = inv_scale * corner  # the op's -inv_scale * translation
  kernel_scale = tf.maximum(inv_scale, 1.0)
  sample = ((tf.range(size, dtype=tf.float32) + 0.5)[tf.newaxis] *
            inv_scale[:, tf.newaxis] + inv_translate[:, tf.newaxis])
  source = tf.range(region)[tf.newaxis] + origin[:, tf.newaxis]  # [N, R]
  reach = (_RADIUS * kernel_scale)[:, tf.newaxis]
  low = tf.math.ceil(sample - reach - 0.5)  # the op's span, [N, size]
  high = tf.math.floor(sample + reach - 0.5)
  src = tf.cast(source, tf.float32)[:, tf.newaxis, :]
  position = src + 0.5 - sample[..., tf.newaxis]
  weight = tf.maximum(1.0 - tf.abs(
      position * (1.0 / kernel_scale)[:, tf.newaxis, tf.newaxis]), 0.0)
  inside = ((src >= low[..., tf.newaxis]) & (src <= high[..., tf.newaxis]) &
            (source < length[:, tf.newaxis])[:, tf.newaxis, :])
  weight = tf.where(inside, weight, 0.0)
  total = tf.reduce_sum(weight, axis=-1, keepdims=True)
  weight = tf.where(tf.abs(total) >= 1000.0 * 1.1754944e-38,
                    weight * (1.0 / total), weight)
  # The op gives no value where the sample lies outside the image.
  outside = (sample < 0.0) | (sample > tf.cast(length, tf.float32)[:, None])
  return tf.where(outside[..., tf.newaxis], 0.0, weight)


def resample(region, origin, image_size, scale, corner, size: int):
  """Windows from `cut`'s outputs stacked on any leading axes: float32
  [..., size, size, C] clipped to [0, 255] (the resized image's range)."""
  lead = tf.shape(region)[:-3]
  r, c = region.shape[-2], region.shape[-1]
  region = tf.reshape(region, [-1, r, r, c])
  origin, image_size, scale, corner = (
      tf.reshape(x, [-1, 2]) for x in (origin, image_size, scale, corner))
  rows = _weights(scale[:, 0], corner[:, 0], origin[:, 0], image_size[:, 0],
                  r, size)
  cols = _weights(scale[:, 1], corner[:, 1], origin[:, 1], image_size[:, 1],
                  r, size)
  out = tf.einsum('nyi,nijc->nyjc', rows, region)
  out = tf.einsum('nxj,nyjc->nyxc', cols, out)
  out = tf.clip_by_value(out, 0.0, 255.0)
  return tf.reshape(out, tf.concat([lead, [size, size, c]], 0))
