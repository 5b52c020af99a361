"""Lab conversion against scikit-image's float conversion.

(OpenCV's float RGB->Lab goes through interpolated lookup tables and is off by
up to ~0.4 in L, so it cannot check a 1e-3 tolerance; scikit-image computes
the CIE formulas directly.)
"""

import warnings

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

  def test_lab_to_rgb_clips_out_of_gamut_colours_like_skimage(self):
    rng = np.random.default_rng(1)
    in_gamut = skcolor.rgb2lab(rng.random([20_000, 3]))
    out_of_gamut = np.stack([rng.uniform(0, 100, 40_000),
                             rng.uniform(-200, 200, 40_000),
                             rng.uniform(-200, 200, 40_000)], axis=-1)
    for lab in (in_gamut, out_of_gamut):
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # skimage warns of negative Z values
        want = skcolor.lab2rgb(lab)
      got = color.lab_to_rgb(lab.astype(np.float32)).numpy()
      # Measured max |difference| over 200 K colours each: 1.9e-5 in gamut,
      # 8.1e-5 for L in [0, 100], a and b in [-200, 200] (float32 against
      # skimage's float64; 0.26 before clipping f(Z) like skimage).
      self.assertAllClose(got, want, atol=2e-4, rtol=0)
    # The random Lab colours reach the clipping: f(Z/Zn) < 0 for a fifth.
    fz = (out_of_gamut[:, 0] + 16) / 116 - out_of_gamut[:, 2] / 200
    self.assertGreater(np.mean(fz < 0), 0.15)

  def test_batched_and_inside_tf_data(self):
    batch = np.stack([self.images[0], self.images[1]])
    eager = color.rgb_to_lab(batch)
    ds = tf.data.Dataset.from_tensor_slices(batch).map(color.rgb_to_lab,
                                                       num_parallel_calls=2)
    self.assertAllClose(np.stack(list(ds.as_numpy_iterator())), eager, atol=1e-5)
    self.assertAllClose(color.rgb_to_lightness(batch), eager[..., :1])


if __name__ == '__main__':
  tf.test.main()
