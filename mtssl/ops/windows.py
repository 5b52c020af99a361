"""Windows of a resized image, resampled anywhere from a cut of the original.

`tf.image.resize(image, [h, w], 'bilinear', antialias=True)` and a window of
it are TensorFlow's ScaleAndTranslate op (triangle kernel, antialiased). Its
weights depend only on the scale, the window's corner and the image size,
so a window can be computed from the source pixels it reads: `cut` takes
them from the image (a fixed-size region, in the input pipeline) and
`resample` applies the op's weights to them as two matrix products (in a
compiled step, batched). `resized_windows` runs the op itself for each
window (in the input pipeline). The result equals the op's within float32 rounding
of the sums (the test measures it).

Typical use:

    cut = windows.cut(image, [h, w], corners, 96, 160, on_host)  # host
    patches = windows.resample(**batch_of_cuts, size=96)          # device
"""

from typing import Dict

import tensorflow as tf

CUT_KEYS = ('region', 'origin', 'image_size', 'scale', 'corner')
# ScaleAndTranslate's 'triangle' kernel has radius 1 (in output pixels,
# times 1 / scale when antialiased and downscaling).
_RADIUS = 1.0


def resized_windows(image, height, width, corners, size: int):
  """Windows of `image` as if resized to height x width first.

  Window i is the size x size patch at corners[i] (y, x) of
  `tf.image.resize(image, [height, width], 'bilinear', antialias=True)`
  clipped to [0, 255], computed by TensorFlow's ScaleAndTranslate (the op
  that resize runs, with the same scale) for that window alone: output pixel
  (y, x) samples the input at ((y, x) + corner + 0.5) / scale, as the full
  resize does at (y, x) + corner. Returns float32 [N, size, size, C].
  """
  image = tf.cast(image, tf.float32)[tf.newaxis]
  scale = (tf.cast(tf.stack([height, width]), tf.float32) /
           tf.cast(tf.shape(image)[1:3], tf.float32))
  corners = tf.cast(corners, tf.float32)
  out = [tf.raw_ops.ScaleAndTranslate(
      images=image, size=tf.constant([size, size], tf.int32), scale=scale,
      translation=-corners[i], kernel_type='triangle', antialias=True)
         for i in range(corners.shape[0])]
  return tf.clip_by_value(tf.concat(out, axis=0), 0.0, 255.0)


def _bounds(corners, scale, size: int, shape):
  """[first, end) of the source pixels that size x size windows at `corners`
  ([N, 2], y and x) read (one pixel of margin either side), [N, 2] int32
  each; float64 arithmetic."""
  inv = 1.0 / tf.cast(scale, tf.float64)
  reach = tf.maximum(inv, 1.0) * _RADIUS
  corners = tf.cast(corners, tf.float64)
  first = tf.math.floor((corners + 0.5) * inv - reach - 0.5) - 1.0
  end = tf.math.ceil((corners + size - 0.5) * inv + reach - 0.5) + 2.0
  length = tf.cast(shape, tf.float64)
  return (tf.cast(tf.clip_by_value(first, 0.0, length), tf.int32),
          tf.cast(tf.clip_by_value(end, 0.0, length), tf.int32))


def cut(image, resized, corners, size: int, region: int, window_fn,
        channels=None) -> Dict[str, tf.Tensor]:
  """The source pixels of N windows, for `resample`.

  image: [H, W, C] (any real dtype) to be resized to `resized` ([2] int,
  height and width); corners: [N, 2] (y, x) of the size x size windows in
  the resized image; channels: None (all of the image's) or int [N] (one
  channel per window). Returns float32 region [N, region, region, C or 1]
  (a block of the image holding the pixels each window reads, zero beyond
  the image) and the resampling
  parameters, [N, 2] each: origin int32 (the region's place in the image),
  image_size int32, scale and corner float32. A window that reads more
  than region x region pixels (a large downscale) is computed here by
  `window_fn(image, resized, corner)` (float32 [size, size, C]) and sent as
  its own region with an identity resampling.
  """
  n = corners.shape[0]
  shape = tf.shape(image)[:2]
  scale = tf.cast(resized, tf.float32) / tf.cast(shape, tf.float32)
  first, end = _bounds(corners, scale, size, shape)
  extent = end - first
  fits = tf.reduce_all(extent <= region, axis=1)

  # A region is a region-sized block of the image (zero-padded to a region
  # where it is smaller), moved inside the image where a window lies near an
  # edge; the pixels the window does not read get zero weight. In the input
  # pipeline this costs a seventh of slicing the window's extent and padding
  # that (0.03 against 0.22 ms a pair, measured).
  short = tf.maximum(region - shape, 0)
  source = tf.cond(tf.reduce_any(short > 0), lambda: tf.pad(
      image, [[0, short[0]], [0, short[1]], [0, 0]]), lambda: image)
  first = tf.minimum(first, tf.maximum(shape - region, 0))

  def _region(i):
    if channels is None:
      begin, width = tf.stack([first[i, 0], first[i, 1], 0]), -1
    else:
      begin, width = tf.stack([first[i, 0], first[i, 1], channels[i]]), 1
    return tf.cast(tf.slice(source, begin, tf.stack([region, region, width])),
                   tf.float32)

  def _window(i):
    window = window_fn(image, resized, corners[i])
    if channels is not None:
      window = tf.gather(window, channels[i][tf.newaxis], axis=-1)
    return _pad(tf.cast(window, tf.float32), region)

  def _some_on_host():
    return tf.stack([tf.cond(fits[i], lambda i=i: _region(i),
                             lambda i=i: _window(i)) for i in range(n)])

  regions = tf.cond(tf.reduce_all(fits),
                    lambda: tf.stack([_region(i) for i in range(n)]),
                    _some_on_host)
  regions.set_shape([n, region, region,
                     image.shape[-1] if channels is None else 1])
  fits = fits[:, tf.newaxis]
  return {'region': regions,
          'origin': tf.where(fits, first, 0),
          'image_size': tf.where(fits, tf.broadcast_to(shape, [n, 2]), size),
          'scale': tf.where(fits, tf.broadcast_to(scale, [n, 2]), 1.0),
          'corner': tf.where(fits, tf.cast(corners, tf.float32), 0.0)}


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
