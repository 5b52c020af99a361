"""Every optimized path computes what the plain path computes.

Training step: XLA vs not, bf16 / fp16 mixed precision vs fp32, native vs
space-to-batch atrous convolutions, on a real task (colorization) with a tiny
trunk. Layout: the trunk's convolutions are NHWC and its batch norms fused.
Input pipelines: each task's fast preprocessing vs its plain one, and both vs
a per-image NumPy/OpenCV reference given the same random draws; the vectorized
pieces (Lab, soft-encoding distances, view extraction) vs their plain forms;
prefetching to a device. Device preprocessing: the batches a task completes
inside the compiled step equal those of its host pipeline.
"""

import os
import tempfile

import numpy as np
import tensorflow as tf
import tf_keras
from absl.testing import parameterized

from mtssl.models import multitask as model_lib
from mtssl.training import optimizers
from mtssl.benchmarking import reference_pipelines as ref
from mtssl.backbones import resnet_v2
from mtssl.data import motion_sources
from mtssl.data import prefetch
from mtssl.data import sources
from mtssl.data import synthetic
from mtssl.ops import ab_bins
from mtssl.ops import color
from mtssl.tasks import col
from mtssl.tasks import ex
from mtssl.tasks import ms
from mtssl.tasks import patches
from mtssl.tasks import rp
from mtssl.training import step as step_lib
from tests import real_data
from tests import task_checks

# Two blocks, output stride 8: block 2 runs at atrous rate 2.
TINY = [resnet_v2.Block('block1', 4, 1, 2), resnet_v2.Block('block2', 8, 2, 2)]
POLICIES = {'fp32': 'float32', 'bf16': 'mixed_bfloat16', 'fp16': 'mixed_float16'}


def col_training(precision='fp32', xla=False, native_atrous=False, steps=3,
                 device_preprocessing=False):
  """Losses and final variables of `steps` col steps on a tiny model."""
  previous = tf_keras.mixed_precision.global_policy()
  tf_keras.mixed_precision.set_global_policy(POLICIES[precision])
  try:
    tf_keras.utils.set_random_seed(0)
    trunk = resnet_v2.ResNetV2(TINY, output_stride=8, scope='tiny',
                               native_atrous=native_atrous)
    task = col.ColorizationTask(col.ColConfig(
        image_size=32, head_widths=(8, 8),
        device_preprocessing=device_preprocessing))
    model = model_lib.MultiTaskModel(trunk, {'col': task})
    batches = task_checks.take(task.make_dataset(
        sources.SyntheticImageSource(40, 40), 2, seed=0), steps + 1)
    model.build_all({'col': batches[0][0]})
    optimizer = optimizers.TF1RMSProp(1e-3)
    if precision == 'fp16':
      optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
    step = step_lib.TaskTrainStep(model, 'col', optimizer, jit_compile=xla)
    losses = [float(step(features, labels)['loss'])
              for features, labels in batches[1:]]
    return np.array(losses), [v.numpy() for v in model.task_variables('col')]
  finally:
    tf_keras.mixed_precision.set_global_policy(previous)


class TrainStepTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.plain = col_training()

  def test_xla_matches_plain(self):
    losses, variables = col_training(xla=True)
    # Measured: losses equal to 2e-7 relative, variables to 3e-6.
    self.assertAllClose(losses, self.plain[0], rtol=1e-5)
    for a, b in zip(variables, self.plain[1]):
      self.assertAllClose(a, b, rtol=1e-3, atol=1e-4)

  def test_native_atrous_under_xla_matches_plain(self):
    # TensorFlow's CPU kernels have no gradient for dilated Conv2D ops; XLA
    # (and cuDNN) run them natively.
    losses, variables = col_training(xla=True, native_atrous=True)
    self.assertAllClose(losses, self.plain[0], rtol=1e-5)
    for a, b in zip(variables, self.plain[1]):
      self.assertAllClose(a, b, rtol=1e-3, atol=1e-4)

  def test_mixed_precision_matches_fp32(self):
    for precision, tolerance in (('bf16', 0.03), ('fp16', 0.005)):
      losses, variables = col_training(precision)
      # Measured relative loss differences over three steps: bf16 <= 0.008,
      # fp16 <= 0.001 (bf16 keeps 8 mantissa bits, fp16 11).
      self.assertAllClose(losses, self.plain[0], rtol=tolerance,
                          msg=precision)
      for a, b in zip(variables, self.plain[1]):
        self.assertEqual(a.dtype, np.float32)  # Master weights stay fp32.
        self.assertAllClose(a, b, rtol=0.05, atol=0.01, msg=precision)


class DevicePreprocessingTest(tf.test.TestCase):
  """`--<task>_device_preprocessing`: the same batches, completed in the step."""

  def test_chroma_table_is_the_lab_test(self):
    task = col.ColorizationTask()
    table = color.chroma_table(task.config.min_chroma, fast=True)
    self.assertEqual(table.nbytes, 2 ** 21)
    rng = np.random.default_rng(0)
    gray = np.repeat(rng.integers(0, 256, (256, 256, 1)), 3, axis=-1)
    crops = [gray.astype(np.uint8)] + [  # Gray, and gray plus a little noise.
        np.clip(gray + rng.integers(-d, d + 1, gray.shape), 0, 255
                ).astype(np.uint8) for d in (1, 2, 3, 4)]
    folder = tempfile.mkdtemp(dir=self.get_temp_dir())
    source = sources.make_image_source('folder:' + os.path.dirname(
        real_data.write_photos(folder, real_data.PHOTO_NAMES)[0]))
    for k, image in source.images(seed=0).take(3 * len(real_data.PHOTO_NAMES)):
      crops.append(col.square_crop(image, 256, col.example_seed(0, k)).numpy())

    @tf.function
    def both(crop):
      lab = color.rgb_to_lab(tf.cast(crop, tf.float32) / 255.0, fast=True)
      return (col.has_chroma(lab, task.config.min_chroma),
              color.has_chroma_by_table(crop, tf.constant(table)))

    found = [tuple(map(bool, both(c))) for c in crops]
    self.assertEqual([a for a, _ in found], [b for _, b in found])
    # Both answers occur: gray and +-1 are gray, +-4 and the colour photos not.
    self.assertEqual(found[0], (False, False))
    self.assertIn((True, True), found)

  def test_col_batches_equal_the_host_pipeline(self):
    def batches(device):
      task = col.ColorizationTask(col.ColConfig(
          image_size=64, head_widths=(8, 8), device_preprocessing=device))
      return task, task_checks.take(task.make_dataset(
          sources.SyntheticImageSource(80, 100), 4, seed=1), 3)

    _, host = batches(False)
    task, raw = batches(True)
    self.assertEqual(set(raw[0][0]), {'index', 'crop'})
    self.assertEqual(raw[0][1], {})
    for jit in (False, True):
      complete = tf.function(task.device_inputs, jit_compile=jit)
      for (features, labels), (want, want_labels) in zip(raw, host):
        features, labels = complete(features, labels)
        self.assertAllEqual(features['index'], want['index'])
        self.assertAllEqual(labels['image'], want_labels['image'])
        self.assertAllEqual(labels['bins'], want_labels['bins'])
        # Measured (1 and 2 threads, with and without XLA): trunk input
        # 6.1e-5 (0-255), ab 2.3e-5, bin weights 1.8e-6; the crop's Lab is
        # one matrix product per batch instead of per image.
        self.assertAllClose(features['image'], want['image'], atol=1e-3)
        self.assertAllClose(labels['ab'], want_labels['ab'], atol=5e-4)
        self.assertAllClose(labels['bin_weights'], want_labels['bin_weights'],
                            atol=5e-5)

  def test_rp_batches_equal_the_host_pipeline(self):
    for harmonize in (False, True):
      def batches(device, harmonize=harmonize):
        task = rp.RelativePositionTask(rp.RPConfig(**dict(
            rp.RelativePositionTask.cpu_overrides, batch_size=4,
            harmonize=harmonize, device_preprocessing=device)))
        return task, task_checks.take(task.make_dataset(
            sources.SyntheticImageSource(300, 400), 4, seed=2), 3)

      _, host = batches(False)
      task, raw = batches(True)
      # Measured (1, 2 and 8 threads, with and without XLA): 6.8e-3 (colour
      # dropping, RMS 50) and 1.7e-3 (harmonized, 0-255): the windows'
      # resampling (tests/test_windows.py); the noise is equal (test below).
      for jit in (False, True):
        complete = tf.function(task.device_inputs, jit_compile=jit)
        for (features, labels), (want, want_labels) in zip(raw, host):
          self.assertEqual('kept_channels' in features, not harmonize)
          # The windows' source pixels; colour dropping's kept channel alone.
          self.assertNotIn('patches', features)
          self.assertEqual(features['window_region'].shape[-1],
                           1 if not harmonize else 3)
          features, labels = complete(features, labels)
          self.assertEqual(set(features), set(want))
          self.assertAllEqual(labels['label'], want_labels['label'])
          self.assertAllEqual(features['corners'], want['corners'])
          self.assertAllClose(features['patches'], want['patches'],
                              atol=0.02, rtol=0, msg=f'jit={jit}')

  def test_rp_noise_drawn_in_the_step_is_the_host_noise(self):
    patch = tf.random.stateless_uniform([2, 16, 16, 3], [4, 5], maxval=255.0)
    seeds = [rp.patch_seed(patches.example_seed(0, i, 1), 0)
             for i in range(2)]
    want, keeps = zip(*[rp.color_drop_draws(p, s)
                        for p, s in zip(tf.unstack(patch), seeds)])
    keys, counters = zip(*map(rp.noise_key_counter, seeds))
    kept = tf.stack([tf.gather(p, [k], axis=-1)
                     for p, k in zip(tf.unstack(patch), keeps)])
    for jit in (False, True):
      mixed = tf.function(rp.noise_in_dropped, jit_compile=jit)(
          kept, tf.stack(keeps), tf.stack(keys), tf.stack(counters))
      self.assertAllEqual(mixed, tf.stack(want), msg=f'jit={jit}')

  def test_ex_batches_equal_the_host_pipeline(self):
    def batches(device):
      task = ex.ExemplarTask(ex.ExConfig(**dict(
          ex.ExemplarTask.cpu_overrides, batch_size=4,
          device_preprocessing=device)))
      return task, task_checks.take(task.make_dataset(
          sources.SyntheticImageSource(120, 160), 4, seed=2), 3)

    _, host = batches(False)
    task, raw = batches(True)
    self.assertEqual(set(raw[0][0]), {'index', 'source', 'source_size',
                                      'resized_on_host', 'color', 'centres',
                                      'transforms'})
    # Measured (1, 2 and 8 threads, 0-255): 4.4e-3 without XLA (Grappler's
    # arithmetic rewrites of the warp in a tf.function; eagerly it equals the
    # kernel, tests/test_warp.py), 2.6e-3 under XLA.
    for jit, tolerance in ((False, 0.03), (True, 0.03)):
      complete = tf.function(task.device_inputs, jit_compile=jit)
      for (features, labels), (want, want_labels) in zip(raw, host):
        features, labels = complete(features, labels)
        self.assertEqual(set(features), set(want))
        self.assertAllEqual(labels['negative_index'],
                            want_labels['negative_index'])
        self.assertAllEqual(features['transforms'], want['transforms'])
        self.assertAllClose(features['patches'], want['patches'],
                            atol=tolerance, rtol=0)

  def test_col_training_step_matches_the_host_path(self):
    plain = col_training()
    for xla in (False, True):
      losses, variables = col_training(xla=xla, device_preprocessing=True)
      # Measured (1 and 2 threads): losses equal to 2.4e-7 relative,
      # variables to 6e-8.
      self.assertAllClose(losses, plain[0], rtol=1e-5)
      for a, b in zip(variables, plain[1]):
        self.assertAllClose(a, b, rtol=1e-3, atol=1e-4)


  def test_rp_and_ex_compiled_steps_match_the_host_path(self):
    # The moved work (rp's windows and noise, ex's warps) inside an XLA
    # step, against the host path's plain step. Measured (1 and 2 threads):
    # first-step losses equal (rp) and 3.6e-5 apart relative (ex).
    configs = {
        'rp': (rp.RelativePositionTask, rp.RPConfig, dict(
            patch_size=32, gap=16, jitter=3, min_pixels=20000,
            max_pixels=30000, unit_depths=(16, 8), unit_bottleneck=8,
            fc_bottleneck=8)),
        'ex': (ex.ExemplarTask, ex.ExConfig, dict(
            image_size=64, patch_size=24, unit_depths=(16, 8),
            unit_bottleneck=8)),
    }
    for name, (task_class, config_class, fields) in configs.items():
      losses = []
      for device in (False, True):
        tf_keras.utils.set_random_seed(0)
        task = task_class(config_class(batch_size=2,
                                       device_preprocessing=device, **fields))
        trunk = resnet_v2.ResNetV2(TINY, output_stride=8, scope='tiny')
        model = model_lib.MultiTaskModel(trunk, {name: task})
        features, labels = task_checks.take(task.make_dataset(
            sources.SyntheticImageSource(120, 160), 2, seed=0), 1)[0]
        model.build_all({name: features})
        step = step_lib.TaskTrainStep(model, name, optimizers.TF1RMSProp(1e-3),
                                      jit_compile=device)
        losses.append(float(step(features, labels)['loss']))
      self.assertTrue(np.isfinite(losses[1]), msg=name)
      self.assertAllClose(losses[1], losses[0], rtol=2e-4, msg=name)


class TrunkLayoutTest(tf.test.TestCase):

  def _graph_ops(self, trunk, training):
    fn = tf.function(lambda x: trunk(x, training=training)[trunk.output_name])
    graph = fn.get_concrete_function(tf.TensorSpec([1, 32, 32, 3])).graph
    ops = list(graph.get_operations())
    for function in graph._functions.values():  # pylint: disable=protected-access
      ops += function.graph.get_operations()
    return ops

  def test_channels_last_and_fused_batch_norm(self):
    trunk = resnet_v2.trunk_from_name('resnet_v2_tiny', 8)
    for training in (True, False):
      ops = self._graph_ops(trunk, training)
      types = [op.type for op in ops]
      batch_norms = sum(isinstance(l, tf_keras.layers.BatchNormalization)
                        for l in trunk.submodules)
      self.assertEqual(types.count('FusedBatchNormV3'), batch_norms)
      # No unfused batch norm: its moments would be Mean/SquaredDifference.
      self.assertNotIn('SquaredDifference', types)
      convs = [op for op in ops if op.type == 'Conv2D']
      self.assertNotEmpty(convs)
      for op in convs:
        self.assertEqual(op.get_attr('data_format'), b'NHWC')

  def test_native_atrous_forward_matches(self):
    images = tf.random.uniform([2, 40, 40, 3], -100, 100, seed=3)
    trunks = [resnet_v2.trunk_from_name('resnet_v2_tiny', 8,
                                        native_atrous=native)
              for native in (False, True)]
    trunks[0](images)
    trunks[1](images)
    for a, b in zip(trunks[1].variables, trunks[0].variables):
      a.assign(b)
    out = [t(images, training=False)[t.output_name] for t in trunks]
    self.assertAllClose(out[1], out[0], rtol=1e-4, atol=1e-4)
    types = [[op.type for op in self._graph_ops(t, False)] for t in trunks]
    self.assertIn('SpaceToBatchND', types[0])
    self.assertNotIn('SpaceToBatchND', types[1])
    self.assertEqual(types[0].count('Conv2D'), types[1].count('Conv2D'))
    self.assertEqual(trunks[1].get_config()['native_atrous'], True)


def _images(n, height=375, width=500, seed=0):
  return [synthetic.synthetic_image(seed, i, height, width) for i in range(n)]


class PreprocessingTest(tf.test.TestCase, parameterized.TestCase):

  def test_resize_matches_tensorflow(self):
    image = _images(1)[0].astype(np.float32)
    for size in ((474, 632), (256, 341), (256, 256), (97, 60), (375, 500)):
      want = tf.image.resize(image, size, antialias=True)
      # Measured: <= 9e-4 of the 0-255 range (float64 vs float32 weights).
      self.assertAllClose(ref.resize_antialiased(image, *size), want,
                          atol=5e-3)

  def test_fast_lab_matches_plain(self):
    rgb = tf.random.uniform([64, 64, 3], seed=1)
    plain = color.rgb_to_lab(rgb)
    # Measured: 2e-5 (L, 0-100) and 9e-5 (a, b).
    self.assertAllClose(color.rgb_to_lab(rgb, fast=True), plain, atol=5e-4)
    self.assertAllClose(ref.lab(rgb.numpy()), plain, atol=5e-4)
    self.assertAllClose(color.lightness_as_rgb(rgb * 255, fast=True),
                        color.lab_lightness_as_rgb(plain), atol=2e-3)

  def test_soft_encoding_distances_are_exact(self):
    ab = tf.random.uniform([3, 8, 8, 2], -110, 110, seed=2)
    broadcast = tf.reduce_sum(tf.square(ab[..., None, :] - ab_bins.ab_bins()),
                              axis=-1)
    self.assertAllEqual(ab_bins._squared_distances(ab), broadcast)  # pylint: disable=protected-access
    indices, weights = ab_bins.soft_encode(ab, 5)
    want_indices, want_weights = ref.soft_encode(ab.numpy(), 5, ab_bins.SIGMA)
    self.assertAllEqual(indices, want_indices)
    self.assertAllClose(weights, want_weights, atol=1e-6)

  def test_views_per_transform_are_bit_identical(self):
    image = tf.random.uniform([64, 64, 3], seed=4)
    transforms = tf.stack([ex.view_transform([32., 30.], [1., -2.], s, a, 24)
                           for s, a in ((0.8, 0.1), (1.3, -0.3), (1.0, 0.0))])
    batched = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.tile(image[None], [3, 1, 1, 1]), transforms=transforms,
        output_shape=[24, 24], fill_value=0.0, interpolation='BILINEAR',
        fill_mode='REFLECT')
    self.assertAllEqual(ex.extract_views(image, transforms, 24), batched)

  @parameterized.parameters(False, True)
  def test_rp(self, harmonize):
    images = _images(3, 200, 300) + _images(1, 375, 500)
    results = {}
    for fast in (True, False):
      task = rp.RelativePositionTask(rp.RPConfig(harmonize=harmonize,
                                                 fast_preprocessing=fast))
      results[fast] = [task.example(tf.constant(i, tf.int64), image, 7)
                       for i, image in enumerate(images)]
      for i, image in enumerate(images):
        features, labels = results[fast][i]
        want, want_labels = ref.rp_example(
            image, ref.rp_draws(task, 7, i, image.shape), task.config)
        self.assertAllEqual(features['corners'], want['corners'])
        self.assertAllEqual(features['image_size'], want['image_size'])
        self.assertEqual(int(labels['label']), want_labels['label'])
        # Measured: <= 0.005 (colour dropping, RMS 50) and 5e-4
        # (harmonized, 0-255).
        self.assertAllClose(features['patches'], want['patches'], atol=0.05)
    for (a, _), (b, _) in zip(results[True], results[False]):
      self.assertAllEqual(a['corners'], b['corners'])
      # Measured: <= 0.005 (windowed vs full resize, float32 positions).
      self.assertAllClose(a['patches'], b['patches'], atol=0.05)

  def test_col(self):
    # 256 x 320 images need no resize, so the crop is exact; one 375 x 500
    # image exercises the resize (uint8 rounding of values a few 1e-4 apart
    # can differ by one level there).
    images = _images(3, 256, 320) + _images(1, 375, 500)
    outputs = {}
    for fast in (True, False):
      task = col.ColorizationTask(col.ColConfig(fast_preprocessing=fast))
      outputs[fast] = []
      for i, image in enumerate(images):
        features, labels, ok = task._example(  # pylint: disable=protected-access
            tf.constant(i, tf.int64), tf.constant(image), 7)
        _, labels = task.encode_targets(features, labels)
        outputs[fast].append((features, labels))
        want, want_labels, want_ok = ref.col_example(
            image, ref.col_draws(task, 7, i), task.config)
        self.assertEqual(bool(ok), want_ok)
        exact = i < 3
        if exact:
          self.assertAllEqual(labels['image'], want_labels['image'])
        else:
          self.assertAllClose(labels['image'], want_labels['image'], atol=1)
        # Measured: 5e-5 (exact crops), 0.84 where a resized pixel rounds
        # the other way (0-255 trunk input); ab 2e-5 / 0.01.
        self.assertAllClose(features['image'], want['image'],
                            atol=2e-3 if exact else 2.0)
        self.assertAllClose(labels['ab'], want_labels['ab'],
                            atol=1e-3 if exact else 0.05)
        same_bins = np.all(labels['bins'].numpy() == want_labels['bins'],
                           axis=-1)
        self.assertGreater(np.mean(same_bins), 0.995)
        # The decoded colour is continuous in ab only while the k nearest
        # bins stay the same: where an ab value lies on a tie between two
        # candidates for the k-th bin, a rounding difference swaps one bin
        # and moves the decode by up to ~1 (measured 0.81, 1 of 1024 cells
        # of the resized image). Compare where the bins agree.
        decoded = ab_bins.decode_soft_encoding(labels['bins'],
                                               labels['bin_weights'])
        want_decoded = ab_bins.decode_soft_encoding(
            want_labels['bins'], want_labels['bin_weights'])
        self.assertAllClose(tf.boolean_mask(decoded, same_bins),
                            tf.boolean_mask(want_decoded, same_bins),
                            atol=0.01 if exact else 0.1)
    for (fa, la), (fb, lb) in zip(outputs[True], outputs[False]):
      # Measured: 5e-5 (0-255) and 1.4e-5 (ab).
      self.assertAllClose(fa['image'], fb['image'], atol=2e-3)
      self.assertAllClose(la['ab'], lb['ab'], atol=1e-3)
      self.assertAllEqual(la['image'], lb['image'])

  def test_ex(self):
    images = _images(3)
    outputs = {}
    for fast in (True, False):
      task = ex.ExemplarTask(ex.ExConfig(fast_preprocessing=fast))
      outputs[fast] = []
      for i, image in enumerate(images):
        features = task.example(tf.constant(i, tf.int64), tf.constant(image), 7)
        outputs[fast].append(features)
        want = ref.ex_example(image, ref.ex_draws(task, 7, i), task.config)
        self.assertAllClose(features['transforms'], want['transforms'])
        diff = np.abs(features['patches'].numpy() - want['patches'])
        # Measured (0-255): max 0.05, mean 5e-5; OpenCV's 1/32-pixel
        # interpolation weights are the difference.
        self.assertLess(diff.max(), 1.0)
        self.assertLess(diff.mean(), 0.01)
    for a, b in zip(outputs[True], outputs[False]):
      # Measured: 6e-4.
      self.assertAllClose(a['patches'], b['patches'], atol=0.01)
    groups = np.stack([f['patches'] for f in outputs[True]])
    arranged, _ = ex.ExemplarTask.arrange_triplets({
        'patches': tf.constant(groups), 'index': tf.range(3, dtype=tf.int64)})
    self.assertAllEqual(arranged['patches'], ref.ex_arrange_triplets(groups))

  def test_ms(self):
    task = ms.MotionSegmentationTask(ms.MsConfig(frame_height=48,
                                                 frame_width=64))
    frames = _images(2, 60, 80)
    # Labels at twice the label size: area resampling, thresholded at 1/2.
    labels = [np.arange(12 * 16).reshape(12, 16) % 3 == 0,
              np.arange(12 * 16).reshape(12, 16) % 5 < 3]
    source = _MemoryMotion(frames, [l.astype(np.uint8) for l in labels])
    (features, got), = task_checks.take(task.make_dataset(source, 2, 0), 1)
    for i, (frame, label) in enumerate(zip(frames, labels)):
      want, want_labels = ref.ms_example(frame, label.astype(np.uint8),
                                         task.config)
      self.assertAllClose(features['image'][i], want['image'], atol=5e-3)
      self.assertAllEqual(got['mask'][i], want_labels['mask'])


class _MemoryMotion(motion_sources.MotionSource):

  def __init__(self, frames, labels):
    super().__init__('memory')
    self.frames, self.labels = frames, labels

  def validate(self):
    pass

  def examples(self, seed, start=0):
    del seed
    frames = tf.constant(np.stack(self.frames))
    labels = tf.constant(np.stack(self.labels))
    return tf.data.Dataset.range(start, start + len(self.frames)).map(
        lambda k: (k, frames[k - start], labels[k - start]))


class PrefetchTest(tf.test.TestCase):

  def test_to_device_keeps_the_elements(self):
    dataset = tf.data.Dataset.range(6).map(
        lambda k: {'index': k, 'image': tf.fill([2, 2, 3], tf.cast(k, tf.float32))}
    ).batch(2)
    # The transformation itself, on the CPU device.
    moved = prefetch.to_device(dataset, '/cpu:0')
    for a, b in zip(task_checks.take(moved, 3), task_checks.take(dataset, 3)):
      task_checks.assert_same_structure_values(self, a, b)
    # Without an accelerator, 'auto' leaves the pipeline as it is.
    if prefetch.accelerator_device() is None:
      self.assertIs(prefetch.to_device(dataset), dataset)
    self.assertIs(prefetch.to_device(dataset, None), dataset)
    with self.assertRaisesRegex(ValueError, 'buffer_size'):
      prefetch.to_device(dataset, '/cpu:0', buffer_size=0)


if __name__ == '__main__':
  tf.test.main()
