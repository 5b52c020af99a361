"""Stateless image augmentations shared by the evaluation protocols.

Every random choice takes an explicit [2] int64 seed, derived by the caller
from (run seed, stream position), so an example's augmentation is a function
of its position alone.
"""

import tensorflow as tf


def fold(seed: tf.Tensor, i: int) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(seed, i)


def example_seed(seed: int, index: tf.Tensor) -> tf.Tensor:
  """The [2] stateless seed of the example at stream position `index`."""
  return tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """Aspect-preserving resize so that the shorter side is `size` (float)."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_min(shape)
  new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  return tf.image.resize(tf.cast(image, tf.float32), new, antialias=True)


def distort_color(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Inception's color distortion (order 0) on float RGB in [0, 255].

  Brightness +-32/255, saturation 0.5-1.5, hue +-0.2, contrast 0.5-1.5, in
  that order, then clipped.
  """
  x = tf.cast(image, tf.float32) / 255.0
  x = tf.image.stateless_random_brightness(x, 32.0 / 255.0, fold(seed, 101))
  x = tf.image.stateless_random_saturation(x, 0.5, 1.5, fold(seed, 102))
  x = tf.image.stateless_random_hue(x, 0.2, fold(seed, 103))
  x = tf.image.stateless_random_contrast(x, 0.5, 1.5, fold(seed, 104))
  return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def random_flip(seed: tf.Tensor) -> tf.Tensor:
  """A stateless coin: True with probability 1/2."""
  return tf.random.stateless_uniform([], fold(seed, 105)) < 0.5
