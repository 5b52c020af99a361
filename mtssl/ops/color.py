"""sRGB <-> CIE Lab (D65) in TensorFlow, batched and differentiable.

The conversion scikit-image implements; RGB in [0, 1], channels last, any
leading shape; L in [0, 100]. `fast=True` computes the same function with
cheaper CPU kernels for input pipelines (BUILD.md, "Performance").
`lightness_as_rgb` is the gray trunk input of colorization and harmonized
relative position. `has_chroma_by_table` answers "does a uint8 image hold a
colour with |a| or |b| at a threshold" from a table of all 2^24 colours
instead of a Lab conversion.
"""

import threading

import numpy as np
import tensorflow as tf

_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
               (0.212671, 0.715160, 0.072169),
               (0.019334, 0.119193, 0.950227))
_XYZ_TO_RGB = ((3.240479, -1.53715, -0.498535),
               (-0.969256, 1.875991, 0.041556),
               (0.055648, -0.204043, 1.057311))
_D65_WHITE = (0.95047, 1.0, 1.08883)  # CIE D65, 2-degree observer
_DELTA = 6.0 / 29.0


def power(x, exponent, fast=False):
  """x ** exponent for x >= 0 (exp(exponent * log(x)) when fast)."""
  if fast:
    return tf.exp(exponent * tf.math.log(x))
  return tf.pow(x, exponent)


def _srgb_to_linear(rgb, fast=False):
  return tf.where(rgb > 0.04045,
                  power((tf.maximum(rgb, 0.04045) + 0.055) / 1.055, 2.4, fast),
                  rgb / 12.92)


def _linear_to_srgb(rgb):
  rgb = tf.clip_by_value(rgb, 0.0, 1.0)
  return tf.where(rgb > 0.0031308,
                  1.055 * tf.pow(tf.maximum(rgb, 0.0031308), 1.0 / 2.4) - 0.055,
                  12.92 * rgb)


def mix_channels(x, matrix, fast=False):
  """x (..., C) -> (..., R): out[..., r] = sum_c matrix[r][c] * x[..., c]."""
  if fast:
    matrix = tf.constant(matrix, x.dtype)
    flat = tf.matmul(tf.reshape(x, [-1, matrix.shape[1]]), matrix,
                     transpose_b=True)
    return tf.reshape(flat, tf.concat([tf.shape(x)[:-1], [matrix.shape[0]]],
                                      axis=0))
  return tf.einsum('...c,rc->...r', x, tf.constant(matrix, x.dtype))


def rgb_to_lab(rgb, fast=False):
  """sRGB in [0, 1] (..., 3) -> Lab (..., 3), float32."""
  rgb = tf.cast(rgb, tf.float32)
  xyz = mix_channels(_srgb_to_linear(rgb, fast), _RGB_TO_XYZ, fast)
  xyz = xyz / tf.constant(_D65_WHITE, tf.float32)
  f = tf.where(xyz > _DELTA ** 3,
               power(tf.maximum(xyz, _DELTA ** 3), 1.0 / 3.0, fast),
               xyz / (3 * _DELTA ** 2) + 4.0 / 29.0)
  fx, fy, fz = tf.unstack(f, axis=-1)
  lightness = 116.0 * fy - 16.0
  return tf.stack([lightness, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def lab_to_rgb(lab):
  """Lab (..., 3) -> sRGB in [0, 1] (..., 3), clipped to the gamut.

  Out-of-gamut colours are clipped as scikit-image's lab2rgb clips them: a
  negative f(Z/Zn) is set to 0 before XYZ, RGB is clipped to [0, 1] after.
  """
  lab = tf.cast(lab, tf.float32)
  lightness, a, b = tf.unstack(lab, axis=-1)
  fy = (lightness + 16.0) / 116.0
  fz = tf.maximum(fy - b / 200.0, 0.0)
  f = tf.stack([fy + a / 500.0, fy, fz], axis=-1)
  xyz = tf.where(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4.0 / 29.0))
  xyz = xyz * tf.constant(_D65_WHITE, tf.float32)
  return _linear_to_srgb(mix_channels(xyz, _XYZ_TO_RGB))


def rgb_to_lightness(rgb, fast=False):
  """sRGB in [0, 1] -> the L channel (..., 1) in [0, 100]."""
  return rgb_to_lab(rgb, fast)[..., :1]


def lab_lightness_as_rgb(lab):
  """Lab (..., 3) -> float32 (..., 3) = L * 255 / 100, three times."""
  lightness = tf.cast(lab, tf.float32)[..., :1] * (255.0 / 100.0)
  return tf.concat([lightness, lightness, lightness], axis=-1)


def lightness_as_rgb(rgb, fast=False):
  """RGB in [0, 255] (any dtype) -> float32 (..., 3) = L * 255 / 100, three times.

  The grayscale input of colorization (and of harmonized relative position):
  Lab lightness rescaled to the [0, 255] range of RGB pixels and replicated
  into three identical channels, so that it can go through `vgg_preprocess`
  into the trunk like any RGB image.
  """
  lightness = rgb_to_lightness(tf.cast(rgb, tf.float32) / 255.0,
                               fast) * (255.0 / 100.0)
  return tf.concat([lightness, lightness, lightness], axis=-1)


_TABLES = {}
_TABLES_LOCK = threading.Lock()


def chroma_table(min_chroma: float, fast: bool = False) -> np.ndarray:
  """Bits over the 2^24 uint8 RGB colours (index R << 16 | G << 8 | B, eight
  to a byte, lowest bit first): set where max(|a|, |b|) of
  `rgb_to_lab(rgb / 255, fast)` is at least `min_chroma`. 2 MiB; computed
  once per process and setting (about 1.5 s on one CPU core), with the very
  ops and shapes of a 256x256 crop's conversion, one red value at a time.
  """
  key = (float(min_chroma), bool(fast))
  with _TABLES_LOCK:
    if key not in _TABLES:
      green, blue = np.meshgrid(np.arange(256, dtype=np.uint8),
                                np.arange(256, dtype=np.uint8), indexing='ij')

      @tf.function(input_signature=[tf.TensorSpec([256, 256, 3], tf.uint8)])
      def _chromatic(image):
        lab = rgb_to_lab(tf.cast(image, tf.float32) / 255.0, fast)
        return tf.reduce_any(tf.abs(lab[..., 1:]) >= min_chroma, axis=-1)

      with tf.init_scope():  # Eager, also when called while tracing.
        rows = [_chromatic(np.stack(
            [np.full_like(green, red), green, blue], axis=-1)).numpy()
                for red in range(256)]
      _TABLES[key] = np.packbits(np.stack(rows).reshape(-1),
                                 bitorder='little')
    return _TABLES[key]


def has_chroma_by_table(image, table) -> tf.Tensor:
  """Whether any pixel of a uint8 RGB image (..., 3) has its bit set in
  `table` (a `chroma_table`, as a tensor or array): a scalar bool."""
  pixels = tf.cast(tf.reshape(image, [-1, 3]), tf.int32)
  index = (pixels[:, 0] * 65536) + (pixels[:, 1] * 256) + pixels[:, 2]
  byte = tf.cast(tf.gather(table, index // 8), tf.int32)
  return tf.reduce_any(tf.bitwise.bitwise_and(
      tf.bitwise.right_shift(byte, index % 8), 1) > 0)
