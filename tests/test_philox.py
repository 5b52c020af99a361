"""mtssl.ops.philox against TensorFlow's stateless uniform kernel on the CPU."""

import numpy as np
import tensorflow as tf

from mtssl.ops import philox


class UniformTest(tf.test.TestCase):

  def test_the_cpu_kernels_values_with_and_without_xla(self):
    rng = np.random.default_rng(0)
    compiled = tf.function(philox.uniform, jit_compile=True)
    # Sizes that are and are not multiples of Philox's 4 words per counter;
    # int64 and int32 seeds.
    for shape, dtype in (([96, 96, 3], tf.int64), ([5], tf.int64),
                         ([7, 3], tf.int32), ([1], tf.int32)):
      high = 2**62 if dtype == tf.int64 else 2**31 - 1
      seed = tf.constant(rng.integers(-high, high, 2), dtype)
      want = tf.random.stateless_uniform(shape, seed, minval=-0.5, maxval=0.5)
      key, counter = philox.key_counter(seed)
      self.assertAllEqual(philox.uniform(shape, key, counter, -0.5, 0.5),
                          want)
      self.assertAllEqual(compiled(shape, key, counter, -0.5, 0.5), want)
      self.assertAllEqual(philox.uniform(shape, key, counter),
                          tf.random.stateless_uniform(shape, seed))

  def test_leading_axes_are_one_draw_each(self):
    seeds = tf.constant([[1, 2], [3, 4], [-5, 2**40], [0, 0], [7, 7], [8, 9]],
                        tf.int64)
    keys, counters = zip(*map(philox.key_counter, tf.unstack(seeds)))
    key = tf.reshape(tf.stack(keys), [2, 3, 1])
    counter = tf.reshape(tf.stack(counters), [2, 3, 2])
    got = tf.function(philox.uniform, jit_compile=True)([4, 5, 3], key,
                                                        counter)
    self.assertEqual(got.shape, [2, 3, 4, 5, 3])
    got = tf.reshape(got, [6, 4, 5, 3])
    for i, seed in enumerate(tf.unstack(seeds)):
      self.assertAllEqual(got[i], tf.random.stateless_uniform([4, 5, 3], seed))

  def test_a_counter_carries_into_its_higher_words(self):
    # Low counter word at 2^32 - 1: draws past the first four need a carry.
    key = tf.constant([12345], tf.uint64)
    counter = tf.constant([2**32 - 1, 0], tf.uint64)
    got = philox.uniform([12], key, counter)
    want = tf.raw_ops.StatelessRandomUniformV2(
        shape=[12], key=key, counter=counter, alg=1)
    self.assertAllEqual(got, want)
    counter = tf.constant([2**64 - 1, 5], tf.uint64)
    self.assertAllEqual(philox.uniform([12], key, counter),
                        tf.raw_ops.StatelessRandomUniformV2(
                            shape=[12], key=key, counter=counter, alg=1))


if __name__ == '__main__':
  tf.test.main()
