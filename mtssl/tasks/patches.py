"""Stateless randomness and patch helpers shared by the patch-based tasks.

Every random choice a task makes for the example at stream position k is drawn
with a stateless op from a seed derived here from (run seed, task salt, k, draw
number), so the example is a pure function of (seed, k) whatever the
parallelism of the pipeline (the dataset contract of mtssl.tasks.base).
"""

import tensorflow as tf

from mtssl.ops import preprocessing


def example_seed(seed, index, salt: int) -> tf.Tensor:
  """The base seed ([2] int32) of the example at stream position `index`.

  `salt` separates tasks that read the same source under the same run seed,
  so their random choices are not correlated.
  """
  base = tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)])
  return tf.random.experimental.stateless_fold_in(base, salt)


def draw_seed(base_seed, draw: int) -> tf.Tensor:
  """The seed of one named random draw of an example."""
  return tf.random.experimental.stateless_fold_in(base_seed, draw)


def uniform_int(seed, low, high, shape=()) -> tf.Tensor:
  """Stateless integers uniform in [low, high] (both inclusive), int32."""
  return tf.random.stateless_uniform(
      shape, seed=seed, minval=tf.cast(low, tf.int32),
      maxval=tf.cast(high, tf.int32) + 1, dtype=tf.int32)


def log_uniform(seed, low: float, high: float, shape=()) -> tf.Tensor:
  """Stateless factors log-uniform in [low, high] (a factor and its inverse
  are equally likely when the range is symmetric around 1)."""
  u = tf.random.stateless_uniform(shape, seed=seed)
  return tf.exp(tf.math.log(float(low)) + u * (tf.math.log(float(high)) -
                                               tf.math.log(float(low))))


def crop(image, top, left, size: int) -> tf.Tensor:
  """The size x size patch of an [H, W, C] image at (top, left)."""
  return tf.slice(image, tf.stack([top, left, 0]),
                  tf.stack([size, size, tf.shape(image)[-1]]))


def flatten_groups(images) -> tf.Tensor:
  """[B, n, h, w, c] groups of patches -> [n * B, h, w, c], example-major
  (example 0's patches first), the order the heads regroup them in."""
  return tf.reshape(images, tf.concat([[-1], tf.shape(images)[2:]], 0))


def for_display(trunk_images) -> tf.Tensor:
  """Trunk inputs (VGG convention) -> float RGB in [0, 1] for summaries."""
  return tf.clip_by_value(preprocessing.vgg_unpreprocess(trunk_images) / 255.0,
                          0.0, 1.0)
