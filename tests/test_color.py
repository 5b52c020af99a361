"""Lab conversion against scikit-image's float conversion.

(OpenCV's float RGB->Lab goes through interpolated lookup tables and is off by
up to ~0.4 in L, so it cannot check a 1e-3 tolerance; scikit-image computes
the CIE formulas directly.)
"""

import numpy as np
import tensorflow as tf
from skimage import color as skcolor

from mtssl.data import synthetic
from mtssl.ops import color


class LabTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    random_rgb = rng.random([64, 64, 3]).astype(np.float32)
    scene = synthetic.synthetic_image(0, 1, 64, 64).astype(np.float32) / 255.0
    # Include the gamut's corners and dark values on the linear segment.
    corners = np.array(np.meshgrid([0, 0.01, 1], [0, 0.02, 1], [0, 0.03, 1]),
                       np.float32).reshape(3, -1).T.reshape(3, 9, 3)
    self.images = [random_rgb, scene, corners]

  def test_rgb_to_lab_matches_skimage(self):
    for rgb in self.images:
      expected = skcolor.rgb2lab(rgb.astype(np.float64))
      got = color.rgb_to_lab(rgb).numpy()
      self.assertAllClose(got, expected, atol=1e-3)

  def test_lab_to_rgb_matches_skimage_and_round_trips(self):
    for rgb in self.images:
      lab = skcolor.rgb2lab(rgb.astype(np.float64))
      self.assertAllClose(color.lab_to_rgb(lab.astype(np.float32)),
                          np.clip(skcolor.lab2rgb(lab), 0, 1), atol=1e-3)
      self.assertAllClose(color.lab_to_rgb(color.rgb_to_lab(rgb)), rgb, atol=1e-4)

  def test_batched_and_inside_tf_data(self):
    batch = np.stack([self.images[0], self.images[1]])
    eager = color.rgb_to_lab(batch)
    ds = tf.data.Dataset.from_tensor_slices(batch).map(color.rgb_to_lab,
                                                       num_parallel_calls=2)
    self.assertAllClose(np.stack(list(ds.as_numpy_iterator())), eager, atol=1e-5)
    self.assertAllClose(color.rgb_to_lightness(batch), eager[..., :1])


if __name__ == '__main__':
  tf.test.main()
