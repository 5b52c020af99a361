"""mtssl.ops.warp against TensorFlow's ImageProjectiveTransformV3 kernel."""

import os

import numpy as np
import tensorflow as tf

from mtssl.ops import warp
from mtssl.tasks import ex

# Measured over 40 draws of the test below, 1 and 2 threads: 1.2e-7 under
# XLA at its default, 3.6e-5 with XLA's CPU backend at LLVM level 0 (the
# suite's setting, tests/conftest.py), the largest errors on the draws whose
# coordinates lie far outside the image.
XLA_TOLERANCE = (1e-4 if '--xla_backend_optimization_level=0'
                 in os.environ.get('XLA_FLAGS', '') else 1e-6)


def _kernel(images, transforms, size):
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=images, transforms=transforms, output_shape=[size, size],
      fill_value=0.0, interpolation='BILINEAR', fill_mode='REFLECT')


class ProjectiveBilinearTest(tf.test.TestCase):

  def test_the_kernels_values_with_and_without_xla(self):
    rng = np.random.default_rng(0)
    compiled = tf.function(warp.projective_bilinear, jit_compile=True)
    config = ex.ExConfig(patch_size=24)
    for trial in range(6):
      images = tf.constant(rng.uniform(0, 1, (3, 64, 48, 3)), tf.float32)
      centre = tf.constant(rng.uniform(0, 47, 2), tf.float32)
      transforms = tf.stack([
          ex.sample_view(tf.constant([trial, v], tf.int64), centre, config)
          for v in range(3)])
      if trial % 2:
        # Far outside the image (folded by several periods) and projective.
        transforms += tf.constant(
            [[0, 0, rng.uniform(-300, 300), 0, 0, rng.uniform(-300, 300),
              rng.uniform(-1e-3, 1e-3), rng.uniform(-1e-3, 1e-3)]],
            tf.float32)
      want = _kernel(images, transforms, 24)
      self.assertAllEqual(warp.projective_bilinear(images, transforms,
                                                   [24, 24]), want)
      self.assertAllClose(compiled(images, transforms, [24, 24]), want,
                          atol=XLA_TOLERANCE, rtol=0)

  def test_views_of_a_batch_index_their_images(self):
    images = tf.random.stateless_uniform([2, 40, 40, 3], [1, 2])
    transforms = tf.random.stateless_uniform([2, 3, 8], [3, 4], -2.0, 2.0)
    transforms = transforms * tf.constant([1, 1, 10, 1, 1, 10, 0, 0],
                                          tf.float32)
    views = ex.warp_views(images, transforms, 16)
    self.assertEqual(views.shape, [2, 3, 16, 16, 3])
    for b in range(2):
      self.assertAllEqual(views[b], tf.clip_by_value(
          ex.extract_views(images[b], transforms[b], 16), 0.0, 1.0))


if __name__ == '__main__':
  tf.test.main()
