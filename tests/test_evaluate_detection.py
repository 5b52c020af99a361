"""The detection protocol: anchors, inputs, block-4 head, learning."""

import numpy as np
import tensorflow as tf

from mtssl.configs import evaluation as evaluation_config
from mtssl.evaluation import data as data_lib
from mtssl.evaluation import detection
from mtssl.evaluation import detector
from mtssl.evaluation import factory
from mtssl.evaluation import trunks
from tests import eval_fixtures


def tiny_config(model_dir, **overrides):
  """Few classes, at most 3 objects, 96x96: a problem a CPU learns quickly."""
  options = dict(
      model_dir=model_dir, trunk='resnet_v2_tiny', output_stride=8,
      image_size=96, short_side=96, scale_min=0.8, scale_max=1.2,
      anchor_sizes=(16.0, 32.0, 64.0), rpn_filters=64, num_proposals=64,
      num_sampled_rois=32, crop_size=8, block4_base_depth=16,
      max_instances=8, max_detections=20, head_batch_norm_decay=0.9,
      batch_norm='frozen',
      train_steps=4, batch_size=4, eval_batch_size=20, optimizer='rmsprop',
      learning_rate=1e-3, synthetic_classes=3, synthetic_max_objects=3,
      synthetic_train_examples=500, synthetic_eval_examples=100,
      log_every=50, checkpoint_every=1000)
  options.update(overrides)
  return evaluation_config.make_config('detection', **options)


class AnchorTest(tf.test.TestCase):

  def test_grid_of_model_garden_anchors(self):
    anchors = detector.make_anchors(32, 3, (16.0, 32.0), (0.5, 1.0, 2.0))
    grid = anchors['3'].numpy()
    self.assertEqual(grid.shape, (4, 4, 2 * 3 * 4))
    first = grid[0, 0].reshape(6, 4)   # sizes outer, aspect ratios inner
    r = np.sqrt(2.0)
    # Centre (4, 4) on stride 8; aspect a = width / height: half height
    # size / sqrt(a) / 2, half width size * sqrt(a) / 2 (same area).
    expected = [
        [4 - 8 * r, 4 - 8 / r, 4 + 8 * r, 4 + 8 / r],      # 16 px, 0.5
        [-4, -4, 12, 12],                                  # 16 px, 1
        [4 - 8 / r, 4 - 8 * r, 4 + 8 / r, 4 + 8 * r],      # 16 px, 2
        [4 - 16 * r, 4 - 16 / r, 4 + 16 * r, 4 + 16 / r],  # 32 px, 0.5
        [-12, -12, 20, 20],                                # 32 px, 1
        [4 - 16 / r, 4 - 16 * r, 4 + 16 / r, 4 + 16 * r],  # 32 px, 2
    ]
    self.assertAllClose(first, expected, atol=1e-4)
    self.assertAllClose(grid[1, 2, :4] - grid[0, 0, :4], [8, 16, 8, 16])


class InputTest(tf.test.TestCase):

  def _protocol(self, **config):
    source = data_lib.SyntheticLabeled('detection', 96, 96, num_classes=3,
                                       max_objects=3, eval_examples=4,
                                       train_examples=16)
    cfg = detection.DetectionConfig(image_size=96, short_side=96,
                                    anchor_sizes=(16.0, 32.0), max_instances=8,
                                    **config)
    trunk = trunks.make_trunk_provider(
        trunks.TrunkSpec('resnet_v2_tiny', 8)).build()
    protocol = detection.DetectionProtocol(cfg, trunk, source, source)
    protocol.validate()
    return protocol, source

  def _targets(self, source, n):
    out = []
    for ex in source.train(0).take(n):
      keep = ~ex['difficult'].numpy()
      out.append((ex['boxes'].numpy()[keep], ex['classes'].numpy()[keep]))
    return out

  def test_fixed_scale_maps_boxes_exactly(self):
    protocol, source = self._protocol(scale_min=0.5, scale_max=0.5, flip=False)
    batch = next(iter(protocol.train_dataset(0, 0, 8)))
    self.assertAllEqual(batch['image_shape'], np.full([8, 2], 48.0))
    self.assertAllEqual(batch['image'][:, 48:], np.zeros([8, 48, 96, 3]))
    for i, (boxes, classes) in enumerate(self._targets(source, 8)):
      n = len(classes)
      self.assertAllClose(batch['gt_boxes'][i, :n], boxes * 0.5)
      self.assertAllEqual(batch['gt_classes'][i, :n], classes + 1)
      self.assertAllEqual(batch['gt_classes'][i, n:], -np.ones(8 - n)
                          if n < 8 else [])

  def test_multi_scale_and_flip(self):
    protocol, source = self._protocol(scale_min=0.6, scale_max=1.4)
    batch = next(iter(protocol.train_dataset(0, 0, 16)))
    sizes = batch['image_shape'].numpy()[:, 0]
    self.assertGreater(len(set(sizes.tolist())), 4)   # scales vary
    self.assertLessEqual(sizes.max(), 96.0)           # cropped to the canvas
    self.assertGreater(sizes.max(), 90.0)             # some were enlarged
    boxes, classes = batch['gt_boxes'].numpy(), batch['gt_classes'].numpy()
    valid = classes > 0
    self.assertTrue(np.all(boxes[valid][:, 2] > boxes[valid][:, 0]))
    self.assertTrue(np.all(boxes[valid] >= 0))
    self.assertTrue(np.all(boxes[valid][:, 2:] <= 96))
    # Uncropped examples keep each box's size times the example's scale;
    # a flipped one mirrors the x coordinates.
    flipped = 0
    for i, (src_boxes, _) in enumerate(self._targets(source, 16)):
      scale = sizes[i] / 96.0
      if scale >= 1.0 or len(src_boxes) != int(np.sum(valid[i])):
        continue
      got = boxes[i][valid[i]]
      plain = src_boxes * scale
      mirrored = np.stack([plain[:, 0], sizes[i] - plain[:, 3], plain[:, 2],
                           sizes[i] - plain[:, 1]], 1)
      if np.allclose(got, mirrored, atol=0.6):
        flipped += 1
      else:
        self.assertAllClose(got, plain, atol=0.6)
    self.assertGreater(flipped, 0)


class TfdsVocFormatTest(tf.test.TestCase):

  def test_normalized_boxes_become_pixels_with_difficult_flags(self):
    data_dir = eval_fixtures.prepare_tiny_scenes(self.get_temp_dir() + '/tfds')
    source = data_lib.make_labeled_source(
        'detection', f'tfds:{eval_fixtures.TINY_SCENES_NAME}:train', 'eval',
        data_dir)
    source.validate()
    self.assertEqual(source.num_classes, 2)
    examples = list(source.eval())
    self.assertLen(examples, 4)
    for ex in examples:
      # The devkit's 1-based inclusive box rows 4..18, columns 5..24.
      self.assertAllClose(ex['boxes'], [[3.0, 4.0, 18.0, 24.0]], atol=1e-4)
      self.assertEqual(bool(ex['difficult'][0]), bool(ex['classes'][0] == 1))


class Block4HeadTest(tf.test.TestCase):

  def test_slim_names_load_from_a_slim_checkpoint(self):
    head = detector.Block4BoxHead('resnet_v2_tiny', 16, 3, num_classes=3)
    classes, boxes = head(tf.zeros([2, 5, 7, 7, 128]))
    self.assertEqual(classes.shape, (2, 5, 4))
    self.assertEqual(boxes.shape, (2, 5, 16))
    names = sorted(head.block4.slim_variables())
    self.assertIn('resnet_v2_tiny/block4/unit_3/bottleneck_v2/conv2/weights',
                  names)
    self.assertIn('resnet_v2_tiny/postnorm/gamma', names)
    # A Slim checkpoint of a whole network (more blocks than the head).
    rng = np.random.default_rng(0)
    values = {n: rng.normal(size=v.shape).astype(np.float32)
              for n, v in head.block4.slim_variables().items()}
    values['resnet_v2_tiny/block1/unit_1/bottleneck_v2/conv1/weights'] = (
        np.zeros([1, 1, 64, 8], np.float32))
    prefix = eval_fixtures.write_name_checkpoint(
        self.get_temp_dir() + '/slim/model.ckpt', values)
    from mtssl.backbones import slim_checkpoint  # pylint: disable=g-import-not-at-top
    slim_checkpoint.load_slim_checkpoint(head.block4, prefix)
    for name, var in head.block4.slim_variables().items():
      self.assertAllEqual(var, values[name], msg=name)


class DetectionEndToEndTest(tf.test.TestCase):

  def test_learns_far_above_chance(self):
    config = tiny_config(self.get_temp_dir() + '/det', train_steps=200)
    report = factory.make_evaluation(config).run()
    metrics, chance = report['metrics'], report['chance']
    self.assertEqual(metrics['num_images'], 100)
    # Measured (tiny random-init trunk, 3 classes, 200 steps, 100 held-out
    # scenes, the devkit's overlap): mAP@0.5 21.5 at seed 0 (used here), 22.8
    # at seed 1, 15.8 at seed 2. Chance (20 uniformly random boxes per
    # image): mAP@0.5 0.04.
    self.assertLess(chance['mAP@50'], 1.0)
    self.assertGreater(metrics['mAP@50'], 8.0)
    self.assertGreaterEqual(metrics['mAP@50'], metrics['mAP@75'])
    self.assertEqual(report['table_row'],
                     f'| Random init | {metrics["mAP@50"]:.2f} | '
                     f'{metrics["mAP@75"]:.2f} |')

  def test_lasso_runs(self):
    report = factory.make_evaluation(tiny_config(
        self.get_temp_dir() + '/lasso', lasso_l1=1e-3, train_steps=3,
        synthetic_eval_examples=8, eval_batch_size=8)).run()
    alpha = np.array(report['protocol_config']['lasso_alpha'])
    self.assertAllClose(np.sum(alpha**2), 1.0, atol=1e-5)
    self.assertNotAllClose(alpha, [0.0, 0.0, 1.0])


if __name__ == '__main__':
  tf.test.main()
