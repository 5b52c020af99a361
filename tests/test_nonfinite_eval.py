"""A diverged (NaN / Inf) model: metrics count it wrong, the protocols refuse
its trunk with one line and exit status 2."""

import contextlib
import io
import os
import re

import numpy as np
import tensorflow as tf
from absl import flags

from mtssl import evaluate as evaluate_cli
from mtssl.backbones import resnet_v2 as resnet_lib
from mtssl.backbones import slim_checkpoint
from mtssl.configs import evaluation as evaluation_config
from mtssl.evaluation import factory
from mtssl.evaluation import metrics
from mtssl.evaluation import runner
from mtssl.evaluation import trunks
from tests import eval_fixtures

TRUNK = 'resnet_v2_small'


def diverged_trunk():
  """resnet_v2_small as a diverged run leaves it: every weight NaN but one
  Inf in a batch-norm moving variance; returns (trunk, non-finite count)."""
  trunk = resnet_lib.trunk_from_name(TRUNK).build_for_input()
  for var in trunk.variables:
    var.assign(tf.fill(var.shape, np.nan))
  variance = next(v for v in trunk.variables if 'moving_variance' in v.name)
  values = variance.numpy()
  values[0] = np.inf
  variance.assign(values)
  return trunk, sum(int(np.prod(v.shape)) for v in trunk.variables)


class MetricsTest(tf.test.TestCase):

  def test_top_k_counts_nonfinite_scores_wrong(self):
    scores = np.array([
        [np.nan] * 4,                  # a diverged model: all NaN
        [0.1, 0.9, np.nan, 0.0],       # label 1 would be top-1
        [0.1, 0.9, 0.2, -np.inf],      # label 1 would be top-1
        [0.1, 0.9, 0.2, 0.0],          # finite, right
    ])
    labels = np.array([0, 1, 1, 1])
    self.assertEqual(metrics.top_k_correct(scores, labels, 1).tolist(),
                     [False, False, False, True])
    acc = metrics.TopKAccumulator((1, 4))
    acc.update(scores, labels)
    out = acc.result()
    self.assertEqual(out['top1'], 25.0)
    self.assertEqual(out['top4'], 25.0)
    self.assertEqual(out['nonfinite_examples'], 3)

  def test_depth_counts_nonfinite_predictions_as_errors(self):
    gt = np.array([1.0, 2.0, 4.0, 0.0])       # the last pixel is invalid
    pred = np.array([1.0, np.nan, np.inf, np.nan])
    acc = metrics.DepthAccumulator()
    acc.update(pred, gt)
    out = acc.result()
    self.assertEqual(out['num_pixels'], 3)
    self.assertEqual(out['nonfinite_predictions'], 2)
    self.assertAlmostEqual(out['delta1'], 100 / 3)
    self.assertAlmostEqual(out['delta3'], 100 / 3)
    self.assertEqual(out['mae'], np.inf)
    self.assertEqual(out['rel'], np.inf)

  def test_detection_drops_nonfinite_scores_and_misses_nonfinite_boxes(self):
    box = [1, 1, 10, 10]

    def ap(boxes, scores):
      acc = metrics.DetectionAccumulator(1, (0.5,))
      acc.add_ground_truth(0, [box, [21, 21, 30, 30]], [0, 0])
      acc.add_detections(0, boxes, scores, [0] * len(scores))
      return acc.result()

    clean = ap([box], [0.5])  # recall .5 at precision 1: 6 of 11 points
    self.assertAlmostEqual(clean['mAP@50'], 100 * 6 / 11)
    self.assertEqual(clean['nonfinite_detections'], 0)
    # NaN and Inf scores cannot be ranked: dropped and counted.
    out = ap([box, box, box], [0.5, np.nan, np.inf])
    self.assertAlmostEqual(out['mAP@50'], clean['mAP@50'])
    self.assertEqual(out['nonfinite_detections'], 2)
    # A NaN box with a finite score overlaps nothing: a FP ranked first.
    out = ap([box, [np.nan, 1, 10, 10]], [0.5, 0.9])
    self.assertAlmostEqual(out['mAP@50'], 100 * 6 * 0.5 / 11)
    self.assertEqual(out['nonfinite_detections'], 1)
    # All NaN (a diverged detector): nothing found.
    out = ap(np.full([3, 4], np.nan), [np.nan] * 3)
    self.assertEqual(out['mAP@50'], 0.0)
    self.assertEqual(out['nonfinite_detections'], 3)


class DivergedTrunkTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.trunk, cls.num_bad = diverged_trunk()
    cls.size = sum(int(np.prod(v.shape)) for v in cls.trunk.variables)
    cls.checkpoint = slim_checkpoint.write_trunk_checkpoint(
        cls.trunk, tf.compat.v1.test.get_temp_dir() + '/diverged',
        overwrite=True)

  def expected_message(self, checkpoint):
    return (f"--init_checkpoint '{checkpoint}': {self.num_bad} of the trunk's "
            f'{self.size} weight values are not finite (NaN or Inf, first in '
            f'{self.trunk.variables[0].name}): a diverged run, which cannot be '
            f'evaluated.')

  def provider(self, checkpoint):
    return trunks.make_trunk_provider(trunks.TrunkSpec(TRUNK, 8, checkpoint))

  def test_object_and_slim_checkpoints_are_refused(self):
    with self.assertRaises(trunks.TrunkLoadError) as caught:
      self.provider(self.checkpoint).build()
    self.assertEqual(str(caught.exception),
                     self.expected_message(self.checkpoint))
    values = {n: v.numpy() for n, v in self.trunk.slim_variables().items()}
    slim = eval_fixtures.write_name_checkpoint(
        self.get_temp_dir() + '/slim/model.ckpt', values)
    with self.assertRaisesRegex(
        trunks.TrunkLoadError,
        '^' + re.escape(f"--init_checkpoint '{slim}': {self.num_bad} of the "
                        f"trunk's {self.size} weight values are not finite")):
      self.provider(slim).build()

  def test_every_protocol_exits_2_with_one_line(self):
    for protocol in ('linear', 'depth', 'detection'):
      model_dir = os.path.join(self.get_temp_dir(), protocol)
      stderr = io.StringIO()
      flag_values = flags.FlagValues()
      evaluate_cli.parse_flags([
          'evaluate', protocol, f'--model_dir={model_dir}', f'--trunk={TRUNK}',
          f'--init_checkpoint={self.checkpoint}', '--train_steps=1'],
                               flag_values)
      with contextlib.redirect_stderr(stderr):
        status = evaluate_cli.main(['evaluate', protocol], flag_values)
      self.assertEqual(status, 2, protocol)
      self.assertEqual(stderr.getvalue().splitlines(),
                       ['error: ' + self.expected_message(self.checkpoint)])
      self.assertFalse(os.path.exists(
          os.path.join(model_dir, f'{protocol}_metrics.json')))

  def test_linear_metrics_of_a_diverged_trunk_are_zero(self):
    # Past the refusal (the trunk handed over directly), the linear head sees
    # NaN features and NaN logits: every example is wrong, none is 100%.
    evaluation = factory.make_evaluation(evaluation_config.make_config(
        'linear', model_dir=self.get_temp_dir() + '/linear_direct',
        trunk=TRUNK, output_stride=8, image_size=32, resize_size=32,
        batch_size=4, eval_batch_size=20, synthetic_train_examples=8,
        synthetic_eval_examples=20))
    protocol = evaluation.make_protocol(self.trunk)
    protocol.validate()
    protocol.build(next(iter(protocol.train_dataset(0, 0, 4))))
    out = runner.evaluate(protocol, 20)
    self.assertEqual(out['num_examples'], 20)
    self.assertEqual(out['nonfinite_examples'], 20)
    self.assertEqual(out['top1'], 0.0)
    self.assertEqual(out['top5'], 0.0)


if __name__ == '__main__':
  tf.test.main()
