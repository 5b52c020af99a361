"""Adaptive 3x3 max pooling of block-3 features."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from mtssl.ops import pooling


class AdaptiveBinsTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(
      # 256x256 image at output stride 8 -> 32x32 map.
      (32, 3, [(0, 11), (10, 22), (21, 32)]),
      # 96x96 patch at stride 8 -> 12x12: exact thirds, no overlap.
      (12, 3, [(0, 4), (4, 8), (8, 12)]),
      (8, 3, [(0, 3), (2, 6), (5, 8)]),
      # Smaller than the grid: positions repeat, nothing is empty.
      (2, 3, [(0, 1), (0, 2), (1, 2)]),
      (1, 3, [(0, 1), (0, 1), (0, 1)]),
  )
  def test_bins(self, length, bins, expected):
    self.assertEqual(pooling.adaptive_bins(length, bins), expected)

  def test_rejects_empty(self):
    with self.assertRaisesRegex(ValueError, 'length >= 1'):
      pooling.adaptive_bins(0, 3)


class AdaptiveMaxPoolTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters((32, 32), (12, 12), (5, 7), (2, 1))
  def test_matches_numpy(self, height, width):
    rng = np.random.default_rng(height * 100 + width)
    x = rng.normal(size=(2, height, width, 4)).astype(np.float32)
    expected = np.zeros((2, 3, 3, 4), np.float32)
    for i, (h0, h1) in enumerate(pooling.adaptive_bins(height, 3)):
      for j, (w0, w1) in enumerate(pooling.adaptive_bins(width, 3)):
        expected[:, i, j] = x[:, h0:h1, w0:w1].max(axis=(1, 2))
    self.assertAllEqual(pooling.adaptive_max_pool2d(x), expected)

  def test_dynamic_shape_in_tf_function(self):
    fn = tf.function(pooling.adaptive_max_pool2d, input_signature=[
        tf.TensorSpec([None, None, None, 2], tf.float32)])
    x = np.arange(2 * 32 * 32 * 2, dtype=np.float32).reshape(2, 32, 32, 2)
    out = fn(x)
    self.assertEqual(out.shape, (2, 3, 3, 2))
    # The last row/column of bin (i, j) holds its maximum: (10, 10),
    # (10, 21), (21, 31) ... for bins ending at 11, 22, 32.
    ends = [10, 21, 31]
    for i in range(3):
      for j in range(3):
        self.assertAllEqual(out[:, i, j], x[:, ends[i], ends[j]])

  def test_rejects_wrong_rank(self):
    with self.assertRaisesRegex(ValueError, r'\[batch, height, width'):
      pooling.adaptive_max_pool2d(tf.zeros([4, 4, 3]))


if __name__ == '__main__':
  tf.test.main()
