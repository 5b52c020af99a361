"""The released model's input preprocessing."""

import numpy as np
import tensorflow as tf

from mtssl.ops import preprocessing


class VggPreprocessTest(tf.test.TestCase):

  def test_subtracts_the_released_mean_per_channel(self):
    image = np.zeros([1, 2, 2, 3], np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 200, 100, 0
    out = preprocessing.vgg_preprocess(image)
    self.assertEqual(out.dtype, tf.float32)
    self.assertAllClose(out[0, 0, 0], [200 - 123.68, 100 - 116.779, -103.939])
    self.assertAllClose(preprocessing.vgg_unpreprocess(out), image)

  def test_same_inside_tf_data(self):
    images = np.random.default_rng(0).integers(0, 256, [4, 5, 5, 3], np.uint8)
    ds = tf.data.Dataset.from_tensor_slices(images).map(
        preprocessing.vgg_preprocess, num_parallel_calls=2)
    self.assertAllClose(np.stack(list(ds.as_numpy_iterator())),
                        preprocessing.vgg_preprocess(images))

  def test_rejects_non_rgb(self):
    with self.assertRaisesRegex(ValueError, '3 channels'):
      preprocessing.vgg_preprocess(np.zeros([2, 2, 1], np.uint8))


if __name__ == '__main__':
  tf.test.main()
