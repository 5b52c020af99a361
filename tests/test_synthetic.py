"""The built-in procedural scenes: determinism, labels, geometry."""

import collections

import numpy as np
import tensorflow as tf

from mtssl.data import synthetic


class SyntheticSceneTest(tf.test.TestCase):

  def test_deterministic_and_index_addressable(self):
    a = synthetic.render_scene(3, 17, 64, 80)
    b = synthetic.render_scene(3, 17, 64, 80)
    self.assertAllEqual(a.image, b.image)
    self.assertAllEqual(a.depth, b.depth)
    self.assertNotAllEqual(a.image, synthetic.render_scene(3, 18, 64, 80).image)
    self.assertNotAllEqual(a.image, synthetic.render_scene(4, 17, 64, 80).image)
    self.assertEqual(a.image.shape, (64, 80, 3))
    self.assertEqual(a.image.dtype, np.uint8)

  def test_labels_are_consistent_with_the_image(self):
    for index in range(20):
      scene = synthetic.render_scene(0, index, 96, 96)
      self.assertEqual(len(scene.boxes), len(scene.classes))
      self.assertLen(scene.visible, len(scene.classes))
      self.assertTrue(np.all((scene.visible > 0) & (scene.visible <= 1)))
      for i, (box, cls) in enumerate(zip(scene.boxes, scene.classes)):
        ys, xs = np.nonzero(scene.instances == i + 1)
        # Boxes are the tight extent of each object's visible pixels.
        self.assertAllEqual(box, [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
        self.assertTrue(0 <= cls < synthetic.NUM_CLASSES)
      self.assertEqual(scene.instances.max(), len(scene.classes))
      self.assertTrue(0 <= scene.label < synthetic.NUM_CLASSES)

  def test_depth_is_metric_and_bounded(self):
    scene = synthetic.render_scene(1, 2, 128, 128)
    self.assertTrue(np.all(scene.depth >= synthetic.MIN_DEPTH))
    self.assertTrue(np.all(scene.depth <= synthetic.MAX_DEPTH))
    background = scene.instances == 0
    # Ground below the horizon gets nearer toward the bottom of the frame.
    column = scene.depth[:, 0][background[:, 0]]
    self.assertGreaterEqual(column[0], column[-1])
    # Objects stand in front of the background behind them.
    for i in range(1, scene.instances.max() + 1):
      mask = scene.instances == i
      self.assertLen(np.unique(scene.depth[mask]), 1)

  def test_scene_label_is_balanced_over_classes(self):
    counts = collections.Counter(
        synthetic.render_scene(0, i, 48, 48).label for i in range(300))
    self.assertLen(counts, synthetic.NUM_CLASSES)
    # Measured: 22-41 per class in 300 scenes (uniform would be 30).
    self.assertGreater(min(counts.values()), 12)

  def test_rejects_tiny_sizes(self):
    with self.assertRaisesRegex(ValueError, 'at least 16x16'):
      synthetic.render_scene(0, 0, 8, 8)


if __name__ == '__main__':
  tf.test.main()
