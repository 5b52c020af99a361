"""Evaluation metrics against hand-computed cases."""

import numpy as np
from absl.testing import absltest

from mtssl.evaluation import metrics


class TopKTest(absltest.TestCase):

  def test_hand_computed(self):
    scores = np.array([
        [0.1, 0.5, 0.3, 0.2],  # label 2: one class higher -> rank 1
        [0.4, 0.4, 0.1, 0.0],  # label 1: tie with class 0 -> rank 0
        [0.0, 0.1, 0.2, 0.9],  # label 0: three higher -> rank 3
    ])
    labels = np.array([2, 1, 0])
    self.assertEqual(metrics.top_k_correct(scores, labels, 1).tolist(),
                     [False, True, False])
    self.assertEqual(metrics.top_k_correct(scores, labels, 2).tolist(),
                     [True, True, False])
    self.assertEqual(metrics.top_k_correct(scores, labels, 4).tolist(),
                     [True, True, True])
    acc = metrics.TopKAccumulator((1, 2))
    acc.update(scores[:2], labels[:2])  # streaming = one batch
    acc.update(scores[2:], labels[2:])
    out = acc.result()
    self.assertAlmostEqual(out['top1'], 100.0 / 3)
    self.assertAlmostEqual(out['top2'], 200.0 / 3)
    self.assertEqual(out['num_examples'], 3)

  def test_label_outside_class_range_is_named(self):
    with self.assertRaisesRegex(metrics.MetricInputError,
                                r'label 4 is outside the class range \[0, 4\)'):
      metrics.top_k_correct(np.zeros([2, 4]), np.array([1, 4]), 1)


class DepthTest(absltest.TestCase):

  def test_hand_computed(self):
    gt = np.array([[1.0, 2.0], [4.0, 0.0]])     # 0: no measurement
    pred = np.array([[1.1, 3.0], [2.0, 5.0]])
    # Valid pixels d = 1, 2, 4 with predictions 1.1, 3, 2:
    #   ratios max(d/p, p/d) = 1.1, 1.5, 2.0
    #   < 1.25: 1 of 3; < 1.5625: 2; < 1.953125: 2 (2.0 is not below)
    #   |d - p| = 0.1, 1.0, 2.0 -> mean 3.1 / 3
    #   |d - p| / d = 0.1, 0.5, 0.5 -> mean 1.1 / 3
    acc = metrics.DepthAccumulator()
    acc.update(pred, gt)
    out = acc.result()
    self.assertAlmostEqual(out['delta1'], 100.0 / 3)
    self.assertAlmostEqual(out['delta2'], 200.0 / 3)
    self.assertAlmostEqual(out['delta3'], 200.0 / 3)
    self.assertAlmostEqual(out['mae'], 3.1 / 3)
    self.assertAlmostEqual(out['rel'], 1.1 / 3)
    self.assertEqual(out['num_pixels'], 3)

  def test_pooled_over_pixels_and_invalid_values_ignored(self):
    gt = np.array([1.0, np.nan, -1.0, np.inf, 2.0, 8.0])
    pred = np.array([1.0, 5.0, 5.0, 5.0, 0.0, 4.0])
    acc = metrics.DepthAccumulator()
    acc.update(pred[:3], gt[:3])
    acc.update(pred[3:], gt[3:])
    out = acc.result()
    # Valid: d = 1 (p = 1, exact), d = 2 (p = 0: no ratio, fails every
    # threshold), d = 8 (p = 4: ratio 2, fails every threshold).
    self.assertEqual(out['num_pixels'], 3)
    self.assertAlmostEqual(out['delta1'], 100.0 / 3)
    self.assertAlmostEqual(out['delta3'], 100.0 / 3)
    self.assertAlmostEqual(out['mae'], (0 + 2 + 4) / 3)
    self.assertAlmostEqual(out['rel'], (0 + 1 + 0.5) / 3)

  def test_shape_mismatch_is_named(self):
    with self.assertRaisesRegex(metrics.MetricInputError, r'\(2,\).*\(3,\)'):
      metrics.DepthAccumulator().update(np.ones(2), np.ones(3))


def _box(y0, x0, y1, x1):
  return [y0, x0, y1, x1]


class VocApTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    # Class 0 ground truth: image 0 has G1 (normal) and G2 (difficult),
    # image 1 has G3. Class 1 has no ground truth at all.
    self.acc = metrics.DetectionAccumulator(2, (0.5, 0.75))
    self.acc.add_ground_truth('im0', [_box(0, 0, 10, 10), _box(20, 20, 30, 30)],
                              [0, 0], [False, True])
    self.acc.add_ground_truth('im1', [_box(0, 0, 10, 10)], [0], [False])
    # Detections of class 0, by decreasing score (overlaps with the devkit's
    # inclusive pixel boxes: G1 is 11 x 11 = 121 pixels):
    #   d1 (0.9) = G1 exactly                      -> TP
    #   d2 (0.8) = G2, difficult                   -> ignored
    #   d3 (0.7) 110/121 with G1, already found    -> FP (duplicate)
    #   d4 (0.6) 77/121 = 0.64 with G3             -> TP at 0.5, FP at 0.75
    #   d5 (0.5) overlaps nothing                  -> FP
    self.acc.add_detections('im0', [_box(20, 20, 30, 30), _box(0, 0, 10, 10),
                                    _box(0, 0, 10, 9)], [0.8, 0.9, 0.7],
                            [0, 0, 0])
    self.acc.add_detections('im1', [_box(0, 0, 10, 6), _box(50, 50, 60, 60)],
                            [0.6, 0.5], [0, 0])
    # A class-1 detection: a false positive for class 1 only.
    self.acc.add_detections('im1', [_box(0, 0, 10, 10)], [0.99], [1])

  def test_11_point_ap_at_iou_05(self):
    # Cumulative over d1, d3, d4, d5 (d2 ignored): TP 1,1,2,2; FP 0,1,1,2;
    # npos = 2 (G2 is difficult) -> recall .5,.5,1,1; precision 1,.5,2/3,.5.
    # 11-point: t = 0 .. 0.5 -> max precision 1 (6 points);
    #           t = 0.6 .. 1 -> max precision at recall 1 = 2/3 (5 points).
    self.assertAlmostEqual(self.acc.class_ap(0, 0.5), (6 + 5 * 2 / 3) / 11)

  def test_11_point_ap_at_iou_075(self):
    # d4 (overlap 0.64) is now an FP: recall never exceeds 0.5 -> 6 points of 1.
    self.assertAlmostEqual(self.acc.class_ap(0, 0.75), 6 / 11)

  def test_map_leaves_out_classes_without_ground_truth(self):
    out = self.acc.result()
    self.assertIsNone(out['AP@50']['1'])
    self.assertAlmostEqual(out['mAP@50'], 100 * (6 + 5 * 2 / 3) / 11)
    self.assertAlmostEqual(out['mAP@75'], 100 * 6 / 11)
    self.assertEqual(out['num_images'], 2)

  def test_all_point_ap(self):
    acc = metrics.DetectionAccumulator(2, (0.5,), use_07_metric=False)
    acc.ground_truth = self.acc.ground_truth
    acc.detections = self.acc.detections
    # Area under the precision envelope: recall 0 -> 0.5 at precision 1,
    # 0.5 -> 1 at precision 2/3.
    self.assertAlmostEqual(acc.class_ap(0, 0.5), 0.5 + 0.5 * 2 / 3)

  def test_overlap_at_the_threshold_counts(self):
    # VOCevaldet.m: `ovmax>=VOCopts.minoverlap`, areas with the "+1".
    acc = metrics.DetectionAccumulator(1, (0.5,))
    acc.add_ground_truth(0, [_box(1, 1, 10, 10)], [0])  # 10 x 10 pixels
    acc.add_detections(0, [_box(1, 1, 10, 5)], [1.0], [0])  # 50 of 100: 0.5
    self.assertAlmostEqual(acc.class_ap(0, 0.5), 1.0)
    acc.add_ground_truth(1, [_box(1, 1, 10, 10)], [0])
    acc.add_detections(1, [_box(1, 1, 10, 4.9)], [0.5], [0])  # 49 of 100
    # Ranked: TP (image 0), FP (image 1): recall .5, .5; precision 1, .5.
    self.assertAlmostEqual(acc.class_ap(0, 0.5), 6 / 11)

  def test_recall_thresholds_are_matlab_colon_doubles(self):
    # The devkit loops `for t=0:0.1:1`. MATLAB's colon builds the first half
    # as k * 0.1 and the second as 1 - k * 0.1: the fourth threshold is
    # 3 * 0.1 = 0.30000000000000004, above the double 0.3 = 3/10, while the
    # seventh and eighth are 1 - 0.4 and 1 - 3 * 0.1, the doubles 0.6 and 0.7.
    self.assertEqual(metrics.VOC07_RECALL_THRESHOLDS[3], 3 * 0.1)
    self.assertGreater(metrics.VOC07_RECALL_THRESHOLDS[3], 3 / 10)
    self.assertEqual(metrics.VOC07_RECALL_THRESHOLDS[6], 3 / 5)
    self.assertEqual(metrics.VOC07_RECALL_THRESHOLDS[7], 7 / 10)
    # So recall 3/10 reaches 3 points (0, 0.1, 0.2), 3/5 reaches 7, 7/10 8.
    self.assertEqual(metrics.voc_ap([3 / 10], [1.0]), 3 / 11)
    self.assertAlmostEqual(metrics.voc_ap([3 / 5], [1.0]), 7 / 11)
    self.assertAlmostEqual(metrics.voc_ap([7 / 10], [1.0]), 8 / 11)

  def test_matlab_colon_reproduces_published_matlab_results(self):
    # MATLAB Answers, "How does COLON work?": x = 0:0.1:0.3, y = 0:0.1:0.4;
    # MATLAB prints x - y(1:end-1) = 1.0e-16 * [0 0 -0.2776 -0.5551].
    x = np.array(metrics.matlab_colon(0, 0.1, 0.3))
    y = np.array(metrics.matlab_colon(0, 0.1, 0.4))
    np.testing.assert_allclose((x - y[:-1]) * 1e16,
                               [0, 0, -0.2776, -0.5551], atol=1e-4)
    # Stack Overflow 15514343: `x == 0.20` holds for an x of 0:0.01:1 but for
    # none of -1:0.01:1.
    self.assertIn(0.2, metrics.matlab_colon(0, 0.01, 1))
    self.assertNotIn(0.2, metrics.matlab_colon(-1, 0.01, 1))
    self.assertLen(metrics.matlab_colon(-1, 0.01, 1), 201)
    self.assertEqual(metrics.matlab_colon(1, 1, 4), [1.0, 2.0, 3.0, 4.0])
    self.assertEqual(metrics.matlab_colon(0, 0.1, -1), [])

  def test_difficult_only_image_detections_are_ignored(self):
    acc = metrics.DetectionAccumulator(1, (0.5,))
    acc.add_ground_truth(0, [_box(0, 0, 10, 10)], [0], [True])
    acc.add_ground_truth(1, [_box(0, 0, 10, 10)], [0], [False])
    acc.add_detections(0, [_box(0, 0, 10, 10)], [0.9], [0])
    acc.add_detections(1, [_box(0, 0, 10, 10)], [0.8], [0])
    self.assertAlmostEqual(acc.class_ap(0, 0.5), 1.0)

  def test_bad_input_is_named(self):
    acc = metrics.DetectionAccumulator(3)
    with self.assertRaisesRegex(metrics.MetricInputError, r'class 3 .*\[0, 3\)'):
      acc.add_ground_truth(0, [_box(0, 0, 1, 1)], [3])
    with self.assertRaisesRegex(metrics.MetricInputError, r'\[N, 4\]'):
      acc.add_detections(0, [[0, 0, 1]], [1.0], [0])
    acc.add_ground_truth(0, np.zeros([0, 4]), [])
    with self.assertRaisesRegex(metrics.MetricInputError, 'already has'):
      acc.add_ground_truth(0, np.zeros([0, 4]), [])
    acc.add_detections('other', [_box(0, 0, 1, 1)], [1.0], [0])
    with self.assertRaisesRegex(metrics.MetricInputError, 'no ground-truth'):
      acc.result()

  def test_random_baseline_is_low_and_seeded(self):
    gt = [(np.array([_box(10, 10, 50, 50)], np.float64), np.array([0]),
           np.array([False]))] * 20
    sizes = [(64, 64)] * 20
    a = metrics.random_detection_baseline(gt, 3, sizes, 50, seed=1)
    b = metrics.random_detection_baseline(gt, 3, sizes, 50, seed=1)
    self.assertEqual(a['mAP@50'], b['mAP@50'])
    self.assertLess(a['mAP@50'], 20.0)


if __name__ == '__main__':
  absltest.main()
