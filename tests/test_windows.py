"""mtssl.ops.windows against TensorFlow's resize of the whole image."""

import numpy as np
import tensorflow as tf

from mtssl.ops import windows
from mtssl.tasks import rp

PATCH, REGION = 32, 56


def _on_host(image, resized, corner):
  return windows.resized_windows(image, resized[0], resized[1],
                                 corner[None], PATCH)[0]


def _on_host_flags(cut):
  return [bool(size == PATCH and scale == 1.0)
          for size, scale in zip(cut['image_size'][:, 0].numpy(),
                                 cut['scale'][:, 0].numpy())]


class ResampleTest(tf.test.TestCase):

  def test_windows_match_the_resized_image(self):
    rng = np.random.default_rng(1)
    compiled = tf.function(windows.resample, jit_compile=True)
    plain = tf.function(windows.resample)
    kinds = set()
    for t in range(16):
      # Sizes and pixel counts that upscale and downscale, some by more than
      # a region holds (those windows are computed on the host).
      height, width = (int(n) for n in rng.integers(80, 400, 2))
      image = tf.constant(rng.integers(0, 256, (height, width, 3)), tf.uint8)
      h, w, _ = rp.resized_shape(height, width,
                                 int(rng.integers(10000, 30000)), 80)
      corners = rp.sample_pair_geometry(h, w, tf.constant([t, 3], tf.int64),
                                        PATCH, 16, 3)['corners']
      want = windows.resized_windows(image, h, w, corners, PATCH)
      cut = windows.cut(image, tf.stack([h, w]), corners, PATCH, REGION,
                        _on_host)
      kinds.update(_on_host_flags(cut))
      args = [cut[k] for k in windows.CUT_KEYS]
      # Measured on these images (1, 2 and 8 threads): 7.6e-5 (0-255), and
      # 3.8e-3 under XLA, which fuses the sampling positions' multiply-adds
      # (0.027 on images up to 1,400 pixels a side).
      self.assertAllClose(plain(*args, size=PATCH), want, atol=5e-4, rtol=0)
      self.assertAllClose(compiled(*args, size=PATCH), want, atol=0.02,
                          rtol=0)
    self.assertEqual(kinds, {True, False})

  def test_a_window_computed_on_the_host_passes_unchanged(self):
    image = tf.random.stateless_uniform([900, 700, 3], [1, 2], maxval=255.0)
    corners = tf.constant([[40, 50], [0, 0]])
    cut = windows.cut(image, tf.constant([100, 90]), corners, PATCH, REGION,
                      _on_host)
    self.assertEqual(_on_host_flags(cut), [True, True])
    got = windows.resample(**cut, size=PATCH)
    for i in range(2):
      self.assertAllEqual(got[i], _on_host(image, tf.constant([100, 90]),
                                           corners[i]))

  def test_pixels_a_window_does_not_read_change_nothing(self):
    # A region is a block of the image, not only the pixels its window
    # reads: the others must get zero weight. Changing every pixel more than
    # three beyond each window's reach leaves the windows equal bit for bit.
    rng = np.random.default_rng(2)
    for t in range(6):
      # The first image is smaller than a region (regions zero-padded).
      height, width = (int(n) for n in rng.integers(*(
          (30, 50) if t == 0 else (120, 300)), 2))
      image = rng.integers(0, 256, (height, width, 3)).astype(np.float32)
      other = rng.integers(0, 256, (height, width, 3)).astype(np.float32)
      h, w, _ = (int(x) for x in rp.resized_shape(
          height, width, int(rng.integers(15000, 40000)), 80))
      corners = rp.sample_pair_geometry(h, w, tf.constant([t, 5], tf.int64),
                                        PATCH, 16, 3)['corners'].numpy()
      changed = other.copy()
      for corner in corners:
        spans = []
        for axis, scale in enumerate((h / height, w / width)):
          reach = 1.0 / min(scale, 1.0) + 3
          spans.append(slice(
              max(int(np.floor((corner[axis] + 0.5) / scale - reach)), 0),
              int(np.ceil((corner[axis] + PATCH - 0.5) / scale + reach)) + 1))
        changed[tuple(spans)] = image[tuple(spans)]
      got = [windows.resample(**windows.cut(
          tf.constant(x), tf.constant([h, w]), tf.constant(corners), PATCH,
          REGION, _on_host), size=PATCH) for x in (image, changed)]
      self.assertAllEqual(got[0], got[1])
      self.assertNotAllEqual(image, changed)

  def test_one_channel_per_window_and_leading_axes(self):
    image = tf.random.stateless_uniform([120, 150, 3], [3, 4], maxval=255.0)
    corners = tf.constant([[0, 0], [90, 120], [40, 10]])
    cut = windows.cut(image, tf.constant([130, 160]), corners, PATCH, REGION,
                      _on_host, channels=tf.constant([2, 0, 1]))
    self.assertEqual(_on_host_flags(cut), [False] * 3)
    self.assertEqual(cut['region'].shape, [3, REGION, REGION, 1])
    got = windows.resample(**{k: tf.stack([v, v]) for k, v in cut.items()},
                           size=PATCH)
    self.assertEqual(got.shape, [2, 3, PATCH, PATCH, 1])
    want = windows.resized_windows(image, 130, 160, corners, PATCH)
    for i, channel in enumerate((2, 0, 1)):
      self.assertAllClose(got[1, i, ..., 0], want[i, ..., channel], atol=5e-4,
                          rtol=0)


if __name__ == '__main__':
  tf.test.main()
