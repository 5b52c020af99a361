"""Relative position: sampling geometry, colour handling, pipeline, head, learning."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from skimage import color as skcolor

from mtssl.ops import preprocessing
from mtssl.data import sources
from mtssl.ops import color
from mtssl.tasks import base
from mtssl.tasks import rp
from tests import task_checks

VGG_MEAN = np.array(preprocessing.VGG_MEAN_RGB, np.float32)
# A CPU-sized configuration: small patches, images and head.
SMALL = dict(patch_size=32, gap=16, jitter=3, min_pixels=10_000,
             max_pixels=20_000, unit_depths=(128, 64), unit_bottleneck=32,
             fc_depth=128, fc_bottleneck=32)


class LabelLayoutTest(tf.test.TestCase):

  def test_layout_is_documented_grid(self):
    grid = -np.ones([3, 3], int)
    for label, (dy, dx) in enumerate(rp.LABEL_OFFSETS):
      grid[1 + dy, 1 + dx] = label
    self.assertAllEqual(grid, [[0, 1, 2], [3, -1, 4], [5, 6, 7]])


class GeometryTest(tf.test.TestCase, parameterized.TestCase):

  def check_geometry(self, g, height, width, patch=96, gap=48, jitter=7):
    step = patch + gap
    offset = np.array(rp.LABEL_OFFSETS[int(g['label'])])
    size = np.array([height, width])
    # Grid: origin as in 2015, at least 2x2 points, all inside the image.
    self.assertTrue(np.all(g['grid_origin'] >= 0))
    self.assertTrue(np.all(g['grid_origin'] <= step - 1))
    self.assertTrue(np.all(g['grid_size'] >= 2))
    self.assertTrue(np.all(g['grid_origin'] + (g['grid_size'] - 1) * step
                           + patch <= size))
    self.assertTrue(np.all(g['grid_origin'] + g['grid_size'] * step + patch
                           > size))  # No further grid point would fit.
    cells = (g['grid_points'] - g['grid_origin']) // step
    self.assertFalse(np.any((g['grid_points'] - g['grid_origin']) % step))
    self.assertTrue(np.all((cells >= 0) & (cells < g['grid_size'])))
    # The label is the direction of the second patch from the first.
    self.assertAllEqual(cells[1] - cells[0], offset)
    # Jitter within bounds, patches inside the image.
    self.assertTrue(np.all(np.abs(g['corners'] - g['grid_points']) <= jitter))
    self.assertTrue(np.all(g['corners'] >= 0))
    self.assertTrue(np.all(g['corners'] + patch <= size))
    delta = g['corners'][1] - g['corners'][0]
    for axis in range(2):
      if offset[axis] == 0:
        self.assertLessEqual(abs(delta[axis]), 2 * jitter)
      else:
        self.assertEqual(np.sign(delta[axis]), offset[axis])
        self.assertBetween(abs(delta[axis]), step - 2 * jitter,
                           step + 2 * jitter)

  @parameterized.parameters((240, 240), (387, 387), (300, 700), (642, 451))
  def test_geometry_eager_and_in_dataset(self, height, width):
    seeds = [(tf.constant([s, 3], tf.int32),) for s in range(100)]
    fn = lambda seed: rp.sample_pair_geometry(height, width, seed)
    eager, in_dataset = task_checks.eager_and_in_dataset(fn, seeds)
    labels = set()
    for a, b in zip(eager, in_dataset):
      task_checks.assert_same_structure_values(self, a, b)
      self.check_geometry(a, height, width)
      labels.add(int(a['label']))
    self.assertLen(labels, 8)  # 100 draws reach every direction.

  def test_resized_shape(self):
    elements = [(256, 256, 150_000), (256, 256, 450_000), (480, 640, 300_000),
                (40, 400, 150_000), (500, 100, 150_000), (10, 10, 450_000)]
    fn = lambda h, w, n: rp.resized_shape(h, w, n, 240)
    eager, in_dataset = task_checks.eager_and_in_dataset(fn, elements)
    for (h, w, n), a, b in zip(elements, eager, in_dataset):
      task_checks.assert_same_structure_values(self, a, b)
      new_h, new_w, upscaled = a
      self.assertEqual(bool(upscaled), min(h, w) * np.sqrt(n / (h * w)) < 239.5)
      self.assertGreaterEqual(min(new_h, new_w), 240)
      self.assertAllClose(new_h / new_w, h / w, rtol=0.02)
      if upscaled:
        self.assertEqual(min(new_h, new_w), 240)
      else:
        self.assertAllClose(new_h * new_w, n, rtol=0.01)
    self.assertAllEqual(eager[0][:2], [387, 387])
    # 40x400 at 150k pixels: 122x1225 (rounded), then x240/122 (ceil).
    self.assertAllEqual(eager[3][:2], [240, 2410])


class ColorTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.patches = [rng.uniform(0, 255, [16, 16, 3]).astype(np.float32),
                    np.full([16, 16, 3], 77, np.float32)]

  def test_color_drop_is_2015_prep_image(self):
    elements = [(self.patches[i % 2], tf.constant([i, 1], tf.int32))
                for i in range(12)]
    eager, in_dataset = task_checks.eager_and_in_dataset(rp.color_drop,
                                                         elements)
    kept_channels = set()
    for (patch, seed), a, b in zip(elements, eager, in_dataset):
      self.assertAllEqual(a, b)
      net_input = preprocessing.vgg_preprocess(a).numpy()
      keep = int(rp.kept_channel(seed))
      kept_channels.add(keep)
      dropped = [c for c in range(3) if c != keep]
      # The whole patch has RMS 50.
      self.assertAllClose(np.sqrt(np.mean(net_input ** 2)), 50.0, rtol=1e-4)
      centred = patch[..., keep] - patch[..., keep].mean()
      if not centred.any():
        # A flat patch keeps nothing of its colour, only (scaled) noise.
        self.assertAllClose(net_input[..., keep], np.zeros([16, 16]))
        continue
      # Kept channel: mean-subtracted, times the common scale factor; the
      # dropped channels: uniform noise in [-0.5, 0.5) times that factor.
      factor = net_input[..., keep].std() / centred.std()
      self.assertAllClose(net_input[..., keep], centred * factor, atol=1e-2)
      noise = net_input[..., dropped] / factor
      self.assertLess(np.abs(noise).max(), 0.5)
      self.assertGreater(noise.std(), 0.2)  # uniform(-0.5, 0.5): std 0.29
    self.assertLen(kept_channels, 3)

  def test_lightness_as_rgb(self):
    rng = np.random.default_rng(1)
    rgb = np.concatenate([
        rng.integers(0, 256, [8, 8, 3]),
        np.array([[[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0],
                   [0, 255, 0], [0, 0, 255], [10, 20, 30], [200, 100, 50]]])
    ]).astype(np.uint8)
    expected = skcolor.rgb2lab(rgb / 255.0)[..., :1] * 2.55
    eager, in_dataset = task_checks.eager_and_in_dataset(
        color.lightness_as_rgb, [(row,) for row in rgb])
    for row, a, b in zip(expected, eager, in_dataset):
      self.assertAllClose(a, b)
      self.assertEqual(a.dtype, np.float32)
      self.assertAllClose(a, np.repeat(row, 3, axis=-1), atol=5e-3)
    got = color.lightness_as_rgb(rgb.astype(np.float32)).numpy()
    self.assertAllClose(got[-1, 0], [0, 0, 0], atol=1e-3)       # black
    self.assertAllClose(got[-1, 1], [255, 255, 255], atol=1e-2)  # white


def _tiny_images(k):
  """Stream position k: a random 30x500 image (too small for a pair) for
  odd k, a random 200x260 one otherwise."""
  seed = tf.stack([tf.cast(k, tf.int32), 7])
  small = lambda: tf.random.stateless_uniform([30, 500, 3], seed, 0, 256,
                                              tf.int32)
  large = lambda: tf.random.stateless_uniform([200, 260, 3], seed, 0, 256,
                                              tf.int32)
  return tf.cast(tf.cond(k % 2 == 1, small, large), tf.uint8)


class PipelineTest(tf.test.TestCase):

  def test_batches_and_geometry(self):
    task = rp.RelativePositionTask(rp.RPConfig(harmonize=True))
    source = sources.SyntheticImageSource(200, 300)
    (features, labels), = task_checks.take(task.make_dataset(source, 4, 0), 1)
    self.assertEqual(features['patches'].shape, (4, 2, 96, 96, 3))
    self.assertAllEqual(features['index'], [0, 1, 2, 3])
    self.assertEqual(task.trunk_images(features).shape, (8, 96, 96, 3))
    # The patches are the crops at the recorded corners of the resized image,
    # as harmonized (Lab L * 2.55, x3) trunk inputs.
    for i in range(4):
      image = tf.image.resize(
          sources.synthetic.synthetic_image(0, i, 200, 300).astype(np.float32),
          features['image_size'][i], antialias=True)
      image = tf.clip_by_value(image, 0, 255)
      area = np.prod(features['image_size'][i])
      self.assertBetween(area, 149_000, 451_000)
      for j in range(2):
        y, x = features['corners'][i, j]
        crop = image[y:y + 96, x:x + 96]
        self.assertAllClose(
            features['patches'][i, j],
            preprocessing.vgg_preprocess(color.lightness_as_rgb(crop)),
            atol=1e-3)
      delta = features['corners'][i, 1] - features['corners'][i, 0]
      offset = rp.LABEL_OFFSETS[labels['label'][i]]
      for axis in range(2):
        if offset[axis]:
          self.assertEqual(np.sign(delta[axis]), offset[axis])
          self.assertBetween(abs(delta[axis]), 130, 158)
        else:
          self.assertLessEqual(abs(delta[axis]), 14)

  def test_deterministic_under_seed_and_resumable(self):
    task = rp.RelativePositionTask(rp.RPConfig())
    source = sources.SyntheticImageSource(128, 128)
    first = task_checks.take(task.make_dataset(source, 3, seed=5), 3)
    again = task_checks.take(task.make_dataset(source, 3, seed=5), 3)
    other = task_checks.take(task.make_dataset(source, 3, seed=6), 1)
    resumed = task_checks.take(task.make_dataset(source, 3, seed=5, start=6), 1)
    for a, b in zip(first, again):
      task_checks.assert_same_structure_values(self, a, b)
    task_checks.assert_same_structure_values(self, resumed[0], first[2])
    self.assertAllEqual(resumed[0][0]['index'], [6, 7, 8])
    self.assertNotAllClose(other[0][0]['patches'], first[0][0]['patches'])
    # Colour dropping: RMS 50 per patch after vgg_preprocess.
    rms = np.sqrt(np.mean(first[0][0]['patches'] ** 2, axis=(2, 3, 4)))
    self.assertAllClose(rms, np.full([3, 2], 50.0), rtol=1e-4)

  def test_small_image_is_upscaled_and_counted(self):
    task = rp.RelativePositionTask(rp.RPConfig())
    source = task_checks.TensorImageSource(_tiny_images)
    (features, labels), = task_checks.take(task.make_dataset(source, 4, 0), 1)
    self.assertAllEqual(features['upscaled'], [False, True, False, True])
    # 30x500 at >= 150k pixels is still too short: shorter side -> 240.
    self.assertEqual(features['image_size'][1, 0], 240)
    self.assertAllClose(features['image_size'][1, 1], 4000, rtol=0.01)
    self.assertEqual(features['patches'].shape, (4, 2, 96, 96, 3))
    self.assertTrue(np.all(np.isfinite(features['patches'])))
    self.assertTrue(np.all((labels['label'] >= 0) & (labels['label'] < 8)))
    counted = source.counter.snapshot().get(rp.UPSCALE_REASON, 0)
    self.assertGreaterEqual(counted, 2)  # Prefetched examples count too.

  def test_normal_images_are_not_counted(self):
    task = rp.RelativePositionTask(rp.RPConfig())
    source = sources.SyntheticImageSource(64, 64)
    task_checks.take(task.make_dataset(source, 2, 0), 1)
    self.assertNotIn(rp.UPSCALE_REASON, source.counter.snapshot())

  def test_registry_and_config_validation(self):
    self.assertIs(base.get_task_class('rp'), rp.RelativePositionTask)
    task = base.make_task('rp', harmonize=True)
    self.assertTrue(task.config.harmonize)
    self.assertFalse(rp.RPConfig().harmonize)
    with self.assertRaisesRegex(ValueError, 'jitter'):
      rp.RPConfig(jitter=30).validate()
    with self.assertRaisesRegex(ValueError, 'min_pixels'):
      rp.RPConfig(min_pixels=10, max_pixels=5).validate()
    with self.assertRaisesRegex(ValueError, 'fc_depth'):
      rp.RPConfig(fc_depth=0).validate()
    with self.assertRaisesRegex(ValueError, 'device_region 100 is below'):
      rp.RPConfig(device_region=100).validate()
    self.assertEqual(rp.RPConfig().region_size, 160)
    self.assertEqual(rp.RPConfig(patch_size=32).region_size, 56)


class HeadTest(tf.test.TestCase):

  def test_paper_head_on_real_trunk(self):
    task = rp.RelativePositionTask(rp.RPConfig())
    trunk_out = task_checks.paper_trunk_features(task, 2)
    self.assertEqual(trunk_out.shape, (2, 12, 12, 1024))
    head = task.build_head()
    logits = head(trunk_out, training=False)
    self.assertEqual(logits.shape, (1, 8))
    self.assertEqual(head.patch_width, 4608)
    self.assertEqual(head.patch_features(trunk_out).shape, (2, 4608))
    # Parameters, by the formula of the paper's head (section 3.4; widths:
    # BUILD.md, "Head widths"): two strided 3x3 units, a
    # 9216 -> 4608 fully-connected unit with projection shortcut, two
    # 4608 -> 4608 ones, postnorm, 8 logits.
    units = [task_checks.bottleneck_params(1024, 1024, 128, 3),
             task_checks.bottleneck_params(1024, 512, 128, 3),
             task_checks.bottleneck_params(9216, 4608, 512, 1),
             task_checks.bottleneck_params(4608, 4608, 512, 1),
             task_checks.bottleneck_params(4608, 4608, 512, 1)]
    trainable = sum(u[0] for u in units) + 2 * 4608 + 4608 * 8 + 8
    total = sum(u[1] for u in units) + 4 * 4608 + 4608 * 8 + 8
    self.assertEqual(trainable, 61_161_480)
    self.assertEqual(total, 61_218_824)
    self.assertEqual(sum(np.prod(v.shape) for v in head.trainable_variables),
                     trainable)
    self.assertEqual(head.count_params(), total)
    # Slim-form weight decay on every conv kernel of the head (18 kernels).
    self.assertLen(head.losses, 18)

  def test_pairs_are_rearranged_in_order(self):
    head = rp.RelativePositionTask(rp.RPConfig(**SMALL)).build_head()
    features = tf.random.normal([6, 4, 4, 16], seed=2)  # 3 pairs
    logits = head(features, training=False).numpy()
    self.assertEqual(logits.shape, (3, 8))
    # Permuting the pairs permutes the outputs; each pair alone gives its
    # own output; swapping the patches of a pair changes it.
    permuted = tf.gather(features, [4, 5, 0, 1, 2, 3])
    self.assertAllClose(head(permuted, training=False), logits[[2, 0, 1]],
                        atol=1e-5)
    self.assertAllClose(head(features[2:4], training=False), logits[1:2],
                        atol=1e-5)
    swapped = tf.gather(features, [1, 0, 3, 2, 5, 4])
    self.assertNotAllClose(head(swapped, training=False), logits)

  def test_fully_connected_units(self):
    unit = rp.FullyConnectedBottleneck(32, 8, name='fc')
    out = unit(tf.random.normal([2, 1, 1, 64]))
    self.assertEqual(out.shape, (2, 1, 1, 32))
    shapes = {k: tuple(v.shape) for k, v in unit.slim_variables('fc').items()}
    self.assertEqual(shapes['fc/conv2/weights'], (1, 1, 8, 8))
    self.assertEqual(shapes['fc/shortcut/weights'], (1, 1, 64, 32))
    self.assertEqual(len(unit.weights), len(shapes))  # Nothing else made.

  def test_metrics_and_summaries(self):
    task = rp.RelativePositionTask(rp.RPConfig(**SMALL))
    metrics = task.build_metrics()
    labels = {'label': tf.constant([0, 3])}
    logits = tf.constant([[5.0, 0, 0, 0, 0, 0, 0, 0],
                          [0, 5.0, 0, 0, 0, 0, 0, 0]])
    task.update_metrics(metrics, labels, logits)
    self.assertAllClose(metrics['accuracy'].result(), 0.5)
    self.assertAllClose(metrics['loss'].result(), task.loss(labels, logits))
    features = {'patches': tf.zeros([2, 2, 32, 32, 3])}
    pairs = task.image_summaries(features, labels, logits)['rp/pairs']
    self.assertEqual(pairs.shape, (2, 32, 64, 3))


class LearningTest(tf.test.TestCase):

  def test_accuracy_rises_above_chance(self):
    task = rp.RelativePositionTask(rp.RPConfig(batch_size=32, **SMALL))
    losses, windows = task_checks.learning_run(
        task, 'rp', sources.SyntheticImageSource(128, 128), steps=140,
        learning_rate=1e-2, window=20)
    accuracy = np.mean([w['accuracy'] for w in windows[-2:]])
    # Measured (seed 0, colour dropping): accuracy 0.125 over steps 1-20,
    # 0.241 over steps 101-140 (chance 0.125); mean loss 2.475 over steps
    # 1-20, 1.803 over steps 121-140. Require 0.18 (6 standard deviations
    # above chance for 1280 examples) and a 15% lower loss.
    self.assertGreater(accuracy, 0.18)
    self.assertLess(np.mean(losses[-20:]), 0.85 * np.mean(losses[:20]))


if __name__ == '__main__':
  tf.test.main()
